//! The scenarios: `fanout`, `chat`, `connect`, `slow`. Each is bounded in count and time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::client::{self, SeqCheck, Stats};
use crate::publish::Publisher;
use crate::system;

/// Where the system under test is.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    /// The server's PID, for CPU and RSS (optional).
    pub(crate) pid: Option<u32>,
    /// The Redis the servers share, for publishing (optional).
    pub(crate) redis: Option<SocketAddr>,
    /// That Redis's PID, for its CPU (optional).
    pub(crate) redis_pid: Option<u32>,
    /// What the server speaks.
    pub(crate) proto: client::Proto,
    /// Another instance sharing the same Redis that publishers connect to (`--via ws`), so that
    /// every delivery crosses instances; `None`: publishers connect to `addr`.
    pub(crate) publish_addr: Option<SocketAddr>,
    /// Another instance sharing the same Redis that gets the same subscribers as `addr` (fan-out
    /// only, `basic_chat`'s protocol), so that Redis sends every publish to two instances.
    pub(crate) mirror: Option<Mirror>,
}

/// The second instance of [`Target::mirror`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mirror {
    pub(crate) addr: SocketAddr,
    /// Its PID, for its CPU (optional).
    pub(crate) pid: Option<u32>,
}

/// How fan-out messages are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Via {
    /// PUBLISH straight to Redis, pipelined.
    Redis,
    /// `SendMessage` over a WebSocket connection per topic (single instance, no Redis).
    Ws,
}

/// Topic `t` of `n`: `general` alone, else private per-user topics (which basic_chat allows
/// to any connection presenting that user's token).
pub(crate) fn topic_name(t: usize, n: usize) -> String {
    if n == 1 {
        "general".into()
    } else {
        format!("private-user-{}", topic_uuid(t))
    }
}

fn topic_uuid(t: usize) -> String {
    format!("00000000-0000-4000-8000-{t:012x}")
}

pub(crate) fn token_for(t: usize, n: usize) -> String {
    if n == 1 {
        "a1a2a3a4-b1b2-c1c2-d1d2-d3d4d5d6d7d8:load".into()
    } else {
        format!("{}:load", topic_uuid(t))
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Latency {
    pub(crate) p50_ms: f64,
    pub(crate) p90_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) p999_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) samples: u64,
}

impl Latency {
    fn from(h: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1000.0;
        Self {
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            samples: h.len(),
        }
    }
}

/// Samples the server's CPU time and RSS around a step.
#[derive(Debug)]
struct ServerWatch {
    pid: Option<u32>,
    cpu0: f64,
    peak_rss: Arc<std::sync::atomic::AtomicU64>,
    sampler: Option<tokio::task::JoinHandle<()>>,
}

