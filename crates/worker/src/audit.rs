//! Audit events: who did what to which user and session, and with what outcome. They go to
//! the `switchyard::audit` log target, one JSON object per line with `--log-format json`.
//! They name callers by their API key's name and never hold a token, a key or content.

use switchyard::metadata::CALLER;
use switchyard_core::{SessionId, UserId};
use tonic::metadata::MetadataMap;

/// The log target of audit events.
pub const TARGET: &str = "switchyard::audit";

/// The caller a forwarded call names (the coordinator sets it), or `internal` for what a
/// worker does on its own (expiry).
pub fn caller(metadata: &MetadataMap) -> String {
    metadata
        .get(CALLER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("unknown")
        .to_string()
}

/// One audit event.
pub fn event(
    event: &str,
    caller: &str,
    user_id: &UserId,
    session_id: Option<SessionId>,
    outcome: &str,
) {
    let kind = match event {
        "session created" => Some("created"),
        "session ended" if outcome == "ended" => Some("ended"),
        "session evicted" => Some("evicted"),
        "session expired" => Some("expired"),
        _ => None,
    };
    if let Some(kind) = kind {
        metrics::counter!("switchyard_sessions_total", "event" => kind).increment(1);
    }
    let session_id = session_id.map(|id| id.to_string()).unwrap_or_default();
    tracing::info!(
        target: TARGET,
        event,
        caller,
        user_id = user_id.as_str(),
        session_id,
        outcome,
        "audit"
    );
}
