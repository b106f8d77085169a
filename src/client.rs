//! `SwitchyardClient`: the Rust SDK for calling services.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status, Streaming};

use crate::metadata::{AUTHORIZATION, SESSION_TOKEN};
use crate::pb;
use crate::pb::session_service_client::SessionServiceClient;
use crate::retry::{RetryPolicy, run};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint {endpoint:?}: {source}")]
    InvalidEndpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("the API key holds characters that cannot be sent in metadata")]
    InvalidApiKey,
    #[error("TLS for {endpoint}: {source}")]
    Tls {
        endpoint: String,
        source: crate::tls::TlsError,
    },
}

/// A reply collected from a `SendMessage` stream.
#[derive(Debug, Clone)]
pub struct TurnReply {
    /// The deltas, joined.
    pub text: String,
    /// How many deltas the reply came in.
    pub delta_count: usize,
    pub done: pb::TurnDone,
}

/// A client of `switchyard.v1.SessionService` that keeps the token of every session it
/// created (or was given with [`SwitchyardClient::set_token`]) and attaches it for you.
///
/// Cloning is cheap and clones share the token store.
#[derive(Clone)]
pub struct SwitchyardClient {
    inner: SessionServiceClient<Channel>,
    tokens: Arc<RwLock<HashMap<String, String>>>,
    timeout: Option<Duration>,
    /// `Bearer <key>`, sent on every call.
    authorization: Option<AsciiMetadataValue>,
    retry: RetryPolicy,
}

