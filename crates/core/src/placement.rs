//! The placement table: which worker owns each slot, versioned by an epoch that only grows.
//!
//! Slots are assigned by consistent hashing with bounded loads ([`crate::bounded`]): a
//! worker joining or leaving moves close to 1/N of the slots instead of reshuffling them, and
//! no worker carries more than ⌈(1+ε)·total/N⌉ of the load.

use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};

use crate::bounded::{DEFAULT_EPSILON, assign_slots_bounded};
use crate::error::Error;
use crate::ids::WorkerId;
use crate::slot::Slot;

/// Virtual nodes per worker on the hash ring. More even shares cost only placement time,
/// which is paid when membership changes, never per request.
pub const VIRTUAL_NODES_PER_WORKER: u32 = 128;

/// The version of a placement table. Every change to the table raises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The highest epoch there can be: the stores keep epochs as signed 64-bit integers.
    pub const MAX: Epoch = Epoch(i64::MAX as u64);

    /// The epoch after this one, or `None` past [`Epoch::MAX`]; never wraps.
    pub fn checked_next(self) -> Option<Epoch> {
        self.0
            .checked_add(1)
            .map(Epoch)
            .filter(|next| *next <= Epoch::MAX)
    }

    /// The epoch after this one, staying at [`Epoch::MAX`]. Coordinators refuse reported
    /// epochs above the highest they have kept, so MAX takes 2^63 placement changes to reach.
    pub fn next(self) -> Epoch {
        self.checked_next().unwrap_or(Epoch::MAX)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Owner of every slot at one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementTable {
    epoch: Epoch,
    workers: Vec<WorkerId>,
    /// `owners[slot]` indexes `workers`; `None` when no live worker exists.
    owners: Vec<Option<u32>>,
    /// Every worker still running at this epoch, sorted, whether it owns slots or not (a
    /// draining worker owns none but may still hold leases it is handing over). A new owner
    /// waits for a member to hand a slot over; a slot held by a non-member is taken at once.
    members: Vec<WorkerId>,
}

/// What a placement is computed from.
#[derive(Debug, Clone, Copy)]
pub struct PlacementInput<'a> {
    /// Workers that receive slots (joining and active ones).
    pub placeable: &'a [WorkerId],
    /// Workers still running: the placeable ones and those draining.
    pub members: &'a [WorkerId],
    /// Active sessions per slot (a slot weighs at least 1); empty means uniform.
    pub loads: &'a [u64],
    /// No worker carries more than ⌈(1+ε)·total/N⌉.
    pub epsilon: f64,
}

impl PlacementTable {
    /// The table before any worker joined: every slot unassigned, epoch 0.
    pub fn empty(slot_count: u32) -> Self {
        PlacementTable {
            epoch: Epoch::default(),
            workers: Vec::new(),
            owners: vec![None; slot_count as usize],
            members: Vec::new(),
        }
    }

    /// Rebuilds a table received from elsewhere, checking that it is consistent.
    pub fn from_parts(
        epoch: Epoch,
        workers: Vec<WorkerId>,
        owners: Vec<Option<u32>>,
        members: Vec<WorkerId>,
    ) -> Result<Self, Error> {
        if owners.is_empty() {
            return Err(Error::invalid("placement.slot_count", "must be positive"));
        }
        if let Some(bad) = owners
            .iter()
            .flatten()
            .find(|&&index| index as usize >= workers.len())
        {
            return Err(Error::invalid(
                "placement.slot_owners",
                format!("worker index {bad} is out of range"),
            ));
        }
        let mut members = members;
        members.sort();
        members.dedup();
        Ok(PlacementTable {
            epoch,
            workers,
            owners,
            members,
        })
    }

    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    pub fn slot_count(&self) -> u32 {
        self.owners.len() as u32
    }

    pub fn workers(&self) -> &[WorkerId] {
        &self.workers
    }

