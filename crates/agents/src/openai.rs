//! The `openai` backend: any OpenAI-compatible chat-completions server, streamed over SSE.
//!
//! The system prompt is built from the agent type's role, goal and instructions; usage comes
//! from the server's usage block (`stream_options.include_usage`). A 429 or 5xx answer, or a
//! connection that fails, is retried with exponential backoff (honouring `Retry-After`)
//! before anything was streamed; what still fails reaches the caller as RESOURCE_EXHAUSTED
//! (rate limited) or UNAVAILABLE, with the provider's message.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde_json::Value;
use switchyard_core::ContextMessage;
use switchyard_core::RetryPolicy;
use tokio::sync::mpsc;

use crate::{Agent, AgentError, AgentFactory, Usage};

/// The longest wait between two attempts, whatever `Retry-After` says.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    pub agent_type: String,
    /// e.g. `https://api.openai.com/v1`; `/chat/completions` is appended.
    pub base_url: String,
    pub model: String,
    /// The environment variable holding the API key; none for servers that need no key.
    pub api_key_env: Option<String>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<u32>,
    /// Built from the agent type's role, goal and instructions; empty for none.
    pub system_prompt: String,
    /// Bound on one whole request, streamed reply included.
    pub timeout: Duration,
    pub max_retries: u32,
    /// First backoff; each retry doubles it.
    pub backoff: Duration,
}

impl OpenAiConfig {
    /// The system prompt of an agent type.
    pub fn system_prompt(role: &str, goal: &str, instructions: &str) -> String {
        let mut parts = Vec::new();
        if !role.is_empty() {
            parts.push(format!("You are {role}."));
        }
        if !goal.is_empty() {
            parts.push(format!("Your goal: {goal}"));
        }
        if !instructions.is_empty() {
            parts.push(instructions.to_string());
        }
        parts.join("\n")
    }
}

#[async_trait]
impl AgentFactory for OpenAiConfig {
    async fn create(&self) -> Result<Box<dyn Agent>, AgentError> {
        let api_key = match &self.api_key_env {
            Some(variable) => Some(std::env::var(variable).map_err(|_| {
                AgentError::Backend(format!(
                    "agent type {}: the API key variable {variable} is not set",
                    self.agent_type
                ))
            })?),
            None => None,
        };
        Ok(Box::new(OpenAiAgent {
            config: Arc::new(self.clone()),
            client: shared_client()?,
            api_key,
        }))
    }
}

/// The HTTP client of every `openai` instance in the process. Building one loads the TLS
/// roots, which took longer than a turn, and gave each instance connections of its own; a
/// pool growing under load built dozens while turns waited. Each request carries its agent
/// type's timeout.
static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();

fn shared_client() -> Result<reqwest::Client, AgentError> {
    if let Some(client) = CLIENT.get() {
        return Ok(client.clone());
    }
    // One TLS stack for the process: rustls with ring, as sqlx uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .build()
        .map_err(|error| AgentError::Backend(format!("cannot build the HTTP client: {error}")))?;
    Ok(CLIENT.get_or_init(|| client).clone())
}

/// A chat-completions request, written as it goes out (no JSON tree built first).
#[derive(Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: Vec<ChatMessage<'a>>,
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
}

#[derive(Serialize)]
struct ChatMessage<'a> {
    role: &'a str,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

pub struct OpenAiAgent {
    config: Arc<OpenAiConfig>,
    client: reqwest::Client,
    api_key: Option<String>,
}

impl OpenAiAgent {
    fn body(&self, context: &[ContextMessage]) -> Result<Bytes, AgentError> {
        let system = (!self.config.system_prompt.is_empty()).then(|| ChatMessage {
            role: "system",
            content: &self.config.system_prompt,
            name: None,
        });
        let messages = system
            .into_iter()
            .chain(context.iter().map(|message| {
                ChatMessage {
                    role: message.role.as_str(),
                    content: &message.content,
                    name: (!message.name.is_empty() && message.role == switchyard_core::Role::User)
                        .then_some(message.name.as_str()),
                }
            }))
            .collect();
        let request = ChatRequest {
            model: &self.config.model,
            messages,
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
            temperature: self.config.temperature,
            max_tokens: self.config.max_tokens,
        };
        serde_json::to_vec(&request)
            .map(Bytes::from)
            .map_err(|error| AgentError::Failed(format!("cannot write the model request: {error}")))
    }

