//! Agent backends.

mod echo;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use switchyard_core::{ContextMessage, ErrorCode, ServiceError};
use tokio::sync::mpsc;

pub use echo::{EchoAgent, EchoConfig};

/// What a turn consumed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub compute_seconds: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    #[error("unknown agent type {name:?}; known agent types: {known}")]
    UnknownAgentType { name: String, known: String },
    /// The receiver of the deltas went away: the caller cancelled the turn.
    #[error("turn cancelled by the caller")]
    Cancelled,
    #[error("agent backend failed: {0}")]
    Backend(String),
}

impl ServiceError for AgentError {
    fn error_code(&self) -> ErrorCode {
        match self {
            AgentError::UnknownAgentType { .. } => ErrorCode::InvalidArgument,
            AgentError::Cancelled => ErrorCode::Cancelled,
            AgentError::Backend(_) => ErrorCode::Unavailable,
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
}

/// Makes instances of one agent type.
pub trait AgentFactory: Send + Sync {
    fn create(&self) -> Box<dyn Agent>;
}

/// The agent types a worker can run, by name.
#[derive(Clone, Default)]
pub struct AgentCatalog {
    factories: BTreeMap<String, Arc<dyn AgentFactory>>,
}

impl AgentCatalog {
    /// A catalog that knows the built-in `echo` agent.
    pub fn with_builtin() -> Self {
        let mut catalog = AgentCatalog::default();
        catalog.register("echo", Arc::new(EchoConfig::default()));
        catalog
    }

    pub fn register(&mut self, name: impl Into<String>, factory: Arc<dyn AgentFactory>) {
        self.factories.insert(name.into(), factory);
    }

    pub fn create(&self, name: &str) -> Result<Box<dyn Agent>, AgentError> {
        match self.factories.get(name) {
            Some(factory) => Ok(factory.create()),
            None => Err(AgentError::UnknownAgentType {
                name: name.chars().take(64).collect(),
                known: self
                    .factories
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}
