//! `ctl health SESSION` and `ctl alerts`.

use std::io::Write;
use std::time::{Duration, SystemTime};

use clap::Args;
use switchyard::conversions::system_time_from;
use switchyard::pb;

use super::{BoxError, print_json, timestamp};
use crate::admin::AdminTarget;

#[derive(Args)]
pub struct HealthArgs {
    pub session_id: String,
    #[command(flatten)]
    pub target: AdminTarget,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct AlertsArgs {
    /// Only alerts seen in this last stretch of time, e.g. 15m or 2h.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    /// Only alerts at least this bad: warning or critical.
    #[arg(long)]
    pub severity: Option<String>,
    /// Only alerts about this user.
    #[arg(long)]
    pub user: Option<String>,
    #[command(flatten)]
    pub target: AdminTarget,
    #[arg(long)]
    pub json: bool,
}

fn seconds(duration: Option<&prost_types::Duration>) -> Option<f64> {
    duration.map(|duration| duration.seconds as f64 + f64::from(duration.nanos) / 1e9)
}

fn millis(duration: Option<&prost_types::Duration>) -> String {
    seconds(duration).map_or_else(
        || "-".to_string(),
        |seconds| format!("{:.0} ms", seconds * 1e3),
    )
}

pub async fn health(args: HealthArgs) -> Result<(), BoxError> {
    let health = args
        .target
        .client()?
        .get_session_health(args.target.request(pb::GetSessionHealthRequest {
            session_id: args.session_id.clone(),
        })?)
        .await
        .map_err(|status| args.target.failed(status))?
        .into_inner();
    if args.json {
        return print_json(serde_json::json!({
            "session_id": health.session_id,
            "user_id": health.user_id,
            "worker_id": health.worker_id,
            "hot": health.hot,
            "turns": health.turns,
            "errors": health.errors,
            "prompt_tokens": health.prompt_tokens,
            "completion_tokens": health.completion_tokens,
            "latency_p50_seconds": seconds(health.latency_p50.as_ref()),
            "latency_p95_seconds": seconds(health.latency_p95.as_ref()),
            "score": health.score,
            "status": health.status,
            "agent_type": health.agent_type,
            "slow_turn_seconds": seconds(health.slow_turn.as_ref()),
            "recent_errors": health.recent_errors,
            "recent_turns": health.recent_turns,
        }));
    }
    let mut out = std::io::stdout();
    writeln!(
        out,
        "session {} of user {} on worker {}{}",
        health.session_id,
        health.user_id,
        health.worker_id,
        if health.hot {
            ""
        } else {
            " (not hot: no turns since it was loaded)"
        }
    )?;
    writeln!(
        out,
        "status     {} (score {:.2})",
        health.status, health.score
    )?;
    writeln!(
        out,
        "turns      {} ({} failed; {} of the last {})",
        health.turns, health.errors, health.recent_errors, health.recent_turns
    )?;
    writeln!(
        out,
        "latency    p50 {}, p95 {} (slow above {} for {})",
        millis(health.latency_p50.as_ref()),
        millis(health.latency_p95.as_ref()),
        millis(health.slow_turn.as_ref()),
        if health.agent_type.is_empty() {
            "-"
        } else {
            &health.agent_type
        }
    )?;
    writeln!(
        out,
        "tokens     {} prompt, {} completion",
        health.prompt_tokens, health.completion_tokens
    )?;
    Ok(())
}

pub async fn alerts(args: AlertsArgs) -> Result<(), BoxError> {
    let since = args
        .since
        .map(|ago| switchyard::conversions::timestamp_from(SystemTime::now() - ago));
    let listed = args
        .target
        .client()?
        .list_alerts(args.target.request(pb::ListAlertsRequest {
            since,
            severity: args.severity.clone().unwrap_or_default(),
            user_id: args.user.clone().unwrap_or_default(),
        })?)
        .await
        .map_err(|status| args.target.failed(status))?
        .into_inner();
    let when = |at: Option<&prost_types::Timestamp>| at.map(|at| timestamp(system_time_from(at)));
    if args.json {
        let alerts: Vec<serde_json::Value> = listed
            .alerts
            .iter()
            .map(|alert| {
                serde_json::json!({
                    "kind": alert.kind,
                    "severity": alert.severity,
                    "subject": alert.subject,
                    "message": alert.message,
                    "user_id": alert.user_id,
                    "session_id": alert.session_id,
                    "node": alert.node,
                    "first_seen": when(alert.first_seen.as_ref()),
                    "last_seen": when(alert.last_seen.as_ref()),
                    "count": alert.count,
                })
            })
            .collect();
        return print_json(serde_json::json!({
            "alerts": alerts,
            "unreachable_workers": listed.unreachable_workers,
        }));
    }
    let mut out = std::io::stdout();
    if listed.alerts.is_empty() {
        writeln!(out, "no alerts")?;
    } else {
        writeln!(
            out,
            "{:<9} {:<15} {:<21} {:>6}  {:<14} MESSAGE",
            "SEVERITY", "KIND", "LAST SEEN", "COUNT", "NODE"
        )?;
    }
    for alert in &listed.alerts {
        writeln!(
            out,
            "{:<9} {:<15} {:<21} {:>6}  {:<14} {}",
            alert.severity,
            alert.kind,
            when(alert.last_seen.as_ref()).unwrap_or_default(),
            alert.count,
            alert.node,
            alert.message
        )?;
    }
    if !listed.unreachable_workers.is_empty() {
        writeln!(
            out,
            "not answering (their alerts are missing): {}",
            listed.unreachable_workers.join(", ")
        )?;
    }
    Ok(())
}
