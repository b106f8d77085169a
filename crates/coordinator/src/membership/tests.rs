//! Membership: joins, leaves, leases, drains, rebalances, epochs and the stored table.

use switchyard_store::SessionStore;
use tokio_util::sync::CancellationToken;

use super::*;

fn config(lease: Duration) -> MembershipConfig {
    MembershipConfig {
        slot_count: 64,
        heartbeat_interval: Duration::from_millis(10),
        lease,
        handoff_grace: Duration::from_secs(1),
        epsilon: 0.25,
        token_key_ids: vec!["key".into()],
        cluster_id: "cluster".into(),
        epoch_floor: Epoch(0),
    }
}

/// Registers `id` at 127.0.0.1:`port`, having seen `known_epoch`.
fn register(
    membership: &Membership,
    id: &str,
    port: u16,
    known_epoch: u64,
) -> (String, pb::PlacementTable) {
    membership
        .register(
            worker(id),
            format!("127.0.0.1:{port}"),
            "key",
            "cluster",
            Epoch(known_epoch),
            &format!("incarnation-of-{id}"),
        )
        .unwrap()
}

fn join(membership: &Membership, id: &str, port: u16) -> String {
    register(membership, id, port, 0).0
}

fn membership(lease: Duration) -> Membership {
    Membership::new(config(lease), None, false)
}

fn worker(id: &str) -> WorkerId {
    WorkerId::parse(id).unwrap()
}

#[test]
fn joins_and_leaves_raise_the_epoch() {
    let membership = membership(Duration::from_secs(60));
    let (first, table) = register(&membership, "a", 1, 0);
    assert_eq!(table.epoch, 1);
    register(&membership, "b", 2, 0);
    assert_eq!(membership.routing().placement.epoch(), Epoch(2));
    membership.leave(&worker("a"), &first).unwrap();
    let routing = membership.routing();
    assert_eq!(routing.placement.epoch(), Epoch(3));
    assert_eq!(routing.placement.slots_of(&worker("b")).len(), 64);
}

#[test]
fn a_restarted_coordinator_continues_above_the_workers_epoch() {
    // The store held leases at epoch 41, which the worker saw.
    let membership = Membership::new(
        MembershipConfig {
            epoch_floor: Epoch(41),
            ..config(Duration::from_secs(60))
        },
        None,
        false,
    );
    let (_, table) = register(&membership, "a", 1, 41);
    assert_eq!(table.epoch, 42);
}

