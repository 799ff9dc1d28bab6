//! Client bytes → `FrameParser` → `MessageAssembler`, the way the connection's read loop drives
//! them, with the bytes arriving in chunks whose sizes come from the input: parse a frame (a
//! continuation refused from its header if it would take the message past the limit); when none
//! is complete, the incremental UTF-8 check of the text frame still arriving (fail fast), then
//! the next chunk.
//!
//! Input: `[limit selector][chunking seed][stream…]`.
//!
//! Checks, beyond "no panic":
//! - a frame is taken off the buffer only once it is complete, and then exactly its extent as
//!   `peek_extent` reports it from the header (the skip path after a server close relies on it);
//! - the payload is the wire payload XOR the masking key (checked byte by byte, against the
//!   parser's word-at-a-time unmasking);
//! - control frames are final and at most 125 bytes; no frame or message passes the limit;
//!   text messages are UTF-8; errors carry 1002, 1007 or 1009;
//! - each payload byte is passed to the UTF-8 validator at most once, however the stream is cut
//!   (the incremental check resumes where it stopped: linear work);
//! - the events are the same whether the stream arrives whole or in chunks.

#![no_main]

use axum_realtime_kit::bench_api::{
    FrameParser, Message, MessageAssembler, parse_close_payload, peek_extent,
};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

/// Message size limits to pick from: the edges of the length encodings, and the default.
const LIMITS: [usize; 8] = [0, 1, 125, 126, 1024, 0xFFFF, 64 * 1024, 1 << 20];

/// Largest chunk for each chunking mode; `usize::MAX` is "everything at once".
const CHUNK_MAX: [usize; 8] = [1, 2, 3, 7, 16, 100, 4096, usize::MAX];

/// What the read loop does with the stream.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    /// A valid close frame (the read loop stops).
    Close(Option<u16>),
    /// A protocol violation with its close code (the read loop stops).
    Violation(u16),
    /// The stream ended with this many bytes buffered (part of a frame).
    Pending(usize),
}

/// Chunk sizes from a small xorshift generator seeded by the input.
struct Chunks {
    state: u32,
    max: usize,
}

impl Chunks {
    fn new(seed: u8, len: usize) -> Self {
        Self {
            state: (u32::from(seed) << 16 | len as u32) | 1,
            max: CHUNK_MAX[usize::from(seed >> 5)],
        }
    }

    fn next(&mut self) -> usize {
        if self.max == usize::MAX {
            return usize::MAX;
        }
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        1 + self.state as usize % self.max
    }
}

/// Runs the read loop's parse/assemble steps over `stream`, fed `chunks` at a time.
fn read_loop(stream: &[u8], limit: usize, chunks: &mut Chunks) -> Vec<Event> {
    let parser = FrameParser::new(limit);
    let mut assembler = MessageAssembler::new(limit);
    let mut events = Vec::new();
    let mut buf = BytesMut::new();
    let mut pos = 0;
    loop {
        loop {
            let before = buf.clone();
            let extent = peek_extent(&before);
            let frame = match parser.parse_frame_for(&mut buf, &assembler) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    assert_eq!(buf, before, "bytes consumed without a frame");
                    break;
                }
                Err(code) => {
                    assert!(matches!(code, 1002 | 1009), "parser error code {code}");
                    events.push(Event::Violation(code));
                    return events;
                }
            };
            let consumed = before.len() - buf.len();
            assert_eq!(&before[consumed..], &buf[..], "parser changed the rest");
            let (opcode, extent) = extent.expect("a whole frame but no whole header");
            assert_eq!(opcode, frame.opcode());
            assert_eq!(
                extent, consumed as u64,
                "peek_extent disagrees with the parser"
            );
            let payload = frame.payload();
            assert!(payload.len() <= limit, "frame over the limit");
            assert!(before[1] & 0x80 != 0, "unmasked client frame accepted");
            let header = consumed - payload.len();
            let key = &before[header - 4..header];
            for (i, (&wire, &plain)) in before[header..consumed].iter().zip(payload).enumerate() {
                assert_eq!(
                    wire ^ key[i % 4],
                    plain,
                    "payload byte {i} unmasked wrongly"
                );
            }
            if frame.is_control() {
                assert!(frame.fin(), "fragmented control frame accepted");
                assert!(
                    payload.len() <= 125,
                    "control frame over 125 bytes accepted"
                );
                match frame.opcode() {
                    0x9 => events.push(Event::Ping(payload.to_vec())),
                    0xA => events.push(Event::Pong(payload.to_vec())),
                    0x8 => {
                        events.push(match parse_close_payload(payload) {
                            Ok(code) => Event::Close(code),
                            Err(code) => {
                                assert!(matches!(code, 1002 | 1007), "close error code {code}");
                                Event::Violation(code)
                            }
                        });
                        return events;
                    }
                    op => panic!("control opcode {op:#x}"),
                }
                continue;
            }
            match assembler.push(frame) {
                Ok(None) => {}
                Ok(Some(Message::Text(text))) => {
                    assert!(text.len() <= limit, "text message over the limit");
                    assert!(std::str::from_utf8(&text).is_ok(), "text message not UTF-8");
                    events.push(Event::Text(text.to_vec()));
                }
                Ok(Some(Message::Binary(data))) => {
                    assert!(data.len() <= limit, "binary message over the limit");
                    events.push(Event::Binary(data.to_vec()));
                }
                Err(code) => {
                    assert!(matches!(code, 1002 | 1007 | 1009), "assembler error {code}");
                    events.push(Event::Violation(code));
                    return events;
                }
            }
        }
        // As the read loop does before it waits: a text frame still arriving is checked now.
        if !buf.is_empty() {
            if let Err(code) = assembler.check_arriving(&buf) {
                assert_eq!(code, 1007, "incremental check error {code}");
                events.push(Event::Violation(code));
                return events;
            }
        }
        assert!(
            assembler.utf8_bytes_fed() <= pos as u64,
            "{} bytes validated of {pos} received",
            assembler.utf8_bytes_fed()
        );
        if pos == stream.len() {
            events.push(Event::Pending(buf.len()));
            return events;
        }
        // As the read loop does: an empty buffer is given back before the next read.
        if buf.is_empty() {
            buf = BytesMut::new();
        }
        let n = chunks.next().min(stream.len() - pos);
        buf.extend_from_slice(&stream[pos..pos + n]);
        pos += n;
    }
}

fuzz_target!(|data: &[u8]| {
    let [limit, seed, stream @ ..] = data else {
        return;
    };
    let limit = LIMITS[usize::from(limit & 7)];
    let chunked = read_loop(stream, limit, &mut Chunks::new(*seed, stream.len()));
    let whole = read_loop(stream, limit, &mut Chunks::new(0xFF, 0));
    assert_eq!(chunked, whole, "chunking changed the outcome");
});
