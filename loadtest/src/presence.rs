//! What presence costs: joins into a topic with presence against joins into one without, the
//! stats and listing calls at the resulting size, and the Redis commands and Redis CPU per join
//! and per leave.
//!
//! It starts its own Redis (a free loopback port) and a fresh `basic_chat` for every run. The
//! two arms are interleaved (their order alternates from one repetition to the next) and differ
//! only in the topic:
//!
//! - `presence`: `general` (presence and history), every connection a different user;
//! - `no-presence`: `private-user-<U>` (neither), every connection user `U`.
//!
//! Both are one topic on one instance, with the same token check (a UUID and a name), in the
//! same protocol (plain frames, or `rtk1` for both with `--rtk1`). A handshake is answered only
//! once the connection is in its topic, presence included, so the seconds to open all of them
//! contain the presence work. Connections leave with a close frame (a clean close leaves at
//! once, without the grace).
//!
//! Redis figures are `INFO commandstats` and `INFO cpu` deltas of the private Redis: Redis 7
//! counts a script's inner commands as well as the `EVAL` itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum_realtime_kit::TopicPolicy;
use axum_realtime_kit::prelude::*;
use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::{self, SeqCheck, Stats};
use crate::system::{self, StartOpts, System};

/// Arguments of `presence`.
#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct PresenceArgs {
    /// Connections each arm opens (and closes).
    #[arg(long, default_value_t = 10_000)]
    pub(crate) connections: usize,
    /// Repetitions of each arm.
    #[arg(long, default_value_t = 3)]
    pub(crate) reps: usize,
    /// Handshakes in flight.
    #[arg(long, default_value_t = 256)]
    pub(crate) parallel: usize,
    /// `presence_stats` calls (and `GET /presence/general` requests) timed per presence run.
    #[arg(long, default_value_t = 200)]
    pub(crate) stats_calls: usize,
    /// Full listings (`presence` with a limit of `--connections`) timed per presence run.
    #[arg(long, default_value_t = 10)]
    pub(crate) list_calls: usize,
    /// Both arms open with `proto=rtk1` (their clients then receive `join` frames: with
    /// presence, every join goes to every connection already in the topic).
    #[arg(long)]
    pub(crate) rtk1: bool,
    /// Pin the server to CPU 0 and this harness to CPU 1 (Redis is not pinned).
    #[arg(long)]
    pub(crate) pin: bool,
    /// Use the basic_chat already built in target/release.
    #[arg(long)]
    pub(crate) no_build: bool,
}

/// One arm of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Arm {
    Presence,
    NoPresence,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Self::Presence => "presence",
            Self::NoPresence => "no-presence",
        }
    }
}

/// The single user of the `no-presence` arm (its private topic is the arm's topic).
const SOLE_USER: &str = "a1a2a3a4-b1b2-c1c2-d1d2-d3d4d5d6d7d8";

/// The WebSocket path of connection `i` of `arm`.
fn ws_path(arm: Arm, i: usize, rtk1: bool) -> String {
    let proto = if rtk1 { "&proto=rtk1" } else { "" };
    match arm {
        Arm::Presence => format!("/ws/general?token={}:u{i}{proto}", user_uuid(i)),
        Arm::NoPresence => format!("/ws/private-user-{SOLE_USER}?token={SOLE_USER}:load{proto}"),
    }
}

/// A distinct UUID per connection of the `presence` arm.
fn user_uuid(i: usize) -> String {
    format!("00000000-0000-4000-9000-{i:012x}")
}

/// A masked close frame (code 1000) with a zero key.
const CLOSE_FRAME: [u8; 8] = [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8];

/// `INFO commandstats` and `INFO cpu` of a Redis at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct RedisSnapshot {
    /// Calls and microseconds per command name.
    pub(crate) commands: BTreeMap<String, (u64, u64)>,
    /// `used_cpu_sys` + `used_cpu_user`, seconds.
    pub(crate) cpu_s: f64,
}

