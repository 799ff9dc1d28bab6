//! Single-flight execution of expensive async operations (feature `coalescing`).
//!
//! A [`CoalescingService`] runs at most one operation per key at a time. The first caller for a
//! key starts the operation; every caller that arrives while it is still running waits for that
//! same run instead of starting its own, and all of them receive the same [`Arc`]: the value on
//! success, the error otherwise. As soon as the run ends, the key is free again and the next
//! call starts a fresh run. Nothing is cached.
//!
//! The operation runs in its own Tokio task, so a caller that gives up (its future is dropped)
//! does not cancel the work the other callers are waiting for. An operation that panics, or that
//! outlives the service's timeout, ends as an error for everyone waiting on it, and the key is
//! released.
//!
//! # Example
//! ```
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::time::Duration;
//!
//! use axum_realtime_kit::coalescing::CoalescingService;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Fail any single load that takes longer than two seconds.
//! let profiles: CoalescingService<u64, String> =
//!     CoalescingService::with_timeout(Duration::from_secs(2));
//! let loads = Arc::new(AtomicUsize::new(0));
//!
//! // Three requests for user 7 arrive together: one load, one shared answer.
//! let request = |svc: CoalescingService<u64, String>, loads: Arc<AtomicUsize>| async move {
//!     svc.execute(7, move || async move {
//!         loads.fetch_add(1, Ordering::Relaxed);
//!         tokio::time::sleep(Duration::from_millis(20)).await; // the expensive part
//!         Ok(String::from("profile of user 7"))
//!     })
//!     .await
//! };
//! let (a, b, c) = tokio::join!(
//!     request(profiles.clone(), loads.clone()),
//!     request(profiles.clone(), loads.clone()),
//!     request(profiles.clone(), loads.clone()),
//! );
//! let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
//! assert!(Arc::ptr_eq(&a, &b) && Arc::ptr_eq(&b, &c));
//! assert_eq!(loads.load(Ordering::Relaxed), 1);
//!
//! let stats = profiles.get_stats().await;
//! assert_eq!((stats.initiated_operations, stats.coalesced_requests), (1, 2));
//! assert_eq!(profiles.get_pending_tasks_count().await, 0);
//! # }
//! ```

use std::any::Any;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ahash::RandomState;
use anyhow::{Error, anyhow};
use futures_util::FutureExt as _;
use tokio::sync::watch;

/// What every caller of one run receives.
type Outcome<T> = Result<Arc<T>, Arc<Error>>;

/// The per-run channel's value: `None` until the run lands, then its outcome, set exactly once.
type Slot<T> = Option<Outcome<T>>;

/// Counters of a [`CoalescingService`], as returned by [`CoalescingService::get_stats`].
///
/// Every call to [`execute`](CoalescingService::execute) counts once, in either
/// `initiated_operations` or `coalesced_requests`; every run that did not succeed counts once,
/// in either `failed_operations` or `timed_out_operations`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CoalescingStats {
    /// Calls that found their key idle and so started a run of their operation.
    pub initiated_operations: usize,
    /// Calls that found a run for their key in progress and waited for its outcome instead.
    pub coalesced_requests: usize,
    /// Runs that ended without a value for a reason other than the timeout: the operation
    /// returned an error, panicked, or its task was dropped (runtime shutdown) before it ended.
    pub failed_operations: usize,
    /// Runs stopped because they exceeded the service's timeout.
    pub timed_out_operations: usize,
}

/// Runs at most one operation per key at a time and shares its outcome with every caller that
/// asked for that key meanwhile. See the [module documentation](self).
///
/// Cloning is cheap and yields a handle to the same service: clones share the in-flight runs,
/// the counters and the timeout.
pub struct CoalescingService<K, T> {
    /// Shared by every clone.
    shared: Arc<Shared<K, T>>,
}

/// The state behind every clone of one [`CoalescingService`].
struct Shared<K, T> {
    /// Upper bound on one run of an operation, measured from when its task starts it; `None`
    /// means no bound. Written once at construction and never changed, so it is read without a
    /// lock.
    timeout: Option<Duration>,

    /// The in-flight table and the counters, behind one lock, so that joining, starting and
    /// landing a run update both at once and a stats snapshot always agrees with the table.
    ///
    /// The lock is held for one hash-map operation and a few counter updates, and never across
    /// an `.await`. The only foreign code that runs under it is the key's `Hash`, `Eq` and
    /// `Clone`; the operation and its future never do. Should one of those key methods panic,
    /// the table is still consistent, so a poisoned lock is simply taken over (see [`lock`]).
    state: Mutex<State<K, T>>,
}

/// The fields guarded by [`Shared::state`].
struct State<K, T> {
    /// One entry per key whose run has started and not yet landed: a receiver of that run's
    /// outcome, cloned for each caller that joins it.
    ///
    /// Guarded by `Shared::state`. Inserted only by the caller that finds the key vacant (the
    /// run's leader); removed only by that run's [`Landing`], whichever way the run ends
    /// (value, error, timeout, panic, task dropped), and always *before* the outcome is
    /// published, so a caller that has seen an outcome can never join the run that produced it.
    flights: HashMap<K, watch::Receiver<Slot<T>>, RandomState>,

