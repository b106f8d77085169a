//! One agent turn: the user message commits while the agent streams its reply; the reply
//! commits after it; TurnDone once both are durable.

use std::sync::Arc;
use std::time::Instant;

use switchyard::pb;
use switchyard_agents::{AgentError, AgentPool};
use switchyard_core::window::estimated_tokens;
use switchyard_core::{Message, Role};
use switchyard_store::{AppendKey, Durability, RequestRecord, StoreError, TurnUsage};
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::{Result, WorkerError};
use crate::health::TurnEnd;
use crate::sessions::{PendingAppend, SessionCall, SessionManager, TurnRequest};

/// Events buffered between the turn and a slow caller before the agent is held back.
const EVENT_BUFFER: usize = 32;
/// Deltas already waiting are joined into one event up to this many bytes.
const COALESCE_BYTES: usize = 16 * 1024;
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
    // The turn outlives the call's handler: it keeps the call's span (and trace id).
    let span = tracing::Span::current();
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let session_id = call.session.session_id;
            let started = Instant::now();
            let agent_type = input.agent_type.clone();
            let pool_config = pool.config().clone();
            let turn = run_turn(&sessions, &call, pool, &input, &events);
            let result = match deadline {
                Some(deadline) => tokio::time::timeout_at(deadline.into(), turn)
                    .await
                    .unwrap_or(Err(WorkerError::DeadlineExceeded)),
                None => turn.await,
            };
            let outcome = match &result {
                Ok(()) => "ok",
                Err(WorkerError::Agent(AgentError::Cancelled)) => "cancelled",
                Err(WorkerError::Quota(_)) => "refused",
                Err(WorkerError::DeadlineExceeded | WorkerError::TurnTimedOut { .. }) => {
                    "timed_out"
                }
                Err(_) => "failed",
            };
            let end = match outcome {
                "ok" => TurnEnd::Succeeded,
                "cancelled" | "refused" => TurnEnd::NotCounted,
                _ => TurnEnd::Failed,
            };
            sessions.alerts().turn_ended(
                &call.session,
                call.user_id.as_ref(),
                &agent_type,
                &pool_config,
                end,
                started.elapsed(),
            );
            metrics::counter!("switchyard_turns_total", "agent_type" => agent_type.clone(), "outcome" => outcome)
            .increment(1);
            metrics::histogram!("switchyard_turn_duration_seconds", "agent_type" => agent_type)
                .record(started.elapsed().as_secs_f64());
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
        },
        span,
    ));
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

/// A turn's user message: committed by an earlier try of the same request, or queued now.
enum UserMessage {
    Landed(u64),
    Queued(PendingAppend),
}

