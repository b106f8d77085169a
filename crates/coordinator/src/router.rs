//! `SessionService` on the coordinator: authenticate, find the slot's owner, forward.
//!
//! The coordinator is a proxy. It reads from each request only its first field (the user
//! id or the session id: every SessionService request starts with it), verifies the token,
//! and forwards the request's bytes untouched; replies and streams come back the same way.
//! Nothing is decoded and re-encoded on the way, and fields newer than this coordinator pass
//! through intact.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use prost::Message as _;
use switchyard::auth::{node_credential, verify_session_token};
use switchyard::metadata::{
    CALLER, KNOWN_EPOCH, NODE_CREDENTIAL, PLACEMENT_EPOCH, SESSION_TOKEN, WORKER_STARTING,
    deadline_of,
};
use switchyard::status::invalid_argument;
use switchyard::tls::{ClientTls, lazy_channel};
use switchyard_core::{ClusterKey, NodeRole, SessionId, Slot, TokenKey, UserId, WorkerId, slot_of};
use tokio_stream::{Stream, StreamExt};
use tonic::body::Body;
use tonic::codegen::BoxFuture;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::server::{Grpc, NamedService, ServerStreamingService, UnaryService};
use tonic::{Code, Request, Response, Status};

use switchyard_server::metrics::TRACEPARENT;
use switchyard_server::{CallError, LocalNodes, NodeChannel};

use crate::error::CoordinatorError;
use crate::gate::Caller;
use crate::membership::Membership;
use crate::raw::{RawCodec, RawMessage};

/// Bound on opening a connection to a worker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The node id in the credential of every call a coordinator forwards.
pub const COORDINATOR_NODE_ID: &str = "coordinator";

/// How a method's first field routes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    /// `user_id`: the user's slot.
    User,
    /// `session_id`: the slot of the user the session token names.
    Session,
}

#[derive(Debug, Clone, Copy)]
struct Method {
    path: &'static str,
    key: Key,
    streaming: bool,
}

const METHODS: [Method; 8] = [
    Method {
        path: "/switchyard.v1.SessionService/CreateSession",
        key: Key::User,
        streaming: false,
    },
    Method {
        path: "/switchyard.v1.SessionService/GetSession",
        key: Key::Session,
        streaming: false,
    },
    Method {
        path: "/switchyard.v1.SessionService/ListSessions",
        key: Key::User,
        streaming: false,
    },
    Method {
        path: "/switchyard.v1.SessionService/EndSession",
        key: Key::Session,
        streaming: false,
    },
    Method {
        path: "/switchyard.v1.SessionService/AppendContext",
        key: Key::Session,
        streaming: false,
    },
    Method {
        path: "/switchyard.v1.SessionService/GetContext",
        key: Key::Session,
        streaming: false,
    },
    Method {
        path: "/switchyard.v1.SessionService/SendMessage",
        key: Key::Session,
        streaming: true,
    },
    Method {
        path: "/switchyard.v1.SessionService/RefreshToken",
        key: Key::Session,
        streaming: false,
    },
];

/// How long a call asked of every worker waits for each when the caller set no deadline.
pub const ASK_EVERY_WORKER_WAIT: Duration = Duration::from_secs(5);

/// The first field of every SessionService request, read without decoding the rest.
#[derive(Clone, PartialEq, prost::Message)]
struct FirstField {
    #[prost(string, tag = "1")]
    value: String,
}

pub struct Router {
    membership: Arc<Membership>,
    token_key: TokenKey,
    /// Signs the credential that marks every forwarded call.
    cluster_key: ClusterKey,
    max_message_bytes: usize,
    /// Mutual TLS towards the workers, when the cluster uses it.
    worker_tls: Option<Arc<ClientTls>>,
    /// Read on every call, written only when a worker appears or moves.
    channels: RwLock<HashMap<WorkerId, (String, NodeChannel)>>,
    /// Workers of this process, called in place rather than through a socket.
    local: LocalNodes,
}

