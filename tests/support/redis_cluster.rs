//! A private Redis Cluster per test: N primaries (no replicas) on free loopback ports, each
//! stopped by PID when dropped. Never 6379. Administration goes through `redis-cli`, as an
//! operator would do it: `--cluster create`, `CLUSTER SETSLOT`, `MIGRATE`.
//!
//! Every node runs with `cluster-require-full-coverage no`, so a stopped primary takes only its
//! own slots down and the others keep serving.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis_server::installed;

/// How long the cluster may take to form, to heal after a restart, or to notice a stopped node,
/// and how long an instance may take to see the whole cluster or a change of it (a subscription
/// reaching every node, a restarted primary serving again). A bound on a wait, never a speed
/// assertion.
pub const CLUSTER_WAIT: Duration = Duration::from_secs(30);

/// Node timeout: a stopped primary is flagged failed after about this long.
const NODE_TIMEOUT_MS: u32 = 2000;

/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

pub struct RedisCluster {
    nodes: Vec<Node>,
    /// Holds each node's `nodes-<port>.conf`; removed on drop.
    dir: PathBuf,
    /// Set for a TLS-only cluster: its certificate files.
    tls: Option<TlsFiles>,
}

/// The files a TLS-only cluster serves with: the server's certificate and key (for
/// `localhost`), the client certificate and key the nodes present to each other on the
/// cluster bus, and the CA that signed them.
#[derive(Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub ca: PathBuf,
}

struct Node {
    port: u16,
    child: Option<Child>,
}

/// Starts a three-primary cluster, or returns `None` (after saying so loudly) when `redis-server`
/// or `redis-cli` is not installed (see `start_redis`).
pub fn start_cluster(test: &str) -> Option<RedisCluster> {
    start_cluster_of(test, 3)
}

/// [`start_cluster`] with `primaries` primaries (at least 3, as `redis-cli --cluster create`
/// demands).
pub fn start_cluster_of(test: &str, primaries: usize) -> Option<RedisCluster> {
    start(test, primaries, None)
}

/// A three-primary cluster that serves TLS only, on the nodes' ports, with `tls`'s files; the
/// cluster bus is TLS too. The nodes announce the host name `localhost`, which the server
/// certificate names, so clients verify every node they discover.
pub fn start_tls_cluster(test: &str, tls: TlsFiles) -> Option<RedisCluster> {
    start(test, 3, Some(tls))
}

