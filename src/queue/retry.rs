//! The retry policy as data: which answers are worth another attempt, and when.

use rand::Rng;
use std::time::Duration;

/// What one attempt's result means for the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Try again; `at_least` is a wait Motion asked for (Retry-After on 429/503).
    Retry {
        at_least: Option<Duration>,
    },
    /// Never retried: other 4xx answers (Motion refuses the event itself).
    Dead,
}

/// Connect errors and timeouts are `None`: always retried.
pub fn classify(status: Option<u16>, retry_after: Option<&str>) -> Verdict {
    match status {
        None => Verdict::Retry { at_least: None },
        Some(s) if (200..300).contains(&s) => Verdict::Delivered,
        Some(408) | Some(429) | Some(500..=599) => {
            Verdict::Retry { at_least: retry_after.and_then(|v| v.trim().parse::<u64>().ok()).map(Duration::from_secs) }
        }
        Some(_) => Verdict::Dead,
    }
}

/// Exponential backoff with jitter: attempt `n` (1-based, the one that just failed) waits
/// between half and all of `initial * 2^(n-1)`, capped at `max`. The jitter keeps many
/// conversations that failed together from retrying in lockstep.
pub fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(20)).min(max);
    let half = exp / 2;
    half + rand::thread_rng().gen_range(Duration::ZERO..=half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert_eq!(classify(Some(200), None), Verdict::Delivered);
        assert_eq!(classify(Some(204), None), Verdict::Delivered);
        assert_eq!(classify(None, None), Verdict::Retry { at_least: None });
        assert_eq!(classify(Some(500), None), Verdict::Retry { at_least: None });
        assert_eq!(classify(Some(503), Some("7")), Verdict::Retry { at_least: Some(Duration::from_secs(7)) });
        assert_eq!(classify(Some(408), None), Verdict::Retry { at_least: None });
        assert_eq!(classify(Some(429), Some("120")), Verdict::Retry { at_least: Some(Duration::from_secs(120)) });
        assert_eq!(classify(Some(404), None), Verdict::Dead);
        assert_eq!(classify(Some(400), None), Verdict::Dead);
        assert_eq!(classify(Some(301), None), Verdict::Dead);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let (i, m) = (Duration::from_secs(1), Duration::from_secs(300));
        for _ in 0..100 {
            let b1 = backoff(i, m, 1);
            assert!(b1 >= Duration::from_millis(500) && b1 <= i);
            let b4 = backoff(i, m, 4);
            assert!(b4 >= Duration::from_secs(4) && b4 <= Duration::from_secs(8));
            let b30 = backoff(i, m, 30);
            assert!(b30 >= Duration::from_secs(150) && b30 <= m);
        }
    }
}