/// What every forwarded call carries besides its message.
struct Forwarding {
    slot: Slot,
    token: Option<AsciiMetadataValue>,
    deadline: Option<Instant>,
    /// The caller's API key name, for the worker's audit events.
    caller: AsciiMetadataValue,
    /// The call's W3C trace context (the caller's, or the one started here), passed on.
    traceparent: Option<AsciiMetadataValue>,
}

/// How a caller is named in audit events: its API key's name, `open` when keys are off.
pub fn caller_name(caller: Option<&Caller>) -> String {
    caller.map_or_else(|| "open".to_string(), |Caller(key)| key.name.clone())
}

fn caller_value(caller: Option<&Caller>) -> AsciiMetadataValue {
    caller_name(caller)
        .parse()
        .unwrap_or_else(|_| AsciiMetadataValue::from_static("unprintable"))
}

impl Router {
    pub fn new(
        membership: Arc<Membership>,
        token_key: TokenKey,
        cluster_key: ClusterKey,
        max_message_bytes: usize,
        worker_tls: Option<Arc<ClientTls>>,
        local: LocalNodes,
    ) -> Self {
        Router {
            membership,
            token_key,
            cluster_key,
            max_message_bytes,
            worker_tls,
            channels: RwLock::new(HashMap::new()),
            local,
        }
    }

    /// Authenticates a request and works out where it goes. `caller` is the API key the
    /// call was admitted with: it must cover the user.
    fn route(
        &self,
        method: Method,
        metadata: &MetadataMap,
        caller: Option<&Caller>,
        message: &RawMessage,
    ) -> Result<Forwarding, Status> {
        let field = match method.key {
            Key::User => "user_id",
            Key::Session => "session_id",
        };
        let first = FirstField::decode(message.0.clone())
            .map_err(|error| {
                let reason = if error.to_string().contains("UTF-8") {
                    "must be valid UTF-8"
                } else {
                    "cannot be read: the request is not a valid protobuf message"
                };
                invalid_argument(field, reason)
            })?
            .value;
        let slot_count = self.membership.config().slot_count;
        match method.key {
            Key::User => {
                let user_id = UserId::parse(first).map_err(CoordinatorError::from)?;
                Caller::check_user(caller, user_id.as_str())?;
                Ok(Forwarding {
                    slot: slot_of(user_id.as_str(), slot_count),
                    token: None,
                    deadline: deadline_of(metadata),
                    caller: caller_value(caller),
                    traceparent: metadata.get(TRACEPARENT).cloned(),
                })
            }
            Key::Session => {
                let session_id = SessionId::parse(&first).map_err(CoordinatorError::from)?;
                let claims = verify_session_token(&self.token_key, metadata, session_id)
                    .map_err(CoordinatorError::from)?;
                Caller::check_user(caller, claims.user_id.as_str())?;
                Ok(Forwarding {
                    slot: slot_of(claims.user_id.as_str(), slot_count),
                    token: metadata.get(SESSION_TOKEN).cloned(),
                    deadline: deadline_of(metadata),
                    caller: caller_value(caller),
                    traceparent: metadata.get(TRACEPARENT).cloned(),
                })
            }
        }
    }

    /// The channel to a worker, made when it first appears or moves. Channels of workers no
    /// longer in `members` are dropped then, so the map holds at most the cluster. A worker
    /// of this process is called in place while its server accepts calls.
    fn channel(
        &self,
        worker_id: &WorkerId,
        address: &str,
        members: &HashMap<WorkerId, String>,
    ) -> Result<NodeChannel, Status> {
        if let Some(local) = self.local.get(address) {
            return Ok(local);
        }
        {
            let channels = self
                .channels
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some((known_address, channel)) = channels.get(worker_id)
                && known_address == address
            {
                return Ok(channel.clone());
            }
        }
        let scheme = if self.worker_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let channel = lazy_channel(
            &format!("{scheme}://{address}"),
            self.worker_tls.clone(),
            |endpoint| {
                endpoint
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_while_idle(true)
            },
        )
        .map_err(|error| {
            Status::internal(format!(
                "worker {worker_id} has an invalid address {address:?}: {error}"
            ))
        })?;
        let channel = NodeChannel::new(tower::ServiceExt::map_err(channel, |error| {
            CallError(error.into())
        }));
        let mut channels = self
            .channels
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        channels.retain(|worker, _| members.contains_key(worker));
        channels.insert(worker_id.clone(), (address.to_string(), channel.clone()));
        Ok(channel)
    }

