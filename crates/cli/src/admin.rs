//! Operator commands that call the coordinator's AdminService: `switchyard quota …`, and
//! the connection `switchyard drain` shares with them.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use switchyard::conversions::{duration_from_wire, duration_to_wire};
use switchyard::pb;
use switchyard::pb::admin_service_client::AdminServiceClient;
use switchyard::tls::ClientTlsFiles;
use tonic::transport::Channel;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the coordinator is and how to call it.
#[derive(Args, Clone)]
pub struct AdminTarget {
    /// The coordinator's URL, e.g. http://coordinator:50051.
    #[arg(long, env = "SWITCHYARD_COORDINATOR")]
    pub coordinator: String,
    /// An API key of the call's scope (admin for changes, admin-read to look), when the
    /// coordinator asks for keys.
    #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// CA (PEM) that signed the coordinator's certificate, for an https:// --coordinator.
    #[arg(long, env = "SWITCHYARD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl AdminTarget {
    pub fn client(&self) -> Result<AdminServiceClient<Channel>, BoxError> {
        let tls = match &self.tls_ca {
            Some(ca) => Some(
                ClientTlsFiles {
                    ca: ca.clone(),
                    identity: None,
                }
                .load()?,
            ),
            None => None,
        };
        let channel = switchyard::tls::lazy_channel(&self.coordinator, tls, |endpoint| {
            endpoint.connect_timeout(Duration::from_secs(5))
        })
        .map_err(|error| format!("--coordinator {:?}: {error}", self.coordinator))?;
        Ok(AdminServiceClient::new(channel))
    }

    /// `message` as a request carrying the API key.
    pub fn request<T>(&self, message: T) -> Result<tonic::Request<T>, BoxError> {
        let mut request = tonic::Request::new(message);
        if let Some(key) = &self.api_key {
            let value = format!("Bearer {key}")
                .parse()
                .map_err(|_| "--api-key holds characters that cannot be sent in metadata")?;
            request
                .metadata_mut()
                .insert(switchyard::metadata::AUTHORIZATION, value);
        }
        Ok(request)
    }

    /// A refusal as one line naming the coordinator, the code and the message.
    pub fn failed(&self, status: tonic::Status) -> BoxError {
        format!(
            "{}: {:?}: {}",
            self.coordinator,
            status.code(),
            status.message()
        )
        .into()
    }
}

#[derive(Subcommand)]
pub enum QuotaCommand {
    /// Show a user's effective limits (defaults, with the user's overrides on top).
    Get(QuotaUserArgs),
    /// Override limits of a user: each replaces the default of its resource.
    Set(QuotaSetArgs),
    /// Show what a user has used of each limited resource.
    Usage(QuotaUserArgs),
}

#[derive(Args)]
pub struct QuotaUserArgs {
    pub user_id: String,
    #[command(flatten)]
    pub target: AdminTarget,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct QuotaSetArgs {
    pub user_id: String,
    /// RESOURCE=LIMIT/WINDOW (tokens=100000/1h) or RESOURCE=LIMIT for a level
    /// (sessions=10); repeatable.
    #[arg(long = "limit", value_parser = switchyard_worker::quotas::parse_quota)]
    pub limits: Vec<(
        switchyard_core::quota::Resource,
        switchyard_worker::quotas::Limit,
    )>,
    /// Drop every override of the user first (alone: back to the defaults).
    #[arg(long)]
    pub clear: bool,
    #[command(flatten)]
    pub target: AdminTarget,
    #[arg(long)]
    pub json: bool,
}

pub async fn run_quota(command: QuotaCommand) -> Result<(), BoxError> {
    let mut out = std::io::stdout();
    match command {
        QuotaCommand::Get(args) => {
            let quota = args
                .target
                .client()?
                .get_user_quota(args.target.request(pb::GetUserQuotaRequest {
                    user_id: args.user_id.clone(),
                })?)
                .await
                .map_err(|status| args.target.failed(status))?
                .into_inner();
            write_quota(&mut out, &quota, args.json)?;
        }
        QuotaCommand::Set(args) => {
            if args.limits.is_empty() && !args.clear {
                return Err("give at least one --limit, or --clear".into());
            }
            let limits = args
                .limits
                .iter()
                .map(|(resource, limit)| pb::QuotaLimit {
                    resource: resource.name().to_string(),
                    limit: limit.limit,
                    window: (!limit.window.is_zero()).then(|| duration_to_wire(limit.window)),
                })
                .collect();
            let quota = args
                .target
                .client()?
                .set_user_quota(args.target.request(pb::SetUserQuotaRequest {
                    user_id: args.user_id.clone(),
                    limits,
                    clear: args.clear,
                })?)
                .await
                .map_err(|status| args.target.failed(status))?
                .into_inner();
            write_quota(&mut out, &quota, args.json)?;
        }
        QuotaCommand::Usage(args) => {
            let usage = args
                .target
                .client()?
                .get_usage(args.target.request(pb::GetUsageRequest {
                    user_id: args.user_id.clone(),
                })?)
                .await
                .map_err(|status| args.target.failed(status))?
                .into_inner();
            if args.json {
                let rows: Vec<_> = usage
                    .usage
                    .iter()
                    .map(|usage| {
                        serde_json::json!({
                            "resource": usage.resource,
                            "used": usage.used,
                            "limit": usage.limit,
                            "window_seconds": window_seconds(usage.window.as_ref().and_then(duration_from_wire)),
                            "percent": usage.percent,
                        })
                    })
                    .collect();
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"user_id": usage.user_id, "usage": rows})
                )?;
            } else {
                writeln!(
                    out,
                    "{:<18} {:>14} {:>14} {:>10} {:>7}",
                    "RESOURCE", "USED", "LIMIT", "WINDOW", "%"
                )?;
                for usage in &usage.usage {
                    writeln!(
                        out,
                        "{:<18} {:>14} {:>14} {:>10} {:>6.1}%",
                        usage.resource,
                        figure(usage.used),
                        figure(usage.limit),
                        window_text(usage.window.as_ref().and_then(duration_from_wire)),
                        usage.percent
                    )?;
                }
            }
        }
    }
    Ok(())
}

fn window_seconds(window: Option<Duration>) -> Option<f64> {
    window.map(|window| window.as_secs_f64())
}

fn window_text(window: Option<Duration>) -> String {
    match window {
        Some(window) if !window.is_zero() => humantime::format_duration(window).to_string(),
        _ => "-".to_string(),
    }
}

fn figure(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.4}")
    }
}

fn write_quota(out: &mut impl Write, quota: &pb::UserQuota, json: bool) -> std::io::Result<()> {
    if json {
        let limits: Vec<_> = quota
            .limits
            .iter()
            .map(|limit| {
                serde_json::json!({
                    "resource": limit.resource,
                    "limit": limit.limit,
                    "window_seconds": window_seconds(limit.window.as_ref().and_then(duration_from_wire)),
                })
            })
            .collect();
        return writeln!(
            out,
            "{}",
            serde_json::json!({"user_id": quota.user_id, "limits": limits})
        );
    }
    writeln!(out, "{:<18} {:>14} {:>10}", "RESOURCE", "LIMIT", "WINDOW")?;
    if quota.limits.is_empty() {
        writeln!(out, "(no limits: nothing is limited for {})", quota.user_id)?;
    }
    for limit in &quota.limits {
        writeln!(
            out,
            "{:<18} {:>14} {:>10}",
            limit.resource,
            figure(limit.limit),
            window_text(limit.window.as_ref().and_then(duration_from_wire))
        )?;
    }
    Ok(())
}
