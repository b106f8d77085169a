//! Placement through the public API: joins, drains, rebalances and the handoff of the turns
//! in flight on a slot that moves.

use std::collections::HashMap;
use std::time::Duration;

use switchyard::SwitchyardClient;
use switchyard::pb;
use tonic::Code;

use crate::sandbox::{SLOW_AGENT, Sandbox, SandboxOptions, create, text, wait_for};

/// Creates a session for each of `users` users and appends one message to each.
async fn populate(client: &SwitchyardClient, users: usize) -> HashMap<String, String> {
    let mut sessions = HashMap::new();
    for index in 0..users {
        let user = format!("user-{index}");
        let session = create(client, &user).await;
        client
            .append_context(
                &session.session_id,
                vec![text("user", &format!("hello {index}"))],
            )
            .await
            .unwrap();
        sessions.insert(user, session.session_id);
    }
    sessions
}

/// Every session still holds exactly its one message.
async fn assert_whole(client: &SwitchyardClient, sessions: &HashMap<String, String>) {
    for (user, session_id) in sessions {
        let index = user.trim_start_matches("user-");
        let context = client.get_context(session_id, 0, 0).await.unwrap();
        let contents: Vec<&str> = context.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(contents, vec![format!("hello {index}")], "{user}");
    }
}

async fn workers(sandbox: &Sandbox) -> HashMap<String, pb::WorkerInfo> {
    sandbox
        .admin()
        .await
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers
        .into_iter()
        .map(|worker| (worker.worker_id.clone(), worker))
        .collect()
}

async fn epoch(sandbox: &Sandbox) -> u64 {
    sandbox
        .admin()
        .await
        .get_placement(pb::GetPlacementRequest::default())
        .await
        .unwrap()
        .into_inner()
        .epoch
}

#[tokio::test]
async fn a_joining_worker_receives_slots_and_sessions_stay_whole() {
    let mut sandbox = Sandbox::start_with(SandboxOptions {
        workers: 2,
        ..SandboxOptions::default()
    })
    .await;
    let client = sandbox.client().await;
    let sessions = populate(&client, 30).await;
    let before = epoch(&sandbox).await;

    let newcomer = sandbox
        .cluster
        .add_worker()
        .await
        .unwrap()
        .worker_id
        .to_string();
    sandbox.wait_until_serving().await;
    assert!(epoch(&sandbox).await > before);
    let listed = workers(&sandbox).await;
    let joined = &listed[&newcomer];
    // 1024 slots over 3 workers: about 341 each, bounded by 1.25 × the average.
    assert!(
        (200..=427).contains(&joined.slot_count),
        "the newcomer owns {} slots",
        joined.slot_count
    );
    assert!(joined.load >= u64::from(joined.slot_count));
    assert_whole(&client, &sessions).await;
    // The moved users are served by their new owner, which can write.
    for session_id in sessions.values() {
        client
            .append_context(session_id, vec![text("user", "after the join")])
            .await
            .unwrap();
    }
    sandbox.stop().await;
}

#[tokio::test]
async fn draining_a_worker_finishes_its_turns_hands_its_sessions_over_and_it_leaves() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let sessions = populate(&client, 30).await;
    let drained = sandbox.owner_of("user-0").await;
    let busy = create(&client, "user-0").await.session_id;
    // A turn of about a second, in flight when the drain starts: it must finish.
    let mut turn = client
        .send_message(&busy, SLOW_AGENT, "slowly")
        .await
        .unwrap();
    assert!(turn.message().await.unwrap().is_some(), "the turn started");
    let turn = tokio::spawn(async move {
        let mut done = None;
        while let Some(event) = turn.message().await? {
            if let Some(pb::turn_event::Event::Done(finished)) = event.event {
                done = Some(finished);
            }
        }
        Ok::<_, tonic::Status>(done)
    });

    let mut request = tonic::Request::new(pb::DrainWorkerRequest {
        worker_id: drained.clone(),
        wait: true,
    });
    request.set_timeout(Duration::from_secs(20));
    let reply = sandbox
        .admin()
        .await
        .drain_worker(request)
        .await
        .unwrap()
        .into_inner();
    assert!(reply.slots_moved > 0);
    assert!(reply.left, "the drained worker left the cluster");
    let done = turn
        .await
        .unwrap()
        .unwrap()
        .expect("the in-flight turn finished");
    assert_eq!(done.reply_seq, done.user_seq + 1);

    let listed = workers(&sandbox).await;
    assert_eq!(listed[&drained].state, pb::WorkerState::Dead as i32);
    assert_eq!(listed[&drained].slot_count, 0);
    assert_eq!(
        listed
            .values()
            .filter(|worker| worker.state == pb::WorkerState::Active as i32)
            .count(),
        2
    );
    assert_whole(&client, &sessions).await;
    let context = client.get_context(&busy, 0, 0).await.unwrap();
    assert_eq!(context.len(), 2, "the finished turn's messages are kept");
    assert_ne!(sandbox.owner_of("user-0").await, drained);

    // Draining again, or draining the unknown, is refused by name.
    let mut admin = sandbox.admin().await;
    let status = admin
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: drained.clone(),
            wait: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains(&drained), "{}", status.message());
    let status = admin
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: "nobody".into(),
            wait: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().starts_with("worker_id:"),
        "{}",
        status.message()
    );
    let status = admin
        .drain_worker(pb::DrainWorkerRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    sandbox.stop().await;
}

