//! The worker's side of membership: register, heartbeat, learn the placement table, leave.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::auth::node_credential;
use switchyard::conversions::placement_from_wire;
use switchyard::metadata::NODE_CREDENTIAL;
use switchyard::pb;
use switchyard::pb::membership_service_client::MembershipServiceClient;
use switchyard::tls::lazy_channel;
use switchyard_core::{ClusterKey, NodeRole, RetryPolicy, WorkerId};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::WorkerConfig;
use crate::ownership::SlotOwnership;
use crate::sessions::SessionManager;

/// Longest pause between registration attempts while the coordinator is unreachable.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);
/// Bound on one membership call, so a hung coordinator cannot stall the loop.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
const REGISTER: &str = "/switchyard.v1.MembershipService/Register";
const HEARTBEAT: &str = "/switchyard.v1.MembershipService/Heartbeat";
const LEAVE: &str = "/switchyard.v1.MembershipService/Leave";

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("invalid coordinator URL {url:?}: {source}")]
    InvalidUrl {
        url: String,
        source: switchyard::tls::TlsError,
    },
    #[error("the coordinator refused registration: {0}")]
    Refused(String),
    #[error("the coordinator sent an invalid placement table: {0}")]
    InvalidPlacement(String),
    #[error("stopped before registering")]
    Stopped,
}

/// What registration granted.
pub struct Registration {
    pub registration_id: String,
    pub heartbeat_interval: Duration,
    pub lease: Duration,
}

pub struct MembershipClient {
    client: MembershipServiceClient<Channel>,
    worker_id: WorkerId,
    address: String,
    token_key_id: String,
    cluster_id: String,
    cluster_key: ClusterKey,
    /// New at every start of this process: the coordinator refuses another instance that
    /// registers this worker's id while this one's lease runs.
    incarnation_id: String,
    placement: Arc<SlotOwnership>,
}

impl MembershipClient {
    /// The membership client of the worker `config` describes, advertising `address`, with
    /// a store of cluster `cluster_id`.
    pub fn new(
        config: &WorkerConfig,
        address: String,
        cluster_id: String,
        placement: Arc<SlotOwnership>,
    ) -> Result<Self, MembershipError> {
        let coordinator_url = config.coordinator_url.as_str();
        let channel = lazy_channel(
            coordinator_url,
            config.coordinator_tls.clone(),
            |endpoint| endpoint.connect_timeout(CALL_TIMEOUT),
        )
        .map_err(|source| MembershipError::InvalidUrl {
            url: coordinator_url.to_string(),
            source,
        })?;
        Ok(MembershipClient {
            client: MembershipServiceClient::new(channel),
            worker_id: config.worker_id.clone(),
            address,
            token_key_id: config.token_key.id(),
            cluster_id,
            cluster_key: config.cluster_key.clone(),
            incarnation_id: uuid::Uuid::new_v4().to_string(),
            placement,
        })
    }

    /// A membership request carrying this worker's node credential for `path`.
    fn request<T>(&self, path: &str, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.metadata_mut().insert(
            NODE_CREDENTIAL,
            node_credential(
                &self.cluster_key,
                NodeRole::Worker,
                self.worker_id.as_str(),
                path,
            ),
        );
        request.set_timeout(CALL_TIMEOUT);
        request
    }

    /// Registers, retrying while the coordinator is unreachable. A refusal (a token key
    /// that differs from the coordinator's, say) is final.
    pub async fn register(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Registration, MembershipError> {
        let backoff = RetryPolicy {
            attempts: u32::MAX,
            first_backoff: Duration::from_millis(50),
            max_backoff: MAX_RETRY_DELAY,
        };
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.try_register().await {
                Ok(registration) => return Ok(registration),
                Err(status) if is_refusal(&status) => {
                    return Err(MembershipError::Refused(status.message().to_string()));
                }
                Err(status) => {
                    tracing::warn!(
                        worker_id = %self.worker_id,
                        attempt,
                        error = %status.message(),
                        "coordinator not reachable yet, retrying registration"
                    );
                }
            }
            // Jittered, so workers restarted together do not register in lockstep.
            tokio::select! {
                _ = tokio::time::sleep(backoff.backoff(attempt - 1)) => {}
                _ = shutdown.cancelled() => return Err(MembershipError::Stopped),
            }
        }
    }

    async fn try_register(&self) -> Result<Registration, Status> {
        let sent_at = Instant::now();
        let request = self.request(
            REGISTER,
            pb::RegisterRequest {
                worker_id: self.worker_id.to_string(),
                address: self.address.clone(),
                token_key_id: self.token_key_id.clone(),
                cluster_id: self.cluster_id.clone(),
                known_epoch: self.placement.current().epoch().0,
                incarnation_id: self.incarnation_id.clone(),
            },
        );
        let response = self.client.clone().register(request).await?.into_inner();
        let lease = Duration::from_millis(u64::from(response.lease_ms));
        let table = response
            .placement
            .ok_or_else(|| Status::internal("registration reply carries no placement table"))?;
        self.install(table)?;
        self.placement.renew_lease(sent_at, lease);
        self.placement.set_handoff_timing(
            Duration::from_millis(u64::from(response.handoff_grace_ms)),
            Duration::from_millis(u64::from(response.heartbeat_interval_ms)),
        );
        tracing::info!(
            worker_id = %self.worker_id,
            address = %self.address,
            epoch = %self.placement.current().epoch(),
            "registered with the coordinator"
        );
        Ok(Registration {
            registration_id: response.registration_id,
            heartbeat_interval: Duration::from_millis(u64::from(response.heartbeat_interval_ms)),
            lease,
        })
    }