    /// Guarded by `Shared::state`. `initiated_operations` / `coalesced_requests` are counted
    /// when a caller starts / joins a run, the other two when its `Landing` removes the entry.
    stats: CoalescingStats,
}

/// Locks `state`, taking over a lock poisoned by a panicking key method: the table and the
/// counters are only ever updated by single, complete operations, so they are never torn.
fn lock<S>(state: &Mutex<S>) -> MutexGuard<'_, S> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K, T> CoalescingService<K, T> {
    /// A service whose operations may run for as long as they like.
    pub fn new() -> Self {
        Self::build(None)
    }

    /// A service that stops any run of an operation still going after `timeout`: every caller
    /// waiting on it gets an error saying the operation timed out, and the operation's future is
    /// dropped.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self::build(Some(timeout))
    }

    fn build(timeout: Option<Duration>) -> Self {
        Self {
            shared: Arc::new(Shared {
                timeout,
                state: Mutex::new(State {
                    flights: HashMap::with_hasher(RandomState::new()),
                    stats: CoalescingStats::default(),
                }),
            }),
        }
    }

    /// A snapshot of the counters.
    pub async fn get_stats(&self) -> CoalescingStats {
        lock(&self.shared.state).stats
    }

    /// How many keys have a run in progress right now.
    pub async fn get_pending_tasks_count(&self) -> usize {
        lock(&self.shared.state).flights.len()
    }

    /// Sets every counter back to zero. Runs in progress are not affected (and are counted as
    /// failed or timed out when they end that way).
    pub async fn reset_stats(&self) {
        lock(&self.shared.state).stats = CoalescingStats::default();
    }
}

impl<K, T> CoalescingService<K, T>
where
    K: Eq + Hash + Clone + fmt::Debug + Send + 'static,
    T: Send + Sync + 'static,
{
    /// Returns the outcome of `operation` for `key`, running it only if no run for `key` is in
    /// progress.
    ///
    /// - If a run for `key` is in progress, `operation` is dropped without being called and
    ///   this call waits for that run's outcome.
    /// - Otherwise `operation` is called here, once, and the future it returns is run in a new
    ///   Tokio task; this call and every call for `key` that arrives before it ends wait for it.
    ///
    /// Every waiter receives a clone of the same `Arc`: `Ok` with the value, or `Err` with the
    /// operation's error, or an error saying that the operation panicked or timed out (see
    /// [`with_timeout`](Self::with_timeout)). The key is released when the run ends, so
    /// the next call starts a new run; outcomes are not cached.
    ///
    /// Dropping the future returned here only stops this caller from waiting: the run goes on
    /// for the others, even when this caller is the one that started it.
    ///
    /// # Panics
    /// If called outside a Tokio runtime (as `tokio::spawn` does). A panic of `operation` or
    /// of its future does not propagate: it becomes the error every waiter receives.
    pub async fn execute<F, Fut>(&self, key: K, operation: F) -> Result<Arc<T>, Arc<Error>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
    {
        let rx = match self.join_or_start(key) {
            Role::Follower(rx) => {
                drop(operation);
                rx
            }
            Role::Leader(rx, landing) => {
                self.launch(landing, operation);
                rx
            }
        };
        wait(rx).await
    }

    /// Joins the run in progress for `key`, or registers a new one that the caller must launch.
    fn join_or_start(&self, key: K) -> Role<K, T> {
        let mut state = lock(&self.shared.state);
        let state = &mut *state;
        match state.flights.entry(key) {
            Entry::Occupied(flight) => {
                state.stats.coalesced_requests += 1;
                Role::Follower(flight.get().clone())
            }
            Entry::Vacant(vacant) => {
                let (tx, rx) = watch::channel(None);
                let landing = Landing {
                    shared: Arc::clone(&self.shared),
                    key: vacant.key().clone(),
                    tx: Some(tx),
                };
                vacant.insert(rx.clone());
                state.stats.initiated_operations += 1;
                Role::Leader(rx, landing)
            }
        }
    }

    /// Calls `operation` and runs its future to the end in a new task that then lands the run.
    fn launch<F, Fut>(&self, landing: Landing<K, T>, operation: F)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
    {
        // No lock is held here. There is no `.await` between registering the run and handing
        // `landing` to the task, so the leader cannot be cancelled in between; any panic in
        // between drops `landing`, which lands the run as abandoned.
        let work = match std::panic::catch_unwind(AssertUnwindSafe(operation)) {
            Ok(work) => work,
            Err(payload) => {
                landing.land(Ending::Panicked(panic_message(&*payload)));
                return;
            }
        };
        let timeout = self.shared.timeout;
        tokio::spawn(async move {
            let work = AssertUnwindSafe(work).catch_unwind();
            let ending = match timeout {
                None => Ending::from(work.await),
                Some(limit) => match tokio::time::timeout(limit, work).await {
                    Ok(finished) => Ending::from(finished),
                    Err(_elapsed) => Ending::TimedOut(limit),
                },
            };
            landing.land(ending);
        });
    }
}

