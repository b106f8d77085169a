//! Switchyard's domain types and rules. Nothing in this crate performs I/O or knows gRPC.

pub mod bounded;
pub mod error;
pub mod ids;
pub mod placement;
pub mod session;
pub mod slot;
pub mod token;

pub use error::{Error, ErrorCode, Result, ServiceError};
pub use ids::{SessionId, UserId, WorkerId};
pub use placement::{Epoch, PlacementInput, PlacementTable};
pub use session::{ContextMessage, DoubleText, Limits, Message, Role, Session};
pub use slot::{DEFAULT_SLOT_COUNT, Slot, slot_of};
pub use token::{SessionClaims, TokenError, TokenKey};
