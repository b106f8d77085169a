//! `--quota`, `--user-rate` and `--session-rate`: every user's limits, from flags.

use std::time::Duration;

use clap::Args;

use super::{BoxError, SessionArgs};

#[derive(Args)]
pub(crate) struct QuotaArgs {
    /// A default quota of every user, repeatable: RESOURCE=LIMIT/WINDOW per sliding window
    /// (tokens=100000/1h, api_calls=1000/1m, compute_seconds=600/1h, cost_usd=5/1day) or
    /// RESOURCE=LIMIT for a level (storage_bytes=50000000, concurrent_turns=4, sessions=5:
    /// the same as --max-sessions-per-user). None by default: nothing is limited.
    #[arg(long = "quota", env = "SWITCHYARD_QUOTAS", value_delimiter = ',', value_parser = switchyard_worker::quotas::parse_quota)]
    quotas: Vec<(
        switchyard_core::quota::Resource,
        switchyard_worker::quotas::Limit,
    )>,
    /// Calls per user, e.g. 20/s or 600/1m (GCRA); none by default.
    #[arg(long, env = "SWITCHYARD_USER_RATE")]
    user_rate: Option<String>,
    /// The burst a user may make above --user-rate (default: the rate's count).
    #[arg(long, env = "SWITCHYARD_USER_BURST", requires = "user_rate")]
    user_burst: Option<u32>,
    /// Calls per session, e.g. 5/s; none by default.
    #[arg(long, env = "SWITCHYARD_SESSION_RATE")]
    session_rate: Option<String>,
    /// The burst a session may make above --session-rate (default: the rate's count).
    #[arg(long, env = "SWITCHYARD_SESSION_BURST", requires = "session_rate")]
    session_burst: Option<u32>,
    /// How often usage that came without an append (reads, refused turns) is saved, e.g.
    /// 1s or 500ms: a crash loses at most this much of it. Usage of calls that append is
    /// saved in their transaction whatever this is.
    #[arg(long, env = "SWITCHYARD_USAGE_SAVE_INTERVAL", default_value = "1s", value_parser = parse_interval)]
    usage_save_interval: Duration,
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if interval < Duration::from_millis(10) {
        return Err(format!("{text} is shorter than 10ms"));
    }
    Ok(interval)
}

impl QuotaArgs {
    /// The quota defaults; `sessions` is --max-sessions-per-user unless a --quota sets it.
    pub(crate) fn config(
        &self,
        sessions: &SessionArgs,
    ) -> Result<switchyard_worker::quotas::QuotaConfig, BoxError> {
        use switchyard_worker::quotas::{Limit, QuotaConfig, RateLimit};
        let mut defaults: std::collections::BTreeMap<_, _> = self.quotas.iter().copied().collect();
        defaults
            .entry(switchyard_core::quota::Resource::Sessions)
            .or_insert(Limit {
                limit: f64::from(sessions.max_sessions_per_user),
                window: Duration::ZERO,
            });
        let rate = |flag: &str, text: &Option<String>, burst: Option<u32>| {
            text.as_deref()
                .map(|text| {
                    RateLimit::parse(text, burst).map_err(|error| format!("{flag}: {error}"))
                })
                .transpose()
        };
        Ok(QuotaConfig {
            defaults,
            user_rate: rate("--user-rate", &self.user_rate, self.user_burst)?,
            session_rate: rate("--session-rate", &self.session_rate, self.session_burst)?,
            save_interval: Some(self.usage_save_interval),
        })
    }
}
