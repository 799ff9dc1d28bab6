//! The two clocks of a connection's reader: the server-side heartbeat, and the rate limit on
//! what the client sends.

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
    pub(super) fn new() -> Self {
        Self {
            last_heard: Instant::now(),
            pinged_at: None,
        }
    }

    /// When the next ping is due (`interval` after the client was last heard) or the pong
    /// timeout expires (`timeout` after the ping); `None` when disabled (a zero `interval`).
    pub(super) fn deadline(&self, interval: Duration, timeout: Duration) -> Option<Instant> {
        if interval.is_zero() {
            return None;
        }
        Some(match self.pinged_at {
            Some(at) => at + timeout,
            None => self.last_heard + interval,
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
