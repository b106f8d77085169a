//! Per-user quotas and rate limits, kept by the owner of the user's slot.
//!
//! A user's limits are the worker's defaults (from flags) with the user's overrides (set
//! through AdminService and kept in the store) on top. Windowed usage (`api_calls`,
//! `tokens`, `compute_seconds`, `cost_usd`) is counted by a [`SlidingWindow`] per user and
//! resource, checked and consumed in one step under the user's lock, and saved to the store
//! with the next append of the user's, in its transaction (a turn's reply carries what the
//! turn used), and otherwise in batches: every [`FLUSH_INTERVAL`], and before a handoff
//! gives the user's slot away. Each save carries the user's version of the windows, and
//! the store keeps the newest.
//! `storage_bytes` is read from the store and followed as appends come; `sessions` is the
//! live sessions the store holds; `concurrent_turns` is counted here, in memory.
//!
//! Only limited resources are counted: with no limit configured, a call costs one map
//! look-up under a lock, and nothing is written.
//!
//! Rate limits (per user, per session) are GCRA limiters from `governor`, in memory only:
//! they shape bursts, they are not budgets.

mod config;
mod refusal;
mod saving;

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use switchyard_agents::PoolConfig;
use switchyard_core::quota::{Reservation, Resource, SlidingWindow};
use switchyard_core::{SessionId, Slot, UserId, slot_of};
use switchyard_store::{SessionStore, StoredLimit, StoredUsage};

pub use config::{Limit, QuotaConfig, RateLimit, parse_quota};
pub use refusal::QuotaError;
pub use saving::UnsavedUsage;
#[cfg(test)]
use saving::encode_window;
use saving::{ALL_WINDOWS, decode_window, decode_windows, encode_windows};

use crate::error::{Result, WorkerError};
use crate::health::Alerts;
use crate::ownership::SlotOwnership;

/// How often usage that came without an append (reads, refused or failed turns) is saved
/// to the store: a crash loses at most this much of it. Usage saved with an append is as
/// durable as the append, and `storage_bytes` and `sessions` are the store's own.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// A user with no call for this long, and nothing unsaved, leaves memory (it is loaded
/// again from the store at its next call).
const IDLE_ENTRY: Duration = Duration::from_secs(600);
/// The wait a refusal of `concurrent_turns` suggests: turns end on their own time.
const CONCURRENT_RETRY: Duration = Duration::from_secs(1);

/// The wall clock in microseconds since the UNIX epoch, as windows count time.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_micros() as u64)
        .unwrap_or(0)
}

/// What a user has used of one limited resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceUsage {
    pub resource: Resource,
    pub used: f64,
    pub limit: Limit,
}

pub struct Quotas {
    config: QuotaConfig,
    store: Arc<dyn SessionStore>,
    placement: Arc<SlotOwnership>,
    slot_count: u32,
    users: Mutex<HashMap<UserId, Arc<UserEntry>>>,
    user_rate: Option<DefaultKeyedRateLimiter<UserId>>,
    session_rate: Option<DefaultKeyedRateLimiter<SessionId>>,
    /// Where a user above 80% or 95% of a quota is reported.
    alerts: Option<Alerts>,
}

/// One user's quota state, loaded from the store at its first call here.
struct UserEntry {
    slot: Slot,
    loaded: tokio::sync::OnceCell<()>,
    state: Mutex<UserState>,
}

impl UserEntry {
    fn state(&self) -> MutexGuard<'_, UserState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[derive(Default)]
struct UserState {
    overrides: BTreeMap<Resource, Limit>,
    windows: BTreeMap<Resource, SlidingWindow>,
    concurrent_turns: u32,
    /// Content bytes the user holds, when known; `None` reads them from the store again.
    storage: Option<f64>,
    /// Windows changed since they were last saved.
    dirty: bool,
    /// Changes to the windows, counted on from what the store held: a save carries it, and
    /// the store never replaces a newer version with an older one.
    version: u64,
    touched: Option<Instant>,
}

impl UserState {
    /// The windows changed: they are unsaved, at a new version.
    fn changed(&mut self) {
        self.dirty = true;
        self.version += 1;
    }

    /// The windows as the store keeps them, at the current version.
    /// All of them in one row: one write per user whatever the number of limits (none
    /// without a window).
    fn stored(&self, user_id: &UserId) -> Vec<StoredUsage> {
        if self.windows.is_empty() {
            return Vec::new();
        }
        vec![StoredUsage {
            user_id: user_id.clone(),
            resource: ALL_WINDOWS.to_string(),
            state: encode_windows(&self.windows),
            version: self.version,
        }]
    }

