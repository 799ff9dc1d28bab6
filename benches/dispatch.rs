//! The fan-out: one pre-encoded frame delivered to every in-memory subscriber of a topic through
//! a shard's deliver path, and the dispatcher's frame-once reuse for a burst of identical
//! payloads.
//!
//! Run: `cargo bench --bench dispatch`

use std::hint::black_box;
use std::time::{Duration, Instant};

use axum_realtime_kit::bench_api::{FrameDeduper, Subscriber, TopicMap, encode_text};
use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};

const SUBSCRIBERS: [usize; 5] = [10, 100, 1_000, 10_000, 100_000];
const TOPIC: &str = "general";

/// A chat message as the example broadcasts it, `len` bytes of JSON.
fn chat_json(len: usize, last: u8) -> Bytes {
    let head = br#"{"type":"message","room":"general","username":"alice","text":""#;
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(head);
    while v.len() + 2 < len {
        v.push(b'a' + (v.len() % 26) as u8);
    }
    v.extend_from_slice(br#""}"#);
    v.truncate(len);
    // Distinct payloads differ only in their last text byte: the reuse check then has to compare
    // the whole payload before it fails.
    let at = v.len().saturating_sub(3);
    v[at] = last;
    Bytes::from(v)
}

fn bench_deliver(c: &mut Criterion) {
    let mut group = c.benchmark_group("deliver");
    let frame = encode_text(&chat_json(128, b'z'));
    let mut batch = Vec::new();
    for n in SUBSCRIBERS {
        let subs: Vec<Subscriber> = (0..n as u128)
            .map(|id| Subscriber::new(id, 1 << 20))
            .collect();
        let mut map = TopicMap::new();
        for sub in &subs {
            map.subscribe(sub, TOPIC.into());
        }
        group.throughput(Throughput::Elements(n as u64));
        group.sample_size(if n >= 100_000 { 20 } else { 100 });

        // Draining INCLUDED in the timer (as centrifuge's hub broadcast bench does): deliver the
        // frame, then take every subscriber's queue the way its writer would, and drop the
        // references, before the clock stops. Each iteration starts with empty queues.
        group.bench_function(BenchmarkId::new("deliver_and_drain", n), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    map.deliver(TOPIC, &frame);
                    for sub in &subs {
                        black_box(sub.drain(&mut batch));
                    }
                }
                start.elapsed()
            })
        });

        // Draining EXCLUDED: only the deliver call is timed (one clock read per iteration, which
        // adds some tens of ns to the small cases); the queues are drained untimed after it.
        group.bench_function(BenchmarkId::new("deliver_only", n), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    map.deliver(TOPIC, &frame);
                    timed += start.elapsed();
                    for sub in &subs {
                        black_box(sub.drain(&mut batch));
                    }
                }
                timed
            })
        });
    }
    group.finish();
}

/// Publishes in one burst: the same payload to this many topics.
const BURST: usize = 1_000;

fn bench_dedup(c: &mut Criterion) {
    let mut group = c.benchmark_group("dedup");
    group.throughput(Throughput::Elements(BURST as u64));
    for len in [128, 1024, 16 * 1024] {
        // Each publish arrives in its own buffer (as from the broker), so the reuse check
        // compares contents, not pointers.
        let same: Vec<Bytes> = (0..BURST).map(|_| chat_json(len, b'z')).collect();
        let distinct: Vec<Bytes> = (0..BURST)
            .map(|i| chat_json(len, b'a' + (i % 26) as u8))
            .collect();

        // The dispatcher's path: the first publish is framed, the other 999 reuse its frame.
        // A fresh dispatcher per burst, made outside the measurement.
        group.bench_function(BenchmarkId::new("frame_for_same", len), |b| {
            b.iter_batched_ref(
                FrameDeduper::new,
                |d| {
                    for p in &same {
                        black_box(d.frame_for(p));
                    }
                },
                BatchSize::SmallInput,
            )
        });

        // Framing every publish again: what the reuse saves.
        group.bench_function(BenchmarkId::new("encode_each", len), |b| {
            b.iter_batched_ref(
                FrameDeduper::new,
                |_| {
                    for p in &same {
                        black_box(encode_text(p));
                    }
                },
                BatchSize::SmallInput,
            )
        });

        // The reuse check's cost when it never hits: consecutive payloads differ only near the
        // end, so every check compares the whole payload and then frames anyway.
        group.bench_function(BenchmarkId::new("frame_for_distinct", len), |b| {
            b.iter_batched_ref(
                FrameDeduper::new,
                |d| {
                    for p in &distinct {
                        black_box(d.frame_for(p));
                    }
                },
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
    bench_deliver(&mut c);
    bench_dedup(&mut c);
    c.final_summary();
}
