//! Redis Cluster basics, each test with its own three-primary cluster: positioned topics on every
//! primary (positions, a recovery read from the stream on the topic's node, `remove_history`),
//! presence across instances (joins, leaves, a killed instance's users cleaned up by the script
//! on the topic's node), `basic_chat` taking a cluster URL from `REDIS_URL`, and cluster URLs
//! refused at build time. Publications are counted by offset and by the number in the payload.

mod support;

use std::time::Duration;

use axum_realtime_kit::{RedisTls, TopicPolicy};
use serde_json::json;
use support::certs::TestPki;
use support::presence::{self as scenario};
use support::redis_cluster::{CLUSTER_WAIT, TlsFiles, start_cluster, start_tls_cluster};
use support::rtk1::{next_pub, rtk1_subscribed};
use support::{Server, serve_chat};

/// `server`, once its instance is ready on the cluster.
async fn ready(server: Server) -> Server {
    support::wait_ready_within(&server.service, CLUSTER_WAIT).await;
    server
}

/// An instance on `url` whose topics starting with `pos` keep 1 000 publications for a minute.
async fn positioned(url: String) -> Server {
    positioned_with(url, None).await
}

/// [`positioned`], reaching the cluster over TLS with `tls` when given.
async fn positioned_with(url: String, tls: Option<RedisTls>) -> Server {
    let policy = TopicPolicy::history(1_000, Duration::from_secs(60));
    let mut builder = support::chat::builder()
        .shards(2)
        .topic_policy(move |topic| topic.starts_with("pos").then(|| policy.clone()))
        .redis_url(Some(url));
    if let Some(tls) = tls {
        builder = builder.redis_tls(tls);
    }
    ready(serve_chat(builder.build()).await).await
}

/// Topics `pos-0`, `pos-1`… until every primary serves at least one, as the instances'
/// subscriptions show; each with the node it lives on.
async fn positioned_topics_on_every_node(
    cluster: &support::redis_cluster::RedisCluster,
    a: &Server,
) -> Vec<(String, usize)> {
    let mut found: Vec<(String, usize)> = Vec::new();
    let mut holders = Vec::new();
    for i in 0..64 {
        let topic = format!("pos-{i}");
        let (c, _) = rtk1_subscribed(a.addr, &topic, None).await;
        holders.push(c);
        let owner = tokio::task::block_in_place(|| {
            (0..cluster.len()).find(|&n| {
                cluster
                    .shard_channels(n)
                    .iter()
                    .any(|ch| ch.ends_with(&format!("}}{topic}")))
            })
        });
        let owner = owner.expect("the topic's channel is subscribed on some node");
        if !found.iter().any(|(_, n)| *n == owner) {
            found.push((topic, owner));
        }
        if found.len() == cluster.len() {
            return found;
        }
    }
    panic!("64 topics did not cover every node: {found:?}");
}

/// On a topic of each primary: instance B publishes, Redis assigns the positions, a client on A
/// gets them; it drops, misses 50, and reconnects to A with its position after A has left the
/// topic: with the next publication A reads the 50 back from the topic's stream on its node and
/// delivers all in order. `remove_history` deletes the stream on that node: the next
/// publication starts again at offset 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_recovery_and_removal_on_every_primary() {
    let Some(cluster) = start_cluster("positions_recovery_and_removal_on_every_primary") else {
        return;
    };
    let a = positioned(cluster.url()).await;
    let b = positioned(cluster.url()).await;
    positions_on_every_primary(&cluster, &a, &b).await;
}

/// The same over a cluster that serves TLS only: the seeds and every node found through them
/// are reached over TLS and verified against the test CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn positions_recovery_and_removal_on_a_tls_cluster() {
    let pki = TestPki::new("cluster-tls");
    let files = TlsFiles {
        cert: pki.path("server.crt"),
        key: pki.path("server.key"),
        client_cert: pki.path("client.crt"),
        client_key: pki.path("client.key"),
        ca: pki.path("ca.crt"),
    };
    let Some(cluster) = start_tls_cluster("positions_recovery_and_removal_on_a_tls_cluster", files)
    else {
        return;
    };
    let tls = || Some(RedisTls::new().ca_file(pki.path("ca.crt")));
    let a = positioned_with(cluster.tls_url(), tls()).await;
    let b = positioned_with(cluster.tls_url(), tls()).await;
    positions_on_every_primary(&cluster, &a, &b).await;
}

