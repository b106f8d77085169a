use switchyard::auth::AuthError;
use switchyard::metadata::{KNOWN_EPOCH, SLOT_OWNER};
use switchyard_agents::AgentError;
use switchyard_core::{Epoch, ErrorCode, ServiceError, SessionId, Slot, WorkerId};
use switchyard_store::StoreError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Domain(#[from] switchyard_core::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("slot {slot} is not owned by this worker at epoch {epoch}")]
    NotOwner {
        slot: Slot,
        epoch: Epoch,
        owner: Option<WorkerId>,
    },
    #[error("worker placement is at epoch {known}, behind the request's epoch {requested}; retry")]
    PlacementBehind { known: Epoch, requested: Epoch },
    #[error("worker has no fresh lease from the coordinator; retry")]
    LeaseExpired,
    #[error("slot {0} was just placed on this worker and its store lease is not taken yet; retry")]
    LeaseNotHeld(Slot),
    #[error("{0}")]
    InvalidMetadata(String),
    #[error("the turn did not finish within the caller's deadline; its reply was not committed")]
    DeadlineExceeded,
    #[error("a turn is already running on session {0} and its double_text policy is reject")]
    TurnInProgress(SessionId),
    #[error(
        "request_id: the turn {0:?} is in flight; its result comes on the call that started it"
    )]
    TurnInFlight(String),
    #[error(
        "agent {agent_type} did not finish the turn within its turn_timeout of {timeout:?}: it was stopped and will be replaced; the user message is kept, no reply was committed"
    )]
    TurnTimedOut {
        agent_type: String,
        timeout: std::time::Duration,
    },
    #[error("session {0} was ended while its turn ran; the turn committed no reply")]
    EndedDuringTurn(SessionId),
    #[error("{queued} turns already wait on session {session_id}; retry later")]
    TurnQueueFull {
        session_id: SessionId,
        queued: usize,
    },
    #[error(
        "the turn was interrupted by a newer message on its session; what it had committed is kept"
    )]
    Interrupted,
    /// Boxed: a refusal carries its figures, and errors travel by value on every path.
    #[error(transparent)]
    Quota(Box<crate::quotas::QuotaError>),
    #[error(
        "session {0} is moving to another worker and its turn did not finish in time: it was cancelled, keeping its user message and committing no reply; retry"
    )]
    HandedOver(SessionId),
}

impl From<crate::quotas::QuotaError> for WorkerError {
    fn from(error: crate::quotas::QuotaError) -> Self {
        WorkerError::Quota(Box::new(error))
    }
}

impl ServiceError for WorkerError {
    fn error_code(&self) -> ErrorCode {
        match self {
            WorkerError::Domain(error) => error.error_code(),
            WorkerError::Auth(error) => error.error_code(),
            WorkerError::Store(error) => error.error_code(),
            WorkerError::Agent(error) => error.error_code(),
            WorkerError::NotOwner { .. } => ErrorCode::FailedPrecondition,
            WorkerError::PlacementBehind { .. }
            | WorkerError::LeaseExpired
            | WorkerError::LeaseNotHeld(_)
            | WorkerError::HandedOver(_) => ErrorCode::Unavailable,
            WorkerError::DeadlineExceeded | WorkerError::TurnTimedOut { .. } => {
                ErrorCode::DeadlineExceeded
            }
            WorkerError::EndedDuringTurn(_) => ErrorCode::NotFound,
            WorkerError::TurnInProgress(_)
            | WorkerError::TurnInFlight(_)
            | WorkerError::Interrupted => ErrorCode::Aborted,
            WorkerError::TurnQueueFull { .. } | WorkerError::Quota(_) => {
                ErrorCode::ResourceExhausted
            }
            WorkerError::InvalidMetadata(_) => ErrorCode::InvalidArgument,
        }
    }

    fn field_violation(&self) -> Option<(&str, &str)> {
        match self {
            WorkerError::Domain(error) => error.field_violation(),
            WorkerError::Agent(error) => error.field_violation(),
            _ => None,
        }
    }
}

impl From<WorkerError> for Status {
    fn from(error: WorkerError) -> Status {
        if let WorkerError::Quota(refusal) = &error {
            return refusal.to_status();
        }
        let mut status = switchyard::status_from(&error);
        if let WorkerError::NotOwner { epoch, owner, .. } = &error {
            let metadata = status.metadata_mut();
            if let Ok(value) = epoch.0.to_string().parse() {
                metadata.insert(KNOWN_EPOCH, value);
            }
            if let Some(value) = owner.as_ref().and_then(|owner| owner.as_str().parse().ok()) {
                metadata.insert(SLOT_OWNER, value);
            }
        }
        status
    }
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
