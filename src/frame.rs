//! The WebSocket frame codec (RFC 6455 §5), server side.
//!
//! Outbound frames are encoded **once** into a single [`Bytes`] holding header and payload, so the
//! same buffer can be handed to every subscriber of a topic (a refcount bump each, never a copy:
//! invariant 2, docs/architecture.md). Server frames are never masked.
//!
//! Inbound frames are parsed by [`FrameParser`], which enforces what fastwebsockets 0.10 does not:
//! client frames must be masked, control frames must be final and at most 125 bytes, reserved bits
//! (RSV1 too, unless permessage-deflate was agreed and it marks a message's first frame) and
//! opcodes are rejected, and a frame larger than the configured limit is refused from its
//! header alone, before any of its payload is buffered (invariant 7).

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::Continuation => 0x0,
            Self::Text => 0x1,
            Self::Binary => 0x2,
            Self::Close => 0x8,
            Self::Ping => 0x9,
            Self::Pong => 0xA,
        }
    }

    pub(crate) fn is_control(self) -> bool {
        matches!(self, Self::Close | Self::Ping | Self::Pong)
    }
}

/// Close status codes used by the server (RFC 6455 §7.4.1).
pub(crate) mod close_code {
    pub(crate) const NORMAL: u16 = 1000;
    pub(crate) const GOING_AWAY: u16 = 1001;
    pub(crate) const PROTOCOL_ERROR: u16 = 1002;
    pub(crate) const INVALID_PAYLOAD: u16 = 1007;
    pub(crate) const POLICY_VIOLATION: u16 = 1008;
    pub(crate) const TOO_BIG: u16 = 1009;
    pub(crate) const INTERNAL_ERROR: u16 = 1011;
}

/// Largest header a server frame needs: 2 bytes + 8 bytes of extended length.
const MAX_HEADER: usize = 10;

/// Writes the header of an unmasked, final frame of `len` payload bytes.
fn put_header(buf: &mut BytesMut, opcode: OpCode, len: usize) {
    buf.put_u8(0x80 | opcode.as_u8());
    if len < 126 {
        buf.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        buf.put_u8(126);
        buf.put_u16(len as u16);
    } else {
        buf.put_u8(127);
        buf.put_u64(len as u64);
    }
}

/// Encodes one complete, final, unmasked frame: header and payload in one contiguous buffer.
pub(crate) fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(MAX_HEADER + payload.len());
    put_header(&mut buf, opcode, payload.len());
    buf.extend_from_slice(payload);
    buf.freeze()
}

/// Encodes one final frame whose payload is a compressed message: RSV1 set (RFC 7692 §6).
pub(crate) fn encode_compressed(opcode: OpCode, compressed: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(MAX_HEADER + compressed.len());
    put_header(&mut buf, opcode, compressed.len());
    buf[0] |= RSV1;
    buf.extend_from_slice(compressed);
    buf.freeze()
}

/// The opcode of a frame [`encode`] wrote.
pub(crate) fn opcode_of(frame: &[u8]) -> Option<OpCode> {
    OpCode::from_u8(frame.first()? & 0x0F)
}

/// The "per-message compressed" bit (RFC 7692 §6).
const RSV1: u8 = 0x40;

/// Encodes a text frame. The caller guarantees `payload` is UTF-8 (JSON text, a Redis payload the
/// application published as text).
pub(crate) fn encode_text(payload: &[u8]) -> Bytes {
    encode(OpCode::Text, payload)
}

/// The payload of a frame [`encode`] wrote, read back from its header; `None` for anything else
/// (a masked or truncated frame).
pub(crate) fn encoded_payload(frame: &[u8]) -> Option<&[u8]> {
    let header = match *frame.get(1)? {
        126 => 4,
        127 => 10,
        n if n < 126 => 2,
        _ => return None,
    };
    frame.get(header..)
}

/// Encodes one frame as a client sends it: `opcode` and the FIN bit as given (so a test can send
/// what RFC 6455 forbids), the payload masked with `mask`, or sent unmasked (a protocol
/// violation) with `None`. Used by tests, benches and the load-test client, never by the server.
#[cfg(any(test, feature = "__bench_api"))]
pub(crate) fn encode_client(
    fin: bool,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> BytesMut {
    let mut buf = BytesMut::with_capacity(14 + payload.len());
    buf.put_u8(if fin { 0x80 } else { 0 } | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        buf.put_u8(mask_bit | len as u8);
    } else if len <= usize::from(u16::MAX) {
        buf.put_u8(mask_bit | 126);
        buf.put_u16(len as u16);
    } else {
        buf.put_u8(mask_bit | 127);
        buf.put_u64(len as u64);
    }
    if let Some(key) = mask {
        buf.put_slice(&key);
    }
    let start = buf.len();
    buf.put_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut buf[start..], key);
    }
    buf
}