async fn run_turn(
    sessions: &SessionManager,
    call: &SessionCall,
    pool: AgentPool,
    input: &TurnInput,
    events: &mpsc::Sender<Result<pb::TurnEvent, Status>>,
) -> Result<()> {
    let agent_type = input.agent_type.as_str();
    let turn_started = Instant::now();
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
    // A session whose every request id this worker knows needs no look-up for a new one.
    if let Some(id) = request_id.filter(|id| call.session.may_hold_request(id)) {
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
    // The user's quotas: a turn they cannot pay for runs no agent and commits nothing.
    let pool_config = pool.config().clone();
    let charge = match &call.user_id {
        Some(user_id) => {
            let prompt_tokens = context
                .iter()
                .map(|message| estimated_tokens(&message.content))
                .sum();
            Some(
                sessions
                    .quotas()
                    .begin_turn(user_id, &pool_config, prompt_tokens)
                    .await?,
            )
        }
        None => None,
    };
    let answer = async {
        // Waits, first come first served, when every instance of the type is busy.
        let acquiring = Instant::now();
        let mut agent = tokio::select! {
            agent = pool.acquire() => match agent {
                Ok(agent) => agent,
                Err(error) => {
                    if matches!(error, AgentError::PoolExhausted { .. }) {
                        sessions.alerts().pool_exhausted(agent_type, &pool_config, acquiring.elapsed(), true, call.user_id.as_ref());
                    }
                    return Err(error.into());
                }
            },
            _ = events.closed() => return Err(AgentError::Cancelled.into()),
        };
        let waited = acquiring.elapsed();
        metrics::histogram!("switchyard_agent_pool_acquire_seconds", "agent_type" => agent_type.to_string())
            .record(waited.as_secs_f64());
        if agent.waited() {
            sessions.alerts().pool_exhausted(
                agent_type,
                &pool_config,
                waited,
                false,
                call.user_id.as_ref(),
            );
        }
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
            loop {
                // A caller that leaves stops the forwarding at once: dropping the receiver
                // makes the agent's next send fail, so it stops at its next delta.
                let mut text = tokio::select! {
                    text = delta_receiver.recv() => match text {
                        Some(text) => text,
                        None => break,
                    },
                    () = events.closed() => return Ok(None),
                };
                // Deltas the agent made while the last one was on its way go out as one:
                // fewer frames and writes on both hops, and the first is never held back.
                while text.len() < COALESCE_BYTES {
                    let Ok(more) = delta_receiver.try_recv() else {
                        break;
                    };
                    text.push_str(&more);
                }
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
                if reply.is_empty() {
                    metrics::histogram!("switchyard_turn_first_delta_seconds", "agent_type" => agent_type.to_string())
                        .record(turn_started.elapsed().as_secs_f64());
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
    // One durable wait per turn: the user message is queued now, commits while the agent
    // runs, and becomes durable with its reply's commit, which follows it in the same batch
    // or the next. TurnDone waits for both.
    let user_append = match landed {
        Some(user_seq) => UserMessage::Landed(user_seq),
        None => {
            let key = match request_id {
                Some(id) => AppendKey::Request {
                    id: id.to_string(),
                    turn: true,
                },
                None => AppendKey::None,
            };
            UserMessage::Queued(
                sessions
                    .queue_append(
                        call,
                        Arc::from([user_message]),
                        key,
                        Durability::WithNext,
                        None,
                    )
                    .await?,
            )
        }
    };
    let user_ticket = match &user_append {
        UserMessage::Queued(append) => Some(append.ticket().clone()),
        UserMessage::Landed(_) => None,
    };
    // A user message that cannot be committed stops the agent: its error is the turn's.
    let user_refused = async {
        match &user_ticket {
            Some(ticket) if !ticket.committed().await => {}
            _ => std::future::pending::<()>().await,
        }
    };
    let answered = tokio::select! {
        answered = answer => Some(answered.and_then(|(usage, reply)| {
            // A reply refused on its way out is the turn's error, whatever the agent made of it.
            let reply = reply?.ok_or(AgentError::Cancelled)?;
            Ok((usage?, reply))
        })),
        () = user_refused => None,
    };
    let reply_append = match answered {
        Some(Ok((usage, reply))) => {
            metrics::counter!("switchyard_tokens_total", "agent_type" => agent_type.to_string(), "kind" => "prompt")
                .increment(usage.prompt_tokens);
            metrics::counter!("switchyard_tokens_total", "agent_type" => agent_type.to_string(), "kind" => "completion")
                .increment(usage.completion_tokens);
            call.session
                .health
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .turns
                .add_tokens(usage.prompt_tokens, usage.completion_tokens);
            if let Some(charge) = charge {
                charge.settle(
                    &pool_config,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    usage.compute_seconds,
                );
            }
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
            let reply_message = Message {
                role: Role::Assistant,
                content: reply,
                name: agent_type.to_string(),
            };
            let queued = sessions
                .queue_append(
                    call,
                    Arc::from([reply_message]),
                    key,
                    Durability::Now,
                    user_ticket.as_ref(),
                )
                .await;
            Some(queued.map(|queued| (queued, usage)))
        }
        Some(Err(error)) => Some(Err(error)),
        None => None,
    };
    // A turn that ended early still waits for its user message's commit, so that the
    // session's cache learns of it; that commit's error comes first.
    let user_seq = match user_append {
        UserMessage::Queued(append) => match append.finish(sessions, call).await {
            Ok(appended) => appended.last_seq,
            // EndSession removed the session before its user message committed: the caller
            // learns why, not only that the session is gone.
            Err(_) if call.session.is_ended() => {
                return Err(WorkerError::EndedDuringTurn(call.session.session_id));
            }
            Err(error) => return Err(error),
        },
        UserMessage::Landed(user_seq) => user_seq,
    };
    // Stopped for a user message that was not committed: that error came above.
    let Some(reply_append) = reply_append else {
        return Err(StoreError::PredecessorNotCommitted(call.session.session_id).into());
    };
    let (reply_append, usage) = reply_append?;
    let reply_seq = reply_append.finish(sessions, call).await?.last_seq;
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
    use switchyard_core::{
        DoubleText, Epoch, Limits, PlacementTable, Session, UserId, WorkerId, slot_of,
    };
    use switchyard_store::testing::GatedStore;
    use switchyard_store::{MemoryStore, SessionStore};

    use super::*;
    use crate::ownership::SlotOwnership;

    const SLOTS: u32 = 4;

    /// A worker's sessions on a gated memory store, owning every slot, with one session of
    /// `dora` and an echo pool.
    async fn set_up() -> (Arc<GatedStore>, Arc<SessionManager>, Session, AgentPool) {
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
        (store, sessions, session, pool)
    }

    async fn start(
        sessions: &Arc<SessionManager>,
        session: &Session,
        pool: &AgentPool,
        content: &str,
    ) -> TurnEvents {
        let call = sessions.begin(session.id).await.unwrap();
        let input = TurnInput {
            agent_type: "echo".into(),
            content: content.into(),
            request: None,
        };
        start_turn(sessions.clone(), call, pool.clone(), input, None)
    }

    /// Reads deltas until none comes for a moment and returns their text; panics on
    /// anything else.
    async fn deltas_until_quiet(events: &mut TurnEvents) -> String {
        let mut text = String::new();
        loop {
            match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
                Ok(Some(Ok(pb::TurnEvent {
                    event: Some(pb::turn_event::Event::Delta(delta)),
                }))) => text.push_str(&delta.text),
                Ok(other) => panic!("only deltas before the commits: {other:?}"),
                Err(_) => return text,
            }
        }
    }

    async fn turn_done(events: &mut TurnEvents) -> pb::TurnDone {
        loop {
            match events.recv().await.unwrap().unwrap().event {
                Some(pb::turn_event::Event::Done(done)) => return done,
                _ => continue,
            }
        }
    }

    #[tokio::test]
    async fn deltas_flow_before_the_user_message_is_durable_and_turn_done_waits_for_both() {
        let (store, sessions, session, pool) = set_up().await;
        // The store holds every append until let go.
        store.appends().close();
        let mut events = start(&sessions, &session, &pool, "durable later").await;
        // The first delta arrives while the user message's commit is still held.
        let first = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("a delta without waiting for the store")
            .unwrap()
            .unwrap();
        let Some(pb::turn_event::Event::Delta(first)) = first.event else {
            panic!("a delta first: {first:?}");
        };
        store.appends().reached().await;
        // The reply is all out, and still no TurnDone: nothing is committed yet.
        let rest = deltas_until_quiet(&mut events).await;
        assert_eq!(first.text + &rest, "echo: durable later");
        assert!(
            store
                .read_context(session.id, 0, 0)
                .await
                .unwrap()
                .is_empty()
        );

        store.appends().open();
        let done = turn_done(&mut events).await;
        assert_eq!((done.user_seq, done.reply_seq), (1, 2));
        let stored = store.read_context(session.id, 0, 0).await.unwrap();
        assert_eq!(stored.len(), 2, "TurnDone came once both were committed");
        assert_eq!(stored[1].content, "echo: durable later");
    }

    #[tokio::test]
    async fn turn_done_waits_for_the_reply_commit_after_the_user_message_committed() {
        let (store, sessions, session, pool) = set_up().await;
        // Only the second commit, the reply's, is held.
        store.follow_ups().close();
        let mut events = start(&sessions, &session, &pool, "second commit held").await;
        store.follow_ups().reached().await;
        assert_eq!(
            deltas_until_quiet(&mut events).await,
            "echo: second commit held"
        );
        let stored = store.read_context(session.id, 0, 0).await.unwrap();
        assert_eq!(
            stored.iter().map(|message| message.seq).collect::<Vec<_>>(),
            [1],
            "the user message is committed, the reply is not, and no TurnDone came"
        );

        store.follow_ups().open();
        let done = turn_done(&mut events).await;
        assert_eq!((done.user_seq, done.reply_seq), (1, 2));
        assert_eq!(store.read_context(session.id, 0, 0).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_user_message_that_cannot_be_committed_ends_the_turn_and_no_reply_is_committed() {
        let (store, sessions, session, pool) = set_up().await;
        // Another worker takes the slot's lease in the store: this worker's writes are fenced.
        let other = WorkerId::parse("other").unwrap();
        store
            .acquire_slots(&other, Epoch(2), &[session.slot])
            .await
            .unwrap();
        let mut events = start(&sessions, &session, &pool, "never stored").await;
        let mut deltas = 0;
        let error = loop {
            match events.recv().await.expect("the turn ends with an error") {
                Ok(pb::TurnEvent {
                    event: Some(pb::turn_event::Event::Delta(_)),
                }) => deltas += 1,
                Ok(other) => panic!("no TurnDone for a turn that committed nothing: {other:?}"),
                Err(status) => break status,
            }
        };
        assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
        assert!(
            error.message().contains("moved to another worker"),
            "{error:?}"
        );
        assert!(events.recv().await.is_none(), "nothing after the error");
        // Whatever the agent streamed (it may have finished first), nothing was committed.
        assert!(deltas <= 3);
        assert!(
            store
                .read_context(session.id, 0, 0)
                .await
                .unwrap()
                .is_empty()
        );
    }

    #[tokio::test]
    async fn deltas_ready_together_go_out_as_one_event_and_nothing_is_lost() {
        let (_store, sessions, session, _) = set_up().await;
        // One character per delta: 206 deltas for this reply.
        let pool = AgentPool::new(
            "echo",
            Arc::new(EchoConfig {
                chunk_chars: 1,
                ..EchoConfig::default()
            }),
            PoolConfig::default(),
        );
        let content = "x".repeat(200);
        let mut events = start(&sessions, &session, &pool, &content).await;
        // A caller that reads late: the agent's deltas pile up meanwhile.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (mut text, mut delta_events) = (String::new(), 0);
        let done = loop {
            match events.recv().await.unwrap().unwrap().event {
                Some(pb::turn_event::Event::Delta(delta)) => {
                    delta_events += 1;
                    text.push_str(&delta.text);
                }
                Some(pb::turn_event::Event::Done(done)) => break done,
                None => panic!("an empty event"),
            }
        };
        assert_eq!(text, format!("echo: {content}"));
        assert_eq!(done.reply_seq, 2);
        // At most the events that fit the buffer one by one, then the rest joined.
        assert!(
            (1..=EVENT_BUFFER * 2).contains(&delta_events),
            "{delta_events} events for 206 deltas"
        );
    }

    #[tokio::test]
    async fn a_new_request_id_on_a_session_made_here_is_not_looked_up() {
        let (store, sessions, session, pool) = set_up().await;
        let turn = |id: &'static str| {
            let (sessions, pool) = (sessions.clone(), pool.clone());
            async move {
                let call = sessions.begin(session.id).await.unwrap();
                let request = call.session.begin_turn_request(id);
                let input = TurnInput {
                    agent_type: "echo".into(),
                    content: format!("turn {id}"),
                    request,
                };
                let mut events = start_turn(sessions.clone(), call, pool, input, None);
                turn_done(&mut events).await
            }
        };
        let first = turn("t1").await;
        assert_eq!((first.user_seq, first.reply_seq), (1, 2));
        assert_eq!(
            store.request_record_reads(),
            0,
            "every id of the session is known"
        );
        // A repeat may be in the store: it is looked up, and replayed.
        let repeat = turn("t1").await;
        assert_eq!((repeat.user_seq, repeat.reply_seq), (1, 2));
        assert_eq!(store.request_record_reads(), 1);
        let second = turn("t2").await;
        assert_eq!((second.user_seq, second.reply_seq), (3, 4));
        assert_eq!(store.request_record_reads(), 1);

        // Loaded again from the store, the session may have ids this worker never saw.
        sessions.passivate_all().await;
        let third = turn("t3").await;
        assert_eq!((third.user_seq, third.reply_seq), (5, 6));
        assert_eq!(store.request_record_reads(), 2);
    }

    #[tokio::test]
    async fn a_window_past_the_cached_tail_finds_its_system_messages_without_the_store() {
        let (store, sessions, session, _) = set_up().await;
        let call = sessions.begin(session.id).await.unwrap();
        let system = Message {
            role: Role::System,
            content: "be brief".into(),
            name: String::new(),
        };
        sessions.append(&call, &[system]).await.unwrap();
        let user = |n: usize| Message {
            role: Role::User,
            content: format!("m{n}"),
            name: String::new(),
        };
        for n in 0..400 {
            sessions.append(&call, &[user(n)]).await.unwrap();
        }
        let window = switchyard_core::ContextWindow::default();
        let pending = user(400);
        let context = sessions
            .context_window(&call, &window, Some(&pending))
            .await
            .unwrap();
        assert_eq!(context.len(), window.max_messages);
        assert_eq!(
            (context[0].seq, context[0].content.as_str()),
            (1, "be brief")
        );
        assert_eq!(context.last().unwrap().content, "m400");
        assert_eq!(store.system_message_reads(), 0, "the cache kept it");

        // Loaded again, the tail asks the store once, then keeps what it learnt.
        drop(call);
        sessions.passivate_all().await;
        let call = sessions.begin(session.id).await.unwrap();
        for _ in 0..3 {
            let context = sessions
                .context_window(&call, &window, Some(&pending))
                .await
                .unwrap();
            assert_eq!(context[0].content, "be brief");
        }
        assert_eq!(store.system_message_reads(), 1);
    }
}
