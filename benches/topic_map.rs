//! A shard's topic map: subscribe, unsubscribe and lookup with 1e3 … 1e6 topics, one subscriber
//! each, driven directly (no shard task, no channel).
//!
//! Run: `cargo bench --bench topic_map`
//!
//! `topic_map_teardown` is the other shape: one topic with N subscribers, all leaving (a
//! `Remove` each, in the order they joined), as when a broadcast channel's clients all
//! disconnect at once; a whole teardown per iteration, reported per departure.
//!
//! The map is built once per size, outside any measurement, and shared by the three benches.
//! Subscribe and unsubscribe work on the map's own entries in a scattered order (so in the large
//! maps the entries touched are not in cache), timed in chunks of at most 1 % of the map:
//! - unsubscribe: a chunk is unsubscribed timed, then put back untimed;
//! - subscribe: entries are taken out untimed into a parked pool and subscribed again, timed,
//!   only once 10 % of the map (at most 50 000 entries) has been parked after them, so their
//!   re-insertion does not find them still in cache. The map is then 88–100 % (1e6: 95–100 %) of
//!   its nominal size; the hash table keeps its capacity throughout.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum_realtime_kit::bench_api::{Subscriber, TopicMap};
use criterion::{BenchmarkId, Criterion, Throughput};

const SIZES: [usize; 4] = [1_000, 10_000, 100_000, 1_000_000];

/// A prime coprime with every size above: `i * STRIDE % n` visits every entry, scattered.
const STRIDE: u64 = 1_000_003;

struct Fixture {
    map: TopicMap,
    subs: Vec<Subscriber>,
    topics: Vec<Arc<str>>,
    /// Where the next chunk starts in the scattered order.
    cursor: u64,
    /// Entries taken out of the map, oldest first, waiting to be subscribed again.
    parked: VecDeque<usize>,
}

impl Fixture {
    fn new(n: usize) -> Self {
        let subs: Vec<Subscriber> = (0..n as u128)
            .map(|id| Subscriber::new(id, 64 * 1024))
            .collect();
        let topics: Vec<Arc<str>> = (0..n).map(|i| Arc::from(format!("room-{i}"))).collect();
        let mut map = TopicMap::new();
        for (sub, topic) in subs.iter().zip(&topics) {
            map.subscribe(sub, topic.clone());
        }
        assert_eq!(map.topic_count(), n);
        Self {
            map,
            subs,
            topics,
            cursor: 0,
            parked: VecDeque::new(),
        }
    }

    /// The next `k` entries in scattered order.
    fn next_chunk(&mut self, k: u64) -> Vec<usize> {
        let n = self.subs.len() as u64;
        let start = self.cursor;
        self.cursor = (self.cursor + k) % n;
        (start..start + k)
            .map(|c| (c % n * STRIDE % n) as usize)
            .collect()
    }

    fn chunk_len(&self) -> u64 {
        (self.subs.len() as u64 / 100).clamp(10, 1000)
    }

    /// How many parked entries stand between an entry's removal and its timed re-subscription.
    fn park_distance(&self) -> usize {
        (self.subs.len() / 10).min(50_000)
    }

    /// Subscribes every parked entry again (untimed), restoring the full map.
    fn unpark_all(&mut self) {
        for i in self.parked.drain(..) {
            self.map.subscribe(&self.subs[i], self.topics[i].clone());
        }
    }
}

fn bench_topic_map(c: &mut Criterion) {
    let mut group = c.benchmark_group("topic_map");
    group.throughput(Throughput::Elements(1));
    for n in SIZES {
        let t = Instant::now();
        let mut fx = Fixture::new(n);
        eprintln!("topic_map: built {n} topics in {:.2?}", t.elapsed());
        group.sample_size(if n >= 1_000_000 { 10 } else { 100 });

        // A connection joining: a new entry in the connection index and in the topic map (with
        // its one-element subscriber list), for connections removed long enough ago (untimed).
        group.bench_function(BenchmarkId::new("subscribe", n), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let k = left.min(fx.chunk_len());
                    while fx.parked.len() < fx.park_distance() + k as usize {
                        for i in fx.next_chunk(fx.chunk_len()) {
                            fx.map.remove(&fx.subs[i]);
                            fx.parked.push_back(i);
                        }
                    }
                    let chunk: Vec<usize> = fx.parked.drain(..k as usize).collect();
                    let start = Instant::now();
                    for &i in &chunk {
                        fx.map.subscribe(&fx.subs[i], fx.topics[i].clone());
                    }
                    timed += start.elapsed();
                    left -= k;
                }
                timed
            })
        });
        fx.unpark_all();
        assert_eq!(fx.map.topic_count(), n);

        // An `Unsubscribe` command: the topic loses its only subscriber and leaves the map.
        // Each chunk is re-subscribed untimed afterwards.
        group.bench_function(BenchmarkId::new("unsubscribe", n), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let k = left.min(fx.chunk_len());
                    let chunk = fx.next_chunk(k);
                    let start = Instant::now();
                    for &i in &chunk {
                        fx.map.unsubscribe(&fx.subs[i], fx.topics[i].clone());
                    }
                    timed += start.elapsed();
                    for &i in &chunk {
                        fx.map.remove(&fx.subs[i]);
                        fx.map.subscribe(&fx.subs[i], fx.topics[i].clone());
                    }
                    left -= k;
                }
                timed
            })
        });
        assert_eq!(fx.map.topic_count(), n);

        // The lookup a delivery starts with. The keys are separate allocations from the map's
        // own (as a broker-delivered topic is), so each lookup hashes and compares the string.
        let keys: Vec<Box<str>> = (0..n as u64)
            .map(|c| fx.topics[(c * STRIDE % n as u64) as usize].as_ref().into())
            .collect();
        group.bench_function(BenchmarkId::new("lookup", n), |b| {
            let mut next = 0;
            b.iter(|| {
                let key = &keys[next];
                next = if next + 1 == keys.len() { 0 } else { next + 1 };
                fx.map.lookup(black_box(key))
            })
        });

        // Free the million-entry fixture before building the next one, untimed.
        drop(keys);
        drop(fx);
    }
    group.finish();
}

/// One topic with `n` subscribers; every one leaves, in the order they joined. One iteration is
/// a whole teardown; the throughput is per departure.
fn bench_teardown(c: &mut Criterion) {
    let mut group = c.benchmark_group("topic_map_teardown");
    group.sample_size(10);
    let topic: Arc<str> = Arc::from("broadcast");
    for n in [1_000usize, 10_000, 100_000] {
        group.throughput(Throughput::Elements(n as u64));
        let subs: Vec<Subscriber> = (0..n as u128)
            .map(|id| Subscriber::new(id, 64 * 1024))
            .collect();
        group.bench_function(BenchmarkId::new("remove_all", n), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let mut map = TopicMap::new();
                    for sub in &subs {
                        map.subscribe(sub, topic.clone());
                    }
                    let start = Instant::now();
                    for sub in &subs {
                        map.remove(sub);
                    }
                    timed += start.elapsed();
                    assert_eq!(map.lookup(&topic), None);
                }
                timed
            })
        });
    }
    group.finish();
}

// What `criterion_group!` and `criterion_main!` expand to, written out: the macro's `pub fn` has
// no doc comment, and `missing_docs` is on for every target.
fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_topic_map(&mut c);
    bench_teardown(&mut c);
    c.final_summary();
}
