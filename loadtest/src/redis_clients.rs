//! `redis-clients`: the runtime's own Redis connections against fred and redis-rs, in one
//! interleaved run against one private `redis-server`.
//!
//! Each measurement runs in a child process of its own (`redis-clients-worker`), so that the
//! CPU time it reports (user + system, its threads' `schedstat`) is that client's alone, with
//! the same tokio runtime for every client (`--client-threads` workers, 1 by default):
//!
//! - **publish**: one client, one connection, publishing with up to `--window` publishes in
//!   flight (each waits for Redis's answer): at a fixed offered rate (CPU per publish) and
//!   with no pacing (publishes/s at saturation).
//! - **subscribe**: one client subscribed to N topics; another process (`--role load`, redis-rs
//!   pipelines) publishes a fixed number of messages spread over the topics, at a fixed rate
//!   (CPU per message) and as fast as it can (receive rate at saturation). The subscriber
//!   counts what arrives; the rate is counted from its first to its last message.
//!
//! `ours` is the runtime's publisher through [`WebsocketService::publish_raw`] and its
//! subscriber connection through `bench_api::RedisPubSub`: the subscriber the runtime runs,
//! feeding a channel of the dispatcher's capacity that the worker drains, with no shard or
//! WebSocket behind it (fred and redis-rs hand their messages to a channel too).

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum_realtime_kit::bench_api::RedisPubSub;
use axum_realtime_kit::prelude::*;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};

use crate::system;

/// The clients compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Client {
    /// The runtime's own RESP2 connections.
    Ours,
    /// fred, one client (auto-pipelined; messages through its broadcast channel).
    Fred,
    /// redis-rs: a multiplexed connection to publish, an async `PubSub` to subscribe.
    RedisRs,
}

impl Client {
    fn name(self) -> &'static str {
        match self {
            Self::Ours => "ours",
            Self::Fred => "fred",
            Self::RedisRs => "redis-rs",
        }
    }
}

/// Arguments of `redis-clients`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct RedisClientsArgs {
    /// Clients, in the order they are interleaved.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = vec![Client::Ours, Client::Fred, Client::RedisRs])]
    clients: Vec<Client>,
    /// Repetitions of each measurement for each client.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Offered rate of the fixed-rate measurements (publishes/s, and messages/s to subscribers).
    #[arg(long, default_value_t = 30_000)]
    rate: u64,
    /// Seconds each publish measurement lasts.
    #[arg(long, default_value_t = 3)]
    secs: u64,
    /// Publishes in flight at most on the publishing connection.
    #[arg(long, default_value_t = 1024)]
    window: usize,
    /// Topic counts the subscriber measurements run with.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1_000, 100_000])]
    topics: Vec<usize>,
    /// Messages published to the subscriber at saturation.
    #[arg(long, default_value_t = 400_000)]
    burst: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    payload: usize,
}

/// Arguments of one worker process.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WorkerArgs {
    #[arg(long, value_enum)]
    role: Role,
    #[arg(long, value_enum, default_value_t = Client::Ours)]
    client: Client,
    #[arg(long)]
    redis: SocketAddr,
    /// Offered rate; none: as fast as the window allows.
    #[arg(long)]
    rate: Option<u64>,
    #[arg(long, default_value_t = 3)]
    secs: u64,
    #[arg(long, default_value_t = 1024)]
    window: usize,
    #[arg(long, default_value_t = 1000)]
    topics: usize,
    /// Messages to publish (`load`) or to wait for (`subscribe`).
    #[arg(long, default_value_t = 0)]
    count: u64,
    #[arg(long, default_value_t = 100)]
    payload: usize,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Role {
    /// Publish through the client.
    Publish,
    /// Subscribe through the client and count.
    Subscribe,
    /// Publish `count` messages over `topics` topics with redis-rs pipelines (the load for
    /// `subscribe`).
    Load,
}

/// What a worker measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct WorkerOut {
    /// Operations done (publishes answered, messages received).
    ops: u64,
    /// Seconds they took.
    secs: f64,
    /// CPU seconds (user + system) of the worker process meanwhile.
    cpu: f64,
    /// Failed publishes, or messages a subscriber did not get.
    lost: u64,
}

impl WorkerOut {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-9)
    }
    fn cpu_us_per_op(&self) -> f64 {
        self.cpu * 1e6 / (self.ops.max(1) as f64)
    }
}

