//! Usage quotas: the resources a user's quota limits, and [`SlidingWindow`], which counts
//! usage over a sliding window in constant memory and checks it against a limit.
//!
//! # How a window counts
//!
//! A window of length `window` (in microseconds) is cut into buckets of width
//! `w = ⌈window / SUB_BUCKETS⌉` microseconds (at least 1). Usage that happens at time `t`
//! (microseconds since the UNIX epoch) goes into the bucket with index `i = t / w`. The
//! window keeps a ring of `SUB_BUCKETS + 1` buckets and a running total of them. Bucket `i`
//! is counted while `now_us < (i + 1) × w + window`, so usage is counted for at least
//! `window` and at most `window + w` after it happened. The width is rounded up, not down,
//! so that `SUB_BUCKETS × w ≥ window` and every bucket still counted fits in the ring.
//!
//! # Precision
//!
//! - The limit is never exceeded over any interval of the window's length: the amounts
//!   granted by [`SlidingWindow::try_consume`] at times in any interval `[t − window, t]`
//!   add up to at most the limit. This is exact; there is no over-grant.
//! - Usage keeps counting at most `w` (window/60, rounded up to a whole microsecond) longer
//!   than the window, so a caller may be refused at most 1/60 of the window early: a refusal
//!   can only be caused by usage between `window` and `window + w` old on top of what a
//!   perfectly sliding window would count.
//! - Amounts are `f64`. Whole numbers below 2^53 add up exactly; fractional amounts are
//!   subject to the usual rounding of their sums.
//! - [`SlidingWindow::add`] and the part of [`SlidingWindow::settle`] that adds more than
//!   was reserved record post-paid usage without a check, so they can take the usage over
//!   the limit; later checks count it like any other usage.
//!
//! # Cost
//!
//! Memory is `SUB_BUCKETS + 1` numbers per window however many events it has seen. A check
//! costs O(1): moving to a newer bucket clears at most `SUB_BUCKETS + 1` buckets however much
//! time has passed, and recounts the total from the buckets (so rounding cannot drift across
//! buckets); within a bucket a check reads the running total.
//!
//! # Clocks
//!
//! Times are wall-clock microseconds since the UNIX epoch, so a window's state
//! ([`WindowParts`]) can move between processes. A time before the newest bucket the window
//! has seen (a clock that went backwards) is taken as the start of that bucket: nothing
//! panics, and usage recorded then is counted as if it happened at that later time.

use std::fmt;
use std::time::Duration;

/// A resource a user's quota limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resource {
    /// Calls to the API, per window.
    ApiCalls,
    /// Model tokens, per window.
    Tokens,
    /// Seconds of compute, per window; usually recorded after the work (post-paid).
    ComputeSeconds,
    /// Bytes stored, held at any moment.
    StorageBytes,
    /// Sessions open at any moment.
    Sessions,
    /// Cost in US dollars, per window.
    CostUsd,
    /// Turns running at the same moment.
    ConcurrentTurns,
}

impl Resource {
    /// Every resource, in declaration order.
    pub const ALL: [Resource; 7] = [
        Resource::ApiCalls,
        Resource::Tokens,
        Resource::ComputeSeconds,
        Resource::StorageBytes,
        Resource::Sessions,
        Resource::CostUsd,
        Resource::ConcurrentTurns,
    ];

