//! permessage-deflate (RFC 7692): the negotiation on the upgrade, the compression of outbound
//! messages and the inflation of inbound ones.
//!
//! **Negotiation.** With [`permessage_deflate`] on, the first `permessage-deflate` offer in the
//! client's `Sec-WebSocket-Extensions` whose parameters are valid is accepted, and the answer
//! always carries `server_no_context_takeover` (each message is compressed on its own, so one
//! compressed frame is valid for every subscriber of a topic) and `client_no_context_takeover`
//! (the client does the same, so the server keeps no inflate state between messages: an idle
//! connection holds nothing for compression). RFC 7692 §7.1.1.1 lets a server add both whatever
//! the offer said. An offer with an unknown, repeated or out-of-range parameter is declined; a
//! client with no acceptable offer gets plain frames.
//!
//! **Window bits.** The compressor (miniz_oxide, pure Rust) always uses a 32 KiB window (15
//! bits). An offer with `server_max_window_bits=N` (8 to 15) is still honoured: the message is
//! cut into pieces of 2^N bytes, each compressed on its own and ending on a byte boundary (a sync
//! flush), so no back-reference reaches further than 2^N bytes; the pieces together are one valid
//! deflate stream. `client_max_window_bits` needs no answer: inflation accepts any window up to
//! 15 bits.
//!
//! **Outbound.** [`PublicationFrames`] holds a publication's plain frame and, computed at most
//! once per instance and window size the first time a compressing subscriber needs it, its
//! compressed frame; every subscriber gets a refcount of one of them (invariant 2,
//! docs/architecture.md). Payloads under the minimum size (default [`THRESHOLD`] bytes) stay
//! plain.
//!
//! **Inbound.** [`inflate`] applies the message size limit to the inflated size while it
//! inflates: a message that would inflate past it is refused (1009) as soon as the limit is
//! passed, never inflated in full. Data that is not valid deflate is refused with 1007.
//!
//! [`permessage_deflate`]: crate::ws::service::WebsocketServiceBuilder::permessage_deflate

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::frame::{self, OpCode, ProtocolError, close_code};

/// Payloads shorter than this many bytes are sent uncompressed (the default of
/// `permessage_deflate_min_size`). Measured on chat and dashboard JSON
/// (`deflate::tests::threshold_figures`, docs/performance-notes.md#deflate-threshold): below it
/// deflate saves a few bytes at most, for the cost of compressing and of the client inflating.
pub(crate) const THRESHOLD: usize = 256;

/// The compression level: zlib's level 6 trade-off, on a payload compressed once per
/// publication.
const LEVEL: u32 = 6;

/// What every deflate stream of a message ends with after a sync flush, removed by the sender
/// and added back by the receiver (RFC 7692 §7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The extension's name in `Sec-WebSocket-Extensions`.
pub(crate) const EXTENSION: &str = "permessage-deflate";

/// What was agreed with one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Agreed {
    /// The largest LZ77 window (in bits, 8 to 15) our messages to this client may use.
    pub(crate) server_window_bits: u8,
    /// Payloads shorter than this go uncompressed (the service's setting).
    pub(crate) min_size: u32,
}

impl Agreed {
    /// Whether a payload of `len` bytes is compressed for this client.
    fn compresses(self, len: usize) -> bool {
        len >= self.min_size as usize
    }
}

/// Picks the first acceptable `permessage-deflate` offer among the `Sec-WebSocket-Extensions`
/// header values; returns what was agreed and the response header's value. `None`: plain frames.
/// `min_size` is the service's `permessage_deflate_min_size`.
pub(crate) fn negotiate<'a>(
    headers: impl IntoIterator<Item = &'a str>,
    min_size: u32,
) -> Option<(Agreed, String)> {
    headers
        .into_iter()
        .flat_map(|value| value.split(','))
        .find_map(|offer| accept_offer(offer, min_size))
}

/// One offer: `permessage-deflate` with valid parameters, each at most once.
fn accept_offer(offer: &str, min_size: u32) -> Option<(Agreed, String)> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(EXTENSION) {
        return None;
    }
    let mut seen = [false; 4];
    let mut server_bits = None;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        let index = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            "server_max_window_bits" => {
                server_bits = Some(window_bits(value?)?);
                2
            }
            "client_max_window_bits" => {
                if let Some(v) = value {
                    window_bits(v)?;
                }
                3
            }
            _ => return None,
        };
        if std::mem::replace(&mut seen[index], true) {
            return None;
        }
    }
    let mut response =
        format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
    if let Some(bits) = server_bits {
        response.push_str(&format!("; server_max_window_bits={bits}"));
    }
    let agreed = Agreed {
        server_window_bits: server_bits.unwrap_or(15),
        min_size,
    };
    Some((agreed, response))
}

