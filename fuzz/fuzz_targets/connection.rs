//! The whole inbound path of one connection: client bytes → frame validation → message assembly
//! → JSON decoding → handler dispatch (direct reply, broadcast through the broker and the
//! shard, join/leave, close) → the writer, over in-memory pipes instead of a socket.
//!
//! The connection is the real one: `bench_api::spawn_connection` admits and subscribes it and
//! spawns `connection::run`, as `upgrade_handler` does. A service and a current-thread tokio
//! runtime are built once and reused. The runtime's clock is paused: timers (write delay,
//! heartbeat, close and write timeouts, rate-limit grace) fire as soon as nothing else can run,
//! so an iteration costs CPU time only, and the run is deterministic.
//!
//! Input: `[flags][pre-read length][body…]`. Flags:
//! - bit 0: the body is *records* (below) instead of raw bytes;
//! - bit 1: the client never reads (the server's writes stall until its write timeout);
//! - bit 2: the client keeps its write side open after the body (the server must end the
//!   connection itself: heartbeat, close timeout);
//! - bits 3–4: pipe capacity (16 B, 256 B, 4 KiB, 64 KiB), i.e. how reads and writes are cut.
//!
//! The first `pre-read length` bytes of what the client sends are handed over as the bytes read
//! along with the upgrade request, as for a TCP connection.
//!
//! Records: `[b0][len]…` is one frame sent masked with a fixed key: `b0` is the first header
//! byte as is (FIN, RSV, opcode); `len` bit 7 set sends it unmasked instead; its low 7 bits are
//! the length, 126 and 127 followed by a 2- or 8-byte big-endian length as on the wire. The
//! payload is the next bytes of the input, up to that length (a short one ends the stream
//! inside the frame). `b0 = 0xFF` is instead a pause: the next byte × 20 ms of (virtual) time.
//!
//! After the body the client closes its side (unless bit 2) and reads what the server sends to
//! the end (unless bit 1). Checks, beyond "no panic" (any panic aborts, even one the runtime
//! catches):
//! - the connection task ends within a bound (virtual time, so a hang is found at once);
//! - `connections_active` is back to 0, `on_connect` and `on_disconnect` ran once each;
//! - the connection's shared state is released (no reference left in the shard's topic map, a
//!   sink or a task), and the runtime has as many live tasks as before;
//! - what the server wrote is a valid stream of server frames (see `check_server_output`).

#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum_realtime_kit::bench_api::spawn_connection;
use axum_realtime_kit::ws::service::WebsocketService;
use axum_realtime_kit_fuzz::{Counters, FuzzHandler, check_server_output};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::{Builder, Runtime};

/// Largest message the service accepts: small, so 1009 is easy to reach.
const MAX_MESSAGE: usize = 8 * 1024;
/// The outbound queue bound: small, so the slow-consumer close is reachable too (but room for
/// the echo of the largest message).
const QUEUE_BYTES: usize = 8 * 1024;
const CLOSE_TIMEOUT: Duration = Duration::from_millis(500);
const WRITE_TIMEOUT: Duration = Duration::from_millis(300);
const PING_INTERVAL: Duration = Duration::from_secs(2);
const PONG_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest one connection may take beyond the pauses in its input, in virtual time. Its own
/// timers add up to a few seconds (pong timeout, close timeout, write timeout).
const END_WITHIN: Duration = Duration::from_secs(60);

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const PIPE_CAPACITY: [usize; 4] = [16, 256, 4096, 64 * 1024];
const TOPIC: &str = "room";

struct Env {
    rt: Runtime,
    service: Arc<WebsocketService<FuzzHandler>>,
    /// Live tasks with no connection open: the shard and the dispatcher.
    idle_tasks: usize,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("tokio runtime");
        let service = rt.block_on(async {
            let service = WebsocketService::builder(FuzzHandler, Arc::new(Counters::default()))
                .shards(1)
                .max_message_size(MAX_MESSAGE)
                .outbound_queue_bytes(QUEUE_BYTES)
                .write_delay(Duration::from_millis(2))
                .write_timeout(WRITE_TIMEOUT)
                .close_timeout(CLOSE_TIMEOUT)
                .heartbeat(PING_INTERVAL, PONG_TIMEOUT)
                .rate_limit(Some((200, 50)))
                .max_connections(4)
                .build();
            // Let the shard and dispatcher tasks start.
            tokio::time::sleep(Duration::from_millis(1)).await;
            service
        });
        let idle_tasks = rt.metrics().num_alive_tasks();
        Env {
            rt,
            service,
            idle_tasks,
        }
    })
}

/// What the client does, in order.
enum Step {
    Send(Vec<u8>),
    Pause(Duration),
}

