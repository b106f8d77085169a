//! The worker's `SessionService` handlers: unpack, validate, check the token and slot
//! ownership, then call the session manager.

use std::sync::Arc;

use switchyard::auth::verify_session_token;
use switchyard::conversions::{
    context_message_to_wire, messages_from_wire, metadata_from_wire, session_to_wire,
};
use switchyard::metadata::{PLACEMENT_EPOCH, deadline_of};
use switchyard::pb;
use switchyard::pb::session_service_server::SessionService;
use switchyard_agents::AgentCatalog;
use switchyard_core::{DoubleText, Epoch, Error, SessionId, TokenKey, UserId, WorkerId, slot_of};
use switchyard_store::AppendKey;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};

use crate::audit;
use crate::error::{Result, WorkerError};
use crate::ownership::SlotOwnership;
use crate::sessions::{SessionCall, SessionManager, history_start};
use crate::turn::{TurnInput, start_turn};

pub struct WorkerSessionService {
    worker_id: WorkerId,
    placement: Arc<SlotOwnership>,
    sessions: Arc<SessionManager>,
    agents: AgentCatalog,
    token_key: TokenKey,
}

impl WorkerSessionService {
    pub fn new(
        worker_id: WorkerId,
        placement: Arc<SlotOwnership>,
        sessions: Arc<SessionManager>,
        agents: AgentCatalog,
        token_key: TokenKey,
    ) -> Self {
        WorkerSessionService {
            worker_id,
            placement,
            sessions,
            agents,
            token_key,
        }
    }

    /// Checks that this worker owns the user's slot at the request's epoch.
    async fn check_owner(&self, user_id: &UserId, metadata: &MetadataMap) -> Result<()> {
        let slot = slot_of(user_id.as_str(), self.placement.current().slot_count());
        self.placement
            .check_owner(slot, requested_epoch(metadata)?)
            .await
    }

    /// Verifies the session token, the slot ownership, and starts a call on the session.
    async fn begin_session_call(
        &self,
        session_id: &str,
        metadata: &MetadataMap,
    ) -> Result<SessionCall> {
        let session_id = SessionId::parse(session_id)?;
        let claims = verify_session_token(&self.token_key, metadata, session_id)?;
        self.check_owner(&claims.user_id, metadata).await?;
        self.sessions
            .quotas()
            .admit(&claims.user_id, Some(session_id))
            .await?;
        self.sessions.begin_for(session_id, &claims.user_id).await
    }
}

