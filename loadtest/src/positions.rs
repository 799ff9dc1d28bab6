//! `positions`: what a position costs, a room with history against one without, in one run.
//!
//! `basic_chat` keeps history for `general` (each publication goes through Redis's position
//! script: offset, stream append, trim, TTLs, PUBLISH) and none for `private-user-<id>` (a plain
//! PUBLISH). Both rooms take the same `SendMessage` through the server, so the two differ only
//! by the position. Each measurement gets a fresh server; positioned and plain alternate, rep
//! after rep.
//!
//! - **Fan-out**: S `rtk1` subscribers of the room, publishes at a fixed rate through the
//!   server: server CPU per delivery, latency, delivered fraction.
//! - **Publish path**: K `rtk1` senders that leave the room after joining it (so that they
//!   receive nothing) send `SendMessage` at stepped rates, one subscriber receives: the highest
//!   rate with ≥ 99.9% delivered and p99 within the bound, server CPU per publish, Redis's cores.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;

use crate::client::{self, SeqCheck, Stats};
use crate::scenario::{self, FanoutArgs, Rooms, Target, Via};
use crate::system::{self, StartOpts, System};

/// Arguments of `positions`.
#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct PositionsArgs {
    /// Subscribers of the room in the fan-out part.
    #[arg(long, default_value_t = 1000)]
    pub(crate) subscribers: usize,
    /// Publishes per second in the fan-out part.
    #[arg(long, default_value_t = 200.0)]
    pub(crate) rate: f64,
    /// Seconds the fan-out part publishes.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) secs: f64,
    /// Payload (message text) size in bytes.
    #[arg(long, default_value_t = 128)]
    pub(crate) payload: usize,
    /// Senders in the publish-path part (each may send 1 000 messages/s, the example's limit).
    #[arg(long, default_value_t = 64)]
    pub(crate) senders: usize,
    /// Publish rates the publish-path part steps through (all senders together).
    #[arg(long, value_delimiter = ',', default_values_t = vec![5000.0, 10000.0, 20000.0, 30000.0, 40000.0, 50000.0])]
    pub(crate) publish_rates: Vec<f64>,
    /// Seconds of each publish-path step.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) step_secs: f64,
    /// A publish-path step passes with ≥ 99.9% delivered and p99 at most this many ms.
    #[arg(long, default_value_t = 100.0)]
    pub(crate) p99_bound_ms: f64,
    /// Skip the publish-path part.
    #[arg(long)]
    pub(crate) no_publish_path: bool,
    /// Repetitions (each runs positioned, then plain).
    #[arg(long, default_value_t = 3)]
    pub(crate) reps: usize,
    /// Pin each server to CPU 0 and this harness to CPU 1 (Redis stays unpinned).
    #[arg(long)]
    pub(crate) pin: bool,
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

/// Which room a measurement uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Room {
    /// `general`: history, so a position per publication.
    Positioned,
    /// `private-user-<id>`: no history.
    Plain,
}

impl Room {
    fn name(self) -> &'static str {
        match self {
            Self::Positioned => "positioned (`general`)",
            Self::Plain => "plain (`private-user-…`)",
        }
    }

    fn rooms(self) -> Rooms {
        let (topic, token) = match self {
            Self::Positioned => ("general".to_string(), scenario::token_for(0, 1)),
            Self::Plain => (scenario::topic_name(0, 2), scenario::token_for(0, 2)),
        };
        Rooms {
            topics: vec![topic],
            tokens: vec![token],
            query: "&proto=rtk1".into(),
        }
    }
}

/// One step of the publish-path part.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PublishStep {
    pub(crate) offered_per_s: f64,
    pub(crate) sent: u64,
    pub(crate) delivered: u64,
    pub(crate) delivered_fraction: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) server_cpu_us_per_publish: Option<f64>,
    pub(crate) redis_cores: Option<f64>,
    pub(crate) pass: bool,
}

/// One measurement of one room.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PositionsRun {
    pub(crate) room: Room,
    pub(crate) rep: usize,
    pub(crate) fanout: Option<scenario::FanoutStep>,
    pub(crate) publish_steps: Vec<PublishStep>,
    /// The highest passing publish-path step.
    pub(crate) max_publishes_per_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct PositionsResult {
    pub(crate) args: PositionsArgs,
    pub(crate) runs: Vec<PositionsRun>,
}