impl SwitchyardClient {
    /// Connects to a coordinator (or a worker), for example `http://127.0.0.1:50051`.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, ClientError> {
        let endpoint = endpoint.into();
        let channel = Endpoint::from_shared(endpoint.clone())
            .map_err(|source| ClientError::InvalidEndpoint {
                endpoint: endpoint.clone(),
                source,
            })?
            .connect()
            .await
            .map_err(|source| ClientError::Connect { endpoint, source })?;
        Ok(Self::new(channel))
    }

    /// Connects to a coordinator that serves TLS (`https://HOST:PORT`), trusting the CA
    /// certificate in `ca_file` (PEM), for example `switchyard-data/tls/ca.pem` of
    /// `switchyard dev --tls`. The connection is made at the first call.
    pub async fn connect_tls(
        endpoint: impl Into<String>,
        ca_file: impl AsRef<std::path::Path>,
    ) -> Result<Self, ClientError> {
        let endpoint = endpoint.into();
        let tls_error = |source| ClientError::Tls {
            endpoint: endpoint.clone(),
            source,
        };
        let tls = crate::tls::ClientTlsFiles {
            ca: ca_file.as_ref().to_path_buf(),
            identity: None,
        }
        .load()
        .map_err(tls_error)?;
        let channel = crate::tls::lazy_channel(&endpoint, Some(tls), |endpoint| endpoint)
            .map_err(tls_error)?;
        Ok(Self::new(channel))
    }

    pub fn new(channel: Channel) -> Self {
        SwitchyardClient {
            inner: SessionServiceClient::new(channel)
                .max_decoding_message_size(switchyard_core::session::MAX_GRPC_MESSAGE_BYTES)
                .max_encoding_message_size(switchyard_core::session::MAX_GRPC_MESSAGE_BYTES),
            tokens: Arc::default(),
            timeout: None,
            authorization: None,
            retry: RetryPolicy::default(),
        }
    }

    /// How calls that are safe to repeat are retried after UNAVAILABLE (see
    /// [`RetryPolicy`]); `RetryPolicy::never()` turns retries off.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sends `key` as `authorization: Bearer <key>` on every call (a coordinator with API
    /// keys configured refuses calls without one).
    pub fn with_api_key(mut self, key: &str) -> Result<Self, ClientError> {
        let value = AsciiMetadataValue::try_from(format!("Bearer {key}"))
            .map_err(|_| ClientError::InvalidApiKey)?;
        self.authorization = Some(value);
        Ok(self)
    }

    /// Sets a deadline on every call (sent as `grpc-timeout` and honoured end to end).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Remembers the token of a session created elsewhere.
    pub fn set_token(&self, session_id: impl Into<String>, token: impl Into<String>) {
        self.tokens
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(session_id.into(), token.into());
    }

    /// The token this client holds for a session.
    pub fn token(&self, session_id: &str) -> Option<String> {
        self.tokens
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(session_id)
            .cloned()
    }

    fn forget_token(&self, session_id: &str) {
        self.tokens
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(session_id);
    }

    /// Forgets the token of a session the server no longer has (ended, evicted or expired)
    /// or whose token has expired, so the map holds only sessions that can still be used.
    fn forget_if_gone<T>(&self, session_id: &str, result: Result<T, Status>) -> Result<T, Status> {
        if let Err(status) = &result {
            let gone = status.code() == tonic::Code::NotFound
                || (status.code() == tonic::Code::Unauthenticated
                    && status.message().contains("expired"));
            if gone {
                self.forget_token(session_id);
            }
        }
        result
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(timeout) = self.timeout {
            request.set_timeout(timeout);
        }
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert(AUTHORIZATION, authorization.clone());
        }
        request
    }

    fn session_request<T>(&self, session_id: &str, message: T) -> Request<T> {
        let mut request = self.request(message);
        if let Some(token) = self.token(session_id) {
            // A token this client stored always parses; skip it rather than panic if not.
            if let Ok(value) = MetadataValue::try_from(token.as_str()) {
                request.metadata_mut().insert(SESSION_TOKEN, value);
            }
        }
        request
    }

    /// Creates a session and keeps its token. Sessions evicted to make room are forgotten.
    pub async fn create_session<K, V>(
        &self,
        user_id: &str,
        metadata: impl IntoIterator<Item = (K, V)>,
    ) -> Result<pb::CreateSessionResponse, Status>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let message = pb::CreateSessionRequest {
            user_id: user_id.to_string(),
            metadata: metadata
                .into_iter()
                .map(|(key, value)| (key.into(), value.into()))
                .collect(),
            double_text: String::new(),
        };
        self.create_session_from(message).await
    }

    /// Creates a session from a full request (to choose its double-text policy, say) and
    /// keeps its token.
    pub async fn create_session_from(
        &self,
        message: pb::CreateSessionRequest,
    ) -> Result<pb::CreateSessionResponse, Status> {
        let response = self
            .inner
            .clone()
            .create_session(self.request(message))
            .await?
            .into_inner();
        if let Some(session) = &response.session {
            self.set_token(session.session_id.clone(), response.token.clone());
        }
        for evicted in &response.evicted_session_ids {
            self.forget_token(evicted);
        }
        Ok(response)
    }

    pub async fn get_session(&self, session_id: &str) -> Result<pb::Session, Status> {
        let message = pb::GetSessionRequest {
            session_id: session_id.to_string(),
        };
        let result = run(&self.retry, || async {
            let request = self.session_request(session_id, message.clone());
            Ok(self.inner.clone().get_session(request).await?.into_inner())
        })
        .await;
        self.forget_if_gone(session_id, result)
    }

    /// Every live session of a user, oldest first (following the pages).
    pub async fn list_sessions(&self, user_id: &str) -> Result<Vec<pb::Session>, Status> {
        let mut sessions: Vec<pb::Session> = Vec::new();
        loop {
            let message = pb::ListSessionsRequest {
                user_id: user_id.to_string(),
                after_session_id: sessions
                    .last()
                    .map(|session| session.session_id.clone())
                    .unwrap_or_default(),
            };
            let page = run(&self.retry, || async {
                Ok(self
                    .inner
                    .clone()
                    .list_sessions(self.request(message.clone()))
                    .await?
                    .into_inner())
            })
            .await?;
            let empty = page.sessions.is_empty();
            sessions.extend(page.sessions);
            if !page.truncated || empty {
                return Ok(sessions);
            }
        }
    }

    /// Ends a session; returns false when it had already ended.
    pub async fn end_session(&self, session_id: &str) -> Result<bool, Status> {
        let message = pb::EndSessionRequest {
            session_id: session_id.to_string(),
        };
        let ended = run(&self.retry, || async {
            let request = self.session_request(session_id, message.clone());
            Ok(self
                .inner
                .clone()
                .end_session(request)
                .await?
                .into_inner()
                .ended)
        })
        .await?;
        self.forget_token(session_id);
        Ok(ended)
    }

    /// Asks for a new token for the session (valid for the token TTL from now), keeps it
    /// for the session's next calls, and returns it with its expiry.
    pub async fn refresh_token(
        &self,
        session_id: &str,
    ) -> Result<pb::RefreshTokenResponse, Status> {
        let message = pb::RefreshTokenRequest {
            session_id: session_id.to_string(),
        };
        let refreshed = run(&self.retry, || async {
            let request = self.session_request(session_id, message.clone());
            Ok(self
                .inner
                .clone()
                .refresh_token(request)
                .await?
                .into_inner())
        })
        .await?;
        self.set_token(session_id.to_string(), refreshed.token.clone());
        Ok(refreshed)
    }

    /// Appends messages and returns the sequence number of the last one.
    pub async fn append_context(
        &self,
        session_id: &str,
        messages: Vec<pb::Message>,
    ) -> Result<u64, Status> {
        let request_id = new_request_id();
        self.append_context_with_id(session_id, messages, Some(&request_id))
            .await
    }

    /// Appends with the caller's request id (retried after UNAVAILABLE with the same id,
    /// so it lands once), or with none (sent once, never retried: a retry could land twice).
    pub async fn append_context_with_id(
        &self,
        session_id: &str,
        messages: Vec<pb::Message>,
        request_id: Option<&str>,
    ) -> Result<u64, Status> {
        let message = pb::AppendContextRequest {
            session_id: session_id.to_string(),
            messages,
            request_id: request_id.unwrap_or_default().to_string(),
        };
        let append = || async {
            let request = self.session_request(session_id, message.clone());
            Ok(self
                .inner
                .clone()
                .append_context(request)
                .await?
                .into_inner()
                .last_seq)
        };
        let result = match request_id {
            Some(_) => run(&self.retry, append).await,
            None => append().await,
        };
        self.forget_if_gone(session_id, result)
    }

    /// Reads the context: the last `last_n` messages after `after_seq` (0 and 0 for all),
    /// following the pages.
    pub async fn get_context(
        &self,
        session_id: &str,
        last_n: u32,
        after_seq: u64,
    ) -> Result<Vec<pb::ContextMessage>, Status> {
        let mut page = self.get_context_page(session_id, last_n, after_seq).await?;
        let mut messages = std::mem::take(&mut page.messages);
        while page.truncated {
            let Some(last_seq) = messages.last().map(|message| message.seq) else {
                break;
            };
            page = self.get_context_page(session_id, 0, last_seq).await?;
            if page.messages.is_empty() {
                break;
            }
            messages.append(&mut page.messages);
        }
        Ok(messages)
    }

    /// One page of a context (see `GetContext`): `truncated` says whether more follow.
    pub async fn get_context_page(
        &self,
        session_id: &str,
        last_n: u32,
        after_seq: u64,
    ) -> Result<pb::GetContextResponse, Status> {
        let message = pb::GetContextRequest {
            session_id: session_id.to_string(),
            last_n,
            after_seq,
        };
        let result = run(&self.retry, || async {
            let request = self.session_request(session_id, message.clone());
            Ok(self.inner.clone().get_context(request).await?.into_inner())
        })
        .await;
        self.forget_if_gone(session_id, result)
    }

    /// Starts a turn with a new request id (the call that starts it is retried after
    /// UNAVAILABLE with that id) and returns the stream of its events.
    pub async fn send_message(
        &self,
        session_id: &str,
        agent_type: &str,
        content: &str,
    ) -> Result<Streaming<pb::TurnEvent>, Status> {
        let request_id = new_request_id();
        self.send_message_with_id(session_id, agent_type, content, Some(&request_id))
            .await
    }

    /// Starts a turn with the caller's request id (retried after UNAVAILABLE), or with
    /// none (sent once).
    pub async fn send_message_with_id(
        &self,
        session_id: &str,
        agent_type: &str,
        content: &str,
        request_id: Option<&str>,
    ) -> Result<Streaming<pb::TurnEvent>, Status> {
        let message = pb::SendMessageRequest {
            session_id: session_id.to_string(),
            agent_type: agent_type.to_string(),
            content: content.to_string(),
            request_id: request_id.unwrap_or_default().to_string(),
        };
        let start = || async {
            let request = self.session_request(session_id, message.clone());
            Ok(self.inner.clone().send_message(request).await?.into_inner())
        };
        let result = match request_id {
            Some(_) => run(&self.retry, start).await,
            None => start().await,
        };
        self.forget_if_gone(session_id, result)
    }

    /// Runs a turn and waits for the whole reply. A turn whose stream fails with
    /// UNAVAILABLE is sent again with the same request id: the reply it had committed is
    /// replayed whole, or it runs again if it had not.
    pub async fn send_message_collect(
        &self,
        session_id: &str,
        agent_type: &str,
        content: &str,
    ) -> Result<TurnReply, Status> {
        self.send_message_collect_with_id(session_id, agent_type, content, &new_request_id())
            .await
    }

    /// Runs a turn to its end with the caller's request id, retried after UNAVAILABLE with
    /// that id. Sent again later with the same id, a turn that committed is replayed, and one
    /// that did not runs again (on its user message, if that was committed).
    pub async fn send_message_collect_with_id(
        &self,
        session_id: &str,
        agent_type: &str,
        content: &str,
        request_id: &str,
    ) -> Result<TurnReply, Status> {
        let result = run(&self.retry, || {
            self.collect_turn(session_id, agent_type, content, request_id)
        })
        .await;
        self.forget_if_gone(session_id, result)
    }

    async fn collect_turn(
        &self,
        session_id: &str,
        agent_type: &str,
        content: &str,
        request_id: &str,
    ) -> Result<TurnReply, Status> {
        let message = pb::SendMessageRequest {
            session_id: session_id.to_string(),
            agent_type: agent_type.to_string(),
            content: content.to_string(),
            request_id: request_id.to_string(),
        };
        let request = self.session_request(session_id, message);
        let mut stream = self.inner.clone().send_message(request).await?.into_inner();
        let mut text = String::new();
        let mut delta_count = 0;
        while let Some(event) = stream.message().await? {
            match event.event {
                Some(pb::turn_event::Event::Delta(delta)) => {
                    text.push_str(&delta.text);
                    delta_count += 1;
                }
                Some(pb::turn_event::Event::Done(done)) => {
                    // Read the stream to its end (the server closes it right after), so the
                    // stream is not reset: many resets make HTTP/2 refuse the connection.
                    while stream.message().await?.is_some() {}
                    return Ok(TurnReply {
                        text,
                        delta_count,
                        done,
                    });
                }
                None => {}
            }
        }
        Err(Status::unavailable(
            "the turn's stream ended before its final event",
        ))
    }
}

/// A new request id: a random UUID.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
