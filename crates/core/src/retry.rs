//! One retry policy for everything that retries: the SDK's calls, a model provider's
//! answers, a worker's registration. Exponential backoff with full jitter (`rand`), so that
//! clients that failed together do not retry together.

use std::time::Duration;

use rand::Rng;

/// Attempts and backoff of retried work. The wait before retry `n` (from 0) is drawn
/// uniformly from `[0, min(max_backoff, first_backoff × 2^n)]` ("full jitter").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 retries nothing.
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// Six attempts, waits of up to 50 ms, 100 ms, 200 ms, 400 ms and 800 ms: a failover
    /// (about 2 s) is ridden out, and a caller waits at most about 1.6 s more than that.
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// No retries.
    pub fn never() -> Self {
        RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// Whether retry `retry` (0 for the first) is within the attempts.
    pub fn allows(&self, retry: u32) -> bool {
        retry.saturating_add(1) < self.attempts
    }

    /// The longest wait before retry `retry`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.first_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// The wait before retry `retry`, jittered.
    pub fn backoff(&self, retry: u32) -> Duration {
        jittered(self.ceiling(retry))
    }
}

/// A wait drawn uniformly from `[0, ceiling]`.
pub fn jittered(ceiling: Duration) -> Duration {
    let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
    if micros == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(rand::rng().random_range(0..=micros))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_ceiling_and_is_jittered_below_it() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.ceiling(0), Duration::from_millis(50));
        assert_eq!(policy.ceiling(3), Duration::from_millis(400));
        assert_eq!(policy.ceiling(10), Duration::from_secs(2));
        assert_eq!(policy.ceiling(u32::MAX), Duration::from_secs(2));
        let waits: Vec<Duration> = (0..200).map(|_| policy.backoff(2)).collect();
        assert!(waits.iter().all(|wait| *wait <= Duration::from_millis(200)));
        assert!(waits.windows(2).any(|pair| pair[0] != pair[1]), "jittered");
        assert!(policy.allows(4) && !policy.allows(5));
        assert!(!RetryPolicy::never().allows(0));
    }
}