    /// The resource's name in configuration and on the wire, in snake case.
    pub fn name(self) -> &'static str {
        match self {
            Resource::ApiCalls => "api_calls",
            Resource::Tokens => "tokens",
            Resource::ComputeSeconds => "compute_seconds",
            Resource::StorageBytes => "storage_bytes",
            Resource::Sessions => "sessions",
            Resource::CostUsd => "cost_usd",
            Resource::ConcurrentTurns => "concurrent_turns",
        }
    }

    /// The resource with this exact name; `None` for an unknown name.
    pub fn parse(name: &str) -> Option<Resource> {
        Resource::ALL
            .into_iter()
            .find(|resource| resource.name() == name)
    }

    /// Whether the limit is per sliding window (api_calls, tokens, compute_seconds, cost_usd)
    /// or a level held at any moment (storage_bytes, sessions, concurrent_turns: no window).
    pub fn is_windowed(self) -> bool {
        matches!(
            self,
            Resource::ApiCalls | Resource::Tokens | Resource::ComputeSeconds | Resource::CostUsd
        )
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Sub-buckets per window: usage leaves the window at most window/SUB_BUCKETS late.
pub const SUB_BUCKETS: u64 = 60;

/// Buckets in the ring: one more than a window's worth, for the bucket being filled.
const RING: usize = SUB_BUCKETS as usize + 1;

/// [`RING`] as a bucket index.
const RING_INDEX: u64 = SUB_BUCKETS + 1;

/// The shortest wait a refusal tells a caller to wait.
const MIN_REFUSAL_WAIT: Duration = Duration::from_millis(1);

/// Usage over a sliding window in constant memory: SUB_BUCKETS+1 buckets of window/SUB_BUCKETS
/// each and a running total, so a check costs O(1) (amortised: advancing clears at most
/// SUB_BUCKETS+1 buckets however much time passed).
///
/// The module documentation states exactly when usage stops counting and what that means
/// for the limit.
#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    window_us: u64,
    /// `⌈window_us / SUB_BUCKETS⌉`, at least 1.
    width_us: u64,
    /// The index of the newest bucket the window has moved to.
    head: u64,
    /// Bucket `i` (for `head − SUB_BUCKETS ≤ i ≤ head`) is at `i % RING`.
    buckets: Box<[f64; RING]>,
    /// The sum of `buckets`.
    total: f64,
}

/// What was taken by `try_consume`, to settle later.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reservation {
    /// The amount recorded.
    pub amount: f64,
    /// The index of the bucket it went into.
    bucket: u64,
    /// The bucket width of the window it was taken from, so that a reservation taken before
    /// the window was rewindowed gives nothing back from an unrelated bucket.
    width_us: u64,
}

/// The persisted form of a window (plain numbers, so callers can encode it as they like).
#[derive(Debug, Clone, PartialEq)]
pub struct WindowParts {
    /// The window's length in microseconds (at least `SUB_BUCKETS`).
    pub window_us: u64,
    /// The index of the newest bucket: its start time divided by the bucket width.
    pub head: u64,
    /// `SUB_BUCKETS + 1` amounts, oldest first: `buckets[k]` is the usage of bucket
    /// `head + k − SUB_BUCKETS`, so the last one is the head bucket. Entries for indices below
    /// zero are zero.
    pub buckets: Vec<f64>,
}

impl SlidingWindow {
    /// `window` is clamped to at least SUB_BUCKETS microseconds (1 s .. 30 days are the real range).
    pub fn new(window: Duration) -> Self {
        let window_us = u64::try_from(window.as_micros())
            .unwrap_or(u64::MAX)
            .max(SUB_BUCKETS);
        SlidingWindow {
            window_us,
            width_us: bucket_width(window_us),
            head: 0,
            buckets: Box::new([0.0; RING]),
            total: 0.0,
        }
    }

    /// The window's length.
    pub fn window(&self) -> Duration {
        Duration::from_micros(self.window_us)
    }

    /// Usage counted at `now_us` (microseconds since the UNIX epoch; wall clock so the state can move between processes).
    pub fn used(&mut self, now_us: u64) -> f64 {
        let now = self.advance(now_us);
        self.counted(now)
    }

    /// Adds `amount` (>= 0) at now_us without any check (post-paid usage such as compute seconds).
    /// An amount that is negative or not a finite number is ignored.
    pub fn add(&mut self, now_us: u64, amount: f64) {
        self.advance(now_us);
        if amount.is_finite() && amount > 0.0 {
            self.record(amount);
        }
    }

    /// One atomic step: if used + amount <= limit, records it and returns the Reservation;
    /// otherwise records nothing and returns `Err(retry_after)`: how long from now until
    /// enough usage leaves the window for `amount` to fit, assuming no other usage meanwhile.
    /// If `amount` is over the limit (it can never fit) the wait is the window itself. A
    /// refusal's wait is never zero: at least 1 ms.
    ///
    /// A negative amount counts as zero; one that is not a finite number never fits.
    pub fn try_consume(
        &mut self,
        now_us: u64,
        amount: f64,
        limit: f64,
    ) -> Result<Reservation, Duration> {
        let now = self.advance(now_us);
        let used = self.counted(now);
        match clean(amount) {
            Some(amount) if used + amount <= limit => {
                self.record(amount);
                Ok(Reservation {
                    amount,
                    bucket: self.head,
                    width_us: self.width_us,
                })
            }
            _ => Err(self.wait(now_us, now, used, amount, limit)),
        }
    }

