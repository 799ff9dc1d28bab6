//! The dispatcher: the one task between the broker and the shards.
//!
//! The broker hands over each message it receives as a [`Published`], in its own order, through
//! one bounded channel. The [`Dispatcher`] frames the payload once — a WebSocket text frame in
//! shared [`Bytes`], or a binary frame for a payload that is not UTF-8 (any program may publish
//! on the instances' Redis channels, and a browser fails a connection on a text frame that is not
//! UTF-8) — and sends that frame to every shard over each shard's FIFO command channel
//! (invariant 2, encode once). A payload whose frame is larger than the outbound queue bound
//! (`outbound_queue_bytes`) could never be queued for anyone and would close every subscriber it
//! is queued for: it is dropped here, counted (`broker_oversized_drops`) and logged at most once
//! every [`OVERSIZED_LOG_EVERY`]. Being a single task that awaits each send in turn, it keeps the
//! broker's order for every shard (invariant 1), and it waits only when a shard's channel is
//! full: never on a client (invariant 3).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::deflate::PublicationFrames;
use crate::frame;
use crate::metrics::Metrics;
use crate::shard::Command;

/// Most one warning about dropped oversized payloads per this long.
pub(crate) const OVERSIZED_LOG_EVERY: Duration = Duration::from_secs(10);

/// One message as the broker delivered it: the topic and the payload to send verbatim.
#[derive(Debug)]
pub(crate) struct Published {
    pub(crate) topic: Arc<str>,
    pub(crate) payload: Bytes,
    /// When the broker received it.
    pub(crate) since: Instant,
}

/// Encodes each published payload once and hands the frame to every shard.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    shards: Arc<[mpsc::Sender<Command>]>,
    /// The frame of the previous payload: an identical payload published again (to the same or
    /// another topic) reuses it instead of encoding it again. The payload is compared with the
    /// frame's own copy of it, so no slice of the broker's read buffer is kept: one would keep
    /// the whole buffer (64 KiB) allocated for as long as the frame is cached.
    last: Option<PublicationFrames>,
    /// Largest frame a connection's outbound queue can hold (`outbound_queue_bytes`).
    max_frame: usize,
    metrics: Arc<Metrics>,
    /// Oversized payloads dropped since the last warning, and when that was.
    oversized: (u64, Option<Instant>),
}

impl Dispatcher {
    /// A dispatcher without a frame bound (the benches' and tests' one).
    pub(crate) fn new(shards: Arc<[mpsc::Sender<Command>]>) -> Self {
        Self::bounded(shards, usize::MAX, Arc::default())
    }

    /// A dispatcher that drops (and counts in `metrics`) a payload whose frame exceeds
    /// `max_frame` bytes.
    pub(crate) fn bounded(
        shards: Arc<[mpsc::Sender<Command>]>,
        max_frame: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            shards,
            last: None,
            max_frame,
            metrics,
            oversized: (0, None),
        }
    }

    /// Frames `payload` once (or reuses the frames of an identical previous payload, its
    /// compressed frame included): a text frame, or a binary one if the payload is not UTF-8.
    pub(crate) fn frame_for(&mut self, payload: &Bytes) -> PublicationFrames {
        if let Some(frames) = &self.last {
            if frame::encoded_payload(frames.plain()) == Some(&payload[..]) {
                return frames.clone();
            }
        }
        let frame = if std::str::from_utf8(payload).is_ok() {
            frame::encode_text(payload)
        } else {
            frame::encode(frame::OpCode::Binary, payload)
        };
        let frames = PublicationFrames::new(frame);
        self.last = Some(frames.clone());
        frames
    }

    /// Counts a dropped oversized payload; warns at most once per [`OVERSIZED_LOG_EVERY`].
    fn oversized(&mut self, msg: &Published) {
        self.metrics.broker_oversized_drop();
        self.oversized.0 += 1;
        let now = Instant::now();
        if self
            .oversized
            .1
            .is_none_or(|at| now.duration_since(at) >= OVERSIZED_LOG_EVERY)
        {
            tracing::warn!(
                topic = %msg.topic,
                bytes = msg.payload.len(),
                max = self.max_frame,
                dropped = self.oversized.0,
                "broker payloads larger than the outbound queue bound dropped"
            );
            self.oversized = (0, Some(now));
        }
    }

    /// Sends one message to every shard, in order. Waits only when a shard's channel is full.
    pub(crate) async fn dispatch(&mut self, msg: Published) {
        if frame_len(msg.payload.len()) > self.max_frame {
            self.oversized(&msg);
            return;
        }
        let frames = self.frame_for(&msg.payload);
        for shard in self.shards.iter() {
            let _ = shard
                .send(Command::Deliver {
                    topic: msg.topic.clone(),
                    frames: frames.clone(),
                    since: msg.since,
                })
                .await;
        }
    }

    /// Runs until every sender of `rx` is gone.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Published>) {
        let mut batch = Vec::with_capacity(64);
        while rx.recv_many(&mut batch, 64).await > 0 {
            for msg in batch.drain(..) {
                self.dispatch(msg).await;
            }
        }
    }
}

/// The length of the frame `frame::encode` writes for a payload of `len` bytes.
fn frame_len(len: usize) -> usize {
    let header = match len {
        0..126 => 2,
        126..65536 => 4,
        _ => 10,
    };
    len.saturating_add(header)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An identical payload reuses the previous frame, whatever buffer it arrives in; any other
    /// payload, even one the previous ends with, gets its own.
    #[test]
    fn an_identical_payload_reuses_the_frame_and_no_other_does() {
        let mut d = Dispatcher::new(Arc::from(Vec::new()));
        let mut frame_for = |p: &Bytes| d.frame_for(p).plain().clone();
        let first = frame_for(&Bytes::from_static(b"{\"n\":1}"));
        let again = frame_for(&Bytes::copy_from_slice(b"{\"n\":1}"));
        assert_eq!(first.as_ptr(), again.as_ptr(), "framed once");
        let suffix = frame_for(&Bytes::from_static(b"\"n\":1}"));
        assert_eq!(frame::encoded_payload(&suffix), Some(&b"\"n\":1}"[..]));
        let long = Bytes::from(vec![b'x'; 300]);
        let (a, b) = (frame_for(&long), frame_for(&long.clone()));
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(frame::encoded_payload(&a), Some(&long[..]));
    }

    #[test]
    fn frame_len_is_the_encoded_length() {
        for len in [0, 125, 126, 65535, 65536, 70000] {
            let payload = vec![b'x'; len];
            assert_eq!(frame_len(len), frame::encode_text(&payload).len(), "{len}");
        }
    }
}