/// A window size parameter: a decimal from 8 to 15 without leading zeros.
fn window_bits(value: &str) -> Option<u8> {
    if value.is_empty() || value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

thread_local! {
    /// One compressor per thread, reset for every message (no context takeover). Reused
    /// because a fresh one allocates its window and hash tables each time.
    static COMPRESSOR: RefCell<Compress> =
        RefCell::new(Compress::new(Compression::new(LEVEL), false));
    /// One inflater per thread, reset for every message: a connection holds none while idle.
    static INFLATER: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Compresses `payload` into one final frame with RSV1 set, for a client whose window is
/// `window_bits` (8 to 15): pieces of 2^`window_bits` bytes, each compressed on its own. `None`
/// only if the compressor fails (the caller sends the plain frame).
pub(crate) fn compress_frame(opcode: OpCode, payload: &[u8], window_bits: u8) -> Option<Bytes> {
    let piece = 1usize << window_bits.clamp(8, 15);
    let mut body = Vec::with_capacity(payload.len() / 2 + 64);
    COMPRESSOR.with_borrow_mut(|c| {
        // An empty payload is one empty piece: a sync flush of nothing.
        let mut pieces = payload.chunks(piece);
        let first = pieces.next().unwrap_or_default();
        for chunk in std::iter::once(first).chain(pieces) {
            c.reset();
            loop {
                let taken = c.total_in() as usize;
                c.compress_vec(&chunk[taken..], &mut body, FlushCompress::Sync)
                    .ok()?;
                // The flush is complete once all input is taken and the output did not fill.
                if c.total_in() as usize == chunk.len() && body.len() < body.capacity() {
                    break;
                }
                body.reserve(body.capacity().max(64));
            }
        }
        Some(())
    })?;
    if !body.ends_with(&TAIL) {
        return None;
    }
    body.truncate(body.len() - TAIL.len());
    Some(frame::encode_compressed(opcode, &body))
}

/// A frame for one connection: compressed when deflate was agreed with it and the payload is
/// long enough, plain otherwise. For replies to one client (`WsSink`).
pub(crate) fn frame_for(agreed: Option<Agreed>, opcode: OpCode, payload: &[u8]) -> Bytes {
    agreed
        .filter(|a| a.compresses(payload.len()))
        .and_then(|a| compress_frame(opcode, payload, a.server_window_bits))
        .unwrap_or_else(|| frame::encode(opcode, payload))
}

/// Inflates one compressed message (its payloads joined, without the trailing `00 00 ff ff`).
/// The output is checked against `max` as it grows: a message that would inflate past it fails
/// with 1009 once `max` is passed, with at most `max + 1` bytes allocated.
pub(crate) fn inflate(data: &[u8], max: usize) -> Result<BytesMut, ProtocolError> {
    let too_big = || ProtocolError {
        code: close_code::TOO_BIG,
        reason: "message too big once inflated",
    };
    let invalid = || ProtocolError {
        code: close_code::INVALID_PAYLOAD,
        reason: "invalid compressed data",
    };
    let limit = max.saturating_add(1);
    let mut out: Vec<u8> = Vec::with_capacity(data.len().saturating_mul(3).max(256).min(limit));
    INFLATER.with_borrow_mut(|d| {
        d.reset(false);
        let mut input = data;
        let mut tail_fed = false;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= limit {
                    return Err(too_big());
                }
                let more = out.len().max(4096).min(limit - out.len());
                out.reserve_exact(more);
            }
            let before = (d.total_in(), out.len());
            let status = d
                .decompress_vec(input, &mut out, FlushDecompress::Sync)
                .map_err(|_| invalid())?;
            if out.len() > max {
                return Err(too_big());
            }
            input = &input[(d.total_in() - before.0) as usize..];
            if status == Status::StreamEnd {
                return Ok(());
            }
            let progressed = d.total_in() != before.0 || out.len() != before.1;
            if input.is_empty() && out.len() < out.capacity() {
                if tail_fed {
                    return Ok(());
                }
                input = &TAIL;
                tail_fed = true;
            } else if !progressed && out.len() < out.capacity() {
                return Err(invalid());
            }
        }
    })?;
    let mut message = BytesMut::with_capacity(out.len());
    message.put_slice(&out);
    Ok(message)
}

