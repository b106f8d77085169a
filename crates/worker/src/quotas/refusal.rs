//! Refusals: RESOURCE_EXHAUSTED with a `google.rpc.QuotaFailure` naming the resource and the
//! user, and a `google.rpc.RetryInfo` saying when to try again.

use std::time::Duration;

use switchyard_core::UserId;
use switchyard_core::quota::Resource;
use tonic::Status;

use super::Limit;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuotaError {
    /// A quota has no room for the call.
    #[error("quota {resource} exhausted for user {user_id}: {used} of {limit}{per}{asked}")]
    Exhausted {
        resource: Resource,
        user_id: UserId,
        used: String,
        limit: String,
        per: String,
        /// What the refused call needed, when it is more than one.
        asked: String,
        retry_after: Option<Duration>,
    },
    /// A rate limit refuses the call for now.
    #[error("rate limit of {rate} exceeded for {scope} {key}; retry in {}", humantime::format_duration(*retry_after))]
    RateLimited {
        scope: &'static str,
        key: String,
        rate: String,
        retry_after: Duration,
    },
}

/// A number as people write it: whole numbers without decimals, others with up to six.
fn figure(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.6}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

impl QuotaError {
    pub fn exhausted(
        resource: Resource,
        user_id: &UserId,
        used: f64,
        asked: f64,
        limit: Limit,
        retry_after: Option<Duration>,
    ) -> QuotaError {
        QuotaError::Exhausted {
            resource,
            user_id: user_id.clone(),
            used: figure(used),
            limit: figure(limit.limit),
            per: if limit.window.is_zero() {
                String::new()
            } else {
                format!(" per {}", humantime::format_duration(limit.window))
            },
            asked: if asked > 1.0 || (asked > 0.0 && asked.fract() != 0.0) {
                format!(" (the call needs {})", figure(asked))
            } else {
                String::new()
            },
            retry_after,
        }
    }

    /// How long the caller should wait, when that is known.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            QuotaError::Exhausted { retry_after, .. } => *retry_after,
            QuotaError::RateLimited { retry_after, .. } => Some(*retry_after),
        }
    }

    /// The status: RESOURCE_EXHAUSTED with its details.
    pub fn to_status(&self) -> Status {
        match self {
            QuotaError::Exhausted { resource, .. } => {
                metrics::counter!("switchyard_quota_refusals_total", "resource" => resource.name())
                    .increment(1);
            }
            QuotaError::RateLimited { scope, .. } => {
                metrics::counter!("switchyard_rate_limited_total", "scope" => *scope).increment(1);
            }
        }
        let (subject, description) = match self {
            QuotaError::Exhausted {
                resource, user_id, ..
            } => (format!("user:{user_id}"), format!("quota {resource}")),
            QuotaError::RateLimited { scope, key, .. } => (
                format!("{scope}:{key}"),
                format!("rate limit of the {scope}"),
            ),
        };
        switchyard::status::resource_exhausted(
            self.to_string(),
            &subject,
            &description,
            self.retry_after(),
        )
    }
}