/// CPU seconds (user + system) this process has used: the sum of its threads' run time from
/// `/proc/self/task/*/schedstat`, in nanoseconds (`/proc/self/stat` counts 10 ms ticks, too
/// coarse for a few seconds at 30 000 operations/s).
fn cpu_now() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return system::cpu_seconds(std::process::id()).unwrap_or(0.0);
    };
    let ns: u64 = tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}

/// redis-rs's connection settings here: no response timeout (its default, 500 ms, fails
/// requests queued behind a saturated pipeline or a 100 000-channel SUBSCRIBE on a busy machine),
/// 10 s to connect.
fn rs_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_response_timeout(None)
        .set_connection_timeout(Some(Duration::from_secs(10)))
}

fn topic(i: usize) -> String {
    format!("rc:{i}")
}

/// Runs one worker and prints its [`WorkerOut`] as one JSON line.
pub(crate) async fn worker(args: &WorkerArgs) -> Result<(String, String), String> {
    let out = match args.role {
        Role::Publish => publish(args).await,
        Role::Subscribe => subscribe(args).await,
        Role::Load => load(args).await,
    }
    .map_err(|e| format!("{:?} {}: {e}", args.role, args.client.name()))?;
    let line = serde_json::to_string(&out).map_err(|e| e.to_string())?;
    Ok((line.clone(), line))
}

/// A publisher of one client.
enum Publisher {
    Ours(Arc<WebsocketService<Quiet>>),
    Fred(fred::clients::Client),
    RedisRs(redis::aio::MultiplexedConnection),
}

impl Publisher {
    async fn connect(client: Client, redis: SocketAddr) -> Result<Self, String> {
        let url = format!("redis://{redis}/");
        Ok(match client {
            Client::Ours => {
                let service = WebsocketService::builder(Quiet, Arc::new(()))
                    .redis_url(Some(url))
                    .shards(1)
                    .try_build()
                    .map_err(|e| e.to_string())?;
                let deadline = Instant::now() + Duration::from_secs(10);
                while !service.is_ready() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Self::Ours(service)
            }
            Client::Fred => {
                use fred::prelude::*;
                let config = Config::from_url(&url).map_err(|e| e.to_string())?;
                let c = Builder::from_config(config)
                    .build()
                    .map_err(|e| e.to_string())?;
                c.init().await.map_err(|e| e.to_string())?;
                Self::Fred(c)
            }
            Client::RedisRs => {
                let c = redis::Client::open(url).map_err(|e| e.to_string())?;
                Self::RedisRs(
                    c.get_multiplexed_async_connection_with_config(&rs_config())
                        .await
                        .map_err(|e| e.to_string())?,
                )
            }
        })
    }

    async fn publish(&self, topic: String, payload: Bytes) -> bool {
        match self {
            Self::Ours(s) => s.publish_raw(&topic, payload).await.is_ok(),
            Self::Fred(c) => {
                use fred::prelude::*;
                c.publish::<i64, _, _>(topic, payload).await.is_ok()
            }
            Self::RedisRs(c) => {
                use redis::AsyncCommands;
                let mut c = c.clone();
                c.publish::<_, _, i64>(topic, payload.as_ref())
                    .await
                    .is_ok()
            }
        }
    }
}

/// Publishes for `secs` with at most `window` in flight, paced at `rate` if given.
async fn publish(args: &WorkerArgs) -> Result<WorkerOut, String> {
    let p = Publisher::connect(args.client, args.redis).await?;
    let payload = Bytes::from(vec![b'x'; args.payload]);
    // Warm-up: the connection is up and the first allocations are made.
    for i in 0..1000 {
        p.publish(topic(i % args.topics.max(1)), payload.clone())
            .await;
    }
    let (cpu0, t0) = (cpu_now(), Instant::now());
    let end = t0 + Duration::from_secs(args.secs);
    let mut inflight = FuturesUnordered::new();
    let (mut issued, mut ok, mut failed) = (0u64, 0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let allowed = match args.rate {
            Some(r) => ((now - t0).as_secs_f64() * r as f64) as u64 + 1,
            None => u64::MAX,
        };
        while issued < allowed && inflight.len() < args.window {
            let t = topic(issued as usize % args.topics.max(1));
            inflight.push(p.publish(t, payload.clone()));
            issued += 1;
        }
        tokio::select! {
            Some(done) = inflight.next() => if done { ok += 1 } else { failed += 1 },
            _ = tick.tick(), if args.rate.is_some() => {}
        }
    }
    while let Some(done) = inflight.next().await {
        if done {
            ok += 1;
        } else {
            failed += 1;
        }
    }
    Ok(WorkerOut {
        ops: ok,
        secs: t0.elapsed().as_secs_f64(),
        cpu: cpu_now() - cpu0,
        lost: failed,
    })
}