/// Encodes a close frame with a status code and a reason, cut to fit the 125-byte control limit
/// on a character boundary.
pub(crate) fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OpCode::Close, &payload)
}

/// XORs `data` with the 4-byte masking key, eight bytes at a time.
pub(crate) fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("chunk of 8")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so its key phase is 0 again.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// A protocol failure, carrying the close code the server answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProtocolError {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
}

impl ProtocolError {
    const fn new(code: u16, reason: &'static str) -> Self {
        Self { code, reason }
    }
}

/// One parsed, unmasked frame.
#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) fin: bool,
    /// RSV1: the first frame of a compressed message (only with permessage-deflate agreed).
    pub(crate) compressed: bool,
    pub(crate) opcode: OpCode,
    pub(crate) payload: BytesMut,
}

/// Parses client frames out of a read buffer.
#[derive(Debug)]
pub(crate) struct FrameParser {
    /// Largest payload accepted in one frame.
    max_frame: usize,
    /// Whether permessage-deflate was agreed: RSV1 may then mark a compressed message.
    deflate: bool,
}

impl FrameParser {
    pub(crate) fn new(max_frame: usize) -> Self {
        Self {
            max_frame,
            deflate: false,
        }
    }

    /// Accepts RSV1 on the first frame of a data message: permessage-deflate was agreed.
    pub(crate) fn with_deflate(mut self, deflate: bool) -> Self {
        self.deflate = deflate;
        self
    }

    /// [`parse_for`](Self::parse_for) outside a fragmented message: only the frame limit applies.
    #[cfg(any(test, feature = "__bench_api"))]
    pub(crate) fn parse(&self, buf: &mut BytesMut) -> Result<Option<Frame>, ProtocolError> {
        self.parse_for(buf, usize::MAX)
    }

    /// Takes one complete frame off the front of `buf`.
    ///
    /// `Ok(None)` means more bytes are needed; nothing is consumed until a whole frame is there.
    /// Errors are decided from the header alone, so an oversized or malformed frame is refused
    /// without buffering its payload. That includes a continuation frame of more than
    /// `continuation_room` bytes ([`MessageAssembler::continuation_room`]): the fragmented
    /// message would pass its limit, and at most the limit is ever held.
    pub(crate) fn parse_for(
        &self,
        buf: &mut BytesMut,
        continuation_room: usize,
    ) -> Result<Option<Frame>, ProtocolError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let b0 = buf[0];
        let b1 = buf[1];
        let fin = b0 & 0x80 != 0;
        let compressed = self.deflate && b0 & RSV1 != 0;
        let reserved = if self.deflate { 0x30 } else { 0x70 };
        if b0 & reserved != 0 {
            return Err(ProtocolError::new(
                close_code::PROTOCOL_ERROR,
                "reserved bits set without a negotiated extension",
            ));
        }
        let opcode = OpCode::from_u8(b0 & 0x0F).ok_or(ProtocolError::new(
            close_code::PROTOCOL_ERROR,
            "reserved opcode",
        ))?;
        if b1 & 0x80 == 0 {
            return Err(ProtocolError::new(
                close_code::PROTOCOL_ERROR,
                "client frames must be masked",
            ));
        }
        let (len, len_bytes) = match b1 & 0x7F {
            126 => {
                if buf.len() < 4 {
                    return Ok(None);
                }
                (u16::from_be_bytes([buf[2], buf[3]]) as u64, 2)
            }
            127 => {
                if buf.len() < 10 {
                    return Ok(None);
                }
                let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
                if len >> 63 != 0 {
                    return Err(ProtocolError::new(
                        close_code::PROTOCOL_ERROR,
                        "payload length has its top bit set",
                    ));
                }
                (len, 8)
            }
            n => (n as u64, 0),
        };
        if compressed && (opcode.is_control() || opcode == OpCode::Continuation) {
            return Err(ProtocolError::new(
                close_code::PROTOCOL_ERROR,
                "RSV1 set on a control or continuation frame",
            ));
        }
        if opcode.is_control() {
            if !fin {
                return Err(ProtocolError::new(
                    close_code::PROTOCOL_ERROR,
                    "fragmented control frame",
                ));
            }
            if len > 125 {
                return Err(ProtocolError::new(
                    close_code::PROTOCOL_ERROR,
                    "control frame payload over 125 bytes",
                ));
            }
        }
        if len > self.max_frame as u64 {
            return Err(ProtocolError::new(close_code::TOO_BIG, "message too big"));
        }
        if opcode == OpCode::Continuation && len > continuation_room as u64 {
            return Err(ProtocolError::new(
                close_code::TOO_BIG,
                "fragmented message too big",
            ));
        }
        let len = len as usize;
        let header = 2 + len_bytes + 4;
        if buf.len() < header + len {
            // Reserve room for the rest of this frame plus the next header, so the next read can
            // complete it in one syscall.
            buf.reserve(header + len - buf.len() + MAX_HEADER);
            return Ok(None);
        }
        let key: [u8; 4] = buf[header - 4..header].try_into().expect("4 bytes");
        buf.advance(header);
        let mut payload = buf.split_to(len);
        apply_mask(&mut payload, key);
        Ok(Some(Frame {
            fin,
            compressed,
            opcode,
            payload,
        }))
    }
}