    /// How long until `amount` more fits under `limit` (zero if it fits now). When it does not
    /// fit, this is the wait [`SlidingWindow::try_consume`] would refuse with.
    pub fn retry_after(&mut self, now_us: u64, amount: f64, limit: f64) -> Duration {
        let now = self.advance(now_us);
        let used = self.counted(now);
        match clean(amount) {
            Some(amount) if used + amount <= limit => Duration::ZERO,
            _ => self.wait(now_us, now, used, amount, limit),
        }
    }

    /// Settles a reservation to the real amount: more is added at now_us; less is given back
    /// from the reservation's own bucket if that bucket is still in the window (else nothing,
    /// it has left already). Never makes a bucket or the total negative.
    ///
    /// A negative `actual` counts as zero; one that is not a finite number leaves the
    /// reservation as it was. A reservation taken before the window was rewindowed gives
    /// nothing back.
    pub fn settle(&mut self, now_us: u64, reservation: Reservation, actual: f64) {
        let now = self.advance(now_us);
        if !actual.is_finite() {
            return;
        }
        let actual = actual.max(0.0);
        if actual > reservation.amount {
            self.record(actual - reservation.amount);
        } else if actual < reservation.amount
            && reservation.width_us == self.width_us
            && self.is_counted(reservation.bucket, now)
        {
            let slot = slot(reservation.bucket);
            let back = (reservation.amount - actual).min(self.buckets[slot]);
            self.buckets[slot] = (self.buckets[slot] - back).max(0.0);
            self.total = (self.total - back).max(0.0);
        }
    }

    /// The same usage counted under a different window length (a limit's window changed):
    /// everything still counted goes into the current bucket of the new window (conservative).
    pub fn rewindowed(&mut self, now_us: u64, window: Duration) -> SlidingWindow {
        let now = self.advance(now_us);
        let used = self.counted(now);
        let mut rewindowed = SlidingWindow::new(window);
        rewindowed.advance(now);
        rewindowed.record(used);
        rewindowed
    }

    /// The window's state as plain numbers; see [`WindowParts`] for the bucket order.
    pub fn to_parts(&self) -> WindowParts {
        let buckets = (0..RING_INDEX)
            .map(|k| match self.head.checked_sub(SUB_BUCKETS - k) {
                Some(index) => self.buckets[slot(index)],
                None => 0.0,
            })
            .collect();
        WindowParts {
            window_us: self.window_us,
            head: self.head,
            buckets,
        }
    }

    /// Rebuilds from parts; None if they are inconsistent (wrong bucket count, negative or
    /// non-finite values, a window shorter than SUB_BUCKETS microseconds, or usage in a bucket
    /// before index zero).
    pub fn from_parts(parts: WindowParts) -> Option<SlidingWindow> {
        if parts.window_us < SUB_BUCKETS
            || parts.buckets.len() != RING
            || parts
                .buckets
                .iter()
                .any(|amount| !amount.is_finite() || *amount < 0.0)
        {
            return None;
        }
        let mut buckets = Box::new([0.0; RING]);
        for (k, amount) in (0..RING_INDEX).zip(parts.buckets) {
            match parts.head.checked_sub(SUB_BUCKETS - k) {
                Some(index) => buckets[slot(index)] = amount,
                None if amount == 0.0 => {}
                None => return None,
            }
        }
        let total = buckets.iter().sum();
        Some(SlidingWindow {
            window_us: parts.window_us,
            width_us: bucket_width(parts.window_us),
            head: parts.head,
            buckets,
            total,
        })
    }

    /// Moves the ring to the bucket of `now_us`, clearing the buckets that left it, and
    /// returns the time the window counts at: `now_us`, or the start of the head bucket if
    /// the clock went back before it.
    fn advance(&mut self, now_us: u64) -> u64 {
        let index = now_us / self.width_us;
        if index > self.head {
            if index - self.head >= RING_INDEX {
                self.buckets.fill(0.0);
            } else {
                for cleared in self.head + 1..=index {
                    self.buckets[slot(cleared)] = 0.0;
                }
            }
            self.head = index;
            self.total = self.buckets.iter().sum();
        }
        now_us.max(self.head.saturating_mul(self.width_us))
    }