/// Subscribes `topics` topics, says `READY` on stdout once Redis confirmed them all, then counts
/// messages until `count` arrived or nothing came for 3 s.
async fn subscribe(args: &WorkerArgs) -> Result<WorkerOut, String> {
    let url = format!("redis://{}/", args.redis);
    let topics: Vec<String> = (0..args.topics).map(topic).collect();
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    // Each client's receive loop adds what it got to `count` (a relaxed add per message or per
    // batch); this task reads it every millisecond.
    let _keep: Box<dyn std::any::Any + Send> = match args.client {
        Client::Ours => {
            let mut sub = RedisPubSub::start(&url)?;
            for t in &topics {
                sub.subscribe(t);
            }
            tokio::spawn(async move {
                loop {
                    let n = sub.recv_many(512).await;
                    if n == 0 {
                        break;
                    }
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
            Box::new(())
        }
        Client::Fred => {
            use fred::prelude::*;
            let config = Config::from_url(&url).map_err(|e| e.to_string())?;
            let c = Builder::from_config(config)
                .with_performance_config(|p| p.broadcast_channel_capacity = 8192)
                .build()
                .map_err(|e| e.to_string())?;
            c.init().await.map_err(|e| e.to_string())?;
            let mut msgs = c.message_rx();
            c.subscribe(topics.clone())
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                loop {
                    match msgs.recv().await {
                        Ok(_) => {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                        // Counted as missing: the total falls short.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => break,
                    }
                }
            });
            Box::new(c)
        }
        Client::RedisRs => {
            let c = redis::Client::open(url).map_err(|e| e.to_string())?;
            let mut ps = c.get_async_pubsub().await.map_err(|e| e.to_string())?;
            for chunk in topics.chunks(10_000) {
                ps.subscribe(chunk).await.map_err(|e| e.to_string())?;
            }
            let mut stream = ps.into_on_message();
            tokio::spawn(async move {
                while stream.next().await.is_some() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
            Box::new(())
        }
    };
    wait_subscribed(args.redis, args.topics).await?;
    println!("READY");
    let _ = std::io::stdout().flush();
    let mut first: Option<(Instant, f64, u64)> = None;
    let (mut got, mut last) = (0u64, Instant::now());
    let give_up = Instant::now() + Duration::from_secs(120);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    while got < args.count && Instant::now() < give_up {
        tick.tick().await;
        let now_got = count.load(Ordering::Relaxed);
        let now = Instant::now();
        if now_got > got {
            if first.is_none() {
                first = Some((now, cpu_now(), now_got));
            }
            got = now_got;
            last = now;
        } else if first.is_some() && now - last > Duration::from_secs(3) {
            break;
        }
    }
    let cpu = cpu_now();
    let (t0, cpu0, before) = first.ok_or("no message arrived")?;
    Ok(WorkerOut {
        // From the first reading on: what arrived before it is not in the time.
        ops: got - before,
        secs: (last - t0).as_secs_f64(),
        cpu: cpu - cpu0,
        lost: args.count.saturating_sub(got),
    })
}

/// Waits until one pub/sub client of the server has at least `topics` channels.
async fn wait_subscribed(redis: SocketAddr, topics: usize) -> Result<(), String> {
    let c = redis::Client::open(format!("redis://{redis}/")).map_err(|e| e.to_string())?;
    let mut conn = c
        .get_multiplexed_async_connection_with_config(&rs_config())
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let most = list
            .lines()
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix("sub="))
                    .and_then(|n| n.parse::<usize>().ok())
            })
            .max()
            .unwrap_or(0);
        if most >= topics {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("the subscriber did not reach {topics} channels"))
}

/// Publishes `count` messages round-robin over `topics` topics in pipelines of up to 1 000, at
/// `rate` (a pipeline per millisecond) or back to back with two pipelines in flight.
async fn load(args: &WorkerArgs) -> Result<WorkerOut, String> {
    let c = redis::Client::open(format!("redis://{}/", args.redis)).map_err(|e| e.to_string())?;
    let conn = c
        .get_multiplexed_async_connection_with_config(&rs_config())
        .await
        .map_err(|e| e.to_string())?;
    let payload = vec![b'x'; args.payload];
    let t0 = Instant::now();
    let mut sent = 0u64;
    let mut inflight = FuturesUnordered::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while sent < args.count {
        let want = match args.rate {
            Some(r) => {
                tick.tick().await;
                ((t0.elapsed().as_secs_f64() * r as f64) as u64).min(args.count)
            }
            None => args.count,
        };
        while sent < want {
            let n = (want - sent).min(1000);
            let mut pipe = redis::pipe();
            for i in sent..sent + n {
                pipe.publish(topic(i as usize % args.topics.max(1)), &payload[..])
                    .ignore();
            }
            sent += n;
            let mut conn = conn.clone();
            inflight.push(async move { pipe.query_async::<()>(&mut conn).await.is_ok() });
            if args.rate.is_some() || inflight.len() >= 2 {
                if let Some(false) = inflight.next().await {
                    return Err("a pipeline failed".into());
                }
            }
        }
    }
    while let Some(ok) = inflight.next().await {
        if !ok {
            return Err("a pipeline failed".into());
        }
    }
    Ok(WorkerOut {
        ops: sent,
        secs: t0.elapsed().as_secs_f64(),
        ..WorkerOut::default()
    })
}

/// A handler for a service that only publishes.
#[derive(Debug)]
struct Quiet;

#[async_trait::async_trait]
impl MessageHandler for Quiet {
    type ClientMessage = serde_json::Value;
    type ServerEvent = serde_json::Value;
    type AppState = ();
    type UserId = u32;

    async fn handle_direct_message(
        &self,
        _msg: &serde_json::Value,
        _ctx: &ConnectionContext<(), u32>,
    ) -> Result<Option<serde_json::Value>, HandlerError> {
        Ok(None)
    }

    async fn handle_broadcast_message(
        &self,
        _msg: serde_json::Value,
        _ctx: &ConnectionContext<(), u32>,
    ) -> Result<Option<serde_json::Value>, HandlerError> {
        Ok(None)
    }
}

/// The measurements, each a (name, worker arguments) pair run for every client.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    measure: String,
    client: Client,
    rep: usize,
    out: Result<WorkerOut, String>,
}

