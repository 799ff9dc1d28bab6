//! Parsing what clients send: a `ClientMessage`-like enum with serde_json (what the default
//! `decode` uses) against simd-json, parsing in place. simd-json is faster on large messages but
//! is not used: it accepts input serde_json refuses (see `decode_json`).
//!
//! Run: `cargo bench --bench json`

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use serde::Deserialize;

/// The shape of `basic_chat`'s `ClientMessage`.
#[derive(Debug, Deserialize)]
enum ClientMessage {
    SendMessage { room: String, text: String },
    Ping,
}

fn inputs() -> [(&'static str, Vec<u8>); 4] {
    let text = "Hello everyone! The release build is green again; benchmarks are next, then the \
                load test on two cores.";
    assert!((95..=110).contains(&text.len()));
    let send = format!(r#"{{"SendMessage":{{"room":"general","text":"{text}"}}}}"#);
    // Larger messages, where simd-json's vectorised scanning has room to pay off.
    let long = |n: usize| {
        let words = "lorem ipsum dolor sit amet, \\\"quoted\\\" and escaped ".repeat(n);
        format!(r#"{{"SendMessage":{{"room":"general","text":"{words}"}}}}"#).into_bytes()
    };
    [
        ("send_message", send.into_bytes()),
        ("ping", br#""Ping""#.to_vec()),
        ("send_message_4k", long(4096 / 40)),
        ("send_message_32k", long(32768 / 40)),
    ]
}

/// Both parsers must agree on what they parse, or the comparison means nothing.
fn check(json: &[u8]) {
    let by_serde: ClientMessage = serde_json::from_slice(json).expect("serde_json parses it");
    let by_simd: ClientMessage =
        simd_json::serde::from_slice(&mut json.to_vec()).expect("simd-json parses it");
    match (by_serde, by_simd) {
        (
            ClientMessage::SendMessage { room: r1, text: t1 },
            ClientMessage::SendMessage { room: r2, text: t2 },
        ) => assert!(r1 == "general" && r1 == r2 && t1 == t2),
        (ClientMessage::Ping, ClientMessage::Ping) => {}
        other => panic!("parsers disagree: {other:?}"),
    }
}

fn bench_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("client_message");
    for (name, json) in inputs() {
        check(&json);
        group.throughput(Throughput::Bytes(json.len() as u64));
        // Both parsers run in the same harness: each iteration gets a fresh copy of the message,
        // made outside the measurement (simd-json rewrites its input; serde_json only reads it),
        // and the parsed message is dropped outside it too.
        group.bench_function(BenchmarkId::new("simd_json", name), |b| {
            b.iter_batched_ref(
                || json.clone(),
                |buf| simd_json::serde::from_slice::<ClientMessage>(buf).expect("valid"),
                BatchSize::SmallInput,
            )
        });
        // simd-json with its scratch buffers kept across messages (as a reader could keep them
        // per connection); `from_slice` allocates them for every message.
        let mut buffers = simd_json::Buffers::default();
        group.bench_function(BenchmarkId::new("simd_json_reused_buffers", name), |b| {
            b.iter_batched_ref(
                || json.clone(),
                |buf| {
                    simd_json::serde::from_slice_with_buffers::<ClientMessage>(buf, &mut buffers)
                        .expect("valid")
                },
                BatchSize::SmallInput,
            )
        });
        group.bench_function(BenchmarkId::new("serde_json", name), |b| {
            b.iter_batched_ref(
                || json.clone(),
                |buf| serde_json::from_slice::<ClientMessage>(black_box(buf)).expect("valid"),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

// What `criterion_group!` and `criterion_main!` expand to, written out: the macro's `pub fn` has
// no doc comment, and `missing_docs` is on for every target.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_parse(&mut c);
    c.final_summary();
}