/// The opcode bits and total size (header + payload) of the frame starting `buf`, from its header
/// alone and without any validation; `None` until the header is complete. Used to skip input
/// after the server has closed.
pub(crate) fn peek_extent(buf: &[u8]) -> Option<(u8, u64)> {
    let (header, len) = header_and_len(buf)?;
    // Saturating: the length is the client's, unvalidated, and may be near `u64::MAX`. (A
    // wrapped sum was once 0, and the skip loop spun without awaiting: found by fuzzing.)
    Some((buf[0] & 0x0F, (header as u64).saturating_add(len)))
}

/// The header size (masking key included) and the payload length of the frame starting `buf`,
/// read from its header without validation; `None` until the length bytes are there (the
/// masking key may still be missing).
fn header_and_len(buf: &[u8]) -> Option<(usize, u64)> {
    let b1 = *buf.get(1)?;
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    let (len, ext) = match b1 & 0x7F {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as u64,
            2,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 8),
        n => (n as u64, 0),
    };
    Some((2 + ext + mask, len))
}

/// A frame at the front of `buf` whose header has arrived but whose payload has not all arrived:
/// its opcode, its masking key and the (still masked) payload bytes received so far. `None` if
/// the header is incomplete or the whole frame is there.
///
/// Call it only after [`FrameParser::parse`] returned `Ok(None)`: the header was validated then.
pub(crate) fn incomplete_frame(buf: &[u8]) -> Option<(OpCode, [u8; 4], &[u8])> {
    if *buf.first()? & RSV1 != 0 {
        // A compressed message: its text is checked once inflated.
        return None;
    }
    let opcode = OpCode::from_u8(*buf.first()? & 0x0F)?;
    // The parser accepted the header, so the frame is masked and `header` ends with the key.
    let (header, len) = header_and_len(buf)?;
    let key: [u8; 4] = buf.get(header - 4..header)?.try_into().ok()?;
    let available = buf.get(header..)?;
    ((available.len() as u64) < len).then_some((opcode, key, available))
}

/// Validates a received close payload and returns the status code to echo.
///
/// RFC 6455 §5.5.1 and §7.4: a body of one byte, a code that may not be sent on the wire, or a reason
/// that is not UTF-8 are protocol failures.
pub(crate) fn parse_close_payload(payload: &[u8]) -> Result<Option<u16>, ProtocolError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(ProtocolError::new(
            close_code::PROTOCOL_ERROR,
            "close frame with a one-byte body",
        )),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let valid = matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999);
            if !valid {
                return Err(ProtocolError::new(
                    close_code::PROTOCOL_ERROR,
                    "invalid close code",
                ));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(ProtocolError::new(
                    close_code::INVALID_PAYLOAD,
                    "close reason is not UTF-8",
                ));
            }
            Ok(Some(code))
        }
    }
}

/// Validates UTF-8 that arrives in pieces: what was fed so far is valid up to at most the first
/// three bytes of a character still to be completed, which it keeps.
#[derive(Debug, Clone, Copy, Default)]
struct Utf8Stream {
    /// The bytes of a character cut off at the end of what was fed (a valid prefix).
    pending: [u8; 4],
    pending_len: u8,
}