    /// Workers running at this epoch, sorted: owners and draining workers alike.
    pub fn members(&self) -> &[WorkerId] {
        &self.members
    }

    pub fn is_member(&self, worker: &WorkerId) -> bool {
        self.members.binary_search(worker).is_ok()
    }

    /// Owner indexes per slot, as carried on the wire.
    pub fn owner_indexes(&self) -> &[Option<u32>] {
        &self.owners
    }

    pub fn owner(&self, slot: Slot) -> Option<&WorkerId> {
        let index = (*self.owners.get(slot as usize)?)?;
        self.workers.get(index as usize)
    }

    pub fn is_owner(&self, slot: Slot, worker: &WorkerId) -> bool {
        self.owner(slot) == Some(worker)
    }

    /// The slots `worker` owns, in ascending order.
    pub fn slots_of(&self, worker: &WorkerId) -> Vec<Slot> {
        let Some(index) = self.workers.iter().position(|w| w == worker) else {
            return Vec::new();
        };
        self.owners
            .iter()
            .enumerate()
            .filter(|(_, owner)| **owner == Some(index as u32))
            .map(|(slot, _)| slot as Slot)
            .collect()
    }

    /// Slot counts per worker.
    pub fn slot_counts(&self) -> HashMap<&WorkerId, u32> {
        let mut counts: HashMap<&WorkerId, u32> = HashMap::new();
        for owner in self.owners.iter().flatten() {
            *counts.entry(&self.workers[*owner as usize]).or_default() += 1;
        }
        counts
    }

    pub fn unassigned_slots(&self) -> u32 {
        self.owners.iter().filter(|owner| owner.is_none()).count() as u32
    }

    /// The table for a new set of live workers with uniform loads and the default ε: `None`
    /// when nothing would change, otherwise the new table at the next epoch.
    pub fn rebalanced(&self, live_workers: &[WorkerId]) -> Option<PlacementTable> {
        self.placed(&PlacementInput {
            placeable: live_workers,
            members: live_workers,
            loads: &[],
            epsilon: DEFAULT_EPSILON,
        })
    }

    /// The table for `input`, by consistent hashing with bounded loads: `None` when neither
    /// the assignment nor the members would change, otherwise the new table at the next epoch.
    pub fn placed(&self, input: &PlacementInput<'_>) -> Option<PlacementTable> {
        let loads = if input.loads.len() == self.owners.len() {
            input.loads.to_vec()
        } else {
            vec![1; self.owners.len()]
        };
        let assignment = assign_slots_bounded(&loads, input.placeable, input.epsilon);
        let mut next = PlacementTable::from_assignment(self.epoch.next(), &assignment);
        next.members = input.members.to_vec();
        next.members.extend(input.placeable.iter().cloned());
        next.members.sort();
        next.members.dedup();
        if next.same_assignment(self) && next.members == self.members {
            return None;
        }
        Some(next)
    }

    /// Slots whose owner differs between two tables.
    pub fn moved_slots(&self, other: &PlacementTable) -> u32 {
        (0..self.slot_count().min(other.slot_count()))
            .filter(|slot| self.owner(*slot) != other.owner(*slot))
            .count() as u32
    }

    /// The same assignment at a higher epoch, for a coordinator that restarted and must
    /// never hand out an epoch a worker has already seen.
    pub fn with_epoch(mut self, epoch: Epoch) -> PlacementTable {
        self.epoch = epoch;
        self
    }

    fn from_assignment(epoch: Epoch, assignment: &[Option<WorkerId>]) -> PlacementTable {
        let mut workers: Vec<WorkerId> = Vec::new();
        let mut index_of: HashMap<&WorkerId, u32> = HashMap::new();
        let owners = assignment
            .iter()
            .map(|owner| {
                owner.as_ref().map(|worker| {
                    *index_of.entry(worker).or_insert_with(|| {
                        workers.push(worker.clone());
                        (workers.len() - 1) as u32
                    })
                })
            })
            .collect();
        PlacementTable {
            epoch,
            workers,
            owners,
            members: Vec::new(),
        }
    }