fn spawn_worker(extra: &[String], client_threads: usize) -> Result<std::process::Child, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    Command::new(exe)
        .arg("--client-threads")
        .arg(client_threads.to_string())
        .arg("redis-clients-worker")
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())
}

fn last_json(child: std::process::Child) -> Result<WorkerOut, String> {
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format!("worker failed ({})", out.status))?;
    serde_json::from_str(line).map_err(|e| e.to_string())
}

/// Runs every measurement for every client, interleaved, `reps` times.
pub(crate) fn run(
    args: &RedisClientsArgs,
    client_threads: usize,
) -> Result<(String, String), String> {
    let redis = system::start_redis().map_err(|e| e.to_string())?;
    let r = redis.addr.to_string();
    let common = |role: &str, client: Client| -> Vec<String> {
        vec![
            "--role".into(),
            role.into(),
            "--client".into(),
            client.name().into(),
            "--redis".into(),
            r.clone(),
            "--payload".into(),
            args.payload.to_string(),
            "--window".into(),
            args.window.to_string(),
            "--secs".into(),
            args.secs.to_string(),
        ]
    };
    let mut rows = Vec::new();
    for rep in 0..args.reps.max(1) {
        for &client in &args.clients {
            eprintln!(
                "== {} (rep {}/{})",
                client.name(),
                rep + 1,
                args.reps.max(1)
            );
            for (measure, rate) in [
                (format!("publish at {}/s", args.rate), Some(args.rate)),
                ("publish, saturation".to_string(), None),
            ] {
                let mut a = common("publish", client);
                if let Some(rate) = rate {
                    a.extend(["--rate".into(), rate.to_string()]);
                }
                let out = spawn_worker(&a, client_threads).and_then(last_json);
                rows.push(Row {
                    measure,
                    client,
                    rep,
                    out,
                });
            }
            for &n in &args.topics {
                for (measure, rate, count) in [
                    (
                        format!("receive at {}/s, {n} topics", args.rate),
                        Some(args.rate),
                        args.rate * args.secs,
                    ),
                    (format!("receive, saturation, {n} topics"), None, args.burst),
                ] {
                    let out = subscribe_once(
                        &common("subscribe", client),
                        &common("load", client),
                        n,
                        rate,
                        count,
                        client_threads,
                    );
                    rows.push(Row {
                        measure,
                        client,
                        rep,
                        out,
                    });
                }
            }
        }
    }
    drop(redis);
    let md = report(args, &rows);
    Ok((serde_json::to_string_pretty(&rows).unwrap_or_default(), md))
}

