//! One agent turn: commit the user message, stream the agent's reply, commit the reply.

use std::sync::Arc;
use std::time::Instant;

use switchyard::pb;
use switchyard_agents::{AgentError, AgentPool, Usage};
use switchyard_core::{Message, Role};
use tokio::sync::mpsc;
use tonic::Status;

use crate::error::{Result, WorkerError};
use crate::sessions::{SessionCall, SessionManager};

/// Events buffered between the turn and a slow caller before the agent is held back.
const EVENT_BUFFER: usize = 32;

pub type TurnEvents = mpsc::Receiver<Result<pb::TurnEvent, Status>>;

/// Starts a turn in the background and returns its events. The turn waits for any turn
/// already running on the session; a caller that goes away cancels it.
///
/// A turn still running at `deadline` (the caller's `grpc-timeout`) is stopped and ends
/// with DEADLINE_EXCEEDED; its reply is not committed.
pub fn start_turn(
    sessions: Arc<SessionManager>,
    call: SessionCall,
    pool: AgentPool,
    agent_type: String,
    content: String,
    deadline: Option<Instant>,
) -> TurnEvents {
    let (events, receiver) = mpsc::channel(EVENT_BUFFER);
    tokio::spawn(async move {
        let session_id = call.session.session_id;
        let turn = run_turn(&sessions, &call, pool, &agent_type, content, &events);
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

async fn run_turn(
    sessions: &SessionManager,
    call: &SessionCall,
    pool: AgentPool,
    agent_type: &str,
    content: String,
    events: &mpsc::Sender<Result<pb::TurnEvent, Status>>,
) -> Result<()> {
    let (_turn, interrupted) = tokio::select! {
        taken = call.session.take_turn(sessions.limits().max_queued_turns) => taken?,
        _ = events.closed() => return Err(AgentError::Cancelled.into()),
    };
    let user_message = Message {
        role: Role::User,
        content,
        name: String::new(),
    };
    let user_seq = sessions.append(call, &[user_message]).await?;
    let context = sessions.context(call, 0, 0).await?;
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
    // A newer message on an interrupt-policy session, or a handoff past its grace, cancels
    // the turn here: the user message stays committed, the reply is not.
    let (usage, reply) = tokio::select! {
        done = async { tokio::join!(run, forward) } => done,
        () = interrupted.cancelled() => {
            return Err(if call.session.is_handing_over() {
                WorkerError::HandedOver(call.session.session_id)
            } else {
                WorkerError::Interrupted
            });
        }
    };
    // A reply refused on its way out is the turn's error, whatever the agent made of it.
    let reply = reply?;
    let usage: Usage = usage?;
    let reply = reply.ok_or(AgentError::Cancelled)?;

    let reply_message = Message {
        role: Role::Assistant,
        content: reply,
        name: agent_type.to_string(),
    };
    let reply_seq = sessions.append(call, &[reply_message]).await?;
    let done = pb::TurnEvent {
        event: Some(pb::turn_event::Event::Done(pb::TurnDone {
            user_seq,
            reply_seq,
            usage: Some(pb::Usage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                compute_seconds: usage.compute_seconds,
            }),
        })),
    };
    let _ = events.send(Ok(done)).await;
    Ok(())
}
