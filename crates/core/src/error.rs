//! Error codes shared by every crate. Each crate has its own error enum and says which
//! code each variant carries; the single mapping from a code to a gRPC status lives in
//! the `switchyard` crate.

use crate::SessionId;

/// What kind of failure an error is, independent of the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    Unauthenticated,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    Unavailable,
    DeadlineExceeded,
    Cancelled,
    Internal,
}

/// An error that knows its [`ErrorCode`].
pub trait ServiceError: std::error::Error {
    fn error_code(&self) -> ErrorCode;

    /// For a broken input rule: the field, as named on the wire, and what is wrong with it.
    fn field_violation(&self) -> Option<(&str, &str)> {
        None
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the domain rules in this crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// An input broke a rule; `field` names it as it appears on the wire.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("session {0} not found")]
    SessionNotFound(SessionId),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
}

impl Error {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl ServiceError for Error {
    fn error_code(&self) -> ErrorCode {
        match self {
            Error::InvalidArgument { .. } => ErrorCode::InvalidArgument,
            Error::SessionNotFound(_) => ErrorCode::NotFound,
            Error::Unauthenticated(_) => ErrorCode::Unauthenticated,
            Error::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Error::ResourceExhausted(_) => ErrorCode::ResourceExhausted,
        }
    }

    fn field_violation(&self) -> Option<(&str, &str)> {
        match self {
            Error::InvalidArgument { field, reason } => Some((field, reason)),
            _ => None,
        }
    }
}

/// Shortens untrusted input before it is quoted in an error message.
pub(crate) fn quote(input: &str) -> String {
    const MAX_CHARS: usize = 64;
    if input.chars().count() <= MAX_CHARS {
        return format!("{input:?}");
    }
    let head: String = input.chars().take(MAX_CHARS).collect();
    format!("{head:?}…")
}
