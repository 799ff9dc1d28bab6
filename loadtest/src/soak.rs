//! `soak`: a bounded run with connection churn and steady publishes through Redis.
//!
//! It starts its own Redis and `basic_chat`, connects subscribers that stay for the whole run,
//! publishes marked messages to their topic through Redis at a steady rate, and meanwhile keeps
//! a pool of short-lived clients connecting, reading, sending and leaving in every way a client
//! can leave (close handshake, dropped TCP, half a frame then gone). It checks what a long-lived
//! server must keep true:
//! - memory: once every client has left, idle RSS is within `--rss-tolerance` of idle RSS at the
//!   start; under the same load, the median RSS of the churn's second half is within it of its
//!   first half's; and idle RSS at the end is within it of that first half's median.
//! - nothing leaks: once every client is gone, live connections and subscriptions are zero and
//!   the runtime's alive tasks are back to their count before the first client;
//! - nothing is lost: every subscriber that stayed received every published message, in order.
//!
//! The start is idle after a warm-up round (`--warm-round-secs`) of the same clients and
//! publishes, which all leave again. Before any client the server's allocator pages are
//! sparsely touched; the first load fills every page that holds a long-lived block (the router,
//! the broker's channels, the metrics registry), and the allocator cannot return the free part
//! of a page that still holds one. That happens once, not per load, so the report shows idle RSS
//! before the first client too, but the check is against the start after one round. The round
//! also sends each room as many chat messages as its history keeps, so the history is as full at
//! the start as it is at the end.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{self, SeqCheck, Stats};
use crate::publish::Publisher;
use crate::scenario::token_for;
use crate::system::{self, StartOpts, System};

/// Arguments of `soak`.
#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct SoakArgs {
    /// Seconds of churn after the warm-up (the whole run stays under 10 minutes).
    #[arg(long, default_value_t = 300.0)]
    pub(crate) secs: f64,
    /// Seconds of warm-up (same load, stayers connected) before the churn is measured.
    #[arg(long, default_value_t = 30.0)]
    pub(crate) warmup_secs: f64,
    /// Seconds of a first round of the same clients and publishes, which all leave before idle
    /// RSS is taken as the start (at most 20; 0: the start is before the first client).
    #[arg(long, default_value_t = 15.0)]
    pub(crate) warm_round_secs: f64,
    /// Subscribers that stay connected for the whole run.
    #[arg(long, default_value_t = 200)]
    pub(crate) stayers: usize,
    /// Short-lived clients connected at any moment.
    #[arg(long, default_value_t = 300)]
    pub(crate) churners: usize,
    /// Publishes per second (to the stayers' topic, through Redis).
    #[arg(long, default_value_t = 200.0)]
    pub(crate) rate: f64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 256)]
    pub(crate) payload: usize,
    /// Allowed RSS growth from idle at the start to idle at the end, between the churn's first
    /// and second half (medians), and from the first half's median to idle RSS at the end.
    #[arg(long, default_value_t = 0.10)]
    pub(crate) rss_tolerance: f64,
    /// SHARDS for the server.
    #[arg(long)]
    pub(crate) shards: Option<usize>,
    /// Use the binary already built in target/release.
    #[arg(long)]
    pub(crate) no_build: bool,
    /// Extra KEY=VALUE environment for the server.
    #[arg(long = "server-env", value_delimiter = ',')]
    pub(crate) server_env: Vec<String>,
}

impl SoakArgs {
    /// Seconds the warm-up round runs: `--warm-round-secs`, at most 20 (its subscribers send
    /// nothing, and must leave before the heartbeat would close them).
    fn warm_round_length(&self) -> f64 {
        self.warm_round_secs.min(20.0)
    }
}

