//! The two clocks of a connection's reader: the server-side heartbeat, and the rate limit on
//! what the client sends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// Server-side heartbeat: ping a connection that has been quiet for the ping interval, and give
/// up on it when it then stays silent for the pong timeout. Both come from the configuration
/// at each call rather than living here: every idle connection holds one of these.
#[derive(Debug)]
pub(super) struct Heartbeat {
    last_heard: Instant,
    pinged_at: Option<Instant>,
}

impl Heartbeat {
    /// A heartbeat whose first ping is due somewhere between half the `interval` and one and a
    /// half intervals from now, spread evenly over consecutive connections.
    ///
    /// Clients that connect together (after a deploy, or a network blip) would otherwise be
    /// pinged together, one interval later and every interval after that: each pong moves the
    /// next ping a whole interval on, so a burst of connections stays a burst of pings for
    /// good, and the shard that writes them stalls everyone else's deliveries meanwhile. Spread
    /// over a whole interval, their pings then go out at an even rate; the spread is set once,
    /// and after the first ping each connection keeps its own phase.
    pub(super) fn new(interval: Duration) -> Self {
        let now = Instant::now();
        // The first deadline is `last_heard + interval`: place `last_heard` up to half an
        // interval either side of now.
        let f = spread(NEXT.fetch_add(1, Ordering::Relaxed));
        let last_heard = if f < 0.5 {
            now.checked_sub(interval.mul_f64(0.5 - f)).unwrap_or(now)
        } else {
            now + interval.mul_f64(f - 0.5)
        };
        Self {
            last_heard,
            pinged_at: None,
        }
    }

    /// When the next ping is due (`interval` after the client was last heard) or the pong
    /// timeout expires (`timeout` after the ping); `None` when disabled (a zero `interval`).
    ///
    /// Deadlines are rounded up to a tick of [`tick`]`(interval)`, shared by every connection
    /// of the process: the timers of the connections due within one tick fire together, in one
    /// wake-up of the runtime. Each ping and pong timer would otherwise wake an idle worker
    /// on its own — two wake-ups per connection per interval, hundreds a second for ten
    /// thousand connections, each costing about as much as a delivery.
    pub(super) fn deadline(&self, interval: Duration, timeout: Duration) -> Option<Instant> {
        if interval.is_zero() {
            return None;
        }
        let due = match self.pinged_at {
            Some(at) => at + timeout,
            None => self.last_heard + interval,
        };
        Some(round_up(due, tick(interval)))
    }

    pub(super) fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.pinged_at = None;
    }

    pub(super) fn pinged(&mut self) {
        self.pinged_at = Some(Instant::now());
    }

    pub(super) fn timed_out(&self) -> bool {
        self.pinged_at.is_some()
    }
}

/// The grain of heartbeat deadlines under `interval`: a hundredth of it, at most 100 ms (at
/// least 1 ms), so a ping is at most 1% late.
fn tick(interval: Duration) -> Duration {
    (interval / 100).clamp(Duration::from_millis(1), Duration::from_millis(100))
}

/// `at`, rounded up to the next multiple of `tick` since a point fixed for the process.
fn round_up(at: Instant, tick: Duration) -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let Some(since) = at.checked_duration_since(origin) else {
        return at;
    };
    let tick_ns = tick.as_nanos().max(1);
    let rest = since.as_nanos() % tick_ns;
    if rest == 0 {
        return at;
    }
    // `tick_ns - rest` is below `tick`, so it fits in a u64 of nanoseconds.
    at + Duration::from_nanos((tick_ns - rest) as u64)
}

/// How many heartbeats were made, for [`spread`].
static NEXT: AtomicU64 = AtomicU64::new(0);

/// The `n`-th point of a sequence in `[0, 1)` whose consecutive points stay far apart (the
/// fractional parts of `n` times the golden ratio): any run of consecutive connections covers
/// the range about evenly, however few they are.
fn spread(n: u64) -> f64 {
    // 2^64 divided by the golden ratio; the top 53 bits of the product are the fraction.
    const STEP: u64 = 0x9e37_79b9_7f4a_7c15;
    (n.wrapping_mul(STEP) >> 11) as f64 / (1u64 << 53) as f64
}

