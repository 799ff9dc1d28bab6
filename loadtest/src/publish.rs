//! Publishers that send marked messages at a fixed rate: straight to Redis (pipelined PUBLISH
//! commands on one connection) or through the server itself (`SendMessage` over WebSocket).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use crate::client::{self, marker, now_micros};

/// Where published messages enter.
#[derive(Debug)]
pub(crate) enum Sink {
    /// PUBLISH on Redis; replies are read and dropped by a background task.
    Redis(OwnedWriteHalf),
    /// One WebSocket connection per topic, sending `SendMessage`.
    Ws(Vec<OwnedWriteHalf>),
    /// One Socket.IO connection per topic, emitting `send`; each flag says its reader saw a
    /// heartbeat ping that the next write answers.
    Sio(Vec<(OwnedWriteHalf, Arc<AtomicBool>)>),
}

/// Sends marked messages round-robin over `topics`, keeping a sequence number per topic.
#[derive(Debug)]
pub(crate) struct Publisher {
    sink: Sink,
    topics: Vec<String>,
    /// Next sequence number per topic (never reset, so ordering holds across steps).
    seq: Vec<u64>,
    payload_size: usize,
    /// Dashboard-like JSON (varied numbers and names) instead of padding, for compression.
    json: bool,
}

impl Publisher {
    pub(crate) async fn redis(
        redis: SocketAddr,
        topics: Vec<String>,
        payload_size: usize,
    ) -> std::io::Result<Self> {
        let stream = TcpStream::connect(redis).await?;
        stream.set_nodelay(true)?;
        let (mut r, w) = stream.into_split();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let seq = vec![0; topics.len()];
        Ok(Self {
            sink: Sink::Redis(w),
            topics,
            seq,
            payload_size,
            json: false,
        })
    }