/// One sample of the server during the run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Sample {
    pub(crate) at_s: f64,
    pub(crate) rss_mib: f64,
    /// The anonymous (heap, stacks) and file-backed (code) parts of `rss_mib`.
    pub(crate) rss_anon_mib: f64,
    pub(crate) rss_file_mib: f64,
    pub(crate) connections: f64,
    pub(crate) subscriptions: f64,
    pub(crate) alive_tasks: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SoakResult {
    pub(crate) args: SoakArgs,
    pub(crate) wall_s: f64,
    pub(crate) published: u64,
    /// Per stayer: messages received; all should equal `published`.
    pub(crate) stayer_min_received: u64,
    pub(crate) stayer_max_received: u64,
    pub(crate) stayers_connected: usize,
    pub(crate) reorders: u64,
    /// Idle RSS before the first client, and its anonymous and file-backed parts.
    pub(crate) rss_idle_cold_mib: f64,
    pub(crate) rss_anon_file_idle_cold_mib: (f64, f64),
    pub(crate) churn_connections: u64,
    pub(crate) churn_refused: u64,
    pub(crate) churn_close_handshakes: u64,
    pub(crate) churn_drops: u64,
    pub(crate) churn_half_frames: u64,
    pub(crate) churn_messages_sent: u64,
    pub(crate) rss_idle_start_mib: f64,
    pub(crate) rss_after_warmup_mib: f64,
    pub(crate) rss_end_of_churn_mib: f64,
    /// Medians of the RSS samples in the first and second half of the churn.
    pub(crate) rss_churn_first_half_mib: f64,
    pub(crate) rss_churn_second_half_mib: f64,
    pub(crate) rss_idle_end_mib: f64,
    /// Anonymous and file-backed RSS, idle at the start and idle at the end.
    pub(crate) rss_anon_file_idle_start_mib: (f64, f64),
    pub(crate) rss_anon_file_idle_end_mib: (f64, f64),
    pub(crate) alive_tasks_idle_start: f64,
    pub(crate) alive_tasks_idle_end: f64,
    pub(crate) connections_end: f64,
    pub(crate) subscriptions_end: f64,
    pub(crate) timeline: Vec<Sample>,
    /// Each check with whether it held.
    pub(crate) checks: Vec<(String, bool)>,
    /// The mappings whose resident size changed most between idle at start and idle at the end:
    /// (label, KiB at start, KiB at end).
    pub(crate) rss_changes: Vec<(String, u64, u64)>,
    pub(crate) ok: bool,
}

/// How a churning client leaves.
#[derive(Debug, Default)]
struct Churn {
    connections: AtomicU64,
    refused: AtomicU64,
    close_handshakes: AtomicU64,
    drops: AtomicU64,
    half_frames: AtomicU64,
    messages: AtomicU64,
}

/// A small xorshift generator: the harness needs variety, not quality.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// GET /metrics and return the values of unlabelled series.
pub(crate) async fn scrape(addr: SocketAddr) -> Option<std::collections::HashMap<String, f64>> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    let body = out.split_once("\r\n\r\n")?.1;
    Some(
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_string(), v.trim().parse().ok()?))
            })
            .collect(),
    )
}

async fn sample(addr: SocketAddr, pid: u32, start: Instant) -> Sample {
    let m = scrape(addr).await.unwrap_or_default();
    let get = |k: &str| m.get(k).copied().unwrap_or(f64::NAN);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let (rss, anon, file) = system::rss_parts_kib(pid)
        .map_or((f64::NAN, f64::NAN, f64::NAN), |(r, a, f)| {
            (mib(r), mib(a), mib(f))
        });
    Sample {
        at_s: start.elapsed().as_secs_f64(),
        rss_mib: rss,
        rss_anon_mib: anon,
        rss_file_mib: file,
        connections: get("rtk_connections"),
        subscriptions: get("rtk_subscriptions"),
        alive_tasks: get("rtk_runtime_alive_tasks"),
    }
}

/// A masked close frame with code 1000.
const CLOSE_NORMAL: [u8; 8] = [0x88, 0x82, 0, 0, 0, 0, 0x03, 0xE8];