impl Utf8Stream {
    /// Validates `bytes`, which follow what was fed before. `Err` if no further bytes could make
    /// the text valid; a character cut off at the end is kept for the next call.
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), ()> {
        if self.pending_len > 0 {
            let have = usize::from(self.pending_len);
            let width = match self.pending[0] {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                _ => 4,
            };
            let take = (width - have).min(bytes.len());
            self.pending[have..have + take].copy_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            match std::str::from_utf8(&self.pending[..have + take]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_none() => {
                    // Still cut off: `bytes` was all taken.
                    self.pending_len = (have + take) as u8;
                    return Ok(());
                }
                Err(_) => return Err(()),
            }
        }
        match std::str::from_utf8(bytes) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let rest = &bytes[e.valid_up_to()..];
                self.pending[..rest.len()].copy_from_slice(rest);
                self.pending_len = rest.len() as u8;
                Ok(())
            }
            Err(_) => Err(()),
        }
    }

    /// Whether the text fed so far ends on a character boundary.
    fn is_complete(&self) -> bool {
        self.pending_len == 0
    }
}

fn invalid_utf8() -> ProtocolError {
    ProtocolError::new(
        close_code::INVALID_PAYLOAD,
        "text message is not valid UTF-8",
    )
}

/// A fragmented message in progress.
#[derive(Debug)]
struct Partial {
    kind: OpCode,
    /// Compressed (RSV1 on its first frame): `data` is deflate data, inflated once complete.
    compressed: bool,
    data: BytesMut,
    /// For text, the decoder's state after `data`.
    utf8: Utf8Stream,
}

/// The text frame whose payload is still arriving at the front of the read buffer.
#[derive(Debug)]
struct Arriving {
    /// How many of its payload bytes were validated already.
    validated: usize,
    /// The decoder's state after them (and after the fragments before this frame).
    utf8: Utf8Stream,
}

/// Reassembles fragmented messages under a total size cap.
#[derive(Debug)]
pub(crate) struct MessageAssembler {
    max_message: usize,
    /// The fragmented message in progress, if any.
    partial: Option<Partial>,
    /// Set by [`check_incomplete`](Self::check_incomplete) while a text frame arrives, taken by
    /// [`push`](Self::push) once it is complete: each payload byte is validated once, in
    /// linear time however the frame is cut into reads.
    arriving: Option<Arriving>,
    /// How many bytes were passed to the UTF-8 validator, for the tests that prove it linear.
    #[cfg_attr(not(any(test, feature = "__bench_api")), allow(dead_code))]
    utf8_fed: u64,
}

/// A complete data message.
#[derive(Debug)]
pub(crate) enum Message {
    /// Text, already checked to be UTF-8.
    Text(BytesMut),
    Binary(BytesMut),
}

impl MessageAssembler {
    pub(crate) fn new(max_message: usize) -> Self {
        Self {
            max_message,
            partial: None,
            arriving: None,
            utf8_fed: 0,
        }
    }

    /// How many bytes were passed to the UTF-8 validator so far.
    #[cfg(any(test, feature = "__bench_api"))]
    pub(crate) fn utf8_bytes_fed(&self) -> u64 {
        self.utf8_fed
    }

    /// How many payload bytes the next continuation frame may bring: the message limit less
    /// what the fragmented message in progress holds. [`FrameParser::parse_for`] refuses a
    /// larger one from its header.
    pub(crate) fn continuation_room(&self) -> usize {
        let held = self.partial.as_ref().map_or(0, |p| p.data.len());
        self.max_message.saturating_sub(held)
    }

    /// Fails fast on a text frame whose payload is still arriving: `masked` is the part received
    /// so far (from the start of the payload), `key` its masking key. An error means no further
    /// bytes could make the message valid UTF-8; a character cut off at the end is fine.
    ///
    /// Only the bytes that arrived since the previous call are unmasked (into a scratch buffer:
    /// the parser unmasks the whole frame once it is complete) and validated; the frame must be
    /// the one the previous call saw, until it is [`push`](Self::push)ed.
    pub(crate) fn check_incomplete(
        &mut self,
        opcode: OpCode,
        key: [u8; 4],
        masked: &[u8],
    ) -> Result<(), ProtocolError> {
        let arriving = match &mut self.arriving {
            Some(arriving) => arriving,
            None => {
                let utf8 = match (opcode, &self.partial) {
                    (OpCode::Text, None) => Utf8Stream::default(),
                    // Carries a character the previous fragment ended inside of.
                    (OpCode::Continuation, Some(p)) if p.kind == OpCode::Text && !p.compressed => {
                        p.utf8
                    }
                    _ => return Ok(()),
                };
                self.arriving.insert(Arriving { validated: 0, utf8 })
            }
        };
        debug_assert!(
            masked.len() >= arriving.validated,
            "not the frame seen before"
        );
        let Some(new) = masked.get(arriving.validated..) else {
            return Ok(());
        };
        // The key as it applies from the first new byte on; chunks of the scratch buffer's size
        // (a multiple of 4) keep that phase.
        let phase = arriving.validated % 4;
        let key = [0, 1, 2, 3].map(|i| key[(phase + i) % 4]);
        let mut scratch = [0u8; 256];
        for piece in new.chunks(scratch.len()) {
            let plain = &mut scratch[..piece.len()];
            plain.copy_from_slice(piece);
            apply_mask(plain, key);
            self.utf8_fed += plain.len() as u64;
            arriving.utf8.feed(plain).map_err(|()| invalid_utf8())?;
        }
        arriving.validated = masked.len();
        Ok(())
    }