fn requested_epoch(metadata: &MetadataMap) -> Result<Option<Epoch>> {
    let Some(value) = metadata.get(PLACEMENT_EPOCH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .map(|epoch| Some(Epoch(epoch)))
        .ok_or_else(|| {
            WorkerError::InvalidMetadata(format!("{PLACEMENT_EPOCH}: must be an unsigned integer"))
        })
}

#[tonic::async_trait]
impl SessionService for WorkerSessionService {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let user_id = UserId::parse(message.user_id).map_err(WorkerError::from)?;
        self.check_owner(&user_id, &metadata).await?;
        self.sessions.quotas().admit(&user_id, None).await?;
        let double_text = DoubleText::parse(&message.double_text).map_err(WorkerError::from)?;
        let (session, evicted) = self
            .sessions
            .create(user_id, metadata_from_wire(message.metadata), double_text)
            .await?;
        let caller = audit::caller(&metadata);
        for id in &evicted {
            audit::event(
                "session evicted",
                &caller,
                &session.user_id,
                Some(*id),
                "ended by the sessions limit for a new session",
            );
        }
        audit::event(
            "session created",
            &caller,
            &session.user_id,
            Some(session.id),
            "ok",
        );
        let token = self.token_key.mint(
            session.id,
            &session.user_id,
            self.sessions.limits().token_ttl,
        );
        Ok(Response::new(pb::CreateSessionResponse {
            session: Some(session_to_wire(&session, &self.worker_id)),
            token,
            evicted_session_ids: evicted.iter().map(ToString::to_string).collect(),
        }))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let (metadata, _, message) = request.into_parts();
        let call = self
            .begin_session_call(&message.session_id, &metadata)
            .await?;
        let session = self.sessions.describe(&call).await?;
        Ok(Response::new(session_to_wire(&session, &self.worker_id)))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let user_id = UserId::parse(message.user_id).map_err(WorkerError::from)?;
        self.check_owner(&user_id, &metadata).await?;
        self.sessions.quotas().admit(&user_id, None).await?;
        let sessions = self.sessions.list(&user_id).await?;
        let start = if message.after_session_id.is_empty() {
            0
        } else {
            let after = SessionId::parse(&message.after_session_id).map_err(|_| {
                WorkerError::from(Error::invalid(
                    "after_session_id",
                    "must be a session id from a previous page",
                ))
            })?;
            sessions
                .iter()
                .position(|session| session.id == after)
                .map(|index| index + 1)
                .ok_or_else(|| {
                    WorkerError::from(Error::invalid(
                        "after_session_id",
                        format!("{after} is not a live session of this user"),
                    ))
                })?
        };
        let page = self.sessions.limits().max_page_messages;
        let rest = &sessions[start..];
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: rest
                .iter()
                .take(page)
                .map(|session| session_to_wire(session, &self.worker_id))
                .collect(),
            truncated: rest.len() > page,
        }))
    }

    async fn end_session(
        &self,
        request: Request<pb::EndSessionRequest>,
    ) -> Result<Response<pb::EndSessionResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let session_id = SessionId::parse(&message.session_id).map_err(WorkerError::from)?;
        let claims = verify_session_token(&self.token_key, &metadata, session_id)
            .map_err(WorkerError::from)?;
        self.check_owner(&claims.user_id, &metadata).await?;
        self.sessions
            .quotas()
            .admit(&claims.user_id, Some(session_id))
            .await?;
        let slot = self.sessions.slot_of(&claims.user_id);
        let ended = self.sessions.end(session_id, slot).await?;
        audit::event(
            "session ended",
            &audit::caller(&metadata),
            &claims.user_id,
            Some(session_id),
            if ended { "ended" } else { "already ended" },
        );
        Ok(Response::new(pb::EndSessionResponse { ended }))
    }

    async fn append_context(
        &self,
        request: Request<pb::AppendContextRequest>,
    ) -> Result<Response<pb::AppendContextResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let call = self
            .begin_session_call(&message.session_id, &metadata)
            .await?;
        let messages =
            messages_from_wire(message.messages, "messages").map_err(WorkerError::from)?;
        let limits = self.sessions.limits();
        limits
            .validate_messages(&messages, "messages")
            .map_err(WorkerError::from)?;
        limits
            .validate_request_id(&message.request_id)
            .map_err(WorkerError::from)?;
        let key = if message.request_id.is_empty() {
            AppendKey::None
        } else {
            AppendKey::Request {
                id: message.request_id,
                turn: false,
            }
        };
        let appended = self.sessions.append_keyed(&call, &messages, &key).await?;
        Ok(Response::new(pb::AppendContextResponse {
            last_seq: appended.last_seq,
        }))
    }

    async fn get_context(
        &self,
        request: Request<pb::GetContextRequest>,
    ) -> Result<Response<pb::GetContextResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let call = self
            .begin_session_call(&message.session_id, &metadata)
            .await?;
        let (messages, truncated) = self
            .sessions
            .context_page(&call, message.last_n, message.after_seq)
            .await?;
        let first_seq = history_start(
            call.session.message_count(),
            self.sessions.limits().max_context_messages,
        );
        Ok(Response::new(pb::GetContextResponse {
            messages: messages.into_iter().map(context_message_to_wire).collect(),
            truncated,
            first_seq,
        }))
    }

    async fn refresh_token(
        &self,
        request: Request<pb::RefreshTokenRequest>,
    ) -> Result<Response<pb::RefreshTokenResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        // The session must still live, and the call counts like any other.
        let call = self
            .begin_session_call(&message.session_id, &metadata)
            .await?;
        let user_id = call
            .user_id
            .clone()
            .ok_or_else(|| Status::internal("a session call without its user"))?;
        let expires_at = std::time::SystemTime::now() + self.sessions.limits().token_ttl;
        let token = self
            .token_key
            .mint_expiring_at(call.session.session_id, &user_id, expires_at);
        Ok(Response::new(pb::RefreshTokenResponse {
            token,
            expires_at: Some(switchyard::conversions::timestamp_from(expires_at)),
        }))
    }

    type SendMessageStream = ReceiverStream<Result<pb::TurnEvent, Status>>;

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<Self::SendMessageStream>, Status> {
        let (metadata, _, message) = request.into_parts();
        let call = self
            .begin_session_call(&message.session_id, &metadata)
            .await?;
        let limits = self.sessions.limits();
        limits
            .validate_agent_type(&message.agent_type)
            .map_err(WorkerError::from)?;
        if message.content.is_empty() {
            return Err(WorkerError::from(Error::invalid("content", "must not be empty")).into());
        }
        limits
            .validate_content(&message.content, "content")
            .map_err(WorkerError::from)?;
        limits
            .validate_request_id(&message.request_id)
            .map_err(WorkerError::from)?;
        let pool = self
            .agents
            .pool(&message.agent_type)
            .map_err(WorkerError::from)?
            .clone();
        let request = if message.request_id.is_empty() {
            None
        } else {
            Some(
                call.session
                    .begin_turn_request(&message.request_id)
                    .ok_or_else(|| WorkerError::TurnInFlight(message.request_id.clone()))?,
            )
        };
        let events = start_turn(
            self.sessions.clone(),
            call,
            pool,
            TurnInput {
                agent_type: message.agent_type,
                content: message.content,
                request,
            },
            deadline_of(&metadata),
        );
        Ok(Response::new(ReceiverStream::new(events)))
    }
}
