//! The load loop: closed loop at a fixed concurrency, or open loop at a fixed rate, with
//! latencies in an HDR histogram, errors counted by status code, and a live progress line
//! or, for long runs, a report every interval (with the memory of a watched process and the
//! size of watched files).

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// When a run stops.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    After(Duration),
    Count(u64),
}

#[derive(Debug, Clone)]
pub struct LoadShape {
    pub concurrency: usize,
    pub stop: Stop,
    /// Requests per second in total (open loop), or as fast as they complete (closed loop).
    pub rate: Option<f64>,
    /// Whether to draw the live progress line on stderr.
    pub progress: bool,
    /// Print a line of figures for each interval this long (instead of the progress line).
    pub report_every: Option<Duration>,
    /// What the interval lines also show.
    pub watch: Watch,
    /// Print interval lines as JSON objects.
    pub json: bool,
}

/// A process whose memory, and files whose sizes, interval reports show.
#[derive(Debug, Clone, Default)]
pub struct Watch {
    pub pid: Option<u32>,
    pub files: Vec<std::path::PathBuf>,
}

/// What an operation measured itself, when the whole call is not what counts (the first
/// delta of a turn, say): the time from its start.
pub type Measured = Option<Duration>;

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
    Fut: Future<Output = Result<Measured, Status>> + Send + 'static,
{
    let operation = Arc::new(operation);
    let issued = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let done = CancellationToken::new();
    let started = Instant::now();
    let limit = match shape.stop {
        Stop::Count(count) => count,
        Stop::After(_) => u64::MAX,
    };
    let deadline = match shape.stop {
        Stop::After(duration) => Some(started + duration),
        Stop::Count(_) => None,
    };
    let interval = shape
        .report_every
        .map(|_| Arc::new(IntervalFigures::default()));
    let progress = match (&interval, shape.report_every) {
        (Some(figures), Some(every)) => Some(tokio::spawn(report_intervals(
            label.to_string(),
            figures.clone(),
            every,
            shape.watch.clone(),
            shape.json,
            done.clone(),
            started,
        ))),
        _ => shape.progress.then(|| {
            tokio::spawn(draw_progress(
                label.to_string(),
                completed.clone(),
                done.clone(),
                started,
                shape.stop,
            ))
        }),
    };

    let results = match shape.rate {
        None => {
            closed_loop(
                shape.concurrency,
                limit,
                deadline,
                &issued,
                &completed,
                interval.clone(),
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
                interval.clone(),
                operation,
            )
            .await
        }
    };
    let elapsed = started.elapsed();
    done.cancel();
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

/// Records one call: its latency from `due` (when it should have started), or, when the
/// operation measured itself from `called`, that plus how late it was called.
fn record(
    result: Result<Measured, Status>,
    due: Instant,
    called: Instant,
    latencies: &mut Histogram<u64>,
    errors: &mut BTreeMap<String, u64>,
    interval: Option<&IntervalFigures>,
) {
    let latency = match result {
        Ok(None) => Ok(due.elapsed()),
        Ok(Some(measured)) => Ok(called.saturating_duration_since(due) + measured),
        Err(status) => Err(format!("{:?}", status.code())),
    };
    match &latency {
        Ok(latency) => {
            let micros = latency.as_micros().clamp(1, 3_600_000_000) as u64;
            let _ = latencies.record(micros);
        }
        Err(code) => *errors.entry(code.clone()).or_default() += 1,
    }
    if let Some(interval) = interval {
        interval.record(latency);
    }
}

/// The figures of the current interval, shared by every task of a run.
#[derive(Default)]
struct IntervalFigures {
    current: std::sync::Mutex<Option<(Histogram<u64>, u64)>>,
}

impl IntervalFigures {
    fn record(&self, latency: Result<Duration, String>) {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (latencies, errors) = current.get_or_insert_with(|| (histogram(), 0));
        match latency {
            Ok(latency) => {
                let _ = latencies.record(latency.as_micros().clamp(1, 3_600_000_000) as u64);
            }
            Err(_) => *errors += 1,
        }
    }

    /// The interval's latencies and errors so far; the next interval starts empty.
    fn take(&self) -> (Histogram<u64>, u64) {
        self.current
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
            .unwrap_or_else(|| (histogram(), 0))
    }
}

#[allow(clippy::too_many_arguments)]
async fn closed_loop<F, Fut>(
    concurrency: usize,
    limit: u64,
    deadline: Option<Instant>,
    issued: &Arc<AtomicU64>,
    completed: &Arc<AtomicU64>,
    interval: Option<Arc<IntervalFigures>>,
    operation: Arc<F>,
) -> Vec<TaskResult>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Measured, Status>> + Send + 'static,
{
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let issued = issued.clone();
            let completed = completed.clone();
            let operation = operation.clone();
            let interval = interval.clone();
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
                    record(
                        result,
                        began,
                        began,
                        &mut latencies,
                        &mut errors,
                        interval.as_deref(),
                    );
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
#[allow(clippy::too_many_arguments)]
async fn open_loop<F, Fut>(
    rate: f64,
    max_in_flight: usize,
    limit: u64,
    deadline: Option<Instant>,
    issued: &Arc<AtomicU64>,
    completed: &Arc<AtomicU64>,
    figures: Option<Arc<IntervalFigures>>,
    operation: Arc<F>,
) -> Vec<TaskResult>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Measured, Status>> + Send + 'static,
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
        let figures = figures.clone();
        tasks.push(tokio::spawn(async move {
            let called = Instant::now();
            let result = operation(index).await;
            {
                let mut guard = shared
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let (latencies, errors) = &mut *guard;
                record(result, due, called, latencies, errors, figures.as_deref());
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
    done: CancellationToken,
    started: Instant,
    stop: Stop,
) {
    let mut last = 0;
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.tick().await;
    while !done.is_cancelled() {
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

/// One line per interval: calls, latency quantiles and errors of that interval, with the
/// watched process's resident memory and the watched files' sizes.
async fn report_intervals(
    label: String,
    figures: Arc<IntervalFigures>,
    every: Duration,
    watch: Watch,
    json: bool,
    done: CancellationToken,
    started: Instant,
) {
    let mut ticks = tokio::time::interval_at((started + every).into(), every);
    let mut last = started;
    if !json {
        println!("{label}, every {}:", humantime::format_duration(every));
        println!(
            "{:>8} {:>9} {:>10} {:>10} {:>10} {:>7} {:>12} {:>12} {:>12}",
            "minute", "calls/s", "p50", "p99", "max", "errors", "RSS MiB", "anon MiB", "files MiB"
        );
    }
    let mut ending = false;
    while !ending {
        // The run's end closes the last interval early, so that it covers only the run.
        tokio::select! {
            _ = ticks.tick() => {}
            () = done.cancelled() => ending = true,
        }
        let now = Instant::now();
        let (latencies, errors) = figures.take();
        let seconds = now.duration_since(last).as_secs_f64().max(1e-9);
        last = now;
        // The run ended just after a line: a sliver of an interval says nothing.
        if ending && seconds < every.as_secs_f64() / 10.0 {
            break;
        }
        let memory = watch.pid.and_then(process_memory);
        let files: Option<u64> = (!watch.files.is_empty()).then(|| {
            watch
                .files
                .iter()
                .filter_map(|file| std::fs::metadata(file).ok())
                .map(|metadata| metadata.len())
                .sum()
        });
        let minute = now.duration_since(started).as_secs_f64() / 60.0;
        let quantile = |q: f64| latencies.value_at_quantile(q);
        let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "scenario": label,
                    "minute": minute,
                    "calls_per_second": latencies.len() as f64 / seconds,
                    "latency_us": { "p50": quantile(0.5), "p99": quantile(0.99), "max": latencies.max() },
                    "errors": errors,
                    "rss_bytes": memory.map(|(rss, _)| rss),
                    "anon_bytes": memory.map(|(_, anon)| anon),
                    "file_bytes": files,
                })
            );
        } else {
            let shown =
                |value: Option<f64>| value.map_or("-".to_string(), |value| format!("{value:.1}"));
            println!(
                "{:>8.1} {:>9.0} {:>10} {:>10} {:>10} {:>7} {:>12} {:>12} {:>12}",
                minute,
                latencies.len() as f64 / seconds,
                format!("{}µs", quantile(0.5)),
                format!("{}µs", quantile(0.99)),
                format!("{}µs", latencies.max()),
                errors,
                shown(memory.map(|(rss, _)| mib(rss))),
                shown(memory.map(|(_, anon)| mib(anon))),
                shown(files.map(mib)),
            );
        }
    }
}

/// A process's resident and anonymous resident memory, in bytes, from /proc.
fn process_memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
    };
    Some((field("VmRSS:")?, field("RssAnon:")?))
}