    /// Feeds one data frame (text, binary or continuation). Returns a message once it is complete.
    pub(crate) fn push(&mut self, frame: Frame) -> Result<Option<Message>, ProtocolError> {
        let Frame {
            fin,
            compressed,
            opcode,
            payload,
        } = frame;
        let arriving = self.arriving.take();
        let len = payload.len();
        let (kind, compressed, data, utf8) = match (opcode, self.partial.take()) {
            (OpCode::Continuation, None) => {
                return Err(ProtocolError::new(
                    close_code::PROTOCOL_ERROR,
                    "continuation frame without a message to continue",
                ));
            }
            (
                OpCode::Continuation,
                Some(Partial {
                    kind,
                    compressed,
                    mut data,
                    utf8,
                }),
            ) => {
                if data.len() + len > self.max_message {
                    return Err(ProtocolError::new(
                        close_code::TOO_BIG,
                        "fragmented message too big",
                    ));
                }
                data.extend_from_slice(&payload);
                (kind, compressed, data, utf8)
            }
            (_, Some(_)) => {
                return Err(ProtocolError::new(
                    close_code::PROTOCOL_ERROR,
                    "new data frame inside a fragmented message",
                ));
            }
            (kind, None) => (kind, compressed, payload, Utf8Stream::default()),
        };
        let mut utf8 = utf8;
        if kind == OpCode::Text && !compressed {
            // Only what the checks while the frame arrived did not see. A fragment may end inside
            // a character, but never with bytes no continuation could make valid (fail fast).
            let (state, seen) = match arriving {
                Some(a) if a.validated <= len => (a.utf8, a.validated),
                _ => (utf8, 0),
            };
            utf8 = state;
            let new = &data[data.len() - len + seen..];
            self.utf8_fed += new.len() as u64;
            utf8.feed(new).map_err(|()| invalid_utf8())?;
            if fin && !utf8.is_complete() {
                return Err(invalid_utf8());
            }
        }
        if !fin {
            self.partial = Some(Partial {
                kind,
                compressed,
                data,
                utf8,
            });
            return Ok(None);
        }
        let data = if compressed {
            // The limit applies to the inflated size, checked while inflating.
            let inflated = crate::deflate::inflate(&data, self.max_message)?;
            if kind == OpCode::Text && std::str::from_utf8(&inflated).is_err() {
                return Err(invalid_utf8());
            }
            inflated
        } else {
            data
        };
        Ok(Some(match kind {
            OpCode::Text => Message::Text(data),
            _ => Message::Binary(data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_encoded_payload_reads_back_at_every_header_size() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let frame = encode_text(&payload);
            assert_eq!(encoded_payload(&frame), Some(&payload[..]), "length {len}");
        }
        assert_eq!(encoded_payload(&[0x81]), None, "truncated");
        assert_eq!(encoded_payload(&[0x81, 0x85, 1, 2, 3, 4]), None, "masked");
    }

    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> BytesMut {
        let mut buf = BytesMut::new();
        buf.put_u8(if fin { 0x80 } else { 0 } | opcode);
        let mask_bit = if mask.is_some() { 0x80 } else { 0 };
        if payload.len() < 126 {
            buf.put_u8(mask_bit | payload.len() as u8);
        } else if payload.len() <= 0xFFFF {
            buf.put_u8(mask_bit | 126);
            buf.put_u16(payload.len() as u16);
        } else {
            buf.put_u8(mask_bit | 127);
            buf.put_u64(payload.len() as u64);
        }
        let mut body = payload.to_vec();
        if let Some(key) = mask {
            buf.put_slice(&key);
            apply_mask(&mut body, key);
        }
        buf.put_slice(&body);
        buf
    }

    #[test]
    fn encode_picks_the_shortest_length_form() {
        assert_eq!(&encode_text(b"hi")[..], b"\x81\x02hi");
        let f = encode_text(&[b'a'; 126]);
        assert_eq!(&f[..4], &[0x81, 126, 0, 126]);
        let f = encode_text(&vec![b'a'; 70_000]);
        assert_eq!(&f[..2], &[0x81, 127]);
        assert_eq!(u64::from_be_bytes(f[2..10].try_into().unwrap()), 70_000);
        assert_eq!(f.len(), 10 + 70_000);
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let f = encode_close(1001, &"é".repeat(100));
        assert!(f.len() <= 2 + 125);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }

    #[test]
    fn mask_round_trips_for_every_length() {
        for len in 0..40 {
            let orig: Vec<u8> = (0..len as u8).collect();
            let mut data = orig.clone();
            apply_mask(&mut data, [1, 2, 3, 4]);
            for (i, (a, b)) in data.iter().zip(&orig).enumerate() {
                assert_eq!(*a, b ^ [1, 2, 3, 4][i % 4]);
            }
            apply_mask(&mut data, [1, 2, 3, 4]);
            assert_eq!(data, orig);
        }
    }

    #[test]
    fn parser_waits_for_whole_frames_and_unmasks() {
        let p = FrameParser::new(1 << 20);
        let full = client_frame(true, 1, b"hello world", Some([9, 8, 7, 6]));
        for cut in 0..full.len() {
            let mut buf = BytesMut::from(&full[..cut]);
            assert!(p.parse(&mut buf).unwrap().is_none(), "cut at {cut}");
        }
        let mut buf = full.clone();
        buf.extend_from_slice(&client_frame(true, 9, b"", Some([1, 1, 1, 1])));
        let f = p.parse(&mut buf).unwrap().unwrap();
        assert_eq!(
            (f.fin, f.opcode, &f.payload[..]),
            (true, OpCode::Text, &b"hello world"[..])
        );
        let f = p.parse(&mut buf).unwrap().unwrap();
        assert_eq!(f.opcode, OpCode::Ping);
        assert!(buf.is_empty());
    }

    #[test]
    fn parser_rejects_protocol_violations() {
        let p = FrameParser::new(1000);
        let cases: Vec<(BytesMut, u16)> = vec![
            (client_frame(true, 1, b"x", None), 1002),
            (client_frame(true, 0xA, &[0; 126], Some([0; 4])), 1002),
            (client_frame(true, 0x8, &[0; 126], Some([0; 4])), 1002),
            (client_frame(false, 0x9, b"", Some([0; 4])), 1002),
            (client_frame(true, 0x3, b"", Some([0; 4])), 1002),
            (client_frame(true, 0x1 | 0x40, b"", Some([0; 4])), 1002),
            (client_frame(true, 1, &[b'a'; 1001], Some([0; 4])), 1009),
        ];
        for (mut buf, code) in cases {
            assert_eq!(p.parse(&mut buf).unwrap_err().code, code);
        }
        // An oversized frame is refused from its header, before its payload arrives.
        let mut header_only = client_frame(true, 2, &vec![0; 100_000], Some([0; 4]));
        header_only.truncate(14);
        assert_eq!(p.parse(&mut header_only).unwrap_err().code, 1009);
    }

    #[test]
    fn assembler_joins_fragments_and_enforces_rules() {
        let frame = |fin, opcode, payload: &[u8]| Frame {
            fin,
            compressed: false,
            opcode,
            payload: BytesMut::from(payload),
        };
        let mut a = MessageAssembler::new(10);
        assert!(a.push(frame(false, OpCode::Text, b"ab")).unwrap().is_none());
        assert!(
            a.push(frame(false, OpCode::Continuation, b"cd"))
                .unwrap()
                .is_none()
        );
        match a.push(frame(true, OpCode::Continuation, b"e")).unwrap() {
            Some(Message::Text(t)) => assert_eq!(&t[..], b"abcde"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            a.push(frame(true, OpCode::Continuation, b"x"))
                .unwrap_err()
                .code,
            1002
        );
        a.push(frame(false, OpCode::Text, b"ab")).unwrap();
        assert_eq!(
            a.push(frame(true, OpCode::Text, b"x")).unwrap_err().code,
            1002
        );
        let mut a = MessageAssembler::new(4);
        a.push(frame(false, OpCode::Binary, b"abc")).unwrap();
        assert_eq!(
            a.push(frame(true, OpCode::Continuation, b"de"))
                .unwrap_err()
                .code,
            1009
        );
        let mut a = MessageAssembler::new(10);
        assert_eq!(
            a.push(frame(true, OpCode::Text, b"\xff")).unwrap_err().code,
            1007
        );
    }

    #[test]
    fn close_payload_validation() {
        assert_eq!(parse_close_payload(b"").unwrap(), None);
        assert_eq!(parse_close_payload(&[3, 232]).unwrap(), Some(1000));
        assert_eq!(parse_close_payload(&[3]).unwrap_err().code, 1002);
        assert_eq!(parse_close_payload(&[3, 236]).unwrap_err().code, 1002); // 1004
        assert_eq!(parse_close_payload(&[3, 232, 0xff]).unwrap_err().code, 1007);
    }

    #[test]
    fn invalid_utf8_in_a_frame_still_arriving_fails_fast() {
        let key = [1, 2, 3, 4];
        // "κόσμε" then 0xED 0xA0 0x80 (a surrogate: never valid), then more text.
        let mut text = "κόσμε".as_bytes().to_vec();
        text.extend_from_slice(&[0xED, 0xA0, 0x80]);
        text.extend_from_slice(b"edited");
        let whole = client_frame(true, 0x1, &text, Some(key));
        let parser = FrameParser::new(1024);
        let mut assembler = MessageAssembler::new(1024);
        let header = whole.len() - text.len();
        // Cut inside the first character: nothing wrong yet.
        let mut buf = BytesMut::from(&whole[..header + 1]);
        assert!(parser.parse(&mut buf).unwrap().is_none());
        let (op, k, masked) = incomplete_frame(&buf).unwrap();
        assert!(assembler.check_incomplete(op, k, masked).is_ok());
        // Past the surrogate's first two bytes: 0xED 0xA0 can never start a valid character.
        let cut = "κόσμε".len() + 2;
        let mut buf = BytesMut::from(&whole[..header + cut]);
        assert!(parser.parse(&mut buf).unwrap().is_none());
        let (op, k, masked) = incomplete_frame(&buf).unwrap();
        assert_eq!(masked.len(), cut);
        assert_eq!(
            assembler.check_incomplete(op, k, masked).unwrap_err().code,
            1007
        );
        // A binary frame with the same bytes is not text.
        let bin = client_frame(true, 0x2, &text, Some(key));
        let (op, k, masked) = incomplete_frame(&bin[..header + cut]).unwrap();
        let mut assembler = MessageAssembler::new(1024);
        assert!(assembler.check_incomplete(op, k, masked).is_ok());
        // A complete frame is not "incomplete".
        assert!(incomplete_frame(&whole).is_none());
    }

    #[test]
    fn fail_fast_carries_a_character_split_across_fragments() {
        let key = [9, 8, 7, 6];
        // The first fragment ends inside "é" (0xC3 0xA9).
        let after_first = || {
            let mut assembler = MessageAssembler::new(1024);
            let first = Frame {
                fin: false,
                compressed: false,
                opcode: OpCode::Text,
                payload: BytesMut::from(&b"caf\xC3"[..]),
            };
            assert!(assembler.push(first).unwrap().is_none());
            assembler
        };
        let mut assembler = after_first();
        // The continuation's first byte completes it: fine.
        let ok = client_frame(true, 0x0, b"\xA9 au lait", Some(key));
        let (op, k, masked) = incomplete_frame(&ok[..ok.len() - 3]).unwrap();
        assert!(assembler.check_incomplete(op, k, masked).is_ok());
        // A continuation starting with a non-continuation byte cannot complete it.
        let mut assembler = after_first();
        let bad = client_frame(true, 0x0, b"x more text", Some(key));
        let (op, k, masked) = incomplete_frame(&bad[..bad.len() - 3]).unwrap();
        assert_eq!(
            assembler.check_incomplete(op, k, masked).unwrap_err().code,
            1007
        );
    }

    #[test]
    fn peek_extent_saturates_on_a_hostile_length() {
        let mut unmasked = vec![0x82, 0x7F];
        unmasked.extend_from_slice(&(u64::MAX - 9).to_be_bytes());
        assert_eq!(peek_extent(&unmasked), Some((0x2, u64::MAX)));
        let mut masked = vec![0x82, 0xFF];
        masked.extend_from_slice(&(u64::MAX - 13).to_be_bytes());
        assert_eq!(peek_extent(&masked), Some((0x2, u64::MAX)));
    }
    /// Feeds `wire` to a parser and an assembler `chunk` bytes at a time, the way the reader
    /// does: parse; when no frame is complete, the incremental check of the one arriving.
    fn trickle(
        wire: &[u8],
        chunk: usize,
        assembler: &mut MessageAssembler,
    ) -> Result<Vec<Message>, ProtocolError> {
        let parser = FrameParser::new(1 << 20);
        let mut buf = BytesMut::new();
        let mut messages = Vec::new();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                match parser.parse(&mut buf)? {
                    Some(frame) => {
                        if let Some(m) = assembler.push(frame)? {
                            messages.push(m);
                        }
                    }
                    None => {
                        if let Some((op, k, masked)) = incomplete_frame(&buf) {
                            assembler.check_incomplete(op, k, masked)?;
                        }
                        break;
                    }
                }
            }
        }
        Ok(messages)
    }

    #[test]
    fn a_text_frame_trickled_one_byte_at_a_time_is_validated_in_linear_time() {
        // 64 KiB of text with characters of every width, cut everywhere by 1-byte reads.
        let mut text = "aé✓🚀 ".repeat(64 * 1024 / 11 + 1).into_bytes();
        text.truncate(64 * 1024);
        while std::str::from_utf8(&text).is_err() {
            text.pop();
        }
        text.resize(64 * 1024, b'.');
        let wire = client_frame(true, 0x1, &text, Some([0x37, 0xfa, 0x21, 0x3d]));
        let mut assembler = MessageAssembler::new(1 << 20);
        let messages = trickle(&wire, 1, &mut assembler).unwrap();
        match &messages[..] {
            [Message::Text(t)] => assert_eq!(&t[..], &text[..]),
            other => panic!("unexpected {other:?}"),
        }
        // Every payload byte is validated once: as it arrives, or with the complete frame.
        assert_eq!(assembler.utf8_bytes_fed(), text.len() as u64);
    }

    #[test]
    fn incremental_validation_agrees_with_a_whole_check_at_every_cut() {
        let samples: [&[u8]; 10] = [
            "aé✓🚀z".as_bytes(),
            b"ab\xC3\xA9\xE2\x9C\x93",
            b"\xED\xA0\x80x",        // a surrogate
            b"\xC0\xAFx",            // overlong
            b"\xF4\x90\x80\x80",     // past U+10FFFF
            b"\xF0\x9F\x9A",         // cut off at the end
            b"a\xE2\x82x",           // a character interrupted
            b"\xF0\x9F\x9A\x80\x80", // a stray continuation byte
            b"\xFFabc",
            b"",
        ];
        let key = [0x37, 0xfa, 0x21, 0x3d];
        for text in samples {
            let valid = std::str::from_utf8(text).is_ok();
            // Two fragments cut at every point, fed 1, 2 or 3 bytes at a time.
            for cut in 0..=text.len() {
                for chunk in 1..=3 {
                    let mut wire = client_frame(false, 0x1, &text[..cut], Some(key));
                    wire.extend_from_slice(&client_frame(true, 0x0, &text[cut..], Some(key)));
                    let mut assembler = MessageAssembler::new(1024);
                    let got = trickle(&wire, chunk, &mut assembler);
                    match got {
                        Ok(messages) => {
                            assert!(valid, "{text:x?} cut at {cut} accepted");
                            match &messages[..] {
                                [Message::Text(t)] => assert_eq!(&t[..], text),
                                other => panic!("unexpected {other:?}"),
                            }
                            assert_eq!(assembler.utf8_bytes_fed(), text.len() as u64);
                        }
                        Err(e) => {
                            assert!(!valid, "{text:x?} cut at {cut}, chunk {chunk}: {e:?}");
                            assert_eq!(e.code, 1007);
                        }
                    }
                }
            }
        }
    }
    #[test]
    fn a_continuation_past_the_message_limit_is_refused_from_its_header() {
        let parser = FrameParser::new(100);
        let mut assembler = MessageAssembler::new(100);
        assert_eq!(assembler.continuation_room(), 100);
        let mut buf = client_frame(false, 0x2, &[7; 90], Some([1, 2, 3, 4]));
        let first = parser.parse_for(&mut buf, 100).unwrap().unwrap();
        assert!(assembler.push(first).unwrap().is_none());
        assert_eq!(assembler.continuation_room(), 10);
        // Exactly the room left: taken.
        let mut exact = client_frame(true, 0x0, &[7; 10], Some([1, 2, 3, 4]));
        assert!(parser.parse_for(&mut exact, 10).unwrap().is_some());
        // One byte more: refused from the header alone, the payload not there yet.
        let mut header = client_frame(true, 0x0, &[7; 11], Some([1, 2, 3, 4]));
        header.truncate(6);
        let e = parser.parse_for(&mut header, 10).unwrap_err();
        assert_eq!(e.code, 1009);
        // Only continuations count against the message in progress.
        let mut other = client_frame(true, 0x2, &[7; 11], Some([1, 2, 3, 4]));
        other.truncate(6);
        assert!(parser.parse_for(&mut other, 10).unwrap().is_none());
    }
}
