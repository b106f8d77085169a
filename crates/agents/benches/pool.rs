//! Pool acquire latency under contention: 64 tasks share a pool of 8 echo instances, each
//! acquiring, holding the instance, and releasing (which resets it). Prints p50/p99 of the
//! wait in acquire against the same loop uncontended (one task); asserts nothing.
//!
//!     cargo bench -p switchyard-agents --bench pool

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use switchyard_agents::{AgentPool, EchoConfig, PoolConfig};

/// How long a turn holds its instance: none (a yield: the pool's own cost shows) or 1 ms
/// (the wait is then queueing behind the instances' holders, as it should be).
#[derive(Clone, Copy)]
enum Hold {
    Yield,
    Millisecond,
}

async fn measure(
    tasks: usize,
    max: usize,
    turns_per_task: usize,
    hold: Hold,
) -> (Histogram<u64>, f64) {
    let pool = AgentPool::new(
        "bench",
        Arc::new(EchoConfig::default()),
        PoolConfig {
            min: max,
            max,
            acquire_timeout: Duration::from_secs(60),
            ..PoolConfig::default()
        },
    );
    pool.fill_to_min().await.expect("warm pool");
    let started = Instant::now();
    let workers: Vec<_> = (0..tasks)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut waits =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
                for _ in 0..turns_per_task {
                    let begun = Instant::now();
                    let agent = pool.acquire().await.expect("acquire");
                    let _ = waits.record(begun.elapsed().as_micros().max(1) as u64);
                    match hold {
                        Hold::Yield => tokio::task::yield_now().await,
                        Hold::Millisecond => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                    agent.release().await;
                }
                waits
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
    for worker in workers {
        all.add(worker.await.expect("task")).expect("same bounds");
    }
    let turns = (tasks * turns_per_task) as f64;
    (all, turns / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() {
    println!("pool of 8 echo instances; wait in acquire, and turns per second");
    println!("{:<44} {:>10} {:>10} {:>12}", "", "p50", "p99", "turns/s");
    let runs = [
        (
            "1 task, held for a yield",
            1usize,
            Hold::Yield,
            100_000usize,
        ),
        ("64 tasks, held for a yield", 64, Hold::Yield, 2_000),
        ("1 task, held for 1 ms", 1, Hold::Millisecond, 500),
        (
            "64 tasks, held for 1 ms (8 wait per slot)",
            64,
            Hold::Millisecond,
            60,
        ),
    ];
    for (label, tasks, hold, turns_per_task) in runs {
        let (waits, rate) = measure(tasks, 8, turns_per_task, hold).await;
        println!(
            "{label:<44} {:>8}µs {:>8}µs {:>12.0}",
            waits.value_at_quantile(0.5),
            waits.value_at_quantile(0.99),
            rate
        );
    }
}
