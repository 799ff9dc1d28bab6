//! `failover`: how long delivery stops when the Redis primary dies under Sentinel.
//!
//! Each rep starts a primary, a replica and three sentinels (quorum 2) on free loopback ports,
//! two `basic_chat` instances that find the primary through the sentinels, a subscriber of
//! `general` on instance A and a client on instance B sending numbered `SendMessage`s at
//! `--rate`. Once messages flow, the primary is killed (SIGKILL). Reported: the time from the
//! kill to the first message sent after it that reaches A (delivery resumed), the messages lost
//! meanwhile, and whether either WebSocket client lost its connection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client;
use crate::system::{self, StartOpts, System};

/// Arguments of `failover`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct FailoverArgs {
    /// Repetitions (a fresh primary, replica, sentinels and instances each).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Messages per second sent through instance B.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Sentinel's `down-after-milliseconds`: how long the primary must be unreachable before a
    /// sentinel calls it down. Production configurations often keep the default, 30 000.
    #[arg(long, default_value_t = 1000)]
    down_after_ms: u64,
    /// Longest wait for delivery to resume, in seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// The room: `general` keeps history (positions assigned by Redis), `private` is the
    /// sender's own `private-user-<uuid>` topic, without history.
    #[arg(long, default_value = "general")]
    room: String,
    /// Use the `basic_chat` already built in target/release.
    #[arg(long)]
    no_build: bool,
}

/// One rep.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FailoverRun {
    /// Seconds from the kill to the first message sent after it that reached A.
    resumed_secs: Option<f64>,
    /// Seconds from the kill to the sentinels naming the replica as the primary.
    promoted_secs: Option<f64>,
    /// Messages B's client sent, and how many of them reached A's subscriber (those sent
    /// while there was no primary are refused with an error to the sender).
    messages_sent: u64,
    messages_received: u64,
    /// Whether A's subscriber, and B's sending client, saw their connection close.
    subscriber_disconnected: bool,
    sender_disconnected: bool,
}

const USER_A: &str = "00000000-0000-0000-0000-00000000000a";
const USER_B: &str = "00000000-0000-0000-0000-00000000000b";

/// A child process killed (SIGKILL) and reaped when dropped.
pub(crate) struct Kid(pub(crate) Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn redis_node(
    dir: &std::path::Path,
    port: u16,
    extra: &[String],
) -> std::io::Result<Kid> {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Kid(child))
}

fn sentinel(
    dir: &std::path::Path,
    port: u16,
    primary: u16,
    down_after: u64,
) -> std::io::Result<Kid> {
    let conf = dir.join(format!("sentinel-{port}.conf"));
    std::fs::write(
        &conf,
        format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\n\
             sentinel monitor chat 127.0.0.1 {primary} 2\n\
             sentinel down-after-milliseconds chat {down_after}\n\
             sentinel failover-timeout chat 10000\n\
             sentinel parallel-syncs chat 1\n",
            dir = dir.display()
        ),
    )?;
    let child = Command::new("redis-sentinel")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| std::io::Error::other(format!("redis-sentinel: {e}")))?;
    Ok(Kid(child))
}

async fn query(port: u16, args: &[&str]) -> Result<redis::Value, String> {
    let c = redis::Client::open(format!("redis://127.0.0.1:{port}/")).map_err(|e| e.to_string())?;
    let mut conn = c
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.map_err(|e| e.to_string())
}

/// Waits until `ok` says yes about `port`'s answer to `args`.
async fn wait_for(
    port: u16,
    args: &[&str],
    what: &str,
    ok: impl Fn(&redis::Value) -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(v) = query(port, args).await {
            if ok(&v) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("timed out waiting for {what}"))
}

fn array_len(v: &redis::Value) -> usize {
    match v {
        redis::Value::Array(a) => a.len(),
        _ => 0,
    }
}

/// What one client's reader saw: messages carrying a `~s<seq>~` marker, when the first one
/// numbered `resume_from` or later arrived, and whether the connection closed.
struct Receiver {
    received: AtomicU64,
    /// Microseconds (on [`client::now_micros`]'s clock) when the first message numbered at
    /// least `resume_from` arrived; 0 until then.
    resumed_at: AtomicU64,
    resume_from: AtomicU64,
    closed: AtomicBool,
}

