//! `recovery`: every client of a positioned topic dropped at once, then all reconnecting with
//! their positions while publications keep flowing.
//!
//! The harness starts its own Redis and `basic_chat`, connects N `rtk1` clients to `general` (a
//! room with history), and publishes marked `SendMessage`s through the server at a steady rate
//! (through the server, so that Redis's position script gives each one its offset). After a
//! warm-up every client closes its TCP connection abruptly (a reset, no close frame); after an
//! outage all reconnect at once with `since=<last offset>&epoch=<epoch>`: to the same instance,
//! or (`--reconnect-to warm|cold`) to a second one on the same Redis, which serves the room or
//! has never had a client of it. One more `rtk1` connection, the *witness*, stays connected
//! throughout and tells which offset is live.
//!
//! Per client it counts offsets (across both connections): duplicates, offsets that never came,
//! and the moment it again has every offset up to the one that was live when the reconnection
//! began. It reports the time until every client got there (p50, p99, max), the delivered
//! fraction once publishing has stopped, the server's recovery counters (`/metrics`) and the
//! history reads the server made from Redis (its `rtk_broker_history_reads_total`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::client;
use crate::publish::Publisher;
use crate::scenario::token_for;
use crate::system::{self, StartOpts, System};

/// Offsets one client received, across its connections: how far it has every one, which never
/// came, and which came twice. Offsets are expected in increasing order (the `rtk1` contract);
/// one that fills an earlier hole is counted as late, not lost.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Offsets {
    /// The client has everything up to this offset when counting starts.
    base: u64,
    /// Highest offset received (or `base`).
    top: u64,
    /// Offsets in `base + 1 ..= top` not received, as sorted, disjoint inclusive ranges.
    holes: Vec<(u64, u64)>,
    /// Offsets received again (or at or below `base`).
    pub(crate) duplicates: u64,
    /// Offsets that arrived after a higher one.
    pub(crate) late: u64,
}

impl Offsets {
    /// Counting from `base`: the client has every offset up to it.
    pub(crate) fn from(base: u64) -> Self {
        Self {
            base,
            top: base,
            ..Self::default()
        }
    }

    /// Records offset `o`; whether it was new.
    pub(crate) fn record(&mut self, o: u64) -> bool {
        if o <= self.base {
            self.duplicates += 1;
            return false;
        }
        if o > self.top {
            if o > self.top + 1 {
                self.holes.push((self.top + 1, o - 1));
            }
            self.top = o;
            return true;
        }
        // At or below the top: a hole filled late, or a duplicate.
        let Some(i) = self.holes.iter().position(|&(a, b)| a <= o && o <= b) else {
            self.duplicates += 1;
            return false;
        };
        self.late += 1;
        let (a, b) = self.holes[i];
        match (a == o, b == o) {
            (true, true) => {
                self.holes.remove(i);
            }
            (true, false) => self.holes[i].0 = o + 1,
            (false, true) => self.holes[i].1 = o - 1,
            (false, false) => {
                self.holes[i].1 = o - 1;
                self.holes.insert(i + 1, (o + 1, b));
            }
        }
        true
    }

    /// The client has every offset up to this one.
    pub(crate) fn contiguous(&self) -> u64 {
        self.holes.first().map_or(self.top, |&(a, _)| a - 1)
    }

    /// Highest offset received (or the base).
    pub(crate) fn top(&self) -> u64 {
        self.top
    }

    /// Offsets in `base + 1 ..= upto` that never arrived.
    pub(crate) fn missing(&self, upto: u64) -> u64 {
        let in_holes: u64 = self
            .holes
            .iter()
            .filter(|&&(a, _)| a <= upto)
            .map(|&(a, b)| b.min(upto) - a + 1)
            .sum();
        in_holes + upto.saturating_sub(self.top)
    }

    /// Offsets in `base + 1 ..= upto`: what the client should have by then.
    pub(crate) fn expected(&self, upto: u64) -> u64 {
        upto.saturating_sub(self.base)
    }
}

/// What an `rtk1` text frame says, as far as this scenario cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Rtk1<'a> {
    /// A publication, with its offset and epoch if its topic has history.
    Pub {
        offset: Option<u64>,
        epoch: Option<&'a str>,
    },
    /// The answer to a subscription: the position the client has, and whether it recovered.
    Subscribed {
        epoch: String,
        offset: u64,
        recovered: bool,
    },
    /// The server cannot guarantee the client has every publication.
    InsufficientState,
    /// Anything else (an error, presence).
    Other,
}

