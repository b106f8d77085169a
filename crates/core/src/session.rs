//! Sessions, messages, and the limits every input is held to.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use crate::error::{Error, quote};
use crate::ids::{SessionId, UserId};
use crate::slot::Slot;

/// A session as stored: who owns it and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: SessionId,
    pub user_id: UserId,
    pub slot: Slot,
    pub created_at: SystemTime,
    pub last_activity_at: SystemTime,
    pub metadata: BTreeMap<String, String>,
    pub message_count: u64,
    pub double_text: DoubleText,
}

/// What a message arriving while a turn runs on its session does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DoubleText {
    /// It waits, first come first served, in a bounded queue.
    #[default]
    Enqueue,
    /// It is refused.
    Reject,
    /// The running turn is cancelled (keeping what it committed) and the new one runs.
    Interrupt,
}

impl DoubleText {
    pub fn as_str(self) -> &'static str {
        match self {
            DoubleText::Enqueue => "enqueue",
            DoubleText::Reject => "reject",
            DoubleText::Interrupt => "interrupt",
        }
    }

    /// Parses the `double_text` field; empty means the default.
    pub fn parse(input: &str) -> Result<DoubleText, Error> {
        match input {
            "" | "enqueue" => Ok(DoubleText::Enqueue),
            "reject" => Ok(DoubleText::Reject),
            "interrupt" => Ok(DoubleText::Interrupt),
            other => Err(Error::invalid(
                "double_text",
                format!(
                    "{} is not a policy: use enqueue, reject or interrupt",
                    quote(other)
                ),
            )),
        }
    }
}

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    User,
    Assistant,
    System,
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::System => "system",
            Role::Tool => "tool",
        }
    }

    /// Parses a role; `field` names where it came from, for the error.
    pub fn parse(input: &str, field: impl Into<String>) -> Result<Role, Error> {
        match input {
            "user" => Ok(Role::User),
            "assistant" => Ok(Role::Assistant),
            "system" => Ok(Role::System),
            "tool" => Ok(Role::Tool),
            other => Err(Error::invalid(
                field,
                format!(
                    "{} is not a role: use user, assistant, system or tool",
                    quote(other)
                ),
            )),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message to append to a context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// The author's name within its role: a tool's name, or the agent type of a reply.
    pub name: String,
}

/// A message as stored in a context, with its sequence number (1, 2, 3, … per session).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextMessage {
    pub seq: u64,
    pub role: Role,
    pub content: String,
    pub name: String,
    pub created_at: SystemTime,
}

/// Limits on sessions and on every input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Creating one more session ends the user's least recently created one.
    pub max_sessions_per_user: u32,
    /// A session with no call for this long is ended.
    pub idle_timeout: Duration,
    /// A session with no call for this long leaves memory; the store keeps it and the next
    /// call loads it again.
    pub passivate_after: Duration,
    /// How long a session token stays valid.
    pub token_ttl: Duration,
    pub max_message_bytes: usize,
    pub max_messages_per_append: usize,
    pub max_name_bytes: usize,
    /// Messages a session keeps: past it, the oldest are dropped with each append, in the
    /// same transaction.
    pub max_context_messages: u64,
    pub max_metadata_entries: usize,
    pub max_metadata_key_bytes: usize,
    pub max_metadata_value_bytes: usize,
    pub max_agent_type_bytes: usize,
    /// Turns that may wait behind a running one on a session whose policy is enqueue.
    pub max_queued_turns: usize,
    /// Messages in one GetContext or ListSessions page.
    pub max_page_messages: usize,
    /// Content bytes in one GetContext page.
    pub max_page_bytes: usize,
    /// The longest agent reply a turn commits; a longer one ends the turn with an error.
    pub max_reply_bytes: usize,
    /// The largest gRPC message on either hop (caller to coordinator, coordinator to worker).
    pub max_grpc_message_bytes: usize,
}

/// Longest accepted request id, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 64;

