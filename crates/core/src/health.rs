//! Session health: turn latency in a fixed-size histogram, the outcomes of recent turns,
//! and a score in 0..1 made of both.
//!
//! The score of a session is
//!
//! ```text
//! score = (1 − e) × (½ + ½ × l)
//! e = the share of failed turns among the last 20 (0 with no turn yet)
//! l = 1 while p95 ≤ T or fewer than 5 turns have run, else T / p95
//! ```
//!
//! where T is the agent type's slow-turn threshold. Failures weigh most: all of the last 20
//! failed is 0, half of them 0.5. Slowness alone at most halves the score. The status is
//! `healthy` from 0.8, `degraded` from 0.5, and `unhealthy` below.

use std::time::Duration;

/// Turns the error share is taken over.
pub const RECENT_TURNS: u32 = 20;
/// Turns before p95 counts towards the score (and slow-turn alerts).
pub const MIN_TURNS_FOR_LATENCY: u64 = 5;

/// Buckets per doubling: each is 2^(1/4) ≈ 1.19 times the one before, so a quantile is
/// reported at most 19% above the true value.
const PER_DOUBLING: f64 = 4.0;
/// 1 ms · 2^(80/4) ≈ 17.5 minutes; longer turns land in the last bucket.
const BUCKETS: usize = 80;