    /// Workers this router holds a channel to.
    #[cfg(test)]
    fn channel_count(&self) -> usize {
        self.channels
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .len()
    }

    /// Sends `message` to the owner of the slot, stamped with the epoch, the token and the
    /// remaining deadline; retries once if the worker no longer owns the slot, and a few
    /// times, a moment apart, while it is starting (registered, its server not up yet).
    async fn forward<R>(
        &self,
        method: Method,
        forwarding: Forwarding,
        message: RawMessage,
        call: impl AsyncFn(
            tonic::client::Grpc<NodeChannel>,
            Request<RawMessage>,
            PathAndQuery,
        ) -> Result<Response<R>, Status>,
    ) -> Result<(Response<R>, WorkerId), Status> {
        let mut retried = false;
        let mut starting_retries = 0;
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
            let mut grpc =
                tonic::client::Grpc::new(self.channel(owner, address, &routing.addresses)?)
                    .max_decoding_message_size(self.max_message_bytes)
                    .max_encoding_message_size(self.max_message_bytes);

            let mut request = Request::new(message.clone());
            let metadata = request.metadata_mut();
            metadata.insert(PLACEMENT_EPOCH, routing.placement.epoch().0.into());
            metadata.insert(
                NODE_CREDENTIAL,
                node_credential(
                    &self.cluster_key,
                    NodeRole::Coordinator,
                    COORDINATOR_NODE_ID,
                    method.path,
                ),
            );
            if let Some(token) = &forwarding.token {
                metadata.insert(SESSION_TOKEN, token.clone());
            }
            metadata.insert(CALLER, forwarding.caller.clone());
            if let Some(traceparent) = &forwarding.traceparent {
                metadata.insert(TRACEPARENT, traceparent.clone());
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
            grpc.ready().await.map_err(|error| {
                Status::unavailable(format!("worker {owner} is not reachable: {error}"))
            })?;
            // The coordinator's own server also ends the call at the caller's deadline, but
            // as CANCELLED ("Timeout expired", tonic's mapping); this timer, on the same
            // deadline and polled first, answers DEADLINE_EXCEEDED and names the worker,
            // whether it is called in place or over the network.
            let called = call(grpc, request, PathAndQuery::from_static(method.path));
            let called = match forwarding.deadline {
                Some(deadline) => tokio::time::timeout_at(deadline.into(), called)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Status::deadline_exceeded(format!(
                            "worker {owner} did not answer {} in time",
                            method.path
                        )))
                    }),
                None => called.await,
            };
            match called {
                Err(status) if !retried && is_not_owner(&status) => {
                    tracing::debug!(slot = forwarding.slot, worker_id = %owner, "worker is not the slot's owner, retrying with the current table");
                    retried = true;
                }
                Err(status)
                    if starting_retries < STARTING_RETRIES
                        && status.code() == Code::Unavailable
                        && status.metadata().contains_key(WORKER_STARTING) =>
                {
                    tracing::debug!(slot = forwarding.slot, worker_id = %owner, "worker is starting, retrying in a moment");
                    starting_retries += 1;
                    tokio::time::sleep(STARTING_RETRY_DELAY).await;
                }
                Err(status) => return Err(broken_forward(owner, status)),
                Ok(response) => return Ok((response, owner.clone())),
            }
        }
    }

    /// Forwards an internal call about `user_id` (UserStateService) to the owner of the
    /// user's slot, and decodes its reply. `caller` must cover the user.
    pub async fn forward_user_call<Req, Resp>(
        &self,
        path: &'static str,
        user_id: &str,
        caller: Option<&Caller>,
        metadata: &MetadataMap,
        request: &Req,
    ) -> Result<Resp, Status>
    where
        Req: prost::Message,
        Resp: prost::Message + Default,
    {
        let user_id = UserId::parse(user_id).map_err(CoordinatorError::from)?;
        Caller::check_user(caller, user_id.as_str())?;
        let forwarding = Forwarding {
            slot: slot_of(user_id.as_str(), self.membership.config().slot_count),
            token: None,
            deadline: deadline_of(metadata),
            caller: caller_value(caller),
            traceparent: metadata.get(TRACEPARENT).cloned(),
        };
        let method = Method {
            path,
            key: Key::User,
            streaming: false,
        };
        let message = RawMessage(request.encode_to_vec().into());
        let (response, worker) = self
            .forward(
                method,
                forwarding,
                message,
                async |mut grpc, request, path| grpc.unary(request, path, RawCodec).await,
            )
            .await?;
        Resp::decode(response.into_inner().0).map_err(|error| {
            Status::internal(format!(
                "worker {worker} answered {path} with an unreadable message: {error}"
            ))
        })
    }

    /// Asks every worker of the published table the internal call `path` at once, each
    /// within the caller's deadline (else [`ASK_EVERY_WORKER_WAIT`]), and returns each
    /// worker's answer.
    pub async fn ask_every_worker<Req, Resp>(
        self: &Arc<Self>,
        path: &'static str,
        metadata: &MetadataMap,
        request: &Req,
    ) -> Vec<(WorkerId, Result<Resp, Status>)>
    where
        Req: prost::Message,
        Resp: prost::Message + Default + 'static,
    {
        let routing = self.membership.routing();
        let wait = deadline_of(metadata)
            .map(|deadline| deadline.saturating_duration_since(Instant::now()))
            .unwrap_or(ASK_EVERY_WORKER_WAIT);
        let message = RawMessage(request.encode_to_vec().into());
        let traceparent = metadata.get(TRACEPARENT).cloned();
        let mut asked = tokio::task::JoinSet::new();
        for (worker, address) in &routing.addresses {
            let channel = self.channel(worker, address, &routing.addresses);
            let worker = worker.clone();
            let message = message.clone();
            let traceparent = traceparent.clone();
            let router = self.clone();
            asked.spawn(async move {
                let answer = async {
                    let mut grpc = tonic::client::Grpc::new(channel?)
                        .max_decoding_message_size(router.max_message_bytes);
                    let mut request = Request::new(message);
                    request.set_timeout(wait);
                    let metadata = request.metadata_mut();
                    metadata.insert(
                        NODE_CREDENTIAL,
                        node_credential(
                            &router.cluster_key,
                            NodeRole::Coordinator,
                            COORDINATOR_NODE_ID,
                            path,
                        ),
                    );
                    if let Some(traceparent) = traceparent {
                        metadata.insert(TRACEPARENT, traceparent);
                    }
                    grpc.ready().await.map_err(|error| {
                        Status::unavailable(format!("worker {worker} is not reachable: {error}"))
                    })?;
                    let response = grpc
                        .unary(request, PathAndQuery::from_static(path), RawCodec)
                        .await
                        .map_err(|status| broken_forward(&worker, status))?;
                    Resp::decode(response.into_inner().0).map_err(|error| {
                        Status::internal(format!(
                            "worker {worker} answered {path} with an unreadable message: {error}"
                        ))
                    })
                };
                let answer = match tokio::time::timeout(wait, answer).await {
                    Ok(answer) => answer,
                    Err(_) => Err(Status::deadline_exceeded(format!(
                        "worker {worker} did not answer {path} in time"
                    ))),
                };
                (worker, answer)
            });
        }
        let mut answers = Vec::with_capacity(asked.len());
        while let Some(joined) = asked.join_next().await {
            if let Ok(answer) = joined {
                answers.push(answer);
            }
        }
        answers.sort_by(|a, b| a.0.cmp(&b.0));
        answers
    }

    async fn unary(
        &self,
        method: Method,
        request: Request<RawMessage>,
    ) -> Result<Response<RawMessage>, Status> {
        let (metadata, extensions, message) = request.into_parts();
        let forwarding = self.route(method, &metadata, extensions.get::<Caller>(), &message)?;
        self.forward(
            method,
            forwarding,
            message,
            async |mut grpc, request, path| grpc.unary(request, path, RawCodec).await,
        )
        .await
        .map(|(response, _)| response)
    }

    /// The worker's stream is handed to the caller as it is: events flow through as the
    /// agent produces them.
    async fn server_streaming(
        &self,
        method: Method,
        request: Request<RawMessage>,
    ) -> Result<Response<EventStream>, Status> {
        let (metadata, extensions, message) = request.into_parts();
        let forwarding = self.route(method, &metadata, extensions.get::<Caller>(), &message)?;
        let (response, worker) = self
            .forward(
                method,
                forwarding,
                message,
                async |mut grpc, request, path| {
                    grpc.server_streaming(request, path, RawCodec).await
                },
            )
            .await?;
        // A stream broken midway (the worker died) ends with UNAVAILABLE too.
        Ok(response.map(|stream| {
            Box::pin(
                stream.map(move |event| event.map_err(|status| broken_forward(&worker, status))),
            ) as EventStream
        }))
    }
}

