//! `switchyard ctl`: the operator's view of a running cluster, through the coordinator.
//! Human tables by default, one JSON object with `--json`.

use std::io::Write;
use std::time::Duration;

use clap::{Args, Subcommand};
use switchyard::SwitchyardClient;
use switchyard::conversions::system_time_from;
use switchyard::pb;

use crate::admin::{AdminTarget, QuotaCommand, QuotaUserArgs, run_quota};

mod health;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Args)]
pub struct CtlArgs {
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Subcommand)]
pub enum CtlCommand {
    /// The cluster in one line: epoch, workers, slots without an owner, sessions.
    Status(Plain),
    /// Every worker the coordinator knows: state, address, slots, sessions, load.
    Workers(Plain),
    /// Slots and load per worker, as bars, and the placement epoch.
    Placement(Plain),
    /// A user's live sessions.
    Sessions(UserArgs),
    /// A session's context (needs the session's token).
    Context(ContextArgs),
    /// What a user has used of each limited resource.
    Usage(UserArgs),
    /// Show or set a user's quota.
    #[command(subcommand)]
    Quota(QuotaCommand),
    /// A session's health: turns, errors, latency p50 and p95, tokens, score and status.
    Health(health::HealthArgs),
    /// Alerts of every worker and of the coordinator, newest first.
    Alerts(health::AlertsArgs),
    /// Move a worker's slots away and wait until it has handed them over and left.
    Drain(DrainArgs),
    /// Recompute the placement from the workers' current loads.
    Rebalance(Plain),
}