    /// The oldest bucket index in the ring.
    fn oldest(&self) -> u64 {
        self.head.saturating_sub(SUB_BUCKETS)
    }

    /// The first time at which bucket `index` is no longer counted.
    fn leaves_at(&self, index: u64) -> u64 {
        index
            .saturating_add(1)
            .saturating_mul(self.width_us)
            .saturating_add(self.window_us)
    }

    /// Whether bucket `index` is in the ring and still counted at `now` (after `advance`).
    fn is_counted(&self, index: u64, now: u64) -> bool {
        (self.oldest()..=self.head).contains(&index) && self.leaves_at(index) > now
    }

    /// The usage counted at `now` (after `advance`): the total less the oldest buckets that
    /// have left the window but not yet the ring. For a window of at least 3.6 ms that is at
    /// most one bucket.
    fn counted(&self, now: u64) -> f64 {
        let mut used = self.total;
        let mut index = self.oldest();
        while index < self.head && self.leaves_at(index) <= now {
            used -= self.buckets[slot(index)];
            index += 1;
        }
        used.max(0.0)
    }

    /// Records `amount` in the head bucket.
    fn record(&mut self, amount: f64) {
        self.buckets[slot(self.head)] += amount;
        self.total += amount;
    }

    /// How long from `now_us` until `amount` fits under `limit`, given `used` counted at
    /// `now` (after `advance`) and that it does not fit now: the time the oldest buckets
    /// leave until enough has left, at least [`MIN_REFUSAL_WAIT`].
    fn wait(&self, now_us: u64, now: u64, used: f64, amount: f64, limit: f64) -> Duration {
        let Some(amount) = clean(amount).filter(|amount| *amount <= limit) else {
            return self.window().max(MIN_REFUSAL_WAIT);
        };
        let mut remaining = used;
        let mut fits_at = self.leaves_at(self.head);
        for index in self.oldest()..=self.head {
            let leaves = self.leaves_at(index);
            if leaves <= now {
                continue;
            }
            remaining -= self.buckets[slot(index)];
            if remaining + amount <= limit {
                fits_at = leaves;
                break;
            }
        }
        Duration::from_micros(fits_at.saturating_sub(now_us)).max(MIN_REFUSAL_WAIT)
    }
}

/// The bucket width for a window: `⌈window_us / SUB_BUCKETS⌉`, at least 1.
fn bucket_width(window_us: u64) -> u64 {
    window_us.div_ceil(SUB_BUCKETS).max(1)
}

/// Where bucket `index` lives in the ring.
fn slot(index: u64) -> usize {
    (index % RING_INDEX) as usize
}