/// Reads an `rtk1` frame. `pub` frames are the many: their offset is read without parsing the
/// whole object (it comes before the payload, `{"type":"pub","topic":…,"o":N,…`).
pub(crate) fn parse_rtk1(text: &[u8]) -> Rtk1<'_> {
    if text.starts_with(br#"{"type":"pub","#) {
        let Some(i) = find(text, br#","o":"#) else {
            return Rtk1::Pub {
                offset: None,
                epoch: None,
            };
        };
        let digits = &text[i + 5..];
        let n = digits.iter().take_while(|b| b.is_ascii_digit()).count();
        let offset = std::str::from_utf8(&digits[..n])
            .ok()
            .and_then(|d| d.parse().ok());
        // The epoch follows: `,"e":"<[0-9a-z]…>"`.
        let epoch = digits[n..].strip_prefix(br#","e":""#).and_then(|rest| {
            let len = rest.iter().position(|&b| b == b'"')?;
            std::str::from_utf8(&rest[..len]).ok()
        });
        return Rtk1::Pub { offset, epoch };
    }
    #[derive(serde::Deserialize)]
    struct Message {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        e: String,
        #[serde(default)]
        o: u64,
        #[serde(default)]
        recovered: bool,
    }
    match serde_json::from_slice::<Message>(text) {
        Ok(m) if m.kind == "subscribed" => Rtk1::Subscribed {
            epoch: m.e,
            offset: m.o,
            recovered: m.recovered,
        },
        Ok(m) if m.kind == "insufficient_state" => Rtk1::InsufficientState,
        _ => Rtk1::Other,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Arguments of `recovery`.
#[derive(Debug, Clone, Args, Serialize)]
pub(crate) struct RecoveryArgs {
    /// `rtk1` clients of the positioned room `general`, all dropped and reconnected at once.
    #[arg(long, default_value_t = 10_000)]
    pub(crate) clients: usize,
    /// Publishes per second (`SendMessage` through the server), before, during and after.
    #[arg(long, default_value_t = 10.0)]
    pub(crate) rate: f64,
    /// Payload (message text) size in bytes.
    #[arg(long, default_value_t = 128)]
    pub(crate) payload: usize,
    /// Seconds of publishing before the clients are dropped.
    #[arg(long, default_value_t = 2.0)]
    pub(crate) warmup_secs: f64,
    /// Milliseconds between dropping every client and reconnecting them all.
    #[arg(long, default_value_t = 1000)]
    pub(crate) outage_ms: u64,
    /// Seconds of publishing after the reconnection begins.
    #[arg(long, default_value_t = 4.0)]
    pub(crate) after_secs: f64,
    /// Handshakes in flight while connecting and reconnecting.
    #[arg(long, default_value_t = 512)]
    pub(crate) connect_parallel: usize,
    /// Repetitions, each with a fresh server (one Redis for all).
    #[arg(long, default_value_t = 3)]
    pub(crate) reps: usize,
    /// SHARDS for the server.
    #[arg(long)]
    pub(crate) shards: Option<usize>,
    /// Use the binary already built in target/release.
    #[arg(long)]
    pub(crate) no_build: bool,
    /// Extra KEY=VALUE environment for the server.
    #[arg(long = "server-env", value_delimiter = ',')]
    pub(crate) server_env: Vec<String>,
    /// Where the clients reconnect.
    #[arg(long, value_enum, default_value_t = Again::Same)]
    pub(crate) reconnect_to: Again,
}

/// Where the dropped clients reconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Again {
    /// The instance they were on (the publisher stays connected to it).
    Same,
    /// A second instance on the same Redis that serves the room (the witness is connected to
    /// it from the start), as when a client's instance dies.
    Warm,
    /// A second instance on the same Redis that no client of the room is connected to: it
    /// has seen none of the room's publications.
    Cold,
}

impl Again {
    fn describe(self) -> &'static str {
        match self {
            Self::Same => " to the same instance",
            Self::Warm => {
                " to a second instance that serves the room (one subscriber stays there; the publisher stays on the first)"
            }
            Self::Cold => {
                " to a second instance that had no subscriber of the room (the publisher and one subscriber stay on the first)"
            }
        }
    }
}

