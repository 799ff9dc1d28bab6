//! The wire formats a connection can speak, and the frames of one publication in each.
//!
//! A connection speaks one [`Format`] for its whole life:
//! - [`Format::Verbatim`] (every connection that did not ask for anything else): each
//!   publication is sent as its payload, verbatim, exactly as 0.1.0 did.
//! - [`Format::Rtk1`] (a connection that opened with `proto=rtk1` or the `rtk1` WebSocket
//!   subprotocol): every frame the kit sends is a JSON object, publications wrapped in a `pub`
//!   envelope that carries the topic and, on positioned topics, the offset and epoch.
//!
//! [`Frames`] holds one publication framed once per format that anyone needs; the dispatcher
//! builds it once per publication and every shard hands each subscriber the frame of its format
//! (a refcount): the encode-once rule holds per format (invariant 2, docs/architecture.md).
//! Each format's frame is a [`PublicationFrames`], so its permessage-deflate frame too is made
//! at most once per publication, for whichever subscribers agreed to compression.

use bytes::Bytes;

use crate::deflate::PublicationFrames;
use crate::frame;
use crate::history::Position;

/// The format a connection receives its frames in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Format {
    /// Payloads verbatim, as 0.1.0.
    #[default]
    Verbatim,
    /// The `rtk1` protocol: JSON envelopes.
    Rtk1,
}

/// One publication, framed once per format.
#[derive(Debug, Clone)]
pub(crate) struct Frames {
    /// The payload as a text frame (binary if it is not UTF-8), and its compressed frame.
    pub(crate) verbatim: PublicationFrames,
    /// The `rtk1` `pub` envelope, and its compressed frame; built when a connection speaks
    /// `rtk1` or the topic keeps history, else `None`.
    pub(crate) rtk1: Option<PublicationFrames>,
    /// Whether the publication has a position (its topic keeps history): a subscriber that
    /// misses it must be told (`insufficient_state`).
    pub(crate) positioned: bool,
}

impl Frames {
    /// Verbatim only (no `rtk1` connection, no history).
    #[cfg(any(test, feature = "__bench_api"))]
    pub(crate) fn verbatim(frame: PublicationFrames) -> Self {
        Self {
            verbatim: frame,
            rtk1: None,
            positioned: false,
        }
    }

    /// The frame for a subscriber speaking `format`; `None` when that format was not built
    /// (an `rtk1` connection that appeared after the publication was framed).
    pub(crate) fn for_format(&self, format: Format) -> Option<&PublicationFrames> {
        match format {
            Format::Verbatim => Some(&self.verbatim),
            Format::Rtk1 => self.rtk1.as_ref(),
        }
    }
}

/// Appends `s` as a JSON string.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a `str` to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// The `rtk1` `pub` envelope of `payload` on `topic`, with its position if it has one:
/// `{"type":"pub","topic":T,"o":N,"e":E,"d":<payload>}`. `d` is the payload itself when it is
/// JSON, else the payload as a JSON string (invalid UTF-8 replaced).
pub(crate) fn rtk1_pub(topic: &str, position: Option<&Position>, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + topic.len() + 64);
    out.extend_from_slice(br#"{"type":"pub","topic":"#);
    push_json_str(&mut out, topic);
    if let Some(p) = position {
        out.extend_from_slice(br#","o":"#);
        out.extend_from_slice(p.offset.to_string().as_bytes());
        out.extend_from_slice(br#","e":"#);
        push_json_str(&mut out, &p.epoch);
    }
    out.extend_from_slice(br#","d":"#);
    if is_json(payload) {
        out.extend_from_slice(payload);
    } else {
        push_json_str(&mut out, &String::from_utf8_lossy(payload));
    }
    out.push(b'}');
    frame::encode_text(&out)
}

/// Whether `payload` is one JSON value (surrounding whitespace allowed).
pub(crate) fn is_json(payload: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
}

/// What a `subscribed` message reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subscribed {
    /// The topic keeps history: a later subscribe may recover from the position.
    pub(crate) recoverable: bool,
    /// The stream's epoch (empty on a topic without history).
    pub(crate) epoch: String,
    /// The last offset the client has now.
    pub(crate) offset: u64,
    /// The client asked to recover (sent `since`).
    pub(crate) was_recovering: bool,
    /// Every publication after `since` follows (or none was missed).
    pub(crate) recovered: bool,
}

/// `{"type":"subscribed","topic":T,"recoverable":B,"e":E,"o":N,"was_recovering":B,"recovered":B}`.
pub(crate) fn rtk1_subscribed(topic: &str, s: &Subscribed) -> Bytes {
    let json = serde_json::json!({
        "type": "subscribed",
        "topic": topic,
        "recoverable": s.recoverable,
        "e": s.epoch,
        "o": s.offset,
        "was_recovering": s.was_recovering,
        "recovered": s.recovered,
    });
    frame::encode_text(json.to_string().as_bytes())
}

/// `{"type":"insufficient_state","topic":T}`.
pub(crate) fn rtk1_insufficient_state(topic: &str) -> Bytes {
    let json = serde_json::json!({ "type": "insufficient_state", "topic": topic });
    frame::encode_text(json.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(frame: &Bytes) -> serde_json::Value {
        serde_json::from_slice(frame::encoded_payload(frame).unwrap()).unwrap()
    }

    #[test]
    fn pub_envelopes_carry_json_as_is_and_anything_else_as_a_string() {
        let p = Position {
            offset: 7,
            epoch: "ab12".into(),
        };
        let f = rtk1_pub("general", Some(&p), br#"{"n":1}"#);
        assert_eq!(
            text(&f),
            serde_json::json!({"type":"pub","topic":"general","o":7,"e":"ab12","d":{"n":1}})
        );
        let f = rtk1_pub("general", None, b"hello");
        assert_eq!(
            text(&f),
            serde_json::json!({"type":"pub","topic":"general","d":"hello"})
        );
    }
}