/// The body of the two tests above.
async fn positions_on_every_primary(
    cluster: &support::redis_cluster::RedisCluster,
    a: &Server,
    b: &Server,
) {
    let topics = positioned_topics_on_every_node(cluster, a).await;
    for (topic, node) in &topics {
        let (mut c, _) = rtk1_subscribed(a.addr, topic, None).await;
        let mut epoch = String::new();
        for n in 1..=10u64 {
            let p = b.service.publish(topic, &json!({ "n": n })).await.unwrap();
            let p = p.expect("a position from Redis");
            assert_eq!(p.offset, n, "{topic} on node {node}");
            epoch = p.epoch;
            assert_eq!(next_pub(&mut c, topic).await, (n, epoch.clone(), n));
        }
        c.abort();
        for n in 11..=60u64 {
            b.service.publish(topic, &json!({ "n": n })).await.unwrap();
        }
        let (mut c, s) = rtk1_subscribed(a.addr, topic, Some((&epoch, 10))).await;
        assert_eq!(s["recovered"], true, "{topic} on node {node}: {s}");
        // A, away from the topic meanwhile, learns of the 50 with the next publication and
        // reads them back from the stream before delivering it.
        b.service.publish(topic, &json!({ "n": 61 })).await.unwrap();
        for n in 11..=61u64 {
            assert_eq!(next_pub(&mut c, topic).await, (n, epoch.clone(), n));
        }
        assert!(a.service.remove_history(topic).await, "{topic}");
        let p = b.service.publish(topic, &json!({ "n": 62 })).await.unwrap();
        let p = p.expect("a position");
        assert_eq!(p.offset, 1, "{topic}: a new stream after remove_history");
        assert_ne!(p.epoch, epoch);
    }
    assert_eq!(a.service.metrics().broker_reconnects, 0);
    assert_eq!(b.service.metrics().broker_reconnects, 0);
}