/// One repetition.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RecoveryRep {
    pub(crate) clients: usize,
    /// Clients whose first connection failed; they take no further part.
    pub(crate) connect_failures: usize,
    /// Clients whose reconnection failed (handshake refused or timed out).
    pub(crate) reconnect_failures: usize,
    /// Clients told `recovered: false`.
    pub(crate) not_recovered: usize,
    /// Clients that got every offset up to the live one of the reconnection's start.
    pub(crate) caught_up: usize,
    /// The live offset when the reconnection began, and the last one published.
    pub(crate) target_offset: u64,
    pub(crate) final_offset: u64,
    /// Milliseconds from the reconnection's start to a client having every offset up to the
    /// target: median, p99, slowest (over the clients that got there).
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    /// The same from each client's own handshake start (after waiting for a handshake slot).
    pub(crate) own_p50_ms: f64,
    pub(crate) own_p99_ms: f64,
    /// Milliseconds until every client had reconnected (its `subscribed` arrived).
    pub(crate) all_subscribed_ms: f64,
    /// Milliseconds the first connection of every client took, without positions (polled
    /// every 20 ms): the same handshakes and subscriptions without a recovery.
    pub(crate) first_connect_ms: f64,
    /// Offsets received over expected ones (from each client's first position to the last
    /// published), over every client that connected.
    pub(crate) delivered_fraction: f64,
    pub(crate) missing: u64,
    pub(crate) duplicates: u64,
    pub(crate) late: u64,
    pub(crate) insufficient_state: u64,
    /// Publications each reconnecting client missed during the outage, median.
    pub(crate) missed_per_client: f64,
    /// The server's counters over the reconnection (`/metrics`).
    pub(crate) recoveries_succeeded: f64,
    pub(crate) recoveries_failed: f64,
    pub(crate) recovered_publications: f64,
    pub(crate) gaps_healed: f64,
    /// Ranges of history the instance the clients reconnect to read from Redis over the
    /// reconnection (its `rtk_broker_history_reads_total`; the `EVAL` calls Redis counts include
    /// presence joins and leaves), and publications given a position over the same time (the
    /// live offset's advance: `EVALSHA` counts the presence scripts too).
    pub(crate) store_reads: u64,
    pub(crate) store_publishes: u64,
    /// Server CPU seconds from the reconnection's start to the end of the drain.
    pub(crate) server_cpu_s: Option<f64>,
    /// This harness's CPU seconds over the same time (it shares the machine).
    pub(crate) harness_cpu_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct RecoveryResult {
    pub(crate) args: RecoveryArgs,
    pub(crate) reps: Vec<RecoveryRep>,
}

/// What the coordinator tells the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Connected,
    Drop,
    Reconnect,
    End,
}

/// Shared between the coordinator and the clients.
#[derive(Debug)]
struct Shared {
    addr: SocketAddr,
    /// Where clients reconnect: `addr`, or another instance.
    reconnect_addr: SocketAddr,
    path: String,
    handshakes: tokio::sync::Semaphore,
    /// Clients connected (first connection, with their `subscribed`).
    subscribed: AtomicUsize,
    /// Clients reconnected (their second `subscribed` arrived).
    resubscribed: AtomicUsize,
    /// Clients that have every offset up to `target`.
    caught_up: AtomicUsize,
    /// Clients told `recovered: false` on reconnecting (they will not catch up).
    refused: AtomicUsize,
    /// The offset live when the reconnection began.
    target: AtomicU64,
    /// The witness's highest offset.
    live: AtomicU64,
    /// Per client: its highest offset, for the final drain.
    tops: Vec<AtomicU64>,
}

/// What one client saw.
#[derive(Debug, Default)]
struct ClientOut {
    offsets: Option<Offsets>,
    /// The stream's epoch, as the last `subscribed` or `pub` gave it.
    epoch: String,
    connected: bool,
    reconnected: bool,
    recovered: Option<bool>,
    insufficient: u64,
    /// The offset it had every publication up to when dropped.
    dropped_at: u64,
    own_start: Option<Instant>,
    subscribed_at: Option<Instant>,
    caught_up_at: Option<Instant>,
}