    /// The window of `resource` under `limit`, made (or re-cut to the limit's window) here.
    fn window(&mut self, resource: Resource, limit: Limit, now: u64) -> &mut SlidingWindow {
        let window = self
            .windows
            .entry(resource)
            .or_insert_with(|| SlidingWindow::new(limit.window));
        if window.window() != limit.window.max(Duration::from_micros(1)) {
            *window = window.rewindowed(now, limit.window);
        }
        window
    }
}

fn limiter<K: std::hash::Hash + Eq + Clone>(rate: &RateLimit) -> DefaultKeyedRateLimiter<K> {
    let burst = NonZeroU32::new(rate.burst.max(1)).unwrap_or(NonZeroU32::MIN);
    let period = (rate.period / rate.count.max(1)).max(Duration::from_nanos(1));
    let quota = Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst);
    DefaultKeyedRateLimiter::dashmap(quota)
}

impl Quotas {
    pub fn new(
        config: QuotaConfig,
        store: Arc<dyn SessionStore>,
        placement: Arc<SlotOwnership>,
        slot_count: u32,
    ) -> Self {
        Quotas {
            user_rate: config.user_rate.as_ref().map(limiter),
            session_rate: config.session_rate.as_ref().map(limiter),
            config,
            store,
            placement,
            slot_count,
            users: Mutex::new(HashMap::new()),
            alerts: None,
        }
    }

    /// Reports users above 80% and 95% of a windowed quota to `alerts`.
    pub fn with_alerts(mut self, alerts: Alerts) -> Self {
        self.alerts = Some(alerts);
        self
    }

    /// Raises a quota alert when `window` is at 80% of `limit` or more.
    fn check_level(
        &self,
        user_id: &UserId,
        resource: Resource,
        window: &mut SlidingWindow,
        limit: Limit,
        now: u64,
    ) {
        let Some(alerts) = &self.alerts else {
            return;
        };
        if limit.limit <= 0.0 {
            return;
        }
        let percent = window.used(now) / limit.limit * 100.0;
        if percent >= 80.0 {
            let described = format!(
                "{} per {}",
                limit.limit,
                humantime::format_duration(limit.window)
            );
            alerts.quota_used(user_id, resource.name(), percent, &described);
        }
    }

    pub fn config(&self) -> &QuotaConfig {
        &self.config
    }

    fn users(&self) -> MutexGuard<'_, HashMap<UserId, Arc<UserEntry>>> {
        self.users
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The user's entry, loaded from the store at its first use here.
    async fn entry(&self, user_id: &UserId) -> Result<Arc<UserEntry>> {
        let entry = self
            .users()
            .entry(user_id.clone())
            .or_insert_with(|| {
                Arc::new(UserEntry {
                    slot: slot_of(user_id.as_str(), self.slot_count),
                    loaded: tokio::sync::OnceCell::new(),
                    state: Mutex::default(),
                })
            })
            .clone();
        entry
            .loaded
            .get_or_try_init(|| async {
                let record = self.store.load_user_quota(user_id).await?;
                let mut state = entry.state();
                for stored in record.overrides {
                    match Limit::from_stored(&stored) {
                        Some((resource, limit)) => {
                            state.overrides.insert(resource, limit);
                        }
                        None => tracing::warn!(%user_id, resource = %stored.resource, "ignoring a stored quota override of an unknown resource"),
                    }
                }
                // Oldest first, so that the newest state of each resource stands: the row of
                // all windows, or one row per resource as written before it.
                let mut rows = record.usage;
                rows.sort_by_key(|stored| stored.version);
                for stored in rows {
                    state.version = state.version.max(stored.version);
                    let windows = if stored.resource == ALL_WINDOWS {
                        decode_windows(&stored.state)
                    } else {
                        Resource::parse(&stored.resource)
                            .zip(decode_window(&stored.state))
                            .map(|window| vec![window])
                    };
                    match windows {
                        Some(windows) => state.windows.extend(windows),
                        None => tracing::warn!(%user_id, resource = %stored.resource, "ignoring stored usage that cannot be read"),
                    }
                }
                Ok::<(), WorkerError>(())
            })
            .await?;
        entry.state().touched = Some(Instant::now());
        Ok(entry)
    }

    fn limit(&self, state: &UserState, resource: Resource) -> Option<Limit> {
        state
            .overrides
            .get(&resource)
            .or_else(|| self.config.defaults.get(&resource))
            .copied()
    }

