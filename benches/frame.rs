//! The WebSocket codec: encoding a server text frame (once per publish) and parsing + unmasking a
//! client frame (once per message received), for payloads from 16 B to 64 KiB; and the UTF-8
//! check of a 64 KiB text frame that arrives whole or one byte per read (validated as it
//! arrives: linear, not quadratic, in the bytes received).
//!
//! Run: `cargo bench --bench frame`

use std::hint::black_box;

use axum_realtime_kit::bench_api::{
    FrameParser, Message, MessageAssembler, encode_text, masked_client_frame,
};
use bytes::BytesMut;
use criterion::{BatchSize, Criterion, Throughput};

const SIZES: [usize; 4] = [16, 128, 1024, 64 * 1024];

/// A JSON-ish printable payload of `len` bytes (valid UTF-8, like a real text message).
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

fn label(len: usize) -> String {
    if len >= 1024 {
        format!("{}KiB", len / 1024)
    } else {
        format!("{len}B")
    }
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_encode_text");
    for len in SIZES {
        let data = payload(len);
        group.throughput(Throughput::Bytes(len as u64));
        // `iter` drops each returned frame inside the timed loop: its allocation and its free
        // are both measured.
        group.bench_function(label(len), |b| b.iter(|| encode_text(black_box(&data))));
    }
    group.finish();
}

fn bench_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_parse_unmask");
    let parser = FrameParser::new(1 << 20);
    for len in SIZES {
        let wire = masked_client_frame(&payload(len), [0x37, 0xfa, 0x21, 0x3d]);
        group.throughput(Throughput::Bytes(len as u64));
        // Parsing consumes the buffer and unmasks it in place, so each iteration gets a fresh
        // copy, made outside the measurement. Large inputs get smaller batches to bound memory.
        let batch = if len > 4096 {
            BatchSize::LargeInput
        } else {
            BatchSize::SmallInput
        };
        group.bench_function(label(len), |b| {
            b.iter_batched_ref(
                || wire.clone(),
                |buf| {
                    let payload = parser
                        .parse(buf)
                        .expect("valid frame")
                        .expect("whole frame");
                    debug_assert_eq!(payload.len(), len);
                    payload
                },
                batch,
            )
        });
    }
    group.finish();
}

/// A 64 KiB text frame (characters of 1 to 4 bytes) through the parser and the assembler, the
/// way the reader drives them: whole, or one byte per read with the incremental UTF-8 check of
/// the frame still arriving after each byte.
fn bench_text_trickle(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_text_utf8_64KiB");
    let len = 64 * 1024;
    let mut text = "aé✓🚀 ".repeat(len / 11 + 1);
    while text.len() > len {
        text.pop();
    }
    let wire = masked_client_frame(text.as_bytes(), [0x37, 0xfa, 0x21, 0x3d]);
    let parser = FrameParser::new(1 << 20);
    group.throughput(Throughput::Bytes(text.len() as u64));
    let expect_text = |message: Option<Message>| match message {
        Some(Message::Text(t)) => t,
        other => panic!("expected a text message, got {other:?}"),
    };
    group.bench_function("whole", |b| {
        b.iter_batched_ref(
            || (wire.clone(), MessageAssembler::new(1 << 20)),
            |(buf, assembler)| {
                let frame = parser.parse_frame(buf).expect("valid").expect("whole");
                expect_text(assembler.push(frame).expect("valid"))
            },
            BatchSize::LargeInput,
        )
    });
    group.bench_function("1B_chunks", |b| {
        b.iter_batched_ref(
            || {
                let buf = BytesMut::with_capacity(wire.len() + 16);
                (buf, MessageAssembler::new(1 << 20))
            },
            |(buf, assembler)| {
                for &byte in &wire[..] {
                    buf.extend_from_slice(&[byte]);
                    match parser.parse_frame(buf).expect("valid") {
                        None => assembler.check_arriving(buf).expect("valid so far"),
                        Some(frame) => return expect_text(assembler.push(frame).expect("valid")),
                    }
                }
                unreachable!("the frame completes with its last byte")
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

// What `criterion_group!` and `criterion_main!` expand to, written out: the macro's `pub fn` has
// no doc comment, and `missing_docs` is on for every target.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_encode(&mut c);
    bench_parse(&mut c);
    bench_text_trickle(&mut c);
    c.final_summary();
}
