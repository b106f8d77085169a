//! Saving usage: with the appends of the user's calls, in their transaction, and
//! otherwise in batches every save interval and before a handoff.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_core::quota::{Resource, SlidingWindow, WindowParts};
use switchyard_core::{Slot, UserId};
use switchyard_store::StoredUsage;

use super::{FLUSH_INTERVAL, IDLE_ENTRY, Quotas, UserEntry};

/// Which version of a user's usage an append carries to the store.
pub struct UnsavedUsage {
    entry: Arc<UserEntry>,
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
    pub fn unsaved(&self, user_id: &UserId) -> Option<(UnsavedUsage, Vec<StoredUsage>)> {
        let entry = self.users().get(user_id)?.clone();
        let state = entry.state();
        if !state.dirty {
            return None;
        }
        let usage = state.stored(user_id);
        if usage.is_empty() {
            return None;
        }
        let version = state.version;
        drop(state);
        Some((UnsavedUsage { entry, version }, usage))
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

/// A window as the store keeps it: `{"w": window µs, "h": head, "n": buckets, "z": [[index,
/// value], …]}`, only the buckets that hold something (a window is mostly empty, and this is
/// written with every append of a limited user's).
pub(super) fn encode_window(parts: &WindowParts) -> String {
    use std::fmt::Write;
    let mut text = format!(
        "{{\"w\":{},\"h\":{},\"n\":{},\"z\":[",
        parts.window_us,
        parts.head,
        parts.buckets.len()
    );
    let mut first = true;
    for (index, value) in parts.buckets.iter().enumerate() {
        if *value == 0.0 || !value.is_finite() {
            continue;
        }
        if !first {
            text.push(',');
        }
        first = false;
        let _ = write!(text, "[{index},{value:?}]");
    }
    text.push_str("]}");
    text
}

/// The resource name of the row that holds all of a user's windows.
pub(super) const ALL_WINDOWS: &str = "windows";

/// Every window of a user as one object: `{"tokens": window, …}`, each as [`encode_window`].
pub(super) fn encode_windows(windows: &BTreeMap<Resource, SlidingWindow>) -> String {
    let mut text = String::from("{");
    for (resource, window) in windows {
        if text.len() > 1 {
            text.push(',');
        }
        text.push('"');
        text.push_str(resource.name());
        text.push_str("\":");
        text.push_str(&encode_window(&window.to_parts()));
    }
    text.push('}');
    text
}

/// Reads [`encode_windows`]'s form; `None` if any of it cannot be read.
pub(super) fn decode_windows(text: &str) -> Option<Vec<(Resource, SlidingWindow)>> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    value
        .as_object()?
        .iter()
        .map(|(name, window)| Some((Resource::parse(name)?, window_from(window)?)))
        .collect()
}

/// Reads [`encode_window`]'s form, or the dense `{"w", "h", "b": [every bucket]}` written
/// before it.
pub(super) fn decode_window(text: &str) -> Option<SlidingWindow> {
    window_from(&serde_json::from_str(text).ok()?)
}

fn window_from(value: &serde_json::Value) -> Option<SlidingWindow> {
    let buckets = match (value.get("b"), value.get("z")) {
        (Some(dense), _) => dense
            .as_array()?
            .iter()
            .map(serde_json::Value::as_f64)
            .collect::<Option<Vec<f64>>>()?,
        (None, Some(sparse)) => {
            let count = usize::try_from(value.get("n")?.as_u64()?).ok()?;
            if count > 1024 {
                return None;
            }
            let mut buckets = vec![0.0; count];
            for entry in sparse.as_array()? {
                let pair = entry.as_array()?;
                let index = usize::try_from(pair.first()?.as_u64()?).ok()?;
                *buckets.get_mut(index)? = pair.get(1)?.as_f64()?;
            }
            buckets
        }
        (None, None) => return None,
    };
    SlidingWindow::from_parts(WindowParts {
        window_us: value.get("w")?.as_u64()?,
        head: value.get("h")?.as_u64()?,
        buckets,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn windows_round_trip_sparse_and_dense_forms_are_read() {
        let mut window = SlidingWindow::new(Duration::from_secs(3600));
        let start = 1_000_000_000;
        window.add(start, 3.5);
        window.add(start + 120_000_000, 1e-7);
        let encoded = encode_window(&window.to_parts());
        assert!(encoded.len() < 120, "{encoded}");
        let decoded = decode_window(&encoded).unwrap();
        assert_eq!(decoded.to_parts(), window.to_parts());
        // All of a user's windows in one object.
        let mut tokens = SlidingWindow::new(Duration::from_secs(60));
        tokens.add(start, 42.0);
        let windows: BTreeMap<Resource, SlidingWindow> = [
            (Resource::ApiCalls, window.clone()),
            (Resource::Tokens, tokens.clone()),
        ]
        .into();
        let all = decode_windows(&encode_windows(&windows)).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].0, Resource::ApiCalls);
        assert_eq!(all[1].1.to_parts(), tokens.to_parts());
        assert!(decode_windows(r#"{"nonsense":{"w":1,"h":0,"n":0,"z":[]}}"#).is_none());
        // The dense form of before.
        let parts = window.to_parts();
        let dense = serde_json::json!({"w": parts.window_us, "h": parts.head, "b": parts.buckets})
            .to_string();
        assert_eq!(decode_window(&dense).unwrap().to_parts(), parts);
        // Out of range or malformed: not read.
        for bad in [
            r#"{"w":1,"h":0,"n":2,"z":[[5,1.0]]}"#,
            r#"{"w":1,"h":0,"n":100000,"z":[]}"#,
            r#"{"w":1,"h":0}"#,
            "not json",
        ] {
            assert!(decode_window(bad).is_none(), "{bad}");
        }
    }
}
