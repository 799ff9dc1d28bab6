//! Redis Cluster: which primary serves which slot, read from the cluster and kept current.
//!
//! `redis+cluster://[user:password@]host:port[,host:port…]/[?partitions=N]` names seed nodes
//! (port 6379 when left out; any node of the cluster will do, more than one in case one is
//! down) and, optionally, the partition count ([`slots::DEFAULT_PARTITIONS`] by default; every
//! instance of an application must use the same). `rediss+cluster://` speaks TLS to every node
//! with the service's [`RedisTls`](super::connect::RedisTls) settings. The user name and
//! password are the nodes' (an ACL user). A cluster has one database: a path other than `/` or
//! `/0` is refused.
//!
//! The slot table is read with `CLUSTER SHARDS` (Redis 7), or `CLUSTER SLOTS` where that is
//! unknown, from any node that answers: at start, every [`REFRESH_INTERVAL`], and at once when
//! something suggests it changed: a `MOVED` reply, a sharded subscription the server ended (its
//! slot moved), a node's connection lost or its probe overdue. Each primary gets its own
//! subscriber and publisher ([`super::redis`]); a primary that leaves the table has both
//! stopped, and its partitions are subscribed where they now live.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ahash::AHashMap;
use tokio::sync::watch;

use super::connect::{Addr, Target, connect, host_list, request};
use super::redis::{Node, Shared};
use super::resp::Value;
use super::slots::{self, Partitions, SLOTS};

/// The default port of a seed node.
const REDIS_PORT: u16 = 6379;

/// How often the slot table is read again when nothing prompted it.
pub(crate) const REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// Least time between two reads of the slot table: a burst of `MOVED` replies or ended
/// subscriptions costs one.
const REFRESH_GAP: Duration = Duration::from_millis(100);

/// What a cluster URL says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Spec {
    /// A `redis://` URL of the first seed carrying the credentials, for the caller to read as
    /// any other.
    pub(crate) node_url: String,
    pub(crate) tls: bool,
    pub(crate) seeds: Vec<(String, u16)>,
    pub(crate) partitions: u16,
}

impl Spec {
    /// For a `redis+cluster://` or `rediss+cluster://` URL, what it says; `None` for any other.
    pub(crate) fn from_url(url: &str) -> Option<Result<Self, String>> {
        let (rest, tls) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
            (rest, false)
        } else {
            (url.strip_prefix("rediss+cluster://")?, true)
        };
        Some(Self::parse(rest, tls))
    }

    fn parse(rest: &str, tls: bool) -> Result<Self, String> {
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((user, hosts)) => (Some(user), hosts),
            None => (None, authority),
        };
        let seeds = host_list(hosts, REDIS_PORT, "cluster node")?;
        if seeds.is_empty() {
            return Err(
                "a Redis Cluster URL names at least one node: redis+cluster://host:port/".into(),
            );
        }
        if !matches!(path, "" | "0") {
            return Err(format!(
                "a Redis Cluster has one database: the URL's path must be / (not /{path})"
            ));
        }
        let mut partitions = slots::DEFAULT_PARTITIONS;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("partitions", v)) => {
                    partitions = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=SLOTS).contains(n))
                        .ok_or_else(|| {
                            format!("partitions={v}: give a number between 1 and {SLOTS}")
                        })?;
                }
                _ => return Err(format!("unknown Redis Cluster URL option {pair:?}")),
            }
        }
        let (host, port) = &seeds[0];
        let user = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        Ok(Self {
            node_url: format!("redis://{user}{host}:{port}/"),
            tls,
            seeds,
            partitions,
        })
    }
}

/// A slot range and the primary that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Range {
    pub(crate) first: u16,
    pub(crate) last: u16,
    pub(crate) host: String,
    pub(crate) port: u16,
}

/// A `MOVED` or `ASK` error reply: the slot and the node to go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Redirect {
    /// The slot lives on that node now: read the table again and retry there.
    Moved { slot: u16, node: String },
    /// The slot is being migrated and this key is already there: send `ASKING` and the command
    /// to that node, once, without changing the table.
    Ask { slot: u16, node: String },
}