/// Turns the records of the body into steps; see the module docs.
fn records(mut body: &[u8]) -> Vec<Step> {
    fn take(body: &mut &[u8], n: usize) -> Vec<u8> {
        let (head, rest) = body.split_at(n.min(body.len()));
        *body = rest;
        head.to_vec()
    }
    let mut steps = Vec::new();
    while let [b0, rest @ ..] = body {
        body = rest;
        if *b0 == 0xFF {
            let units = take(&mut body, 1).first().copied().unwrap_or(0);
            steps.push(Step::Pause(Duration::from_millis(20 * u64::from(units))));
            continue;
        }
        let Some(&len_byte) = body.first() else {
            steps.push(Step::Send(vec![*b0]));
            break;
        };
        body = &body[1..];
        let masked = len_byte & 0x80 == 0;
        let mut frame = vec![*b0, if masked { 0x80 } else { 0 } | (len_byte & 0x7F)];
        let ext = take(
            &mut body,
            match len_byte & 0x7F {
                126 => 2,
                127 => 8,
                _ => 0,
            },
        );
        let len = match ext.len() {
            2 => u64::from(u16::from_be_bytes([ext[0], ext[1]])),
            8 => u64::from_be_bytes(ext[..].try_into().unwrap()),
            _ => u64::from(len_byte & 0x7F),
        };
        frame.extend_from_slice(&ext);
        if masked {
            frame.extend_from_slice(&KEY);
        }
        let mut payload = take(&mut body, usize::try_from(len).unwrap_or(usize::MAX));
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= KEY[i % 4];
            }
        }
        frame.extend_from_slice(&payload);
        steps.push(Step::Send(frame));
    }
    steps
}

/// Whether `FUZZ_VERBOSE` is set: then each run prints what the server wrote (to look at what
/// one input does: `cargo fuzz run connection <file>`).
fn verbose() -> bool {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("FUZZ_VERBOSE").is_some())
}

/// The server's frames, one line each, for `FUZZ_VERBOSE`. Stops at anything malformed (which
/// `check_server_output` then reports).
fn server_frames(mut out: &[u8]) -> Vec<String> {
    let mut frames = Vec::new();
    while out.len() >= 2 {
        let (len, header) = match out[1] & 0x7F {
            126 if out.len() >= 4 => (usize::from(u16::from_be_bytes([out[2], out[3]])), 4),
            127 if out.len() >= 10 => {
                let len = u64::from_be_bytes(out[2..10].try_into().unwrap());
                (usize::try_from(len).unwrap_or(usize::MAX), 10)
            }
            126 | 127 => break,
            n => (usize::from(n), 2),
        };
        let Some(payload) = out.get(header..).and_then(|p| p.get(..len)) else {
            break;
        };
        let shown = String::from_utf8_lossy(&payload[..len.min(120)]);
        frames.push(format!("op {:#x} len {len}: {shown:?}", out[0] & 0x0F));
        out = &out[header + len..];
    }
    frames
}

fuzz_target!(|data: &[u8]| {
    let [flags, pre_read_len, body @ ..] = data else {
        return;
    };
    let framed = flags & 1 != 0;
    let client_reads = flags & 2 == 0;
    let client_closes = flags & 4 == 0;
    let capacity = PIPE_CAPACITY[usize::from(flags >> 3 & 3)];

    let mut steps = if framed {
        records(body)
    } else {
        vec![Step::Send(body.to_vec())]
    };
    // The pre-read bytes are the first ones the client sends.
    let mut pre_read = Vec::new();
    for step in &mut steps {
        if let Step::Send(bytes) = step {
            let n = (usize::from(*pre_read_len) - pre_read.len()).min(bytes.len());
            pre_read.extend(bytes.drain(..n));
        }
        if pre_read.len() == usize::from(*pre_read_len) {
            break;
        }
    }
    let paused: Duration = steps
        .iter()
        .map(|s| match s {
            Step::Pause(d) => *d,
            Step::Send(_) => Duration::ZERO,
        })
        .sum();

    let env = env();
    let service = &env.service;
    env.rt.block_on(async {
        let (mut client_tx, server_rx) = tokio::io::duplex(capacity);
        let (server_tx, mut client_rx) = tokio::io::duplex(capacity);
        let mut conn = spawn_connection(service, TOPIC, 7, &pre_read, server_rx, server_tx)
            .await
            .expect("connection admitted");

        let send = async move {
            for step in steps {
                match step {
                    Step::Send(bytes) => {
                        if client_tx.write_all(&bytes).await.is_err() {
                            // The server stopped reading.
                            return None;
                        }
                        tokio::task::yield_now().await;
                    }
                    Step::Pause(d) => tokio::time::sleep(d).await,
                }
            }
            if client_closes {
                let _ = client_tx.shutdown().await;
                None
            } else {
                // Held open until the connection ended.
                Some(client_tx)
            }
        };
        let receive = async move {
            if client_reads {
                let mut out = Vec::new();
                let _ = client_rx.read_to_end(&mut out).await;
                (Some(out), None)
            } else {
                (None, Some(client_rx))
            }
        };
        let run = async {
            let (held_tx, (out, held_rx)) = tokio::join!(send, receive);
            conn.finished().await.expect("connection task failed");
            (held_tx, out, held_rx)
        };
        let (held_tx, out, held_rx) = tokio::time::timeout(paused + END_WITHIN, run)
            .await
            .expect("connection did not end in time");
        drop((held_tx, held_rx));
        if let Some(out) = out {
            if verbose() {
                eprintln!("server wrote {} bytes:", out.len());
                for frame in server_frames(&out) {
                    eprintln!("  {frame}");
                }
            }
            check_server_output(&out);
        }

        // Let the shard process the connection's removal and aborted tasks be dropped.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(conn.is_released(), "connection state leaked");
        let metrics = service.metrics();
        if verbose() {
            eprintln!("{metrics:?}");
        }
        assert_eq!(metrics.connections_active, 0, "connection still counted");
        let (connects, disconnects) = service.app_state().get();
        assert_eq!(connects, disconnects, "on_connect/on_disconnect mismatch");
    });
    assert_eq!(
        env.rt.metrics().num_alive_tasks(),
        env.idle_tasks,
        "tasks leaked"
    );
});
