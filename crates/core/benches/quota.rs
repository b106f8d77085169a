//! The cost of a quota check: one `try_consume` on a sliding window that has seen few or
//! very many events, which should cost the same. `cargo bench -p switchyard-core --bench quota`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use switchyard_core::SlidingWindow;

/// 2025-01-01T00:00:00Z in microseconds since the UNIX epoch.
const START_US: u64 = 1_735_689_600_000_000;
const WINDOW: Duration = Duration::from_secs(3600);
/// High enough that no check is ever refused.
const LIMIT: f64 = 1e12;

/// A window after `events` events spread over it at increasing times, and the time of the
/// last of them.
fn window_after(events: u64) -> (SlidingWindow, u64) {
    let mut window = SlidingWindow::new(WINDOW);
    let span_us = u64::try_from(WINDOW.as_micros()).expect("an hour fits in u64");
    let mut now = START_US;
    for event in 0..events {
        now = START_US + event * span_us / events;
        window
            .try_consume(now, 1.0, LIMIT)
            .expect("the limit is never reached");
    }
    (window, now)
}

fn check_and_consume(c: &mut Criterion) {
    let mut group = c.benchmark_group("quota check-and-consume");
    for events in [10u64, 1_000_000] {
        group.bench_function(BenchmarkId::new("1 h window, prior events", events), |b| {
            let (mut window, mut now) = window_after(events);
            b.iter(|| {
                now += 1;
                window.try_consume(black_box(now), black_box(1.0), black_box(LIMIT))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, check_and_consume);
criterion_main!(benches);
