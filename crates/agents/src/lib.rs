//! Agent backends.

pub mod config;
mod echo;
mod openai;
mod pool;
mod process;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchyard_core::{ContextMessage, ErrorCode, ServiceError};
use tokio::sync::mpsc;

pub use echo::{EchoAgent, EchoConfig};
pub use openai::{OpenAiAgent, OpenAiConfig};
pub use pool::{
    AgentPool, DEFAULT_MAX_REPLY_TOKENS, DEFAULT_SLOW_TURN, PoolConfig, PoolStats, PooledAgent,
    TokenPrice,
};
pub use process::{ProcessAgent, ProcessConfig};

/// What a turn consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub compute_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("agent_type: unknown agent type {name:?}; known agent types: {known}")]
    UnknownAgentType { name: String, known: String },
    /// The reply grew past the longest a turn may commit.
    #[error(
        "agent {agent_type} replied with more than {limit} bytes, the most a reply may hold; the turn ended and committed no reply"
    )]
    ReplyTooLong { agent_type: String, limit: usize },
    /// The reply holds what no store can keep.
    #[error(
        "agent {agent_type} replied with a NUL character, which a reply may not hold; the turn ended and committed no reply"
    )]
    ReplyNotStorable { agent_type: String },
    /// The receiver of the deltas went away: the caller cancelled the turn.
    #[error("turn cancelled by the caller")]
    Cancelled,
    /// The instance cannot be used again (its process died, or it failed fatally).
    #[error("agent backend failed: {0}")]
    Backend(String),
    /// The turn failed but the instance is sound.
    #[error("the agent failed the turn: {0}")]
    Failed(String),
    /// The model provider is rate limiting us, still after the retries.
    #[error("the model provider is rate limiting: {0}")]
    RateLimited(String),
    #[error(
        "no {agent_type} agent was free after waiting {waited:?} (its pool holds at most {max}); retry later"
    )]
    PoolExhausted {
        agent_type: String,
        waited: Duration,
        max: usize,
    },
}

impl ServiceError for AgentError {
    fn error_code(&self) -> ErrorCode {
        match self {
            AgentError::UnknownAgentType { .. } => ErrorCode::InvalidArgument,
            AgentError::ReplyTooLong { .. } => ErrorCode::ResourceExhausted,
            AgentError::ReplyNotStorable { .. } => ErrorCode::Internal,
            AgentError::Cancelled => ErrorCode::Cancelled,
            AgentError::Backend(_) | AgentError::Failed(_) => ErrorCode::Unavailable,
            AgentError::PoolExhausted { .. } | AgentError::RateLimited(_) => {
                ErrorCode::ResourceExhausted
            }
        }
    }

    fn field_violation(&self) -> Option<(&str, &str)> {
        match self {
            AgentError::UnknownAgentType { .. } => {
                Some(("agent_type", "is not a known agent type"))
            }
            _ => None,
        }
    }
}

/// One agent instance. A turn runs on the session's context, which already ends with the
/// user message, and streams reply text through `deltas`.
#[async_trait]
pub trait Agent: Send {
    async fn run_turn(
        &mut self,
        context: &[ContextMessage],
        deltas: &mpsc::Sender<String>,
    ) -> Result<Usage, AgentError>;

    /// Forgets any state of the last turn, before the instance serves another session.
    async fn reset(&mut self);

    /// True once the instance must not be used again (checked after every reset).
    fn is_broken(&self) -> bool {
        false
    }
}

/// Makes instances of one agent type (starting a process, opening a client, …).
#[async_trait]
pub trait AgentFactory: Send + Sync {
    async fn create(&self) -> Result<Box<dyn Agent>, AgentError>;
}

/// The agent types a worker can run, each with its pool. Cloning shares the pools.
#[derive(Clone, Default)]
pub struct AgentCatalog {
    pools: BTreeMap<String, AgentPool>,
}

impl std::fmt::Debug for AgentCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.pools.keys()).finish()
    }
}

impl AgentCatalog {
    /// A catalog that knows the built-in `echo` agent.
    pub fn with_builtin() -> Self {
        let mut catalog = AgentCatalog::default();
        catalog.register(
            "echo",
            Arc::new(EchoConfig::default()),
            PoolConfig::default(),
        );
        catalog
    }

    pub fn register(
        &mut self,
        name: impl Into<String>,
        factory: Arc<dyn AgentFactory>,
        config: PoolConfig,
    ) {
        let name = name.into();
        self.pools
            .insert(name.clone(), AgentPool::new(name, factory, config));
    }

    /// The pool of an agent type; an unknown type is an invalid argument naming the known ones.
    pub fn pool(&self, name: &str) -> Result<&AgentPool, AgentError> {
        self.pools
            .get(name)
            .ok_or_else(|| AgentError::UnknownAgentType {
                name: name.chars().take(64).collect(),
                known: self.pools.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    pub fn pools(&self) -> impl Iterator<Item = &AgentPool> {
        self.pools.values()
    }

    /// Keeps every pool at its minimum and reaps idle instances, until `stop` resolves.
    pub async fn maintain(&self, stop: impl std::future::Future<Output = ()>) {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    for pool in self.pools.values() {
                        pool.reap_idle();
                        let stats = pool.stats();
                        let agent_type = pool.agent_type().to_string();
                        metrics::gauge!("switchyard_agent_pool_instances", "agent_type" => agent_type.clone(), "state" => "idle")
                            .set(stats.idle as f64);
                        metrics::gauge!("switchyard_agent_pool_instances", "agent_type" => agent_type.clone(), "state" => "busy")
                            .set(stats.live.saturating_sub(stats.idle) as f64);
                        metrics::gauge!("switchyard_agent_pool_waiters", "agent_type" => agent_type)
                            .set(stats.waiting as f64);
                        if let Err(error) = pool.fill_to_min().await {
                            tracing::warn!(agent_type = %pool.agent_type(), %error, "cannot keep the pool's minimum warm");
                        }
                    }
                }
                () = &mut stop => break,
            }
        }
    }
}
