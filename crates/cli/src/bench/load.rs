//! The load loop: closed loop at a fixed concurrency, or open loop at a fixed rate, with
//! latencies in an HDR histogram, errors counted by status code, and a live progress line.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tonic::Status;

/// When a run stops.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    After(Duration),
    Count(u64),
}

#[derive(Debug, Clone, Copy)]
pub struct LoadShape {
    pub concurrency: usize,
    pub stop: Stop,
    /// Requests per second in total (open loop), or as fast as they complete (closed loop).
    pub rate: Option<f64>,
    /// Whether to draw the live progress line on stderr.
    pub progress: bool,
}

/// What one run measured.
pub struct Outcome {
    pub label: String,
    pub elapsed: Duration,
    pub succeeded: u64,
    pub latencies: Histogram<u64>,
    pub errors: BTreeMap<String, u64>,
}

impl Outcome {
    pub fn throughput(&self) -> f64 {
        self.succeeded as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A latency quantile in microseconds.
    pub fn quantile_us(&self, quantile: f64) -> f64 {
        self.latencies.value_at_quantile(quantile) as f64
    }
}

fn histogram() -> Histogram<u64> {
    // Microseconds from 1 µs to 1 hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Runs `operation(i)` for i = 0, 1, 2, … under `shape`.
pub async fn run<F, Fut>(label: &str, shape: LoadShape, operation: F) -> Outcome
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    let operation = Arc::new(operation);
    let issued = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let limit = match shape.stop {
        Stop::Count(count) => count,
        Stop::After(_) => u64::MAX,
    };
    let deadline = match shape.stop {
        Stop::After(duration) => Some(started + duration),
        Stop::Count(_) => None,
    };
    let progress = shape.progress.then(|| {
        tokio::spawn(draw_progress(
            label.to_string(),
            completed.clone(),
            done.clone(),
            started,
            shape.stop,
        ))
    });

    let results = match shape.rate {
        None => {
            closed_loop(
                shape.concurrency,
                limit,
                deadline,
                &issued,
                &completed,
                operation,
            )
            .await
        }
        Some(rate) => {
            open_loop(
                rate,
                shape.concurrency,
                limit,
                deadline,
                &issued,
                &completed,
                operation,
            )
            .await
        }
    };
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    if let Some(progress) = progress {
        let _ = progress.await;
    }

    let mut latencies = histogram();
    let mut errors = BTreeMap::new();
    let mut succeeded = 0;
    for (task_latencies, task_errors) in results {
        succeeded += task_latencies.len();
        latencies.add(task_latencies).expect("same bounds");
        for (code, count) in task_errors {
            *errors.entry(code).or_default() += count;
        }
    }
    Outcome {
        label: label.to_string(),
        elapsed,
        succeeded,
        latencies,
        errors,
    }
}

type TaskResult = (Histogram<u64>, BTreeMap<String, u64>);

fn record(
    result: Result<(), Status>,
    began: Instant,
    latencies: &mut Histogram<u64>,
    errors: &mut BTreeMap<String, u64>,
) {
    match result {
        Ok(()) => {
            let micros = began.elapsed().as_micros().clamp(1, 3_600_000_000) as u64;
            let _ = latencies.record(micros);
        }
        Err(status) => *errors.entry(format!("{:?}", status.code())).or_default() += 1,
    }
}

async fn closed_loop<F, Fut>(
    concurrency: usize,
    limit: u64,
    deadline: Option<Instant>,
    issued: &Arc<AtomicU64>,
    completed: &Arc<AtomicU64>,
    operation: Arc<F>,
) -> Vec<TaskResult>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let issued = issued.clone();
            let completed = completed.clone();
            let operation = operation.clone();
            tokio::spawn(async move {
                let mut latencies = histogram();
                let mut errors = BTreeMap::new();
                loop {
                    if deadline.is_some_and(|deadline| Instant::now() >= deadline) {
                        break;
                    }
                    let index = issued.fetch_add(1, Ordering::Relaxed);
                    if index >= limit {
                        break;
                    }
                    let began = Instant::now();
                    let result = operation(index).await;
                    record(result, began, &mut latencies, &mut errors);
                    completed.fetch_add(1, Ordering::Relaxed);
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Ok(result) = task.await {
            results.push(result);
        }
    }
    results
}

/// Sends at a fixed rate whatever the latency, measuring each request from the moment it
/// was due, so a slow server cannot hide its queueing (no coordinated omission).
async fn open_loop<F, Fut>(
    rate: f64,
    max_in_flight: usize,
    limit: u64,
    deadline: Option<Instant>,
    issued: &Arc<AtomicU64>,
    completed: &Arc<AtomicU64>,
    operation: Arc<F>,
) -> Vec<TaskResult>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let in_flight = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let shared = Arc::new(std::sync::Mutex::new((histogram(), BTreeMap::new())));
    let started = Instant::now();
    let mut tasks = Vec::new();
    loop {
        let index = issued.load(Ordering::Relaxed);
        let due = started + interval.mul_f64(index as f64);
        if index >= limit || deadline.is_some_and(|deadline| due >= deadline) {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        issued.fetch_add(1, Ordering::Relaxed);
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let operation = operation.clone();
        let completed = completed.clone();
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let result = operation(index).await;
            {
                let mut guard = shared
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let (latencies, errors) = &mut *guard;
                record(result, due, latencies, errors);
            }
            completed.fetch_add(1, Ordering::Relaxed);
            drop(permit);
        }));
        // Finished tasks need not be kept until the end.
        if tasks.len() >= 4096 {
            tasks.retain(|task| !task.is_finished());
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    let mut guard = shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    vec![std::mem::replace(
        &mut *guard,
        (histogram(), BTreeMap::new()),
    )]
}

async fn draw_progress(
    label: String,
    completed: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    started: Instant,
    stop: Stop,
) {
    let mut last = 0;
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.tick().await;
    while !done.load(Ordering::Relaxed) {
        ticks.tick().await;
        let now = completed.load(Ordering::Relaxed);
        let goal = match stop {
            Stop::After(duration) => format!(
                "{:.0}/{:.0} s",
                started.elapsed().as_secs_f64(),
                duration.as_secs_f64()
            ),
            Stop::Count(count) => format!("{now}/{count}"),
        };
        let mut stderr = std::io::stderr();
        let _ = write!(
            stderr,
            "\r  {label:<24} {goal:>12}  {now:>10} done  {:>9} /s   ",
            now - last
        );
        let _ = stderr.flush();
        last = now;
    }
    let _ = writeln!(std::io::stderr());
}