/// One `rtk1` connection's handshake, bounded by a timeout; `started` is set when it gets a
/// handshake slot.
async fn open(
    shared: &Shared,
    addr: SocketAddr,
    path: &str,
    started: &mut Option<Instant>,
) -> Option<(TcpStream, Vec<u8>)> {
    let _slot = shared.handshakes.acquire().await.ok()?;
    *started = Some(Instant::now());
    match tokio::time::timeout(Duration::from_secs(10), client::handshake(addr, path)).await {
        Ok(Ok((101, Some(conn)))) => Some(conn),
        _ => None,
    }
}

/// Who reads a connection: a client (its index) or the witness.
#[derive(Debug, Clone, Copy)]
enum Reader {
    Client(usize),
    Witness,
}

/// Reads frames into `out` until the phase reaches `until` or the connection ends.
async fn session(
    reader: Reader,
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    out: &mut ClientOut,
    shared: &Shared,
    phase: &mut watch::Receiver<Phase>,
    until: Phase,
) {
    let reconnecting = *phase.borrow() >= Phase::Reconnect;
    buf.reserve(16 * 1024);
    loop {
        let mut pos = 0;
        while let Some((opcode, payload, used)) = client::next_frame(&buf[pos..]) {
            pos += used;
            if opcode == 0x8 {
                return;
            }
            if opcode != 0x1 {
                continue;
            }
            match parse_rtk1(payload) {
                Rtk1::Pub {
                    offset: Some(o),
                    epoch,
                } => {
                    if let Some(e) = epoch.filter(|e| *e != out.epoch) {
                        out.epoch = e.to_string();
                    }
                    // A stream this instance had not seen when the client subscribed: counting
                    // starts at the first publication.
                    let offsets = out
                        .offsets
                        .get_or_insert_with(|| Offsets::from(o.saturating_sub(1)));
                    offsets.record(o);
                    match reader {
                        Reader::Witness => {
                            shared.live.fetch_max(o, Relaxed);
                        }
                        Reader::Client(i) => shared.tops[i].store(offsets.top(), Relaxed),
                    }
                }
                Rtk1::Subscribed {
                    epoch,
                    offset,
                    recovered,
                } => {
                    if reconnecting {
                        out.recovered = Some(recovered);
                        if !recovered {
                            shared.refused.fetch_add(1, Relaxed);
                        }
                        out.subscribed_at = Some(Instant::now());
                        shared.resubscribed.fetch_add(1, Relaxed);
                    } else {
                        if !epoch.is_empty() {
                            out.offsets.get_or_insert_with(|| Offsets::from(offset));
                        }
                        if let Reader::Client(_) = reader {
                            shared.subscribed.fetch_add(1, Relaxed);
                        }
                    }
                    if !epoch.is_empty() {
                        out.epoch = epoch;
                    }
                }
                Rtk1::InsufficientState => out.insufficient += 1,
                Rtk1::Pub { offset: None, .. } | Rtk1::Other => {}
            }
        }
        buf.drain(..pos);
        if reconnecting && out.caught_up_at.is_none() && out.subscribed_at.is_some() {
            let target = shared.target.load(Relaxed);
            if out
                .offsets
                .as_ref()
                .is_some_and(|o| o.contiguous() >= target)
            {
                out.caught_up_at = Some(Instant::now());
                shared.caught_up.fetch_add(1, Relaxed);
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        tokio::select! {
            r = stream.read_buf(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            _ = phase.wait_for(|p| *p >= until) => return,
        }
    }
}

/// One client: connect, read until dropped, reconnect from its position, read until the end.
async fn run_client(
    idx: usize,
    shared: Arc<Shared>,
    mut phase: watch::Receiver<Phase>,
) -> ClientOut {
    let mut out = ClientOut::default();
    let reader = Reader::Client(idx);
    let Some((mut stream, rest)) = open(&shared, shared.addr, &shared.path, &mut None).await else {
        return out;
    };
    out.connected = true;
    session(
        reader,
        &mut stream,
        rest,
        &mut out,
        &shared,
        &mut phase,
        Phase::Drop,
    )
    .await;
    // Gone without a word: a reset, as when a network fails or a process dies. A zero linger
    // time never blocks (the deprecation is about waiting for unsent data on close).
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
    drop(stream);
    if phase.wait_for(|p| *p >= Phase::Reconnect).await.is_err() {
        return out;
    }
    // It has every offset up to `contiguous`.
    let since = out.offsets.as_ref().map_or(0, Offsets::contiguous);
    out.dropped_at = since;
    let path = format!("{}&since={since}&epoch={}", shared.path, out.epoch);
    let Some((mut stream, rest)) =
        open(&shared, shared.reconnect_addr, &path, &mut out.own_start).await
    else {
        return out;
    };
    out.reconnected = true;
    session(
        reader,
        &mut stream,
        rest,
        &mut out,
        &shared,
        &mut phase,
        Phase::End,
    )
    .await;
    out
}

/// The witness: one connection that stays, and tells which offset is live.
async fn run_witness(
    shared: Arc<Shared>,
    addr: SocketAddr,
    mut phase: watch::Receiver<Phase>,
) -> Option<()> {
    let (mut stream, rest) = open(&shared, addr, &shared.path, &mut None).await?;
    let mut out = ClientOut::default();
    session(
        Reader::Witness,
        &mut stream,
        rest,
        &mut out,
        &shared,
        &mut phase,
        Phase::End,
    )
    .await;
    Some(())
}

/// Percentile `q` of sorted `v` (nearest rank), in milliseconds.
fn pct(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// The instances of one repetition: the one clients first connect to (the publisher and the
/// witness stay there), and the one they reconnect to with its PID (the same, or another).
#[derive(Debug, Clone, Copy)]
struct Instances {
    first: SocketAddr,
    again: SocketAddr,
    again_pid: u32,
}

/// One repetition against a fresh server.
async fn rep(args: &RecoveryArgs, instances: Instances) -> Result<RecoveryRep, String> {
    let (addr, pid) = (instances.first, instances.again_pid);
    let token = token_for(0, 1);
    let (tx, rx) = watch::channel(Phase::Connected);
    let shared = Arc::new(Shared {
        addr,
        reconnect_addr: instances.again,
        path: format!("/ws/general?token={token}&proto=rtk1"),
        handshakes: tokio::sync::Semaphore::new(args.connect_parallel.max(1)),
        subscribed: AtomicUsize::new(0),
        resubscribed: AtomicUsize::new(0),
        caught_up: AtomicUsize::new(0),
        refused: AtomicUsize::new(0),
        target: AtomicU64::new(0),
        live: AtomicU64::new(0),
        tops: (0..args.clients).map(|_| AtomicU64::new(0)).collect(),
    });
    let witness_at = if args.reconnect_to == Again::Warm {
        instances.again
    } else {
        addr
    };
    let witness = tokio::spawn(run_witness(shared.clone(), witness_at, rx.clone()));
    let mut publisher =
        Publisher::websocket(addr, vec!["general".into()], vec![token], args.payload)
            .await
            .map_err(|e| format!("publisher: {e}"))?;
    // Publications before the clients come: the instance knows the stream's position when they
    // subscribe.
    publisher
        .run(args.rate.max(1.0), Duration::from_millis(1000))
        .await
        .map_err(|e| e.to_string())?;
    let first = Instant::now();
    let clients: Vec<_> = (0..args.clients)
        .map(|i| tokio::spawn(run_client(i, shared.clone(), rx.clone())))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while shared.subscribed.load(Relaxed) < args.clients && Instant::now() < deadline {
        if clients.iter().all(|c| c.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected = shared.subscribed.load(Relaxed);
    let first_connect_ms = first.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "  {connected} of {} clients subscribed in {first_connect_ms:.0} ms",
        args.clients
    );

    let total = args.warmup_secs + args.outage_ms as f64 / 1000.0 + args.after_secs;
    let rate = args.rate;
    let publishing =
        tokio::spawn(async move { publisher.run(rate, Duration::from_secs_f64(total)).await });
    tokio::time::sleep(Duration::from_secs_f64(args.warmup_secs)).await;
    let _ = tx.send(Phase::Drop);
    tokio::time::sleep(Duration::from_millis(args.outage_ms)).await;

    let metrics0 = crate::soak::scrape(instances.again)
        .await
        .unwrap_or_default();
    let cpu0 = system::cpu_seconds(pid);
    let harness0 = system::cpu_seconds(std::process::id());
    let target = shared.live.load(Relaxed);
    shared.target.store(target, Relaxed);
    let start = Instant::now();
    let _ = tx.send(Phase::Reconnect);
    // Until every client that connected has caught up, or 30 s.
    let deadline = start + Duration::from_secs(30);
    while Instant::now() < deadline {
        // Told `recovered: false`: they will not catch up.
        let settled = shared.caught_up.load(Relaxed) + shared.refused.load(Relaxed);
        if settled >= connected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    eprintln!(
        "  {} of {connected} resubscribed ({} told recovered: false), {} caught up in {:.0} ms",
        shared.resubscribed.load(Relaxed),
        shared.refused.load(Relaxed),
        shared.caught_up.load(Relaxed),
        start.elapsed().as_secs_f64() * 1000.0
    );
    publishing
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    // The last publications: until the witness stops moving and every client has its top.
    let mut last = (shared.live.load(Relaxed), Instant::now());
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let live = shared.live.load(Relaxed);
        if live != last.0 {
            last = (live, Instant::now());
        }
        let all = shared.tops.iter().all(|t| t.load(Relaxed) >= live);
        if all && last.1.elapsed() > Duration::from_millis(300) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let final_offset = shared.live.load(Relaxed);
    let server_cpu_s = match (system::cpu_seconds(pid), cpu0) {
        (Some(b), Some(a)) => Some(b - a),
        _ => None,
    };
    let harness_cpu_s = system::cpu_seconds(std::process::id())
        .zip(harness0)
        .map(|(b, a)| b - a);
    let metrics1 = crate::soak::scrape(instances.again)
        .await
        .unwrap_or_default();
    let _ = tx.send(Phase::End);
    let mut outs = Vec::with_capacity(clients.len());
    for c in clients {
        outs.push(c.await.map_err(|e| e.to_string())?);
    }
    let _ = witness.await;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut from_start: Vec<f64> = outs
        .iter()
        .filter_map(|o| o.caught_up_at.map(|t| ms(t - start)))
        .collect();
    let mut from_own: Vec<f64> = outs
        .iter()
        .filter_map(|o| Some(ms(o.caught_up_at? - o.own_start?)))
        .collect();
    from_start.sort_by(f64::total_cmp);
    from_own.sort_by(f64::total_cmp);
    let mut missed: Vec<f64> = outs
        .iter()
        .filter(|o| o.reconnected)
        .map(|o| target.saturating_sub(o.dropped_at) as f64)
        .collect();
    missed.sort_by(f64::total_cmp);
    let (mut expected, mut missing, mut duplicates, mut late) = (0, 0, 0, 0);
    for o in outs.iter().filter(|o| o.connected) {
        let offsets = o.offsets.clone().unwrap_or_default();
        expected += offsets.expected(final_offset);
        missing += offsets.missing(final_offset);
        duplicates += offsets.duplicates;
        late += offsets.late;
    }
    let delta =
        |m0: &std::collections::HashMap<String, f64>,
         m1: &std::collections::HashMap<String, f64>,
         k: &str| { m1.get(k).copied().unwrap_or(0.0) - m0.get(k).copied().unwrap_or(0.0) };
    Ok(RecoveryRep {
        clients: args.clients,
        connect_failures: outs.iter().filter(|o| !o.connected).count(),
        reconnect_failures: outs
            .iter()
            .filter(|o| o.connected && !o.reconnected)
            .count(),
        not_recovered: outs.iter().filter(|o| o.recovered == Some(false)).count(),
        caught_up: from_start.len(),
        target_offset: target,
        final_offset,
        p50_ms: pct(&from_start, 0.50),
        p99_ms: pct(&from_start, 0.99),
        max_ms: from_start.last().copied().unwrap_or(f64::NAN),
        own_p50_ms: pct(&from_own, 0.50),
        own_p99_ms: pct(&from_own, 0.99),
        first_connect_ms,
        all_subscribed_ms: if outs
            .iter()
            .any(|o| o.reconnected && o.subscribed_at.is_none())
        {
            f64::NAN
        } else {
            outs.iter()
                .filter_map(|o| o.subscribed_at.map(|t| ms(t - start)))
                .reduce(f64::max)
                .unwrap_or(f64::NAN)
        },
        delivered_fraction: if expected > 0 {
            (expected - missing) as f64 / expected as f64
        } else {
            1.0
        },
        missing,
        duplicates,
        late,
        insufficient_state: outs.iter().map(|o| o.insufficient).sum(),
        missed_per_client: pct(&missed, 0.5),
        recoveries_succeeded: delta(&metrics0, &metrics1, "rtk_recoveries_succeeded_total"),
        recoveries_failed: delta(&metrics0, &metrics1, "rtk_recoveries_failed_total"),
        recovered_publications: delta(&metrics0, &metrics1, "rtk_recovered_publications_total"),
        gaps_healed: delta(&metrics0, &metrics1, "rtk_broker_gaps_healed_total"),
        store_reads: delta(&metrics0, &metrics1, "rtk_broker_history_reads_total").max(0.0) as u64,
        store_publishes: final_offset.saturating_sub(target),
        server_cpu_s,
        harness_cpu_s,
    })
}

pub(crate) async fn recovery(root: &Path, args: &RecoveryArgs) -> Result<RecoveryResult, String> {
    if args.warmup_secs + args.after_secs > 60.0 || args.outage_ms > 30_000 {
        return Err("warm-up and after must stay under 60 s, the outage under 30 s".into());
    }
    if !args.no_build {
        system::build_ours(root).map_err(|e| e.to_string())?;
    }
    let target_dir = system::release_dir(root);
    let redis = system::start_redis().map_err(|e| e.to_string())?;
    let opts = StartOpts {
        redis_url: Some(format!("redis://{}/", redis.addr)),
        shards: args.shards,
        cpus: None,
        env: system::env_pairs(&args.server_env),
        binary: None,
    };
    let mut reps = Vec::new();
    for r in 0..args.reps.max(1) {
        eprintln!("== recovery (rep {}/{})", r + 1, args.reps.max(1));
        let start = || system::start_system(System::Ours, &target_dir, &opts);
        let mut server = start().map_err(|e| e.to_string())?;
        let mut other = if args.reconnect_to != Again::Same {
            Some(start().map_err(|e| e.to_string())?)
        } else {
            None
        };
        let again = other.as_ref().unwrap_or(&server);
        let instances = Instances {
            first: server.addr,
            again: again.addr,
            again_pid: again.pid(),
        };
        let res = rep(args, instances).await;
        server.stop();
        if let Some(o) = other.as_mut() {
            o.stop();
        }
        let res = res?;
        eprintln!("  {}", row(&res));
        reps.push(res);
        // Sockets in TIME_WAIT and the server's exit settle.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(RecoveryResult {
        args: args.clone(),
        reps,
    })
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.filter(|v| v.is_finite())
        .map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "–".into())
}

/// One repetition as a table row (see [`report`]).
fn row(r: &RecoveryRep) -> String {
    format!(
        "| {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} | {:.4} | {} | {} | {} / {} / {} | {} / {} | {} | {} | {} |",
        r.clients,
        opt(Some(r.first_connect_ms), 0),
        r.caught_up,
        r.clients - r.connect_failures,
        opt(Some(r.p50_ms), 0),
        opt(Some(r.p99_ms), 0),
        opt(Some(r.max_ms), 0),
        opt(Some(r.all_subscribed_ms), 0),
        opt(Some(r.own_p50_ms), 0),
        opt(Some(r.own_p99_ms), 0),
        opt(Some(r.missed_per_client), 0),
        r.delivered_fraction,
        r.duplicates,
        r.not_recovered + r.reconnect_failures,
        r.recoveries_succeeded,
        r.recoveries_failed,
        r.recovered_publications,
        r.store_reads,
        r.store_publishes,
        r.gaps_healed,
        opt(r.server_cpu_s, 2),
        opt(r.harness_cpu_s, 2),
    )
}

/// The result as Markdown: one row per repetition, then the medians.
pub(crate) fn report(r: &RecoveryResult) -> String {
    let a = &r.args;
    let cmdline: Vec<String> = std::env::args().skip(1).collect();
    let mut s = format!(
        "Command: `cargo run --release -p loadtest -- {}`\n\n\
         Recovery: {} `rtk1` clients of `general` through Redis, {} publishes/s of {} B through the server; every client dropped (TCP reset) after {} s, all reconnecting with their position {} ms later{}, publishing for {} s more; {} handshakes in flight; {} rep(s), a fresh server each.\n\n\
         | clients | first connect ms | caught up | p50 ms | p99 ms | max ms | all resubscribed ms | own p50 ms | own p99 ms | missed per client | delivered | duplicates | not recovered | recoveries ok / failed / publications re-sent | store reads / publishes | gaps healed | server CPU s | harness CPU s |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        cmdline.join(" "),
        a.clients,
        a.rate,
        a.payload,
        a.warmup_secs,
        a.outage_ms,
        a.reconnect_to.describe(),
        a.after_secs,
        a.connect_parallel,
        r.reps.len(),
    );
    for rep in &r.reps {
        s.push_str(&row(rep));
        s.push('\n');
    }
    let med = |f: &dyn Fn(&RecoveryRep) -> f64| {
        crate::report::median(r.reps.iter().map(f).filter(|v| v.is_finite()).collect())
    };
    s.push_str(&format!(
        "\nMedians over {} rep(s): p50 {} ms, p99 {} ms, slowest client {} ms after the reconnection began (every first connection, without a position: {} ms); delivered {}; duplicates {}; store reads {}.\n",
        r.reps.len(),
        opt(med(&|x| x.p50_ms), 0),
        opt(med(&|x| x.p99_ms), 0),
        opt(med(&|x| x.max_ms), 0),
        opt(med(&|x| x.first_connect_ms), 0),
        opt(med(&|x| x.delivered_fraction), 4),
        opt(med(&|x| x.duplicates as f64), 0),
        opt(med(&|x| x.store_reads as f64), 0),
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_in_order_leave_nothing_missing() {
        let mut o = Offsets::from(10);
        for n in 11..=20 {
            assert!(o.record(n));
        }
        assert_eq!(o.contiguous(), 20);
        assert_eq!(o.missing(20), 0);
        assert_eq!(o.expected(20), 10);
        assert_eq!((o.duplicates, o.late), (0, 0));
        // Not yet received: missing until they come.
        assert_eq!(o.missing(23), 3);
    }

    #[test]
    fn offsets_count_duplicates_at_and_below_the_base_and_again() {
        let mut o = Offsets::from(10);
        assert!(!o.record(10));
        assert!(!o.record(3));
        assert!(o.record(11));
        assert!(!o.record(11));
        assert_eq!(o.duplicates, 3);
        assert_eq!(o.contiguous(), 11);
        assert_eq!(o.missing(11), 0);
    }

    #[test]
    fn offsets_keep_holes_until_filled_late() {
        let mut o = Offsets::from(0);
        o.record(1);
        o.record(5);
        o.record(9);
        // Holes 2..=4 and 6..=8.
        assert_eq!(o.contiguous(), 1);
        assert_eq!(o.missing(9), 6);
        assert_eq!(o.missing(3), 2);
        // Filling the middle of a hole splits it.
        assert!(o.record(3));
        assert_eq!(o.missing(9), 5);
        assert!(o.record(2));
        assert!(o.record(4));
        assert_eq!(o.contiguous(), 5);
        assert!(o.record(8));
        assert!(o.record(6));
        assert!(o.record(7));
        assert_eq!(o.contiguous(), 9);
        assert_eq!(o.missing(9), 0);
        assert_eq!(o.late, 6);
        assert_eq!(o.duplicates, 0);
        // A filled offset again is a duplicate.
        assert!(!o.record(6));
        assert_eq!(o.duplicates, 1);
    }

    #[test]
    fn rtk1_frames_are_read() {
        let p = br#"{"type":"pub","topic":"general","o":42,"e":"ab12cd34","d":{"NewMessage":{"room":"general","username":"x","text":"~s1~t2~"}}}"#;
        assert_eq!(
            parse_rtk1(p),
            Rtk1::Pub {
                offset: Some(42),
                epoch: Some("ab12cd34")
            }
        );
        let plain = br#"{"type":"pub","topic":"private-user-1","d":{"o":7}}"#;
        assert_eq!(
            parse_rtk1(plain),
            Rtk1::Pub {
                offset: None,
                epoch: None
            }
        );
        let sub = br#"{"e":"ab12cd34","o":41,"recoverable":true,"recovered":true,"topic":"general","type":"subscribed","was_recovering":true}"#;
        assert_eq!(
            parse_rtk1(sub),
            Rtk1::Subscribed {
                epoch: "ab12cd34".into(),
                offset: 41,
                recovered: true
            }
        );
        assert_eq!(
            parse_rtk1(br#"{"type":"insufficient_state","topic":"general"}"#),
            Rtk1::InsufficientState
        );
        assert_eq!(
            parse_rtk1(br#"{"type":"error","message":"x"}"#),
            Rtk1::Other
        );
        assert_eq!(parse_rtk1(b"not json"), Rtk1::Other);
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 0.5), 50.0);
        assert_eq!(pct(&v, 0.99), 99.0);
        assert_eq!(pct(&v, 1.0), 100.0);
        assert!(pct(&[], 0.5).is_nan());
    }
}