#[test]
fn epochs_above_every_kept_one_are_refused_and_placement_goes_on() {
    let membership = membership(Duration::from_secs(60));
    let (a, _) = register(&membership, "a", 1, 0);
    for reported in [u64::MAX, i64::MAX as u64, 1_000] {
        let error = membership
            .register(
                worker("b"),
                "127.0.0.1:2".into(),
                "key",
                "cluster",
                Epoch(reported),
                "incarnation-of-b",
            )
            .unwrap_err();
        assert!(
            matches!(error, CoordinatorError::EpochAhead { .. }),
            "{error}"
        );
        assert!(matches!(
            membership.heartbeat(&worker("a"), &a, Epoch(reported), 0, &[]),
            Err(CoordinatorError::EpochAhead { .. })
        ));
    }
    let before = membership.routing().placement.epoch();
    register(&membership, "b", 2, before.0);
    let after = membership.routing();
    assert_eq!(after.placement.epoch(), before.next());
    assert_eq!(
        after.placement.slots_of(&worker("b")).len() + after.placement.slots_of(&worker("a")).len(),
        64
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Whatever epochs nodes report, the coordinator refuses exactly those above every
    /// epoch it has kept, and its own epoch only grows, never wrapping.
    #[test]
    fn reported_epochs_never_move_placement_backwards_or_past_what_was_kept(
        reports in proptest::collection::vec(
            proptest::prop_oneof![0u64..8, proptest::prelude::any::<u64>(), (u64::MAX - 2)..=u64::MAX],
            1..12,
        )
    ) {
        let membership = membership(Duration::from_secs(60));
        let (a, _) = register(&membership, "a", 1, 0);
        let mut last = membership.routing().placement.epoch();
        for (index, reported) in reports.into_iter().enumerate() {
            let highest = {
                let state = membership.state();
                membership.highest_epoch(&state)
            };
            let heartbeat = membership.heartbeat(&worker("a"), &a, Epoch(reported), 0, &[]);
            proptest::prop_assert_eq!(heartbeat.is_err(), Epoch(reported) > highest);
            let joined = membership.register(
                worker(&format!("w{index}")),
                format!("127.0.0.1:{}", 10 + index),
                "key",
                "cluster",
                Epoch(reported),
                "incarnation",
            );
            proptest::prop_assert_eq!(joined.is_err(), Epoch(reported) > highest);
            let now = membership.routing().placement.epoch();
            proptest::prop_assert!(now >= last);
            proptest::prop_assert!(now <= Epoch::MAX);
            last = now;
        }
    }
}

#[test]
fn a_live_workers_id_cannot_be_taken_by_another_instance() {
    let lease = Duration::from_millis(200);
    let membership = membership(lease);
    register(&membership, "a", 1, 0);
    let take = |incarnation: &str| {
        membership.register(
            worker("a"),
            "127.0.0.1:666".into(),
            "key",
            "cluster",
            Epoch(0),
            incarnation,
        )
    };
    assert!(matches!(
        take("intruder"),
        Err(CoordinatorError::WorkerIdTaken(_))
    ));
    assert_eq!(membership.routing().addresses[&worker("a")], "127.0.0.1:1");
    // The same instance may register again (after a coordinator restart, say).
    assert!(take("incarnation-of-a").is_ok());
    // Once the holder's lease has run out, a new instance takes the id.
    std::thread::sleep(lease + Duration::from_millis(50));
    assert!(take("restarted").is_ok());
}

#[test]
fn refusals() {
    let membership = membership(Duration::from_secs(60));
    let error = membership
        .register(
            worker("a"),
            "127.0.0.1:1".into(),
            "other",
            "cluster",
            Epoch(0),
            "i",
        )
        .unwrap_err();
    assert!(matches!(error, CoordinatorError::TokenKeyMismatch { .. }));
    let error = membership
        .register(
            worker("a"),
            "127.0.0.1:1".into(),
            "key",
            "elsewhere",
            Epoch(0),
            "i",
        )
        .unwrap_err();
    assert!(matches!(error, CoordinatorError::ClusterMismatch { .. }));
    assert!(error.to_string().contains("elsewhere"), "{error}");
    for address in ["", "nohost", "h:0", "http://h:1", "h:99999", "a b:1"] {
        assert!(
            membership
                .register(worker("a"), address.into(), "key", "cluster", Epoch(0), "i")
                .is_err(),
            "{address}"
        );
    }
    let error = membership
        .heartbeat(&worker("ghost"), "x", Epoch(0), 0, &[])
        .unwrap_err();
    assert!(matches!(error, CoordinatorError::UnknownRegistration(_)));
}

#[test]
fn a_missed_lease_kills_the_worker_and_moves_its_slots() {
    let membership = membership(Duration::from_millis(30));
    let (a, _) = register(&membership, "a", 1, 0);
    let (b, _) = register(&membership, "b", 2, 0);
    std::thread::sleep(Duration::from_millis(50));
    membership
        .heartbeat(&worker("a"), &a, Epoch(2), 0, &[])
        .unwrap();
    assert_eq!(membership.expire_leases(), 1);
    assert_eq!(
        membership.routing().placement.slots_of(&worker("a")).len(),
        64
    );
    let error = membership
        .heartbeat(&worker("b"), &b, Epoch(2), 0, &[])
        .unwrap_err();
    assert!(matches!(error, CoordinatorError::UnknownRegistration(_)));
}

#[test]
fn a_drained_worker_owns_nothing_but_stays_a_member_until_it_leaves() {
    let membership = membership(Duration::from_secs(60));
    let a = join(&membership, "a", 1);
    join(&membership, "b", 2);
    let before = membership.routing().placement.clone();
    let owned_by_a = before.slots_of(&worker("a")).len() as u32;
    let drained = membership.drain(&worker("a")).unwrap();
    assert_eq!(drained.slots_moved, owned_by_a);
    let routing = membership.routing();
    assert_eq!(routing.placement.epoch(), drained.epoch);
    assert!(routing.placement.slots_of(&worker("a")).is_empty());
    assert!(routing.placement.is_member(&worker("a")));
    let (_, drain) = membership
        .heartbeat(&worker("a"), &a, Epoch(0), 0, &[])
        .unwrap();
    assert!(drain, "the heartbeat reply tells the worker to drain");
    assert_eq!(
        membership.drain(&worker("b")).unwrap_err().to_string(),
        CoordinatorError::LastWorker("b".into()).to_string()
    );
    membership.leave(&worker("a"), &a).unwrap();
    assert!(!membership.routing().placement.is_member(&worker("a")));
    assert!(matches!(
        membership.drain(&worker("a")),
        Err(CoordinatorError::WorkerDead(_))
    ));
    assert!(matches!(
        membership.drain(&worker("nobody")),
        Err(CoordinatorError::UnknownWorker(_))
    ));
}

#[test]
fn rebalance_follows_reported_loads_and_changes_nothing_when_they_fit() {
    let membership = membership(Duration::from_secs(60));
    let a = join(&membership, "a", 1);
    join(&membership, "b", 2);
    assert_eq!(membership.rebalance_now().slots_moved, 0);
    // Every session on a's slots: a is far above 1.25 × the average.
    let heavy: Vec<(Slot, u64)> = membership
        .routing()
        .placement
        .slots_of(&worker("a"))
        .into_iter()
        .map(|slot| (slot, 100))
        .collect();
    membership
        .heartbeat(&worker("a"), &a, Epoch(0), 0, &heavy)
        .unwrap();
    let loads = membership.worker_loads();
    assert!(loads[&worker("a")] > loads[&worker("b")]);
    let rebalanced = membership.rebalance_now();
    assert!(rebalanced.slots_moved > 0);
    let loads = membership.worker_loads();
    let total: u64 = loads.values().sum();
    let most = *loads.values().max().unwrap();
    assert!(
        most as f64 <= 1.25 * total as f64 / 2.0 + 100.0,
        "{loads:?}"
    );
}

#[test]
fn a_restored_table_keeps_its_assignment_above_every_used_epoch() {
    let first = membership(Duration::from_secs(60));
    join(&first, "a", 1);
    join(&first, "b", 2);
    let routing = first.routing();
    let stored = routing.to_stored();
    let restarted = Membership::new(
        MembershipConfig {
            epoch_floor: Epoch(40),
            ..config(Duration::from_secs(60))
        },
        Some(stored),
        false,
    );
    let restored = restarted.routing();
    assert!(restored.placement.epoch() > routing.placement.epoch());
    assert_eq!(restored.placement.moved_slots(&routing.placement), 0);
    assert_eq!(restored.addresses, routing.addresses);
    // The members register again: nothing moves, and the epoch climbs above theirs.
    let (_, table) = register(&restarted, "a", 1, 40);
    assert_eq!(table.epoch, 41);
    assert_eq!(
        restarted
            .routing()
            .placement
            .moved_slots(&routing.placement),
        0
    );
}

#[tokio::test]
async fn a_table_is_published_only_once_it_is_kept_in_the_store() {
    let store: Arc<dyn SessionStore> = Arc::new(switchyard_store::MemoryStore::new());
    let membership = Arc::new(Membership::new(config(Duration::from_secs(60)), None, true));
    join(&membership, "a", 1);
    // Computed, not kept: nobody sees it yet.
    assert_eq!(membership.routing().placement.epoch(), Epoch(0));

    let shutdown = CancellationToken::new();
    let keeper = tokio::spawn(
        membership
            .clone()
            .keep_placement(store.clone(), shutdown.clone()),
    );
    membership
        .wait_until_published(Duration::from_secs(5))
        .await;
    let published = membership.routing();
    assert_eq!(published.placement.epoch(), Epoch(1));
    let kept = store.load_placement().await.unwrap().unwrap();
    assert_eq!(kept.epoch, Epoch(1));
    assert_eq!(kept.table.moved_slots(&published.placement), 0);

    // A store that already holds a newer table (another coordinator) blocks publication.
    let mut newer = kept.clone();
    newer.epoch = Epoch(50);
    newer.table = newer.table.with_epoch(Epoch(50));
    assert!(store.save_placement(&newer).await.unwrap());
    join(&membership, "b", 2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(membership.routing().placement.epoch(), Epoch(1));
    shutdown.cancel();
    keeper.await.unwrap();
}

#[test]
fn a_restored_coordinator_goes_on_draining() {
    let first = membership(Duration::from_secs(60));
    join(&first, "a", 1);
    join(&first, "b", 2);
    first.drain(&worker("a")).unwrap();
    let routing = first.routing();
    assert_eq!(routing.draining, vec![worker("a")]);
    let stored = routing.to_stored();
    let restarted = Membership::new(config(Duration::from_secs(60)), Some(stored), false);
    assert_eq!(
        restarted.worker(&worker("a")).unwrap().state,
        WorkerState::Draining
    );
    let a = register(&restarted, "a", 1, 0).0;
    let (_, drain) = restarted
        .heartbeat(&worker("a"), &a, Epoch(0), 0, &[])
        .unwrap();
    assert!(drain);
    assert!(
        restarted
            .routing()
            .placement
            .slots_of(&worker("a"))
            .is_empty()
    );
}

#[test]
fn a_new_address_alone_raises_the_epoch_and_reaches_the_router() {
    let membership = membership(Duration::from_secs(60));
    join(&membership, "a", 1);
    let before = membership.routing();
    // Registered again (a restarted pod keeps its id, gets a new address).
    join(&membership, "a", 7);
    let after = membership.routing();
    assert!(after.placement.epoch() > before.placement.epoch());
    assert_eq!(after.placement.moved_slots(&before.placement), 0);
    assert_eq!(after.addresses[&worker("a")], "127.0.0.1:7");
}

#[tokio::test]
async fn a_table_kept_by_a_save_whose_reply_was_lost_is_published() {
    let store: Arc<dyn SessionStore> = Arc::new(switchyard_store::MemoryStore::new());
    let membership = Arc::new(Membership::new(config(Duration::from_secs(60)), None, true));
    join(&membership, "a", 1);
    let computed = membership.computed.borrow().clone();
    // The save committed, but its reply never came back: the store holds this table.
    let kept = computed.to_stored();
    assert!(store.save_placement(&kept).await.unwrap());
    let shutdown = CancellationToken::new();
    let keeper = tokio::spawn(membership.clone().keep_placement(store, shutdown.clone()));
    membership
        .wait_until_published(Duration::from_secs(5))
        .await;
    assert_eq!(membership.routing().placement.epoch(), kept.epoch);
    shutdown.cancel();
    keeper.await.unwrap();
}
