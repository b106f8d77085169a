//! The SDK's retry policy: which failures are retried, how often, and how long it waits.
//!
//! Only UNAVAILABLE is retried (the coordinator reports every failure to reach a worker,
//! and every slot handoff, with it), and a call whose connection closed under it (a
//! coordinator restarting: the client's own transport reports it, with a transport error
//! as its source, as CANCELLED, INTERNAL or UNKNOWN); and only calls that are safe to
//! repeat: reads,
//! EndSession, and appends and turns, which the client sends with a request id so that a
//! repeat happens once. CreateSession is never retried: a repeat would make a second
//! session.

use std::future::Future;

pub use switchyard_core::RetryPolicy;
use tonic::{Code, Status};

/// Runs `call` until it succeeds, fails with anything but UNAVAILABLE, or the policy's
/// attempts are spent.
pub async fn run<T, F, Fut>(policy: &RetryPolicy, mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut retry = 0;
    loop {
        match call().await {
            Err(status) if is_retryable(&status) && policy.allows(retry) => {
                tokio::time::sleep(policy.backoff(retry)).await;
                retry += 1;
            }
            result => return result,
        }
    }
}

/// Whether a failed call may be sent again (with the same request id).
pub fn is_retryable(status: &Status) -> bool {
    // The connection went away under the call (reset, closed, a GOAWAY from a server that
    // is stopping): the client's transport reports it with whatever code, and the call
    // may or may not have been served, like an UNAVAILABLE from a worker that died mid-call.
    status.code() == Code::Unavailable
        || std::error::Error::source(status)
            .is_some_and(|source| source.is::<tonic::transport::Error>())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn only_unavailable_is_retried_and_attempts_are_bounded() {
        let policy = RetryPolicy::default();
        let calls = AtomicU32::new(0);
        let result: Result<(), Status> = run(&policy, || async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err(Status::unavailable("down"))
        })
        .await;
        assert_eq!(result.unwrap_err().code(), Code::Unavailable);
        assert_eq!(calls.load(Ordering::Relaxed), 6);

        let calls = AtomicU32::new(0);
        let result: Result<(), Status> = run(&policy, || async {
            calls.fetch_add(1, Ordering::Relaxed);
            Err(Status::invalid_argument("no"))
        })
        .await;
        assert_eq!(result.unwrap_err().code(), Code::InvalidArgument);
        assert_eq!(calls.load(Ordering::Relaxed), 1);

        let calls = AtomicU32::new(0);
        let result = run(&policy, || async {
            if calls.fetch_add(1, Ordering::Relaxed) < 2 {
                Err(Status::unavailable("moving"))
            } else {
                Ok(7)
            }
        })
        .await;
        assert_eq!(result.unwrap(), 7);
    }
}
