//! The lean WebSocket client: a raw TCP handshake, then a read loop that parses server frames
//! with a minimal reader and pulls only a marker (`~s<seq>~t<micros>~`) out of each text frame.
//!
//! Socket.IO servers are reached through the same reader with Engine.IO v4 / Socket.IO v5 framing
//! on top ([`Proto::SocketIo`]): the open packet `0{…}`, the namespace connect `40{auth}` answered
//! by `40{…}` (or refused by `44{…}`), events `42["name",data]`, and the server's heartbeat `2`
//! answered with `3`.
//!
//! Thousands of connections run as tasks on one or two threads; per read, the clock is read once
//! and latency samples go to a shared histogram under one short lock.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Microseconds since the Unix epoch (the publisher stamps messages with the same clock).
pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Builds a payload marker; the rest of the payload is padding.
pub(crate) fn marker(seq: u64, micros: u64) -> String {
    format!("~s{seq}~t{micros}~")
}

/// Finds `~s<seq>~t<micros>~` in a frame.
pub(crate) fn parse_marker(payload: &[u8]) -> Option<(u64, u64)> {
    let start = payload.windows(2).position(|w| w == b"~s")? + 2;
    let mut i = start;
    let mut seq = 0u64;
    while i < payload.len() && payload[i].is_ascii_digit() {
        seq = seq * 10 + (payload[i] - b'0') as u64;
        i += 1;
    }
    if payload.get(i..i + 2)? != b"~t" {
        return None;
    }
    i += 2;
    let mut t = 0u64;
    while i < payload.len() && payload[i].is_ascii_digit() {
        t = t * 10 + (payload[i] - b'0') as u64;
        i += 1;
    }
    Some((seq, t))
}

/// Counters shared by every connection of a run.
#[derive(Debug)]
pub(crate) struct Stats {
    pub(crate) frames: AtomicU64,
    pub(crate) reorders: AtomicU64,
    pub(crate) closes: AtomicU64,
    /// Per connection: marked frames received.
    pub(crate) per_conn: Vec<AtomicU64>,
    pub(crate) latency: Mutex<Histogram<u64>>,
    /// Bytes read off the sockets (frame headers included): what the server put on the wire.
    pub(crate) wire_bytes: AtomicU64,
    /// Whether the connections offer permessage-deflate (and inflate what comes compressed).
    pub(crate) deflate: bool,
}

impl Stats {
    pub(crate) fn new(conns: usize) -> Arc<Self> {
        Self::with_deflate(conns, false)
    }

    /// Counters for `conns` connections that offer permessage-deflate when `deflate` is set.
    pub(crate) fn with_deflate(conns: usize, deflate: bool) -> Arc<Self> {
        Arc::new(Self {
            frames: AtomicU64::new(0),
            reorders: AtomicU64::new(0),
            closes: AtomicU64::new(0),
            per_conn: (0..conns).map(|_| AtomicU64::new(0)).collect(),
            latency: Mutex::new(new_histogram()),
            wire_bytes: AtomicU64::new(0),
            deflate,
        })
    }

    /// Swaps the latency histogram for an empty one and returns the old one.
    pub(crate) fn take_latency(&self) -> Histogram<u64> {
        std::mem::replace(&mut *self.latency.lock().unwrap(), new_histogram())
    }

    pub(crate) fn per_conn_snapshot(&self) -> Vec<u64> {
        self.per_conn.iter().map(|c| c.load(Relaxed)).collect()
    }
}

/// Latency in microseconds, 1 µs to 100 s, 3 significant digits.
pub(crate) fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds")
}

/// `~s` sequence checking: per connection, sequences must increase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SeqCheck {
    /// One publisher per topic: every frame's seq must be larger than the previous one.
    Increasing,
    /// Many publishers per topic: no ordering check.
    None,
}

/// The protocol a server speaks over its WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Proto {
    /// The `basic_chat` contract: `GET /ws/<topic>?token=…`, messages as plain text frames.
    #[default]
    Rtk,
    /// Socket.IO v5 over Engine.IO v4, WebSocket transport only: topic and token in the
    /// namespace connect packet's auth, messages as `42["NewMessage",{…}]` events.
    SocketIo,
}

