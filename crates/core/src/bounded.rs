//! Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam): slots go to their
//! first worker clockwise on the ring unless that would put the worker above
//! ⌈(1+ε)·total/N⌉, in which case they walk on clockwise to the first worker with room.
//!
//! The coordinator computes it only when membership changes or an operator asks, with the
//! per-slot session counts workers report in their heartbeats.

use std::collections::HashMap;

use hashring::HashRing;

use crate::ids::WorkerId;
use crate::placement::{VIRTUAL_NODES_PER_WORKER, VirtualNode};

/// Default ε: no worker carries more than 125% of the average load.
pub const DEFAULT_EPSILON: f64 = 0.25;

/// The cap on any worker's load: ⌈(1+ε)·total/N⌉.
pub fn load_cap(total_load: u64, workers: usize, epsilon: f64) -> u64 {
    if workers == 0 {
        return 0;
    }
    ((1.0 + epsilon) * total_load as f64 / workers as f64).ceil() as u64
}

/// Assigns each slot (load `loads[slot]`, at least 1) to a worker, none above the cap.
/// A slot whose load alone exceeds every worker's room goes to the least loaded worker.
pub fn assign_slots_bounded(
    loads: &[u64],
    workers: &[WorkerId],
    epsilon: f64,
) -> Vec<Option<WorkerId>> {
    if workers.is_empty() {
        return vec![None; loads.len()];
    }
    let mut ring = HashRing::new();
    ring.batch_add(
        workers
            .iter()
            .flat_map(|worker| {
                (0..VIRTUAL_NODES_PER_WORKER).map(move |replica| VirtualNode { worker, replica })
            })
            .collect(),
    );
    let load_of = |slot: usize| loads[slot].max(1);
    let total: u64 = (0..loads.len()).map(load_of).sum();
    let cap = load_cap(total, workers.len(), epsilon);
    let mut carried: HashMap<&WorkerId, u64> = workers.iter().map(|worker| (worker, 0)).collect();

    (0..loads.len())
        .map(|slot| {
            let load = load_of(slot);
            let key = slot as u64;
            let first = ring.get(&key).map(|node| node.worker)?;
            let chosen = if carried[first] + load <= cap {
                first
            } else {
                // Overflow walks clockwise: the ring's nodes from the slot on, each worker
                // once. The walk reads a few nodes first and more only if all were full.
                let mut wanted = 64.min(ring.len());
                loop {
                    let clockwise = ring.get_with_replicas(&key, wanted).unwrap_or_default();
                    let with_room = clockwise
                        .iter()
                        .map(|node| node.worker)
                        .find(|worker| carried[worker] + load <= cap);
                    if let Some(worker) = with_room {
                        break worker;
                    }
                    if wanted >= ring.len() {
                        // Nobody has room for this slot: the least loaded worker takes it.
                        break workers
                            .iter()
                            .min_by_key(|worker| carried[worker])
                            .unwrap_or(first);
                    }
                    wanted = (wanted * 4).min(ring.len());
                }
            };
            *carried.get_mut(chosen).expect("every worker is counted") += load;
            Some(chosen.clone())
        })
        .collect()
}

