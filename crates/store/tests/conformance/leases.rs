//! Leases and placement: a write needs the lease it was fenced by, and the newest
//! placement wins.

use std::sync::Arc;
use std::time::SystemTime;

use switchyard_core::Epoch;
use switchyard_store::{Fence, SessionStore, StoreError};

use super::{SLOT, own_slot, seqs, session, text, worker};

/// Two workers that both believe they own a slot: only the newer epoch's writes land.
pub async fn a_stale_owner_cannot_write(store: Arc<dyn SessionStore>) {
    let stale = own_slot(&*store).await;
    let session = session("dave");
    store.create_session(&stale, &session).await.unwrap();
    store
        .append_messages(&stale, session.id, &[text("from a")], SystemTime::now())
        .await
        .unwrap();

    let b = worker("b");
    assert_eq!(
        store.acquire_slots(&b, Epoch(2), &[SLOT]).await.unwrap(),
        vec![SLOT]
    );
    let current = Fence {
        slot: SLOT,
        owner: b.clone(),
        epoch: Epoch(2),
    };
    assert_eq!(store.max_lease_epoch().await.unwrap(), Epoch(2));
    // The old owner cannot take the slot back at its old epoch.
    assert!(
        store
            .acquire_slots(&worker("a"), Epoch(1), &[SLOT])
            .await
            .unwrap()
            .is_empty()
    );

    let fenced = Err(StoreError::Fenced {
        slot: SLOT,
        epoch: Epoch(1),
    });
    assert_eq!(
        store
            .append_messages(&stale, session.id, &[text("late")], SystemTime::now())
            .await,
        fenced
    );
    assert_eq!(
        store.create_session(&stale, &self::session("dave")).await,
        fenced.clone().map(|_: u64| ())
    );
    assert_eq!(
        store.delete_session(&stale, session.id).await,
        fenced.clone().map(|_: u64| false)
    );
    assert_eq!(
        store
            .touch_session(&stale, session.id, SystemTime::now())
            .await,
        fenced.map(|_: u64| ())
    );

    // Both write at once; the stale writer's appends all fail and seqs never fork.
    let writes = (0..40).map(|index| {
        let store = store.clone();
        let fence = if index % 2 == 0 {
            stale.clone()
        } else {
            current.clone()
        };
        async move {
            let result = store
                .append_messages(
                    &fence,
                    session.id,
                    &[text(&format!("{}-{index}", fence.owner))],
                    SystemTime::now(),
                )
                .await;
            (fence.owner, result)
        }
    });
    for (owner, result) in futures::future::join_all(writes).await {
        match owner.as_str() {
            "a" => assert!(
                matches!(result, Err(StoreError::Fenced { .. })),
                "{result:?}"
            ),
            _ => assert!(result.is_ok(), "{result:?}"),
        }
    }
    let context = store.read_context(session.id, 0, 0).await.unwrap();
    assert_eq!(seqs(&context), (1..=21).collect::<Vec<_>>());
    assert!(
        context[1..]
            .iter()
            .all(|message| message.content.starts_with("b-"))
    );
}

/// A handoff: the old owner releases its lease, after which it can write nothing, and the
/// new owner takes the slot at a newer epoch.
pub async fn a_released_lease_admits_no_writes(store: Arc<dyn SessionStore>) {
    let old = own_slot(&*store).await;
    let session = session("erin");
    store.create_session(&old, &session).await.unwrap();
    let leases = store.slot_leases(&[SLOT, SLOT + 1]).await.unwrap();
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(
        (&leases[0].owner, leases[0].epoch, leases[0].released),
        (&old.owner, Epoch(1), false)
    );

    assert_eq!(
        store
            .release_slots(std::slice::from_ref(&old))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .release_slots(std::slice::from_ref(&old))
            .await
            .unwrap(),
        0
    );
    assert!(store.slot_leases(&[SLOT]).await.unwrap()[0].released);
    assert!(matches!(
        store
            .append_messages(&old, session.id, &[text("late")], SystemTime::now())
            .await,
        Err(StoreError::Fenced { .. })
    ));

    let new = Fence {
        slot: SLOT,
        owner: worker("b"),
        epoch: Epoch(2),
    };
    assert_eq!(
        store
            .acquire_slots(&new.owner, new.epoch, &[SLOT])
            .await
            .unwrap(),
        vec![SLOT]
    );
    // Releasing with a fence that no longer matches changes nothing.
    assert_eq!(store.release_slots(&[old]).await.unwrap(), 0);
    assert_eq!(
        store
            .append_messages(&new, session.id, &[text("mine")], SystemTime::now())
            .await
            .unwrap(),
        1
    );
    let context = store.read_context(session.id, 0, 0).await.unwrap();
    assert_eq!(seqs(&context), vec![1], "the late write did not land");
}

/// The placement table is kept only when newer than the one kept.
pub async fn the_newest_placement_is_kept(store: Arc<dyn SessionStore>) {
    assert_eq!(store.load_placement().await.unwrap(), None);
    let workers = vec![worker("a"), worker("b")];
    let stored = |epoch: u64| switchyard_store::StoredPlacement {
        epoch: Epoch(epoch),
        table: switchyard_core::PlacementTable::empty(32)
            .rebalanced(&workers)
            .unwrap()
            .with_epoch(Epoch(epoch)),
        addresses: vec![
            (workers[0].clone(), "127.0.0.1:1".into()),
            (workers[1].clone(), "127.0.0.1:2".into()),
        ],
        draining: Vec::new(),
    };
    assert!(store.save_placement(&stored(3)).await.unwrap());
    assert!(!store.save_placement(&stored(2)).await.unwrap());
    assert!(!store.save_placement(&stored(3)).await.unwrap());
    assert_eq!(store.load_placement().await.unwrap(), Some(stored(3)));
    assert!(store.save_placement(&stored(4)).await.unwrap());
    assert_eq!(
        store.load_placement().await.unwrap().unwrap().epoch,
        Epoch(4)
    );
}