/// The Engine.IO request path of a WebSocket-only Socket.IO client.
pub(crate) const SIO_PATH: &str = "/socket.io/?EIO=4&transport=websocket";

/// The Engine.IO heartbeat answer (`3`, pong) as a client frame.
fn sio_pong_frame() -> bytes::BytesMut {
    client_text_frame(b"3")
}

/// The namespace connect packet for `/` with the contract's auth payload.
pub(crate) fn sio_connect_packet(topic: &str, token: &str) -> String {
    format!(r#"40{{"token":"{token}","topic":"{topic}"}}"#)
}

/// A Socket.IO `send` event posting `text` to `room` (the text is plain: no JSON escapes).
pub(crate) fn sio_send_event(room: &str, text: &str) -> String {
    format!(r#"42["send",{{"room":"{room}","text":"{text}"}}]"#)
}

/// Splits a `basic_chat` path `/ws/<topic>?token=<token>` into (topic, token).
pub(crate) fn split_rtk_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/ws/")?;
    let (topic, query) = rest.split_once('?')?;
    let token = query.split('&').find_map(|kv| kv.strip_prefix("token="))?;
    Some((topic, token))
}

/// The next whole frame in `b`: (opcode, payload, bytes it takes), unmasked server frames only.
pub(crate) fn next_frame(b: &[u8]) -> Option<(u8, &[u8], usize)> {
    if b.len() < 2 {
        return None;
    }
    let (len, hdr) = match b[1] & 0x7F {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if b.len() < hdr + len {
        return None;
    }
    Some((b[0] & 0x0F, &b[hdr..hdr + len], hdr + len))
}

/// Opens a Socket.IO connection to namespace `/` with (topic, token) as auth. `Ok(None)` when
/// the upgrade or the namespace connect is refused; otherwise the stream and the bytes read
/// past the connect answer.
pub(crate) async fn sio_handshake(
    addr: SocketAddr,
    topic: &str,
    token: &str,
) -> std::io::Result<Option<(TcpStream, Vec<u8>)>> {
    let (status, conn) = handshake(addr, SIO_PATH).await?;
    let Some((mut stream, mut buf)) = conn else {
        let _ = status;
        return Ok(None);
    };
    stream
        .write_all(&client_text_frame(
            sio_connect_packet(topic, token).as_bytes(),
        ))
        .await?;
    loop {
        let mut pos = 0;
        while let Some((opcode, payload, used)) = next_frame(&buf[pos..]) {
            pos += used;
            match opcode {
                0x8 => return Ok(None),
                0x1 if payload.starts_with(b"40") => {
                    buf.drain(..pos);
                    return Ok(Some((stream, buf)));
                }
                0x1 if payload.starts_with(b"44") => return Ok(None),
                0x1 if payload == b"2" => stream.write_all(&sio_pong_frame()).await?,
                _ => {}
            }
        }
        buf.drain(..pos);
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Opens a WebSocket connection; returns the HTTP status and, on 101, the stream.
pub(crate) async fn handshake(
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<(u16, Option<(TcpStream, Vec<u8>)>)> {
    handshake_with(addr, path, false).await
}

/// [`handshake`], offering permessage-deflate (as browsers do) when `deflate` is set.
pub(crate) async fn handshake_with(
    addr: SocketAddr,
    path: &str,
    deflate: bool,
) -> std::io::Result<(u16, Option<(TcpStream, Vec<u8>)>)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let offer = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut chunk = [0u8; 512];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let status = std::str::from_utf8(&buf[..end])
        .ok()
        .and_then(|h| h.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    if status != 101 {
        return Ok((status, None));
    }
    let rest = buf[end..].to_vec();
    Ok((status, Some((stream, rest))))
}

/// A masked client text frame with a zero key (valid, and leaves the payload as it is).
pub(crate) fn client_text_frame(payload: &[u8]) -> bytes::BytesMut {
    axum_realtime_kit::bench_api::masked_client_frame(payload, [0; 4])
}

/// Reads frames until the stream ends, recording every marked frame and answering pings.
pub(crate) async fn read_loop(
    mut read: OwnedReadHalf,
    mut buf: Vec<u8>,
    idx: usize,
    stats: Arc<Stats>,
    check: SeqCheck,
    sio: Option<OwnedWriteHalf>,
) {
    buf.reserve(16 * 1024);
    stats.wire_bytes.fetch_add(buf.len() as u64, Relaxed);
    let mut inflater = flate2::Decompress::new(false);
    let mut inflated = Vec::new();
    let pong = sio.as_ref().map(|_| sio_pong_frame());
    let mut last_seq: Option<u64> = None;
    let mut samples: Vec<u64> = Vec::with_capacity(64);
    loop {
        let mut pos = 0;
        let now = now_micros();
        let mut frames = 0u64;
        let mut marked = 0u64;
        let mut reorders = 0u64;
        loop {
            let b = &buf[pos..];
            if b.len() < 2 {
                break;
            }
            let (len, hdr) = match b[1] & 0x7F {
                126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
                127 if b.len() >= 10 => (
                    u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if b.len() < hdr + len {
                break;
            }
            let opcode = b[0] & 0x0F;
            let mut payload = &b[hdr..hdr + len];
            if b[0] & 0x40 != 0 {
                // Compressed (RSV1): inflated whole, without context takeover.
                inflate(&mut inflater, payload, &mut inflated);
                payload = &inflated;
            }
            if opcode == 0x8 {
                stats.closes.fetch_add(1, Relaxed);
                return;
            }
            if opcode == 0x9 {
                // A WebSocket ping, answered as any client would, or the server closes the
                // connection a pong timeout later. The pong goes out through the shared socket:
                // a server pings only a connection it has not heard from for a whole interval,
                // so none of this client's frames is half-written meanwhile.
                let pong =
                    axum_realtime_kit::bench_api::client_frame(true, 0xA, payload, Some([0; 4]));
                let _ = read.as_ref().try_write(&pong);
            }
            if opcode == 0x1 && sio.is_some() && !payload.starts_with(b"42") {
                if payload == b"2" {
                    // Heartbeat: a 7-byte pong goes out whole unless the socket is dead.
                    if let (Some(w), Some(p)) = (sio.as_ref(), pong.as_ref()) {
                        let _ = w.try_write(p);
                    }
                }
            } else if opcode == 0x1 {
                frames += 1;
                if let Some((seq, t)) = parse_marker(payload) {
                    marked += 1;
                    samples.push(now.saturating_sub(t).max(1));
                    if check == SeqCheck::Increasing {
                        if let Some(prev) = last_seq {
                            if seq <= prev {
                                reorders += 1;
                            }
                        }
                        last_seq = Some(seq);
                    }
                }
            }
            pos += hdr + len;
        }
        buf.drain(..pos);
        if frames > 0 {
            stats.frames.fetch_add(frames, Relaxed);
        }
        if marked > 0 {
            stats.per_conn[idx].fetch_add(marked, Relaxed);
            let mut h = stats.latency.lock().unwrap();
            for s in samples.drain(..) {
                let _ = h.record(s);
            }
        }
        if reorders > 0 {
            stats.reorders.fetch_add(reorders, Relaxed);
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        match read.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                stats.wire_bytes.fetch_add(n as u64, Relaxed);
            }
        }
    }
}

/// Inflates one permessage-deflate message into `out` (replacing its contents).
fn inflate(d: &mut flate2::Decompress, data: &[u8], out: &mut Vec<u8>) {
    d.reset(false);
    out.clear();
    out.reserve(data.len() * 8 + 1024);
    for input in [data, &[0, 0, 0xff, 0xff][..]] {
        let mut input = input;
        loop {
            let before = d.total_in();
            if d.decompress_vec(input, out, flate2::FlushDecompress::Sync)
                .is_err()
            {
                return;
            }
            input = &input[(d.total_in() - before) as usize..];
            if input.is_empty() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity());
        }
    }
}

/// One open client connection: its write half, for senders.
pub(crate) type Writer = OwnedWriteHalf;

/// Opens `n` connections with at most `parallel` handshakes in flight; each runs
/// [`read_loop`]. Returns the write halves (in index order) and the number of failures.
pub(crate) async fn open_many(
    addr: SocketAddr,
    paths: Vec<String>,
    parallel: usize,
    stats: Arc<Stats>,
    check: SeqCheck,
) -> (Vec<Option<Writer>>, u64) {
    let dests = paths.into_iter().map(|p| (addr, p)).collect();
    open_many_to(dests, parallel, stats, check).await
}

/// [`open_many`] with a server address per connection (instances sharing one Redis).
pub(crate) async fn open_many_to(
    dests: Vec<(SocketAddr, String)>,
    parallel: usize,
    stats: Arc<Stats>,
    check: SeqCheck,
) -> (Vec<Option<Writer>>, u64) {
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut handles = Vec::with_capacity(dests.len());
    for (idx, (addr, path)) in dests.into_iter().enumerate() {
        let sem = sem.clone();
        let stats = stats.clone();
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.ok()?;
            let offer = stats.deflate;
            let res =
                tokio::time::timeout(Duration::from_secs(10), handshake_with(addr, &path, offer))
                    .await;
            match res {
                Ok(Ok((101, Some((stream, rest))))) => {
                    let (r, w) = stream.into_split();
                    tokio::spawn(read_loop(r, rest, idx, stats, check, None));
                    Some(w)
                }
                _ => None,
            }
        }));
    }
    let mut writers = Vec::with_capacity(handles.len());
    let mut failures = 0;
    for h in handles {
        let w = h.await.ok().flatten();
        if w.is_none() {
            failures += 1;
        }
        writers.push(w);
    }
    (writers, failures)
}

/// Opens `dests.len()` Socket.IO connections, each given as its `basic_chat` path (topic and
/// token go into the connect packet), with at most `parallel` in flight. Each reader owns its
/// connection (it answers the heartbeat); aborting its handle closes the connection. Returns
/// the handles (in index order, `None` for a failure) and the number of failures.
pub(crate) async fn open_many_sio(
    addr: SocketAddr,
    paths: Vec<String>,
    parallel: usize,
    stats: Arc<Stats>,
    check: SeqCheck,
) -> (Vec<Option<tokio::task::JoinHandle<()>>>, u64) {
    let sem = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut handles = Vec::with_capacity(paths.len());
    for (idx, path) in paths.into_iter().enumerate() {
        let sem = sem.clone();
        let stats = stats.clone();
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await.ok()?;
            let (topic, token) = split_rtk_path(&path)?;
            let res =
                tokio::time::timeout(Duration::from_secs(10), sio_handshake(addr, topic, token))
                    .await;
            match res {
                Ok(Ok(Some((stream, rest)))) => {
                    let (r, w) = stream.into_split();
                    Some(tokio::spawn(read_loop(r, rest, idx, stats, check, Some(w))))
                }
                _ => None,
            }
        }));
    }
    let mut readers = Vec::with_capacity(handles.len());
    let mut failures = 0;
    for h in handles {
        let r = h.await.ok().flatten();
        if r.is_none() {
            failures += 1;
        }
        readers.push(r);
    }
    (readers, failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_inside_json() {
        let m = marker(42, 1_700_000_000_123_456);
        let json =
            format!(r#"{{"NewMessage":{{"room":"general","username":"x","text":"{m}pad"}}}}"#);
        assert_eq!(
            parse_marker(json.as_bytes()),
            Some((42, 1_700_000_000_123_456))
        );
        assert_eq!(parse_marker(b"no marker"), None);
    }

    #[test]
    fn socketio_packets() {
        assert_eq!(
            split_rtk_path("/ws/general?token=abc:load"),
            Some(("general", "abc:load"))
        );
        assert_eq!(
            sio_connect_packet("general", "abc:load"),
            r#"40{"token":"abc:load","topic":"general"}"#
        );
        let event = format!(
            r#"42["NewMessage",{{"room":"general","username":"x","text":"{}"}}]"#,
            marker(7, 99)
        );
        assert_eq!(parse_marker(event.as_bytes()), Some((7, 99)));
        let frame = [0x81, 0x01, b'2'];
        assert_eq!(next_frame(&frame), Some((0x1, &b"2"[..], 3)));
        assert_eq!(next_frame(&frame[..2]), None);
    }
}