    fn same_assignment(&self, other: &PlacementTable) -> bool {
        self.slot_count() == other.slot_count()
            && (0..self.slot_count()).all(|slot| self.owner(slot) == other.owner(slot))
    }
}

/// One worker's point on the ring. Only the worker id and the replica number are hashed,
/// so a worker's points do not depend on which other workers are present.
#[derive(Clone, Debug)]
pub(crate) struct VirtualNode<'a> {
    pub(crate) worker: &'a WorkerId,
    pub(crate) replica: u32,
}

impl Hash for VirtualNode<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.worker.as_str().hash(state);
        self.replica.hash(state);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn epochs_never_wrap_and_only_grow(value in any::<u64>()) {
            let epoch = Epoch(value);
            let next = epoch.next();
            prop_assert!(next <= Epoch::MAX.max(epoch));
            match epoch.checked_next() {
                Some(checked) => {
                    prop_assert!(checked > epoch);
                    prop_assert!(checked <= Epoch::MAX);
                    prop_assert_eq!(checked, next);
                }
                None => prop_assert!(epoch >= Epoch::MAX),
            }
            if epoch < Epoch::MAX {
                prop_assert!(next > epoch);
            }
        }
    }

    fn workers(count: usize) -> Vec<WorkerId> {
        (0..count)
            .map(|index| WorkerId::parse(format!("worker-{index}")).unwrap())
            .collect()
    }

    #[test]
    fn every_slot_gets_a_live_owner_and_shares_are_even() {
        let live = workers(4);
        let table = PlacementTable::empty(1024).rebalanced(&live).unwrap();
        assert_eq!(table.epoch(), Epoch(1));
        assert_eq!(table.unassigned_slots(), 0);
        for count in table.slot_counts().values() {
            // 256 is the ideal share; virtual nodes keep every worker near it.
            assert!((150..370).contains(count), "{:?}", table.slot_counts());
        }
    }

    #[test]
    fn unchanged_membership_keeps_the_epoch() {
        let live = workers(3);
        let table = PlacementTable::empty(64).rebalanced(&live).unwrap();
        assert!(table.rebalanced(&live).is_none());
    }

    #[test]
    fn a_join_moves_slots_only_to_the_newcomer() {
        let before = PlacementTable::empty(1024).rebalanced(&workers(3)).unwrap();
        let grown = workers(4);
        let after = before.rebalanced(&grown).unwrap();
        assert_eq!(after.epoch(), Epoch(2));
        let mut moved = 0;
        for slot in 0..1024 {
            if before.owner(slot) != after.owner(slot) {
                moved += 1;
                assert_eq!(after.owner(slot), Some(&grown[3]));
            }
        }
        assert!(moved > 0 && moved < 1024 / 2, "moved {moved}");
    }

    #[test]
    fn a_leave_moves_only_the_leavers_slots() {
        let all = workers(4);
        let before = PlacementTable::empty(1024).rebalanced(&all).unwrap();
        let after = before.rebalanced(&all[..3]).unwrap();
        for slot in 0..1024 {
            if before.owner(slot) != Some(&all[3]) {
                assert_eq!(before.owner(slot), after.owner(slot));
            }
        }
        assert!(after.slots_of(&all[3]).is_empty());
    }

    #[test]
    fn no_workers_leaves_slots_unassigned() {
        let table = PlacementTable::empty(8).rebalanced(&workers(1)).unwrap();
        let empty = table.rebalanced(&[]).unwrap();
        assert_eq!(empty.unassigned_slots(), 8);
        assert_eq!(empty.owner(3), None);
    }

    #[test]
    fn from_parts_rejects_out_of_range_owner() {
        let error =
            PlacementTable::from_parts(Epoch(1), workers(1), vec![Some(0), Some(1)], Vec::new());
        assert!(error.is_err());
    }
}
