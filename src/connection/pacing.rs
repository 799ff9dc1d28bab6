//! The two clocks of a connection's reader: the server-side heartbeat, and the rate limit on
//! what the client sends.

use std::time::Duration;

use tokio::time::Instant;

/// Server-side heartbeat: ping a connection that has been quiet for `interval`, and give up on
/// it when it then stays silent for `timeout`.
#[derive(Debug)]
pub(super) struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    last_heard: Instant,
    pinged_at: Option<Instant>,
}

impl Heartbeat {
    pub(super) fn new(interval: Duration, timeout: Duration) -> Self {
        Self {
            interval,
            timeout,
            last_heard: Instant::now(),
            pinged_at: None,
        }
    }

    /// When the next ping is due or the pong timeout expires; `None` when disabled.
    pub(super) fn deadline(&self) -> Option<Instant> {
        if self.interval.is_zero() {
            return None;
        }
        Some(match self.pinged_at {
            Some(at) => at + self.timeout,
            None => self.last_heard + self.interval,
        })
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

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
pub(super) struct RateLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
    grace: Duration,
    /// When the current run of over-limit traffic began, and the last drop in it. A run ends
    /// once a second passes without a drop; a run longer than `grace` closes the connection.
    dropping_since: Option<Instant>,
    last_drop: Option<Instant>,
}

impl RateLimiter {
    pub(super) fn new(rate: u32, burst: u32, grace: Duration) -> Self {
        Self {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            refilled: Instant::now(),
            grace,
            dropping_since: None,
            last_drop: None,
        }
    }

    pub(super) fn admit(&mut self) -> Admit {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
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
            Some(since) if now.duration_since(since) > self.grace => Admit::Close,
            Some(_) => Admit::Drop,
        }
    }
}
