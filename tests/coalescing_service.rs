//! `CoalescingService`: one run per key at a time, its outcome shared by every caller that
//! joined it; panics, timeouts and cancelled callers leave nothing stuck.
//!
//! Run: `cargo test --features coalescing --test coalescing_service`
//!
//! Nothing here asserts timing. Tests that need several callers on one run either put them in
//! one `join_all` on a current-thread runtime (its first poll joins them all before the run's
//! task can start) or hold the run on a gate until the counters show every caller has joined.
//! `within` bounds every wait, so a bug fails a test instead of hanging it.

#![cfg(feature = "coalescing")]

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::anyhow;
use axum_realtime_kit::coalescing::{CoalescingService, CoalescingStats};
use axum_realtime_kit::prelude::CoalescingService as FromPrelude;
use futures_util::future::join_all;
use tokio::sync::watch;

/// Hang guard for every wait in this file.
const HANG_GUARD: Duration = Duration::from_secs(60);

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(HANG_GUARD, fut)
        .await
        .unwrap_or_else(|_| panic!("hang guard: {what} did not finish"))
}

/// A gate operations can wait on; opened once by the test.
fn gate() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

async fn pass(mut gate: watch::Receiver<bool>) {
    let _ = gate.wait_for(|open| *open).await;
}

/// Waits until `calls` calls have started or joined a run (the counters say so).
async fn joined<K, T>(svc: &CoalescingService<K, T>, calls: usize) {
    within("callers joining", async {
        loop {
            let s = svc.get_stats().await;
            if s.initiated_operations + s.coalesced_requests >= calls {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// Sets its flag when dropped: tells whether an operation's future was dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_callers_share_one_run_and_one_arc() {
    const CALLERS: usize = 1_000;
    let svc: CoalescingService<&'static str, String> = CoalescingService::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let (open, gate) = gate();

    let tasks: Vec<_> = (0..CALLERS)
        .map(|_| {
            let svc = svc.clone();
            let runs = Arc::clone(&runs);
            let gate = gate.clone();
            tokio::spawn(async move {
                svc.execute("hot", move || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    async move {
                        pass(gate).await;
                        Ok(String::from("expensive value"))
                    }
                })
                .await
            })
        })
        .collect();

    joined(&svc, CALLERS).await;
    assert_eq!(svc.get_pending_tasks_count().await, 1);
    open.send_replace(true);

    let mut results = Vec::with_capacity(CALLERS);
    for task in tasks {
        results.push(
            within("caller", task)
                .await
                .expect("caller task")
                .expect("value"),
        );
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the operation ran exactly once"
    );
    assert_eq!(*results[0], "expensive value");
    assert!(
        results.iter().all(|r| Arc::ptr_eq(r, &results[0])),
        "one shared Arc"
    );
    assert_eq!(
        svc.get_stats().await,
        CoalescingStats {
            initiated_operations: 1,
            coalesced_requests: CALLERS - 1,
            failed_operations: 0,
            timed_out_operations: 0,
        }
    );
    assert_eq!(svc.get_pending_tasks_count().await, 0);
}

#[tokio::test]
async fn a_finished_run_is_not_reused() {
    let svc: CoalescingService<u32, u32> = CoalescingService::default();
    let runs = Arc::new(AtomicUsize::new(0));
    let call = || {
        let runs = Arc::clone(&runs);
        svc.execute(1, move || async move {
            Ok(runs.fetch_add(1, Ordering::SeqCst) as u32)
        })
    };
    let first = within("first call", call()).await.expect("value");
    let second = within("second call", call()).await.expect("value");
    assert_eq!(
        (*first, *second),
        (0, 1),
        "the second call ran the operation again"
    );
    assert!(!Arc::ptr_eq(&first, &second));
    assert_eq!(svc.get_stats().await.initiated_operations, 2);
}

#[tokio::test]
async fn timeout_reaches_every_waiter_and_frees_the_key() {
    const CALLERS: usize = 8;
    let svc: CoalescingService<String, u32> =
        CoalescingService::with_timeout(Duration::from_millis(50));
    let dropped = Arc::new(AtomicBool::new(false));

    // `join_all` polls the calls in order: the first one starts the run, so only its
    // operation carries the flag (the others' closures are dropped uncalled).
    let calls = (0..CALLERS).map(|i| {
        let flag = (i == 0).then(|| DropFlag(Arc::clone(&dropped)));
        svc.execute("slow".to_owned(), move || async move {
            let _flag = flag;
            std::future::pending::<()>().await;
            Ok(0)
        })
    });
    let results = within("timed-out callers", join_all(calls)).await;

    let first = results[0].as_ref().expect_err("timed out");
    for result in &results {
        let err = result.as_ref().expect_err("every waiter gets the timeout");
        assert!(Arc::ptr_eq(err, first), "one shared error");
    }
    let message = first.to_string();
    assert!(
        message.contains("timed out"),
        "says it timed out: {message}"
    );
    assert!(message.contains("\"slow\""), "names the key: {message}");
    assert!(
        dropped.load(Ordering::SeqCst),
        "the operation's future was dropped"
    );
    assert_eq!(svc.get_pending_tasks_count().await, 0, "no stuck entry");
    assert_eq!(
        svc.get_stats().await,
        CoalescingStats {
            initiated_operations: 1,
            coalesced_requests: CALLERS - 1,
            failed_operations: 0,
            timed_out_operations: 1,
        }
    );

    // The key runs fresh, and a quick operation is not affected by the timeout.
    let again = svc.execute("slow".to_owned(), || async { Ok(7) });
    assert_eq!(
        *within("call after timeout", again).await.expect("value"),
        7
    );
}

#[tokio::test]
async fn an_error_is_shared_and_the_next_call_runs_again() {
    const CALLERS: usize = 20;
    let svc: CoalescingService<u8, String> = CoalescingService::new();
    let runs = Arc::new(AtomicUsize::new(0));

    let calls = (0..CALLERS).map(|_| {
        let runs = Arc::clone(&runs);
        svc.execute(9, move || {
            runs.fetch_add(1, Ordering::SeqCst);
            async { Err(anyhow!("backend unavailable")) }
        })
    });
    let results = within("failing callers", join_all(calls)).await;

    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let first = results[0].as_ref().expect_err("error");
    assert_eq!(
        first.to_string(),
        "backend unavailable",
        "the operation's own error"
    );
    for result in &results {
        assert!(Arc::ptr_eq(result.as_ref().expect_err("error"), first));
    }
    assert_eq!(svc.get_pending_tasks_count().await, 0);

    let runs_again = Arc::clone(&runs);
    let retry = svc.execute(9, move || {
        runs_again.fetch_add(1, Ordering::SeqCst);
        async { Ok(String::from("recovered")) }
    });
    assert_eq!(*within("retry", retry).await.expect("value"), "recovered");
    assert_eq!(runs.load(Ordering::SeqCst), 2, "the error was not cached");
    let stats = svc.get_stats().await;
    assert_eq!(
        (stats.initiated_operations, stats.failed_operations),
        (2, 1)
    );
}

#[tokio::test]
async fn a_panicking_future_reaches_every_waiter_as_an_error() {
    const CALLERS: usize = 10;
    let svc: CoalescingService<&'static str, u64> = CoalescingService::new();

    let calls = (0..CALLERS).map(|_| {
        svc.execute("k", || async {
            tokio::task::yield_now().await;
            panic!("simulated crash in the future");
        })
    });
    let results = within("panicking callers", join_all(calls)).await;

    let first = results[0].as_ref().expect_err("panic becomes an error");
    for result in &results {
        assert!(Arc::ptr_eq(result.as_ref().expect_err("error"), first));
    }
    panic_reported_and_key_freed(&svc, &first.to_string(), "simulated crash in the future").await;
}

#[tokio::test]
async fn a_panicking_closure_becomes_an_error_and_frees_the_key() {
    let svc: CoalescingService<&'static str, u64> = CoalescingService::new();

    // The closure is called within the first poll of the call that starts the run, and its
    // panic lands the run in that same poll, so no other caller can have joined it.
    let call = svc.execute("k", || -> std::future::Ready<anyhow::Result<u64>> {
        panic!("simulated crash in the closure")
    });
    let message = within("panicking closure", call)
        .await
        .expect_err("panic becomes an error")
        .to_string();
    panic_reported_and_key_freed(&svc, &message, "simulated crash in the closure").await;
}

/// After one run of key `"k"` panicked with `what`: the error says so, no entry is stuck, the
/// next call runs again, and the stats count two runs, one failed.
async fn panic_reported_and_key_freed(
    svc: &CoalescingService<&'static str, u64>,
    message: &str,
    what: &str,
) {
    assert!(message.contains("panicked"), "says it panicked: {message}");
    assert!(message.contains(what), "{message}");
    assert_eq!(svc.get_pending_tasks_count().await, 0, "no stuck entry");

    let next = svc.execute("k", || async { Ok(7) });
    assert_eq!(*within("call after panic", next).await.expect("value"), 7);
    let stats = svc.get_stats().await;
    assert_eq!(
        (stats.initiated_operations, stats.failed_operations),
        (2, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_keys_in_parallel_each_run_once() {
    const KEYS: usize = 100;
    const PER_KEY: usize = 20;
    let svc: CoalescingService<usize, usize> = CoalescingService::new();
    let runs: Arc<Vec<AtomicUsize>> = Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let (open, gate) = gate();

    let tasks: Vec<_> = (0..KEYS * PER_KEY)
        .map(|i| {
            let key = i % KEYS;
            let svc = svc.clone();
            let runs = Arc::clone(&runs);
            let gate = gate.clone();
            tokio::spawn(async move {
                let value = svc
                    .execute(key, move || {
                        runs[key].fetch_add(1, Ordering::SeqCst);
                        async move {
                            pass(gate).await;
                            Ok(key * 1_000)
                        }
                    })
                    .await;
                (key, value)
            })
        })
        .collect();

    joined(&svc, KEYS * PER_KEY).await;
    assert_eq!(svc.get_pending_tasks_count().await, KEYS);
    open.send_replace(true);

    let mut by_key: Vec<Option<Arc<usize>>> = vec![None; KEYS];
    for task in tasks {
        let (key, value) = within("caller", task).await.expect("caller task");
        let value = value.expect("value");
        assert_eq!(*value, key * 1_000);
        match &by_key[key] {
            Some(seen) => assert!(Arc::ptr_eq(seen, &value), "key {key}: one shared Arc"),
            None => by_key[key] = Some(value),
        }
    }
    for (key, count) in runs.iter().enumerate() {
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "key {key} ran exactly once"
        );
    }
    let stats = svc.get_stats().await;
    assert_eq!(stats.initiated_operations, KEYS);
    assert_eq!(stats.coalesced_requests, KEYS * (PER_KEY - 1));
    assert_eq!(svc.get_pending_tasks_count().await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_first_caller_does_not_cancel_the_others() {
    let svc: CoalescingService<&'static str, String> = CoalescingService::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicBool::new(false));
    let (open, gate) = gate();

    // The leader starts the run, then is aborted while the run is held on the gate.
    let leader = {
        let svc = svc.clone();
        let runs = Arc::clone(&runs);
        let flag = DropFlag(Arc::clone(&dropped));
        tokio::spawn(async move {
            svc.execute("report", move || {
                runs.fetch_add(1, Ordering::SeqCst);
                async move {
                    let _flag = flag;
                    pass(gate).await;
                    Ok(String::from("done"))
                }
            })
            .await
        })
    };
    joined(&svc, 1).await;
    let followers: Vec<_> = (0..5)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                svc.execute("report", || async {
                    unreachable!("joins the leader's run")
                })
                .await
            })
        })
        .collect();
    joined(&svc, 6).await;

    leader.abort();
    let aborted = within("aborted leader", leader).await;
    assert!(aborted.expect_err("aborted").is_cancelled());
    assert!(
        !dropped.load(Ordering::SeqCst),
        "the run was not cancelled with its leader"
    );
    assert_eq!(svc.get_pending_tasks_count().await, 1);

    open.send_replace(true);
    for follower in followers {
        let value = within("follower", follower)
            .await
            .expect("task")
            .expect("value");
        assert_eq!(*value, "done");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(svc.get_pending_tasks_count().await, 0);
    assert_eq!(svc.get_stats().await.failed_operations, 0);
}

#[tokio::test]
async fn a_dropped_sole_caller_still_lets_the_run_finish() {
    let svc: CoalescingService<u8, u8> = CoalescingService::new();
    let finished = Arc::new(AtomicBool::new(false));
    let (open, gate) = gate();

    {
        // Poll the only call once (it starts the run), then drop it.
        let finished = Arc::clone(&finished);
        let call = svc.execute(3, move || async move {
            pass(gate).await;
            finished.store(true, Ordering::SeqCst);
            Ok(3)
        });
        let early = futures_util::future::poll_immediate(call).await;
        assert!(early.is_none(), "the run is held on the gate");
    }
    assert_eq!(svc.get_pending_tasks_count().await, 1);
    open.send_replace(true);
    within("run to land", async {
        while svc.get_pending_tasks_count().await != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(
        finished.load(Ordering::SeqCst),
        "the run completed with nobody waiting"
    );
}

#[tokio::test]
async fn stats_count_every_call_and_every_ending() {
    let svc: CoalescingService<&'static str, u32> =
        CoalescingService::with_timeout(Duration::from_millis(50));
    assert_eq!(svc.get_stats().await, CoalescingStats::default());

    // 5 callers of a succeeding run, 3 of a failing one, 2 of a panicking one, 4 of one that
    // times out: 4 runs started, 10 calls joined, 2 failed, 1 timed out.
    let ok = (0..5).map(|_| svc.execute("ok", || async { Ok(1) }));
    let err = (0..3).map(|_| svc.execute("err", || async { Err(anyhow!("no")) }));
    let boom = (0..2).map(|_| {
        svc.execute("boom", || async {
            tokio::task::yield_now().await;
            panic!("boom")
        })
    });
    let slow = (0..4).map(|_| svc.execute("slow", std::future::pending));
    let (ok, err, boom, slow) = within("all runs", async {
        tokio::join!(join_all(ok), join_all(err), join_all(boom), join_all(slow))
    })
    .await;
    assert!(ok.iter().all(Result::is_ok));
    assert!(err.iter().chain(&boom).chain(&slow).all(Result::is_err));

    assert_eq!(
        svc.get_stats().await,
        CoalescingStats {
            initiated_operations: 4,
            coalesced_requests: 10,
            failed_operations: 2,
            timed_out_operations: 1,
        }
    );
    assert_eq!(svc.get_pending_tasks_count().await, 0);

    svc.reset_stats().await;
    assert_eq!(svc.get_stats().await, CoalescingStats::default());
}

#[tokio::test]
async fn clones_share_state_and_debug_shows_it() {
    let svc: FromPrelude<String, Vec<u8>> = FromPrelude::new();
    let clone = svc.clone();
    let value = within(
        "call",
        clone.execute("a".into(), || async { Ok(vec![1, 2]) }),
    )
    .await;
    assert_eq!(*value.expect("value"), [1, 2]);
    assert_eq!(
        svc.get_stats().await.initiated_operations,
        1,
        "seen through the original"
    );

    let debug = format!("{svc:?}");
    assert!(debug.starts_with("CoalescingService"), "{debug}");
    assert!(debug.contains("pending: 0"), "{debug}");
}

/// Written the way 0.1.0's documentation and tests call it: a `move` closure capturing owned
/// state, `tokio::spawn`ed callers, `anyhow::Result` operations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_written_for_0_1_0_compiles_and_runs() {
    async fn fetch(key: String, calls: Arc<AtomicUsize>) -> anyhow::Result<String> {
        calls.fetch_add(1, Ordering::SeqCst);
        Ok(format!("Data for {key}"))
    }
    let service: CoalescingService<String, String> = CoalescingService::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let handle = {
        let svc = service.clone();
        let calls = Arc::clone(&calls);
        tokio::spawn(async move {
            svc.execute("k".to_string(), move || fetch("k".to_string(), calls))
                .await
        })
    };
    let result = within("spawned caller", handle).await.expect("task");
    assert_eq!(result.expect("value"), Arc::new("Data for k".to_string()));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