/// Each slot's first worker on the ring, ignoring loads.
pub fn ring_first(slot_count: usize, workers: &[WorkerId]) -> Vec<Option<WorkerId>> {
    assign_slots_bounded(&vec![1; slot_count], workers, f64::INFINITY)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const SLOTS: usize = 1024;

    fn workers(names: &[String]) -> Vec<WorkerId> {
        names
            .iter()
            .map(|name| WorkerId::parse(name.clone()).unwrap())
            .collect()
    }

    fn loads_by_worker(assignment: &[Option<WorkerId>], loads: &[u64]) -> HashMap<WorkerId, u64> {
        let mut carried = HashMap::new();
        for (slot, owner) in assignment.iter().enumerate() {
            *carried.entry(owner.clone().unwrap()).or_default() += loads[slot].max(1);
        }
        carried
    }

    fn cluster() -> impl Strategy<Value = Vec<String>> {
        prop::collection::hash_set("[a-z]{3,10}-[0-9]{1,3}", 2..=32)
            .prop_map(|names| names.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_slot_has_one_live_owner_and_no_worker_is_above_the_cap(
            names in cluster(),
            loads in prop::collection::vec(0u64..20, SLOTS),
        ) {
            let live = workers(&names);
            let assignment = assign_slots_bounded(&loads, &live, DEFAULT_EPSILON);
            prop_assert!(assignment.iter().all(|owner| owner.as_ref().is_some_and(|o| live.contains(o))));
            let carried = loads_by_worker(&assignment, &loads);
            let total: u64 = loads.iter().map(|load| load.max(&1)).sum();
            let average = total as f64 / live.len() as f64;
            let largest_slot = loads.iter().copied().max().unwrap_or(1).max(1) as f64;
            let most = carried.values().copied().max().unwrap_or(0) as f64;
            // max/avg ≤ 1+ε, allowing one slot of rounding.
            prop_assert!(most <= (1.0 + DEFAULT_EPSILON) * average + largest_slot,
                "most {most}, average {average}");
        }

        #[test]
        fn moves_on_join_and_leave_are_the_newcomers_the_leavers_or_overflow(names in cluster()) {
            let before = workers(&names);
            let mut after = before.clone();
            after.push(WorkerId::parse("newcomer-0").unwrap());
            let loads = vec![1u64; SLOTS];
            let placed_before = assign_slots_bounded(&loads, &before, DEFAULT_EPSILON);
            let placed_after = assign_slots_bounded(&loads, &after, DEFAULT_EPSILON);
            let first_before = ring_first(SLOTS, &before);
            let first_after = ring_first(SLOTS, &after);
            for slot in 0..SLOTS {
                if placed_before[slot] != placed_after[slot] {
                    let to_newcomer = placed_after[slot].as_ref() == after.last();
                    let overflow = placed_before[slot] != first_before[slot] || placed_after[slot] != first_after[slot];
                    prop_assert!(to_newcomer || overflow, "slot {slot} moved without cause on a join");
                }
            }
            // Leave: the newcomer goes again.
            for slot in 0..SLOTS {
                if placed_after[slot] != placed_before[slot] {
                    let from_leaver = placed_after[slot].as_ref() == after.last();
                    let overflow = placed_after[slot] != first_after[slot] || placed_before[slot] != first_before[slot];
                    prop_assert!(from_leaver || overflow, "slot {slot} moved without cause on a leave");
                }
            }
        }
    }

    /// Over 100 random clusters of 2 to 32 workers (uniform loads, 1024 slots), a join moves
    /// close to the ideal S/(N+1) slots: 1.15 on average, never more than 1.6 times it.
    #[test]
    fn joins_move_close_to_the_ideal_number_of_slots() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

        let mut runner = TestRunner::new_with_rng(
            Config::default(),
            TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
        );
        let loads = vec![1u64; SLOTS];
        let mut ratios = Vec::new();
        for _ in 0..100 {
            let names = cluster().new_tree(&mut runner).unwrap().current();
            let before = workers(&names);
            let mut after = before.clone();
            after.push(WorkerId::parse("joining-worker").unwrap());
            let placed_before = assign_slots_bounded(&loads, &before, DEFAULT_EPSILON);
            let placed_after = assign_slots_bounded(&loads, &after, DEFAULT_EPSILON);
            let moved = (0..SLOTS)
                .filter(|slot| placed_before[*slot] != placed_after[*slot])
                .count();
            let ideal = SLOTS as f64 / after.len() as f64;
            ratios.push(moved as f64 / ideal);
        }
        let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
        let worst = ratios.iter().copied().fold(0.0, f64::max);
        eprintln!("joins moved {mean:.3}x the ideal on average, {worst:.3}x at worst");
        assert!(mean <= 1.15, "mean moved/ideal {mean:.3} (all: {ratios:?})");
        assert!(worst <= 1.6, "worst moved/ideal {worst:.3}");
    }
}