/// What to do with one inbound message under the rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admit {
    Yes,
    /// Drop it and tell the client (first drop of a streak).
    DropAndTell,
    Drop,
    /// Over the limit for longer than the grace period.
    Close,
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up. The limit itself is passed
/// to [`admit`](Self::admit) from the configuration; only the bucket's state lives here.
#[derive(Debug)]
pub(super) struct RateLimiter {
    tokens: f64,
    refilled: Instant,
    /// When the current run of over-limit traffic began, and the last drop in it. A run ends
    /// once a second passes without a drop; a run longer than the grace closes the connection.
    dropping_since: Option<Instant>,
    last_drop: Option<Instant>,
}

impl RateLimiter {
    /// A full bucket of `burst` tokens.
    pub(super) fn new(burst: u32) -> Self {
        Self {
            tokens: burst as f64,
            refilled: Instant::now(),
            dropping_since: None,
            last_drop: None,
        }
    }

    /// Takes a token for one message under `rate` a second with `burst` saved up; over the
    /// limit for longer than `grace`, the connection is to be closed.
    pub(super) fn admit(&mut self, (rate, burst): (u32, u32), grace: Duration) -> Admit {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate as f64).min(burst as f64);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            if self
                .last_drop
                .is_some_and(|t| now.duration_since(t) > Duration::from_secs(1))
            {
                self.dropping_since = None;
            }
            return Admit::Yes;
        }
        self.last_drop = Some(now);
        match self.dropping_since {
            None => {
                self.dropping_since = Some(now);
                Admit::DropAndTell
            }
            Some(since) if now.duration_since(since) > grace => Admit::Close,
            Some(_) => Admit::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_hundred_consecutive_connections_spread_over_every_tenth() {
        for start in [0, 1, 99, 12_345, u64::MAX - 50, 1 << 40] {
            let mut tenths = [0; 10];
            for i in 0..100 {
                let f = spread(start.wrapping_add(i));
                assert!((0.0..1.0).contains(&f), "{f}");
                tenths[(f * 10.0) as usize] += 1;
            }
            assert!(
                tenths.iter().all(|t| (7..=13).contains(t)),
                "from {start}: {tenths:?}"
            );
        }
    }

    /// Deadlines within one tick share it, and none is moved earlier or by a whole tick.
    #[test]
    fn deadlines_within_a_tick_fire_together() {
        let interval = Duration::from_secs(30);
        let tick = tick(interval);
        assert_eq!(tick, Duration::from_millis(100));
        let base = round_up(Instant::now() + interval, tick);
        let mut dues = Vec::new();
        for ms in [1, 30, 99] {
            let at = base + Duration::from_millis(ms);
            let due = round_up(at, tick);
            assert!(due >= at && due - at < tick, "{ms} ms: {:?}", due - at);
            dues.push(due);
        }
        assert!(dues.iter().all(|d| *d == dues[0]), "one tick: {dues:?}");
        assert_eq!(round_up(base, tick), base, "on a tick already");
        assert_eq!(round_up(base + tick, tick), base + tick);
        assert_eq!(
            super::tick(Duration::from_millis(50)),
            Duration::from_millis(1)
        );
    }

    #[test]
    fn the_first_ping_is_due_between_half_an_interval_and_one_and_a_half() {
        let interval = Duration::from_secs(30);
        for _ in 0..50 {
            let before = Instant::now();
            let beat = Heartbeat::new(interval);
            let due = beat.deadline(interval, Duration::from_secs(1)).unwrap();
            assert!(due >= before + interval / 2, "{:?}", due - before);
            // Up to one tick later: rounded up.
            assert!(
                due <= Instant::now() + interval * 3 / 2 + tick(interval),
                "{:?}",
                due - before
            );
        }
        let off = Heartbeat::new(Duration::ZERO);
        assert_eq!(off.deadline(Duration::ZERO, Duration::from_secs(1)), None);
    }
}