fn subscribe_once(
    sub_args: &[String],
    load_args: &[String],
    topics: usize,
    rate: Option<u64>,
    count: u64,
    client_threads: usize,
) -> Result<WorkerOut, String> {
    let mut a = sub_args.to_vec();
    a.extend([
        "--topics".into(),
        topics.to_string(),
        "--count".into(),
        count.to_string(),
    ]);
    let mut sub = spawn_worker(&a, client_threads)?;
    let stdout = sub.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut rest = String::new();
    loop {
        match lines.next() {
            Some(Ok(l)) if l == "READY" => break,
            Some(Ok(l)) => rest.push_str(&l),
            _ => {
                let _ = sub.wait();
                return Err("subscriber failed before it was ready".into());
            }
        }
    }
    let mut l = load_args.to_vec();
    l.extend([
        "--topics".into(),
        topics.to_string(),
        "--count".into(),
        count.to_string(),
    ]);
    if let Some(rate) = rate {
        l.extend(["--rate".into(), rate.to_string()]);
    }
    let loader = spawn_worker(&l, 1)?;
    let loaded = last_json(loader);
    for line in lines.map_while(Result::ok) {
        rest.push_str(&line);
        rest.push('\n');
    }
    let status = sub.wait().map_err(|e| e.to_string())?;
    loaded?;
    let line = rest
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format!("subscriber failed ({status})"))?;
    serde_json::from_str(line).map_err(|e| e.to_string())
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn report(args: &RedisClientsArgs, rows: &[Row]) -> String {
    let mut measures: Vec<&str> = Vec::new();
    for r in rows {
        if !measures.contains(&r.measure.as_str()) {
            measures.push(&r.measure);
        }
    }
    let mut md = format!(
        "Medians of {} reps; payload {} B; ratio = client / ours.\n\n\
         | measurement | client | rate (ops/s) | ratio | CPU µs/op | ratio | lost | runs |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
        args.reps.max(1),
        args.payload
    );
    for m in measures {
        let med = |c: Client, f: &dyn Fn(&WorkerOut) -> f64| {
            median(
                rows.iter()
                    .filter(|r| r.measure == m && r.client == c)
                    .filter_map(|r| r.out.as_ref().ok())
                    .map(f)
                    .collect(),
            )
        };
        let ours_rate = med(Client::Ours, &WorkerOut::rate);
        let ours_cpu = med(Client::Ours, &WorkerOut::cpu_us_per_op);
        for &c in &args.clients {
            let runs: Vec<&Row> = rows
                .iter()
                .filter(|r| r.measure == m && r.client == c)
                .collect();
            let ok = runs.iter().filter(|r| r.out.is_ok()).count();
            let rate = med(c, &WorkerOut::rate);
            let cpu = med(c, &WorkerOut::cpu_us_per_op);
            let lost = med(c, &|o| o.lost as f64);
            let ratio = |x: Option<f64>, base: Option<f64>| match (x, base) {
                (Some(x), Some(b)) if b > 0.0 => format!("{:.2}", x / b),
                _ => "–".into(),
            };
            let fixed = m.contains(" at ");
            md.push_str(&format!(
                "| {m} | {} | {} | {} | {} | {} | {} | {ok}/{} |\n",
                c.name(),
                rate.map_or("–".into(), |r| format!("{r:.0}")),
                if fixed {
                    "–".into()
                } else {
                    ratio(rate, ours_rate)
                },
                cpu.map_or("–".into(), |r| format!("{r:.2}")),
                ratio(cpu, ours_cpu),
                lost.map_or("–".into(), |l| format!("{l:.0}")),
                runs.len(),
            ));
        }
    }
    md
}
