//! The one place that decides whether a delivered frame is written now or waits to share a
//! write with others.
//!
//! A write is a system call, and on loopback TCP nearly all of a delivery's cost: one frame per
//! write tops out near 100 000 deliveries/s on one core, while frames that collect for a few
//! milliseconds and leave in one vectored write carry ten times that. But waiting costs latency,
//! and at low rates there is nothing to batch with. Two rules settle it:
//!
//! - **Per shard, [`DirectGate`]**: may this shard write frames to quiet connections itself
//!   (one non-blocking `write` each, no writer task woken)? Yes while that would take less than
//!   most of a core and the shard is not behind; and always for a publication with a few
//!   subscribers.
//! - **Per connection, [`Pace`]**: is this connection batching? A connection that wrote within
//!   the last few milliseconds, or whose last write carried several frames, waits `write_delay`
//!   before its next write so that frames collect ([`loaded`]). A batching connection gets no
//!   direct writes; its writer takes everything queued at once.
//!
//! A frame is written directly only when both allow it and the connection has nothing else
//! pending ([`Pace::may_write_directly`]); otherwise it is queued for the writer, which waits
//! first when [`Pace::waits_first`] says so.

use std::time::{Duration, Instant};

/// Length of the windows over which [`DirectGate`] measures.
const GATE_WINDOW: Duration = Duration::from_millis(100);
/// Share of a core that a shard's direct writes may take before it queues instead...
const GATE_CLOSE_AT: f64 = 0.8;
/// ...and below which it writes directly again.
const GATE_OPEN_AT: f64 = 0.5;
/// A direct write's cost before one was measured: one small frame to a loopback socket.
const GATE_INITIAL_COST: Duration = Duration::from_micros(8);

/// A delivery that waited longer than this in the shard's channel is queued for the writers
/// instead of written directly: the shard is behind, and the writers batch.
const DIRECT_MAX_LAG: Duration = Duration::from_millis(5);

/// A publication with at most this many local subscribers (a user's devices, a small room) is
/// written directly even while the gate is closed or the shard is behind; see
/// [`DirectGate::allows`].
const FEW_SUBSCRIBERS: usize = 4;

/// A writer that wrote within this long counts as under load and waits `write_delay` before its
/// next write: it receives frames faster than one per 4 ms (250 per second).
const LOADED_WINDOW: Duration = Duration::from_millis(4);

/// A writer whose last write carried at least this many frames stays under load for as long
/// as it is woken within `write_delay` of that write (see [`loaded`]).
const LOADED_BATCH: usize = 3;

/// How one delivery went: to how many subscribers, how many of them by a direct write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Delivered {
    pub(crate) total: u64,
    pub(crate) direct: u64,
}

/// Decides whether a shard may write frames to quiet connections itself.
///
/// A direct write is one system call per delivery: cheaper than the queue when a connection
/// would get one frame per write anyway, but with no batching. A shard that delivered more than
/// it can write one by one (10 000 subscribers at 30 publishes/s is 300 000 writes a second,
/// about two cores) would fall ever further behind; through the queue, the writers batch what
/// piles up. So the gate estimates, per [`GATE_WINDOW`], the share of a core that writing every
/// delivery directly would take (deliveries × the measured cost of one direct write), closes
/// above [`GATE_CLOSE_AT`] and opens again below [`GATE_OPEN_AT`].
#[derive(Debug)]
pub(crate) struct DirectGate {
    window_start: Instant,
    deliveries: u64,
    direct: u64,
    direct_time: Duration,
    /// Smoothed cost of one direct write.
    cost: Duration,
    open: bool,
}

