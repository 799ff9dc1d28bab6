//! `cluster`: what each node of a Redis Cluster spends per published message, with sharded
//! Pub/Sub (`redis+cluster://`: `SSUBSCRIBE`/`SPUBLISH`, each message handled by the one primary
//! that owns its partition) against classic Pub/Sub on one node (`redis://<node 1>`: `PUBLISH`
//! there, which the cluster bus forwards to every other node).
//!
//! One three-primary cluster (no replicas) on free loopback ports serves the whole run. Each rep
//! runs every mode, interleaved: two fresh `basic_chat` instances on the mode's URL, one
//! subscriber per topic on instance A (private per-user topics, plain: no history), and one
//! client per topic on instance B sending numbered `SendMessage`s at a fixed total rate, so that
//! every message enters through B's publish path and reaches A through Redis, as `basic_chat`
//! publishes it. Around the measured interval, each node's `INFO commandstats cpu` is read:
//! Redis CPU (`used_cpu_sys + used_cpu_user`) per published message, per node, and the commands
//! it ran per message.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clap::ValueEnum;
use serde::Serialize;

use crate::client::{self, SeqCheck, Stats};
use crate::failover::{Kid, RemoveDir, redis_node};
use crate::presence::{RedisDelta, RedisSnapshot, redis_command};
use crate::publish::Publisher;
use crate::report::median;
use crate::scenario::{drain, token_for, topic_name};
use crate::system::{self, StartOpts, System};

/// Arguments of `cluster`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub(crate) struct ClusterArgs {
    /// Repetitions of each mode, interleaved (classic, sharded, classic, …).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Modes, in the order each rep runs them.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Mode::Classic, Mode::Sharded])]
    modes: Vec<Mode>,
    /// Topics, each with one subscriber on instance A and one publishing client on B.
    #[arg(long, default_value_t = 1000)]
    topics: usize,
    /// Messages per second, all topics together (round-robin over them).
    #[arg(long, default_value_t = 20_000.0)]
    rate: f64,
    /// Seconds the measured interval publishes (after a one-second warm-up at the same rate).
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Text size of each message in bytes.
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// SHARDS of each `basic_chat` instance (default: its own, the available parallelism).
    #[arg(long)]
    shards: Option<usize>,
    /// Use the `basic_chat` already built in target/release.
    #[arg(long)]
    #[serde(skip)]
    no_build: bool,
}

/// How the instances use the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Mode {
    /// `redis://<node 1>`: classic `PUBLISH`/`SUBSCRIBE` on one node.
    Classic,
    /// `redis+cluster://<node 1>,<node 2>`: sharded Pub/Sub over every primary.
    Sharded,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::Classic => "classic",
            Self::Sharded => "sharded",
        }
    }
}

/// One mode in one rep.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ClusterRun {
    mode: Mode,
    rep: usize,
    /// Messages sent through B in the measured interval, and how many of them reached A's
    /// subscribers.
    published: u64,
    delivered: u64,
    /// What each node did over the interval (node order as created).
    nodes: Vec<RedisDelta>,
    /// CPU seconds of instances A and B over the interval.
    instances_cpu_s: Option<f64>,
    /// `uptime`'s load averages when the interval ended.
    load: String,
}

impl ClusterRun {
    /// Redis CPU microseconds per published message on node `i`.
    fn node_us(&self, i: usize) -> Option<f64> {
        self.nodes[i].cpu_us_per(self.published)
    }

    fn max_node_us(&self) -> Option<f64> {
        (0..self.nodes.len())
            .filter_map(|i| self.node_us(i))
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
    }

    fn sum_us(&self) -> Option<f64> {
        (0..self.nodes.len()).map(|i| self.node_us(i)).sum()
    }

    fn fraction(&self) -> f64 {
        if self.published == 0 {
            0.0
        } else {
            self.delivered as f64 / self.published as f64
        }
    }
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ClusterResult {
    args: ClusterArgs,
    runs: Vec<Result<ClusterRun, String>>,
}

/// Node timeout of the cluster, as in the tests' cluster.
const NODE_TIMEOUT_MS: u32 = 2000;

/// A private three-primary cluster; its nodes are killed and its directory removed on drop.
struct Cluster {
    ports: Vec<u16>,
    nodes: Vec<Kid>,
    _dir: RemoveDir,
}

/// A free loopback port whose cluster bus port (port + 10 000) is free too, neither of them
/// among `taken` (the ports and bus ports of the nodes already started).
fn cluster_port(taken: &[u16]) -> u16 {
    loop {
        let port = system::free_port();
        if port == 0 || port == 6379 || port > u16::MAX - 10_000 {
            continue;
        }
        let bus = port + 10_000;
        if taken.contains(&port) || taken.contains(&bus) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", bus)).is_ok() {
            return port;
        }
    }
}

