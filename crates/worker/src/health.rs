//! Session health and the worker's alerts.
//!
//! Each hot session keeps what its turns did ([`TurnHealth`]): counts, tokens, a latency
//! histogram, and the outcomes of the last 20. Its score and status follow the formula in
//! [`switchyard_core::health`]. Health lives in the worker's memory while the session is
//! hot here: a session loaded again (after passivation or a handoff) starts afresh.
//!
//! The worker raises alerts into a bounded log (the [`ALERT_CAPACITY`] seen most recently):
//! a session whose recent turns fail, a session whose turns are slow for their agent type,
//! a user above 80% or 95% of a quota, an agent pool that made a turn wait or refused it.
//! Each raise also counts in `switchyard_alerts_total{kind}`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use switchyard_agents::PoolConfig;
use switchyard_core::UserId;
use switchyard_core::alerts::{Alert, AlertFilter, AlertLog, Raise, Severity};
use switchyard_core::health::{HealthStatus, TurnHealth};

use crate::sessions::HotSession;

/// Alerts a worker keeps.
pub const ALERT_CAPACITY: usize = 512;
/// A session's recent turns fail this often, over at least [`ERROR_RATE_MIN_TURNS`] turns.
const ERROR_RATE_ALERT: f64 = 0.5;
const ERROR_RATE_MIN_TURNS: u32 = 4;

/// How a turn ended, for its session's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnEnd {
    Succeeded,
    Failed,
    /// The caller left, or a quota refused it: nothing about the session's agent.
    NotCounted,
}

/// One hot session's health.
#[derive(Debug, Clone)]
pub struct SessionHealth {
    pub turns: TurnHealth,
    /// The slow-turn threshold of the agent type of its latest turn.
    pub slow_after: Duration,
    pub agent_type: String,
}

impl Default for SessionHealth {
    fn default() -> Self {
        SessionHealth {
            turns: TurnHealth::default(),
            slow_after: switchyard_agents::DEFAULT_SLOW_TURN,
            agent_type: String::new(),
        }
    }
}

impl SessionHealth {
    pub fn score(&self) -> f64 {
        self.turns.score(self.slow_after)
    }

    pub fn status(&self) -> HealthStatus {
        HealthStatus::of(self.score())
    }
}

/// The worker's alert log.
pub struct WorkerAlerts {
    log: AlertLog,
}

impl Default for WorkerAlerts {
    fn default() -> Self {
        WorkerAlerts {
            log: AlertLog::new(ALERT_CAPACITY),
        }
    }
}

impl WorkerAlerts {
    pub fn raise(&self, raise: Raise) {
        metrics::counter!("switchyard_alerts_total", "kind" => raise.kind).increment(1);
        tracing::debug!(kind = raise.kind, subject = %raise.subject, severity = raise.severity.as_str(), message = %raise.message, "alert");
        self.log.raise(raise, SystemTime::now());
    }

    pub fn list(&self, filter: &AlertFilter) -> Vec<Alert> {
        self.log.list(filter)
    }

    /// A turn of `session` ended: its health takes it in, and alerts follow from it.
    pub fn turn_ended(
        &self,
        session: &HotSession,
        user_id: Option<&UserId>,
        agent_type: &str,
        pool: &PoolConfig,
        end: TurnEnd,
        latency: Duration,
    ) {
        let failed = match end {
            TurnEnd::Succeeded => false,
            TurnEnd::Failed => true,
            TurnEnd::NotCounted => return,
        };
        let session_id = session.session_id;
        let (recent_errors, p95, slow) = {
            let mut health = session
                .health
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            health.turns.record(failed, latency);
            health.slow_after = pool.slow_turn;
            if health.agent_type != agent_type {
                health.agent_type = agent_type.to_string();
            }
            (
                health.turns.recent_errors(),
                health.turns.p95(),
                health.turns.is_slow(pool.slow_turn),
            )
        };
        let user = user_id.map(ToString::to_string);
        let (failed_turns, recent) = recent_errors;
        if failed
            && recent >= ERROR_RATE_MIN_TURNS
            && f64::from(failed_turns) / f64::from(recent) >= ERROR_RATE_ALERT
        {
            self.raise(Raise {
                kind: "error_rate",
                subject: session_id.to_string(),
                severity: Severity::Critical,
                message: format!(
                    "session {session_id}: {failed_turns} of its last {recent} turns failed (agent type {agent_type})"
                ),
                user_id: user.clone(),
                session_id: Some(session_id.to_string()),
            });
        }
        if slow && let Some(p95) = p95 {
            self.raise(Raise {
                kind: "slow_turns",
                subject: session_id.to_string(),
                severity: Severity::Warning,
                message: format!(
                    "session {session_id}: turn p95 {} is above agent type {agent_type}'s {}",
                    humantime::format_duration(round_ms(p95)),
                    humantime::format_duration(pool.slow_turn)
                ),
                user_id: user,
                session_id: Some(session_id.to_string()),
            });
        }
    }

    /// A turn's agent instance was had only by waiting (`refused`: not even then).
    pub fn pool_exhausted(
        &self,
        agent_type: &str,
        pool: &PoolConfig,
        waited: Duration,
        refused: bool,
        user_id: Option<&UserId>,
    ) {
        let (severity, what) = if refused {
            (Severity::Critical, "refused a turn")
        } else {
            (Severity::Warning, "made a turn wait")
        };
        self.raise(Raise {
            kind: "pool_exhausted",
            subject: agent_type.to_string(),
            severity,
            message: format!(
                "agent pool {agent_type} at its max of {} {what} ({} for an instance)",
                pool.max,
                humantime::format_duration(round_ms(waited))
            ),
            user_id: user_id.map(ToString::to_string),
            session_id: None,
        });
    }

    /// The user has used `percent` of a quota after a call: 80% is a warning, 95% critical.
    pub fn quota_used(&self, user_id: &UserId, resource: &str, percent: f64, limit: &str) {
        let severity = if percent >= 95.0 {
            Severity::Critical
        } else if percent >= 80.0 {
            Severity::Warning
        } else {
            return;
        };
        self.raise(Raise {
            kind: "quota",
            subject: format!("{user_id}:{resource}"),
            severity,
            message: format!(
                "user {user_id} has used {percent:.0}% of its {resource} quota ({limit})"
            ),
            user_id: Some(user_id.to_string()),
            session_id: None,
        });
    }
}

fn round_ms(duration: Duration) -> Duration {
    Duration::from_millis(duration.as_millis() as u64)
}

/// The alerts of a worker, as a handle the session manager and its quotas share.
pub type Alerts = Arc<WorkerAlerts>;
