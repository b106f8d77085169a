//! A local OpenAI-compatible chat-completions server that answers every request after a
//! fixed delay, so that the `openai` backend can be measured against a model whose own
//! time to first token is known. HTTP/1.1 with keep-alive; each reply is a stream of
//! server-sent events (a few content deltas, a usage block, `[DONE]`), sent chunked. The
//! first delta states how long the server held the request, which first-delta runs take
//! out of what they report.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_agents::{OpenAiConfig, PoolConfig};
use switchyard_core::ContextWindow;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// The agent type bench adds for the server.
pub const AGENT_TYPE: &str = "fixed-delay-llm";
/// Content deltas per reply.
const DELTAS: usize = 4;
/// Opens the first delta: `[held 20117us] `.
const HELD_TAG: &str = "[held ";

/// A time to a first delta, less the time the model held the request when the delta says
/// (this server's replies do); as it is otherwise.
pub fn less_model_time(elapsed: Duration, first_delta: &str) -> Duration {
    elapsed.saturating_sub(model_time(first_delta).unwrap_or_default())
}

/// How long the model held the request before it answered, from the first delta of one of
/// its replies; none for a delta that is not its first (or another model's).
fn model_time(first_delta: &str) -> Option<Duration> {
    let micros = first_delta
        .strip_prefix(HELD_TAG)?
        .split_once("us]")?
        .0
        .parse()
        .ok()?;
    Some(Duration::from_micros(micros))
}

/// A running server; stops when dropped.
pub struct FixedDelayLlm {
    pub base_url: String,
    stop: CancellationToken,
}

impl FixedDelayLlm {
    /// Listens on `address`, or on a free port of 127.0.0.1.
    pub async fn start(delay: Duration, address: Option<SocketAddr>) -> std::io::Result<Self> {
        let address = address.unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        let listener = TcpListener::bind(address).await.map_err(|error| {
            std::io::Error::new(
                error.kind(),
                format!("the fixed-delay model cannot listen on {address}: {error}"),
            )
        })?;
        let base_url = format!("http://{}/v1", listener.local_addr()?);
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((socket, _)) => {
                            let _ = socket.set_nodelay(true);
                            tokio::spawn(serve(socket, delay));
                        }
                        Err(error) => tracing::warn!(%error, "the fixed-delay model cannot accept"),
                    },
                }
            }
        });
        Ok(FixedDelayLlm { base_url, stop })
    }

    /// The `openai` agent type that talks to this server, and its pool. A turn sends it the
    /// newest `context_messages` of its session, as many as a first-delta run's agent alone
    /// is given: a session's history grows during a run, and a longer context would make
    /// the turns through the cluster serialize, send and read more than the agent alone.
    pub fn agent(&self, context_messages: usize) -> (Arc<OpenAiConfig>, PoolConfig) {
        let config = OpenAiConfig {
            agent_type: AGENT_TYPE.to_string(),
            base_url: self.base_url.clone(),
            model: "fixed-delay".to_string(),
            api_key_env: None,
            temperature: None,
            max_tokens: None,
            system_prompt: String::new(),
            timeout: Duration::from_secs(60),
            max_retries: 0,
            backoff: Duration::from_millis(100),
        };
        let pool = PoolConfig {
            max: 256,
            context_window: ContextWindow {
                max_messages: context_messages,
                ..ContextWindow::default()
            },
            ..PoolConfig::default()
        };
        (Arc::new(config), pool)
    }
}

impl Drop for FixedDelayLlm {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Answers the requests of one connection, one after another.
async fn serve(socket: TcpStream, delay: Duration) {
    let (reader, mut writer) = socket.into_split();
    let mut reader = BufReader::new(reader);
    loop {
        let mut content_length = 0usize;
        let mut line = String::new();
        // The head, to its empty line.
        loop {
            line.clear();
            match reader.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if let Some((name, value)) = trimmed.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; content_length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let received = Instant::now();
        tokio::time::sleep(delay).await;
        if reply(&mut writer, received.elapsed()).await.is_err() {
            return;
        }
    }
}

/// The first delta opens with the time the model held the request, as it measured it, so
/// that a first-delta run can take the model's own time (its delay, and however late its
/// timer fired) out of what it reports: see [`less_model_time`].
async fn reply(
    writer: &mut tokio::net::tcp::OwnedWriteHalf,
    held: Duration,
) -> std::io::Result<()> {
    writer
        .write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        .await?;
    let mut events: Vec<String> = (0..DELTAS)
        .map(|index| {
            let held = if index == 0 {
                format!("{HELD_TAG}{}us] ", held.as_micros())
            } else {
                String::new()
            };
            format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{held}token{index} \"}}}}]}}\n\n"
            )
        })
        .collect();
    events.push(format!(
        "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":10,\"completion_tokens\":{DELTAS}}}}}\n\n"
    ));
    events.push("data: [DONE]\n\n".to_string());
    for event in events {
        writer
            .write_all(format!("{:x}\r\n{event}\r\n", event.len()).as_bytes())
            .await?;
        writer.flush().await?;
    }
    writer.write_all(b"0\r\n\r\n").await?;
    writer.flush().await
}