    /// Admits one SessionService call of `user_id` (on `session`, when it names one): the
    /// rate limits first, then one of the `api_calls` quota.
    pub async fn admit(&self, user_id: &UserId, session: Option<SessionId>) -> Result<()> {
        if let Some(limiter) = &self.user_rate
            && let Err(not_until) = limiter.check_key(user_id)
        {
            return Err(QuotaError::RateLimited {
                scope: "user",
                key: user_id.to_string(),
                rate: self
                    .config
                    .user_rate
                    .map(|rate| rate.to_string())
                    .unwrap_or_default(),
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }
            .into());
        }
        if let (Some(limiter), Some(session_id)) = (&self.session_rate, session)
            && let Err(not_until) = limiter.check_key(&session_id)
        {
            return Err(QuotaError::RateLimited {
                scope: "session",
                key: session_id.to_string(),
                rate: self
                    .config
                    .session_rate
                    .map(|rate| rate.to_string())
                    .unwrap_or_default(),
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
            }
            .into());
        }
        let entry = self.entry(user_id).await?;
        let mut state = entry.state();
        if let Some(limit) = self.limit(&state, Resource::ApiCalls) {
            let now = now_us();
            let window = state.window(Resource::ApiCalls, limit, now);
            if let Err(retry_after) = window.try_consume(now, 1.0, limit.limit) {
                let used = window.used(now);
                return Err(QuotaError::exhausted(
                    Resource::ApiCalls,
                    user_id,
                    used,
                    1.0,
                    limit,
                    Some(retry_after),
                )
                .into());
            }
            self.check_level(user_id, Resource::ApiCalls, window, limit, now);
            state.changed();
        }
        Ok(())
    }

    /// How many sessions the user may hold: creating one more ends the oldest.
    pub async fn session_cap(&self, user_id: &UserId) -> Result<Option<usize>> {
        let entry = self.entry(user_id).await?;
        let state = entry.state();
        Ok(self
            .limit(&state, Resource::Sessions)
            .map(|limit| (limit.limit.floor() as usize).max(1)))
    }

    /// Reserves what a turn may use before its agent runs: one of `concurrent_turns`, its
    /// estimated `tokens` (the prompt's, plus the agent type's most reply tokens) and their
    /// `cost_usd`; and checks that `compute_seconds` is not used up. All or nothing: a
    /// refusal reserves nothing.
    pub async fn begin_turn(
        self: &Arc<Self>,
        user_id: &UserId,
        pool: &PoolConfig,
        prompt_tokens: u64,
    ) -> Result<TurnCharge> {
        let entry = self.entry(user_id).await?;
        let mut charge = TurnCharge {
            entry: entry.clone(),
            user_id: user_id.clone(),
            quotas: self.clone(),
            tokens: None,
            cost: None,
            concurrent: false,
        };
        let now = now_us();
        let mut state = entry.state();
        if let Some(limit) = self.limit(&state, Resource::ConcurrentTurns)
            && f64::from(state.concurrent_turns) + 1.0 > limit.limit
        {
            return Err(QuotaError::exhausted(
                Resource::ConcurrentTurns,
                user_id,
                f64::from(state.concurrent_turns),
                1.0,
                limit,
                Some(CONCURRENT_RETRY),
            )
            .into());
        }
        if let Some(limit) = self.limit(&state, Resource::ComputeSeconds) {
            let window = state.window(Resource::ComputeSeconds, limit, now);
            let used = window.used(now);
            if used >= limit.limit {
                let retry_after = window.retry_after(now, 1e-6, limit.limit);
                return Err(QuotaError::exhausted(
                    Resource::ComputeSeconds,
                    user_id,
                    used,
                    0.0,
                    limit,
                    Some(retry_after),
                )
                .into());
            }
        }
        let estimate = prompt_tokens.saturating_add(pool.max_reply_tokens);
        if let Some(limit) = self.limit(&state, Resource::Tokens) {
            let window = state.window(Resource::Tokens, limit, now);
            match window.try_consume(now, estimate as f64, limit.limit) {
                Ok(reservation) => charge.tokens = Some(reservation),
                Err(retry_after) => {
                    let used = window.used(now);
                    return Err(QuotaError::exhausted(
                        Resource::Tokens,
                        user_id,
                        used,
                        estimate as f64,
                        limit,
                        Some(retry_after),
                    )
                    .into());
                }
            }
        }
        if let Some(limit) = self.limit(&state, Resource::CostUsd) {
            let cost = pool.price.cost(prompt_tokens, pool.max_reply_tokens);
            let window = state.window(Resource::CostUsd, limit, now);
            match window.try_consume(now, cost, limit.limit) {
                Ok(reservation) => charge.cost = Some(reservation),
                Err(retry_after) => {
                    let used = window.used(now);
                    if let Some(reservation) = charge.tokens.take() {
                        let limit = self.limit(&state, Resource::Tokens);
                        if let Some(limit) = limit {
                            state.window(Resource::Tokens, limit, now).settle(
                                now,
                                reservation,
                                0.0,
                            );
                        }
                    }
                    return Err(QuotaError::exhausted(
                        Resource::CostUsd,
                        user_id,
                        used,
                        cost,
                        limit,
                        Some(retry_after),
                    )
                    .into());
                }
            }
        }
        state.concurrent_turns += 1;
        charge.concurrent = true;
        state.changed();
        Ok(charge)
    }