/// Reads server frames off `stream` until it ends, recording them in `rx`.
async fn read_frames(
    mut stream: tokio::net::tcp::OwnedReadHalf,
    mut buf: Vec<u8>,
    rx: Arc<Receiver>,
) {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Parse every complete frame in `buf`.
        let mut pos = 0;
        while buf.len() - pos >= 2 {
            let b = &buf[pos..];
            let (len, hdr) = match b[1] & 0x7F {
                126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                127 if b.len() >= 10 => (
                    u64::from_be_bytes(b[2..10].try_into().unwrap_or([0; 8])) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if b.len() < hdr + len {
                break;
            }
            let opcode = b[0] & 0x0F;
            if opcode == 0x8 {
                let body = &b[hdr..hdr + len];
                if body.len() >= 2 {
                    eprintln!(
                        "  closed by the server: {} {}",
                        u16::from_be_bytes([body[0], body[1]]),
                        String::from_utf8_lossy(&body[2..])
                    );
                }
                rx.closed.store(true, Ordering::Release);
                return;
            }
            if let Some((seq, _)) = client::parse_marker(&b[hdr..hdr + len]) {
                rx.received.fetch_add(1, Ordering::Relaxed);
                let from = rx.resume_from.load(Ordering::Acquire);
                if from > 0 && seq >= from {
                    let _ = rx.resumed_at.compare_exchange(
                        0,
                        client::now_micros(),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                }
            }
            pos += hdr + len;
        }
        buf.drain(..pos);
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                eprintln!("  connection ended without a close frame");
                rx.closed.store(true, Ordering::Release);
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn open(
    addr: SocketAddr,
    room: &str,
    token: &str,
) -> Result<(tokio::net::TcpStream, Vec<u8>), String> {
    match client::handshake(addr, &format!("/ws/{room}?token={token}")).await {
        Ok((101, Some(s))) => Ok(s),
        Ok((status, _)) => Err(format!("upgrade refused: {status}")),
        Err(e) => Err(e.to_string()),
    }
}

async fn one_run(
    args: &FailoverArgs,
    target: &std::path::Path,
    rep: usize,
) -> Result<FailoverRun, String> {
    let io = |e: std::io::Error| e.to_string();
    let dir = std::env::temp_dir().join(format!("loadtest-failover-{}-{rep}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io)?;
    let _cleanup = RemoveDir(dir.clone());
    let (p, r) = (system::free_port(), system::free_port());
    let primary = redis_node(&dir.join("."), p, &[]).map_err(io)?;
    let rdir = dir.join("replica");
    std::fs::create_dir_all(&rdir).map_err(io)?;
    let _replica = redis_node(
        &rdir,
        r,
        &["--replicaof".into(), "127.0.0.1".into(), p.to_string()],
    )
    .map_err(io)?;
    wait_for(r, &["INFO", "replication"], "the replica's sync", |v| {
        matches!(v, redis::Value::BulkString(b) if String::from_utf8_lossy(b).contains("master_link_status:up"))
    })
    .await?;
    let ports: Vec<u16> = (0..3).map(|_| system::free_port()).collect();
    let mut sentinels = Vec::new();
    for &s in &ports {
        sentinels.push(sentinel(&dir, s, p, args.down_after_ms).map_err(io)?);
    }
    for &s in &ports {
        wait_for(
            s,
            &["SENTINEL", "SENTINELS", "chat"],
            "the sentinels to meet",
            |v| array_len(v) >= 2,
        )
        .await?;
        wait_for(
            s,
            &["SENTINEL", "REPLICAS", "chat"],
            "the sentinels to see the replica",
            |v| array_len(v) >= 1,
        )
        .await?;
    }
    let list: Vec<String> = ports.iter().map(|s| format!("127.0.0.1:{s}")).collect();
    let opts = StartOpts {
        redis_url: Some(format!("redis+sentinel://{}/chat", list.join(","))),
        shards: Some(1),
        cpus: None,
        env: std::env::var("LOADTEST_SERVER_LOG")
            .map(|v| vec![("RUST_LOG".to_owned(), v)])
            .unwrap_or_default(),
        binary: None,
    };
    let a = system::start_system(System::Ours, target, &opts).map_err(io)?;
    let b = system::start_system(System::Ours, target, &opts).map_err(io)?;
    let rx = Arc::new(Receiver {
        received: AtomicU64::new(0),
        resumed_at: AtomicU64::new(0),
        resume_from: AtomicU64::new(0),
        closed: AtomicBool::new(false),
    });
    // With `private`, both clients are the same user: the topic is theirs.
    let (room, a_user) = match args.room.as_str() {
        "private" => (format!("private-user-{USER_B}"), USER_B),
        other => (other.to_owned(), USER_A),
    };
    let (sub, rest) = open(a.addr, &room, &format!("{a_user}:alice")).await?;
    let (sub_r, _sub_w) = sub.into_split();
    tokio::spawn(read_frames(sub_r, rest, rx.clone()));
    let (publ, rest) = open(b.addr, &room, &format!("{USER_B}:bob")).await?;
    let (pub_r, mut pub_w) = publ.into_split();
    // B's own copy of each message, and its errors, are read and dropped; a close is noted.
    let echo = Arc::new(Receiver {
        received: AtomicU64::new(0),
        resumed_at: AtomicU64::new(0),
        resume_from: AtomicU64::new(0),
        closed: AtomicBool::new(false),
    });
    tokio::spawn(read_frames(pub_r, rest, echo.clone()));
    // Wait until delivery works end to end.
    let seq = Arc::new(AtomicU64::new(0));
    let sending = {
        let seq = seq.clone();
        let rate = args.rate.max(1);
        let room = room.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            loop {
                tick.tick().await;
                let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
                let mut out = Vec::new();
                while seq.load(Ordering::Relaxed) < due {
                    let s = seq.fetch_add(1, Ordering::Relaxed) + 1;
                    let text = format!(
                        "{{\"SendMessage\":{{\"room\":\"{room}\",\"text\":\"{}\"}}}}",
                        client::marker(s, client::now_micros())
                    );
                    out.extend_from_slice(&client::client_text_frame(text.as_bytes()));
                }
                if !out.is_empty() && pub_w.write_all(&out).await.is_err() {
                    return;
                }
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while rx.received.load(Ordering::Relaxed) < args.rate {
        if Instant::now() > deadline {
            sending.abort();
            return Err("messages did not flow before the failover".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Kill the primary; every message numbered after this point was sent after the kill.
    rx.resume_from
        .store(seq.load(Ordering::Relaxed) + 1, Ordering::Release);
    let killed = client::now_micros();
    drop(primary);
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut promoted = 0;
    while rx.resumed_at.load(Ordering::Acquire) == 0 && Instant::now() < deadline {
        if promoted == 0 {
            let named = query(ports[0], &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "chat"]).await;
            if let Ok(redis::Value::Array(a)) = named {
                if let Some(redis::Value::BulkString(port)) = a.get(1) {
                    if port.as_slice() != p.to_string().as_bytes() {
                        promoted = client::now_micros();
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resumed = rx.resumed_at.load(Ordering::Acquire);
    // A little more traffic after the resume; the clients' connections are checked before the
    // sender stops (its socket then closes).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (sub_closed, sender_closed) = (
        rx.closed.load(Ordering::Acquire),
        echo.closed.load(Ordering::Acquire),
    );
    sending.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = FailoverRun {
        resumed_secs: (resumed > 0).then(|| resumed.saturating_sub(killed) as f64 / 1e6),
        promoted_secs: (promoted > 0).then(|| promoted.saturating_sub(killed) as f64 / 1e6),
        messages_sent: seq.load(Ordering::Relaxed),
        messages_received: rx.received.load(Ordering::Relaxed),
        subscriber_disconnected: sub_closed,
        sender_disconnected: sender_closed,
    };
    drop((a, b, sentinels));
    Ok(run)
}

pub(crate) struct RemoveDir(pub(crate) PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the reps; returns (JSON, Markdown).
pub(crate) async fn failover(
    root: &std::path::Path,
    args: &FailoverArgs,
) -> Result<(String, String), String> {
    if !args.no_build {
        system::build_ours(root).map_err(|e| e.to_string())?;
    }
    let target = system::release_dir(root);
    let mut runs = Vec::new();
    for rep in 0..args.reps.max(1) {
        eprintln!("== failover rep {}/{}", rep + 1, args.reps.max(1));
        let r = one_run(args, &target, rep).await;
        if let Err(e) = &r {
            eprintln!("  failed: {e}");
        }
        runs.push(r);
    }
    let mut md = format!(
        "Sentinel failover: primary + replica + 3 sentinels (quorum 2, down-after-milliseconds \
         {}), two instances, {} messages/s in `{}` through instance B to a subscriber on A; the \
         primary is killed (SIGKILL).\n\n\
         | rep | new primary named after (s) | delivery resumed after (s) | sent | received | lost | subscriber disconnected | sender disconnected |\n\
         |---:|---:|---:|---:|---:|---:|---|---|\n",
        args.down_after_ms, args.rate, args.room
    );
    let mut times = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        match r {
            Ok(r) => {
                if let Some(t) = r.resumed_secs {
                    times.push(t);
                }
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    i + 1,
                    r.promoted_secs.map_or("–".into(), |t| format!("{t:.2}")),
                    r.resumed_secs
                        .map_or("did not resume".into(), |t| format!("{t:.2}")),
                    r.messages_sent,
                    r.messages_received,
                    r.messages_sent.saturating_sub(r.messages_received),
                    if r.subscriber_disconnected {
                        "yes"
                    } else {
                        "no"
                    },
                    if r.sender_disconnected { "yes" } else { "no" },
                ));
            }
            Err(e) => md.push_str(&format!("| {} | failed: {e} | | | | | | |\n", i + 1)),
        }
    }
    times.sort_by(f64::total_cmp);
    if !times.is_empty() {
        let m = times.len() / 2;
        let median = if times.len() % 2 == 1 {
            times[m]
        } else {
            (times[m - 1] + times[m]) / 2.0
        };
        md.push_str(&format!(
            "\nMedian time to resumed delivery: {median:.2} s over {} rep(s).\n",
            times.len()
        ));
    }
    let json: Vec<_> = runs
        .iter()
        .map(|r| r.as_ref().map_err(String::clone))
        .collect();
    Ok((serde_json::to_string_pretty(&json).unwrap_or_default(), md))
}