/// An amount to check: negative counts as zero, not finite as never fitting (`None`).
fn clean(amount: f64) -> Option<f64> {
    amount.is_finite().then(|| amount.max(0.0))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};

    use proptest::prelude::*;

    use super::*;

    const SECOND: u64 = 1_000_000;
    /// A fixed, realistic start time: 2025-01-01T00:00:00Z.
    const START: u64 = 1_735_689_600 * SECOND;

    #[test]
    fn grants_exactly_up_to_the_limit() {
        let mut window = SlidingWindow::new(Duration::from_secs(60));
        for step in 0..1000 {
            assert!(window.try_consume(START + step, 1.0, 1000.0).is_ok());
        }
        let refused = window.try_consume(START + 1000, 1.0, 1000.0);
        let wait = refused.expect_err("the 1001st is over the limit");
        assert!(wait > Duration::ZERO);
        assert_eq!(window.used(START + 1000), 1000.0);
    }

    #[test]
    fn threads_sharing_a_window_get_exactly_the_limit() {
        let window = Mutex::new(SlidingWindow::new(Duration::from_secs(60)));
        let granted = AtomicU64::new(0);
        std::thread::scope(|scope| {
            for thread in 0..32u64 {
                let (window, granted) = (&window, &granted);
                scope.spawn(move || {
                    for attempt in 0..100u64 {
                        let now = START + thread * 100 + attempt;
                        let result = window
                            .lock()
                            .expect("no thread panics holding the lock")
                            .try_consume(now, 1.0, 1000.0);
                        if result.is_ok() {
                            granted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(granted.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn usage_slides_out_after_the_window_and_one_bucket() {
        let window_length = Duration::from_secs(60);
        let mut window = SlidingWindow::new(window_length);
        let width = 60 * SECOND / SUB_BUCKETS;
        // Times relative to the start of a bucket, so "t = 0" is a bucket boundary.
        let zero = (START / width) * width;
        assert!(window.try_consume(zero, 1000.0, 1000.0).is_ok());
        // Refused up to the end of the window and for one bucket more.
        for now in [
            zero + 30 * SECOND,
            zero + 60 * SECOND - 1,
            zero + 61 * SECOND - 1,
        ] {
            assert!(window.clone().try_consume(now, 1.0, 1000.0).is_err());
        }
        // Each refusal's wait ends exactly when the call fits (the last is the 1 ms floor).
        for now in [
            zero + 30 * SECOND,
            zero + 60 * SECOND - 1,
            zero + 61 * SECOND - 1_000,
        ] {
            let wait = window
                .clone()
                .try_consume(now, 1.0, 1000.0)
                .expect_err("still counted");
            assert!(wait <= window_length + Duration::from_micros(width));
            let wait_us = u64::try_from(wait.as_micros()).expect("a short wait");
            // It fits exactly when the wait is over, and not a microsecond before.
            assert_eq!(now + wait_us, zero + 61 * SECOND);
            assert!(
                window
                    .clone()
                    .try_consume(now + wait_us, 1.0, 1000.0)
                    .is_ok()
            );
            assert!(
                window
                    .clone()
                    .try_consume(now + wait_us - 1, 1.0, 1000.0)
                    .is_err()
            );
            assert_eq!(window.retry_after(now, 1.0, 1000.0), wait);
        }
        assert!(
            window
                .try_consume(zero + 61 * SECOND, 1000.0, 1000.0)
                .is_ok()
        );
        assert_eq!(
            window.retry_after(zero + 200 * SECOND, 1.0, 1000.0),
            Duration::ZERO
        );
    }

    #[test]
    fn an_amount_over_the_limit_waits_a_window() {
        let mut window = SlidingWindow::new(Duration::from_secs(60));
        let wait = window
            .try_consume(START, 2000.0, 1000.0)
            .expect_err("never fits");
        assert_eq!(wait, Duration::from_secs(60));
        assert!(window.try_consume(START, f64::NAN, 1000.0).is_err());
        assert!(window.try_consume(START, f64::INFINITY, 1000.0).is_err());
        // A tiny window still never tells a caller to retry at once.
        let mut tiny = SlidingWindow::new(Duration::from_micros(1));
        assert_eq!(tiny.window(), Duration::from_micros(SUB_BUCKETS));
        assert!(tiny.try_consume(START, 1.0, 1.0).is_ok());
        let wait = tiny.try_consume(START, 1.0, 1.0).expect_err("full");
        assert_eq!(wait, Duration::from_millis(1));
        assert_eq!(window.used(START), 0.0);
    }

    #[derive(Debug, Clone)]
    struct Event {
        step_us: u64,
        amount: u32,
    }

    fn events(width_us: u64) -> impl Strategy<Value = Vec<Event>> {
        prop::collection::vec(
            (0..=3 * width_us, 0u32..=40).prop_map(|(step_us, amount)| Event { step_us, amount }),
            1..300,
        )
    }

    fn scenario() -> impl Strategy<Value = (u64, Vec<Event>)> {
        // Windows that divide into whole-microsecond buckets and ones that do not, and tiny
        // ones where more than one bucket at a time has left the window but not the ring.
        prop::sample::select(vec![60, 61, 100, 1_000, 60_000, 1_000_000, 3_600_000_000])
            .prop_flat_map(|window_us| (Just(window_us), events(bucket_width(window_us))))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn never_over_grants_and_refuses_only_within_one_bucket(
            (window_us, events) in scenario(),
        ) {
            const LIMIT: f64 = 100.0;
            let width_us = bucket_width(window_us);
            let mut window = SlidingWindow::new(Duration::from_micros(window_us));
            let mut granted: Vec<(u64, f64)> = Vec::new();
            let sum_since = |granted: &[(u64, f64)], after: u64| -> f64 {
                granted.iter().filter(|(at, _)| *at > after).map(|(_, amount)| amount).sum()
            };
            let mut now = START;
            for event in events {
                now += event.step_us;
                let amount = f64::from(event.amount);
                match window.try_consume(now, amount, LIMIT) {
                    Ok(reservation) => {
                        prop_assert_eq!(reservation.amount, amount);
                        granted.push((now, amount));
                        // Every interval of the window's length ending at a grant is within
                        // the limit (the grants are in time order, so this covers them all).
                        prop_assert!(sum_since(&granted, now - window_us) <= LIMIT);
                    }
                    Err(wait) => {
                        // Justified within one bucket of slack.
                        prop_assert!(
                            sum_since(&granted, now - window_us - width_us) + amount > LIMIT
                        );
                        prop_assert!(wait >= MIN_REFUSAL_WAIT);
                        prop_assert!(wait <= Duration::from_micros(window_us + width_us).max(MIN_REFUSAL_WAIT));
                        let wait_us = u64::try_from(wait.as_micros()).expect("a short wait");
                        prop_assert!(window.clone().try_consume(now + wait_us, amount, LIMIT).is_ok());
                        if wait > MIN_REFUSAL_WAIT {
                            prop_assert!(
                                window.clone().try_consume(now + wait_us - 1, amount, LIMIT).is_err()
                            );
                        }
                    }
                }
                let used = window.used(now);
                prop_assert!(used >= sum_since(&granted, now - window_us));
                prop_assert!(used <= sum_since(&granted, now - window_us - width_us));
            }
        }
    }

    #[test]
    fn settle_gives_back_or_adds_the_difference() {
        let mut window = SlidingWindow::new(Duration::from_secs(60));
        let reservation = window
            .try_consume(START, 500.0, 1000.0)
            .expect("fits an empty window");
        assert_eq!(window.used(START), 500.0);
        window.settle(START + SECOND, reservation, 200.0);
        assert_eq!(window.used(START + SECOND), 200.0);

        let reservation = window
            .try_consume(START + 2 * SECOND, 500.0, 1000.0)
            .expect("700 fit under 1000");
        assert_eq!(window.used(START + 2 * SECOND), 700.0);
        window.settle(START + 3 * SECOND, reservation, 800.0);
        assert_eq!(window.used(START + 3 * SECOND), 1000.0);

        // Once the reservation's bucket has left the window, a smaller actual gives nothing
        // back, even though the ring slot it used now holds newer usage.
        let mut window = SlidingWindow::new(Duration::from_secs(60));
        let reservation = window
            .try_consume(START, 500.0, 1000.0)
            .expect("fits an empty window");
        let later = START + 62 * SECOND;
        window.add(later, 300.0);
        window.add(later + SUB_BUCKETS * SECOND, 50.0);
        let before = window.used(later + SUB_BUCKETS * SECOND);
        window.settle(later + SUB_BUCKETS * SECOND, reservation, 100.0);
        assert_eq!(window.used(later + SUB_BUCKETS * SECOND), before);

        // Giving back never goes below zero.
        let mut window = SlidingWindow::new(Duration::from_secs(60));
        let reservation = window.try_consume(START, 500.0, 1000.0).expect("fits");
        let mut forged = reservation;
        forged.amount = 5000.0;
        window.settle(START, forged, -1.0);
        assert_eq!(window.used(START), 0.0);
        assert!(
            window
                .to_parts()
                .buckets
                .iter()
                .all(|amount| *amount >= 0.0)
        );
        window.settle(START, reservation, f64::NAN);
        assert_eq!(window.used(START), 0.0);
    }

    #[test]
    fn memory_is_constant_in_the_number_of_events() {
        let window_length = Duration::from_secs(3600);
        let mut few = SlidingWindow::new(window_length);
        let mut many = SlidingWindow::new(window_length);
        for event in 0..10u64 {
            few.add(START + event * 360 * SECOND, 1.0);
        }
        for event in 0..1_000_000u64 {
            many.add(START + event * 3600, 1.0);
        }
        assert_eq!(few.to_parts().buckets.len(), RING);
        assert_eq!(many.to_parts().buckets.len(), RING);
        assert_eq!(std::mem::size_of_val(&few), std::mem::size_of_val(&many));
        assert_eq!(few.buckets.len(), many.buckets.len());
        assert_eq!(many.used(START + 1_000_000 * 3600), 1_000_000.0);
    }

    #[test]
    fn parts_round_trip_and_reject_inconsistent_state() {
        let mut window = SlidingWindow::new(Duration::from_secs(60));
        for event in 0..200u64 {
            window.add(START + event * 700_000, (event % 7) as f64);
        }
        let parts = window.to_parts();
        assert_eq!(parts.buckets.len(), RING);
        let rebuilt = SlidingWindow::from_parts(parts.clone()).expect("consistent parts");
        assert_eq!(rebuilt, window);
        assert_eq!(rebuilt.to_parts(), parts);
        let fresh = SlidingWindow::new(Duration::from_secs(1));
        assert_eq!(SlidingWindow::from_parts(fresh.to_parts()), Some(fresh));

        let mut short = parts.clone();
        short.buckets.pop();
        assert_eq!(SlidingWindow::from_parts(short), None);
        let mut long = parts.clone();
        long.buckets.push(0.0);
        assert_eq!(SlidingWindow::from_parts(long), None);
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            let mut parts = parts.clone();
            parts.buckets[3] = bad;
            assert_eq!(SlidingWindow::from_parts(parts), None);
        }
        let mut tiny = parts.clone();
        tiny.window_us = SUB_BUCKETS - 1;
        assert_eq!(SlidingWindow::from_parts(tiny), None);
        let before_zero = WindowParts {
            window_us: 60 * SECOND,
            head: 5,
            buckets: (0..RING).map(|k| if k == 0 { 1.0 } else { 0.0 }).collect(),
        };
        assert_eq!(SlidingWindow::from_parts(before_zero), None);
    }

    #[test]
    fn a_clock_going_backwards_neither_panics_nor_over_grants() {
        let mut window = SlidingWindow::new(Duration::from_secs(60));
        let now = START + 100 * SECOND;
        assert!(window.try_consume(now, 1000.0, 1000.0).is_ok());
        for earlier in [now - 1, now - 30 * SECOND, now - 3600 * SECOND, 0] {
            assert_eq!(window.used(earlier), 1000.0);
            let wait = window
                .try_consume(earlier, 1.0, 1000.0)
                .expect_err("the limit is used up");
            assert!(wait >= MIN_REFUSAL_WAIT);
            window.add(earlier, 0.0);
        }
        // Going backwards moved nothing, so the usage leaves on the forward clock as usual.
        assert!(
            window
                .try_consume(now + 61 * SECOND, 1000.0, 1000.0)
                .is_ok()
        );
        assert!(window.try_consume(now + 10 * SECOND, 1.0, 1000.0).is_err());
        let mut fresh = SlidingWindow::new(Duration::from_secs(60));
        assert!(fresh.try_consume(0, 1.0, 1.0).is_ok());
        assert!(fresh.try_consume(0, 1.0, 1.0).is_err());
    }

    #[test]
    fn rewindowing_keeps_what_is_still_counted() {
        let mut window = SlidingWindow::new(Duration::from_secs(60));
        window.add(START, 300.0);
        window.add(START + 30 * SECOND, 200.0);
        let now = START + 40 * SECOND;
        let mut longer = window.rewindowed(now, Duration::from_secs(3600));
        assert_eq!(longer.window(), Duration::from_secs(3600));
        assert_eq!(longer.used(now), 500.0);
        assert_eq!(longer.used(now + 3599 * SECOND), 500.0);
        assert_eq!(longer.used(now + 3661 * SECOND), 0.0);
        let mut shorter = window.rewindowed(now, Duration::from_secs(1));
        assert_eq!(shorter.used(now), 500.0);
        assert_eq!(shorter.used(now + 2 * SECOND), 0.0);
    }

    #[test]
    fn resource_names_round_trip() {
        for resource in Resource::ALL {
            assert_eq!(Resource::parse(resource.name()), Some(resource));
            assert_eq!(resource.to_string(), resource.name());
        }
        for unknown in ["", "API_CALLS", "api-calls", "requests", "tokens "] {
            assert_eq!(Resource::parse(unknown), None);
        }
        let windowed: Vec<Resource> = Resource::ALL
            .into_iter()
            .filter(|resource| resource.is_windowed())
            .collect();
        assert_eq!(
            windowed,
            [
                Resource::ApiCalls,
                Resource::Tokens,
                Resource::ComputeSeconds,
                Resource::CostUsd
            ]
        );
    }
}