/// The frames of one publication, shared by every shard: the plain frame, and the compressed
/// one, made the first time a subscriber that agreed to permessage-deflate needs it (one per
/// window size asked for; browsers all use the full 15 bits). Cloning is a refcount.
///
/// The first shard that needs a compressed frame compresses it; another asking meanwhile waits
/// for that one compression (once per publication, never for a client), then shares it.
#[derive(Debug, Clone)]
pub(crate) struct PublicationFrames(Arc<Frames>);

#[derive(Debug)]
struct Frames {
    plain: Bytes,
    /// Per window size, 8 to 15 bits: `Some(None)` if the compressor failed (plain is sent).
    /// Allocated by the first subscriber that needs one: a publication nobody gets compressed
    /// stays one small allocation.
    compressed: OnceLock<Box<[OnceLock<Option<Bytes>>; 8]>>,
}

impl PublicationFrames {
    pub(crate) fn new(plain: Bytes) -> Self {
        Self(Arc::new(Frames {
            plain,
            compressed: Default::default(),
        }))
    }

    /// The uncompressed frame.
    pub(crate) fn plain(&self) -> &Bytes {
        &self.0.plain
    }

    /// The frame for a subscriber: the compressed one for its window when `agreed` (deflate
    /// was agreed with it) and the payload is long enough, the plain one otherwise.
    pub(crate) fn for_subscriber(&self, agreed: Option<Agreed>) -> &Bytes {
        let Some(agreed) = agreed else {
            return &self.0.plain;
        };
        let Some(payload) = frame::encoded_payload(&self.0.plain) else {
            return &self.0.plain;
        };
        if !agreed.compresses(payload.len()) {
            return &self.0.plain;
        }
        let bits = agreed.server_window_bits.clamp(8, 15);
        let windows = self.0.compressed.get_or_init(Default::default);
        let compressed = windows[usize::from(bits - 8)].get_or_init(|| {
            let opcode = frame::opcode_of(&self.0.plain)?;
            compress_frame(opcode, payload, bits)
        });
        compressed.as_ref().unwrap_or(&self.0.plain)
    }

    /// The compressed frame for a window of `bits`, if one was made (for tests).
    #[cfg(test)]
    pub(crate) fn compressed(&self, bits: u8) -> Option<&Bytes> {
        self.0.compressed.get()?[usize::from(bits - 8)]
            .get()
            .and_then(Option::as_ref)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agreed(headers: &[&str]) -> Option<(u8, String)> {
        negotiate(headers.iter().copied(), 0).map(|(a, r)| (a.server_window_bits, r))
    }

    fn with_window(server_window_bits: u8) -> Option<Agreed> {
        Some(Agreed {
            server_window_bits,
            min_size: THRESHOLD as u32,
        })
    }

    const BOTH: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn negotiation_follows_rfc_7692() {
        assert_eq!(agreed(&[]), None);
        assert_eq!(agreed(&["x-webkit-deflate-frame"]), None);
        assert_eq!(agreed(&["permessage-deflate"]), Some((15, BOTH.into())));
        // What browsers send.
        assert_eq!(
            agreed(&["permessage-deflate; client_max_window_bits"]),
            Some((15, BOTH.into()))
        );
        assert_eq!(
            agreed(&["permessage-deflate; server_max_window_bits=10"]),
            Some((10, format!("{BOTH}; server_max_window_bits=10")))
        );
        assert_eq!(
            agreed(&["permessage-deflate; server_max_window_bits=\"8\""]),
            Some((8, format!("{BOTH}; server_max_window_bits=8")))
        );
        // Declined offers, then one we accept.
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=99",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; unknown",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        ] {
            assert_eq!(agreed(&[bad]), None, "{bad}");
            assert_eq!(
                agreed(&[bad, "permessage-deflate; client_max_window_bits=12"]),
                Some((15, BOTH.into())),
                "{bad}, then a good offer"
            );
        }
        assert_eq!(
            agreed(&["foo, permessage-deflate; server_max_window_bits=9, permessage-deflate"]),
            Some((9, format!("{BOTH}; server_max_window_bits=9")))
        );
    }