/// Starts a cluster node in `dir` on a free port; returns the port and the node. A port seen
/// free can be taken before the node binds it (or its bus port) by another process, e.g. as a
/// client socket's local port: a node counts as started only when `INFO server` on its port
/// answers with the node's own `process_id`, else it is stopped and other ports are tried.
async fn start_node(dir: &Path, taken: &[u16]) -> Result<(u16, Kid), String> {
    const ATTEMPTS: usize = 20;
    for _ in 0..ATTEMPTS {
        let port = cluster_port(taken);
        let conf = dir.join(format!("nodes-{port}.conf"));
        let extra: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            conf.to_str().ok_or("temp dir is not UTF-8")?,
            "--cluster-node-timeout",
            &NODE_TIMEOUT_MS.to_string(),
            "--cluster-require-full-coverage",
            "no",
            // As `start_redis` does: a subscriber that falls behind is not cut off while
            // the measurement pushes.
            "--client-output-buffer-limit",
            "pubsub 256mb 128mb 60",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut node = redis_node(dir, port, &extra).map_err(|e| e.to_string())?;
        if answers_as_itself(&mut node, port).await? {
            return Ok((port, node));
        }
        // Dropped: stopped by PID.
    }
    Err(format!(
        "no cluster node could keep its ports in {ATTEMPTS} attempts"
    ))
}