/// Commands whose calls are the measurement's own (reading the counters, resetting Redis).
const OWN_COMMANDS: [&str; 3] = ["info", "flushall", "config|resetstat"];

impl RedisSnapshot {
    /// Parses the text of `INFO commandstats cpu`.
    pub(crate) fn parse(info: &str) -> Self {
        let mut snap = Self::default();
        for line in info.lines() {
            let line = line.trim_end();
            if let Some(rest) = line.strip_prefix("cmdstat_") {
                let Some((name, fields)) = rest.split_once(':') else {
                    continue;
                };
                let field = |key: &str| {
                    fields
                        .split(',')
                        .filter_map(|kv| kv.split_once('='))
                        .find(|(k, _)| *k == key)
                        .and_then(|(_, v)| v.parse::<u64>().ok())
                };
                if let (Some(calls), Some(usec)) = (field("calls"), field("usec")) {
                    snap.commands.insert(name.to_string(), (calls, usec));
                }
            } else if let Some((k, v)) = line.split_once(':') {
                if k == "used_cpu_sys" || k == "used_cpu_user" {
                    snap.cpu_s += v.parse::<f64>().unwrap_or(0.0);
                }
            }
        }
        snap
    }

    /// What happened between `earlier` and `self`, without the measurement's own commands.
    pub(crate) fn since(&self, earlier: &Self) -> RedisDelta {
        let mut commands = BTreeMap::new();
        for (name, &(calls, usec)) in &self.commands {
            if OWN_COMMANDS.contains(&name.as_str()) {
                continue;
            }
            let (c0, u0) = earlier.commands.get(name).copied().unwrap_or((0, 0));
            let calls = calls.saturating_sub(c0);
            if calls > 0 {
                commands.insert(name.clone(), (calls, usec.saturating_sub(u0)));
            }
        }
        RedisDelta {
            commands,
            cpu_s: (self.cpu_s - earlier.cpu_s).max(0.0),
        }
    }

    /// Calls of every command but the measurement's own.
    pub(crate) fn total_calls(&self) -> u64 {
        self.commands
            .iter()
            .filter(|(name, _)| !OWN_COMMANDS.contains(&name.as_str()))
            .map(|(_, &(calls, _))| calls)
            .sum()
    }
}

/// Redis activity over an interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub(crate) struct RedisDelta {
    /// Calls and microseconds per command name.
    pub(crate) commands: BTreeMap<String, (u64, u64)>,
    pub(crate) cpu_s: f64,
}

impl RedisDelta {
    pub(crate) fn calls(&self) -> u64 {
        self.commands.values().map(|&(c, _)| c).sum()
    }

    /// Commands per operation, when there were `n` of them.
    pub(crate) fn calls_per(&self, n: u64) -> Option<f64> {
        (n > 0).then(|| self.calls() as f64 / n as f64)
    }

    /// Redis CPU microseconds per operation.
    pub(crate) fn cpu_us_per(&self, n: u64) -> Option<f64> {
        (n > 0).then(|| self.cpu_s * 1e6 / n as f64)
    }

