//! Placement quality: slots moved per join and leave against the ideal, and max/avg load,
//! for bounded-load consistent hashing and (the baseline, measured in the same run) plain
//! consistent hashing. `cargo bench -p switchyard-core --bench placement`.

use std::collections::HashMap;
use std::time::Instant;

use switchyard_core::WorkerId;
use switchyard_core::bounded::{DEFAULT_EPSILON, assign_slots_bounded, ring_first};

const SLOTS: usize = 1024;
const CLUSTERS: usize = 100;

/// A small deterministic generator (splitmix64), so every run measures the same clusters.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

fn cluster(rng: &mut Rng, size: usize) -> Vec<WorkerId> {
    (0..size)
        .map(|_| WorkerId::parse(format!("worker-{:x}", rng.next())).expect("valid id"))
        .collect()
}

fn moved(before: &[Option<WorkerId>], after: &[Option<WorkerId>]) -> usize {
    before.iter().zip(after).filter(|(a, b)| a != b).count()
}

fn max_over_average(assignment: &[Option<WorkerId>], loads: &[u64], workers: usize) -> f64 {
    let mut carried: HashMap<&WorkerId, u64> = HashMap::new();
    for (slot, owner) in assignment.iter().enumerate() {
        if let Some(owner) = owner {
            *carried.entry(owner).or_default() += loads[slot].max(1);
        }
    }
    let total: u64 = carried.values().sum();
    let most = carried.values().copied().max().unwrap_or(0);
    most as f64 / (total as f64 / workers as f64)
}

/// Skewed loads: a fifth of the slots hold about four fifths of the sessions.
fn skewed_loads(rng: &mut Rng) -> Vec<u64> {
    (0..SLOTS)
        .map(|_| {
            if rng.below(5) == 0 {
                20 + rng.below(40) as u64
            } else {
                rng.below(4) as u64
            }
        })
        .collect()
}

struct Summary {
    mean: f64,
    median: f64,
    p95: f64,
    max: f64,
}

fn summary(mut values: Vec<f64>) -> Summary {
    values.sort_by(f64::total_cmp);
    Summary {
        mean: values.iter().sum::<f64>() / values.len() as f64,
        median: values[values.len() / 2],
        p95: values[(values.len() * 95 / 100).min(values.len() - 1)],
        max: values[values.len() - 1],
    }
}

fn main() {
    println!(
        "placement of {SLOTS} slots, {CLUSTERS} random clusters per size, ε = {DEFAULT_EPSILON}\n"
    );
    println!(
        "{:>4}  {:>23}  {:>23}  {:>17}  {:>17}  {:>9}",
        "N",
        "join moved/ideal",
        "leave moved/ideal",
        "max/avg uniform",
        "max/avg skewed",
        "place µs"
    );
    println!(
        "{:>4}  {:>23}  {:>23}  {:>17}  {:>17}  {:>9}",
        "",
        "mean  p95  max (plain)",
        "mean  p95  max (plain)",
        "bounded (plain)",
        "bounded (plain)",
        "median"
    );
    let mut rng = Rng(0x5eed);
    let mut all_joins = Vec::new();
    for size in [2usize, 3, 4, 8, 16, 32, 64] {
        let uniform = vec![1u64; SLOTS];
        let (mut joins, mut plain_joins) = (Vec::new(), Vec::new());
        let (mut leaves, mut plain_leaves) = (Vec::new(), Vec::new());
        let (mut spread, mut plain_spread) = (Vec::new(), Vec::new());
        let (mut skew, mut plain_skew) = (Vec::new(), Vec::new());
        let mut timings = Vec::new();
        for _ in 0..CLUSTERS {
            let before = cluster(&mut rng, size);
            let mut grown = before.clone();
            grown.extend(cluster(&mut rng, 1));
            let started = Instant::now();
            let placed = assign_slots_bounded(&uniform, &before, DEFAULT_EPSILON);
            timings.push(started.elapsed().as_secs_f64() * 1e6);
            let placed_grown = assign_slots_bounded(&uniform, &grown, DEFAULT_EPSILON);
            let plain = ring_first(SLOTS, &before);
            let plain_grown = ring_first(SLOTS, &grown);
            let ideal_join = SLOTS as f64 / grown.len() as f64;
            joins.push(moved(&placed, &placed_grown) as f64 / ideal_join);
            plain_joins.push(moved(&plain, &plain_grown) as f64 / ideal_join);

            if size > 1 {
                let mut shrunk = before.clone();
                shrunk.remove(rng.below(size));
                let ideal_leave = SLOTS as f64 / size as f64;
                let placed_shrunk = assign_slots_bounded(&uniform, &shrunk, DEFAULT_EPSILON);
                leaves.push(moved(&placed, &placed_shrunk) as f64 / ideal_leave);
                plain_leaves.push(moved(&plain, &ring_first(SLOTS, &shrunk)) as f64 / ideal_leave);
            }
            spread.push(max_over_average(&placed, &uniform, size));
            plain_spread.push(max_over_average(&plain, &uniform, size));
            let loads = skewed_loads(&mut rng);
            skew.push(max_over_average(
                &assign_slots_bounded(&loads, &before, DEFAULT_EPSILON),
                &loads,
                size,
            ));
            plain_skew.push(max_over_average(&plain, &loads, size));
        }
        if size <= 32 {
            all_joins.extend(joins.iter().copied());
        }
        let (j, pj) = (summary(joins), summary(plain_joins));
        let (l, pl) = (summary(leaves), summary(plain_leaves));
        let (s, ps) = (summary(spread), summary(plain_spread));
        let (k, pk) = (summary(skew), summary(plain_skew));
        let time = summary(timings);
        println!(
            "{size:>4}  {:>4.2} {:>4.2} {:>4.2} ({:>4.2})  {:>4.2} {:>4.2} {:>4.2} ({:>4.2})  {:>7.2} ({:>5.2})  {:>7.2} ({:>5.2})  {:>9.0}",
            j.mean,
            j.p95,
            j.max,
            pj.mean,
            l.mean,
            l.p95,
            l.max,
            pl.mean,
            s.max,
            ps.max,
            k.max,
            pk.max,
            time.median
        );
    }
    let joins = summary(all_joins);
    println!(
        "\njoins with N ≤ 32: mean {:.3}, p95 {:.3}, max {:.3} × the ideal S/(N+1)  (targets: mean ≤ 1.15, max ≤ 1.6)",
        joins.mean, joins.p95, joins.max
    );
    println!(
        "max/avg columns show the worst cluster of each size (target ≤ 1+ε = {:.2}, plus one slot of rounding)",
        1.0 + DEFAULT_EPSILON
    );
}