fn start(test: &str, primaries: usize, tls: Option<TlsFiles>) -> Option<RedisCluster> {
    assert!(primaries >= 3, "a Redis Cluster needs at least 3 primaries");
    if !installed(test, "redis-server") || !installed(test, "redis-cli") {
        return None;
    }
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < primaries {
        let port = cluster_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    let dir = std::env::temp_dir().join(format!("rtk-cluster-{}-{}", std::process::id(), ports[0]));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cluster = RedisCluster {
        nodes: ports
            .into_iter()
            .map(|port| Node { port, child: None })
            .collect(),
        dir,
        tls,
    };
    for i in 0..primaries {
        // A port seen free can be taken before the node binds it (or its bus port) by a process
        // outside this binary, e.g. as a client socket's local port: then take other ports.
        while !cluster.spawn(i) {
            cluster.nodes[i].port = cluster_port();
        }
    }
    let addrs: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let out = Command::new("redis-cli")
        .args(cluster.cli_tls())
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .expect("run redis-cli --cluster create");
    assert!(
        out.status.success(),
        "redis-cli --cluster create failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.wait_healthy();
    Some(cluster)
}

/// A free loopback port whose cluster bus port (port + 10 000) is free too; both are reserved
/// for this test, so no other test of the binary starts a server on either.
fn cluster_port() -> u16 {
    loop {
        let port = super::free_port();
        if port == 6379 || port > u16::MAX - 10_000 {
            continue;
        }
        let bus = port + 10_000;
        if std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() && super::reserve_port(bus) {
            return port;
        }
    }
}

impl RedisCluster {
    /// `redis-cli`'s TLS arguments for this cluster (none for a plain one).
    fn cli_tls(&self) -> Vec<std::ffi::OsString> {
        match &self.tls {
            None => Vec::new(),
            Some(t) => vec!["--tls".into(), "--cacert".into(), t.ca.clone().into()],
        }
    }

    /// `rediss+cluster://localhost:<port>,…/` with the first two nodes as seeds (a TLS cluster).
    pub fn tls_url(&self) -> String {
        format!(
            "rediss+cluster://localhost:{},localhost:{}/",
            self.nodes[0].port, self.nodes[1].port
        )
    }

    /// `redis+cluster://` with the first two nodes as seeds: the third is found through them.
    pub fn url(&self) -> String {
        format!(
            "redis+cluster://127.0.0.1:{},127.0.0.1:{}/",
            self.nodes[0].port, self.nodes[1].port
        )
    }

    /// `redis+cluster://` listing every node.
    pub fn url_all(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}/", seeds.join(","))
    }

    /// A plain `redis://` URL for each node, in node order.
    pub fn node_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}/", n.port))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// Node `i`'s process id, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].child.as_ref().map(Child::id)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Starts node `i` on its port; `false` when the port turned out to be someone else's.
    fn spawn(&mut self, i: usize) -> bool {
        let port = self.nodes[i].port;
        assert_ne!(port, 6379);
        let conf = self.dir.join(format!("nodes-{port}.conf"));
        let mut server = Command::new("redis-server");
        match &self.tls {
            None => server.args(["--port", &port.to_string()]),
            Some(t) => server
                .args(["--port", "0", "--tls-port", &port.to_string()])
                .args(["--tls-cluster", "yes", "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(&t.cert)
                .arg("--tls-key-file")
                .arg(&t.key)
                .arg("--tls-client-cert-file")
                .arg(&t.client_cert)
                .arg("--tls-client-key-file")
                .arg(&t.client_key)
                .arg("--tls-ca-cert-file")
                .arg(&t.ca)
                .args(["--cluster-announce-hostname", "localhost"])
                .args(["--cluster-preferred-endpoint-type", "hostname"]),
        };
        let child = server
            .args(["--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--cluster-enabled", "yes", "--cluster-config-file"])
            .arg(&conf)
            .args(["--cluster-node-timeout", &NODE_TIMEOUT_MS.to_string()])
            .args(["--cluster-require-full-coverage", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let pid = child.id();
        self.nodes[i].child = Some(child);
        let deadline = Instant::now() + super::WAIT;
        loop {
            let exited = self.nodes[i].child.as_mut().unwrap().try_wait();
            if !matches!(exited, Ok(None)) {
                // It could not bind its port or its bus port.
                self.nodes[i].child = None;
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                // Something listens: it must be this node and not another process on the port.
                let info = self.try_cli(i, &["INFO", "server"]).unwrap_or_default();
                let server_pid = info
                    .lines()
                    .find_map(|l| l.strip_prefix("process_id:"))
                    .map(str::trim);
                match server_pid {
                    Some(p) if p == pid.to_string() => return true,
                    Some(_) => {
                        self.kill(i);
                        return false;
                    }
                    None => {}
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops node `i` (SIGKILL, by PID) and waits until the other nodes flag it as failed, so its
    /// slots are down and the rest of the cluster serves on.
    pub fn stop(&mut self, i: usize) {
        self.kill(i);
        let id = self.node_id_seen_by_others(i);
        self.wait_for(&format!("node {i} flagged as failed"), |c| {
            c.running()
                .all(|j| c.node_line(j, &id).is_some_and(|l| flag(&l, "fail")))
        });
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on its port with its `nodes.conf`, so it rejoins with its slots, and
    /// waits until every node sees a healthy cluster again.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        assert!(self.spawn(i), "node {i} could not take its port back");
        self.wait_healthy();
    }

    /// Waits until every running node reports `cluster_state:ok`, knows every node, sees none
    /// of them failing, and all agree on which node owns each slot.
    pub fn wait_healthy(&self) {
        let n = self.nodes.len();
        self.wait_for("a healthy cluster", |c| {
            c.running().all(|i| {
                let info = c.cli(i, &["CLUSTER", "INFO"]);
                let nodes = c.cli(i, &["CLUSTER", "NODES"]);
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{n}"))
                    && info.contains("cluster_slots_assigned:16384")
                    && !nodes.lines().any(|l| flag(l, "fail") || flag(l, "fail?"))
            }) && {
                let views: Vec<Vec<String>> = c.running().map(|i| c.slot_table(i)).collect();
                views.windows(2).all(|w| w[0] == w[1])
            }
        });
    }

    fn wait_for(&self, what: &str, mut cond: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + CLUSTER_WAIT;
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.is_running(i))
    }

    /// Runs `redis-cli -p <port of node i> args…` and returns its output, trimmed (raw format:
    /// one reply element per line). Panics when node `i` is not running.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        assert!(self.is_running(i), "node {i} is stopped");
        self.try_cli(i, args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} failed"))
    }

    /// [`Self::cli`], or `None` when `redis-cli` fails.
    fn try_cli(&self, i: usize, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(self.cli_tls())
            .args(["-h", "127.0.0.1", "-p", &self.nodes[i].port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Runs a command on node `i` and asserts it answered `OK`.
    fn cli_ok(&self, i: usize, args: &[&str]) {
        let reply = self.cli(i, args);
        assert_eq!(reply, "OK", "node {i}: {args:?} answered {reply}");
    }

    /// Node `i`'s cluster node id.
    pub fn node_id(&self, i: usize) -> String {
        self.cli(i, &["CLUSTER", "MYID"])
    }

    /// Node `i`'s id as another running node knows it (works while `i` is stopped).
    fn node_id_seen_by_others(&self, i: usize) -> String {
        let port = format!("127.0.0.1:{}@", self.nodes[i].port);
        let j = self.running().next().expect("a running node");
        let nodes = self.cli(j, &["CLUSTER", "NODES"]);
        let line = nodes
            .lines()
            .find(|l| l.split(' ').nth(1).is_some_and(|a| a.starts_with(&port)))
            .expect("the node in CLUSTER NODES");
        line.split(' ').next().unwrap().to_owned()
    }

    /// The line of `CLUSTER NODES` on node `j` for node id `id`.
    fn node_line(&self, j: usize, id: &str) -> Option<String> {
        self.cli(j, &["CLUSTER", "NODES"])
            .lines()
            .find(|l| l.starts_with(id))
            .map(str::to_owned)
    }

    /// Node `j`'s view of slot ownership: a sorted list of "range owner-port" entries.
    fn slot_table(&self, j: usize) -> Vec<String> {
        let mut table = Vec::new();
        for line in self.cli(j, &["CLUSTER", "NODES"]).lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(addr) = fields.get(1) else { continue };
            for range in fields.iter().skip(8).filter(|r| !r.starts_with('[')) {
                table.push(format!("{range} {addr}"));
            }
        }
        table.sort();
        table
    }

    /// The index of the node that owns `slot`, as the first running node sees it.
    pub fn slot_owner(&self, slot: u16) -> usize {
        let j = self.running().next().expect("a running node");
        for line in self.cli(j, &["CLUSTER", "NODES"]).lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(addr) = fields.get(1) else { continue };
            let owns = fields.iter().skip(8).any(|r| {
                if r.starts_with('[') {
                    return false;
                }
                let (lo, hi) = r.split_once('-').unwrap_or((r, r));
                let (lo, hi): (u16, u16) = (lo.parse().unwrap(), hi.parse().unwrap());
                (lo..=hi).contains(&slot)
            });
            if owns {
                let port: u16 = addr
                    .split(['@', ':'])
                    .nth(1)
                    .and_then(|p| p.parse().ok())
                    .expect("host:port@bus in CLUSTER NODES");
                return self
                    .nodes
                    .iter()
                    .position(|n| n.port == port)
                    .expect("an owner this cluster started");
            }
        }
        panic!("slot {slot} has no owner");
    }

    /// The node that owns `key`'s slot.
    pub fn key_owner(&self, key: &str) -> usize {
        self.slot_owner(key_slot(key))
    }

    /// Migrates `slot` with its keys from node `from` to node `to`, live, as `redis-cli --cluster
    /// reshard` does: IMPORTING on the target, MIGRATING on the source, MIGRATE of the keys in
    /// batches, then SETSLOT NODE on the target, the source and every other node.
    pub fn move_slot(&self, slot: u16, from: usize, to: usize) {
        assert_ne!(from, to);
        assert_eq!(
            self.slot_owner(slot),
            from,
            "slot {slot} is not on node {from}"
        );
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let s = slot.to_string();
        self.cli_ok(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id]);
        self.cli_ok(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id]);
        let to_port = self.nodes[to].port.to_string();
        loop {
            let keys = self.cli(from, &["CLUSTER", "GETKEYSINSLOT", &s, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "10000", "KEYS"];
            args.extend(keys);
            let reply = self.cli(from, &args);
            assert!(
                reply == "OK" || reply == "NOKEY",
                "MIGRATE answered {reply}"
            );
        }
        self.cli_ok(to, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
        self.cli_ok(from, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
        for j in self.running().filter(|&j| j != from && j != to) {
            self.cli_ok(j, &["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
        }
        self.wait_for(
            &format!("every node to see slot {slot} on node {to}"),
            |c| {
                let views: Vec<Vec<String>> = c.running().map(|i| c.slot_table(i)).collect();
                views.windows(2).all(|w| w[0] == w[1])
            },
        );
    }

    /// Node `i`'s `used_cpu_sys + used_cpu_user` from `INFO CPU`, in seconds.
    pub fn info_cpu(&self, i: usize) -> f64 {
        let info = self.cli(i, &["INFO", "CPU"]);
        info.lines()
            .filter_map(|l| {
                let (k, v) = l.trim().split_once(':')?;
                (k == "used_cpu_sys" || k == "used_cpu_user").then(|| v.parse::<f64>().ok())?
            })
            .sum()
    }

    /// The shard channels (`SSUBSCRIBE`) with at least one subscriber on node `i`.
    pub fn shard_channels(&self, i: usize) -> Vec<String> {
        self.cli(i, &["PUBSUB", "SHARDCHANNELS"])
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether a `CLUSTER NODES` line carries `name` among its flags (third field).
fn flag(line: &str, name: &str) -> bool {
    line.split(' ')
        .nth(2)
        .is_some_and(|flags| flags.split(',').any(|f| f == name))
}

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the text between the first `{` and
/// the next `}`, when not empty) or of the whole key, modulo 16384.
pub fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = match bytes.iter().position(|&b| b == b'{') {
        Some(open) => match bytes[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &bytes[open + 1..open + 1 + len],
            _ => bytes,
        },
        None => bytes,
    };
    crc16(hashed) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}