impl ServerWatch {
    fn start(pid: Option<u32>) -> Self {
        let peak_rss = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let cpu0 = pid.and_then(system::cpu_seconds).unwrap_or(0.0);
        let sampler = pid.map(|pid| {
            let peak = peak_rss.clone();
            tokio::spawn(async move {
                loop {
                    if let Some((rss, _)) = system::rss_kib(pid) {
                        peak.fetch_max(rss, Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
        Self {
            pid,
            cpu0,
            peak_rss,
            sampler,
        }
    }

    /// (CPU seconds used, peak RSS MiB during the step).
    fn finish(self) -> (Option<f64>, Option<f64>) {
        if let Some(s) = self.sampler {
            s.abort();
        }
        let cpu = self
            .pid
            .and_then(system::cpu_seconds)
            .map(|c| c - self.cpu0);
        let rss = self
            .pid
            .map(|_| self.peak_rss.load(Relaxed) as f64 / 1024.0);
        (cpu, rss)
    }
}

fn step_bar(label: String, secs: f64) -> ProgressBar {
    let bar = ProgressBar::new((secs * 10.0) as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:40} [{bar:30}] {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(label);
    let b = bar.clone();
    tokio::spawn(async move {
        while !b.is_finished() {
            b.inc(1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    bar
}

/// Waits until `delivered()` reaches `expected`, or stops growing for `idle`, or `max` passes.
pub(crate) async fn drain(
    mut delivered: impl FnMut() -> u64,
    expected: u64,
    idle: Duration,
    max: Duration,
) {
    let start = Instant::now();
    let mut last = delivered();
    let mut last_change = Instant::now();
    while start.elapsed() < max {
        let d = delivered();
        if d >= expected {
            return;
        }
        if d != last {
            last = d;
            last_change = Instant::now();
        } else if last_change.elapsed() > idle {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Open client connections of either protocol; dropping them closes them.
#[derive(Debug)]
enum Conns {
    /// `basic_chat` connections: their write halves (the readers end when these close).
    Rtk(Vec<Option<client::Writer>>),
    /// Socket.IO connections: their readers, which own them.
    Sio(Vec<Option<tokio::task::JoinHandle<()>>>),
}

impl Conns {
    /// Opens `paths` on the target; with a mirror, opens them again on the mirror (connections
    /// `paths.len()..` are the mirror's).
    async fn open(
        target: &Target,
        paths: Vec<String>,
        parallel: usize,
        stats: Arc<Stats>,
        check: SeqCheck,
    ) -> std::io::Result<(Self, u64)> {
        match (target.proto, target.mirror) {
            (client::Proto::Rtk, mirror) => {
                let mut dests: Vec<(SocketAddr, String)> =
                    paths.iter().map(|p| (target.addr, p.clone())).collect();
                if let Some(m) = mirror {
                    dests.extend(paths.into_iter().map(|p| (m.addr, p)));
                }
                let (w, f) = client::open_many_to(dests, parallel, stats, check).await;
                Ok((Self::Rtk(w), f))
            }
            (client::Proto::SocketIo, None) => {
                let (r, f) =
                    client::open_many_sio(target.addr, paths, parallel, stats, check).await;
                Ok((Self::Sio(r), f))
            }
            (client::Proto::SocketIo, Some(_)) => Err(std::io::Error::other(
                "a mirrored instance is supported for basic_chat's protocol only",
            )),
        }
    }

    fn opened(&self) -> u64 {
        match self {
            Self::Rtk(w) => w.iter().filter(|w| w.is_some()).count() as u64,
            Self::Sio(r) => r.iter().filter(|r| r.is_some()).count() as u64,
        }
    }
}

impl Drop for Conns {
    fn drop(&mut self) {
        if let Self::Sio(readers) = self {
            for r in readers.iter().flatten() {
                r.abort();
            }
        }
    }
}

/// Arguments of `fanout`.
#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct FanoutArgs {
    /// Subscriber connections.
    #[arg(long, default_value_t = 1000)]
    pub(crate) subscribers: usize,
    /// Topics the subscribers are spread over (round-robin).
    #[arg(long, default_value_t = 1)]
    pub(crate) topics: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    pub(crate) payload: usize,
    /// Publish rates to step through, in publishes per second (all topics together).
    #[arg(long, value_delimiter = ',', default_values_t = vec![20.0, 50.0, 100.0, 200.0, 500.0, 1000.0])]
    pub(crate) rates: Vec<f64>,
    /// Seconds each step publishes.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) step_secs: f64,
    /// A step passes with at least this fraction delivered…
    #[arg(long, default_value_t = 0.999)]
    pub(crate) min_delivered: f64,
    /// …and p99 latency at most this many milliseconds.
    #[arg(long, default_value_t = 100.0)]
    pub(crate) p99_bound_ms: f64,
    /// Keep stepping after a failed step.
    #[arg(long)]
    pub(crate) no_stop: bool,
    /// How messages are published.
    #[arg(long, value_enum, default_value_t = Via::Redis)]
    pub(crate) via: Via,
    /// Handshakes in flight while connecting.
    #[arg(long, default_value_t = 256)]
    pub(crate) connect_parallel: usize,
    /// Subscribers offer permessage-deflate (and inflate what arrives compressed).
    #[arg(long)]
    pub(crate) deflate: bool,
    /// Publish dashboard-like JSON (varied rows of quotes) instead of padding (`--via redis`).
    #[arg(long)]
    pub(crate) json_payload: bool,
}

impl FanoutArgs {
    /// The deliveries a sweep offers at `rate` publishes/s: each publish goes to one topic and
    /// reaches that topic's subscribers, `subscribers / topics` of them. With one topic, `rate ×
    /// subscribers`; with one subscriber per topic (`notifications`), `rate`.
    pub(crate) fn offered_deliveries_per_s(&self, rate: f64) -> f64 {
        rate * self.subscribers as f64 / self.topics.max(1) as f64
    }
}

/// One step of a fan-out sweep.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FanoutStep {
    pub(crate) publishes_per_s: f64,
    pub(crate) expected: u64,
    pub(crate) delivered: u64,
    pub(crate) delivered_fraction: f64,
    pub(crate) deliveries_per_s: f64,
    /// Subscribers that missed at least one message, and the lowest per-subscriber fraction.
    pub(crate) subscribers_with_loss: usize,
    pub(crate) worst_subscriber_fraction: f64,
    pub(crate) reorders: u64,
    pub(crate) latency: Latency,
    pub(crate) server_cpu_s: Option<f64>,
    pub(crate) server_cpu_us_per_delivery: Option<f64>,
    pub(crate) server_peak_rss_mib: Option<f64>,
    /// Bytes the subscribers read off their sockets per delivery (frame headers included).
    pub(crate) wire_bytes_per_delivery: Option<f64>,
    /// Cores Redis kept busy over the step and its drain (CPU seconds over wall seconds).
    pub(crate) redis_cores: Option<f64>,
    /// Redis's CPU over the step and its drain per message published (its idle work included).
    pub(crate) redis_cpu_us_per_publish: Option<f64>,
    /// With a mirror: the mirror's CPU per delivery to its own subscribers (`server_cpu_*` and
    /// the delivery counts above are then the first instance's alone).
    pub(crate) mirror_cpu_us_per_delivery: Option<f64>,
    pub(crate) pass: bool,
}

/// A whole fan-out run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FanoutResult {
    pub(crate) args: FanoutArgs,
    pub(crate) connect_failures: u64,
    pub(crate) steps: Vec<FanoutStep>,
    /// The best passing step's deliveries/s.
    pub(crate) max_sustainable_per_s: Option<f64>,
}

/// The topics of a fan-out run, each with a token that may open it, and what subscribers add to
/// their query (`&proto=rtk1`, say).
#[derive(Debug, Clone)]
pub(crate) struct Rooms {
    pub(crate) topics: Vec<String>,
    pub(crate) tokens: Vec<String>,
    pub(crate) query: String,
}

pub(crate) async fn fanout(target: &Target, args: &FanoutArgs) -> std::io::Result<FanoutResult> {
    let n = args.topics.max(1);
    let rooms = Rooms {
        topics: (0..n).map(|t| topic_name(t, n)).collect(),
        tokens: (0..n).map(|t| token_for(t, n)).collect(),
        query: String::new(),
    };
    fanout_in(target, args, &rooms).await
}

/// [`fanout`] over the given rooms (`args.topics` is not used).
pub(crate) async fn fanout_in(
    target: &Target,
    args: &FanoutArgs,
    rooms: &Rooms,
) -> std::io::Result<FanoutResult> {
    let n_topics = rooms.topics.len().max(1);
    let topics = rooms.topics.clone();
    // With a mirror, connection `i` and `subscribers + i` subscribe to the same topic, on the
    // first instance and on the mirror.
    let instances = if target.mirror.is_some() { 2 } else { 1 };
    let stats = Stats::with_deflate(args.subscribers * instances, args.deflate);
    let paths: Vec<String> = (0..args.subscribers)
        .map(|i| {
            let t = i % n_topics;
            format!("/ws/{}?token={}{}", topics[t], rooms.tokens[t], rooms.query)
        })
        .collect();
    let (_conns, connect_failures) = Conns::open(
        target,
        paths,
        args.connect_parallel,
        stats.clone(),
        SeqCheck::Increasing,
    )
    .await?;
    // Let the server finish subscribing (Redis SUBSCRIBE round trips).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut publisher = match args.via {
        _ if target.proto == client::Proto::SocketIo => {
            // A Socket.IO adapter's Redis channels carry its own encoding, not the contract's
            // payload: messages enter through the server, as `send` events.
            let tokens = rooms.tokens.clone();
            let addr = target.publish_addr.unwrap_or(target.addr);
            Publisher::socketio(addr, topics.clone(), tokens, args.payload).await?
        }
        Via::Redis => {
            let redis = target
                .redis
                .ok_or_else(|| std::io::Error::other("--via redis needs a Redis address"))?;
            Publisher::redis(redis, topics.clone(), args.payload)
                .await?
                .with_json(args.json_payload)
        }
        Via::Ws => {
            let tokens = rooms.tokens.clone();
            let addr = target.publish_addr.unwrap_or(target.addr);
            Publisher::websocket(addr, topics.clone(), tokens, args.payload).await?
        }
    };
    let subs_per_topic: Vec<u64> = (0..n_topics)
        .map(|t| (0..args.subscribers).filter(|i| i % n_topics == t).count() as u64)
        .collect();

    let mut steps = Vec::new();
    for &rate in &args.rates {
        let before = stats.per_conn_snapshot();
        let reorders0 = stats.reorders.load(Relaxed);
        let wire0 = stats.wire_bytes.load(Relaxed);
        stats.take_latency();
        let watch = ServerWatch::start(target.pid);
        let mirror_watch = target.mirror.map(|m| ServerWatch::start(m.pid));
        let redis_cpu0 = target.redis_pid.and_then(system::cpu_seconds);
        let step_start = Instant::now();
        let bar = step_bar(
            format!("fanout {rate} pub/s × {} subs", args.subscribers),
            args.step_secs,
        );
        let counts = publisher
            .run(rate, Duration::from_secs_f64(args.step_secs))
            .await?;
        let expected: u64 = counts
            .iter()
            .zip(&subs_per_topic)
            .map(|(c, s)| c * s)
            .sum::<u64>()
            * instances as u64;
        let delivered_now = || -> u64 {
            stats
                .per_conn
                .iter()
                .zip(&before)
                .map(|(c, b)| c.load(Relaxed) - b)
                .sum()
        };
        drain(
            delivered_now,
            expected,
            Duration::from_millis(1000),
            Duration::from_secs(10),
        )
        .await;
        bar.finish_and_clear();
        let (cpu, rss) = watch.finish();
        let mirror_cpu = mirror_watch.and_then(|w| w.finish().0);
        let redis_cpu = match (target.redis_pid.and_then(system::cpu_seconds), redis_cpu0) {
            (Some(b), Some(a)) => Some(b - a),
            _ => None,
        };
        let redis_cores = redis_cpu.map(|c| c / step_start.elapsed().as_secs_f64());
        let published: u64 = counts.iter().sum();
        let after = stats.per_conn_snapshot();
        let mut delivered = 0u64;
        let mut delivered_first = 0u64;
        let mut with_loss = 0usize;
        let mut worst = 1.0f64;
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            let got = a - b;
            let want = counts[(i % args.subscribers.max(1)) % n_topics];
            delivered += got;
            if i < args.subscribers {
                delivered_first += got;
            }
            if got < want {
                with_loss += 1;
            }
            if want > 0 {
                worst = worst.min(got as f64 / want as f64);
            }
        }
        let latency = Latency::from(&stats.take_latency());
        let fraction = if expected > 0 {
            delivered as f64 / expected as f64
        } else {
            1.0
        };
        let pass = fraction >= args.min_delivered && latency.p99_ms <= args.p99_bound_ms;
        let step = FanoutStep {
            publishes_per_s: rate,
            expected,
            delivered,
            delivered_fraction: fraction,
            deliveries_per_s: delivered as f64 / args.step_secs,
            subscribers_with_loss: with_loss,
            worst_subscriber_fraction: worst,
            reorders: stats.reorders.load(Relaxed) - reorders0,
            server_cpu_us_per_delivery: cpu
                .filter(|_| delivered_first > 0)
                .map(|c| c * 1e6 / delivered_first as f64),
            mirror_cpu_us_per_delivery: mirror_cpu
                .filter(|_| delivered > delivered_first)
                .map(|c| c * 1e6 / (delivered - delivered_first) as f64),
            redis_cpu_us_per_publish: redis_cpu
                .filter(|_| published > 0)
                .map(|c| c * 1e6 / published as f64),
            server_cpu_s: cpu,
            server_peak_rss_mib: rss,
            wire_bytes_per_delivery: (delivered > 0)
                .then(|| (stats.wire_bytes.load(Relaxed) - wire0) as f64 / delivered as f64),
            redis_cores,
            latency,
            pass,
        };
        eprintln!(
            "  {:>8} pub/s: {:>10.0} deliveries/s, {:.4} delivered, p50 {:.1} ms, p99 {:.1} ms, {:.0} wire B/delivery{}{}",
            rate,
            step.deliveries_per_s,
            step.delivered_fraction,
            step.latency.p50_ms,
            step.latency.p99_ms,
            step.wire_bytes_per_delivery.unwrap_or(0.0),
            step.server_cpu_us_per_delivery
                .map(|c| format!(", {c:.2} µs CPU/delivery"))
                .unwrap_or_default(),
            if pass { "" } else { "  FAIL" }
        );
        steps.push(step);
        if !pass && !args.no_stop {
            break;
        }
    }
    let max_sustainable_per_s = steps
        .iter()
        .filter(|s| s.pass)
        .map(|s| s.deliveries_per_s)
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
    Ok(FanoutResult {
        args: args.clone(),
        connect_failures,
        steps,
        max_sustainable_per_s,
    })
}

/// Arguments of `notifications`: per-user channels, one subscriber per topic, publishes spread
/// over all topics straight through Redis.
#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct NotificationsArgs {
    /// Topics, each with one subscriber.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) topics: usize,
    /// Publish rates to step through (all topics together, so deliveries/s too).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1000.0, 2000.0, 5000.0, 10000.0, 20000.0, 50000.0])]
    pub(crate) rates: Vec<f64>,
    /// Seconds each step publishes.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) step_secs: f64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 128)]
    pub(crate) payload: usize,
    /// A step passes with p99 latency at most this many milliseconds (and ≥ 99.9% delivered).
    #[arg(long, default_value_t = 100.0)]
    pub(crate) p99_bound_ms: f64,
}

impl NotificationsArgs {
    /// The fan-out sweep it is.
    pub(crate) fn fanout(&self) -> FanoutArgs {
        FanoutArgs {
            subscribers: self.topics,
            topics: self.topics,
            payload: self.payload,
            rates: self.rates.clone(),
            step_secs: self.step_secs,
            min_delivered: 0.999,
            p99_bound_ms: self.p99_bound_ms,
            no_stop: true,
            via: Via::Redis,
            connect_parallel: 256,
            deflate: false,
            json_payload: false,
        }
    }
}

/// Arguments of `chat`.
#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct ChatArgs {
    /// Connected clients; every one sends and receives.
    #[arg(long, default_value_t = 1000)]
    pub(crate) clients: usize,
    /// Rooms the clients are spread over.
    #[arg(long, default_value_t = 100)]
    pub(crate) topics: usize,
    /// Messages each client sends per second, per step.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1.0, 5.0, 10.0, 20.0])]
    pub(crate) rates: Vec<f64>,
    /// Seconds each step sends.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) step_secs: f64,
    /// Text size in bytes.
    #[arg(long, default_value_t = 64)]
    pub(crate) payload: usize,
    /// Handshakes in flight while connecting.
    #[arg(long, default_value_t = 256)]
    pub(crate) connect_parallel: usize,
    /// A step counts as handled with at least 99.9% delivered and p99 latency (send → every
    /// room member's read) at most this many milliseconds, as in `fanout`.
    #[arg(long, default_value_t = 100.0)]
    pub(crate) p99_bound_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChatStep {
    pub(crate) sent_per_s: f64,
    /// `SendMessage`s whose `NewMessage` reached the room (deliveries / room size).
    pub(crate) handled_per_s: f64,
    pub(crate) deliveries_per_s: f64,
    pub(crate) delivered_fraction: f64,
    pub(crate) send_blocked: u64,
    pub(crate) latency: Latency,
    pub(crate) server_cpu_s: Option<f64>,
    pub(crate) server_peak_rss_mib: Option<f64>,
    /// Cores this load generator and Redis kept busy over the step and its drain (CPU seconds
    /// over wall seconds): when pinned they share one core, which bounds what a step can show.
    pub(crate) client_cores: Option<f64>,
    pub(crate) redis_cores: Option<f64>,
}

impl ChatStep {
    /// Whether the step counts as handled: ≥ 99.9% delivered, p99 within `p99_bound_ms`.
    fn passed(&self, p99_bound_ms: f64) -> bool {
        self.delivered_fraction >= 0.999 && self.latency.p99_ms <= p99_bound_ms
    }

    /// Server CPU per handled message, µs (the CPU of the step and of its drain).
    pub(crate) fn cpu_us_per_handled(&self, step_secs: f64) -> Option<f64> {
        let handled = self.handled_per_s * step_secs;
        self.server_cpu_s
            .filter(|_| handled > 0.0)
            .map(|cpu| cpu * 1e6 / handled)
    }
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ChatResult {
    pub(crate) args: ChatArgs,
    pub(crate) connect_failures: u64,
    pub(crate) steps: Vec<ChatStep>,
    /// The highest handled rate of a step with ≥ 99.9% delivered and p99 within the bound.
    pub(crate) max_handled_per_s: f64,
    /// p99 (ms) of that step.
    pub(crate) p99_ms_at_max: Option<f64>,
    /// Server CPU (user + system) per handled message in that step, µs.
    pub(crate) cpu_us_per_handled_at_max: Option<f64>,
    /// The highest handled rate of a step with ≥ 99.9% delivered, whatever its latency.
    pub(crate) max_delivered_per_s: f64,
}

pub(crate) async fn chat(target: &Target, args: &ChatArgs) -> std::io::Result<ChatResult> {
    if target.proto != client::Proto::Rtk {
        return Err(std::io::Error::other(
            "chat speaks only the basic_chat contract",
        ));
    }
    let n_topics = args.topics.max(1).min(args.clients.max(1));
    let topics: Vec<String> = (0..n_topics).map(|t| topic_name(t, n_topics)).collect();
    let stats = Stats::new(args.clients);
    let paths: Vec<String> = (0..args.clients)
        .map(|i| {
            let t = i % n_topics;
            format!("/ws/{}?token={}", topics[t], token_for(t, n_topics))
        })
        .collect();
    let (mut writers, connect_failures) = client::open_many(
        target.addr,
        paths,
        args.connect_parallel,
        stats.clone(),
        SeqCheck::None,
    )
    .await;
    let room_size: Vec<u64> = (0..n_topics)
        .map(|t| {
            (0..args.clients)
                .filter(|i| i % n_topics == t && writers[*i].is_some())
                .count() as u64
        })
        .collect();
    let mut steps = Vec::new();
    let mut seq = 0u64;
    for &per_client in &args.rates {
        let rate = per_client * args.clients as f64;
        let frames0 = stats.frames.load(Relaxed);
        stats.take_latency();
        let watch = ServerWatch::start(target.pid);
        let client_pid = Some(std::process::id());
        let cpu_of = |pid: Option<u32>| pid.and_then(system::cpu_seconds);
        let (client_cpu0, redis_cpu0) = (cpu_of(client_pid), cpu_of(target.redis_pid));
        let others_from = Instant::now();
        let bar = step_bar(
            format!("chat {per_client}/s × {} clients", args.clients),
            args.step_secs,
        );
        let duration = Duration::from_secs_f64(args.step_secs);
        let start = Instant::now();
        let mut sent = 0u64;
        let mut expected = 0u64;
        let mut blocked = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let elapsed = start.elapsed().min(duration);
            let target_n = (rate * elapsed.as_secs_f64()) as u64;
            while sent < target_n {
                let i = (sent % args.clients as u64) as usize;
                sent += 1;
                let Some(w) = writers[i].as_mut() else {
                    continue;
                };
                let t = i % n_topics;
                seq += 1;
                let mark = client::marker(seq, client::now_micros());
                let pad = args.payload.saturating_sub(mark.len());
                let text: String = mark + &"x".repeat(pad);
                let msg = format!(
                    r#"{{"SendMessage":{{"room":"{}","text":"{text}"}}}}"#,
                    topics[t]
                );
                let frame = client::client_text_frame(msg.as_bytes());
                match w.try_write(&frame) {
                    Ok(n) if n == frame.len() => expected += room_size[t],
                    Ok(_) => {
                        // A torn frame would corrupt the stream: finish it.
                        blocked += 1;
                        let _ = tokio::io::AsyncWriteExt::write_all(w, &frame[..]).await;
                    }
                    Err(_) => blocked += 1,
                }
            }
            if start.elapsed() >= duration {
                break;
            }
        }
        let delivered_now = || stats.frames.load(Relaxed) - frames0;
        drain(
            delivered_now,
            expected,
            Duration::from_millis(1000),
            Duration::from_secs(10),
        )
        .await;
        bar.finish_and_clear();
        let (cpu, rss) = watch.finish();
        let wall = others_from.elapsed().as_secs_f64();
        let cores = |pid: Option<u32>, before: Option<f64>| Some((cpu_of(pid)? - before?) / wall);
        let client_cores = cores(client_pid, client_cpu0);
        let redis_cores = cores(target.redis_pid, redis_cpu0);
        let delivered = stats.frames.load(Relaxed) - frames0;
        let avg_room = room_size.iter().sum::<u64>() as f64 / n_topics as f64;
        let step = ChatStep {
            sent_per_s: sent as f64 / args.step_secs,
            handled_per_s: delivered as f64 / avg_room.max(1.0) / args.step_secs,
            deliveries_per_s: delivered as f64 / args.step_secs,
            delivered_fraction: if expected > 0 {
                delivered as f64 / expected as f64
            } else {
                1.0
            },
            send_blocked: blocked,
            latency: Latency::from(&stats.take_latency()),
            server_cpu_s: cpu,
            server_peak_rss_mib: rss,
            client_cores,
            redis_cores,
        };
        let pass = step.passed(args.p99_bound_ms);
        eprintln!(
            "  {:>6.0} msg/s sent: {:>9.0} handled/s, {:>10.0} deliveries/s, {:.4} delivered, p99 {:.1} ms{}{}{}{}",
            step.sent_per_s,
            step.handled_per_s,
            step.deliveries_per_s,
            step.delivered_fraction,
            step.latency.p99_ms,
            step.cpu_us_per_handled(args.step_secs)
                .map(|c| format!(", {c:.1} µs server CPU/handled"))
                .unwrap_or_default(),
            step.client_cores
                .map(|c| format!(", client {c:.2} core"))
                .unwrap_or_default(),
            step.redis_cores
                .map(|c| format!(", Redis {c:.2} core"))
                .unwrap_or_default(),
            if pass { "" } else { "  FAIL" }
        );
        steps.push(step);
    }
    let delivered = |s: &&ChatStep| s.delivered_fraction >= 0.999;
    let best = steps
        .iter()
        .filter(|s| s.passed(args.p99_bound_ms))
        .max_by(|a, b| a.handled_per_s.total_cmp(&b.handled_per_s));
    let max_delivered_per_s = steps
        .iter()
        .filter(delivered)
        .map(|s| s.handled_per_s)
        .fold(0.0, f64::max);
    Ok(ChatResult {
        args: args.clone(),
        connect_failures,
        max_handled_per_s: best.map_or(0.0, |s| s.handled_per_s),
        p99_ms_at_max: best.map(|s| s.latency.p99_ms),
        cpu_us_per_handled_at_max: best.and_then(|s| s.cpu_us_per_handled(args.step_secs)),
        max_delivered_per_s,
        steps,
    })
}

/// Arguments of `connect`.
#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct ConnectArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) connections: usize,
    /// Handshakes in flight.
    #[arg(long, default_value_t = 512)]
    pub(crate) parallel: usize,
    /// Seconds to hold the connections idle before reading the server's RSS.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) hold_secs: f64,
    /// The connections offer permessage-deflate.
    #[arg(long)]
    pub(crate) deflate: bool,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ConnectResult {
    pub(crate) args: ConnectArgs,
    pub(crate) opened: u64,
    pub(crate) failures: u64,
    pub(crate) seconds: f64,
    pub(crate) handshakes_per_s: f64,
    pub(crate) server_rss_before_kib: Option<u64>,
    pub(crate) server_rss_after_kib: Option<u64>,
    pub(crate) server_kib_per_connection: Option<f64>,
}

pub(crate) async fn connect(target: &Target, args: &ConnectArgs) -> std::io::Result<ConnectResult> {
    let before = target.pid.and_then(system::rss_kib).map(|r| r.0);
    let stats = Stats::with_deflate(args.connections, args.deflate);
    let paths = (0..args.connections)
        .map(|i| {
            let t = i % 2;
            let topic = ["general", "random"][t];
            format!("/ws/{topic}?token={}", token_for(0, 1))
        })
        .collect();
    let bar = step_bar(format!("connect {}", args.connections), 1.0);
    let start = Instant::now();
    let (writers, failures) =
        Conns::open(target, paths, args.parallel, stats, SeqCheck::None).await?;
    let seconds = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    tokio::time::sleep(Duration::from_secs_f64(args.hold_secs)).await;
    let after = target.pid.and_then(system::rss_kib).map(|r| r.0);
    let opened = writers.opened();
    let per_conn = match (before, after) {
        (Some(b), Some(a)) if opened > 0 => Some((a as f64 - b as f64) / opened as f64),
        _ => None,
    };
    drop(writers);
    eprintln!(
        "  {opened} connections in {seconds:.3} s ({:.0}/s), {failures} failures{}",
        opened as f64 / seconds,
        per_conn
            .map(|k| format!(", {k:.2} KiB server RSS per connection"))
            .unwrap_or_default()
    );
    Ok(ConnectResult {
        args: args.clone(),
        opened,
        failures,
        seconds,
        handshakes_per_s: opened as f64 / seconds,
        server_rss_before_kib: before,
        server_rss_after_kib: after,
        server_kib_per_connection: per_conn,
    })
}

/// Arguments of `slow`.
#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct SlowArgs {
    /// Fast subscribers.
    #[arg(long, default_value_t = 200)]
    pub(crate) fast: usize,
    /// Publishes per second.
    #[arg(long, default_value_t = 500.0)]
    pub(crate) rate: f64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub(crate) payload: usize,
    /// Seconds of each phase (without, then with the stalled client).
    #[arg(long, default_value_t = 10.0)]
    pub(crate) secs: f64,
    /// How messages are published.
    #[arg(long, value_enum, default_value_t = Via::Redis)]
    pub(crate) via: Via,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct SlowResult {
    pub(crate) args: SlowArgs,
    pub(crate) without_stalled: FanoutStep,
    pub(crate) with_stalled: FanoutStep,
    /// Server RSS (MiB) sampled every second of the stalled phase.
    pub(crate) rss_timeline_mib: Vec<f64>,
}

pub(crate) async fn slow(target: &Target, args: &SlowArgs) -> std::io::Result<SlowResult> {
    if target.proto != client::Proto::Rtk {
        return Err(std::io::Error::other(
            "slow speaks only the basic_chat contract",
        ));
    }
    let fan = FanoutArgs {
        subscribers: args.fast,
        topics: 1,
        payload: args.payload,
        rates: vec![args.rate],
        step_secs: args.secs,
        min_delivered: 0.999,
        p99_bound_ms: 100.0,
        no_stop: true,
        via: args.via,
        connect_parallel: 256,
        deflate: false,
        json_payload: false,
    };
    eprintln!("phase 1: {} fast subscribers", args.fast);
    let without = fanout(target, &fan).await?;
    eprintln!("phase 2: the same plus one client that never reads");
    // The stalled client: upgraded, then never read again.
    let path = format!("/ws/general?token={}", token_for(0, 1));
    let (_, stalled) = client::handshake(target.addr, &path).await?;
    let stalled = stalled.map(|(s, _)| s);
    let pid = target.pid;
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = samples.clone();
    let timeline = tokio::spawn(async move {
        loop {
            if let Some((rss, _)) = pid.and_then(system::rss_kib) {
                sink.lock().unwrap().push(rss as f64 / 1024.0);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let with = fanout(target, &fan).await?;
    timeline.abort();
    let rss_timeline_mib = samples.lock().unwrap().clone();
    drop(stalled);
    Ok(SlowResult {
        args: args.clone(),
        without_stalled: without.steps[0].clone(),
        with_stalled: with.steps[0].clone(),
        rss_timeline_mib,
    })
}