/// Waits until `node` answers on `port`: `true` when `INFO server` there names its process id,
/// `false` when it exited (it could not bind its port or its bus port) or another Redis
/// answers.
async fn answers_as_itself(node: &mut Kid, port: u16) -> Result<bool, String> {
    let pid = node.0.id().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if !matches!(node.0.try_wait(), Ok(None)) {
            return Ok(false);
        }
        if let Ok(info) = redis_command(addr(port), &["INFO", "server"]).await {
            let server_pid = info.lines().find_map(|l| l.strip_prefix("process_id:"));
            if let Some(p) = server_pid {
                return Ok(p.trim() == pid);
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("redis-server on {port} did not start"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Cluster {
    async fn start() -> Result<Self, String> {
        let io = |e: std::io::Error| e.to_string();
        let dir = std::env::temp_dir().join(format!("loadtest-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(io)?;
        let dir = RemoveDir(dir);
        let mut ports: Vec<u16> = Vec::new();
        let mut nodes = Vec::new();
        let mut taken = Vec::new();
        while nodes.len() < 3 {
            let (port, node) = start_node(&dir.0, &taken).await?;
            taken.extend([port, port + 10_000]);
            ports.push(port);
            nodes.push(node);
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("redis-cli: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        let cluster = Self {
            ports,
            nodes,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for &p in &cluster.ports {
            loop {
                let info = redis_command(addr(p), &["CLUSTER", "INFO"]).await;
                if info.is_ok_and(|i| i.contains("cluster_state:ok")) {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    return Err("the cluster did not form".into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(cluster)
    }

    fn url(&self, mode: Mode) -> String {
        match mode {
            Mode::Classic => format!("redis://127.0.0.1:{}/", self.ports[0]),
            Mode::Sharded => format!(
                "redis+cluster://127.0.0.1:{},127.0.0.1:{}/",
                self.ports[0], self.ports[1]
            ),
        }
    }

    async fn snapshot(&self) -> Result<Vec<RedisSnapshot>, String> {
        let mut all = Vec::new();
        for &p in &self.ports {
            let info = redis_command(addr(p), &["INFO", "commandstats", "cpu"])
                .await
                .map_err(|e| format!("INFO on node {p}: {e}"))?;
            all.push(RedisSnapshot::parse(&info));
        }
        Ok(all)
    }

    /// Nodes still running (a node that died would skew the figures).
    fn alive(&mut self) -> bool {
        self.nodes
            .iter_mut()
            .all(|k| matches!(k.0.try_wait(), Ok(None)))
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn one_run(
    args: &ClusterArgs,
    cluster: &Cluster,
    target: &Path,
    mode: Mode,
    rep: usize,
) -> Result<ClusterRun, String> {
    let io = |e: std::io::Error| e.to_string();
    let opts = StartOpts {
        redis_url: Some(cluster.url(mode)),
        shards: args.shards,
        cpus: None,
        env: Vec::new(),
        binary: None,
    };
    let a = system::start_system(System::Ours, target, &opts).map_err(io)?;
    let b = system::start_system(System::Ours, target, &opts).map_err(io)?;
    let n = args.topics.max(2);
    let topics: Vec<String> = (0..n).map(|t| topic_name(t, n)).collect();
    let tokens: Vec<String> = (0..n).map(|t| token_for(t, n)).collect();
    let paths: Vec<String> = (0..n)
        .map(|t| format!("/ws/{}?token={}", topics[t], tokens[t]))
        .collect();
    let stats = Stats::new(n);
    let (_subscribers, failures) =
        client::open_many(a.addr, paths, 256, stats.clone(), SeqCheck::Increasing).await;
    if failures > 0 {
        return Err(format!("{failures} subscribers could not connect to A"));
    }
    let mut publisher = Publisher::websocket(b.addr, topics, tokens, args.payload)
        .await
        .map_err(io)?;
    // Let both instances finish subscribing, then warm the path up at the same rate.
    tokio::time::sleep(Duration::from_secs(1)).await;
    publish_and_drain(&mut publisher, &stats, args.rate, 1.0).await?;

    let before = cluster.snapshot().await?;
    let cpu0 = system::cpu_seconds(a.pid()).zip(system::cpu_seconds(b.pid()));
    let (published, got) = publish_and_drain(&mut publisher, &stats, args.rate, args.secs).await?;
    let after = cluster.snapshot().await?;
    let cpu1 = system::cpu_seconds(a.pid()).zip(system::cpu_seconds(b.pid()));
    let run = ClusterRun {
        mode,
        rep,
        published,
        delivered: got,
        nodes: after.iter().zip(&before).map(|(a, b)| a.since(b)).collect(),
        instances_cpu_s: cpu0
            .zip(cpu1)
            .map(|((a0, b0), (a1, b1))| (a1 - a0) + (b1 - b0)),
        load: uptime(),
    };
    eprintln!(
        "  {:8} rep {}: {} published, {:.4} delivered, Redis µs/msg per node {:?} (load {})",
        mode.name(),
        rep + 1,
        run.published,
        run.fraction(),
        (0..run.nodes.len())
            .map(|i| run.node_us(i).map(|v| (v * 100.0).round() / 100.0))
            .collect::<Vec<_>>(),
        run.load,
    );
    drop(publisher);
    drop((a, b));
    Ok(run)
}

/// Publishes at `rate` for `secs`, then waits (up to 10 s, or 1 s without progress) for the
/// subscribers to receive it: how many were published, and how many of them arrived.
async fn publish_and_drain(
    publisher: &mut Publisher,
    stats: &Stats,
    rate: f64,
    secs: f64,
) -> Result<(u64, u64), String> {
    let delivered = || -> u64 { stats.per_conn.iter().map(|c| c.load(Relaxed)).sum() };
    let got0 = delivered();
    let published: u64 = publisher
        .run(rate, Duration::from_secs_f64(secs))
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .sum();
    drain(
        || delivered() - got0,
        published,
        Duration::from_millis(1000),
        Duration::from_secs(10),
    )
    .await;
    Ok((published, delivered() - got0))
}

/// Runs the reps, each mode in turn within each rep.
pub(crate) async fn cluster(root: &Path, args: &ClusterArgs) -> Result<ClusterResult, String> {
    if !args.no_build {
        system::build_ours(root).map_err(|e| e.to_string())?;
    }
    let target = system::release_dir(root);
    let mut cluster = Cluster::start().await?;
    let mut runs = Vec::new();
    for rep in 0..args.reps.max(1) {
        for &mode in &args.modes {
            eprintln!("== cluster rep {}/{} {}", rep + 1, args.reps, mode.name());
            let r = one_run(args, &cluster, &target, mode, rep).await;
            if let Err(e) = &r {
                eprintln!("  failed: {e}");
            }
            runs.push(r);
            if !cluster.alive() {
                return Err("a cluster node died during the run".into());
            }
        }
    }
    Ok(ClusterResult {
        args: args.clone(),
        runs,
    })
}

fn us(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

/// Markdown: medians per mode, the sharded/classic ratios, and each rep.
pub(crate) fn report(r: &ClusterResult) -> String {
    let a = &r.args;
    let ok: Vec<&ClusterRun> = r.runs.iter().filter_map(|r| r.as_ref().ok()).collect();
    let nodes = ok.first().map_or(3, |r| r.nodes.len());
    let mut md = format!(
        "Redis Cluster, 3 primaries (no replicas), two `basic_chat` instances; {} topics with one \
         subscriber each on instance A; {} messages/s of {} bytes sent as `SendMessage` through \
         instance B (one client per topic), measured over {} s after a 1 s warm-up; {} rep(s) of \
         each mode, interleaved. Redis CPU is `used_cpu_sys + used_cpu_user` from each node's \
         `INFO cpu` over the interval, per published message.\n\n",
        a.topics, a.rate, a.payload, a.secs, a.reps
    );
    md.push_str("Medians over reps, µs of Redis CPU per published message:\n\n| mode |");
    for i in 0..nodes {
        md.push_str(&format!(" node {} |", i + 1));
    }
    md.push_str(" max node | all nodes | instances A+B CPU µs/msg | delivered | reps |\n|---|");
    md.push_str(&"---:|".repeat(nodes + 5));
    md.push('\n');
    let mut medians = Vec::new();
    for &mode in &a.modes {
        let runs: Vec<&&ClusterRun> = ok.iter().filter(|r| r.mode == mode).collect();
        let med = |f: &dyn Fn(&ClusterRun) -> Option<f64>| {
            median(runs.iter().filter_map(|r| f(r)).collect())
        };
        let per_node: Vec<Option<f64>> = (0..nodes).map(|i| med(&|r| r.node_us(i))).collect();
        let max = med(&|r| r.max_node_us());
        let sum = med(&|r| r.sum_us());
        let inst = med(&|r| {
            r.instances_cpu_s
                .filter(|_| r.published > 0)
                .map(|c| c * 1e6 / r.published as f64)
        });
        let frac = med(&|r| Some(r.fraction()));
        md.push_str(&format!("| {} |", mode.name()));
        for v in &per_node {
            md.push_str(&format!(" {} |", us(*v)));
        }
        md.push_str(&format!(
            " {} | {} | {} | {} | {} |\n",
            us(max),
            us(sum),
            us(inst),
            frac.map_or("–".into(), |f| format!("{f:.4}")),
            runs.len()
        ));
        medians.push((mode, per_node, max, sum));
    }
    let find = |m: Mode| medians.iter().find(|(mode, ..)| *mode == m);
    if let (Some(c), Some(s)) = (find(Mode::Classic), find(Mode::Sharded)) {
        let ratio = |s: Option<f64>, c: Option<f64>| match (s, c) {
            (Some(s), Some(c)) if c > 0.0 => format!("{:.2}×", s / c),
            _ => "–".into(),
        };
        md.push_str("\nSharded against classic (ratio of the medians above):\n\n|");
        for i in 0..nodes {
            md.push_str(&format!(" node {} |", i + 1));
        }
        md.push_str(" max node | all nodes |\n|");
        md.push_str(&"---:|".repeat(nodes + 2));
        md.push_str("\n|");
        for i in 0..nodes {
            md.push_str(&format!(" {} |", ratio(s.1[i], c.1[i])));
        }
        md.push_str(&format!(" {} | {} |\n", ratio(s.2, c.2), ratio(s.3, c.3)));
    }
    md.push_str("\nEach run (Redis commands per published message, per node; load averages):\n\n");
    md.push_str("| rep | mode | published | delivered | node: µs/msg, commands/msg | load |\n");
    md.push_str("|---:|---|---:|---:|---|---|\n");
    for r in &r.runs {
        match r {
            Ok(r) => {
                let nodes: Vec<String> = (0..r.nodes.len())
                    .map(|i| {
                        format!(
                            "{}: {} ({})",
                            i + 1,
                            us(r.node_us(i)),
                            r.nodes[i].breakdown(r.published)
                        )
                    })
                    .collect();
                md.push_str(&format!(
                    "| {} | {} | {} | {:.4} | {} | {} |\n",
                    r.rep + 1,
                    r.mode.name(),
                    r.published,
                    r.fraction(),
                    nodes.join("; "),
                    r.load
                ));
            }
            Err(e) => md.push_str(&format!("| | failed: {e} | | | | |\n")),
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_node_counts_as_started_only_when_its_own_process_answers() {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("skipped: redis-server is not installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!("loadtest-node-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = RemoveDir(dir);
        let (port, mut first) = start_node(&dir.0, &[]).await.unwrap();
        assert!(answers_as_itself(&mut first, port).await.unwrap());
        // Another server on the same port: it cannot bind it, and the one answering is not it.
        let mut second = redis_node(&dir.0, port, &[]).unwrap();
        assert!(!answers_as_itself(&mut second, port).await.unwrap());
        assert!(answers_as_itself(&mut first, port).await.unwrap());
    }
}
