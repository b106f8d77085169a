//! Request and response metadata keys of the Switchyard protocol.

/// Carries the session token on every call that names a session.
pub const SESSION_TOKEN: &str = "x-session-token";
/// Carries the placement epoch a forwarded request was routed with.
pub const PLACEMENT_EPOCH: &str = "x-switchyard-epoch";
/// On a worker's FAILED_PRECONDITION for a slot it does not own: the owner it knows.
pub const SLOT_OWNER: &str = "x-switchyard-slot-owner";
/// On a worker's FAILED_PRECONDITION for a slot it does not own: the epoch it knows.
pub const KNOWN_EPOCH: &str = "x-switchyard-known-epoch";
