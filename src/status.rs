//! The one place where error codes become gRPC status codes.

use switchyard_core::{ErrorCode, ServiceError};
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

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

/// The status a caller receives for `error`. A broken input limit carries a
/// `google.rpc.BadRequest` naming the field.
pub fn status_from<E: ServiceError + ?Sized>(error: &E) -> Status {
    let code = code_of(error.error_code());
    if code == Code::Internal {
        // The server's fault: worth a line in its own log as well as in the reply.
        tracing::error!(error = %error, "internal error");
    }
    match error.field_violation() {
        Some((field, reason)) if code == Code::InvalidArgument => Status::with_error_details(
            code,
            error.to_string(),
            ErrorDetails::with_bad_request_violation(field, reason),
        ),
        _ => Status::new(code, error.to_string()),
    }
}

/// RESOURCE_EXHAUSTED for a quota or rate limit: a `google.rpc.QuotaFailure` violation of
/// `subject` (e.g. `user:alice`) described by `description` (e.g. `quota tokens`), and a
/// `google.rpc.RetryInfo` when the wait is known.
pub fn resource_exhausted(
    message: String,
    subject: &str,
    description: &str,
    retry_after: Option<std::time::Duration>,
) -> Status {
    let mut details = ErrorDetails::with_quota_failure_violation(subject, description);
    if let Some(wait) = retry_after {
        details.set_retry_info(Some(wait));
    }
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// INVALID_ARGUMENT for `field`, with the message `field: reason` and a BadRequest detail.
pub fn invalid_argument(field: &str, reason: &str) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {reason}"),
        ErrorDetails::with_bad_request_violation(field, reason),
    )
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
        let violations = status
            .get_details_bad_request()
            .expect("a BadRequest detail")
            .field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "user_id");
        assert_eq!(violations[0].description, "must not be empty");
        let id = SessionId::new_random();
        let status = status_from(&Error::SessionNotFound(id));
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), format!("session {id} not found"));
    }
}
