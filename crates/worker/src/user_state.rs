//! `UserStateService`: AdminService's calls about one user (quotas, usage, erasure),
//! forwarded by the coordinator to the owner of the user's slot, where the user's sessions,
//! limits and usage live.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use switchyard::conversions::{duration_from_wire, duration_to_wire};
use switchyard::metadata::PLACEMENT_EPOCH;
use switchyard::pb;
use switchyard::pb::user_state_service_server::UserStateService;
use switchyard_core::quota::Resource;
use switchyard_core::{Epoch, Error, UserId, slot_of};
use tonic::{Request, Response, Status};

use crate::error::{Result, WorkerError};
use crate::ownership::SlotOwnership;
use crate::quotas::{Limit, Quotas};
use crate::sessions::SessionManager;

pub struct WorkerUserState {
    placement: Arc<SlotOwnership>,
    quotas: Arc<Quotas>,
    sessions: Arc<SessionManager>,
}

impl WorkerUserState {
    pub fn new(
        placement: Arc<SlotOwnership>,
        quotas: Arc<Quotas>,
        sessions: Arc<SessionManager>,
    ) -> Self {
        WorkerUserState {
            placement,
            quotas,
            sessions,
        }
    }

    /// The user, once this worker is known to own its slot at the request's epoch.
    async fn owned_user(
        &self,
        user_id: String,
        request: &tonic::metadata::MetadataMap,
    ) -> Result<UserId> {
        let user_id = UserId::parse(user_id)?;
        let requested = match request.get(PLACEMENT_EPOCH) {
            None => None,
            Some(value) => Some(Epoch(
                value
                    .to_str()
                    .ok()
                    .and_then(|text| text.parse().ok())
                    .ok_or_else(|| {
                        WorkerError::InvalidMetadata(format!(
                            "{PLACEMENT_EPOCH}: must be an unsigned integer"
                        ))
                    })?,
            )),
        };
        let slot = slot_of(user_id.as_str(), self.placement.current().slot_count());
        self.placement.check_owner(slot, requested).await?;
        Ok(user_id)
    }
}

/// Reads the limits of a SetUserQuota; a bad one is INVALID_ARGUMENT naming its field.
pub fn limits_from_wire(limits: &[pb::QuotaLimit]) -> Result<Vec<(Resource, Limit)>, Error> {
    let mut seen = BTreeMap::new();
    for (index, limit) in limits.iter().enumerate() {
        let field = |name: &str| format!("limits[{index}].{name}");
        let resource = Resource::parse(&limit.resource).ok_or_else(|| {
            Error::invalid(
                field("resource"),
                format!(
                    "{:?} is not a resource; the resources are {}",
                    limit.resource,
                    Resource::ALL.map(Resource::name).join(", ")
                ),
            )
        })?;
        let window = match &limit.window {
            Some(window) => duration_from_wire(window)
                .ok_or_else(|| Error::invalid(field("window"), "must not be negative"))?,
            None => Duration::ZERO,
        };
        let checked = Limit::validate(resource, limit.limit, window).map_err(|reason| {
            let (name, reason) = reason
                .split_once(": ")
                .unwrap_or(("limit", reason.as_str()));
            Error::invalid(field(name), reason)
        })?;
        if seen.insert(resource, checked).is_some() {
            return Err(Error::invalid(
                field("resource"),
                format!("{resource} is given twice"),
            ));
        }
    }
    Ok(seen.into_iter().collect())
}

pub fn quota_to_wire(user_id: &UserId, limits: &BTreeMap<Resource, Limit>) -> pb::UserQuota {
    pb::UserQuota {
        user_id: user_id.to_string(),
        limits: limits
            .iter()
            .map(|(resource, limit)| pb::QuotaLimit {
                resource: resource.name().to_string(),
                limit: limit.limit,
                window: (!limit.window.is_zero()).then(|| duration_to_wire(limit.window)),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl UserStateService for WorkerUserState {
    async fn set_user_quota(
        &self,
        request: Request<pb::SetUserQuotaRequest>,
    ) -> Result<Response<pb::UserQuota>, Status> {
        let (metadata, _, message) = request.into_parts();
        let user_id = self.owned_user(message.user_id, &metadata).await?;
        let limits = limits_from_wire(&message.limits).map_err(WorkerError::from)?;
        let effective = self
            .quotas
            .set_overrides(&user_id, &limits, message.clear)
            .await?;
        let set: Vec<String> = limits
            .iter()
            .map(|(resource, limit)| {
                if limit.window.is_zero() {
                    format!("{resource}={}", limit.limit)
                } else {
                    format!(
                        "{resource}={}/{}",
                        limit.limit,
                        humantime::format_duration(limit.window)
                    )
                }
            })
            .collect();
        crate::audit::event(
            "quota overrides set",
            &crate::audit::caller(&metadata),
            &user_id,
            None,
            &format!(
                "{}{}",
                if message.clear { "cleared; " } else { "" },
                if set.is_empty() {
                    "no overrides".to_string()
                } else {
                    set.join(" ")
                }
            ),
        );
        Ok(Response::new(quota_to_wire(&user_id, &effective)))
    }

    async fn get_user_quota(
        &self,
        request: Request<pb::GetUserQuotaRequest>,
    ) -> Result<Response<pb::UserQuota>, Status> {
        let (metadata, _, message) = request.into_parts();
        let user_id = self.owned_user(message.user_id, &metadata).await?;
        let effective = self.quotas.effective(&user_id).await?;
        Ok(Response::new(quota_to_wire(&user_id, &effective)))
    }

    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let user_id = self.owned_user(message.user_id, &metadata).await?;
        let usage = self.quotas.usage(&user_id).await?;
        Ok(Response::new(pb::GetUsageResponse {
            user_id: user_id.to_string(),
            usage: usage
                .into_iter()
                .map(|usage| pb::ResourceUsage {
                    resource: usage.resource.name().to_string(),
                    used: usage.used,
                    limit: usage.limit.limit,
                    window: (!usage.limit.window.is_zero())
                        .then(|| duration_to_wire(usage.limit.window)),
                    percent: if usage.limit.limit > 0.0 {
                        usage.used / usage.limit.limit * 100.0
                    } else if usage.used > 0.0 {
                        100.0
                    } else {
                        0.0
                    },
                })
                .collect(),
        }))
    }

    async fn erase_user(
        &self,
        request: Request<pb::EraseUserRequest>,
    ) -> Result<Response<pb::EraseUserResponse>, Status> {
        let (metadata, _, message) = request.into_parts();
        let user_id = self.owned_user(message.user_id, &metadata).await?;
        let caller = crate::audit::caller(&metadata);
        let ended = self.sessions.end_all_of(&user_id).await?;
        for session_id in &ended {
            crate::audit::event(
                "session erased",
                &caller,
                &user_id,
                Some(*session_id),
                "ended with its context and data key",
            );
        }
        let (usage_erased, overrides_erased) = self.quotas.erase(&user_id).await?;
        crate::audit::event(
            "user erased",
            &caller,
            &user_id,
            None,
            &format!(
                "{} sessions ended, usage {}, overrides {}",
                ended.len(),
                if usage_erased { "dropped" } else { "none" },
                if overrides_erased { "dropped" } else { "none" }
            ),
        );
        Ok(Response::new(pb::EraseUserResponse {
            user_id: user_id.to_string(),
            session_ids: ended.iter().map(ToString::to_string).collect(),
            usage_erased,
            overrides_erased,
        }))
    }
}