/// An instance whose `room*` topics track presence, on `url`.
async fn presence_instance(url: String) -> Server {
    let service = scenario::builder(Duration::from_secs(5))
        .redis_url(Some(url))
        .build();
    ready(serve_chat(service).await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_gives_one_join_per_user_and_one_leave_across_instances() {
    let Some(cluster) = start_cluster("cluster_presence_one_join_per_user") else {
        return;
    };
    let a = presence_instance(cluster.url()).await;
    let b = presence_instance(cluster.url()).await;
    scenario::one_join_per_user_and_one_leave_after_the_last(&a, &b).await;
    scenario::tabs_opened_and_closed_at_once_give_one_join_and_one_leave(&a, &b).await;
}

/// Two `basic_chat` processes given the cluster in `REDIS_URL`, entries living 1.5 s: the one
/// killed with SIGKILL has its user leave, seen on the other. The presence script finds the dead
/// instance's entries under a key it derives itself, in the topic's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_chat_on_a_cluster_cleans_up_a_killed_instances_users() {
    let Some(cluster) = start_cluster("basic_chat_on_a_cluster") else {
        return;
    };
    scenario::a_killed_instances_users_leave(cluster.url(), CLUSTER_WAIT).await;
}

#[tokio::test]
async fn a_bad_cluster_url_is_a_build_error() {
    for (url, says) in [
        ("redis+cluster:///", "at least one node"),
        ("redis+cluster://127.0.0.1:7000/2", "one database"),
        (
            "redis+cluster://127.0.0.1:7000/?partitions=0",
            "between 1 and 16384",
        ),
        (
            "redis+cluster://127.0.0.1:7000/?shards=4",
            "unknown Redis Cluster URL option",
        ),
    ] {
        let err = support::chat::builder()
            .redis_url(Some(url))
            .try_build()
            .expect_err(url);
        assert!(err.to_string().contains(says), "{url}: {err}");
    }
}

/// A primary stopped: publishes on its partitions fail with a retryable error naming the
/// partition, the others go through, and once the cluster has flagged the primary as failed the
/// instance is ready again (every instance sees the same outage). Restarted, it serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_primary_fails_its_partitions_only_and_leaves_the_instance_ready() {
    let Some(mut cluster) = start_cluster("a_failed_primary_fails_its_partitions_only") else {
        return;
    };
    let a = positioned(cluster.url()).await;
    let topics = positioned_topics_on_every_node(&cluster, &a).await;
    let (down_topic, _) = topics.iter().find(|(_, n)| *n == 2).cloned().unwrap();
    tokio::task::block_in_place(|| cluster.stop(2));
    let service = a.service.clone();
    let flagged = tokio::time::timeout(CLUSTER_WAIT, async {
        loop {
            let res = service.publish(&down_topic, &json!({ "n": 1 })).await;
            let e = res.expect_err("the stopped primary's partition publishes");
            assert!(e.is_retryable(), "{e}");
            assert!(e.to_string().contains("partition"), "{e}");
            if e.to_string().contains("no Redis Cluster primary serves") && service.is_ready() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        flagged.is_ok(),
        "the instance never saw the primary as failed"
    );
    for (topic, node) in topics.iter().filter(|(_, n)| *n != 2) {
        let p = a.service.publish(topic, &json!({ "n": 1 })).await;
        assert!(p.is_ok(), "{topic} on node {node}: {p:?}");
    }
    tokio::task::block_in_place(|| cluster.restart(2));
    let back = tokio::time::timeout(CLUSTER_WAIT, async {
        while service
            .publish(&down_topic, &json!({ "n": 2 }))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        back.is_ok(),
        "the restarted primary never served its partitions again"
    );
}

/// An ACL user on every node, given in the URL: the instances authenticate as that user on
/// every primary's connections, and messages go through on a topic of each primary.
/// A wrong password leaves an instance not ready, and its publishes fail with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_in_the_url_is_used_on_every_primary() {
    let Some(cluster) = start_cluster("an_acl_user_in_the_url_is_used_on_every_primary") else {
        return;
    };
    tokio::task::block_in_place(|| {
        for i in 0..cluster.len() {
            let reply = cluster.cli(
                i,
                &[
                    "ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all",
                ],
            );
            assert_eq!(reply, "OK");
        }
    });
    let with = |auth: &str| {
        cluster
            .url()
            .replace("redis+cluster://", &format!("redis+cluster://{auth}@"))
    };
    let a = positioned(with("app:s3cret")).await;
    let b = positioned(with("app:s3cret")).await;
    let topics = positioned_topics_on_every_node(&cluster, &a).await;
    for (topic, node) in &topics {
        let (mut c, _) = rtk1_subscribed(a.addr, topic, None).await;
        let p = b.service.publish(topic, &json!({ "n": 1 })).await;
        assert!(p.is_ok(), "{topic} on node {node}: {p:?}");
        assert_eq!(next_pub(&mut c, topic).await.2, 1, "{topic} on node {node}");
    }
    tokio::task::block_in_place(|| {
        for i in 0..cluster.len() {
            let clients = cluster.cli(i, &["CLIENT", "LIST"]);
            let of_app = clients.lines().filter(|l| l.contains(" user=app ")).count();
            // Each instance's subscriber and publisher on every primary.
            assert!(of_app >= 4, "node {i}: {clients}");
        }
    });

    let wrong = support::chat::builder()
        .redis_url(Some(with("app:wrong")))
        .build();
    let wrong = serve_chat(wrong).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!wrong.service.is_ready());
    let e = wrong
        .service
        .publish("general", &json!({ "n": 1 }))
        .await
        .expect_err("a wrong password publishes nothing");
    assert!(e.is_retryable(), "{e}");
}