impl DirectGate {
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            window_start: now,
            deliveries: 0,
            direct: 0,
            direct_time: Duration::ZERO,
            cost: GATE_INITIAL_COST,
            open: true,
        }
    }

    /// Whether a delivery starting `now`, of a message the broker handed over at `since`, to
    /// `subscribers` local subscribers, may write directly: always with [`FEW_SUBSCRIBERS`] or
    /// fewer; otherwise while the gate is open and the shard is not behind. Behind (the frame
    /// waited in the channel), or writing directly at this rate would take most of a core: queue
    /// for the writers, which batch, rather than spend a `write` per subscriber while the
    /// backlog grows.
    ///
    /// Both rules guard against large fan-outs: one publication written to 10 000 sockets holds
    /// the shard for tens of milliseconds while the next ones wait. A publication with a few
    /// subscribers takes microseconds, and queueing its frames batches nothing when every
    /// connection has its own topic (per-user channels): each frame still gets a write of its
    /// own, plus a writer's wake-up, so a shard that fell behind would fall further behind. A
    /// connection that receives frames fast enough to batch is batching by its own rule
    /// ([`Pace`]) and gets no direct writes anyway.
    pub(crate) fn allows(&mut self, now: Instant, since: Instant, subscribers: usize) -> bool {
        let open = self.is_open(now);
        subscribers <= FEW_SUBSCRIBERS
            || (open && now.saturating_duration_since(since) < DIRECT_MAX_LAG)
    }

    /// Whether the gate is open at `now`; re-estimated once per window.
    fn is_open(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= GATE_WINDOW {
            if self.direct > 0 {
                let sample = self.direct_time / self.direct.min(u32::MAX as u64) as u32;
                // Smoothed, so one descheduled window does not swing it.
                self.cost = (self.cost * 7 + sample * 3) / 10;
            }
            let share = self.deliveries as f64 * self.cost.as_secs_f64() / elapsed.as_secs_f64();
            self.open = share
                < if self.open {
                    GATE_CLOSE_AT
                } else {
                    GATE_OPEN_AT
                };
            self.window_start = now;
            self.deliveries = 0;
            self.direct = 0;
            self.direct_time = Duration::ZERO;
        }
        self.open
    }

    /// Counts a delivery that took `took`.
    pub(crate) fn record(&mut self, done: Delivered, took: Duration) {
        self.deliveries += done.total;
        if done.direct > 0 {
            self.direct += done.direct;
            self.direct_time += took;
        }
    }
}

/// One connection's writing rhythm: whether its writer is busy, and when it last wrote how many
/// frames. Kept under the connection's lock with its queue.
#[derive(Debug, Default)]
pub(super) struct Pace {
    /// The writer has taken frames it has not finished writing: no direct write meanwhile.
    writing: bool,
    /// When the last write finished and how many frames it carried (see [`loaded`]).
    last_write: Option<(Instant, usize)>,
}

impl Pace {
    /// Whether the shard may write a frame delivered `now` straight to the socket: the writer
    /// holds nothing unwritten, nothing else is `pending` (a direct write would overtake it),
    /// and the connection is not batching.
    pub(super) fn may_write_directly(
        &self,
        pending: bool,
        now: Instant,
        write_delay: Duration,
    ) -> bool {
        !self.writing && !pending && !self.batching(now, write_delay)
    }

    /// Whether a writer woken at `now` waits `write_delay` before taking the queue. Never while
    /// a direct write's rest is pending (`partial`): the socket was full, and nothing may be
    /// written before that rest anyway, so waiting would only delay the frame it belongs to.
    pub(super) fn waits_first(&self, partial: bool, now: Instant, write_delay: Duration) -> bool {
        !write_delay.is_zero() && !partial && self.batching(now, write_delay)
    }

    fn batching(&self, now: Instant, write_delay: Duration) -> bool {
        self.last_write
            .is_some_and(|(at, n)| loaded(now.saturating_duration_since(at), n, write_delay))
    }

    /// The shard wrote one frame at `now`.
    pub(super) fn wrote_directly(&mut self, now: Instant) {
        self.last_write = Some((now, 1));
    }

    /// The writer took frames to write: no direct writes until it is done.
    pub(super) fn writer_took(&mut self) {
        self.writing = true;
    }

    /// The writer finished writing `frames` frames at `now`. A wake-up that found nothing to
    /// write is not a write: it leaves the batching state as it was.
    pub(super) fn writer_wrote(&mut self, frames: usize, now: Instant) {
        self.writing = false;
        if frames > 0 {
            self.last_write = Some((now, frames));
        }
    }
}

