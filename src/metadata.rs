//! Request and response metadata keys of the Switchyard protocol.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// Carries the session token on every call that names a session.
pub const SESSION_TOKEN: &str = "x-session-token";
/// Carries the node credential on every call inside a cluster: membership calls from
/// workers, and every call the coordinator forwards (which it marks as forwarded).
pub const NODE_CREDENTIAL: &str = "x-switchyard-node";
/// Carries the caller's API key, as `Bearer <key>`.
pub const AUTHORIZATION: &str = "authorization";
/// Carries the placement epoch a forwarded request was routed with.
pub const PLACEMENT_EPOCH: &str = "x-switchyard-epoch";
/// Set by the coordinator on every forwarded call: the name of the API key the caller was
/// admitted with (`open` when keys are off), for the workers' audit events.
pub const CALLER: &str = "x-switchyard-caller";
/// On a worker's FAILED_PRECONDITION for a slot it does not own: the owner it knows.
pub const SLOT_OWNER: &str = "x-switchyard-slot-owner";
/// On a worker's FAILED_PRECONDITION for a slot it does not own: the epoch it knows.
pub const KNOWN_EPOCH: &str = "x-switchyard-known-epoch";
/// On a worker's UNAVAILABLE before its own server is up (it registered a moment ago, or
/// is still registering): the call did nothing, and is worth trying again at once.
pub const WORKER_STARTING: &str = "x-switchyard-worker-starting";

/// The caller's deadline, from its `grpc-timeout` metadata, counted from now.
pub fn deadline_of(metadata: &MetadataMap) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(value)?;
    Instant::now().checked_add(timeout)
}

/// Parses a gRPC `TimeoutValue`: at most 8 digits and a unit (H, M, S, m, u or n).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        for bad in ["", "5", "m", "123456789S", "5x", "-5S", "+5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
