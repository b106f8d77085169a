//! One agent turn: commit the user message, stream the agent's reply, commit the reply.

use std::sync::Arc;
use std::time::Instant;

use switchyard::pb;
use switchyard_agents::{AgentError, AgentPool, Usage};
use switchyard_core::{Message, Role};
use switchyard_store::{AppendKey, RequestRecord, StoreError, TurnUsage};
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::{Result, WorkerError};
use crate::sessions::{SessionCall, SessionManager, TurnRequest};

/// Events buffered between the turn and a slow caller before the agent is held back.
const EVENT_BUFFER: usize = 32;
/// How long an agent whose caller left may take to notice before it is stopped.
const CALLER_GONE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

pub type TurnEvents = mpsc::Receiver<Result<pb::TurnEvent, Status>>;

/// What a SendMessage asks for.
pub struct TurnInput {
    pub agent_type: String,
    pub content: String,
    /// The caller's request id, marked in flight on this worker for the turn's life.
    pub request: Option<TurnRequest>,
}

/// Starts a turn in the background and returns its events. The turn waits for any turn
/// already running on the session; a caller that goes away cancels it.
///
/// A turn still running at `deadline` (the caller's `grpc-timeout`) is stopped and ends
/// with DEADLINE_EXCEEDED; its reply is not committed.
pub fn start_turn(
    sessions: Arc<SessionManager>,
    call: SessionCall,
    pool: AgentPool,
    input: TurnInput,
    deadline: Option<Instant>,
) -> TurnEvents {
    let (events, receiver) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(async move {
        let session_id = call.session.session_id;
        let turn = run_turn(&sessions, &call, pool, &input, &events);
        let result = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), turn)
                .await
                .unwrap_or(Err(WorkerError::DeadlineExceeded)),
            None => turn.await,
        };
        match result {
            Ok(()) => {}
            Err(WorkerError::Agent(AgentError::Cancelled)) => {
                tracing::debug!(%session_id, "turn cancelled by the caller");
            }
            Err(error) => {
                tracing::debug!(%session_id, %error, "turn failed");
                let _ = events.send(Err(error.into())).await;
            }
        }
    });
    receiver
}

/// Sends a committed turn again: its reply as one delta, then its TurnDone.
async fn replay(
    sessions: &SessionManager,
    call: &SessionCall,
    user_seq: u64,
    (reply_seq, usage): (u64, TurnUsage),
    events: &mpsc::Sender<Result<pb::TurnEvent, Status>>,
) -> Result<()> {
    let reply = sessions.message_at(call, reply_seq).await?;
    let delta = pb::TurnEvent {
        event: Some(pb::turn_event::Event::Delta(pb::TextDelta {
            text: reply.map(|message| message.content).unwrap_or_default(),
        })),
    };
    if events.send(Ok(delta)).await.is_err() {
        return Err(AgentError::Cancelled.into());
    }
    let _ = events
        .send(Ok(done_event(user_seq, reply_seq, usage)))
        .await;
    Ok(())
}

fn done_event(user_seq: u64, reply_seq: u64, usage: TurnUsage) -> pb::TurnEvent {
    pb::TurnEvent {
        event: Some(pb::turn_event::Event::Done(pb::TurnDone {
            user_seq,
            reply_seq,
            usage: Some(pb::Usage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                compute_seconds: usage.compute_seconds,
            }),
        })),
    }
}

