//! The SDK's retry policy: which failures are retried, how often, and how long it waits.
//!
//! Only UNAVAILABLE is retried (the coordinator reports every failure to reach a worker,
//! and every slot handoff, with it), and only calls that are safe to repeat: reads,
//! EndSession, and appends and turns, which the client sends with a request id so that a
//! repeat happens once. CreateSession is never retried: a repeat would make a second
//! session.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tonic::{Code, Status};

/// Attempts and backoff of retried calls. The wait before retry `n` (from 0) is drawn
/// uniformly from `[0, min(max_backoff, first_backoff × 2^n)]` ("full jitter"), so clients
/// that failed together do not retry together.
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

    /// The longest wait before retry `retry` (0 for the first).
    pub fn ceiling(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.first_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// The wait before retry `retry`, jittered.
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self.ceiling(retry);
        if ceiling.is_zero() {
            return ceiling;
        }
        let micros = u64::try_from(ceiling.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rand::rng().random_range(0..=micros))
    }

    /// Runs `call` until it succeeds, fails with anything but UNAVAILABLE, or the attempts
    /// are spent.
    pub async fn run<T, F, Fut>(&self, mut call: F) -> Result<T, Status>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut retry = 0;
        loop {
            match call().await {
                Err(status) if is_retryable(&status) && retry + 1 < self.attempts => {
                    tokio::time::sleep(self.backoff(retry)).await;
                    retry += 1;
                }
                result => return result,
            }
        }
    }
}

/// Whether a failed call may be sent again (with the same request id).
pub fn is_retryable(status: &Status) -> bool {
    status.code() == Code::Unavailable
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

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
    }

    #[tokio::test(start_paused = true)]
    async fn only_unavailable_is_retried_and_attempts_are_bounded() {
        let policy = RetryPolicy::default();
        let calls = AtomicU32::new(0);
        let result: Result<(), Status> = policy
            .run(|| async {
                calls.fetch_add(1, Ordering::Relaxed);
                Err(Status::unavailable("down"))
            })
            .await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert_eq!(calls.load(Ordering::Relaxed), 6);

        let calls = AtomicU32::new(0);
        let result: Result<(), Status> = policy
            .run(|| async {
                calls.fetch_add(1, Ordering::Relaxed);
                Err(Status::invalid_argument("no"))
            })
            .await;
        assert_eq!(result.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(calls.load(Ordering::Relaxed), 1);

        let calls = AtomicU32::new(0);
        let result = policy
            .run(|| async {
                if calls.fetch_add(1, Ordering::Relaxed) < 2 {
                    Err(Status::unavailable("moving"))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(result.unwrap(), 7);
    }
}
