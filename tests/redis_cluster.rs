//! Redis Cluster: instances that share a cluster through `redis+cluster://`. Each test starts its
//! own three-primary cluster (see `support::redis_cluster`).

mod support;

use support::redis_cluster::{RedisCluster, key_slot, start_cluster};

/// Keys named `k0`, `k1`, … until one lands on each node: `(key, node)` pairs, in node order.
fn one_key_per_node(cluster: &RedisCluster) -> Vec<(String, usize)> {
    let mut found: Vec<Option<String>> = vec![None; cluster.len()];
    for n in 0.. {
        let key = format!("k{n}");
        let owner = cluster.key_owner(&key);
        found[owner].get_or_insert(key);
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    found.into_iter().flatten().zip(0..).collect()
}

#[test]
fn the_test_cluster_forms_and_moves_a_slot_with_its_keys() {
    let Some(cluster) = start_cluster("the_test_cluster_forms") else {
        return;
    };
    // The fixture's slot function agrees with the server's.
    for key in [
        "k0",
        "topic:general",
        "{p17}x",
        "a{}b",
        "{}",
        "user{42}:inbox",
    ] {
        let slot = cluster.cli(0, &["CLUSTER", "KEYSLOT", key]);
        assert_eq!(slot, key_slot(key).to_string(), "slot of {key}");
    }
    let keys = one_key_per_node(&cluster);
    for (key, node) in &keys {
        assert_eq!(cluster.cli(*node, &["SET", key, &format!("v-{key}")]), "OK");
    }
    // Node 0's key, with two more keys in its slot, moves to node 1.
    let (key, from) = (&keys[0].0, keys[0].1);
    let slot = key_slot(key);
    let tag = format!("{{{key}}}");
    for extra in ["a", "b"] {
        let k = format!("{tag}{extra}");
        assert_eq!(key_slot(&k), slot);
        assert_eq!(cluster.cli(from, &["SET", &k, extra]), "OK");
    }
    cluster.move_slot(slot, from, 1);
    assert_eq!(cluster.slot_owner(slot), 1);
    for i in 0..cluster.len() {
        assert_eq!(cluster.slot_owner(slot), 1, "node {i}'s view");
    }
    assert_eq!(cluster.cli(1, &["GET", key]), format!("v-{key}"));
    assert_eq!(cluster.cli(1, &["GET", &format!("{tag}a")]), "a");
    assert_eq!(cluster.cli(1, &["GET", &format!("{tag}b")]), "b");
    assert_eq!(cluster.cli(from, &["DBSIZE"]), "0");
    // The other nodes' keys stayed where they were.
    for (key, node) in &keys[1..] {
        assert_eq!(cluster.cli(*node, &["GET", key]), format!("v-{key}"));
    }
    assert!(cluster.info_cpu(0) > 0.0);
}

#[test]
fn the_test_cluster_serves_on_without_a_stopped_primary_and_takes_it_back() {
    let Some(mut cluster) = start_cluster("the_test_cluster_serves_on") else {
        return;
    };
    let keys = one_key_per_node(&cluster);
    cluster.stop(2);
    assert!(!cluster.is_running(2));
    for (key, node) in &keys[..2] {
        assert_eq!(cluster.cli(*node, &["SET", key, "up"]), "OK");
    }
    let info = cluster.cli(0, &["CLUSTER", "INFO"]);
    assert!(info.contains("cluster_state:ok"), "{info}");
    cluster.restart(2);
    let (key, node) = &keys[2];
    assert_eq!(*node, 2);
    assert_eq!(cluster.slot_owner(key_slot(key)), 2);
    assert_eq!(cluster.cli(2, &["SET", key, "back"]), "OK");
}