async fn run_turn(
    sessions: &SessionManager,
    call: &SessionCall,
    pool: AgentPool,
    input: &TurnInput,
    events: &mpsc::Sender<Result<pb::TurnEvent, Status>>,
) -> Result<()> {
    let agent_type = input.agent_type.as_str();
    let (_turn, interrupted) = tokio::select! {
        taken = call.session.take_turn(sessions.limits().max_queued_turns) => taken?,
        _ = events.closed() => return Err(AgentError::Cancelled.into()),
    };
    let request_id = input
        .request
        .as_ref()
        .map(|request| request.request_id.as_str());
    // A repeated request id: a committed turn is replayed; one whose user message landed
    // but whose reply did not (it was cancelled, or its worker died) runs again on it.
    let mut landed = None;
    if let Some(id) = request_id {
        match sessions.request_record(call, id).await? {
            None => {}
            Some(RequestRecord { turn: false, .. }) => {
                return Err(StoreError::RequestIdReused {
                    request_id: id.to_string(),
                }
                .into());
            }
            Some(RequestRecord {
                last_seq,
                reply: Some(reply),
                ..
            }) => return replay(sessions, call, last_seq, reply, events).await,
            Some(RequestRecord { last_seq, .. }) => landed = Some(last_seq),
        }
    }
    let window = pool.config().context_window;
    let turn_timeout = pool.config().turn_timeout;
    let user_message = Message {
        role: Role::User,
        content: input.content.clone(),
        name: String::new(),
    };
    // The newest messages that fit the agent type's window, after its instructions (never
    // the whole history, which may hold 100 000 messages), with the turn's own message
    // added in memory when it is not stored yet.
    let pending = landed.is_none().then_some(&user_message);
    let context = sessions.context_window(call, &window, pending).await?;
    // One durable wait per turn: the user message's commit starts now, and the agent runs
    // at once beside it. A commit that fails ends the turn, and no reply is committed.
    let commit_user = async {
        if let Some(user_seq) = landed {
            return Ok(user_seq);
        }
        let key = match request_id {
            Some(id) => AppendKey::Request {
                id: id.to_string(),
                turn: true,
            },
            None => AppendKey::None,
        };
        Ok::<u64, WorkerError>(
            sessions
                .append_keyed(call, std::slice::from_ref(&user_message), &key)
                .await?
                .last_seq,
        )
    };
    let answer = async {
        // Waits, first come first served, when every instance of the type is busy.
        let mut agent = tokio::select! {
            agent = pool.acquire() => agent?,
            _ = events.closed() => return Err(AgentError::Cancelled.into()),
        };
        let (deltas, mut delta_receiver) = mpsc::channel::<String>(EVENT_BUFFER);
        let run = async move {
            let result = agent.agent().run_turn(&context, &deltas).await;
            drop(deltas);
            // A backend that failed is not trusted again; anything else goes back, reset.
            match &result {
                Err(AgentError::Backend(_)) => agent.discard(),
                _ => agent.release().await,
            }
            result
        };
        let max_reply_bytes = sessions.limits().max_reply_bytes;
        let forward = async move {
            let mut reply = String::new();
            while let Some(text) = delta_receiver.recv().await {
                // Checked before the delta goes out: a reply the turn cannot commit ends it
                // here, and dropping the receiver stops the agent.
                if reply.len() + text.len() > max_reply_bytes {
                    return Err(AgentError::ReplyTooLong {
                        agent_type: agent_type.to_string(),
                        limit: max_reply_bytes,
                    });
                }
                if text.contains('\0') {
                    return Err(AgentError::ReplyNotStorable {
                        agent_type: agent_type.to_string(),
                    });
                }
                reply.push_str(&text);
                let event = pb::TurnEvent {
                    event: Some(pb::turn_event::Event::Delta(pb::TextDelta { text })),
                };
                if events.send(Ok(event)).await.is_err() {
                    // Dropping the receiver makes the agent's next send fail: it stops.
                    return Ok(None);
                }
            }
            Ok(Some(reply))
        };
        // A newer message on an interrupt-policy session, a handoff past its grace, or the
        // session's end cancels the turn here: the user message stays committed, the reply is
        // not. So do a caller that leaves and an agent past its turn timeout.
        let both = async { tokio::join!(run, forward) };
        tokio::pin!(both);
        let answered: Result<_, WorkerError> = tokio::select! {
            done = &mut both => Ok(done),
            () = interrupted.cancelled() => {
                return Err(if call.session.is_ended() {
                    WorkerError::EndedDuringTurn(call.session.session_id)
                } else if call.session.is_handing_over() {
                    WorkerError::HandedOver(call.session.session_id)
                } else {
                    WorkerError::Interrupted
                });
            }
            () = events.closed() => {
                // The caller left. An agent that sends another delta learns it at once and is
                // reset for reuse; one that stays silent is stopped after a moment, and its
                // instance is discarded (the pool makes another).
                let _ = tokio::time::timeout(CALLER_GONE_GRACE, &mut both).await;
                return Err(AgentError::Cancelled.into());
            }
            () = tokio::time::sleep(turn_timeout) => {
                return Err(WorkerError::TurnTimedOut {
                    agent_type: agent_type.to_string(),
                    timeout: turn_timeout,
                });
            }
        };
        answered
    };
    // Both are waited for: a turn that ends early still lets its user message's commit
    // finish (and the session's cache learn of it); a commit that fails stops the agent.
    tokio::pin!(commit_user, answer);
    let (user_seq, answered) = tokio::select! {
        committed = &mut commit_user => (committed?, answer.await),
        answered = &mut answer => (commit_user.await?, answered),
    };
    let (usage, reply) = answered?;
    // A reply refused on its way out is the turn's error, whatever the agent made of it.
    let reply = reply?;
    let usage: Usage = usage?;
    let reply = reply.ok_or(AgentError::Cancelled)?;

    let reply_message = Message {
        role: Role::Assistant,
        content: reply,
        name: agent_type.to_string(),
    };
    let usage = TurnUsage {
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        // To the microsecond, as it is kept: a replayed TurnDone is the same as the first.
        compute_seconds: (usage.compute_seconds * 1e6).round() / 1e6,
    };
    let key = match request_id {
        Some(id) => AppendKey::Reply {
            id: id.to_string(),
            usage,
        },
        None => AppendKey::None,
    };
    let reply_seq = sessions
        .append_keyed(call, &[reply_message], &key)
        .await?
        .last_seq;
    if let Some(request) = &input.request {
        request.finish();
    }
    let _ = events
        .send(Ok(done_event(user_seq, reply_seq, usage)))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use switchyard_agents::{EchoConfig, PoolConfig};
    use switchyard_core::{DoubleText, Epoch, Limits, PlacementTable, UserId, WorkerId, slot_of};
    use switchyard_store::testing::GatedStore;
    use switchyard_store::{MemoryStore, SessionStore};

    use super::*;
    use crate::ownership::SlotOwnership;

    const SLOTS: u32 = 4;

    #[tokio::test]
    async fn deltas_flow_before_the_user_message_is_durable_and_turn_done_waits_for_both() {
        let user = UserId::parse("dora").unwrap();
        let me = WorkerId::parse("w").unwrap();
        let store = Arc::new(GatedStore::new(Arc::new(MemoryStore::new())));
        let ownership = Arc::new(SlotOwnership::new(me.clone(), SLOTS));
        ownership.renew_lease(Instant::now(), Duration::from_secs(60));
        ownership.install(
            PlacementTable::empty(SLOTS)
                .rebalanced(std::slice::from_ref(&me))
                .unwrap(),
        );
        let slot = slot_of(user.as_str(), SLOTS);
        store.acquire_slots(&me, Epoch(1), &[slot]).await.unwrap();
        ownership.add_fences(&[slot], Epoch(1));
        let sessions = Arc::new(SessionManager::new(
            store.clone(),
            ownership,
            Limits::default(),
            SLOTS,
        ));
        let (session, _) = sessions
            .create(user, BTreeMap::new(), DoubleText::default())
            .await
            .unwrap();
        let pool = AgentPool::new(
            "echo",
            Arc::new(EchoConfig::default()),
            PoolConfig::default(),
        );

        // The store holds every append until let go.
        store.appends().close();
        let call = sessions.begin(session.id).await.unwrap();
        let input = TurnInput {
            agent_type: "echo".into(),
            content: "durable later".into(),
            request: None,
        };
        let mut events = start_turn(sessions.clone(), call, pool, input, None);
        // The first delta arrives while the user message's commit is still held.
        let first = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("a delta without waiting for the store")
            .unwrap()
            .unwrap();
        assert!(matches!(first.event, Some(pb::turn_event::Event::Delta(_))));
        store.appends().reached().await;
        // The reply is all out, and still no TurnDone: nothing is durable yet.
        let mut deltas = 1;
        let pending = loop {
            match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
                Ok(Some(Ok(pb::TurnEvent {
                    event: Some(pb::turn_event::Event::Delta(_)),
                }))) => deltas += 1,
                Ok(other) => panic!("before the commits: {other:?}"),
                Err(_) => break true,
            }
        };
        assert!(pending && deltas >= 1);
        assert!(
            store
                .read_context(session.id, 0, 0)
                .await
                .unwrap()
                .is_empty()
        );

        store.appends().open();
        let done = loop {
            match events.recv().await.unwrap().unwrap().event {
                Some(pb::turn_event::Event::Done(done)) => break done,
                _ => continue,
            }
        };
        assert_eq!((done.user_seq, done.reply_seq), (1, 2));
        let stored = store.read_context(session.id, 0, 0).await.unwrap();
        assert_eq!(stored.len(), 2, "TurnDone came once both were durable");
        assert_eq!(stored[1].content, "echo: durable later");
    }
}