    /// Reserves `bytes` of the user's `storage_bytes` for an append; the append gives them
    /// back if it fails.
    pub async fn reserve_storage(
        self: &Arc<Self>,
        user_id: &UserId,
        bytes: u64,
    ) -> Result<StorageCharge> {
        let entry = self.entry(user_id).await?;
        let limit = self.limit(&entry.state(), Resource::StorageBytes);
        let Some(limit) = limit else {
            return Ok(StorageCharge::none());
        };
        let known = entry.state().storage;
        if known.is_none() {
            let stored = self.store.user_storage_bytes(user_id).await? as f64;
            let mut state = entry.state();
            if state.storage.is_none() {
                state.storage = Some(stored);
            }
        }
        let mut state = entry.state();
        let used = state.storage.unwrap_or(0.0);
        if used + bytes as f64 > limit.limit {
            return Err(QuotaError::exhausted(
                Resource::StorageBytes,
                user_id,
                used,
                bytes as f64,
                limit,
                None,
            )
            .into());
        }
        state.storage = Some(used + bytes as f64);
        Ok(StorageCharge {
            entry: Some(entry.clone()),
            bytes: bytes as f64,
            done: false,
        })
    }

    /// The user's stored bytes changed in a way this worker did not count (a session ended,
    /// history was dropped): they are read from the store again when next needed.
    pub fn storage_changed(&self, user_id: &UserId) {
        if let Some(entry) = self.users().get(user_id) {
            entry.state().storage = None;
        }
    }

    /// As [`Quotas::storage_changed`], for every user of `slot`.
    pub fn storage_changed_in(&self, slot: Slot) {
        for entry in self.users().values() {
            if entry.slot == slot {
                entry.state().storage = None;
            }
        }
    }

    /// The user's effective limits, by resource.
    pub async fn effective(&self, user_id: &UserId) -> Result<BTreeMap<Resource, Limit>> {
        let entry = self.entry(user_id).await?;
        let state = entry.state();
        let mut limits = self.config.defaults.clone();
        limits.extend(
            state
                .overrides
                .iter()
                .map(|(resource, limit)| (*resource, *limit)),
        );
        Ok(limits)
    }

    /// Sets overrides (each replaces its resource's; `clear` drops the user's others first)
    /// and returns the effective limits. The store holds them before this returns.
    pub async fn set_overrides(
        &self,
        user_id: &UserId,
        limits: &[(Resource, Limit)],
        clear: bool,
    ) -> Result<BTreeMap<Resource, Limit>> {
        let slot = slot_of(user_id.as_str(), self.slot_count);
        let fence = self
            .placement
            .fence(slot)
            .ok_or(WorkerError::LeaseNotHeld(slot))?;
        let entry = self.entry(user_id).await?;
        let stored: Vec<StoredLimit> = limits
            .iter()
            .map(|(resource, limit)| limit.to_stored(*resource))
            .collect();
        self.store
            .set_user_quota(&fence, user_id, &stored, clear)
            .await?;
        {
            let mut state = entry.state();
            if clear {
                state.overrides.clear();
            }
            state.overrides.extend(limits.iter().copied());
        }
        self.effective(user_id).await
    }

    /// What the user has used of each limited resource.
    pub async fn usage(&self, user_id: &UserId) -> Result<Vec<ResourceUsage>> {
        let limits = self.effective(user_id).await?;
        let entry = self.entry(user_id).await?;
        let mut usage = Vec::with_capacity(limits.len());
        for (resource, limit) in limits {
            let used = match resource {
                Resource::Sessions => self.store.list_user_sessions(user_id).await?.len() as f64,
                Resource::StorageBytes => {
                    let known = entry.state().storage;
                    match known {
                        Some(bytes) => bytes,
                        None => self.store.user_storage_bytes(user_id).await? as f64,
                    }
                }
                Resource::ConcurrentTurns => f64::from(entry.state().concurrent_turns),
                _ => {
                    let now = now_us();
                    entry.state().window(resource, limit, now).used(now)
                }
            };
            usage.push(ResourceUsage {
                resource,
                used,
                limit,
            });
        }
        Ok(usage)
    }

