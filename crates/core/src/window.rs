//! The context window: how much of a session's context a turn sends its agent.

use crate::session::{ContextMessage, Role};

/// At most this many messages, content bytes and estimated tokens go to the agent: the
/// newest that fit, after every system message (instructions are never dropped for
/// conversation). The turn's own user message always goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextWindow {
    pub max_messages: usize,
    pub max_bytes: usize,
    /// Estimated at four bytes of content per token; `None` counts no tokens.
    pub max_tokens: Option<u64>,
}

impl Default for ContextWindow {
    fn default() -> Self {
        ContextWindow {
            max_messages: 200,
            max_bytes: 1024 * 1024,
            max_tokens: None,
        }
    }
}

/// System messages older than the newest window that a turn looks up at most.
pub const MAX_OLDER_SYSTEM_MESSAGES: usize = 32;

/// The rough token count of a text: four bytes a token, rounded up.
pub fn estimated_tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

impl ContextWindow {
    /// Chooses what the agent sees from `older_system` (system messages before `newest`)
    /// and `newest` (the newest messages, oldest first, ending with the turn's message).
    /// Returns them in seq order.
    pub fn select(
        &self,
        older_system: Vec<ContextMessage>,
        mut newest: Vec<ContextMessage>,
    ) -> Vec<ContextMessage> {
        let mut budget = Budget {
            messages: self.max_messages.max(1),
            bytes: self.max_bytes,
            tokens: self.max_tokens,
        };
        let mut chosen = Vec::with_capacity(budget.messages.min(newest.len() + older_system.len()));
        // The turn's own message first, whatever it weighs.
        if let Some(last) = newest.pop() {
            budget.spend(&last);
            chosen.push(last);
        }
        let (system, conversation): (Vec<_>, Vec<_>) = newest
            .into_iter()
            .partition(|message| message.role == Role::System);
        // Then the system messages, newest first, then the conversation, newest first.
        let system = system
            .into_iter()
            .rev()
            .chain(older_system.into_iter().rev());
        for message in system.chain(conversation.into_iter().rev()) {
            if !budget.fits(&message) {
                if message.role == Role::System {
                    continue;
                }
                // The conversation is cut at the first message that does not fit: no gaps.
                break;
            }
            budget.spend(&message);
            chosen.push(message);
        }
        chosen.sort_by_key(|message| message.seq);
        chosen
    }
}

struct Budget {
    messages: usize,
    bytes: usize,
    tokens: Option<u64>,
}

impl Budget {
    fn fits(&self, message: &ContextMessage) -> bool {
        self.messages > 0
            && message.content.len() <= self.bytes
            && self
                .tokens
                .is_none_or(|tokens| estimated_tokens(&message.content) <= tokens)
    }

    fn spend(&mut self, message: &ContextMessage) {
        self.messages = self.messages.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(message.content.len());
        if let Some(tokens) = &mut self.tokens {
            *tokens = tokens.saturating_sub(estimated_tokens(&message.content));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    fn message(seq: u64, role: Role, content: &str) -> ContextMessage {
        ContextMessage {
            seq,
            role,
            content: content.to_string(),
            name: String::new(),
            created_at: SystemTime::UNIX_EPOCH,
        }
    }

    fn seqs(messages: &[ContextMessage]) -> Vec<u64> {
        messages.iter().map(|message| message.seq).collect()
    }

    #[test]
    fn the_newest_that_fit_after_every_system_message() {
        let window = ContextWindow {
            max_messages: 4,
            ..ContextWindow::default()
        };
        let older = vec![message(1, Role::System, "be brief")];
        let newest: Vec<ContextMessage> = (5..=10)
            .map(|seq| {
                let role = if seq == 7 { Role::System } else { Role::User };
                message(seq, role, "text")
            })
            .collect();
        assert_eq!(seqs(&window.select(older, newest)), [1, 7, 9, 10]);
    }

    #[test]
    fn bytes_and_tokens_cut_the_conversation_without_gaps() {
        let newest = vec![
            message(1, Role::User, &"a".repeat(100)),
            message(2, Role::Assistant, &"b".repeat(10)),
            message(3, Role::User, &"c".repeat(100)),
            message(4, Role::User, "the question"),
        ];
        let by_bytes = ContextWindow {
            max_bytes: 130,
            ..ContextWindow::default()
        };
        // 12 + 100 + 10 bytes fit in 130; the next 100 do not, and nothing older is sent.
        assert_eq!(
            seqs(&by_bytes.select(Vec::new(), newest.clone())),
            [2, 3, 4]
        );
        let by_tokens = ContextWindow {
            max_tokens: Some(40),
            ..ContextWindow::default()
        };
        // 3 + 25 + 3 tokens fit in 40; the next 25 do not.
        assert_eq!(
            seqs(&by_tokens.select(Vec::new(), newest.clone())),
            [2, 3, 4]
        );
        // The turn's message goes even when it alone is over the window.
        let tiny = ContextWindow {
            max_messages: 1,
            max_bytes: 1,
            max_tokens: Some(1),
        };
        assert_eq!(seqs(&tiny.select(Vec::new(), newest)), [4]);
    }
}