/// The chat message a client of the soak sends to `room`.
fn chat_frame(room: &str) -> bytes::BytesMut {
    let msg = format!(r#"{{"SendMessage":{{"room":"{room}","text":"churn"}}}}"#);
    client::client_text_frame(msg.as_bytes())
}

/// Reads and discards whatever the server sends on `read`, until it ends.
fn drain(mut read: tokio::net::tcp::OwnedReadHalf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
    })
}

/// One short-lived client after another until `stop`.
async fn churner(addr: SocketAddr, seed: u64, stop: Arc<AtomicBool>, churn: Arc<Churn>) {
    let mut rng = Rng(seed | 1);
    while !stop.load(Relaxed) {
        // Rooms the stayers are not in, and theirs: joining and leaving a topic that is
        // being delivered to is the case worth churning.
        let (path, room) = match rng.below(10) {
            0..=4 => (format!("/ws/general?token={}", token_for(0, 1)), "general"),
            5..=7 => (format!("/ws/random?token={}", token_for(0, 1)), "random"),
            _ => {
                let t = rng.below(1000) as usize + 1;
                let topic = crate::scenario::topic_name(t, 1000);
                (format!("/ws/{topic}?token={}", token_for(t, 1000)), "")
            }
        };
        let Ok(Ok((101, Some((stream, _))))) =
            tokio::time::timeout(Duration::from_secs(10), client::handshake(addr, &path)).await
        else {
            churn.refused.fetch_add(1, Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        churn.connections.fetch_add(1, Relaxed);
        let (read, mut write) = stream.into_split();
        let reader = drain(read);
        let life = Duration::from_millis(200 + rng.below(2800));
        if !room.is_empty() && rng.below(3) == 0 && write.write_all(&chat_frame(room)).await.is_ok()
        {
            churn.messages.fetch_add(1, Relaxed);
        }
        tokio::time::sleep(life).await;
        match rng.below(3) {
            0 => {
                // Close handshake, then wait for the server to finish.
                let _ = write.write_all(&CLOSE_NORMAL).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
                churn.close_handshakes.fetch_add(1, Relaxed);
            }
            1 => {
                // Gone without a word.
                reader.abort();
                churn.drops.fetch_add(1, Relaxed);
            }
            _ => {
                // Half of a frame header and payload, then gone.
                let _ = write.write_all(&[0x81, 0x85, 0, 0, 0, 0, b'h', b'e']).await;
                reader.abort();
                churn.half_frames.fetch_add(1, Relaxed);
            }
        }
    }
}

/// `n` churning clients, each with its own seed (`round` varies them between rounds).
fn spawn_churners(
    addr: SocketAddr,
    n: usize,
    round: u64,
    stop: &Arc<AtomicBool>,
    churn: &Arc<Churn>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n as u64)
        .map(|i| {
            let seed = 0x9E37_79B9_7F4A_7C15
                ^ (i + 1).wrapping_mul(0x2545_F491_4F6C_DD1D)
                ^ round.wrapping_mul(0xD6E8_FEB8_6659_FD93);
            tokio::spawn(churner(addr, seed, stop.clone(), churn.clone()))
        })
        .collect()
}

/// Chat messages each room of `basic_chat` keeps for recovery (its topic policy for `general` and
/// `random`).
const ROOM_HISTORY: usize = 1_000;

/// Sends `n` chat messages to `room`, the churners' [`chat_frame`], on one connection that reads
/// whatever it is sent, then closes it with a handshake: the server has handled every message
/// once its close comes back.
async fn fill_history(addr: SocketAddr, room: &str, n: usize) -> Result<(), String> {
    let path = format!("/ws/{room}?token={}", token_for(0, 1));
    let Ok((101, Some((stream, _)))) = client::handshake(addr, &path).await else {
        return Err(format!(
            "the warm-up round could not join {room} to fill its history"
        ));
    };
    let (read, mut write) = stream.into_split();
    let reader = drain(read);
    let frame = chat_frame(room);
    for _ in 0..n {
        write
            .write_all(&frame)
            .await
            .map_err(|e| format!("filling the history of {room}: {e}"))?;
    }
    let _ = write.write_all(&CLOSE_NORMAL).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
    Ok(())
}

/// The warm-up round: as many subscribers as stayers, the churning clients and the publishes,
/// for [`SoakArgs::warm_round_length`]; then every client leaves. It also fills each room's
/// history: the churners' chat messages fill it over a long run and the server keeps it, within
/// its bound, after everyone has left, so a start with it half full would read as growth.
async fn warm_round(addr: SocketAddr, redis: SocketAddr, args: &SoakArgs) -> Result<(), String> {
    let secs = args.warm_round_length();
    let paths = vec![format!("/ws/general?token={}", token_for(0, 1)); args.stayers];
    let stats = Stats::new(args.stayers);
    let (writers, failures) = client::open_many(addr, paths, 64, stats, SeqCheck::Increasing).await;
    if failures > 0 {
        return Err(format!("{failures} warm-up subscribers could not connect"));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let churners = spawn_churners(addr, args.churners, 1, &stop, &Arc::default());
    let mut publisher = Publisher::redis(redis, vec!["general".into()], args.payload)
        .await
        .map_err(|e| e.to_string())?;
    let fill = async {
        for room in ["general", "random"] {
            fill_history(addr, room, ROOM_HISTORY).await?;
        }
        Ok::<(), String>(())
    };
    let (published, filled) = tokio::join!(
        publisher.run(args.rate, Duration::from_secs_f64(secs)),
        fill
    );
    stop.store(true, Relaxed);
    for c in churners {
        let _ = tokio::time::timeout(Duration::from_secs(15), c).await;
    }
    // Dropping a write half ends that subscriber's connection.
    drop(writers);
    filled?;
    published.map(drop).map_err(|e| e.to_string())
}

/// Samples until every client is gone (no connection or subscription, alive tasks back to
/// `tasks`; at most 20 s), then once a second until RSS stops falling (at most 10 s): freed
/// memory reaches the OS as the runtime's threads go idle. Returns the last sample.
async fn settle(addr: SocketAddr, pid: u32, started: Instant, tasks: f64) -> Sample {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = sample(addr, pid, started).await;
    while Instant::now() < deadline
        && (s.connections != 0.0 || s.subscriptions != 0.0 || s.alive_tasks > tasks)
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
        s = sample(addr, pid, started).await;
    }
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let next = sample(addr, pid, started).await;
        let falling = next.rss_mib < s.rss_mib * 0.99;
        s = next;
        if !falling {
            break;
        }
    }
    s
}