/// The events of a forwarded stream.
type EventStream = Pin<Box<dyn Stream<Item = Result<RawMessage, Status>> + Send>>;

/// A failure to reach or hear from `worker` (connect error, reset, HTTP/2 error) is
/// UNAVAILABLE naming it, which every retry policy retries; the worker's own statuses
/// (which carry no transport error as their source) pass unchanged.
fn broken_forward(worker: &WorkerId, status: Status) -> Status {
    if std::error::Error::source(&status).is_none() {
        return status;
    }
    Status::unavailable(format!(
        "the call to worker {worker} failed: {}; retry",
        status.message()
    ))
}

/// How often a call is tried again on a worker that is starting, and how far apart: a
/// worker's server is up within moments of its registration.
const STARTING_RETRIES: u32 = 20;
const STARTING_RETRY_DELAY: Duration = Duration::from_millis(25);

fn is_not_owner(status: &Status) -> bool {
    status.code() == Code::FailedPrecondition && status.metadata().contains_key(KNOWN_EPOCH)
}

/// The `switchyard.v1.SessionService` the coordinator serves: every method, forwarded.
#[derive(Clone)]
pub struct SessionProxy {
    router: Arc<Router>,
}

impl SessionProxy {
    pub fn new(router: Arc<Router>) -> Self {
        SessionProxy { router }
    }
}