    fn json(len: usize) -> Vec<u8> {
        let mut s = String::from("{\"NewMessage\":{\"room\":\"general\",\"items\":[");
        let mut i = 0;
        while s.len() < len {
            s.push_str(&format!(
                "{{\"id\":{i},\"symbol\":\"SYM{}\",\"price\":{}.{:02},\"user\":\"user-{}\"}},",
                i % 7,
                100 + i * 13 % 50,
                i * 7 % 100,
                i % 3
            ));
            i += 1;
        }
        s.truncate(len);
        s.into_bytes()
    }

    #[test]
    fn compressed_frames_inflate_to_the_payload() {
        for len in [0, 1, THRESHOLD, 1000, 40_000, 200_000] {
            let payload = json(len);
            for bits in 8..=15 {
                let frame = compress_frame(OpCode::Text, &payload, bits).unwrap();
                assert_eq!(frame[0], 0xC1, "FIN, RSV1, text");
                let body = frame::encoded_payload(&frame).unwrap();
                if len >= THRESHOLD {
                    assert!(body.len() < payload.len(), "{len} bytes, {bits} bits");
                }
                assert_eq!(&inflate(body, len).unwrap()[..], &payload[..], "{bits}");
                if len > 0 {
                    // One byte under the size: refused.
                    assert_eq!(inflate(body, len - 1).unwrap_err().code, 1009);
                }
            }
        }
    }

    #[test]
    fn a_bomb_is_refused_before_it_is_inflated() {
        let zeros = vec![0u8; 10 << 20];
        let frame = compress_frame(OpCode::Binary, &zeros, 15).unwrap();
        let body = frame::encoded_payload(&frame).unwrap();
        assert!(body.len() < 20_000, "{}", body.len());
        assert_eq!(inflate(body, 64 * 1024).unwrap_err().code, 1009);
    }

    #[test]
    fn invalid_data_is_1007() {
        // BTYPE 11 is reserved.
        assert_eq!(inflate(&[0xff, 0xff, 0xff], 1000).unwrap_err().code, 1007);
    }

    #[test]
    fn a_publication_is_compressed_once_and_only_when_asked() {
        let payload = json(1000);
        let frames = PublicationFrames::new(frame::encode_text(&payload));
        assert_eq!(frames.for_subscriber(None), frames.plain());
        assert!(
            frames.compressed(15).is_none(),
            "plain subscribers compress nothing"
        );
        let a = frames.for_subscriber(with_window(15)).clone();
        let b = frames.clone().for_subscriber(with_window(15)).clone();
        assert_eq!(a.as_ptr(), b.as_ptr(), "one shared compressed frame");
        assert_eq!(frames.compressed(15).unwrap().as_ptr(), a.as_ptr());
        // A 9-bit window gets its own, also made once.
        assert!(frames.compressed(9).is_none());
        let c = frames.for_subscriber(with_window(9)).clone();
        assert_ne!(c.as_ptr(), a.as_ptr());
        assert_eq!(frames.for_subscriber(with_window(9)).as_ptr(), c.as_ptr());
        let short = PublicationFrames::new(frame::encode_text(&json(100)));
        assert_eq!(short.for_subscriber(with_window(15)), short.plain());
    }

    /// Prints what deflate saves on JSON of several sizes (run with `--nocapture`); the figures
    /// behind [`THRESHOLD`]: `cargo test --release --lib threshold_figures -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore = "prints figures, asserts nothing"]
    fn threshold_figures() {
        let chat = |text: &str| {
            format!(r#"{{"NewMessage":{{"room":"general","username":"alice","text":"{text}"}}}}"#)
        };
        let samples = [
            chat("hi"),
            chat("see you at the standup in five minutes"),
            chat(&"the deploy went fine, metrics look normal across regions. ".repeat(2)),
            chat(&"the deploy went fine, metrics look normal across regions. ".repeat(4)),
            String::from_utf8(json(256)).unwrap(),
            String::from_utf8(json(1024)).unwrap(),
        ];
        for s in samples {
            let len = s.len();
            let mut c = Compress::new(Compression::new(LEVEL), false);
            let mut out = Vec::with_capacity(len + 64);
            c.compress_vec(s.as_bytes(), &mut out, FlushCompress::Sync)
                .unwrap();
            // Informational only (no assertion): the time of one compression, reset included.
            let start = std::time::Instant::now();
            for _ in 0..1000 {
                c.reset();
                out.clear();
                c.compress_vec(s.as_bytes(), &mut out, FlushCompress::Sync)
                    .unwrap();
            }
            let each = start.elapsed() / 1000;
            println!(
                "{len:>5} bytes -> {:>5} compressed, {each:?} each",
                out.len() - TAIL.len()
            );
        }
    }
}