pub(crate) async fn soak(root: &Path, args: &SoakArgs) -> Result<SoakResult, String> {
    if args.warm_round_length() + args.warmup_secs + args.secs > 540.0 {
        return Err(
            "warm-up round, warm-up and churn must stay under 9 minutes (the run is bounded)"
                .into(),
        );
    }
    if !args.no_build {
        system::build_ours(root).map_err(|e| e.to_string())?;
    }
    let target_dir = system::release_dir(root);
    let started = Instant::now();
    let redis = system::start_redis().map_err(|e| e.to_string())?;
    let opts = StartOpts {
        redis_url: Some(format!("redis://{}/", redis.addr)),
        shards: args.shards,
        cpus: None,
        env: system::env_pairs(&args.server_env),
        binary: None,
    };
    let mut server =
        system::start_system(System::Ours, &target_dir, &opts).map_err(|e| e.to_string())?;
    let (addr, pid) = (server.addr, server.pid());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_cold = sample(addr, pid, started).await;
    eprintln!("idle before the first client: {idle_cold:?}");
    let idle_start = if args.warm_round_secs > 0.0 {
        warm_round(addr, redis.addr, args).await?;
        let s = settle(addr, pid, started, idle_cold.alive_tasks).await;
        eprintln!("idle after the warm-up round: {s:?}");
        s
    } else {
        idle_cold.clone()
    };
    let maps_idle_start = system::mappings_rss_kib(pid);

    let stats = Stats::new(args.stayers);
    let paths = vec![format!("/ws/general?token={}", token_for(0, 1)); args.stayers];
    let (writers, failures) =
        client::open_many(addr, paths, 64, stats.clone(), SeqCheck::Increasing).await;
    if failures > 0 {
        return Err(format!("{failures} stayers could not connect"));
    }
    // The stayers only read, and the server closes a client that stays silent through a
    // heartbeat (interval + timeout): like any client, they must be heard. An unsolicited pong
    // (RFC 6455 §5.5.3) every 10 s is the lightest way; the harness's reader does not answer
    // pings itself.
    // The task owns the stayers' write halves: aborting it closes them.
    let keepalive = tokio::spawn(async move {
        let mut writers = writers;
        let pong = [0x8A, 0x80, 0, 0, 0, 0];
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            for w in writers.iter_mut().flatten() {
                let _ = w.write_all(&pong).await;
            }
        }
    });

    let total = Duration::from_secs_f64(args.warmup_secs + args.secs);
    let mut publisher = Publisher::redis(redis.addr, vec!["general".into()], args.payload)
        .await
        .map_err(|e| e.to_string())?;
    let rate = args.rate;
    let publishing = tokio::spawn(async move { publisher.run(rate, total).await });

    let stop = Arc::new(AtomicBool::new(false));
    let churn = Arc::new(Churn::default());
    let churners = spawn_churners(addr, args.churners, 0, &stop, &churn);

    let mut timeline = Vec::new();
    let warm_end = Instant::now() + Duration::from_secs_f64(args.warmup_secs);
    let churn_end = warm_end + Duration::from_secs_f64(args.secs);
    while Instant::now() < warm_end {
        tokio::time::sleep(Duration::from_secs(5).min(warm_end - Instant::now())).await;
        timeline.push(sample(addr, pid, started).await);
    }
    let after_warmup = sample(addr, pid, started).await;
    eprintln!("after warm-up: {after_warmup:?}");
    let churn_from = timeline.len() + 1;
    timeline.push(after_warmup.clone());
    while Instant::now() < churn_end {
        tokio::time::sleep(
            Duration::from_secs(5).min(churn_end.saturating_duration_since(Instant::now())),
        )
        .await;
        let s = sample(addr, pid, started).await;
        eprintln!("{s:?}");
        timeline.push(s);
    }
    let end_of_churn = sample(addr, pid, started).await;
    timeline.push(end_of_churn.clone());
    // RSS under the same load moves by 10% and more between samples (mimalloc returns pages as
    // soon as they are free), so memory is judged on medians: the churn's first half against its
    // second half, not one sample against another.
    let churn_rss: Vec<f64> = timeline[churn_from - 1..]
        .iter()
        .map(|s| s.rss_mib)
        .collect();
    let (first, second) = churn_rss.split_at(churn_rss.len() / 2);
    let half_median = |half: &[f64]| crate::report::median(half.to_vec()).unwrap_or(f64::NAN);
    let (rss_first_half, rss_second_half) = (half_median(first), half_median(second));

    stop.store(true, Relaxed);
    for c in churners {
        let _ = tokio::time::timeout(Duration::from_secs(15), c).await;
    }
    let published: u64 = publishing
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?
        .iter()
        .sum();
    // Let the last publishes arrive.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && stats.per_conn_snapshot().iter().any(|&n| n < published) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received = stats.per_conn_snapshot();

    // Everyone leaves; the server must come back to where it started.
    keepalive.abort();
    let _ = keepalive.await;
    let idle_end = settle(addr, pid, started, idle_cold.alive_tasks).await;
    let maps_idle_end = system::mappings_rss_kib(pid);
    server.stop();
    let rss_changes = rss_changes(&maps_idle_start, &maps_idle_end, 6);

    let growth = rss_second_half / rss_first_half - 1.0;
    let idle_growth = idle_end.rss_mib / rss_first_half - 1.0;
    let idle_return = idle_end.rss_mib / idle_start.rss_mib - 1.0;
    let checks = vec![
        (
            format!(
                "idle RSS at the end within {:.0}% of idle RSS at the start ({:+.1}%)",
                args.rss_tolerance * 100.0,
                idle_return * 100.0
            ),
            idle_return <= args.rss_tolerance,
        ),
        (
            format!(
                "RSS under churn, median of the second half within {:.0}% of the first half's ({:+.1}%)",
                args.rss_tolerance * 100.0,
                growth * 100.0
            ),
            growth <= args.rss_tolerance,
        ),
        (
            format!(
                "idle RSS at the end within {:.0}% of that first-half median ({:+.1}%)",
                args.rss_tolerance * 100.0,
                idle_growth * 100.0
            ),
            idle_growth <= args.rss_tolerance,
        ),
        (
            "live connections back to 0".into(),
            idle_end.connections == 0.0,
        ),
        (
            "subscriptions back to 0".into(),
            idle_end.subscriptions == 0.0,
        ),
        (
            format!(
                "alive tasks back to the count before the first client ({} → {})",
                idle_cold.alive_tasks, idle_end.alive_tasks
            ),
            idle_end.alive_tasks <= idle_cold.alive_tasks,
        ),
        (
            format!("every stayer received all {published} messages"),
            received.iter().all(|&n| n == published),
        ),
        (
            "no stayer saw a message out of order".into(),
            stats.reorders.load(Relaxed) == 0,
        ),
    ];
    let ok = checks.iter().all(|(_, held)| *held);
    Ok(SoakResult {
        args: args.clone(),
        wall_s: started.elapsed().as_secs_f64(),
        published,
        stayer_min_received: received.iter().copied().min().unwrap_or(0),
        stayer_max_received: received.iter().copied().max().unwrap_or(0),
        stayers_connected: args.stayers,
        reorders: stats.reorders.load(Relaxed),
        rss_idle_cold_mib: idle_cold.rss_mib,
        rss_anon_file_idle_cold_mib: (idle_cold.rss_anon_mib, idle_cold.rss_file_mib),
        churn_connections: churn.connections.load(Relaxed),
        churn_refused: churn.refused.load(Relaxed),
        churn_close_handshakes: churn.close_handshakes.load(Relaxed),
        churn_drops: churn.drops.load(Relaxed),
        churn_half_frames: churn.half_frames.load(Relaxed),
        churn_messages_sent: churn.messages.load(Relaxed),
        rss_idle_start_mib: idle_start.rss_mib,
        rss_after_warmup_mib: after_warmup.rss_mib,
        rss_end_of_churn_mib: end_of_churn.rss_mib,
        rss_churn_first_half_mib: rss_first_half,
        rss_churn_second_half_mib: rss_second_half,
        rss_idle_end_mib: idle_end.rss_mib,
        rss_anon_file_idle_start_mib: (idle_start.rss_anon_mib, idle_start.rss_file_mib),
        rss_anon_file_idle_end_mib: (idle_end.rss_anon_mib, idle_end.rss_file_mib),
        alive_tasks_idle_start: idle_cold.alive_tasks,
        alive_tasks_idle_end: idle_end.alive_tasks,
        connections_end: idle_end.connections,
        subscriptions_end: idle_end.subscriptions,
        timeline,
        checks,
        rss_changes,
        ok,
    })
}