impl NamedService for SessionProxy {
    const NAME: &'static str = "switchyard.v1.SessionService";
}

struct UnaryCall {
    router: Arc<Router>,
    method: Method,
}

impl UnaryService<RawMessage> for UnaryCall {
    type Response = RawMessage;
    type Future = BoxFuture<Response<RawMessage>, Status>;

    fn call(&mut self, request: Request<RawMessage>) -> Self::Future {
        let router = self.router.clone();
        let method = self.method;
        Box::pin(async move { router.unary(method, request).await })
    }
}

struct StreamingCall {
    router: Arc<Router>,
    method: Method,
}

impl ServerStreamingService<RawMessage> for StreamingCall {
    type Response = RawMessage;
    type ResponseStream = EventStream;
    type Future = BoxFuture<Response<EventStream>, Status>;

    fn call(&mut self, request: Request<RawMessage>) -> Self::Future {
        let router = self.router.clone();
        let method = self.method;
        Box::pin(async move { router.server_streaming(method, request).await })
    }
}

impl tower_service::Service<http::Request<Body>> for SessionProxy {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let router = self.router.clone();
        let method = METHODS
            .iter()
            .find(|method| method.path == request.uri().path())
            .copied();
        Box::pin(async move {
            let Some(method) = method else {
                return Ok(Status::unimplemented(format!(
                    "{} is not a method of switchyard.v1.SessionService",
                    request.uri().path()
                ))
                .into_http());
            };
            let mut grpc = Grpc::new(RawCodec)
                .max_decoding_message_size(router.max_message_bytes)
                .max_encoding_message_size(router.max_message_bytes);
            if method.streaming {
                Ok(grpc
                    .server_streaming(StreamingCall { router, method }, request)
                    .await)
            } else {
                Ok(grpc.unary(UnaryCall { router, method }, request).await)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::MembershipConfig;

    fn router(local: LocalNodes) -> Router {
        let membership = Arc::new(Membership::new(
            MembershipConfig {
                slot_count: 8,
                heartbeat_interval: Duration::from_millis(10),
                lease: Duration::from_secs(60),
                handoff_grace: Duration::from_secs(1),
                epsilon: 0.25,
                token_key_ids: vec!["key".into()],
                cluster_id: "cluster".into(),
                epoch_floor: switchyard_core::Epoch(0),
            },
            None,
            false,
        ));
        Router::new(
            membership,
            TokenKey::from_secret(&[1; 32]).unwrap(),
            ClusterKey::from_secret(&[2; 32]).unwrap(),
            1024,
            None,
            local,
        )
    }

    fn worker(id: &str) -> WorkerId {
        WorkerId::parse(id).unwrap()
    }

    #[tokio::test]
    async fn channels_of_workers_that_left_are_dropped() {
        let router = router(LocalNodes::new());
        let members = |ids: &[&str]| -> HashMap<WorkerId, String> {
            ids.iter()
                .map(|id| (worker(id), format!("127.0.0.1:{}", id.len())))
                .collect()
        };
        let all = members(&["a", "bb", "ccc"]);
        for id in ["a", "bb", "ccc"] {
            router
                .channel(&worker(id), &all[&worker(id)], &all)
                .unwrap();
        }
        assert_eq!(router.channel_count(), 3);
        // "a" and "bb" left; "dddd" joined.
        let now = members(&["ccc", "dddd"]);
        router
            .channel(&worker("dddd"), &now[&worker("dddd")], &now)
            .unwrap();
        assert_eq!(router.channel_count(), 2);
    }

    #[tokio::test]
    async fn a_worker_of_this_process_is_called_in_place() {
        let local = LocalNodes::new();
        // An address no socket answers: the call can only arrive in place.
        let address = "in-process.invalid:1";
        let shutdown = tokio_util::sync::CancellationToken::new();
        let listener = switchyard_server::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let serving = tokio::spawn(
            switchyard_server::GrpcServer::new()
                .with_local(local.clone(), address.to_string())
                .serve(listener, shutdown.clone()),
        );
        let router = router(local.clone());
        let members = HashMap::from([(worker("w"), address.to_string())]);
        let mut channel = None;
        for _ in 0..500 {
            if local.get(address).is_some() {
                channel = Some(router.channel(&worker("w"), address, &members).unwrap());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut grpc = tonic::client::Grpc::new(channel.expect("the worker lists itself"));
        grpc.ready().await.unwrap();
        // grpc.health.v1.HealthCheckRequest for the whole server: an empty message.
        let answer = grpc
            .unary(
                Request::new(RawMessage(Default::default())),
                PathAndQuery::from_static("/grpc.health.v1.Health/Check"),
                RawCodec,
            )
            .await
            .unwrap();
        // HealthCheckResponse { status: SERVING }.
        assert_eq!(&answer.into_inner().0[..], &[0x08, 0x01]);
        assert_eq!(router.channel_count(), 0, "no channel was made for it");

        shutdown.cancel();
        serving.await.unwrap().unwrap();
        // Stopped, it is reached (or not) through its address like any other worker.
        router.channel(&worker("w"), address, &members).unwrap();
        assert_eq!(router.channel_count(), 1);
    }
}