impl Redirect {
    /// Reads `MOVED 3999 127.0.0.1:6381` or `ASK 3999 127.0.0.1:6381`; `None` for anything else.
    pub(crate) fn parse(error: &str) -> Option<Self> {
        let mut words = error.split(' ');
        let kind = words.next()?;
        let slot: u16 = words.next()?.parse().ok().filter(|s| *s < SLOTS)?;
        let node = words.next()?;
        let (host, port) = node.rsplit_once(':')?;
        port.parse::<u16>().ok()?;
        if words.next().is_some() {
            return None;
        }
        let node = if host.is_empty() {
            // An unknown endpoint: the port alone; the caller keeps the host it asked.
            format!(":{port}")
        } else {
            node.to_owned()
        };
        match kind {
            "MOVED" => Some(Self::Moved { slot, node }),
            "ASK" => Some(Self::Ask { slot, node }),
            _ => None,
        }
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Bulk(Some(b)) | Value::Simple(b) => Some(String::from_utf8_lossy(b).into_owned()),
        _ => None,
    }
}

fn number(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

/// A flat `[key, value, key, value…]` reply as pairs (RESP2's form of a map).
fn pairs(v: &Value) -> Option<impl Iterator<Item = (String, &Value)>> {
    let Value::Array(Some(items)) = v else {
        return None;
    };
    Some(
        items
            .chunks(2)
            .filter_map(|kv| Some((text(kv.first()?)?, kv.get(1)?))),
    )
}

/// The primaries' slot ranges in a `CLUSTER SHARDS` reply. A node's empty or unknown endpoint
/// is `asked`, the node that answered; `tls` takes a node's `tls-port` when it has one.
pub(crate) fn parse_shards(v: &Value, asked: &str, tls: bool) -> Option<Vec<Range>> {
    let Value::Array(Some(shards)) = v else {
        return None;
    };
    let mut out = Vec::new();
    for shard in shards {
        let (mut ranges, mut primary) = (Vec::new(), None);
        for (key, value) in pairs(shard)? {
            match key.as_str() {
                "slots" => {
                    let Value::Array(Some(bounds)) = value else {
                        return None;
                    };
                    for b in bounds.chunks(2) {
                        let [first, last] = b else { return None };
                        let first = u16::try_from(number(first)?).ok()?;
                        let last = u16::try_from(number(last)?).ok()?;
                        ranges.push((first, last));
                    }
                }
                "nodes" => {
                    let Value::Array(Some(nodes)) = value else {
                        return None;
                    };
                    for node in nodes {
                        let mut fields: AHashMap<String, &Value> = AHashMap::new();
                        fields.extend(pairs(node)?);
                        let field = |k: &str| fields.get(k).and_then(|v| text(v));
                        if field("role").as_deref() != Some("master")
                            || field("health").is_some_and(|h| h != "online")
                        {
                            continue;
                        }
                        let port = fields
                            .get("tls-port")
                            .filter(|_| tls)
                            .or(fields.get("port"))
                            .and_then(|v| number(v))
                            .and_then(|p| u16::try_from(p).ok())?;
                        let host = field("endpoint")
                            .filter(|e| !e.is_empty() && e != "?")
                            .or_else(|| field("ip").filter(|e| !e.is_empty() && e != "?"))
                            .unwrap_or_else(|| asked.to_owned());
                        primary = Some((host, port));
                    }
                }
                _ => {}
            }
        }
        if let Some((host, port)) = primary {
            for (first, last) in ranges {
                out.push(Range {
                    first,
                    last,
                    host: host.clone(),
                    port,
                });
            }
        }
    }
    Some(out)
}

/// The primaries' slot ranges in a `CLUSTER SLOTS` reply (`[first, last, [host, port, id…],
/// replicas…]` per range).
pub(crate) fn parse_slots(v: &Value, asked: &str) -> Option<Vec<Range>> {
    let Value::Array(Some(ranges)) = v else {
        return None;
    };
    let mut out = Vec::new();
    for range in ranges {
        let Value::Array(Some(items)) = range else {
            return None;
        };
        let [first, last, Value::Array(Some(primary)), ..] = &items[..] else {
            return None;
        };
        let host = primary
            .first()
            .and_then(text)
            .filter(|h| !h.is_empty() && h != "?")
            .unwrap_or_else(|| asked.to_owned());
        let port = primary.get(1).and_then(number)?;
        out.push(Range {
            first: u16::try_from(number(first)?).ok()?,
            last: u16::try_from(number(last)?).ok()?,
            host,
            port: u16::try_from(port).ok()?,
        });
    }
    Some(out)
}

/// Asks the node at `target` for the primaries' slot ranges.
async fn read_topology(target: &Target) -> std::io::Result<Vec<Range>> {
    let (host, tls) = match &target.addr {
        Addr::Tcp { host, .. } => (host.clone(), target.tls.is_some()),
        _ => return Err(std::io::Error::other("a cluster node is reached over TCP")),
    };
    let mut stream = connect(target).await?;
    let shards: Vec<&[u8]> = vec![b"CLUSTER", b"SHARDS"];
    let reply = match request(&mut stream, &[shards]).await {
        Ok(reply) => reply
            .first()
            .and_then(|v| parse_shards(v, &host, tls))
            .ok_or_else(|| std::io::Error::other("unexpected reply to CLUSTER SHARDS"))?,
        Err(e) if e.to_string().contains("unknown") => {
            // Before Redis 7: the older command, on a new connection (the reply came, but be
            // safe about what is left unread on this one).
            let mut stream = connect(target).await?;
            let slots: Vec<&[u8]> = vec![b"CLUSTER", b"SLOTS"];
            request(&mut stream, &[slots])
                .await?
                .first()
                .and_then(|v| parse_slots(v, &host))
                .ok_or_else(|| std::io::Error::other("unexpected reply to CLUSTER SLOTS"))?
        }
        Err(e) => return Err(e),
    };
    Ok(reply)
}

/// Which node serves which slot, as last read.
#[derive(Debug, Default)]
pub(crate) struct Table {
    /// The primaries, each with its connections.
    pub(crate) nodes: Vec<Arc<Node>>,
    /// Slot → index in `nodes`; `None` for a slot no primary serves.
    owner: Vec<Option<u16>>,
}

impl Table {
    pub(crate) fn node_of_slot(&self, slot: u16) -> Option<&Arc<Node>> {
        let i = (*self.owner.get(usize::from(slot))?)?;
        self.nodes.get(usize::from(i))
    }

    /// The first slot `node` serves, if any.
    fn first_slot_of(&self, node: &Arc<Node>) -> Option<u16> {
        let i = self.nodes.iter().position(|n| Arc::ptr_eq(n, node))? as u16;
        self.owner
            .iter()
            .position(|o| *o == Some(i))
            .map(|s| s as u16)
    }
}

/// The cluster side of a broker: the partitions, the slot table and how to reach the nodes.
pub(crate) struct Cluster {
    pub(crate) partitions: Partitions,
    seeds: Vec<(String, u16)>,
    /// Credentials and TLS of every node; the address is each node's own.
    template: Target,
    /// Guarded by a std lock: read on every publish (a clone of the `Arc`), replaced by
    /// [`keep`] only; never held across an await.
    table: RwLock<Arc<Table>>,
    /// Asks [`keep`] to read the table now.
    refresh: tokio::sync::Notify,
    /// Counts the reads of the table that succeeded; a caller that asked for one waits for it.
    generation: watch::Sender<u64>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("partitions", &self.partitions.count())
            .field("seeds", &self.seeds)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    pub(crate) fn new(spec: &Spec, template: Target) -> Result<Self, String> {
        Ok(Self {
            partitions: Partitions::new(spec.partitions)?,
            seeds: spec.seeds.clone(),
            template,
            table: RwLock::new(Arc::default()),
            refresh: tokio::sync::Notify::new(),
            generation: watch::channel(0).0,
        })
    }

    pub(crate) fn table(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The target of the node at `host:port`.
    pub(crate) fn target(&self, host: &str, port: u16) -> Target {
        let mut t = self.template.clone();
        t.addr = Addr::Tcp {
            host: host.to_owned(),
            port,
        };
        t.db = 0;
        t
    }

    /// The node that serves `topic`'s partition, and the partition.
    pub(crate) fn node_of(&self, topic: &str) -> (Option<Arc<Node>>, u16) {
        let p = self.partitions.of(topic);
        let node = self.table().node_of_slot(self.partitions.slot(p)).cloned();
        (node, p)
    }

    /// Asks for the table to be read again soon.
    pub(crate) fn refresh_soon(&self) {
        self.refresh.notify_one();
    }

    /// Asks for the table to be read again and waits (at most `limit`) until it was.
    pub(crate) async fn refreshed(&self, limit: Duration) {
        let mut rx = self.generation.subscribe();
        rx.mark_unchanged();
        self.refresh.notify_one();
        let _ = tokio::time::timeout(limit, rx.changed()).await;
    }

    /// Readiness on a cluster: the slot table was read and the probe of every primary in it
    /// comes back. A primary this instance cannot reach while the cluster counts it healthy
    /// makes the instance unready (the fault may be this instance's own link, and another
    /// instance may serve its clients better). A primary the cluster itself has flagged as
    /// failed is no longer in the table: its partitions fail their publishes with
    /// [`PublishError::Unavailable`](super::PublishError::Unavailable), and the instance is
    /// ready again, since every instance sees the same outage and the other partitions work.
    pub(crate) fn is_live(&self) -> bool {
        let table = self.table();
        !table.nodes.is_empty() && table.nodes.iter().all(|n| n.live.load(Ordering::Acquire))
    }
}

/// Keeps the slot table current for as long as the broker runs: reads it at once, then every
/// [`REFRESH_INTERVAL`] and whenever asked. `spawn` starts a new primary's connections.
pub(crate) async fn keep(shared: Arc<Shared>, spawn: impl Fn(&Arc<Node>, Target)) {
    let Some(cluster) = shared.cluster() else {
        return;
    };
    let mut failures = 0u32;
    loop {
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        match read_any(cluster).await {
            Ok(ranges) => {
                failures = 0;
                apply(&shared, cluster, ranges, &spawn);
                cluster.generation.send_modify(|g| *g += 1);
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures % 20 == 0 {
                    tracing::warn!(error = %e, "reading the Redis Cluster's slot table failed");
                }
            }
        }
        // At least REFRESH_GAP apart; sooner than REFRESH_INTERVAL when asked (or failing).
        tokio::time::sleep(REFRESH_GAP).await;
        let wait = if failures > 0 {
            Duration::from_millis(500)
        } else {
            REFRESH_INTERVAL
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = cluster.refresh.notified() => {}
        }
    }
}

/// Reads the table from the known primaries first, then from the seeds.
async fn read_any(cluster: &Cluster) -> Result<Vec<Range>, String> {
    let mut asked: Vec<(String, u16)> = cluster
        .table()
        .nodes
        .iter()
        .map(|n| (n.host.clone(), n.port))
        .collect();
    for seed in &cluster.seeds {
        if !asked.contains(seed) {
            asked.push(seed.clone());
        }
    }
    let mut why = Vec::new();
    for (host, port) in asked {
        match read_topology(&cluster.target(&host, port)).await {
            Ok(ranges) if !ranges.is_empty() => return Ok(ranges),
            Ok(_) => why.push(format!("{host}:{port}: no slot is served")),
            Err(e) => why.push(format!("{host}:{port}: {e}")),
        }
    }
    Err(why.join("; "))
}

/// Installs a new slot table: keeps the connections of the primaries that stay, starts those
/// of new ones, stops those of primaries gone, and has every wanted topic whose node changed
/// subscribed where it now lives.
pub(super) fn apply(
    shared: &Shared,
    cluster: &Cluster,
    ranges: Vec<Range>,
    spawn: &impl Fn(&Arc<Node>, Target),
) {
    let old = cluster.table();
    let mut nodes: Vec<Arc<Node>> = Vec::new();
    let mut owner = vec![None; usize::from(SLOTS)];
    // New primaries: their subscribers start once they have a probe channel.
    let mut fresh = Vec::new();
    for r in &ranges {
        let i = match nodes
            .iter()
            .position(|n| n.host == r.host && n.port == r.port)
        {
            Some(i) => i,
            None => {
                let node = old
                    .nodes
                    .iter()
                    .find(|n| n.host == r.host && n.port == r.port)
                    .cloned()
                    .unwrap_or_else(|| {
                        let target = cluster.target(&r.host, r.port);
                        let node = Node::new(&target, true);
                        fresh.push((node.clone(), target));
                        node
                    });
                nodes.push(node);
                nodes.len() - 1
            }
        };
        for s in r.first..=r.last.min(SLOTS - 1) {
            owner[usize::from(s)] = Some(i as u16);
        }
    }
    let table = Arc::new(Table { nodes, owner });
    for node in &table.nodes {
        // The probe rides on a channel of one of the node's own slots.
        let probe_slot = node.probe_slot.load(Ordering::Acquire);
        let owns = table
            .node_of_slot(probe_slot)
            .is_some_and(|n| Arc::ptr_eq(n, node));
        if !owns {
            if let Some(slot) = table.first_slot_of(node) {
                node.probe_slot.store(slot, Ordering::Release);
                node.set_probe(shared.probe_channel(slot));
            }
        }
    }
    for (node, target) in fresh {
        tracing::info!(node = %node.name, "redis cluster primary joined the slot table");
        spawn(&node, target);
    }
    for gone in old
        .nodes
        .iter()
        .filter(|n| !table.nodes.iter().any(|m| Arc::ptr_eq(n, m)))
    {
        tracing::info!(node = %gone.name, "redis cluster primary left the slot table");
        gone.shut();
    }
    *cluster.table.write().unwrap_or_else(|e| e.into_inner()) = table.clone();
    // Wanted topics whose node changed go to both: the old one unsubscribes, the new one
    // subscribes.
    let st = shared.lock();
    for topic in st.counts.keys() {
        let slot = cluster.partitions.slot(cluster.partitions.of(topic));
        let (before, after) = (old.node_of_slot(slot), table.node_of_slot(slot));
        if let (Some(a), Some(b)) = (before, after) {
            if Arc::ptr_eq(a, b) {
                continue;
            }
        }
        for node in [before, after].into_iter().flatten() {
            node.mark(topic);
        }
    }
    drop(st);
    for node in old.nodes.iter().chain(&table.nodes) {
        node.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn cluster_urls_name_the_seeds_the_partitions_and_the_credentials() {
        let s = Spec::from_url("redis+cluster://app:pw@n1:7000,n2,10.0.0.3:7002/?partitions=64")
            .unwrap()
            .unwrap();
        assert_eq!(s.node_url, "redis://app:pw@n1:7000/");
        assert!(!s.tls);
        assert_eq!(
            s.seeds,
            [
                ("n1".into(), 7000),
                ("n2".into(), REDIS_PORT),
                ("10.0.0.3".into(), 7002)
            ]
        );
        assert_eq!(s.partitions, 64);
        let s = Spec::from_url("rediss+cluster://n1:7000").unwrap().unwrap();
        assert!(s.tls);
        assert_eq!(s.partitions, slots::DEFAULT_PARTITIONS);
        assert!(Spec::from_url("redis://n1/").is_none());
        assert!(Spec::from_url("redis+sentinel://n1/x").is_none());
    }

    #[test]
    fn a_bad_cluster_url_is_a_clear_error() {
        for (url, says) in [
            ("redis+cluster:///", "at least one node"),
            ("redis+cluster://n1:port/", "not a number"),
            ("redis+cluster://n1:7000/3", "one database"),
            ("redis+cluster://n1/?partitions=0", "between 1 and 16384"),
            (
                "redis+cluster://n1/?partitions=16385",
                "between 1 and 16384",
            ),
            ("redis+cluster://n1/?partitions=x", "between 1 and 16384"),
            (
                "redis+cluster://n1/?db=1",
                "unknown Redis Cluster URL option",
            ),
            ("redis+cluster://[::1]:7000/", "IPv4"),
        ] {
            let e = Spec::from_url(url).unwrap().unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn moved_and_ask_replies_parse_and_other_errors_are_none() {
        assert_eq!(
            Redirect::parse("MOVED 3999 127.0.0.1:6381"),
            Some(Redirect::Moved {
                slot: 3999,
                node: "127.0.0.1:6381".into()
            })
        );
        assert_eq!(
            Redirect::parse("ASK 12182 redis-2.internal:7001"),
            Some(Redirect::Ask {
                slot: 12182,
                node: "redis-2.internal:7001".into()
            })
        );
        assert_eq!(
            Redirect::parse("MOVED 1 :7001"),
            Some(Redirect::Moved {
                slot: 1,
                node: ":7001".into()
            })
        );
        for other in [
            "ERR unknown command",
            "MOVED",
            "MOVED 16384 127.0.0.1:1",
            "MOVED x 127.0.0.1:1",
            "MOVED 1 127.0.0.1",
            "ASK 1 127.0.0.1:1 extra",
            "CLUSTERDOWN The cluster is down",
        ] {
            assert_eq!(Redirect::parse(other), None, "{other}");
        }
    }

    fn bulk(s: &str) -> Value {
        Value::Bulk(Some(Bytes::copy_from_slice(s.as_bytes())))
    }

    fn arr(items: Vec<Value>) -> Value {
        Value::Array(Some(items))
    }

    fn node(role: &str, ip: &str, endpoint: &str, port: i64, health: &str) -> Value {
        arr(vec![
            bulk("id"),
            bulk("e1c5"),
            bulk("port"),
            Value::Int(port),
            bulk("tls-port"),
            Value::Int(port + 1000),
            bulk("ip"),
            bulk(ip),
            bulk("endpoint"),
            bulk(endpoint),
            bulk("role"),
            bulk(role),
            bulk("replication-offset"),
            Value::Int(72156),
            bulk("health"),
            bulk(health),
        ])
    }

    #[test]
    fn cluster_shards_replies_give_the_primaries_ranges() {
        let reply = arr(vec![
            arr(vec![
                bulk("slots"),
                arr(vec![
                    Value::Int(0),
                    Value::Int(5460),
                    Value::Int(10923),
                    Value::Int(10999),
                ]),
                bulk("nodes"),
                arr(vec![
                    node("replica", "10.0.0.9", "10.0.0.9", 7009, "online"),
                    node("master", "10.0.0.1", "10.0.0.1", 7000, "online"),
                ]),
            ]),
            arr(vec![
                bulk("slots"),
                arr(vec![Value::Int(5461), Value::Int(10922)]),
                bulk("nodes"),
                arr(vec![node("master", "", "?", 7001, "online")]),
            ]),
            // A shard whose primary failed and whose replica is not promoted yet: no range.
            arr(vec![
                bulk("slots"),
                arr(vec![Value::Int(11000), Value::Int(16383)]),
                bulk("nodes"),
                arr(vec![
                    node("master", "10.0.0.3", "10.0.0.3", 7002, "failed"),
                    node("replica", "10.0.0.4", "10.0.0.4", 7003, "online"),
                ]),
            ]),
        ]);
        let r = |first, last, host: &str, port| Range {
            first,
            last,
            host: host.into(),
            port,
        };
        assert_eq!(
            parse_shards(&reply, "seed", false).unwrap(),
            [
                r(0, 5460, "10.0.0.1", 7000),
                r(10923, 10999, "10.0.0.1", 7000),
                r(5461, 10922, "seed", 7001),
            ]
        );
        let tls = parse_shards(&reply, "seed", true).unwrap();
        assert_eq!(tls[0].port, 8000);
        assert!(parse_shards(&Value::Int(1), "seed", false).is_none());
        assert!(
            parse_shards(
                &arr(vec![arr(vec![bulk("slots"), Value::Int(1)])]),
                "s",
                false
            )
            .is_none()
        );
    }

    #[test]
    fn cluster_slots_replies_give_the_primaries_ranges() {
        let reply = arr(vec![
            arr(vec![
                Value::Int(0),
                Value::Int(5460),
                arr(vec![bulk("127.0.0.1"), Value::Int(30001), bulk("09dbe9")]),
                arr(vec![bulk("127.0.0.1"), Value::Int(30004), bulk("821d8c")]),
            ]),
            arr(vec![
                Value::Int(5461),
                Value::Int(16383),
                arr(vec![bulk(""), Value::Int(30002), bulk("c9d93d")]),
            ]),
        ]);
        let got = parse_slots(&reply, "seed").unwrap();
        assert_eq!(
            got,
            [
                Range {
                    first: 0,
                    last: 5460,
                    host: "127.0.0.1".into(),
                    port: 30001
                },
                Range {
                    first: 5461,
                    last: 16383,
                    host: "seed".into(),
                    port: 30002
                },
            ]
        );
        assert!(parse_slots(&arr(vec![arr(vec![Value::Int(0)])]), "s").is_none());
    }
}