    fn install(&self, table: pb::PlacementTable) -> Result<(), Status> {
        let table = placement_from_wire(table).map_err(|error| {
            Status::internal(MembershipError::InvalidPlacement(error.to_string()).to_string())
        })?;
        let epoch = table.epoch();
        if self.placement.install(table) {
            tracing::debug!(worker_id = %self.worker_id, %epoch, "placement table installed");
        }
        Ok(())
    }

    /// Heartbeats until `shutdown`, re-registering when the coordinator no longer knows
    /// this worker (it restarted, or declared the worker dead), then leaves the cluster.
    pub async fn run(
        self,
        mut registration: Registration,
        sessions: Arc<SessionManager>,
        shutdown: CancellationToken,
    ) {
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(jittered_interval(registration.heartbeat_interval)) => {}
                _ = self.placement.refresh_requested().notified() => {}
                _ = shutdown.cancelled() => break,
            }
            match self.heartbeat(&registration, &sessions).await {
                Ok(()) => failures = 0,
                Err(status) if status.code() == Code::NotFound => {
                    tracing::warn!(worker_id = %self.worker_id, "coordinator no longer knows this worker, registering again");
                    self.placement.expire_lease();
                    self.placement.set_fences_verified(false);
                    match self.register(&shutdown).await {
                        Ok(renewed) => registration = renewed,
                        Err(MembershipError::Stopped) => break,
                        Err(error) => {
                            tracing::error!(worker_id = %self.worker_id, %error, "registration refused");
                            break;
                        }
                    }
                }
                Err(status) => {
                    failures += 1;
                    // One line per outage, then one every ten failures.
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(worker_id = %self.worker_id, failures, error = %status.message(), "heartbeat failed");
                    }
                }
            }
        }
        self.leave(&registration).await;
    }

    async fn heartbeat(
        &self,
        registration: &Registration,
        sessions: &SessionManager,
    ) -> Result<(), Status> {
        let sent_at = Instant::now();
        let request = self.request(
            HEARTBEAT,
            pb::HeartbeatRequest {
                worker_id: self.worker_id.to_string(),
                registration_id: registration.registration_id.clone(),
                known_epoch: self.placement.current().epoch().0,
                session_count: sessions.hot_count() as u64,
                slot_loads: sessions
                    .slot_loads()
                    .into_iter()
                    .map(|(slot, sessions)| pb::SlotLoad { slot, sessions })
                    .collect(),
            },
        );
        let response = self.client.clone().heartbeat(request).await?.into_inner();
        if let Some(table) = response.placement {
            self.install(table)?;
        }
        if response.drain && !self.placement.is_draining() {
            tracing::info!(worker_id = %self.worker_id, "draining: handing over every slot, then leaving");
            self.placement.set_draining(true);
        }
        self.placement.renew_lease(sent_at, registration.lease);
        Ok(())
    }

    async fn leave(&self, registration: &Registration) {
        self.placement.expire_lease();
        let request = self.request(
            LEAVE,
            pb::LeaveRequest {
                worker_id: self.worker_id.to_string(),
                registration_id: registration.registration_id.clone(),
            },
        );
        match self.client.clone().leave(request).await {
            Ok(_) => tracing::info!(worker_id = %self.worker_id, "left the cluster"),
            Err(status) => {
                tracing::warn!(worker_id = %self.worker_id, error = %status.message(), "could not leave the cluster; the lease will expire")
            }
        }
    }
}

/// The heartbeat interval give or take a tenth, drawn anew each time, so that workers
/// started together spread their heartbeats over the interval.
fn jittered_interval(interval: Duration) -> Duration {
    let tenth = interval / 10;
    interval - tenth + switchyard_core::retry::jittered(tenth * 2)
}

/// Final answers to a registration. UNAUTHENTICATED (another cluster secret) is final too;
/// ALREADY_EXISTS is not: the previous instance's lease runs out.
fn is_refusal(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_intervals_are_spread_within_a_tenth() {
        let interval = Duration::from_millis(500);
        let drawn: Vec<Duration> = (0..200).map(|_| jittered_interval(interval)).collect();
        assert!(
            drawn
                .iter()
                .all(|wait| *wait >= Duration::from_millis(450)
                    && *wait <= Duration::from_millis(550))
        );
        assert!(drawn.windows(2).any(|pair| pair[0] != pair[1]));
    }
}
