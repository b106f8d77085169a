//! The `process` backend: a long-lived program of any language speaking JSON lines on its
//! standard input and output (docs/agent-protocol.md). Its standard error goes to the log.

use std::process::Stdio;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use switchyard_core::ContextMessage;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;

use crate::{Agent, AgentError, AgentFactory, Usage};

/// Longest line an agent process may write.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

/// How to start one instance.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// The agent type, for the log.
    pub agent_type: String,
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// How long a new (or reset) instance may take to say it is ready.
    pub ready_timeout: Duration,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Request<'a> {
    Turn {
        id: u64,
        context: Vec<WireMessage<'a>>,
    },
    Reset,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    seq: u64,
    role: &'static str,
    content: &'a str,
    name: &'a str,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event {
    Ready,
    Delta {
        id: u64,
        text: String,
    },
    Done {
        id: u64,
        #[serde(default)]
        usage: WireUsage,
    },
    Error {
        id: u64,
        message: String,
        #[serde(default)]
        fatal: bool,
    },
}

#[derive(Deserialize, Default)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

#[async_trait]
impl AgentFactory for ProcessConfig {
    async fn create(&self) -> Result<Box<dyn Agent>, AgentError> {
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| {
                AgentError::Backend(format!(
                    "cannot start {} for agent type {}: {error}",
                    self.program, self.agent_type
                ))
            })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(AgentError::Backend("the agent process has no pipes".into()));
        };
        let agent_type = self.agent_type.clone();
        let pid = child.id().unwrap_or_default();
        tokio::spawn(log_stderr(stderr, agent_type, pid));
        let mut agent = ProcessAgent {
            agent_type: self.agent_type.clone(),
            child,
            stdin,
            stdout: BufReader::new(stdout),
            next_turn: 1,
            ready_timeout: self.ready_timeout,
            broken: None,
        };
        agent.wait_ready().await?;
        Ok(Box::new(agent))
    }
}

pub struct ProcessAgent {
    agent_type: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    next_turn: u64,
    ready_timeout: Duration,
    /// Why the instance can no longer be used, once it cannot.
    broken: Option<String>,
}

impl ProcessAgent {
    fn broken(&mut self, reason: String) -> AgentError {
        let reason = format!("agent process of {} is broken: {reason}", self.agent_type);
        self.broken = Some(reason.clone());
        AgentError::Backend(reason)
    }

    async fn send(&mut self, request: &Request<'_>) -> Result<(), AgentError> {
        let mut line = serde_json::to_vec(request)
            .map_err(|error| AgentError::Backend(format!("cannot encode a request: {error}")))?;
        line.push(b'\n');
        if let Err(error) = self.stdin.write_all(&line).await {
            return Err(self.broken(format!("cannot write to it: {error}")));
        }
        if let Err(error) = self.stdin.flush().await {
            return Err(self.broken(format!("cannot write to it: {error}")));
        }
        Ok(())
    }

    async fn next_event(&mut self) -> Result<Event, AgentError> {
        // A line longer than this is a runaway program, not a message: the worker's memory
        // is not its to take.
        let mut line = Vec::new();
        let read = (&mut self.stdout)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .await;
        match read {
            Ok(0) => {
                let status = self.child.try_wait().ok().flatten();
                Err(self.broken(format!(
                    "it exited{}",
                    status
                        .map(|status| format!(" ({status})"))
                        .unwrap_or_default()
                )))
            }
            Ok(_) if line.len() > MAX_LINE_BYTES => Err(self.broken(format!(
                "it wrote a line longer than {MAX_LINE_BYTES} bytes"
            ))),
            Ok(_) => serde_json::from_slice(&line).map_err(|error| {
                let shown: String = String::from_utf8_lossy(&line).chars().take(120).collect();
                self.broken(format!(
                    "it wrote {shown:?}, which is not a protocol message: {error}"
                ))
            }),
            Err(error) => Err(self.broken(format!("cannot read from it: {error}"))),
        }
    }

    /// Waits for `ready`, skipping what is left of an abandoned turn.
    async fn wait_ready(&mut self) -> Result<(), AgentError> {
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(remaining, self.next_event()).await {
                Ok(Ok(Event::Ready)) => return Ok(()),
                Ok(Ok(_)) => continue,
                Ok(Err(error)) => return Err(error),
                Err(_) => {
                    return Err(self.broken(format!("not ready within {:?}", self.ready_timeout)));
                }
            }
        }
    }
}

#[async_trait]
impl Agent for ProcessAgent {
    async fn run_turn(
        &mut self,
        context: &[ContextMessage],
        deltas: &mpsc::Sender<String>,
    ) -> Result<Usage, AgentError> {
        if let Some(reason) = &self.broken {
            return Err(AgentError::Backend(reason.clone()));
        }
        let started = Instant::now();
        let id = self.next_turn;
        self.next_turn += 1;
        let context = context
            .iter()
            .map(|message| WireMessage {
                seq: message.seq,
                role: message.role.as_str(),
                content: &message.content,
                name: &message.name,
            })
            .collect();
        self.send(&Request::Turn { id, context }).await?;
        loop {
            match self.next_event().await? {
                Event::Delta { id: turn, text } if turn == id => {
                    deltas.send(text).await.map_err(|_| AgentError::Cancelled)?;
                }
                Event::Done { id: turn, usage } if turn == id => {
                    return Ok(Usage {
                        prompt_tokens: usage.prompt_tokens,
                        completion_tokens: usage.completion_tokens,
                        compute_seconds: started.elapsed().as_secs_f64(),
                    });
                }
                Event::Error {
                    id: turn,
                    message,
                    fatal,
                } if turn == id => {
                    if fatal {
                        return Err(self.broken(message));
                    }
                    return Err(AgentError::Failed(message));
                }
                // Events of an earlier, abandoned turn, or a stray ready.
                _ => continue,
            }
        }
    }

    async fn reset(&mut self) {
        if self.broken.is_some() {
            return;
        }
        if self.send(&Request::Reset).await.is_ok() {
            let _ = self.wait_ready().await;
        }
    }

    fn is_broken(&self) -> bool {
        self.broken.is_some()
    }
}

/// The longest stderr line logged; the rest of a longer one is dropped.
const MAX_STDERR_LINE_BYTES: usize = 8 * 1024;

/// Logs the agent's stderr a line at a time, each at most [`MAX_STDERR_LINE_BYTES`], so a
/// program that writes without newlines cannot make the worker buffer without bound.
async fn log_stderr(stderr: tokio::process::ChildStderr, agent_type: String, pid: u32) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::with_capacity(256);
    let limit = MAX_STDERR_LINE_BYTES as u64 + 1;
    loop {
        line.clear();
        match (&mut reader).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let ended = line.last() == Some(&b'\n');
        let shown = String::from_utf8_lossy(&line[..line.len().min(MAX_STDERR_LINE_BYTES)]);
        let shown = shown.trim_end();
        if ended || line.len() <= MAX_STDERR_LINE_BYTES {
            tracing::info!(agent_type = %agent_type, pid, "{shown}");
            continue;
        }
        tracing::info!(agent_type = %agent_type, pid, "{shown} … (line cut at {MAX_STDERR_LINE_BYTES} bytes)");
        // Skip the rest of the line, a bounded piece at a time.
        loop {
            line.clear();
            match (&mut reader).take(limit).read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) if line.last() == Some(&b'\n') => break,
                Ok(_) => {}
            }
        }
    }
}