#[derive(Args)]
pub struct Plain {
    #[command(flatten)]
    pub target: AdminTarget,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct UserArgs {
    pub user_id: String,
    #[command(flatten)]
    pub target: AdminTarget,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct ContextArgs {
    pub session_id: String,
    /// The session's token (from CreateSession or RefreshToken).
    #[arg(long, env = "SWITCHYARD_SESSION_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Only the last N messages.
    #[arg(long, default_value_t = 0)]
    pub last: u32,
    #[command(flatten)]
    pub target: AdminTarget,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DrainArgs {
    pub worker_id: String,
    /// How long to wait for the worker to leave.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub target: AdminTarget,
    #[arg(long)]
    pub json: bool,
}

fn state_name(state: i32) -> &'static str {
    match pb::WorkerState::try_from(state) {
        Ok(pb::WorkerState::Joining) => "joining",
        Ok(pb::WorkerState::Active) => "active",
        Ok(pb::WorkerState::Draining) => "draining",
        Ok(pb::WorkerState::Dead) => "dead",
        _ => "unknown",
    }
}

fn print_json(value: serde_json::Value) -> Result<(), BoxError> {
    writeln!(std::io::stdout(), "{value}")?;
    Ok(())
}

/// A bar of `width` cells, `part` of `whole` filled.
fn bar(part: u64, whole: u64, width: usize) -> String {
    let filled = if whole == 0 {
        0
    } else {
        ((part as f64 / whole as f64) * width as f64).round() as usize
    };
    format!(
        "{}{}",
        "█".repeat(filled.min(width)),
        "·".repeat(width - filled.min(width))
    )
}

/// Where a draining worker stands: its state, slots and sessions (`None` if unknown).
async fn drain_progress(target: &AdminTarget, worker_id: &str) -> Option<String> {
    let workers = target
        .client()
        .ok()?
        .list_workers(target.request(pb::ListWorkersRequest {}).ok()?)
        .await
        .ok()?
        .into_inner()
        .workers;
    let worker = workers
        .iter()
        .find(|worker| worker.worker_id == worker_id)?;
    Some(format!(
        "{}: {}, {} slots, {} sessions",
        worker.worker_id,
        state_name(worker.state),
        worker.slot_count,
        worker.session_count
    ))
}

/// Drains a worker, as `switchyard drain` does; returns whether it left.
pub async fn drain(
    target: &AdminTarget,
    worker_id: &str,
    timeout: Duration,
) -> Result<pb::DrainWorkerResponse, BoxError> {
    let mut request = target.request(pb::DrainWorkerRequest {
        worker_id: worker_id.to_string(),
        wait: true,
    })?;
    request.set_timeout(timeout);
    Ok(target
        .client()?
        .drain_worker(request)
        .await
        .map_err(|status| target.failed(status))?
        .into_inner())
}

pub async fn run(args: CtlArgs) -> Result<(), BoxError> {
    let mut out = std::io::stdout();
    match args.command {
        CtlCommand::Status(args) => {
            let status = args
                .target
                .client()?
                .cluster_status(args.target.request(pb::ClusterStatusRequest {})?)
                .await
                .map_err(|status| args.target.failed(status))?
                .into_inner();
            if args.json {
                return print_json(serde_json::json!({
                    "epoch": status.epoch,
                    "slot_count": status.slot_count,
                    "live_workers": status.live_workers,
                    "dead_workers": status.dead_workers,
                    "unassigned_slots": status.unassigned_slots,
                    "session_count": status.session_count,
                    "serving": status.serving,
                }));
            }
            writeln!(
                out,
                "{}: epoch {}, {} live workers ({} dead), {} of {} slots without an owner, {} sessions",
                if status.serving {
                    "serving"
                } else {
                    "NOT SERVING"
                },
                status.epoch,
                status.live_workers,
                status.dead_workers,
                status.unassigned_slots,
                status.slot_count,
                status.session_count
            )?;
        }
        CtlCommand::Workers(args) => {
            let workers = args
                .target
                .client()?
                .list_workers(args.target.request(pb::ListWorkersRequest {})?)
                .await
                .map_err(|status| args.target.failed(status))?
                .into_inner()
                .workers;
            if args.json {
                let rows: Vec<_> = workers
                    .iter()
                    .map(|worker| {
                        serde_json::json!({
                            "worker_id": worker.worker_id,
                            "address": worker.address,
                            "state": state_name(worker.state),
                            "slots": worker.slot_count,
                            "sessions": worker.session_count,
                            "load": worker.load,
                        })
                    })
                    .collect();
                return print_json(serde_json::json!({ "workers": rows }));
            }
            writeln!(
                out,
                "{:<20} {:<9} {:<22} {:>6} {:>9} {:>7}",
                "WORKER", "STATE", "ADDRESS", "SLOTS", "SESSIONS", "LOAD"
            )?;
            for worker in &workers {
                writeln!(
                    out,
                    "{:<20} {:<9} {:<22} {:>6} {:>9} {:>7}",
                    worker.worker_id,
                    state_name(worker.state),
                    worker.address,
                    worker.slot_count,
                    worker.session_count,
                    worker.load
                )?;
            }
        }
        CtlCommand::Placement(args) => {
            let mut admin = args.target.client()?;
            let placement = admin
                .get_placement(args.target.request(pb::GetPlacementRequest::default())?)
                .await
                .map_err(|status| args.target.failed(status))?
                .into_inner();
            let workers = admin
                .list_workers(args.target.request(pb::ListWorkersRequest {})?)
                .await
                .map_err(|status| args.target.failed(status))?
                .into_inner()
                .workers;
            let total_load: u64 = workers.iter().map(|worker| worker.load).sum();
            if args.json {
                let rows: Vec<_> = workers
                    .iter()
                    .filter(|worker| worker.slot_count > 0)
                    .map(|worker| {
                        serde_json::json!({
                            "worker_id": worker.worker_id,
                            "slots": worker.slot_count,
                            "load": worker.load,
                        })
                    })
                    .collect();
                return print_json(serde_json::json!({
                    "epoch": placement.epoch,
                    "slot_count": placement.slot_count,
                    "assigned_slots": placement.assignments.len(),
                    "workers": rows,
                }));
            }
            writeln!(
                out,
                "epoch {}, {} of {} slots assigned",
                placement.epoch,
                placement.assignments.len(),
                placement.slot_count
            )?;
            for worker in workers.iter().filter(|worker| worker.slot_count > 0) {
                writeln!(
                    out,
                    "{:<20} slots {} {:>5}   load {} {:>6}",
                    worker.worker_id,
                    bar(
                        u64::from(worker.slot_count),
                        u64::from(placement.slot_count),
                        20
                    ),
                    worker.slot_count,
                    bar(worker.load, total_load, 20),
                    worker.load
                )?;
            }
        }
        CtlCommand::Sessions(args) => {
            let client = session_client(&args.target).await?;
            let sessions = client
                .list_sessions(&args.user_id)
                .await
                .map_err(|status| args.target.failed(status))?;
            if args.json {
                let rows: Vec<_> = sessions
                    .iter()
                    .map(|session| {
                        serde_json::json!({
                            "session_id": session.session_id,
                            "worker_id": session.worker_id,
                            "message_count": session.message_count,
                            "created_at": session.created_at.as_ref().map(|at| timestamp(system_time_from(at))),
                            "metadata": session.metadata,
                        })
                    })
                    .collect();
                return print_json(
                    serde_json::json!({ "user_id": args.user_id, "sessions": rows }),
                );
            }
            writeln!(
                out,
                "{:<38} {:<20} {:>9}  CREATED",
                "SESSION", "WORKER", "MESSAGES"
            )?;
            for session in &sessions {
                writeln!(
                    out,
                    "{:<38} {:<20} {:>9}  {}",
                    session.session_id,
                    session.worker_id,
                    session.message_count,
                    session
                        .created_at
                        .as_ref()
                        .map(|at| timestamp(system_time_from(at)))
                        .unwrap_or_default()
                )?;
            }
        }
        CtlCommand::Context(args) => {
            let client = session_client(&args.target).await?;
            client.set_token(args.session_id.clone(), args.token.clone());
            let messages = client
                .get_context(&args.session_id, args.last, 0)
                .await
                .map_err(|status| args.target.failed(status))?;
            if args.json {
                let rows: Vec<_> = messages
                    .iter()
                    .map(|message| {
                        serde_json::json!({
                            "seq": message.seq,
                            "role": message.role,
                            "name": message.name,
                            "content": message.content,
                        })
                    })
                    .collect();
                return print_json(
                    serde_json::json!({ "session_id": args.session_id, "messages": rows }),
                );
            }
            for message in &messages {
                let who = if message.name.is_empty() {
                    message.role.clone()
                } else {
                    format!("{} ({})", message.role, message.name)
                };
                writeln!(out, "#{:<5} {who}: {}", message.seq, message.content)?;
            }
        }
        CtlCommand::Usage(args) => {
            run_quota(QuotaCommand::Usage(QuotaUserArgs {
                user_id: args.user_id,
                target: args.target,
                json: args.json,
            }))
            .await?;
        }
        CtlCommand::Quota(command) => run_quota(command).await?,
        CtlCommand::Health(args) => health::health(args).await?,
        CtlCommand::Alerts(args) => health::alerts(args).await?,
        CtlCommand::Drain(args) => {
            let reply = if args.json {
                drain(&args.target, &args.worker_id, args.timeout).await?
            } else {
                writeln!(out, "draining {}: moving its slots away…", args.worker_id)?;
                let drained = drain(&args.target, &args.worker_id, args.timeout);
                tokio::pin!(drained);
                let mut shown = None;
                let mut every = tokio::time::interval(Duration::from_millis(250));
                loop {
                    tokio::select! {
                        reply = &mut drained => break reply?,
                        _ = every.tick() => {
                            let progress = drain_progress(&args.target, &args.worker_id).await;
                            if progress.is_some() && progress != shown {
                                writeln!(out, "  {}", progress.as_deref().unwrap_or_default())?;
                                shown = progress;
                            }
                        }
                    }
                }
            };
            if args.json {
                return print_json(serde_json::json!({
                    "worker_id": args.worker_id,
                    "epoch": reply.epoch,
                    "slots_moved": reply.slots_moved,
                    "left": reply.left,
                }));
            }
            if !reply.left {
                return Err(format!(
                    "worker {} has not left within {} (slots moved: {}, epoch {}); it goes on handing over",
                    args.worker_id,
                    humantime::format_duration(args.timeout),
                    reply.slots_moved,
                    reply.epoch
                )
                .into());
            }
            writeln!(
                out,
                "worker {} drained: {} slots moved (epoch {}), and it has left the cluster",
                args.worker_id, reply.slots_moved, reply.epoch
            )?;
        }
        CtlCommand::Rebalance(args) => {
            if !args.json {
                writeln!(out, "rebalancing from the workers' current loads…")?;
            }
            let reply = args
                .target
                .client()?
                .rebalance(args.target.request(pb::RebalanceRequest {})?)
                .await
                .map_err(|status| args.target.failed(status))?
                .into_inner();
            if args.json {
                return print_json(serde_json::json!({
                    "epoch": reply.epoch,
                    "slots_moved": reply.slots_moved,
                    "max_over_average_load": reply.max_over_average_load,
                }));
            }
            writeln!(
                out,
                "epoch {}: {} slots moved; the heaviest worker carries {:.2}× the average load",
                reply.epoch, reply.slots_moved, reply.max_over_average_load
            )?;
        }
    }
    Ok(())
}

fn timestamp(time: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// A SessionService client of the coordinator, with the API key.
async fn session_client(target: &AdminTarget) -> Result<SwitchyardClient, BoxError> {
    let mut client = match &target.tls_ca {
        Some(ca) => SwitchyardClient::connect_tls(target.coordinator.clone(), ca).await?,
        None => SwitchyardClient::connect(target.coordinator.clone()).await?,
    };
    if let Some(key) = &target.api_key {
        client = client.with_api_key(key)?;
    }
    Ok(client)
}