    /// Sends the request, retrying what is worth retrying.
    async fn send(&self, body: Bytes) -> Result<reqwest::Response, AgentError> {
        let url = format!(
            "{}/chat/completions",
            self.config.base_url.trim_end_matches('/')
        );
        let mut attempt = 0;
        loop {
            let mut request = self
                .client
                .post(&url)
                .timeout(self.config.timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            if let Some(key) = &self.api_key {
                request = request.bearer_auth(key);
            }
            let failure = match request.send().await {
                Ok(response) if response.status().is_success() => return Ok(response),
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|value| value.to_str().ok())
                        .and_then(retry_after);
                    let message = provider_message(response).await;
                    let retryable = status.as_u16() == 429 || status.is_server_error();
                    let error = if status.as_u16() == 429 {
                        AgentError::RateLimited(message)
                    } else {
                        AgentError::Failed(format!(
                            "{} answered {status}: {message}",
                            self.config.base_url
                        ))
                    };
                    if !retryable {
                        return Err(error);
                    }
                    (error, retry_after)
                }
                Err(error) => (
                    AgentError::Failed(format!("cannot reach {}: {error}", self.config.base_url)),
                    None,
                ),
            };
            let policy = RetryPolicy {
                attempts: self.config.max_retries.saturating_add(1),
                first_backoff: self.config.backoff,
                max_backoff: MAX_BACKOFF,
            };
            if !policy.allows(attempt) {
                return Err(failure.0);
            }
            // The server's word when it gave one, else the policy's jittered backoff.
            let backoff = failure
                .1
                .unwrap_or_else(|| policy.backoff(attempt))
                .min(MAX_BACKOFF);
            tracing::debug!(agent_type = %self.config.agent_type, attempt, ?backoff, error = %failure.0, "retrying the model call");
            tokio::time::sleep(backoff).await;
            attempt += 1;
        }
    }
}

/// The longest line of the model's event stream; a longer one ends the turn (a server
/// that never sends a newline cannot make the worker buffer without bound).
const MAX_SSE_LINE_BYTES: usize = 1024 * 1024;

/// Why the model's byte stream stopped.
#[derive(Debug, thiserror::Error)]
enum ByteStreamError {
    #[error("{0}")]
    Transport(#[from] reqwest::Error),
    #[error("a line of the event stream is over {0} bytes")]
    LineTooLong(usize),
}

/// `bytes`, failing once more than `limit` bytes come without a newline.
fn capped_lines(
    bytes: impl Stream<Item = Result<Bytes, reqwest::Error>>,
    limit: usize,
) -> impl Stream<Item = Result<Bytes, ByteStreamError>> {
    bytes.scan(0usize, move |since_newline, chunk| {
        let chunk = chunk.map_err(ByteStreamError::from).and_then(|chunk| {
            *since_newline = match chunk.iter().rposition(|byte| *byte == b'\n') {
                Some(last) => chunk.len() - last - 1,
                None => since_newline.saturating_add(chunk.len()),
            };
            if *since_newline > limit {
                return Err(ByteStreamError::LineTooLong(limit));
            }
            Ok(chunk)
        });
        std::future::ready(Some(chunk))
    })
}

/// When a `Retry-After` header says to retry: seconds, or an HTTP date.
fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The `error.message` of an OpenAI-style error body, or the body itself, shortened.
async fn provider_message(response: reqwest::Response) -> String {
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|body| body["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(text);
    message.chars().take(500).collect()
}

#[async_trait]
impl Agent for OpenAiAgent {
    async fn run_turn(
        &mut self,
        context: &[ContextMessage],
        deltas: &mpsc::Sender<String>,
    ) -> Result<Usage, AgentError> {
        let started = Instant::now();
        let response = self.send(self.body(context)?).await?;
        let mut usage = Usage::default();
        let mut events = capped_lines(response.bytes_stream(), MAX_SSE_LINE_BYTES).eventsource();
        while let Some(event) = events.next().await {
            let event = event.map_err(|error| {
                AgentError::Failed(format!("the model's stream broke off: {error}"))
            })?;
            {
                let data = event.data.trim();
                if data == "[DONE]" {
                    usage.compute_seconds = started.elapsed().as_secs_f64();
                    return Ok(usage);
                }
                let Ok(event) = serde_json::from_str::<Value>(data) else {
                    return Err(AgentError::Failed(format!(
                        "the model sent an event that is not JSON: {}",
                        data.chars().take(120).collect::<String>()
                    )));
                };
                if let Some(message) = event["error"]["message"].as_str() {
                    return Err(AgentError::Failed(message.chars().take(500).collect()));
                }
                if let Some(text) = event["choices"][0]["delta"]["content"].as_str()
                    && !text.is_empty()
                {
                    deltas
                        .send(text.to_string())
                        .await
                        .map_err(|_| AgentError::Cancelled)?;
                }
                if event["usage"].is_object() {
                    usage.prompt_tokens = event["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
                    usage.completion_tokens =
                        event["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                }
            }
        }
        Err(AgentError::Failed(
            "the model's stream ended without [DONE]".into(),
        ))
    }

    async fn reset(&mut self) {}
}
