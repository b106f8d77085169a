//! Micro-benchmarks of the domain's hot paths. `cargo bench -p switchyard-core`.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use switchyard_core::{PlacementTable, SessionId, TokenKey, UserId, WorkerId, slot_of};

fn slot_hash(c: &mut Criterion) {
    c.bench_function("slot_of (sha-256 of a 24-byte user id)", |b| {
        b.iter(|| slot_of(black_box("user-0123456789@example"), 1024))
    });
}

fn placement(c: &mut Criterion) {
    let workers: Vec<WorkerId> = (0..100)
        .map(|index| WorkerId::parse(format!("worker-{index}")).expect("valid id"))
        .collect();
    c.bench_function("place 1024 slots on 100 workers", |b| {
        b.iter(|| PlacementTable::empty(1024).rebalanced(black_box(&workers)))
    });
}

fn tokens(c: &mut Criterion) {
    let key = TokenKey::from_secret(&[7u8; 32]).expect("32-byte key");
    let user = UserId::parse("alice@example.com").expect("valid id");
    let session = SessionId::new_random();
    let token = key.mint(session, &user, Duration::from_secs(3600));
    c.bench_function("token mint", |b| {
        b.iter(|| {
            key.mint(
                black_box(session),
                black_box(&user),
                Duration::from_secs(3600),
            )
        })
    });
    c.bench_function("token verify", |b| {
        b.iter(|| key.verify(black_box(&token), SystemTime::now()))
    });
}

criterion_group!(benches, slot_hash, placement, tokens);
criterion_main!(benches);
