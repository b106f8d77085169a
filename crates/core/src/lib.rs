//! Switchyard's domain types and rules. Nothing in this crate performs I/O or knows gRPC.

pub mod alerts;
pub mod api_key;
pub mod bounded;
pub mod error;
pub mod health;
pub mod ids;
pub mod node_credential;
pub mod placement;
pub mod quota;
pub mod retry;
pub mod session;
pub mod slot;
pub mod token;
pub mod window;

pub use api_key::{ApiKey, ApiKeyError, ApiKeys, Scope};
pub use error::{Error, ErrorCode, Result, ServiceError};
pub use ids::{SessionId, UserId, WorkerId};
pub use node_credential::{ClusterKey, NodeClaims, NodeCredentialError, NodeRole};
pub use placement::{Epoch, PlacementInput, PlacementTable};
pub use quota::{Reservation, Resource, SlidingWindow, WindowParts};
pub use retry::RetryPolicy;
pub use session::{ContextMessage, DoubleText, Limits, Message, Role, Session};
pub use slot::{DEFAULT_SLOT_COUNT, Slot, slot_of};
pub use token::{SessionClaims, TokenError, TokenKey};
pub use window::ContextWindow;
