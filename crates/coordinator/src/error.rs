use switchyard::auth::AuthError;
use switchyard_core::{ErrorCode, ServiceError, Slot};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Domain(#[from] switchyard_core::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("no live worker owns slot {0}: the cluster has no live worker; retry")]
    NoOwner(Slot),
    #[error(
        "worker {worker_id} signs with token key {worker_key} but the coordinator accepts only {coordinator_key}: give every node the same token keys (while rotating, add the new key with --token-verify-key-file everywhere first)"
    )]
    TokenKeyMismatch {
        worker_id: String,
        worker_key: String,
        coordinator_key: String,
    },
    #[error(
        "worker {worker_id} uses a store of cluster {worker_cluster} but the coordinator's store is of cluster {coordinator_cluster}: point every node at the same store (for many nodes, --store postgres://…)"
    )]
    ClusterMismatch {
        worker_id: String,
        worker_cluster: String,
        coordinator_cluster: String,
    },
    #[error("address: {0}")]
    InvalidAddress(String),
    #[error(
        "worker_id: worker {0} is registered by another running instance; it can be taken only once that instance's lease has run out"
    )]
    WorkerIdTaken(String),
    #[error("worker_id: the node credential was made for node {credential}, not for {worker_id}")]
    CredentialForAnotherNode {
        credential: String,
        worker_id: String,
    },
    #[error(
        "known_epoch: {reported} is above every placement epoch this coordinator has kept ({highest}); refused"
    )]
    EpochAhead { reported: u64, highest: u64 },
    #[error("worker {0} is not registered (or its lease expired): register again")]
    UnknownRegistration(String),
    #[error("worker_id: no worker {0} is known to the coordinator")]
    UnknownWorker(String),
    #[error("worker_id: worker {0} is dead; there is nothing to drain")]
    WorkerDead(String),
    #[error(
        "worker_id: worker {0} is the only worker that can own slots; start another before draining it"
    )]
    LastWorker(String),
}

impl ServiceError for CoordinatorError {
    fn error_code(&self) -> ErrorCode {
        match self {
            CoordinatorError::Domain(error) => error.error_code(),
            CoordinatorError::Auth(error) => error.error_code(),
            CoordinatorError::NoOwner(_) => ErrorCode::Unavailable,
            CoordinatorError::TokenKeyMismatch { .. }
            | CoordinatorError::ClusterMismatch { .. } => ErrorCode::FailedPrecondition,
            CoordinatorError::InvalidAddress(_) | CoordinatorError::EpochAhead { .. } => {
                ErrorCode::InvalidArgument
            }
            CoordinatorError::WorkerIdTaken(_) => ErrorCode::AlreadyExists,
            CoordinatorError::CredentialForAnotherNode { .. } => ErrorCode::PermissionDenied,
            CoordinatorError::UnknownRegistration(_) | CoordinatorError::UnknownWorker(_) => {
                ErrorCode::NotFound
            }
            CoordinatorError::WorkerDead(_) | CoordinatorError::LastWorker(_) => {
                ErrorCode::FailedPrecondition
            }
        }
    }

    fn field_violation(&self) -> Option<(&str, &str)> {
        match self {
            CoordinatorError::Domain(error) => error.field_violation(),
            _ => None,
        }
    }
}

impl From<CoordinatorError> for tonic::Status {
    fn from(error: CoordinatorError) -> tonic::Status {
        switchyard::status_from(&error)
    }
}

pub type Result<T, E = CoordinatorError> = std::result::Result<T, E>;
