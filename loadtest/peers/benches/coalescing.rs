//! `CoalescingService` under contention, ours against the published 0.1.0's, on a Tokio
//! multi-thread runtime:
//!
//! - `one_key/{ours,v0.1.0}/N`: N tasks call `execute` for the same key. The operation waits on
//!   a gate that opens only once every task has polled its call once (so with ours all N have
//!   joined the one run), then returns. One iteration = spawn the N tasks, open the gate, and
//!   collect the N results.
//! - `distinct_keys/{ours,v0.1.0}/1000`: 1 000 tasks, each calling `execute` for its own key
//!   with an operation that returns at once (no coalescing possible: pure per-call overhead
//!   and table contention).
//! - `keys_100x10/{ours,v0.1.0}`: 1 000 tasks over 100 keys, 10 per key, gated as in `one_key`.
//!
//! Before measuring, one round of each workload per implementation prints its counters to
//! stderr (how many runs were started versus joined).
//!
//! Run: `cargo bench -p rtk-peers --bench coalescing`

use std::hint::black_box;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum_realtime_kit::coalescing::CoalescingService;
use criterion::{BenchmarkId, Criterion, Throughput};
use futures_util::future::poll_immediate;
use tokio::runtime::Runtime;
use tokio::sync::{Notify, watch};

type Outcome = Result<Arc<u64>, Arc<anyhow::Error>>;

/// The operation: wait for the gate to open (if there is one), then produce `key`.
async fn operation(key: u64, gate: Option<watch::Receiver<bool>>) -> anyhow::Result<u64> {
    if let Some(mut gate) = gate {
        let _ = gate.wait_for(|open| *open).await;
    }
    Ok(key)
}

/// The part of the API both implementations share, so one harness drives both.
trait Coalescer: Clone + Send + Sync + 'static {
    fn fresh() -> Self;
    fn call(
        &self,
        key: u64,
        gate: Option<watch::Receiver<bool>>,
    ) -> impl Future<Output = Outcome> + Send;
    fn counters(&self, rt: &Runtime) -> (usize, usize);
}

type Ours = CoalescingService<u64, u64>;
type Reference = seedkit::coalescing::CoalescingService<u64, u64>;

impl Coalescer for Ours {
    fn fresh() -> Self {
        Self::new()
    }
    fn call(
        &self,
        key: u64,
        gate: Option<watch::Receiver<bool>>,
    ) -> impl Future<Output = Outcome> + Send {
        self.execute(key, move || operation(key, gate))
    }
    fn counters(&self, rt: &Runtime) -> (usize, usize) {
        let s = rt.block_on(self.get_stats());
        (s.initiated_operations, s.coalesced_requests)
    }
}

impl Coalescer for Reference {
    fn fresh() -> Self {
        Self::new()
    }
    fn call(
        &self,
        key: u64,
        gate: Option<watch::Receiver<bool>>,
    ) -> impl Future<Output = Outcome> + Send {
        self.execute(key, move || operation(key, gate))
    }
    fn counters(&self, rt: &Runtime) -> (usize, usize) {
        let s = rt.block_on(self.get_stats());
        (s.initiated_operations, s.coalesced_requests)
    }
}

/// `callers` tasks; task `i` asks for key `i % keys`. With `gated`, the operations finish only
/// after every task has polled its call once.
async fn round<C: Coalescer>(svc: &C, callers: usize, keys: u64, gated: bool) {
    let (open, gate) = watch::channel(false);
    let polled = Arc::new(AtomicUsize::new(0));
    let all_polled = Arc::new(Notify::new());
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            let svc = svc.clone();
            let gate = gated.then(|| gate.clone());
            let polled = Arc::clone(&polled);
            let all_polled = Arc::clone(&all_polled);
            tokio::spawn(async move {
                let mut call = pin!(svc.call(i as u64 % keys, gate));
                let early = poll_immediate(call.as_mut()).await;
                if polled.fetch_add(1, Ordering::AcqRel) + 1 == callers {
                    all_polled.notify_one();
                }
                match early {
                    Some(outcome) => outcome,
                    None => call.await,
                }
            })
        })
        .collect();
    if gated {
        all_polled.notified().await;
        open.send_replace(true);
    }
    for task in tasks {
        let outcome = task.await.expect("caller task");
        black_box(outcome.expect("operation succeeds"));
    }
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// One round on a fresh service, then its (started, joined) counters on stderr.
fn report<C: Coalescer>(rt: &Runtime, name: &str, callers: usize, keys: u64, gated: bool) {
    let svc = C::fresh();
    rt.block_on(round(&svc, callers, keys, gated));
    let (started, joined) = svc.counters(rt);
    eprintln!("{name}: {callers} callers, {keys} key(s): {started} runs started, {joined} joined");
}

fn bench_one_key(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("one_key");
    for n in [1usize, 10, 100, 1_000] {
        report::<Ours>(rt, &format!("one_key/ours/{n}"), n, 1, true);
        report::<Reference>(rt, &format!("one_key/v0.1.0/{n}"), n, 1, true);
        group.throughput(Throughput::Elements(n as u64));
        let ours = Ours::fresh();
        group.bench_with_input(BenchmarkId::new("ours", n), &n, |b, &n| {
            b.iter(|| rt.block_on(round(&ours, n, 1, true)));
        });
        let reference = Reference::fresh();
        group.bench_with_input(BenchmarkId::new("v0.1.0", n), &n, |b, &n| {
            b.iter(|| rt.block_on(round(&reference, n, 1, true)));
        });
    }
    group.finish();
}

fn bench_many_keys(c: &mut Criterion, rt: &Runtime) {
    const CALLERS: usize = 1_000;

    report::<Ours>(rt, "distinct_keys/ours", CALLERS, CALLERS as u64, false);
    report::<Reference>(rt, "distinct_keys/v0.1.0", CALLERS, CALLERS as u64, false);
    let mut group = c.benchmark_group("distinct_keys");
    group.throughput(Throughput::Elements(CALLERS as u64));
    let ours = Ours::fresh();
    group.bench_with_input(BenchmarkId::new("ours", CALLERS), &CALLERS, |b, &n| {
        b.iter(|| rt.block_on(round(&ours, n, n as u64, false)));
    });
    let reference = Reference::fresh();
    group.bench_with_input(BenchmarkId::new("v0.1.0", CALLERS), &CALLERS, |b, &n| {
        b.iter(|| rt.block_on(round(&reference, n, n as u64, false)));
    });
    group.finish();

    report::<Ours>(rt, "keys_100x10/ours", CALLERS, 100, true);
    report::<Reference>(rt, "keys_100x10/v0.1.0", CALLERS, 100, true);
    let mut group = c.benchmark_group("keys_100x10");
    group.throughput(Throughput::Elements(CALLERS as u64));
    let ours = Ours::fresh();
    group.bench_function("ours", |b| {
        b.iter(|| rt.block_on(round(&ours, CALLERS, 100, true)));
    });
    let reference = Reference::fresh();
    group.bench_function("v0.1.0", |b| {
        b.iter(|| rt.block_on(round(&reference, CALLERS, 100, true)));
    });
    group.finish();
}

// What `criterion_group!` and `criterion_main!` expand to, written out: the macro's `pub fn` has
// no doc comment, and `missing_docs` is on for every target.
fn main() {
    let rt = runtime();
    let mut c = Criterion::default().configure_from_args();
    bench_one_key(&mut c, &rt);
    bench_many_keys(&mut c, &rt);
    c.final_summary();
}