    /// One publishing connection per topic, authenticated with `token_for(topic index)`.
    pub(crate) async fn websocket(
        server: SocketAddr,
        topics: Vec<String>,
        tokens: Vec<String>,
        payload_size: usize,
    ) -> std::io::Result<Self> {
        let mut writers = Vec::new();
        for (topic, token) in topics.iter().zip(&tokens) {
            let path = format!("/ws/{topic}?token={token}");
            let (status, conn) = client::handshake(server, &path).await?;
            let Some((stream, _)) = conn else {
                return Err(std::io::Error::other(format!(
                    "publisher upgrade to {topic} refused: {status}"
                )));
            };
            let (mut r, w) = stream.into_split();
            // Its own echoes are not measured: drain them.
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
            });
            writers.push(w);
        }
        let seq = vec![0; topics.len()];
        Ok(Self {
            sink: Sink::Ws(writers),
            topics,
            seq,
            payload_size,
            json: false,
        })
    }

    /// Publishes dashboard-like JSON instead of padding (Redis publisher only): what
    /// compression meets in a real application, where padding would compress to nothing.
    pub(crate) fn with_json(mut self, json: bool) -> Self {
        self.json = json;
        self
    }

    /// A dashboard update of about `payload_size` bytes carrying `mark`: rows of symbols,
    /// prices and volumes that vary with the sequence number, as live data does.
    fn dashboard(&self, mark: &str, seq: u64) -> String {
        const NAMES: [&str; 8] = [
            "ACME", "GLOBEX", "INITECH", "UMBRELLA", "HOOLI", "STARK", "WAYNE", "TYRELL",
        ];
        let mut s = format!("{{\"type\":\"quotes\",\"mark\":\"{mark}\",\"rows\":[");
        let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut i = 0;
        while s.len() + 100 < self.payload_size {
            // xorshift: numbers that differ from row to row and message to message.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let _ = write!(
                s,
                "{{\"symbol\":\"{}\",\"price\":{}.{:02},\"change\":{:.2},\"volume\":{},\"ts\":{}}},",
                NAMES[i % NAMES.len()],
                x % 900 + 100,
                (x >> 10) % 100,
                ((x >> 20) % 1000) as f64 / 100.0 - 5.0,
                (x >> 30) % 1_000_000,
                1_700_000_000_000u64 + (x >> 40) % 100_000,
            );
            i += 1;
        }
        if s.ends_with(',') {
            s.pop();
        }
        s.push_str("]}");
        s
    }

    /// One Socket.IO publishing connection per topic, authenticated with `token_for(topic
    /// index)`: the socket joins the room and emits `send` events to it.
    pub(crate) async fn socketio(
        server: SocketAddr,
        topics: Vec<String>,
        tokens: Vec<String>,
        payload_size: usize,
    ) -> std::io::Result<Self> {
        let mut writers = Vec::new();
        for (topic, token) in topics.iter().zip(&tokens) {
            let Some((stream, _)) = client::sio_handshake(server, topic, token).await? else {
                return Err(std::io::Error::other(format!(
                    "publisher connect to {topic} refused"
                )));
            };
            let (mut r, w) = stream.into_split();
            let ping = Arc::new(AtomicBool::new(false));
            let seen = ping.clone();
            // Its own echoes are not measured: drain them, noting heartbeats.
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    // A ping is the 3-byte frame 0x81 0x01 '2'; it is small and never split.
                    if buf[..n].windows(3).any(|w| w == [0x81, 0x01, b'2']) {
                        seen.store(true, Relaxed);
                    }
                }
            });
            writers.push((w, ping));
        }
        let seq = vec![0; topics.len()];
        Ok(Self {
            sink: Sink::Sio(writers),
            topics,
            seq,
            payload_size,
            json: false,
        })
    }

    fn padded(&self, mark: &str, overhead: usize) -> String {
        let pad = self.payload_size.saturating_sub(mark.len() + overhead);
        let mut s = String::with_capacity(mark.len() + pad);
        s.push_str(mark);
        s.extend(std::iter::repeat_n('x', pad));
        s
    }

    /// Appends message `k` (round-robin topic) to `out`; returns its topic index.
    fn encode(&mut self, k: u64, out: &mut Vec<u8>, ws_batches: &mut [Vec<u8>]) -> usize {
        let t = (k % self.topics.len() as u64) as usize;
        self.seq[t] += 1;
        let mark = marker(self.seq[t], now_micros());
        match &self.sink {
            Sink::Redis(_) => {
                // {"m":"<marker+pad>"}: 8 bytes of JSON around the text.
                let body = if self.json {
                    self.dashboard(&mark, self.seq[t])
                } else {
                    format!("{{\"m\":\"{}\"}}", self.padded(&mark, 8))
                };
                let topic = &self.topics[t];
                out.extend_from_slice(
                    format!(
                        "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{}\r\n${}\r\n",
                        topic.len(),
                        topic,
                        body.len()
                    )
                    .as_bytes(),
                );
                out.extend_from_slice(body.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            Sink::Ws(_) => {
                let topic = &self.topics[t];
                let text = self.padded(&mark, 40 + topic.len());
                let msg = format!(r#"{{"SendMessage":{{"room":"{topic}","text":"{text}"}}}}"#);
                ws_batches[t].extend_from_slice(&client::client_text_frame(msg.as_bytes()));
            }
            Sink::Sio(_) => {
                let topic = &self.topics[t];
                let text = self.padded(&mark, 60 + topic.len());
                let msg = client::sio_send_event(topic, &text);
                ws_batches[t].extend_from_slice(&client::client_text_frame(msg.as_bytes()));
            }
        }
        t
    }

    /// Publishes `rate` messages per second for `duration`, in 1 ms ticks. Returns how many
    /// went to each topic.
    pub(crate) async fn run(&mut self, rate: f64, duration: Duration) -> std::io::Result<Vec<u64>> {
        let mut counts = vec![0u64; self.topics.len()];
        let start = Instant::now();
        let mut sent: u64 = 0;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut out = Vec::new();
        let mut ws_batches = vec![Vec::new(); self.topics.len()];
        loop {
            tick.tick().await;
            let elapsed = start.elapsed();
            let target = if elapsed >= duration {
                (rate * duration.as_secs_f64()) as u64
            } else {
                (rate * elapsed.as_secs_f64()) as u64
            };
            out.clear();
            while sent < target {
                let t = self.encode(sent, &mut out, &mut ws_batches);
                counts[t] += 1;
                sent += 1;
            }
            match &mut self.sink {
                Sink::Redis(w) => {
                    if !out.is_empty() {
                        w.write_all(&out).await?;
                    }
                }
                Sink::Ws(writers) => {
                    for (w, batch) in writers.iter_mut().zip(ws_batches.iter_mut()) {
                        if !batch.is_empty() {
                            w.write_all(batch).await?;
                            batch.clear();
                        }
                    }
                }
                Sink::Sio(writers) => {
                    for ((w, ping), batch) in writers.iter_mut().zip(ws_batches.iter_mut()) {
                        if ping.swap(false, Relaxed) {
                            batch.extend_from_slice(&client::client_text_frame(b"3"));
                        }
                        if !batch.is_empty() {
                            w.write_all(batch).await?;
                            batch.clear();
                        }
                    }
                }
            }
            if elapsed >= duration {
                return Ok(counts);
            }
        }
    }
}
