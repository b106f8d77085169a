//! `SessionService` on the coordinator: authenticate, find the slot's owner, forward.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard::auth::verify_session_token;
use switchyard::metadata::{KNOWN_EPOCH, PLACEMENT_EPOCH, SESSION_TOKEN, deadline_of};
use switchyard::pb;
use switchyard::pb::session_service_client::SessionServiceClient;
use switchyard::pb::session_service_server::SessionService;
use switchyard_core::{SessionId, Slot, TokenKey, UserId, WorkerId, slot_of};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status, Streaming};

use crate::error::CoordinatorError;
use crate::membership::Membership;

/// Bound on opening a connection to a worker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Router {
    membership: Arc<Membership>,
    token_key: TokenKey,
    clients: Mutex<HashMap<WorkerId, (String, SessionServiceClient<Channel>)>>,
}

/// What every forwarded call carries besides its message.
struct Forwarding {
    slot: Slot,
    token: Option<AsciiMetadataValue>,
    deadline: Option<Instant>,
}

impl Router {
    pub fn new(membership: Arc<Membership>, token_key: TokenKey) -> Self {
        Router {
            membership,
            token_key,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn slot_of(&self, user_id: &UserId) -> Slot {
        slot_of(user_id.as_str(), self.membership.config().slot_count)
    }

    /// For calls that carry a user id.
    fn for_user(&self, user_id: String, metadata: &MetadataMap) -> Result<Forwarding, Status> {
        let user_id = UserId::parse(user_id).map_err(CoordinatorError::from)?;
        Ok(Forwarding {
            slot: self.slot_of(&user_id),
            token: None,
            deadline: deadline_of(metadata),
        })
    }

    /// For calls that name a session: the verified token gives the user, hence the slot.
    fn for_session(&self, session_id: &str, metadata: &MetadataMap) -> Result<Forwarding, Status> {
        let session_id = SessionId::parse(session_id).map_err(CoordinatorError::from)?;
        let claims = verify_session_token(&self.token_key, metadata, session_id)
            .map_err(CoordinatorError::from)?;
        Ok(Forwarding {
            slot: self.slot_of(&claims.user_id),
            token: metadata.get(SESSION_TOKEN).cloned(),
            deadline: deadline_of(metadata),
        })
    }

    fn client(
        &self,
        worker_id: &WorkerId,
        address: &str,
    ) -> Result<SessionServiceClient<Channel>, Status> {
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((known_address, client)) = clients.get(worker_id)
            && known_address == address
        {
            return Ok(client.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|error| {
                Status::internal(format!(
                    "worker {worker_id} has an invalid address {address:?}: {error}"
                ))
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        let client = SessionServiceClient::new(endpoint.connect_lazy());
        clients.insert(worker_id.clone(), (address.to_string(), client.clone()));
        Ok(client)
    }

    /// Sends `message` to the owner of `forwarding.slot`, stamped with the epoch, the token
    /// and the remaining deadline; retries once if the worker no longer owns the slot.
    async fn forward<M, R, F, Fut>(
        &self,
        forwarding: Forwarding,
        message: M,
        call: F,
    ) -> Result<Response<R>, Status>
    where
        M: Clone,
        F: Fn(SessionServiceClient<Channel>, Request<M>) -> Fut,
        Fut: Future<Output = Result<Response<R>, Status>>,
    {
        let mut retried = false;
        loop {
            let routing = self.membership.routing();
            let owner = routing
                .placement
                .owner(forwarding.slot)
                .ok_or(CoordinatorError::NoOwner(forwarding.slot))?;
            let address = routing
                .addresses
                .get(owner)
                .ok_or(CoordinatorError::NoOwner(forwarding.slot))?;
            let client = self.client(owner, address)?;

            let mut request = Request::new(message.clone());
            let metadata = request.metadata_mut();
            metadata.insert(PLACEMENT_EPOCH, routing.placement.epoch().0.into());
            if let Some(token) = &forwarding.token {
                metadata.insert(SESSION_TOKEN, token.clone());
            }
            if let Some(deadline) = forwarding.deadline {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(Status::deadline_exceeded(
                        "deadline passed before the call reached its worker",
                    ));
                }
                request.set_timeout(remaining);
            }

            match call(client, request).await {
                Err(status) if !retried && is_not_owner(&status) => {
                    tracing::debug!(slot = forwarding.slot, worker_id = %owner, "worker is not the slot's owner, retrying with the current table");
                    retried = true;
                }
                result => return result,
            }
        }
    }
}

fn is_not_owner(status: &Status) -> bool {
    status.code() == Code::FailedPrecondition && status.metadata().contains_key(KNOWN_EPOCH)
}

#[tonic::async_trait]
impl SessionService for Router {
    async fn create_session(
        &self,
        request: Request<pb::CreateSessionRequest>,
    ) -> Result<Response<pb::CreateSessionResponse>, Status> {
        let forwarding = self.for_user(request.get_ref().user_id.clone(), request.metadata())?;
        self.forward(
            forwarding,
            request.into_inner(),
            |mut client, request| async move { client.create_session(request).await },
        )
        .await
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::Session>, Status> {
        let forwarding = self.for_session(&request.get_ref().session_id, request.metadata())?;
        self.forward(
            forwarding,
            request.into_inner(),
            |mut client, request| async move { client.get_session(request).await },
        )
        .await
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let forwarding = self.for_user(request.get_ref().user_id.clone(), request.metadata())?;
        self.forward(
            forwarding,
            request.into_inner(),
            |mut client, request| async move { client.list_sessions(request).await },
        )
        .await
    }

    async fn end_session(
        &self,
        request: Request<pb::EndSessionRequest>,
    ) -> Result<Response<pb::EndSessionResponse>, Status> {
        let forwarding = self.for_session(&request.get_ref().session_id, request.metadata())?;
        self.forward(
            forwarding,
            request.into_inner(),
            |mut client, request| async move { client.end_session(request).await },
        )
        .await
    }

    async fn append_context(
        &self,
        request: Request<pb::AppendContextRequest>,
    ) -> Result<Response<pb::AppendContextResponse>, Status> {
        let forwarding = self.for_session(&request.get_ref().session_id, request.metadata())?;
        self.forward(
            forwarding,
            request.into_inner(),
            |mut client, request| async move { client.append_context(request).await },
        )
        .await
    }

    async fn get_context(
        &self,
        request: Request<pb::GetContextRequest>,
    ) -> Result<Response<pb::GetContextResponse>, Status> {
        let forwarding = self.for_session(&request.get_ref().session_id, request.metadata())?;
        self.forward(
            forwarding,
            request.into_inner(),
            |mut client, request| async move { client.get_context(request).await },
        )
        .await
    }

    /// The worker's stream is handed to the caller as it is: deltas flow through as the
    /// agent produces them.
    type SendMessageStream = Streaming<pb::TurnEvent>;

    async fn send_message(
        &self,
        request: Request<pb::SendMessageRequest>,
    ) -> Result<Response<Self::SendMessageStream>, Status> {
        let forwarding = self.for_session(&request.get_ref().session_id, request.metadata())?;
        self.forward(
            forwarding,
            request.into_inner(),
            |mut client, request| async move { client.send_message(request).await },
        )
        .await
    }
}