#[tokio::test]
async fn a_turn_that_outlasts_the_handoff_grace_ends_unavailable_and_commits_no_reply() {
    let sandbox = Sandbox::start_with(SandboxOptions {
        handoff_grace: Duration::from_millis(200),
        ..SandboxOptions::default()
    })
    .await;
    let client = sandbox.client().await;
    let session = create(&client, "vera").await.session_id;
    let owner = sandbox.owner_of("vera").await;
    let mut turn = client
        .send_message(&session, SLOW_AGENT, "too slow")
        .await
        .unwrap();
    assert!(turn.message().await.unwrap().is_some(), "the turn started");
    sandbox
        .admin()
        .await
        .drain_worker(pb::DrainWorkerRequest {
            worker_id: owner.clone(),
            wait: false,
        })
        .await
        .unwrap();
    let status = loop {
        match turn.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the turn finished although it outlasted the grace"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("moving"), "{}", status.message());

    // The caller retries; the new owner runs the turn once.
    let reply = wait_for(
        "the session on its new owner",
        Duration::from_secs(10),
        || {
            let client = client.clone();
            let session = session.clone();
            async move {
                client
                    .send_message_collect(&session, "echo", "again")
                    .await
                    .ok()
            }
        },
    )
    .await;
    assert_eq!(reply.text, "echo: again");
    let context = client.get_context(&session, 0, 0).await.unwrap();
    let contents: Vec<&str> = context.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, vec!["too slow", "again", "echo: again"]);
    assert_ne!(sandbox.owner_of("vera").await, owner);
    sandbox.stop().await;
}

#[tokio::test]
async fn rebalance_moves_slots_only_when_the_loads_call_for_it() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let mut admin = sandbox.admin().await;
    let before = epoch(&sandbox).await;
    let reply = admin
        .rebalance(pb::RebalanceRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reply.epoch, reply.slots_moved), (before, 0));

    // Pile sessions onto one worker's slots: five for each of 100 of its users (a slot
    // weighs its sessions, at least 1) pushes it far past 1.25 × the average.
    let heavy = sandbox.owner_of("user-0").await;
    let placement = admin
        .get_placement(pb::GetPlacementRequest::default())
        .await
        .unwrap()
        .into_inner();
    let owners: HashMap<u32, String> = placement
        .assignments
        .into_iter()
        .map(|assignment| (assignment.slot, assignment.worker_id))
        .collect();
    let mut sessions = HashMap::new();
    let mut index = 0;
    while sessions.len() < 500 {
        let user = format!("user-{index}");
        index += 1;
        if owners[&switchyard_core::slot_of(&user, placement.slot_count)] != heavy {
            continue;
        }
        for _ in 0..5 {
            let session = create(&client, &user).await;
            client
                .append_context(&session.session_id, vec![text("user", "piled on")])
                .await
                .unwrap();
            sessions.insert(session.session_id, user.clone());
        }
    }
    wait_for(
        "the loads to reach the coordinator",
        Duration::from_secs(5),
        || {
            let sandbox = &sandbox;
            let heavy = heavy.clone();
            async move {
                let listed = workers(sandbox).await;
                (listed[&heavy].load >= u64::from(listed[&heavy].slot_count) + 400).then_some(())
            }
        },
    )
    .await;
    let reply = admin
        .rebalance(pb::RebalanceRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(reply.epoch > before && reply.slots_moved > 0, "{reply:?}");
    assert!(
        reply.max_over_average_load <= 1.25 + 0.05,
        "{}",
        reply.max_over_average_load
    );
    for session_id in sessions.keys() {
        let context = client.get_context(session_id, 0, 0).await.unwrap();
        assert_eq!(context.len(), 1, "{session_id}");
    }
    sandbox.stop().await;
}

/// Established TCP connections on 127.0.0.1 whose local end is `port`: the server's side of
/// every connection made to it.
fn connections_to(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp is readable");
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // 01: ESTABLISHED.
            fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"01")
        })
        .count()
}

#[tokio::test]
async fn the_coordinator_calls_the_workers_of_its_process_without_a_socket() {
    let sandbox = Sandbox::start().await;
    let client = sandbox.client().await;
    let coordinator_port = sandbox.cluster.coordinator_address().port();
    let sessions = populate(&client, 12).await;
    let mut owners = std::collections::HashSet::new();
    for (user, session_id) in &sessions {
        let reply = client
            .send_message_collect(session_id, "echo", "in place")
            .await
            .unwrap();
        assert_eq!(reply.text, "echo: in place");
        owners.insert(sandbox.owner_of(user).await);
    }
    assert!(
        owners.len() > 1,
        "the turns went to one worker only: {owners:?}"
    );
    // The check sees connections at all: the caller's, and the workers' to the coordinator.
    assert!(connections_to(coordinator_port) >= 2);
    for worker in sandbox.cluster.live_workers() {
        assert_eq!(
            connections_to(worker.address.port()),
            0,
            "worker {} has a connection, though every call reached it in place",
            worker.worker_id
        );
    }
}
