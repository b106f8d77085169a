//! Saving usage: with the appends of the user's calls, in their transaction, and
//! otherwise in batches every save interval and before a handoff.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_core::quota::{SlidingWindow, WindowParts};
use switchyard_core::{Slot, UserId};
use switchyard_store::StoredUsage;

use super::{FLUSH_INTERVAL, IDLE_ENTRY, Quotas, UserEntry};

/// A user's usage at one version, as an append carries it to the store.
pub struct UnsavedUsage {
    entry: Arc<UserEntry>,
    pub usage: Vec<StoredUsage>,
    version: u64,
}

impl Quotas {
    /// Saves the windows that changed, each under its user's slot fence, in one call; users
    /// idle for long with nothing unsaved leave memory. Returns how many were saved.
    pub async fn flush(&self) -> usize {
        self.flush_where(|_| true, false).await
    }

    /// Saves the usage of the users of `slots` and forgets them: the slots are being handed
    /// to another worker, which loads what is saved here.
    pub async fn hand_over(&self, slots: &HashSet<Slot>) {
        let saved = self.flush_where(|slot| slots.contains(&slot), true).await;
        tracing::debug!(saved, "quota usage saved for a handoff");
    }

    async fn flush_where(&self, in_scope: impl Fn(Slot) -> bool, forget: bool) -> usize {
        let idle_before = Instant::now().checked_sub(IDLE_ENTRY);
        let mut rows = Vec::new();
        let mut flushed = Vec::new();
        {
            let mut users = self.users();
            users.retain(|user_id, entry| {
                let slot = entry.slot;
                if !in_scope(slot) {
                    return true;
                }
                let mut state = entry.state();
                if state.dirty {
                    if let Some(fence) = self.placement.fence(slot) {
                        for usage in state.stored(user_id) {
                            rows.push((fence.clone(), usage));
                        }
                        flushed.push((user_id.clone(), entry.clone()));
                    }
                    state.dirty = false;
                }
                let idle = match (state.touched, idle_before) {
                    (Some(touched), Some(before)) => touched < before,
                    _ => false,
                };
                !(forget || (idle && state.concurrent_turns == 0 && !state.dirty))
            });
        }
        if rows.is_empty() {
            return 0;
        }
        match self.store.save_usage(&rows).await {
            Ok(saved) => saved,
            Err(error) => {
                tracing::warn!(%error, users = flushed.len(), "quota usage not saved; trying again");
                for (user_id, entry) in flushed {
                    entry.state().dirty = true;
                    if forget {
                        continue;
                    }
                    self.users().entry(user_id).or_insert(entry);
                }
                0
            }
        }
    }

    /// Saves unsaved usage every save interval (by default [`FLUSH_INTERVAL`]) until
    /// `stopped`, and once more then.
    pub async fn run(self: Arc<Self>, stopped: tokio_util::sync::CancellationToken) {
        let every = self
            .config
            .save_interval
            .unwrap_or(FLUSH_INTERVAL)
            .max(Duration::from_millis(10));
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                () = stopped.cancelled() => {
                    self.flush().await;
                    return;
                }
            }
            self.flush().await;
            if let Some(limiter) = &self.user_rate {
                limiter.retain_recent();
            }
            if let Some(limiter) = &self.session_rate {
                limiter.retain_recent();
            }
        }
    }

    /// The user's usage, if some of it is unsaved: an append of the user's carries it, to
    /// save it in the append's transaction ([`Quotas::saved_with`] once it committed).
    pub fn unsaved(&self, user_id: &UserId) -> Option<UnsavedUsage> {
        let entry = self.users().get(user_id)?.clone();
        let state = entry.state();
        if !state.dirty {
            return None;
        }
        let usage = state.stored(user_id);
        let version = state.version;
        drop(state);
        Some(UnsavedUsage {
            entry,
            usage,
            version,
        })
    }

    /// An append carrying `unsaved` committed durably: the usage is saved, unless it
    /// changed since.
    pub fn saved_with(&self, unsaved: &UnsavedUsage) {
        let mut state = unsaved.entry.state();
        if state.version == unsaved.version {
            state.dirty = false;
        }
    }
}

pub(super) fn encode_window(parts: &WindowParts) -> String {
    serde_json::json!({"w": parts.window_us, "h": parts.head, "b": parts.buckets}).to_string()
}

pub(super) fn decode_window(text: &str) -> Option<SlidingWindow> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let buckets = value
        .get("b")?
        .as_array()?
        .iter()
        .map(serde_json::Value::as_f64)
        .collect::<Option<Vec<f64>>>()?;
    SlidingWindow::from_parts(WindowParts {
        window_us: value.get("w")?.as_u64()?,
        head: value.get("h")?.as_u64()?,
        buckets,
    })
}
