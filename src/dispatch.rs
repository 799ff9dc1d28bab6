//! The dispatcher: the one task between the broker and the shards.
//!
//! The broker hands over each message it receives as a [`Published`], in its own order, through
//! one bounded channel. The [`Dispatcher`] frames the payload once — a WebSocket text frame in
//! shared [`Bytes`] — and sends that frame to every shard over each shard's FIFO command channel
//! (invariant 2, encode once). Being a single task that awaits each send in turn, it keeps the
//! broker's order for every shard (invariant 1), and it waits only when a shard's channel is
//! full: never on a client (invariant 3).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::frame;
use crate::shard::Command;

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
    last: Option<Bytes>,
}

impl Dispatcher {
    pub(crate) fn new(shards: Arc<[mpsc::Sender<Command>]>) -> Self {
        Self { shards, last: None }
    }

    /// Frames `payload` once (or reuses the frame of an identical previous payload).
    pub(crate) fn frame_for(&mut self, payload: &Bytes) -> Bytes {
        if let Some(frame) = &self.last {
            if frame::encoded_payload(frame) == Some(&payload[..]) {
                return frame.clone();
            }
        }
        let frame = frame::encode_text(payload);
        self.last = Some(frame.clone());
        frame
    }

    /// Sends one message to every shard, in order. Waits only when a shard's channel is full.
    pub(crate) async fn dispatch(&mut self, msg: Published) {
        let frame = self.frame_for(&msg.payload);
        for shard in self.shards.iter() {
            let _ = shard
                .send(Command::Deliver {
                    topic: msg.topic.clone(),
                    frame: frame.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An identical payload reuses the previous frame, whatever buffer it arrives in; any other
    /// payload, even one the previous ends with, gets its own.
    #[test]
    fn an_identical_payload_reuses_the_frame_and_no_other_does() {
        let mut d = Dispatcher::new(Arc::from(Vec::new()));
        let first = d.frame_for(&Bytes::from_static(b"{\"n\":1}"));
        let again = d.frame_for(&Bytes::copy_from_slice(b"{\"n\":1}"));
        assert_eq!(first.as_ptr(), again.as_ptr(), "framed once");
        let suffix = d.frame_for(&Bytes::from_static(b"\"n\":1}"));
        assert_eq!(frame::encoded_payload(&suffix), Some(&b"\"n\":1}"[..]));
        let long = Bytes::from(vec![b'x'; 300]);
        let (a, b) = (d.frame_for(&long), d.frame_for(&long.clone()));
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(frame::encoded_payload(&a), Some(&long[..]));
    }
}
