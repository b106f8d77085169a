//! Keeping the table: each computed table is written to the store before anyone sees it,
//! and leases are watched for workers that went silent.

use std::sync::Arc;
use std::time::Duration;

use switchyard_store::{SessionStore, StoredPlacement};
use tokio_util::sync::CancellationToken;

use super::{Membership, SAVE_RETRY};

impl Membership {
    /// Expires leases until `shutdown`.
    pub async fn watch_leases(self: Arc<Self>, shutdown: CancellationToken) {
        // A fine tick: a dead worker's slots move within a tenth of a lease of its expiry.
        let period = (self.config.lease / 10).max(Duration::from_millis(10));
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => { self.expire_leases(); }
                _ = shutdown.cancelled() => break,
            }
        }
    }

    /// Keeps every new table in the store, then publishes it, until `shutdown`. When tables
    /// change faster than the store writes, only the newest is written.
    pub async fn keep_placement(
        self: Arc<Self>,
        store: Arc<dyn SessionStore>,
        shutdown: CancellationToken,
    ) {
        let mut tables = self.computed.subscribe();
        loop {
            let table = tables.borrow_and_update().clone();
            if table.placement.epoch() > self.routing().placement.epoch() {
                let stored = table.to_stored();
                match store.save_placement(&stored).await {
                    Ok(true) => {
                        self.routing.send_replace(table);
                    }
                    Ok(false) if kept_already(&*store, &stored).await => {
                        self.routing.send_replace(table);
                    }
                    Ok(false) => {
                        tracing::error!(epoch = %stored.epoch, "the store already holds a placement table at this epoch or newer: is another coordinator running on this store? Not publishing it");
                        tokio::select! {
                            _ = tokio::time::sleep(SAVE_RETRY) => continue,
                            _ = shutdown.cancelled() => break,
                        }
                    }
                    Err(error) => {
                        tracing::warn!(epoch = %stored.epoch, %error, "cannot keep the placement table in the store; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(SAVE_RETRY) => continue,
                            _ = shutdown.cancelled() => break,
                        }
                    }
                }
            }
            tokio::select! {
                changed = tables.changed() => if changed.is_err() { break },
                _ = shutdown.cancelled() => break,
            }
        }
    }

    /// Waits until the newest computed table is published, for at most `patience`.
    pub async fn wait_until_published(&self, patience: Duration) {
        let target = self.computed.borrow().placement.epoch();
        let mut published = self.routing.subscribe();
        let _ = tokio::time::timeout(
            patience,
            published.wait_for(|table| table.placement.epoch() >= target),
        )
        .await;
    }
}

/// Whether the store already holds exactly `placement`: a save that committed although its
/// reply was lost.
pub(super) async fn kept_already(store: &dyn SessionStore, placement: &StoredPlacement) -> bool {
    match store.load_placement().await {
        Ok(Some(kept)) => {
            kept.epoch == placement.epoch
                && kept.table.moved_slots(&placement.table) == 0
                && kept.table.members() == placement.table.members()
        }
        _ => false,
    }
}
