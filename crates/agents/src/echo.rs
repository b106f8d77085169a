//! The `echo` agent: replies with the last user message, in several deltas.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use switchyard_core::{ContextMessage, Role};
use tokio::sync::mpsc;

use crate::{Agent, AgentError, AgentFactory, Usage};

#[derive(Debug, Clone)]
pub struct EchoConfig {
    /// Characters per delta.
    pub chunk_chars: usize,
    /// Pause before each delta, to stand in for a model's latency.
    pub delay: Duration,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            chunk_chars: 8,
            delay: Duration::ZERO,
        }
    }
}

#[async_trait]
impl AgentFactory for EchoConfig {
    async fn create(&self) -> Result<Box<dyn Agent>, AgentError> {
        Ok(Box::new(EchoAgent {
            config: self.clone(),
        }))
    }
}

pub struct EchoAgent {
    config: EchoConfig,
}

impl EchoAgent {
    /// The reply to a user message; deterministic so tests can assert it.
    pub fn reply_to(input: &str) -> String {
        format!("echo: {input}")
    }
}

/// Tokens as the rest of Switchyard estimates them (four bytes a token), so that a turn's
/// reservation of the `tokens` quota can match what it reports.
fn count_tokens(text: &str) -> u64 {
    switchyard_core::window::estimated_tokens(text)
}

#[async_trait]
impl Agent for EchoAgent {
    async fn run_turn(
        &mut self,
        context: &[ContextMessage],
        deltas: &mpsc::Sender<String>,
    ) -> Result<Usage, AgentError> {
        let started = Instant::now();
        let input = context
            .iter()
            .rev()
            .find(|message| message.role == Role::User)
            .map(|message| message.content.as_str())
            .unwrap_or_default();
        let reply = Self::reply_to(input);
        let chars: Vec<char> = reply.chars().collect();
        for chunk in chars.chunks(self.config.chunk_chars.max(1)) {
            if !self.config.delay.is_zero() {
                tokio::time::sleep(self.config.delay).await;
            }
            deltas
                .send(chunk.iter().collect())
                .await
                .map_err(|_| AgentError::Cancelled)?;
        }
        Ok(Usage {
            prompt_tokens: context
                .iter()
                .map(|message| count_tokens(&message.content))
                .sum(),
            completion_tokens: count_tokens(&reply),
            compute_seconds: started.elapsed().as_secs_f64(),
        })
    }

    async fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn user_message(content: &str) -> ContextMessage {
        ContextMessage {
            seq: 1,
            role: Role::User,
            content: content.to_string(),
            name: String::new(),
            created_at: SystemTime::now(),
        }
    }

    #[tokio::test]
    async fn streams_the_echo_in_chunks() {
        let mut agent = EchoConfig {
            chunk_chars: 4,
            delay: Duration::ZERO,
        }
        .create()
        .await
        .unwrap();
        let (sender, mut receiver) = mpsc::channel(64);
        let usage = agent
            .run_turn(&[user_message("hello world")], &sender)
            .await
            .unwrap();
        drop(sender);
        let mut deltas = Vec::new();
        while let Some(delta) = receiver.recv().await {
            deltas.push(delta);
        }
        assert_eq!(deltas.concat(), "echo: hello world");
        assert_eq!(deltas.len(), "echo: hello world".len().div_ceil(4));
        // Four bytes a token: "hello world" is 11 bytes, "echo: hello world" 17.
        assert_eq!(usage.prompt_tokens, 3);
        assert_eq!(usage.completion_tokens, 5);
    }

    #[tokio::test]
    async fn a_gone_receiver_cancels() {
        let mut agent = EchoConfig::default().create().await.unwrap();
        let (sender, receiver) = mpsc::channel(1);
        drop(receiver);
        let result = agent.run_turn(&[user_message("hi")], &sender).await;
        assert_eq!(result, Err(AgentError::Cancelled));
    }
}