/// The result as Markdown.
pub(crate) fn report(r: &SoakResult) -> String {
    let mut md = String::new();
    md.push_str(&format!(
        "Soak: a {} s warm-up round, then {} s churn after {} s warm-up; {} stayers, {} churning clients, {} publishes/s of {} B through Redis.\n\n",
        r.args.warm_round_length(), r.args.secs, r.args.warmup_secs, r.args.stayers, r.args.churners, r.args.rate, r.args.payload
    ));
    md.push_str("| measure | value |\n|---|---|\n");
    let rows: Vec<(&str, String)> = vec![
        ("churn connections opened", r.churn_connections.to_string()),
        (
            "… left by close handshake / dropped TCP / half a frame",
            format!(
                "{} / {} / {}",
                r.churn_close_handshakes, r.churn_drops, r.churn_half_frames
            ),
        ),
        (
            "… refused or failed handshakes",
            r.churn_refused.to_string(),
        ),
        (
            "chat messages sent by churning clients",
            r.churn_messages_sent.to_string(),
        ),
        ("published to the stayers' topic", r.published.to_string()),
        (
            "received per stayer (min / max)",
            format!("{} / {}", r.stayer_min_received, r.stayer_max_received),
        ),
        ("reorders", r.reorders.to_string()),
        (
            "RSS idle before the first client, and its anonymous / file-backed parts (MiB)",
            format!(
                "{:.1} ({:.1} / {:.1})",
                r.rss_idle_cold_mib,
                r.rss_anon_file_idle_cold_mib.0,
                r.rss_anon_file_idle_cold_mib.1
            ),
        ),
        (
            "RSS idle at start (after the warm-up round) / after warm-up / end of churn / idle at end (MiB)",
            format!(
                "{:.1} / {:.1} / {:.1} / {:.1}",
                r.rss_idle_start_mib,
                r.rss_after_warmup_mib,
                r.rss_end_of_churn_mib,
                r.rss_idle_end_mib
            ),
        ),
        (
            "… of which anonymous / file-backed, idle at start → idle at end (MiB)",
            format!(
                "{:.1} / {:.1} → {:.1} / {:.1}",
                r.rss_anon_file_idle_start_mib.0,
                r.rss_anon_file_idle_start_mib.1,
                r.rss_anon_file_idle_end_mib.0,
                r.rss_anon_file_idle_end_mib.1
            ),
        ),
        (
            "RSS under churn, median of first half / second half (MiB)",
            format!(
                "{:.1} / {:.1}",
                r.rss_churn_first_half_mib, r.rss_churn_second_half_mib
            ),
        ),
        (
            "alive tasks before the first client / idle at end",
            format!("{} / {}", r.alive_tasks_idle_start, r.alive_tasks_idle_end),
        ),
        (
            "connections / subscriptions at end",
            format!("{} / {}", r.connections_end, r.subscriptions_end),
        ),
        ("wall time (s)", format!("{:.0}", r.wall_s)),
    ];
    for (k, v) in rows {
        md.push_str(&format!("| {k} | {v} |\n"));
    }
    if !r.rss_changes.is_empty() {
        md.push_str(
            "\nWhere idle RSS changed most, idle at start → idle at end:\n\n\
             | mapping | KiB at start | KiB at end | change |\n|---|---:|---:|---:|\n",
        );
        for (label, a, b) in &r.rss_changes {
            md.push_str(&format!(
                "| {label} | {a} | {b} | {:+} |\n",
                *b as i64 - *a as i64
            ));
        }
    }
    md.push_str("\n| check | held |\n|---|---|\n");
    for (check, held) in &r.checks {
        md.push_str(&format!(
            "| {check} | {} |\n",
            if *held { "yes" } else { "**no**" }
        ));
    }
    md
}

/// The `n` mappings whose resident size changed most (either way) between two snapshots; a
/// mapping present in only one counts as 0 in the other.
fn rss_changes(
    before: &std::collections::BTreeMap<u64, (String, u64)>,
    after: &std::collections::BTreeMap<u64, (String, u64)>,
    n: usize,
) -> Vec<(String, u64, u64)> {
    let mut all: Vec<(String, u64, u64)> = before
        .keys()
        .chain(after.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|start| {
            let (a_label, a) = before.get(start).cloned().unwrap_or_default();
            let (b_label, b) = after.get(start).cloned().unwrap_or_default();
            (if b_label.is_empty() { a_label } else { b_label }, a, b)
        })
        .filter(|(_, a, b)| a != b)
        .collect();
    all.sort_by_key(|(_, a, b)| std::cmp::Reverse(a.abs_diff(*b)));
    all.truncate(n);
    all
}
