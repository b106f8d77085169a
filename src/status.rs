//! The one place where error codes become gRPC status codes.

use switchyard_core::{ErrorCode, ServiceError};
use tonic::{Code, Status};

pub fn code_of(code: ErrorCode) -> Code {
    match code {
        ErrorCode::InvalidArgument => Code::InvalidArgument,
        ErrorCode::NotFound => Code::NotFound,
        ErrorCode::AlreadyExists => Code::AlreadyExists,
        ErrorCode::Unauthenticated => Code::Unauthenticated,
        ErrorCode::PermissionDenied => Code::PermissionDenied,
        ErrorCode::ResourceExhausted => Code::ResourceExhausted,
        ErrorCode::FailedPrecondition => Code::FailedPrecondition,
        ErrorCode::Aborted => Code::Aborted,
        ErrorCode::Unavailable => Code::Unavailable,
        ErrorCode::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorCode::Cancelled => Code::Cancelled,
        ErrorCode::Internal => Code::Internal,
    }
}

/// The status a caller receives for `error`.
pub fn status_from<E: ServiceError + ?Sized>(error: &E) -> Status {
    let code = code_of(error.error_code());
    if code == Code::Internal {
        // The server's fault: worth a line in its own log as well as in the reply.
        tracing::error!(error = %error, "internal error");
    }
    Status::new(code, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::{Error, SessionId};

    #[test]
    fn domain_errors_keep_their_message() {
        let status = status_from(&Error::invalid("user_id", "must not be empty"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "user_id: must not be empty");
        let id = SessionId::new_random();
        let status = status_from(&Error::SessionNotFound(id));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), format!("session {id} not found"));
    }
}