/// A sender: joins the room (the example allows sending only to the connection's own room),
/// leaves it again so that it receives nothing, and drains what it is sent (its `subscribed`,
/// the acknowledgements).
async fn sender(addr: SocketAddr, topic: &str, token: &str) -> std::io::Result<OwnedWriteHalf> {
    let path = format!("/ws/{topic}?token={token}&proto=rtk1");
    let (status, conn) = client::handshake(addr, &path).await?;
    let Some((stream, _)) = conn else {
        return Err(std::io::Error::other(format!(
            "sender upgrade to {topic} refused: {status}"
        )));
    };
    let (mut r, mut w) = stream.into_split();
    let leave = format!(r#"{{"type":"unsubscribe","topic":"{topic}"}}"#);
    w.write_all(&client::client_text_frame(leave.as_bytes()))
        .await?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    Ok(w)
}

/// The publish-path part on one server.
async fn publish_path(
    target: &Target,
    args: &PositionsArgs,
    room: Room,
) -> std::io::Result<Vec<PublishStep>> {
    let rooms = room.rooms();
    let (topic, token) = (&rooms.topics[0], &rooms.tokens[0]);
    let stats = Stats::new(1);
    let path = format!("/ws/{topic}?token={token}{}", rooms.query);
    let (receiver, failures) =
        client::open_many(target.addr, vec![path], 1, stats.clone(), SeqCheck::None).await;
    if failures > 0 {
        return Err(std::io::Error::other("the receiver could not connect"));
    }
    let mut senders = Vec::with_capacity(args.senders);
    for _ in 0..args.senders.max(1) {
        senders.push(sender(target.addr, topic, token).await?);
    }
    // The unsubscribes and the receiver's subscription settle.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut steps = Vec::new();
    let mut seq = 0u64;
    for &rate in &args.publish_rates {
        let got0 = stats.per_conn[0].load(Relaxed);
        stats.take_latency();
        let cpu_of = |pid: Option<u32>| pid.and_then(system::cpu_seconds);
        let (server0, redis0) = (cpu_of(target.pid), cpu_of(target.redis_pid));
        let from = Instant::now();
        let duration = Duration::from_secs_f64(args.step_secs);
        let mut sent = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batches = vec![Vec::new(); senders.len()];
        loop {
            tick.tick().await;
            let elapsed = from.elapsed().min(duration);
            let due = (rate * elapsed.as_secs_f64()) as u64;
            while sent < due {
                let i = (sent % senders.len() as u64) as usize;
                sent += 1;
                seq += 1;
                let mark = client::marker(seq, client::now_micros());
                let pad = args.payload.saturating_sub(mark.len());
                let text = mark + &"x".repeat(pad);
                let msg = format!(r#"{{"SendMessage":{{"room":"{topic}","text":"{text}"}}}}"#);
                batches[i].extend_from_slice(&client::client_text_frame(msg.as_bytes()));
            }
            for (w, batch) in senders.iter_mut().zip(batches.iter_mut()) {
                if !batch.is_empty() {
                    w.write_all(batch).await?;
                    batch.clear();
                }
            }
            if from.elapsed() >= duration {
                break;
            }
        }
        // Drain: until everything arrived, or nothing did for a second (at most 10 s).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = (stats.per_conn[0].load(Relaxed), Instant::now());
        while Instant::now() < deadline {
            let got = stats.per_conn[0].load(Relaxed) - got0;
            if got >= sent {
                break;
            }
            if got + got0 != last.0 {
                last = (got + got0, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let wall = from.elapsed().as_secs_f64();
        let delivered = stats.per_conn[0].load(Relaxed) - got0;
        let server_cpu = cpu_of(target.pid).zip(server0).map(|(b, a)| b - a);
        let redis_cores = cpu_of(target.redis_pid)
            .zip(redis0)
            .map(|(b, a)| (b - a) / wall);
        let h = stats.take_latency();
        let fraction = if sent > 0 {
            delivered as f64 / sent as f64
        } else {
            1.0
        };
        let p99 = h.value_at_quantile(0.99) as f64 / 1000.0;
        let step = PublishStep {
            offered_per_s: rate,
            sent,
            delivered,
            delivered_fraction: fraction,
            p50_ms: h.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: p99,
            server_cpu_us_per_publish: server_cpu
                .filter(|_| delivered > 0)
                .map(|c| c * 1e6 / delivered as f64),
            redis_cores,
            pass: fraction >= 0.999 && p99 <= args.p99_bound_ms,
        };
        eprintln!(
            "  {:>7} publishes/s: {:.4} delivered, p50 {:.1} ms, p99 {:.1} ms{}{}{}",
            rate,
            step.delivered_fraction,
            step.p50_ms,
            step.p99_ms,
            step.server_cpu_us_per_publish
                .map(|c| format!(", {c:.2} µs server CPU/publish"))
                .unwrap_or_default(),
            step.redis_cores
                .map(|c| format!(", Redis {c:.2} core"))
                .unwrap_or_default(),
            if step.pass { "" } else { "  FAIL" }
        );
        // A failed step is noted and the sweep goes on (p99 near the bound moves from run to
        // run), unless the path is saturated: then higher rates only queue more.
        let saturated = step.delivered_fraction < 0.99;
        steps.push(step);
        if saturated {
            break;
        }
    }
    drop(receiver);
    Ok(steps)
}

/// One measurement: a fresh server, the fan-out part, then the publish-path part.
async fn measure(
    args: &PositionsArgs,
    room: Room,
    rep: usize,
    target_dir: &Path,
    opts: &StartOpts,
    redis: &system::Proc,
) -> Result<PositionsRun, String> {
    let io = |e: std::io::Error| e.to_string();
    let mut server = system::start_system(System::Ours, target_dir, opts).map_err(io)?;
    let target = Target {
        addr: server.addr,
        pid: Some(server.pid()),
        redis: Some(redis.addr),
        redis_pid: Some(redis.pid()),
        proto: client::Proto::Rtk,
        publish_addr: None,
        mirror: None,
    };
    let fan = FanoutArgs {
        subscribers: args.subscribers,
        topics: 1,
        payload: args.payload,
        rates: vec![args.rate],
        step_secs: args.secs,
        min_delivered: 0.999,
        p99_bound_ms: args.p99_bound_ms,
        no_stop: true,
        via: Via::Ws,
        connect_parallel: 256,
        deflate: false,
        json_payload: false,
    };
    let result = async {
        let fanout = scenario::fanout_in(&target, &fan, &room.rooms())
            .await
            .map_err(io)?
            .steps
            .into_iter()
            .next();
        let publish_steps = if args.no_publish_path {
            Vec::new()
        } else {
            publish_path(&target, args, room).await.map_err(io)?
        };
        let max_publishes_per_s = publish_steps
            .iter()
            .filter(|s| s.pass)
            .map(|s| s.offered_per_s)
            .reduce(f64::max);
        Ok(PositionsRun {
            room,
            rep,
            fanout,
            publish_steps,
            max_publishes_per_s,
        })
    }
    .await;
    server.stop();
    result
}

pub(crate) async fn positions(
    root: &Path,
    args: &PositionsArgs,
) -> Result<PositionsResult, String> {
    if args.secs > 60.0 || args.step_secs > 30.0 || args.publish_rates.len() > 20 {
        return Err(
            "keep --secs ≤ 60, --step-secs ≤ 30 and at most 20 rates: the run is bounded".into(),
        );
    }
    if !args.no_build {
        system::build_ours(root).map_err(|e| e.to_string())?;
    }
    let target_dir = system::release_dir(root);
    if args.pin {
        let me = std::process::id().to_string();
        let _ = std::process::Command::new("taskset")
            .args(["-a", "-cp", "1", &me])
            .stdout(std::process::Stdio::null())
            .status();
    }
    let redis = system::start_redis().map_err(|e| e.to_string())?;
    let opts = StartOpts {
        redis_url: Some(format!("redis://{}/", redis.addr)),
        shards: args.shards,
        cpus: args.pin.then(|| "0".to_string()),
        env: system::env_pairs(&args.server_env),
        binary: None,
    };
    let mut runs = Vec::new();
    for rep in 0..args.reps.max(1) {
        for room in [Room::Positioned, Room::Plain] {
            eprintln!("== {} (rep {}/{})", room.name(), rep + 1, args.reps.max(1));
            let run = measure(args, room, rep, &target_dir, &opts, &redis).await?;
            runs.push(run);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    Ok(PositionsResult {
        args: args.clone(),
        runs,
    })
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.filter(|v| v.is_finite())
        .map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

/// The result as Markdown: medians per room, with positioned over plain.
pub(crate) fn report(r: &PositionsResult) -> String {
    let a = &r.args;
    let cmdline: Vec<String> = std::env::args().skip(1).collect();
    let med = |room: Room, f: &dyn Fn(&PositionsRun) -> Option<f64>| {
        crate::report::median(
            r.runs
                .iter()
                .filter(|x| x.room == room)
                .filter_map(f)
                .collect(),
        )
    };
    let ratio = |p: Option<f64>, q: Option<f64>| match (p, q) {
        (Some(p), Some(q)) if q > 0.0 => format!("{:.2}", p / q),
        _ => "–".into(),
    };
    let reps = r.args.reps.max(1);
    let mut s = format!(
        "Command: `cargo run --release -p loadtest -- {}`\n\n\
         Fan-out: {} `rtk1` subscribers of one room, {} publishes/s of {} B sent through the server (`SendMessage`) for {} s, through Redis; a fresh server per measurement, positioned and plain alternating; median of {reps} rep(s).\n\n\
         | room | deliveries/s | delivered | p50 ms | p99 ms | server CPU µs/delivery | × plain | Redis cores |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
        cmdline.join(" "),
        a.subscribers,
        a.rate,
        a.payload,
        a.secs,
    );
    let fan = |room: Room, f: &dyn Fn(&scenario::FanoutStep) -> Option<f64>| {
        med(room, &|x| x.fanout.as_ref().and_then(f))
    };
    let plain_cpu = fan(Room::Plain, &|st| st.server_cpu_us_per_delivery);
    for room in [Room::Positioned, Room::Plain] {
        let cpu = fan(room, &|st| st.server_cpu_us_per_delivery);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            room.name(),
            opt(fan(room, &|st| Some(st.deliveries_per_s)), 0),
            opt(fan(room, &|st| Some(st.delivered_fraction)), 4),
            opt(fan(room, &|st| Some(st.latency.p50_ms)), 2),
            opt(fan(room, &|st| Some(st.latency.p99_ms)), 2),
            opt(cpu, 3),
            ratio(cpu, plain_cpu),
            opt(fan(room, &|st| st.redis_cores), 2),
        ));
    }
    if a.no_publish_path {
        return s;
    }
    s.push_str(&format!(
        "\nPublish path: {} senders that left the room, one subscriber; steps of {} s at {:?} publishes/s; a step passes with ≥ 99.9% delivered and p99 ≤ {} ms; median of {reps} rep(s).\n\n\
         | room | max publishes/s | × plain | server CPU µs/publish there | Redis cores there |\n|---|---:|---:|---:|---:|\n",
        a.senders, a.step_secs, a.publish_rates, a.p99_bound_ms
    ));
    let best = |x: &PositionsRun| -> Option<PublishStep> {
        x.publish_steps
            .iter()
            .filter(|s| s.pass)
            .max_by(|p, q| p.offered_per_s.total_cmp(&q.offered_per_s))
            .cloned()
    };
    let plain_max = med(Room::Plain, &|x| x.max_publishes_per_s);
    for room in [Room::Positioned, Room::Plain] {
        let max = med(room, &|x| x.max_publishes_per_s);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            room.name(),
            opt(max, 0),
            ratio(max, plain_max),
            opt(
                med(room, &|x| best(x).and_then(|s| s.server_cpu_us_per_publish)),
                2
            ),
            opt(med(room, &|x| best(x).and_then(|s| s.redis_cores)), 2),
        ));
    }
    s.push_str("\nEach publish-path step, medians over reps (steps a run did not reach are left out):\n\n| publishes/s | room | delivered | p99 ms | server CPU µs/publish | Redis cores | reps |\n|---:|---|---:|---:|---:|---:|---:|\n");
    for &rate in &a.publish_rates {
        for room in [Room::Positioned, Room::Plain] {
            let at = |x: &PositionsRun| {
                x.publish_steps
                    .iter()
                    .find(|s| s.offered_per_s == rate)
                    .cloned()
            };
            let n = r
                .runs
                .iter()
                .filter(|x| x.room == room && at(x).is_some())
                .count();
            if n == 0 {
                continue;
            }
            s.push_str(&format!(
                "| {rate} | {} | {} | {} | {} | {} | {n} |\n",
                room.name(),
                opt(med(room, &|x| at(x).map(|s| s.delivered_fraction)), 4),
                opt(med(room, &|x| at(x).map(|s| s.p99_ms)), 1),
                opt(
                    med(room, &|x| at(x).and_then(|s| s.server_cpu_us_per_publish)),
                    2
                ),
                opt(med(room, &|x| at(x).and_then(|s| s.redis_cores)), 2),
            ));
        }
    }
    s
}