    /// `name×calls-per-op` for every command, e.g. `eval 1.00, hincrby 2.00`.
    pub(crate) fn breakdown(&self, n: u64) -> String {
        if n == 0 || self.commands.is_empty() {
            return "–".into();
        }
        self.commands
            .iter()
            .map(|(name, &(calls, _))| {
                // Redis names a subcommand `script|load`: a `|` would end the Markdown cell.
                let name = name.replace('|', " ");
                format!("{name} {:.2}", calls as f64 / n as f64)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Microseconds Redis spent in the commands `names`, every call together.
    pub(crate) fn usec_in(&self, names: &[&str]) -> u64 {
        names
            .iter()
            .filter_map(|k| self.commands.get(*k))
            .map(|&(_, usec)| usec)
            .sum()
    }
}

/// The `q` quantile (0..=1) of `samples`, nearest rank; `None` when empty.
pub(crate) fn quantile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// Sends one command to Redis, returns its reply as text (a bulk string or a status line).
pub(crate) async fn redis_command(addr: SocketAddr, args: &[&str]) -> std::io::Result<String> {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(reply) = resp_text(&buf) {
            return reply;
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::other("Redis did not answer"));
        }
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .map_err(|_| std::io::Error::other("Redis did not answer"))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A complete simple reply in `buf` as text; `None` while incomplete.
fn resp_text(buf: &[u8]) -> Option<std::io::Result<String>> {
    let eol = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = String::from_utf8_lossy(&buf[1..eol]).into_owned();
    match buf.first()? {
        b'+' | b':' => Some(Ok(line)),
        b'-' => Some(Err(std::io::Error::other(format!("Redis: {line}")))),
        b'$' => {
            let len: usize = line.parse().ok()?;
            let body = buf.get(eol + 2..eol + 2 + len)?;
            Some(Ok(String::from_utf8_lossy(body).into_owned()))
        }
        _ => Some(Err(std::io::Error::other("unexpected Redis reply"))),
    }
}

async fn redis_snapshot(addr: SocketAddr) -> std::io::Result<RedisSnapshot> {
    let info = redis_command(addr, &["INFO", "commandstats", "cpu"]).await?;
    Ok(RedisSnapshot::parse(&info))
}

/// Waits until Redis's count of commands (but the measurement's own) is at least `floor`, then
/// unchanged for `quiet`; at most `max` after `from`. Returns how long after `from` the last
/// one was seen.
async fn redis_settle(
    addr: SocketAddr,
    from: Instant,
    quiet: Duration,
    max: Duration,
    floor: u64,
) -> std::io::Result<f64> {
    let mut last = redis_snapshot(addr).await?.total_calls();
    let mut changed = Instant::now();
    while (changed.elapsed() < quiet || last < floor) && from.elapsed() < max {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = redis_snapshot(addr).await?.total_calls();
        if now != last {
            last = now;
            changed = Instant::now();
        }
    }
    Ok(changed.saturating_duration_since(from).as_secs_f64())
}

/// One `GET path` over a fresh connection with the user's token; the body.
async fn http_get(addr: SocketAddr, path: &str, token: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("no HTTP answer"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("malformed HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "GET {path}: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(body.to_string())
}

/// A handler for the measuring service, which never has connections: it only calls
/// `presence_stats` and `presence` on the Redis the server writes to.
struct Observer;

#[async_trait]
impl MessageHandler for Observer {
    type ClientMessage = serde_json::Value;
    type ServerEvent = serde_json::Value;
    type AppState = ();
    type UserId = String;

    async fn handle_broadcast_message(
        &self,
        _: serde_json::Value,
        _: &ConnectionContext<(), String>,
    ) -> Result<Option<serde_json::Value>, HandlerError> {
        Ok(None)
    }
}

/// Times of the read paths at one topic size.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct ReadTimes {
    /// `presence_stats("general")`, milliseconds per call.
    pub(crate) stats_ms: Vec<f64>,
    /// `presence("general", None, connections)`, milliseconds per call.
    pub(crate) list_ms: Vec<f64>,
    /// Users in the last full listing.
    pub(crate) listed_users: usize,
    /// `GET /presence/general` (a page of 100 and the stats), milliseconds per request.
    pub(crate) http_ms: Vec<f64>,
    /// Redis activity of the stats calls, of the listings, of the HTTP requests.
    pub(crate) stats_redis: RedisDelta,
    pub(crate) list_redis: RedisDelta,
    pub(crate) http_redis: RedisDelta,
}

/// One run of one arm.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ArmRun {
    pub(crate) arm: Arm,
    pub(crate) rep: usize,
    pub(crate) opened: u64,
    pub(crate) failures: u64,
    pub(crate) open_secs: f64,
    pub(crate) handshakes_per_s: f64,
    pub(crate) server_cpu_s: Option<f64>,
    /// Users the topic's presence counted once all were open (`presence` arm).
    pub(crate) counted_users: Option<u64>,
    pub(crate) join_redis: RedisDelta,
    pub(crate) leave_redis: RedisDelta,
    /// Seconds from the first close frame to Redis's last command of the leaves.
    pub(crate) leave_secs: f64,
    pub(crate) reads: Option<ReadTimes>,
}

#[derive(Debug, Serialize)]
pub(crate) struct PresenceResult {
    pub(crate) args: PresenceArgs,
    pub(crate) redis_version: String,
    pub(crate) load_before: String,
    pub(crate) runs: Vec<ArmRun>,
}

pub(crate) async fn presence(
    root: &std::path::Path,
    args: &PresenceArgs,
) -> Result<PresenceResult, String> {
    let s = |e: std::io::Error| e.to_string();
    if !args.no_build {
        system::build_ours(root).map_err(s)?;
    }
    if args.pin {
        let me = std::process::id().to_string();
        let _ = std::process::Command::new("taskset")
            .args(["-a", "-cp", "1", &me])
            .stdout(std::process::Stdio::null())
            .status();
    }
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let target_dir = system::release_dir(root);
    let redis = system::start_redis().map_err(s)?;
    let redis_version = redis_command(redis.addr, &["INFO", "server"])
        .await
        .map_err(s)?
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mut runs = Vec::new();
    for rep in 0..args.reps.max(1) {
        let order = if rep % 2 == 0 {
            [Arm::Presence, Arm::NoPresence]
        } else {
            [Arm::NoPresence, Arm::Presence]
        };
        for arm in order {
            eprintln!("== {} (rep {}/{})", arm.name(), rep + 1, args.reps.max(1));
            let run = run_arm(arm, rep, args, &target_dir, redis.addr).await?;
            eprintln!(
                "  {} opened in {:.3} s ({:.0}/s), {} failures, {:.2} Redis commands/join, {:.2}/leave",
                run.opened,
                run.open_secs,
                run.handshakes_per_s,
                run.failures,
                run.join_redis.calls_per(run.opened).unwrap_or(0.0),
                run.leave_redis.calls_per(run.opened).unwrap_or(0.0),
            );
            runs.push(run);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    Ok(PresenceResult {
        args: args.clone(),
        redis_version,
        load_before: load_before.trim().to_string(),
        runs,
    })
}

async fn run_arm(
    arm: Arm,
    rep: usize,
    args: &PresenceArgs,
    target_dir: &std::path::Path,
    redis: SocketAddr,
) -> Result<ArmRun, String> {
    let s = |e: std::io::Error| e.to_string();
    redis_command(redis, &["FLUSHALL"]).await.map_err(s)?;
    let redis_url = format!("redis://{redis}/");
    let opts = StartOpts {
        redis_url: Some(redis_url.clone()),
        shards: None,
        cpus: args.pin.then(|| "0".to_string()),
        env: Vec::new(),
        binary: None,
    };
    let mut server = system::start_system(System::Ours, target_dir, &opts).map_err(s)?;
    let server_pid = server.pid();
    // The server's own start-up commands (its subscriber) are over before counting.
    redis_settle(
        redis,
        Instant::now(),
        Duration::from_millis(500),
        Duration::from_secs(5),
        0,
    )
    .await
    .map_err(s)?;

    let paths: Vec<String> = (0..args.connections)
        .map(|i| ws_path(arm, i, args.rtk1))
        .collect();
    let stats = Stats::new(args.connections);
    let before = redis_snapshot(redis).await.map_err(s)?;
    let cpu0 = system::cpu_seconds(server_pid);
    let start = Instant::now();
    let (mut writers, failures) =
        client::open_many(server.addr, paths, args.parallel, stats, SeqCheck::None).await;
    let open_secs = start.elapsed().as_secs_f64();
    let server_cpu_s = match (cpu0, system::cpu_seconds(server_pid)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let opened = writers.iter().filter(|w| w.is_some()).count() as u64;
    // With rtk1 the join events keep Redis busy a little after the last handshake.
    redis_settle(
        redis,
        Instant::now(),
        Duration::from_millis(500),
        Duration::from_secs(30),
        0,
    )
    .await
    .map_err(s)?;
    let joined = redis_snapshot(redis).await.map_err(s)?;
    let join_redis = joined.since(&before);

    let (counted_users, reads) = if arm == Arm::Presence {
        let reads = read_times(args, &redis_url, redis, server.addr)
            .await
            .map_err(|e| format!("presence reads: {e}"))?;
        (reads.0, Some(reads.1))
    } else {
        (None, None)
    };

    // Leave: a close frame on every connection.
    let before_leave = redis_snapshot(redis).await.map_err(s)?;
    let from = Instant::now();
    for w in writers.iter_mut().flatten() {
        let _ = w.write_all(&CLOSE_FRAME).await;
    }
    // With presence every leave runs one script: all of them, then a quiet second.
    let floor = before_leave.total_calls() + if arm == Arm::Presence { opened } else { 0 };
    let leave_secs = redis_settle(
        redis,
        from,
        Duration::from_secs(1),
        Duration::from_secs(60),
        floor,
    )
    .await
    .map_err(s)?;
    let left = redis_snapshot(redis).await.map_err(s)?;
    let leave_redis = left.since(&before_leave);
    drop(writers);
    server.stop();
    Ok(ArmRun {
        arm,
        rep,
        opened,
        failures,
        open_secs,
        handshakes_per_s: opened as f64 / open_secs.max(1e-9),
        server_cpu_s,
        counted_users,
        join_redis,
        leave_redis,
        leave_secs,
        reads,
    })
}

/// Times `presence_stats`, full listings, and `GET /presence/general` at the current size.
/// Returns the users the stats counted too.
async fn read_times(
    args: &PresenceArgs,
    redis_url: &str,
    redis: SocketAddr,
    server: SocketAddr,
) -> Result<(Option<u64>, ReadTimes), String> {
    let s = |e: std::io::Error| e.to_string();
    let service = WebsocketService::builder(Observer, Arc::new(()))
        .redis_url(Some(redis_url.to_string()))
        .topic_policy(|topic| {
            (topic == "general")
                .then(|| TopicPolicy::history(1_000, Duration::from_secs(600)).presence(true))
        })
        .try_build()
        .map_err(|e| e.to_string())?;
    // Its connections to Redis are up before counting.
    let ready = Instant::now();
    while !service.is_ready() && ready.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    redis_settle(
        redis,
        Instant::now(),
        Duration::from_millis(300),
        Duration::from_secs(5),
        0,
    )
    .await
    .map_err(s)?;
    let mut reads = ReadTimes::default();
    let mut counted = None;

    let r0 = redis_snapshot(redis).await.map_err(s)?;
    for _ in 0..args.stats_calls {
        let t = Instant::now();
        let st = service
            .presence_stats("general")
            .await
            .map_err(|e| e.to_string())?;
        reads.stats_ms.push(t.elapsed().as_secs_f64() * 1e3);
        counted = Some(st.users);
    }
    let r1 = redis_snapshot(redis).await.map_err(s)?;
    reads.stats_redis = r1.since(&r0);

    for _ in 0..args.list_calls {
        let t = Instant::now();
        let page = service
            .presence("general", None, args.connections)
            .await
            .map_err(|e| e.to_string())?;
        reads.list_ms.push(t.elapsed().as_secs_f64() * 1e3);
        reads.listed_users = page.users.len();
    }
    let r2 = redis_snapshot(redis).await.map_err(s)?;
    reads.list_redis = r2.since(&r1);

    let token = format!("{}:reader", user_uuid(0));
    for _ in 0..args.stats_calls {
        let t = Instant::now();
        let body = http_get(server, "/presence/general", &token)
            .await
            .map_err(s)?;
        reads.http_ms.push(t.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(body);
    }
    let r3 = redis_snapshot(redis).await.map_err(s)?;
    reads.http_redis = r3.since(&r2);
    service.shutdown().await;
    Ok((counted, reads))
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

/// The per-rep ratio `presence / no-presence` of seconds to open all, for reps with both arms.
pub(crate) fn open_ratios(runs: &[ArmRun]) -> Vec<f64> {
    let reps: std::collections::BTreeSet<usize> = runs.iter().map(|r| r.rep).collect();
    reps.into_iter()
        .filter_map(|rep| {
            let secs = |arm| {
                runs.iter()
                    .find(|r| r.rep == rep && r.arm == arm && r.failures == 0)
                    .map(|r| r.open_secs)
            };
            Some(secs(Arm::Presence)? / secs(Arm::NoPresence)?)
        })
        .collect()
}

/// Server CPU microseconds per connection opened.
fn server_us_per_join(run: &ArmRun) -> Option<f64> {
    run.server_cpu_s
        .filter(|_| run.opened > 0)
        .map(|c| c * 1e6 / run.opened as f64)
}

/// The Markdown tables.
pub(crate) fn report(r: &PresenceResult) -> String {
    use std::fmt::Write;
    let a = &r.args;
    let mut s = format!(
        "### Presence: {} connections per arm, {} reps, {} frames, Redis {}\n\n\
         | rep | arm | opened | failures | open s | handshakes/s | server CPU µs/join | Redis cmds/join | Redis CPU µs/join | Redis cmds/leave | Redis CPU µs/leave | s to last leave command |\n\
         |---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        a.connections,
        a.reps,
        if a.rtk1 { "rtk1" } else { "plain" },
        r.redis_version
    );
    for run in &r.runs {
        let n = run.opened;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.3} | {:.0} | {} | {} | {} | {} | {} | {:.2} |",
            run.rep + 1,
            run.arm.name(),
            n,
            run.failures,
            run.open_secs,
            run.handshakes_per_s,
            opt(server_us_per_join(run), 1),
            opt(run.join_redis.calls_per(n), 2),
            opt(run.join_redis.cpu_us_per(n), 1),
            opt(run.leave_redis.calls_per(n), 2),
            opt(run.leave_redis.cpu_us_per(n), 1),
            run.leave_secs,
        );
    }
    let med = |arm: Arm, f: &dyn Fn(&ArmRun) -> f64| {
        let v: Vec<f64> = r.runs.iter().filter(|x| x.arm == arm).map(f).collect();
        quantile(&v, 0.5)
    };
    s.push_str(
        "\n| arm | median open s | median handshakes/s | median server CPU µs/join | median Redis CPU µs/join | Redis commands per join | per leave |\n|---|---:|---:|---:|---:|---|---|\n",
    );
    for arm in [Arm::Presence, Arm::NoPresence] {
        let total = |f: &dyn Fn(&ArmRun) -> &RedisDelta| {
            let mut sum = RedisDelta::default();
            let mut n = 0;
            for run in r.runs.iter().filter(|x| x.arm == arm) {
                n += run.opened;
                for (name, &(c, u)) in &f(run).commands {
                    let e = sum.commands.entry(name.clone()).or_insert((0, 0));
                    e.0 += c;
                    e.1 += u;
                }
            }
            sum.breakdown(n)
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            arm.name(),
            opt(med(arm, &|x| x.open_secs), 3),
            opt(med(arm, &|x| x.handshakes_per_s), 0),
            opt(med(arm, &|x| server_us_per_join(x).unwrap_or(f64::NAN)), 1),
            opt(
                med(arm, &|x| x
                    .join_redis
                    .cpu_us_per(x.opened)
                    .unwrap_or(f64::NAN)),
                1
            ),
            total(&|x| &x.join_redis),
            total(&|x| &x.leave_redis),
        );
    }
    let ratios = open_ratios(&r.runs);
    let ratio = quantile(&ratios, 0.5);
    let _ = writeln!(
        s,
        "\nOpen-all time, presence / no-presence, per rep: {}; median {} (target ≤ 2.00: {}).\n",
        ratios
            .iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        opt(ratio, 2),
        match ratio {
            Some(x) if x <= 2.0 => "met",
            Some(_) => "missed",
            None => "no complete pair",
        }
    );
    let reads: Vec<&ReadTimes> = r.runs.iter().filter_map(|x| x.reads.as_ref()).collect();
    if !reads.is_empty() {
        let counted: Vec<String> = r
            .runs
            .iter()
            .filter_map(|x| x.counted_users)
            .map(|u| u.to_string())
            .collect();
        let _ = writeln!(
            s,
            "Reads at {} members (users counted: {}; last full listing: {} users):\n\n\
             | call | calls | median ms | p90 ms | max ms | Redis commands/call | Redis µs in scripts/call |\n\
             |---|---:|---:|---:|---:|---|---:|",
            a.connections,
            counted.join(", "),
            reads.last().map_or(0, |x| x.listed_users),
        );
        type Pick = fn(&ReadTimes) -> (&Vec<f64>, &RedisDelta);
        let rows: [(&str, Pick); 3] = [
            ("`presence_stats` (in process)", |x| {
                (&x.stats_ms, &x.stats_redis)
            }),
            ("`presence`, limit = members (in process)", |x| {
                (&x.list_ms, &x.list_redis)
            }),
            (
                "`GET /presence/general` (page of 100 + stats, new TCP connection)",
                |x| (&x.http_ms, &x.http_redis),
            ),
        ];
        for (name, pick) in rows {
            let samples: Vec<f64> = reads.iter().flat_map(|x| pick(x).0.clone()).collect();
            let n = samples.len() as u64;
            let mut redis = RedisDelta::default();
            for x in &reads {
                for (k, &(c, u)) in &pick(x).1.commands {
                    let e = redis.commands.entry(k.clone()).or_insert((0, 0));
                    e.0 += c;
                    e.1 += u;
                }
            }
            // The scripts' time, whether called by text or by SHA.
            let script_usec = redis.usec_in(&["eval", "evalsha"]);
            let scripts = script_usec > 0;
            let _ = writeln!(
                s,
                "| {name} | {n} | {} | {} | {} | {} | {} |",
                opt(quantile(&samples, 0.5), 3),
                opt(quantile(&samples, 0.9), 3),
                opt(quantile(&samples, 1.0), 3),
                redis.breakdown(n),
                opt(scripts.then(|| script_usec as f64 / n.max(1) as f64), 1),
            );
        }
    }
    let _ = writeln!(s, "\nLoad average before: {}", r.load_before);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "# Commandstats\r\n\
        cmdstat_eval:calls=10,usec=500,usec_per_call=50.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_hincrby:calls=20,usec=40,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_info:calls=3,usec=90,usec_per_call=30.00,rejected_calls=0,failed_calls=0\r\n\
        \r\n# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\n\
        used_cpu_sys_children:9.000000\r\n";

    #[test]
    fn info_is_parsed_into_commands_and_cpu() {
        let snap = RedisSnapshot::parse(INFO);
        assert_eq!(snap.commands.get("eval"), Some(&(10, 500)));
        assert_eq!(snap.commands.get("hincrby"), Some(&(20, 40)));
        assert!(
            (snap.cpu_s - 3.75).abs() < 1e-9,
            "children's CPU is not Redis's"
        );
        // The measurement's own reads are not counted.
        assert_eq!(snap.total_calls(), 30);
    }

    #[test]
    fn a_delta_counts_new_calls_only_and_per_operation() {
        let before = RedisSnapshot::parse(INFO);
        let after = RedisSnapshot::parse(
            "cmdstat_eval:calls=30,usec=1500\r\ncmdstat_hincrby:calls=20,usec=40\r\n\
             cmdstat_publish:calls=4,usec=8\r\ncmdstat_info:calls=9,usec=1\r\n\
             used_cpu_sys:1.5\r\nused_cpu_user:2.27\r\n",
        );
        let d = after.since(&before);
        assert_eq!(d.commands.get("eval"), Some(&(20, 1000)));
        assert_eq!(d.commands.get("publish"), Some(&(4, 8)));
        assert!(!d.commands.contains_key("hincrby"), "unchanged");
        assert!(!d.commands.contains_key("info"), "the measurement's own");
        assert_eq!(d.calls(), 24);
        assert_eq!(d.calls_per(4), Some(6.0));
        assert_eq!(d.calls_per(0), None);
        assert!((d.cpu_us_per(4).unwrap() - 5_000.0).abs() < 1e-6);
        assert_eq!(d.usec_in(&["eval", "evalsha"]), 1000);
        assert_eq!(d.breakdown(4), "eval 5.00, publish 1.00");
    }

    #[test]
    fn a_subcommand_in_the_breakdown_keeps_the_markdown_cell_whole() {
        let before = RedisSnapshot::parse("");
        let after = RedisSnapshot::parse("cmdstat_script|load:calls=1,usec=9\r\n");
        assert_eq!(after.since(&before).breakdown(1), "script load 1.00");
    }

    #[test]
    fn malformed_info_lines_are_skipped() {
        let snap = RedisSnapshot::parse("cmdstat_x\r\ncmdstat_y:calls=abc\r\nused_cpu_sys:?\r\n");
        assert!(snap.commands.is_empty());
        assert_eq!(snap.cpu_s, 0.0);
    }

    #[test]
    fn resp_replies_are_read_whole_or_not_at_all() {
        assert!(resp_text(b"$5\r\nhel").is_none());
        assert_eq!(resp_text(b"$5\r\nhello\r\n").unwrap().unwrap(), "hello");
        assert_eq!(resp_text(b"+OK\r\n").unwrap().unwrap(), "OK");
        assert!(resp_text(b"-ERR no\r\n").unwrap().is_err());
        assert!(resp_text(b"+OK").is_none());
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), Some(2.0));
        assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 0.5), Some(2.0));
        assert_eq!(quantile(&[4.0, 1.0, 3.0, 2.0], 1.0), Some(4.0));
        assert_eq!(quantile(&[5.0], 0.9), Some(5.0));
    }

    fn run(arm: Arm, rep: usize, secs: f64, failures: u64) -> ArmRun {
        ArmRun {
            arm,
            rep,
            opened: 10,
            failures,
            open_secs: secs,
            handshakes_per_s: 10.0 / secs,
            server_cpu_s: None,
            counted_users: None,
            join_redis: RedisDelta::default(),
            leave_redis: RedisDelta::default(),
            leave_secs: 0.0,
            reads: None,
        }
    }

    #[test]
    fn ratios_pair_the_arms_of_each_rep_and_skip_failed_runs() {
        let runs = [
            run(Arm::Presence, 0, 3.0, 0),
            run(Arm::NoPresence, 0, 2.0, 0),
            run(Arm::NoPresence, 1, 1.0, 0),
            run(Arm::Presence, 1, 4.0, 0),
            run(Arm::Presence, 2, 1.0, 0),
            run(Arm::NoPresence, 2, 1.0, 3),
        ];
        assert_eq!(open_ratios(&runs), vec![1.5, 4.0]);
    }

    #[test]
    fn the_arms_differ_in_topic_and_user_only() {
        let p = ws_path(Arm::Presence, 7, false);
        let q = ws_path(Arm::Presence, 8, false);
        let n = ws_path(Arm::NoPresence, 7, true);
        assert!(p.starts_with("/ws/general?token=00000000-0000-4000-9000-000000000007:"));
        assert_ne!(p, q, "one user per connection");
        assert_eq!(n, ws_path(Arm::NoPresence, 8, true), "one user for all");
        assert!(n.ends_with("&proto=rtk1"));
        assert!(!p.contains("rtk1"));
        // The frame is a close with code 1000, masked with a zero key.
        assert_eq!(CLOSE_FRAME[0], 0x88);
        assert_eq!(u16::from_be_bytes([CLOSE_FRAME[6], CLOSE_FRAME[7]]), 1000);
    }
}
