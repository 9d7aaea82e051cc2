//! The relay's one notion of "now" (calendar time): the 24-hour customer service window,
//! `give_up_after`, dedup expiry, signatures' timestamps, ages in the admin API. Every such
//! "now" comes from here (clippy's `disallowed-methods` refuses `SystemTime::now` elsewhere).
//! It is a trait object in the relay's services so that an in-process test can start the real
//! server with a [`ManualClock`] and move time forward by a day without waiting or touching the
//! store. That seam was chosen over an environment variable read by the binary: a production
//! process has no way to select the manual clock (it is built only with the `test-support`
//! feature, which the tests enable), so no test hook can be switched on by accident or by an
//! attacker who controls the environment.
//!
//! Deadlines and timeouts keep using `tokio::time`/`Instant`: they measure durations, not
//! calendar time, and must not jump when a test moves the clock.

use std::time::{SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_unix_ms(&self) -> u64;
}

/// The wall clock: what the daemon always uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one place that reads the wall clock
    fn now_unix_ms(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

/// The wall clock shifted by an offset that tests move forward (or back). Only reachable from
/// code that builds the server itself (`server::start_with`), and built only for tests.
#[cfg(any(test, feature = "test-support"))]
#[derive(Debug, Default)]
pub struct ManualClock {
    offset_ms: std::sync::atomic::AtomicI64,
}

#[cfg(any(test, feature = "test-support"))]
impl ManualClock {
    pub fn new() -> ManualClock {
        ManualClock::default()
    }

    /// Moves "now" forward by `by`.
    pub fn advance(&self, by: std::time::Duration) {
        self.offset_ms.fetch_add(by.as_millis() as i64, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(any(test, feature = "test-support"))]
impl Clock for ManualClock {
    fn now_unix_ms(&self) -> u64 {
        SystemClock.now_unix_ms().saturating_add_signed(self.offset_ms.load(std::sync::atomic::Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn manual_clock_moves_with_advance() {
        let c = ManualClock::new();
        let before = c.now_unix_ms();
        c.advance(Duration::from_secs(25 * 3600));
        let after = c.now_unix_ms();
        assert!(after >= before + 25 * 3_600_000 && after < before + 25 * 3_600_000 + 60_000);
    }
}