/// Whether a writer waking now waits `write_delay` first: it wrote within [`LOADED_WINDOW`], or
/// its last write carried [`LOADED_BATCH`] frames or more and was less than `write_delay` ago.
/// The second keeps a connection that batches batching: frames that arrive every few
/// milliseconds land in the 4 ms window only some of the time, and each miss was a write of one
/// frame. Three, not two: a connection receiving 80 frames a second evenly gathers two in a
/// 20 ms wait now and then, and would then keep paying the delay for writes of one or two.
///
/// The 4 ms window does not scale with the delay: a connection receiving a frame every 12 ms
/// gains nothing from a 20 ms wait (each write would carry one or two frames) and would only pay
/// its latency.
fn loaded(since_last_write: Duration, last_batch: usize, write_delay: Duration) -> bool {
    since_last_write < LOADED_WINDOW
        || (last_batch >= LOADED_BATCH && since_last_write < write_delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_waits_while_it_batches_and_not_after() {
        let ms = Duration::from_millis;
        let delay = ms(20);
        assert!(loaded(ms(3), 1, delay), "wrote within 4 ms");
        assert!(!loaded(ms(5), 1, delay), "one frame, then quiet for 5 ms");
        assert!(
            !loaded(ms(5), 2, delay),
            "two frames are not yet a batch worth waiting for"
        );
        assert!(
            loaded(ms(15), 3, delay),
            "three frames and woken within the delay"
        );
        assert!(!loaded(ms(25), 8, delay), "a batch long ago");
    }

    #[test]
    fn the_direct_gate_closes_when_direct_writes_would_take_most_of_a_core() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut gate = DirectGate::new(t0);
        let window = |n: u32| t0 + GATE_WINDOW * n;
        let all_direct = |n| Delivered {
            total: n,
            direct: n,
        };
        let queued = |n| Delivered {
            total: n,
            direct: 0,
        };
        assert!(gate.is_open(t0), "open before anything was measured");

        // 8 000 direct writes of 7 µs in a 100 ms window: 56% of a core. Stays open.
        gate.record(all_direct(8_000), ms(56));
        assert!(gate.is_open(window(1)));

        // 30 000 in the next window: more than two cores' worth. Closes.
        gate.record(all_direct(30_000), ms(210));
        assert!(!gate.is_open(window(2)));

        // Queued deliveries still count: 8 000 of them is under the close mark but over the
        // open mark, so it stays closed...
        gate.record(queued(8_000), ms(5));
        assert!(!gate.is_open(window(3)));
        // ...and opens once the rate falls under it.
        gate.record(queued(4_000), ms(3));
        assert!(gate.is_open(window(4)));

        // Within a window, nothing changes however much is recorded.
        gate.record(all_direct(100_000), ms(700));
        assert!(gate.is_open(window(4) + ms(50)));
        assert!(!gate.is_open(window(5)));
    }

    #[test]
    fn a_publication_with_few_subscribers_writes_directly_whatever_the_gate_and_the_lag() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut gate = DirectGate::new(t0);
        // 30 000 direct writes of 7 µs in a 100 ms window: two cores' worth. Closes.
        gate.record(
            Delivered {
                total: 30_000,
                direct: 30_000,
            },
            ms(210),
        );
        let now = t0 + GATE_WINDOW;
        assert!(!gate.allows(now, now, 10_000), "a large fan-out queues");
        assert!(!gate.allows(now, now, FEW_SUBSCRIBERS + 1));
        assert!(gate.allows(now, now, 1), "one subscriber writes directly");
        assert!(gate.allows(now, now, FEW_SUBSCRIBERS));
        assert!(
            gate.allows(now, now - DIRECT_MAX_LAG, 1),
            "behind, one subscriber still writes directly"
        );
        let mut open = DirectGate::new(t0);
        assert!(
            open.allows(t0, t0, 10_000),
            "an open gate lets a large fan-out write"
        );
        assert!(
            !open.allows(t0 + DIRECT_MAX_LAG, t0, 10_000),
            "but not once the shard is behind"
        );
        assert!(!gate.is_open(now), "the gate itself stays closed");
    }
}