/// Turn latencies, counted in log-spaced buckets from 1 ms: 80 counters whatever the
/// number of turns, and a quantile in one pass over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: [u32; BUCKETS],
    total: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: [0; BUCKETS],
            total: 0,
        }
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, latency: Duration) {
        let millis = latency.as_secs_f64() * 1e3;
        let index = if millis <= 1.0 {
            0
        } else {
            ((millis.log2() * PER_DOUBLING).floor() as usize + 1).min(BUCKETS - 1)
        };
        self.counts[index] = self.counts[index].saturating_add(1);
        self.total += 1;
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q` quantile (0..=1), as the upper edge of the bucket that holds it; `None`
    /// before any turn.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (index, count) in self.counts.iter().enumerate() {
            seen += u64::from(*count);
            if seen >= rank {
                let upper_millis = 2f64.powf(index as f64 / PER_DOUBLING);
                return Some(Duration::from_secs_f64(upper_millis / 1e3));
            }
        }
        None
    }
}

/// A session's health status, from its score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HealthStatus {
    Healthy,
    Degraded,
    Unhealthy,
}

impl HealthStatus {
    pub fn of(score: f64) -> Self {
        if score >= 0.8 {
            HealthStatus::Healthy
        } else if score >= 0.5 {
            HealthStatus::Degraded
        } else {
            HealthStatus::Unhealthy
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
        }
    }
}

/// What a session's turns did: counts, tokens, latency, and the last 20 outcomes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TurnHealth {
    pub turns: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    latency: LatencyHistogram,
    /// Bit i is the outcome of the i-th newest turn (1: failed).
    recent: u32,
    recent_len: u32,
}

impl TurnHealth {
    /// A turn that ran its agent ended: `failed` or not, after `latency`.
    pub fn record(&mut self, failed: bool, latency: Duration) {
        self.turns += 1;
        if failed {
            self.errors += 1;
        }
        self.latency.record(latency);
        let mask = (1u32 << RECENT_TURNS) - 1;
        self.recent = ((self.recent << 1) | u32::from(failed)) & mask;
        self.recent_len = (self.recent_len + 1).min(RECENT_TURNS);
    }

    pub fn add_tokens(&mut self, prompt: u64, completion: u64) {
        self.prompt_tokens += prompt;
        self.completion_tokens += completion;
    }

    /// Failed turns among the recent ones, and how many recent ones there are.
    pub fn recent_errors(&self) -> (u32, u32) {
        (self.recent.count_ones(), self.recent_len)
    }

    pub fn p50(&self) -> Option<Duration> {
        self.latency.quantile(0.5)
    }

    pub fn p95(&self) -> Option<Duration> {
        self.latency.quantile(0.95)
    }

    /// Whether p95 is known (enough turns) and above `slow_after`.
    pub fn is_slow(&self, slow_after: Duration) -> bool {
        self.turns >= MIN_TURNS_FOR_LATENCY && self.p95().is_some_and(|p95| p95 > slow_after)
    }

    /// The score (see the module's documentation), with `slow_after` the agent type's
    /// slow-turn threshold.
    pub fn score(&self, slow_after: Duration) -> f64 {
        let (failed, recent) = self.recent_errors();
        let error_share = if recent == 0 {
            0.0
        } else {
            f64::from(failed) / f64::from(recent)
        };
        let latency = match self.p95() {
            Some(p95) if self.is_slow(slow_after) => slow_after.as_secs_f64() / p95.as_secs_f64(),
            _ => 1.0,
        };
        (1.0 - error_share) * (0.5 + 0.5 * latency.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_bucket_of_the_truth() {
        let mut histogram = LatencyHistogram::default();
        assert_eq!(histogram.quantile(0.5), None);
        // 1..=1000 ms, one each.
        for millis in 1..=1000u64 {
            histogram.record(Duration::from_millis(millis));
        }
        assert_eq!(histogram.count(), 1000);
        for (q, truth) in [(0.5, 500.0), (0.95, 950.0), (0.99, 990.0)] {
            let reported = histogram.quantile(q).unwrap().as_secs_f64() * 1e3;
            assert!(
                reported >= truth && reported <= truth * 2f64.powf(0.25) * 1.001,
                "q{q}: {reported} ms for {truth} ms"
            );
        }
        // Outside the range: below 1 ms, and past the last bucket.
        let mut edges = LatencyHistogram::default();
        edges.record(Duration::from_micros(10));
        edges.record(Duration::from_secs(7200));
        assert_eq!(edges.quantile(0.0), Some(Duration::from_millis(1)));
        assert!(edges.quantile(1.0).unwrap() > Duration::from_secs(600));
    }

    #[test]
    fn the_score_follows_the_formula() {
        let threshold = Duration::from_secs(1);
        let mut health = TurnHealth::default();
        assert_eq!(health.score(threshold), 1.0);
        for _ in 0..10 {
            health.record(false, Duration::from_millis(100));
        }
        assert_eq!(health.score(threshold), 1.0);
        assert_eq!(
            HealthStatus::of(health.score(threshold)),
            HealthStatus::Healthy
        );
        // 10 failures: half of the last 20.
        for _ in 0..10 {
            health.record(true, Duration::from_millis(100));
        }
        assert_eq!(health.recent_errors(), (10, 20));
        assert_eq!(health.score(threshold), 0.5);
        assert_eq!(HealthStatus::of(0.5), HealthStatus::Degraded);
        // 20 more failures push the successes out of the window.
        for _ in 0..20 {
            health.record(true, Duration::from_millis(100));
        }
        assert_eq!(health.score(threshold), 0.0);
        assert_eq!(HealthStatus::of(0.0), HealthStatus::Unhealthy);
        assert_eq!((health.turns, health.errors), (40, 30));

        // Slow but sound: p95 about 4 s against 1 s.
        let mut slow = TurnHealth::default();
        for _ in 0..4 {
            slow.record(false, Duration::from_secs(4));
        }
        assert_eq!(slow.score(threshold), 1.0, "too few turns to judge latency");
        slow.record(false, Duration::from_secs(4));
        let score = slow.score(threshold);
        let p95 = slow.p95().unwrap().as_secs_f64();
        assert!((score - (0.5 + 0.5 / p95)).abs() < 1e-9, "{score}");
        assert!(slow.is_slow(threshold));
        assert_eq!(HealthStatus::of(score), HealthStatus::Degraded);
    }
}