/// The default for [`Limits::max_grpc_message_bytes`]: room for a full append (100 messages
/// of 64 KiB) and a full GetContext page (4 MiB), with their framing.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions_per_user: 5,
            idle_timeout: Duration::from_secs(30 * 60),
            passivate_after: Duration::from_secs(5 * 60),
            token_ttl: Duration::from_secs(7 * 24 * 3600),
            max_message_bytes: 64 * 1024,
            max_messages_per_append: 100,
            max_name_bytes: 64,
            max_context_messages: 100_000,
            max_metadata_entries: 32,
            max_metadata_key_bytes: 64,
            max_metadata_value_bytes: 1024,
            max_agent_type_bytes: 64,
            max_queued_turns: 8,
            max_page_messages: 1000,
            max_page_bytes: 4 * 1024 * 1024,
            max_reply_bytes: 256 * 1024,
            max_grpc_message_bytes: MAX_GRPC_MESSAGE_BYTES,
        }
    }
}

impl Limits {
    pub fn validate_metadata(&self, metadata: &BTreeMap<String, String>) -> Result<(), Error> {
        if metadata.len() > self.max_metadata_entries {
            return Err(Error::invalid(
                "metadata",
                format!(
                    "has {} entries, the limit is {}",
                    metadata.len(),
                    self.max_metadata_entries
                ),
            ));
        }
        for (key, value) in metadata {
            if key.is_empty() || key.len() > self.max_metadata_key_bytes {
                return Err(Error::invalid(
                    "metadata",
                    format!(
                        "key {} must be 1 to {} bytes long",
                        quote(key),
                        self.max_metadata_key_bytes
                    ),
                ));
            }
            if value.len() > self.max_metadata_value_bytes {
                return Err(Error::invalid(
                    format!("metadata[{key}]"),
                    format!(
                        "value is {} bytes long, the limit is {}",
                        value.len(),
                        self.max_metadata_value_bytes
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks a batch of messages to append; `field` is the repeated field they came in.
    pub fn validate_messages(&self, messages: &[Message], field: &str) -> Result<(), Error> {
        if messages.is_empty() {
            return Err(Error::invalid(field, "must hold at least one message"));
        }
        if messages.len() > self.max_messages_per_append {
            return Err(Error::invalid(
                field,
                format!(
                    "holds {} messages, the limit per call is {}",
                    messages.len(),
                    self.max_messages_per_append
                ),
            ));
        }
        for (index, message) in messages.iter().enumerate() {
            self.validate_content(&message.content, &format!("{field}[{index}].content"))?;
            if message.name.chars().any(char::is_control) {
                return Err(Error::invalid(
                    format!("{field}[{index}].name"),
                    "must not contain control characters",
                ));
            }
            if message.name.len() > self.max_name_bytes {
                return Err(Error::invalid(
                    format!("{field}[{index}].name"),
                    format!("is longer than {} bytes", self.max_name_bytes),
                ));
            }
        }
        Ok(())
    }

    pub fn validate_content(&self, content: &str, field: &str) -> Result<(), Error> {
        // PostgreSQL text cannot hold NUL; refusing it here keeps one such message from
        // failing a whole group-committed batch.
        if content.contains('\0') {
            return Err(Error::invalid(field, "must not contain NUL characters"));
        }
        if content.len() > self.max_message_bytes {
            return Err(Error::invalid(
                field,
                format!(
                    "is {} bytes long, the limit is {}",
                    content.len(),
                    self.max_message_bytes
                ),
            ));
        }
        Ok(())
    }

    pub fn validate_agent_type(&self, agent_type: &str) -> Result<(), Error> {
        if agent_type.is_empty() {
            return Err(Error::invalid("agent_type", "must not be empty"));
        }
        if agent_type.chars().any(char::is_control) {
            return Err(Error::invalid(
                "agent_type",
                "must not contain control characters",
            ));
        }
        if agent_type.len() > self.max_agent_type_bytes {
            return Err(Error::invalid(
                "agent_type",
                format!("is longer than {} bytes", self.max_agent_type_bytes),
            ));
        }
        Ok(())
    }

    /// Checks a caller's request id: empty (none), or 1 to [`MAX_REQUEST_ID_BYTES`] bytes
    /// of printable text.
    pub fn validate_request_id(&self, request_id: &str) -> Result<(), Error> {
        if request_id.len() > MAX_REQUEST_ID_BYTES {
            return Err(Error::invalid(
                "request_id",
                format!(
                    "is {} bytes long, the limit is {MAX_REQUEST_ID_BYTES}",
                    request_id.len()
                ),
            ));
        }
        if !request_id.chars().all(crate::ids::is_printable) {
            return Err(Error::invalid(
                "request_id",
                "must be printable text: no control, NUL or bidi-override characters",
            ));
        }
        Ok(())
    }

    /// Checks that the limits fit together: each is at least 1, and the largest append and
    /// the largest page fit in one gRPC message.
    pub fn validate(&self) -> Result<(), Error> {
        for (field, value) in [
            ("max_message_bytes", self.max_message_bytes),
            ("max_messages_per_append", self.max_messages_per_append),
            ("max_page_messages", self.max_page_messages),
            ("max_page_bytes", self.max_page_bytes),
            ("max_reply_bytes", self.max_reply_bytes),
            ("max_metadata_key_bytes", self.max_metadata_key_bytes),
            ("max_agent_type_bytes", self.max_agent_type_bytes),
            ("max_grpc_message_bytes", self.max_grpc_message_bytes),
        ] {
            if value == 0 {
                return Err(Error::invalid(field, "must be at least 1"));
            }
        }
        // Framing per message: seq, role, name, timestamp and tags, generously.
        let per_message = self.max_name_bytes + 64;
        let largest_append = self
            .max_messages_per_append
            .saturating_mul(self.max_message_bytes.saturating_add(per_message))
            .saturating_add(64);
        let largest_page = self
            .max_page_bytes
            .saturating_add(self.max_page_messages.saturating_mul(per_message));
        let needed = largest_append.max(largest_page);
        if self.max_grpc_message_bytes < needed {
            return Err(Error::invalid(
                "max_grpc_message_bytes",
                format!(
                    "is {} bytes, but a full append or page needs {needed}: raise it or lower the others",
                    self.max_grpc_message_bytes
                ),
            ));
        }
        Ok(())
    }

    /// How many of a user's sessions must end before one more can be created.
    pub fn evictions_before_create(&self, current_sessions: usize) -> usize {
        (current_sessions + 1).saturating_sub(self.max_sessions_per_user.max(1) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_limits_fit_together_and_misfits_are_named() {
        assert_eq!(Limits::default().validate(), Ok(()));
        let too_small = Limits {
            max_grpc_message_bytes: 1024 * 1024,
            ..Limits::default()
        };
        let error = too_small.validate().unwrap_err();
        assert!(
            error.to_string().starts_with("max_grpc_message_bytes"),
            "{error}"
        );
        let zero = Limits {
            max_page_messages: 0,
            ..Limits::default()
        };
        assert!(
            zero.validate()
                .unwrap_err()
                .to_string()
                .starts_with("max_page_messages")
        );
    }

    fn message(content: &str) -> Message {
        Message {
            role: Role::User,
            content: content.to_string(),
            name: String::new(),
        }
    }

    #[test]
    fn roles_parse_and_name_the_field() {
        assert_eq!(Role::parse("tool", "messages[0].role"), Ok(Role::Tool));
        let error = Role::parse("admin", "messages[2].role").unwrap_err();
        assert!(
            error.to_string().starts_with("messages[2].role: "),
            "{error}"
        );
    }

    #[test]
    fn oversized_content_names_its_index() {
        let limits = Limits {
            max_message_bytes: 4,
            ..Limits::default()
        };
        let error = limits
            .validate_messages(&[message("ok"), message("too long")], "messages")
            .unwrap_err();
        assert!(
            error.to_string().starts_with("messages[1].content: "),
            "{error}"
        );
        assert!(limits.validate_messages(&[], "messages").is_err());
    }

    #[test]
    fn metadata_limits() {
        let limits = Limits::default();
        let mut metadata = BTreeMap::new();
        metadata.insert("plan".to_string(), "pro".to_string());
        assert!(limits.validate_metadata(&metadata).is_ok());
        metadata.insert(String::new(), "x".to_string());
        assert!(limits.validate_metadata(&metadata).is_err());
        let many: BTreeMap<_, _> = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(limits.validate_metadata(&many).is_err());
    }

    #[test]
    fn evictions_keep_the_user_at_the_limit() {
        let limits = Limits::default();
        assert_eq!(limits.evictions_before_create(0), 0);
        assert_eq!(limits.evictions_before_create(4), 0);
        assert_eq!(limits.evictions_before_create(5), 1);
        assert_eq!(limits.evictions_before_create(7), 3);
    }
}