/// What [`CoalescingService::join_or_start`] made of a call.
enum Role<K, T>
where
    K: Eq + Hash + fmt::Debug,
{
    /// A run was in progress: wait for it.
    Follower(watch::Receiver<Slot<T>>),
    /// The key was idle: a run is registered; launch it with the `Landing`, then wait.
    Leader(watch::Receiver<Slot<T>>, Landing<K, T>),
}

/// How a run ended.
enum Ending<T> {
    /// The operation's future completed, with a value or an error.
    Finished(anyhow::Result<T>),
    /// The operation or its future panicked; the panic message.
    Panicked(String),
    /// The run was stopped after this long.
    TimedOut(Duration),
    /// The run's task was dropped before the run ended (e.g. at runtime shutdown).
    Abandoned,
}

impl<T> From<Result<anyhow::Result<T>, Box<dyn Any + Send>>> for Ending<T> {
    fn from(caught: Result<anyhow::Result<T>, Box<dyn Any + Send>>) -> Self {
        match caught {
            Ok(finished) => Self::Finished(finished),
            Err(payload) => Self::Panicked(panic_message(&*payload)),
        }
    }
}

/// The text of a panic, when it has one.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&'static str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        String::from("(non-string panic payload)")
    }
}

/// The obligation to end one run: remove its table entry, count how it ended, and publish its
/// outcome to the waiters, exactly once. Dropped without [`land`](Self::land) having been
/// called (the task was dropped, or something panicked on the way), it lands the run as
/// abandoned, so no key is ever left stuck.
struct Landing<K, T>
where
    K: Eq + Hash + fmt::Debug,
{
    /// The service the run belongs to.
    shared: Arc<Shared<K, T>>,
    /// The run's key in `State::flights`.
    key: K,
    /// Publishes the outcome; `None` once it has been.
    tx: Option<watch::Sender<Slot<T>>>,
}

impl<K, T> Landing<K, T>
where
    K: Eq + Hash + fmt::Debug,
{
    fn land(mut self, ending: Ending<T>) {
        self.finish(ending);
    }

    fn finish(&mut self, ending: Ending<T>) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        // Build the outcome (this formats the key) before taking the lock.
        let key = &self.key;
        let (outcome, failed, timed_out) = match ending {
            Ending::Finished(Ok(value)) => (Ok(Arc::new(value)), false, false),
            Ending::Finished(Err(error)) => (Err(error), true, false),
            Ending::Panicked(message) => {
                tracing::warn!(?key, %message, "coalesced operation panicked");
                let error = anyhow!("coalesced operation for key {key:?} panicked: {message}");
                (Err(error), true, false)
            }
            Ending::TimedOut(limit) => {
                tracing::warn!(?key, ?limit, "coalesced operation timed out");
                let error = anyhow!("Operation timed out for key {key:?} after {limit:?}");
                (Err(error), false, true)
            }
            Ending::Abandoned => {
                let error = anyhow!(
                    "coalesced operation for key {key:?} was abandoned before it ended \
                     (its task was dropped)"
                );
                (Err(error), true, false)
            }
        };
        {
            let mut state = lock(&self.shared.state);
            let removed = state.flights.remove(&self.key);
            debug_assert!(
                removed.is_some(),
                "a run's entry is removed only by its landing"
            );
            state.stats.failed_operations += usize::from(failed);
            state.stats.timed_out_operations += usize::from(timed_out);
        }
        tx.send_replace(Some(outcome.map_err(Arc::new)));
    }
}

impl<K, T> Drop for Landing<K, T>
where
    K: Eq + Hash + fmt::Debug,
{
    fn drop(&mut self) {
        self.finish(Ending::Abandoned);
    }
}

/// Waits for the outcome published on `rx`.
async fn wait<T>(mut rx: watch::Receiver<Slot<T>>) -> Outcome<T> {
    if let Ok(slot) = rx.wait_for(Option::is_some).await {
        if let Some(outcome) = &*slot {
            return outcome.clone();
        }
    }
    // The sender is gone. Every landing publishes before dropping it, so this happens only if
    // the landing itself panicked (a panicking key method).
    let published = rx.borrow().clone();
    published.unwrap_or_else(|| {
        Err(Arc::new(anyhow!(
            "coalesced operation ended without publishing an outcome"
        )))
    })
}

impl<K, T> Clone for CoalescingService<K, T> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<K, T> Default for CoalescingService<K, T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K, T> fmt::Debug for CoalescingService<K, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (pending, stats) = {
            let state = lock(&self.shared.state);
            (state.flights.len(), state.stats)
        };
        f.debug_struct("CoalescingService")
            .field("timeout", &self.shared.timeout)
            .field("pending", &pending)
            .field("stats", &stats)
            .finish()
    }
}
