//! Placement epochs and tables: computing the table from the members and their loads,
//! handing it to the keeper, and refusing epochs nobody handed out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::conversions::placement_to_wire;
use switchyard::pb;
use switchyard_core::{Epoch, PlacementInput, WorkerId};

use super::{
    Membership, MembershipState, Rebalanced, RoutingTable, WorkerState, forget_old_dead_workers,
    workers_where,
};
use crate::error::{CoordinatorError, Result};

impl Membership {
    /// The highest epoch this coordinator has computed, kept or been told of: a node that
    /// reports more reports something no coordinator of this cluster handed out.
    pub(super) fn highest_epoch(&self, state: &MembershipState) -> Epoch {
        state
            .placement
            .epoch()
            .max(state.epoch_floor)
            .max(self.routing.borrow().placement.epoch())
            .max(self.computed.borrow().placement.epoch())
    }

    pub(super) fn check_reported_epoch(
        &self,
        state: &MembershipState,
        worker_id: &WorkerId,
        reported: Epoch,
    ) -> Result<()> {
        let highest = self.highest_epoch(state);
        if reported > highest {
            tracing::warn!(%worker_id, %reported, %highest, "a worker reported an epoch above every one kept; refused");
            return Err(CoordinatorError::EpochAhead {
                reported: reported.0,
                highest: highest.0,
            });
        }
        Ok(())
    }

    /// Recomputes the placement from the current loads.
    pub fn rebalance_now(&self) -> Rebalanced {
        let mut state = self.state();
        self.rebalance(&mut state)
    }

    pub(super) fn rebalance(&self, state: &mut MembershipState) -> Rebalanced {
        let placeable = workers_where(&state.workers, WorkerState::is_placeable);
        let members = workers_where(&state.workers, WorkerState::is_member);
        let mut slots_moved = 0;
        if let Some(next) = state.placement.placed(&PlacementInput {
            placeable: &placeable,
            members: &members,
            loads: &state.loads,
            epsilon: self.config.epsilon,
        }) {
            slots_moved = next.moved_slots(&state.placement);
            let epoch = next.epoch().max(state.epoch_floor.next());
            state.placement = next.with_epoch(epoch);
            tracing::info!(epoch = %epoch, workers = placeable.len(), slots_moved, unassigned_slots = state.placement.unassigned_slots(), "placement changed");
            metrics::gauge!("switchyard_placement_epoch").set(epoch.0 as f64);
            metrics::counter!("switchyard_slots_moved_total").increment(slots_moved as u64);
            // Every worker known, so one that left or died shows 0 rather than its last count.
            let counts = state.placement.slot_counts();
            for worker in state.workers.keys() {
                let slots = counts.get(worker).copied().unwrap_or(0);
                metrics::gauge!("switchyard_worker_slots", "worker" => worker.to_string())
                    .set(f64::from(slots));
            }
        }
        self.publish(state);
        Rebalanced {
            epoch: state.placement.epoch(),
            slots_moved,
            max_over_average_load: max_over_average(state),
        }
    }

    /// Waits until every placeable worker has heartbeated since the call began, so that a
    /// placement computed next uses the loads of now, not of a heartbeat ago; gives up after
    /// `patience` (a worker that does not heartbeat is declared dead at its lease anyway).
    pub async fn wait_for_fresh_loads(&self, patience: Duration) -> bool {
        let asked = Instant::now();
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let heartbeat = self.heartbeat_seen.notified();
            tokio::pin!(heartbeat);
            heartbeat.as_mut().enable();
            let fresh = self
                .state()
                .workers
                .values()
                .filter(|record| record.state.is_placeable())
                .all(|record| record.last_heartbeat >= asked);
            if fresh {
                return true;
            }
            tokio::select! {
                () = heartbeat => {}
                () = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }

    /// Hands the current table to the store keeper, which publishes it once kept. A change
    /// of addresses or draining workers alone raises the epoch too, so that it is kept and
    /// reaches the router and the workers like any other.
    pub(super) fn publish(&self, state: &mut MembershipState) {
        forget_old_dead_workers(&mut state.workers);
        let members = state
            .workers
            .values()
            .filter(|record| record.state.is_member());
        let addresses: HashMap<WorkerId, String> = members
            .clone()
            .map(|record| (record.worker_id.clone(), record.address.clone()))
            .collect();
        let draining: Vec<WorkerId> = members
            .filter(|record| record.state == WorkerState::Draining)
            .map(|record| record.worker_id.clone())
            .collect();
        {
            let last = self.computed.borrow();
            if last.placement.epoch() == state.placement.epoch()
                && last.placement.epoch() > Epoch(0)
                && (last.addresses != addresses || last.draining != draining)
            {
                let epoch = state.placement.epoch().max(state.epoch_floor).next();
                state.placement = state.placement.clone().with_epoch(epoch);
            }
        }
        let table = Arc::new(RoutingTable {
            placement: state.placement.clone(),
            addresses,
            draining,
        });
        self.computed.send_replace(table.clone());
        if !self.kept_in_store {
            self.routing.send_replace(table);
        }
    }

    /// The published table for a worker, with every member's address.
    pub fn wire_table(&self) -> pb::PlacementTable {
        let routing = self.routing();
        placement_to_wire(&routing.placement, |worker| {
            routing.addresses.get(worker).cloned().unwrap_or_default()
        })
    }
}

/// The most loaded placeable worker's load over the average, in the current table.
pub(super) fn max_over_average(state: &MembershipState) -> f64 {
    let mut loads: HashMap<&WorkerId, u64> = HashMap::new();
    for slot in 0..state.placement.slot_count() {
        if let Some(owner) = state.placement.owner(slot) {
            *loads.entry(owner).or_default() += state.loads[slot as usize].max(1);
        }
    }
    let placeable = state
        .workers
        .values()
        .filter(|record| record.state.is_placeable())
        .count()
        .max(1);
    let total: u64 = loads.values().sum();
    if total == 0 {
        return 0.0;
    }
    let most = loads.values().copied().max().unwrap_or(0);
    most as f64 / (total as f64 / placeable as f64)
}