    /// Drops the user's saved usage and overrides, and forgets its counts here; returns
    /// whether there was usage and whether there were overrides.
    pub async fn erase(&self, user_id: &UserId) -> Result<(bool, bool)> {
        let slot = slot_of(user_id.as_str(), self.slot_count);
        let fence = self
            .placement
            .fence(slot)
            .ok_or(WorkerError::LeaseNotHeld(slot))?;
        let forgotten = self.users().remove(user_id);
        let had_usage = forgotten.is_some_and(|entry| !entry.state().windows.is_empty());
        let (stored_usage, overrides) = self.store.erase_user_quota(&fence, user_id).await?;
        Ok((had_usage || stored_usage, overrides))
    }

    /// Forgets every user without saving: this worker's leases lapsed.
    pub fn forget_all(&self) {
        self.users().clear();
    }

    /// Users in memory (for tests of the bound).
    pub fn users_in_memory(&self) -> usize {
        self.users().len()
    }
}

/// What a turn reserved; [`TurnCharge::settle`] brings it to the real usage. A charge
/// dropped unsettled keeps its reservations (the agent may have used them) and gives back
/// its place in `concurrent_turns`.
pub struct TurnCharge {
    quotas: Arc<Quotas>,
    entry: Arc<UserEntry>,
    user_id: UserId,
    tokens: Option<Reservation>,
    cost: Option<Reservation>,
    concurrent: bool,
}

impl TurnCharge {
    /// Settles to what the agent reported.
    pub fn settle(mut self, pool: &PoolConfig, prompt: u64, completion: u64, compute_seconds: f64) {
        let now = now_us();
        let quotas = self.quotas.clone();
        let mut state = self.entry.state();
        let tokens = (prompt + completion) as f64;
        if let Some(limit) = quotas.limit(&state, Resource::Tokens) {
            let window = state.window(Resource::Tokens, limit, now);
            match self.tokens.take() {
                Some(reservation) => window.settle(now, reservation, tokens),
                None => window.add(now, tokens),
            }
            quotas.check_level(&self.user_id, Resource::Tokens, window, limit, now);
        }
        if let Some(limit) = quotas.limit(&state, Resource::CostUsd) {
            let cost = pool.price.cost(prompt, completion);
            let window = state.window(Resource::CostUsd, limit, now);
            match self.cost.take() {
                Some(reservation) => window.settle(now, reservation, cost),
                None => window.add(now, cost),
            }
            quotas.check_level(&self.user_id, Resource::CostUsd, window, limit, now);
        }
        if let Some(limit) = quotas.limit(&state, Resource::ComputeSeconds) {
            let window = state.window(Resource::ComputeSeconds, limit, now);
            window.add(now, compute_seconds.max(0.0));
            quotas.check_level(&self.user_id, Resource::ComputeSeconds, window, limit, now);
        }
        state.changed();
    }
}

impl Drop for TurnCharge {
    fn drop(&mut self) {
        if self.concurrent {
            let mut state = self.entry.state();
            state.concurrent_turns = state.concurrent_turns.saturating_sub(1);
        }
    }
}

/// Bytes an append reserved of `storage_bytes`.
pub struct StorageCharge {
    entry: Option<Arc<UserEntry>>,
    bytes: f64,
    done: bool,
}

impl StorageCharge {
    /// A charge of nothing: no storage limit applies.
    pub fn none() -> Self {
        StorageCharge {
            entry: None,
            bytes: 0.0,
            done: true,
        }
    }

    /// The append committed: the bytes stay counted.
    pub fn keep(mut self) {
        self.done = true;
    }

    /// The append was not committed: the bytes are given back.
    pub fn give_back(mut self) {
        if let Some(entry) = &self.entry {
            let mut state = entry.state();
            state.storage = state.storage.map(|used| (used - self.bytes).max(0.0));
        }
        self.done = true;
    }
}

impl Drop for StorageCharge {
    fn drop(&mut self) {
        // Neither kept nor given back: whether the append landed is unknown, so the bytes
        // are read from the store again.
        if !self.done
            && let Some(entry) = &self.entry
        {
            entry.state().storage = None;
        }
    }
}

#[cfg(test)]
mod tests;
