//! `switchyard bench`: drives a cluster (a running one, or a `dev` one it starts itself) and
//! measures a plain single-hop gRPC echo in the same run, so every figure also reads as a
//! ratio to what this machine can do at all.

mod alone;
mod baseline;
mod compare;
mod llm;
mod load;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use switchyard::bench_pb::EchoRequest;
use switchyard::{SwitchyardClient, pb};
use switchyard_core::{Limits, TokenKey};
use switchyard_store::sealing::KeyRing;
use switchyard_store::{MemoryStore, SessionStore, SqlStore, SqlStoreOptions};
use tonic::transport::{Channel, Endpoint};

use self::baseline::EchoBaseline;
pub use self::load::{LoadShape, Measured, Outcome, Stop, Watch};
use crate::{DevCluster, DevClusterConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// CreateSession, cycling over --users users of its own (past the per-user limit each
    /// create evicts).
    Create,
    /// AppendContext of one message per call, without a request id.
    Append,
    /// AppendContext of one message per call, each with a new request id (exactly once).
    AppendOnce,
    /// GetContext of the last --context-messages messages.
    GetContext,
    /// SendMessage to --agent-type, timed until its final event.
    SendMessage,
    /// SendMessage to --agent-type, timed until its first delta, beside the same agent
    /// type run directly in this process (its own time to a first delta) on a context of
    /// --context-messages + 1 messages. The --llm-delay model's turns send that many too.
    FirstDelta,
    /// 70% GetContext, 20% AppendContext, 10% SendMessage.
    Mixed,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Create => "create",
            Scenario::Append => "append",
            Scenario::AppendOnce => "append-once",
            Scenario::GetContext => "get-context",
            Scenario::SendMessage => "send-message",
            Scenario::FirstDelta => "first-delta",
            Scenario::Mixed => "mixed",
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// One or more scenarios, comma-separated; they run one after another against the
    /// same cluster and sessions, so their figures compare within the run.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "get-context")]
    pub scenario: Vec<Scenario>,
    /// A running coordinator, e.g. http://127.0.0.1:50051. Without it, bench starts a dev
    /// cluster in this process.
    #[arg(long)]
    pub target: Option<String>,
    /// The API key to call --target with (a key of scope `sessions`).
    #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// CA (PEM) that signed the certificate of an https:// --target.
    #[arg(long, env = "SWITCHYARD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Calls in flight at once (the most in flight with --rate).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// How long each measured run lasts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Stop after this many calls instead of after --duration.
    #[arg(long)]
    pub count: Option<u64>,
    /// Send this many calls per second whatever the latency (open loop).
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub users: u32,
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=5))]
    pub sessions_per_user: u32,
    /// Bytes of content per message (and of the echo baseline's payload).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=65_536))]
    pub message_size: u32,
    /// Messages each session's context holds before the run.
    #[arg(long, default_value_t = 10)]
    pub context_messages: u32,
    /// Workers of the dev cluster bench starts (without --target).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// Store of the dev cluster bench starts: sqlite (a fresh file), memory, or a URL.
    #[arg(long, default_value = "sqlite")]
    pub store: String,
    /// Skip the echo baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Measure the first scenario on three dev clusters (no keys and plaintext, API keys,
    /// API keys and TLS), --rounds times each in turn, and report medians and ratios to the
    /// first. Not with --target.
    #[arg(long, conflicts_with = "target")]
    pub security: bool,
    /// Measure the first scenario on two dev clusters, without quotas and with every
    /// resource limited and both rate limits on (limits never reached), --rounds times
    /// each in turn; report medians and the ratio. Not with --target.
    #[arg(long, conflicts_with_all = ["target", "security"])]
    pub quotas: bool,
    /// Measure the first scenario on two dev clusters, with contexts in plaintext and
    /// encrypted at rest, --rounds times each in turn; report medians and the ratio. With
    /// the default SQLite store only (each cluster gets a fresh file).
    #[arg(long, conflicts_with_all = ["target", "security", "quotas"])]
    pub encryption: bool,
    /// Rounds of --security or --quotas.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// The agent type of turns.
    #[arg(long, default_value = "echo")]
    pub agent_type: String,
    /// Agent types (TOML, as `switchyard dev --agents`) of the dev cluster bench starts, and
    /// of the agent first-delta runs directly.
    #[arg(long)]
    pub agents: Option<PathBuf>,
    /// Start a local OpenAI-compatible model answering after this delay, as the agent type
    /// `fixed-delay-llm`. With --target, give --llm-listen too.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub llm_delay: Option<Duration>,
    /// The address the --llm-delay model listens on (default: a free port on 127.0.0.1).
    /// With --target, the target's `fixed-delay-llm` agent type must point at it:
    /// `backend = "openai"`, `openai = { base_url = "http://ADDR/v1", model = "fixed-delay" }`,
    /// and `context = { messages = N }` with N = --context-messages + 1, so that its turns
    /// send the model what the agent alone is given.
    #[arg(long, requires = "llm_delay")]
    pub llm_listen: Option<std::net::SocketAddr>,
    /// Print the figures of every interval this long (for soaks), not only the totals.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub report_every: Option<Duration>,
    /// With --report-every: the process whose resident memory each interval shows (the
    /// target's `switchyard dev`, say).
    #[arg(long)]
    pub watch_pid: Option<u32>,
    /// With --report-every: files whose total size each interval shows (a store's WAL).
    #[arg(long)]
    pub watch_file: Vec<PathBuf>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(crate) async fn connect(url: &str) -> std::io::Result<Channel> {
    Endpoint::from_shared(url.to_string())
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|error| {
            std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("cannot connect to {url}: {error}"),
            )
        })
}

/// Runs the benchmark and prints its report.
pub async fn run(args: BenchArgs) -> Result<(), BoxError> {
    let shape = LoadShape {
        concurrency: args.concurrency as usize,
        stop: match args.count {
            Some(count) => Stop::Count(count),
            None => Stop::After(args.duration),
        },
        rate: args.rate,
        progress: !args.json,
        report_every: args.report_every,
        watch: Watch {
            pid: args.watch_pid,
            files: args.watch_file.clone(),
        },
        json: args.json,
    };

    if args.security {
        return compare::run(&args, shape, &compare::Variant::SECURITY).await;
    }
    if args.quotas {
        return compare::run(&args, shape, &compare::Variant::QUOTAS).await;
    }
    if args.encryption {
        if args.store != "sqlite" {
            return Err("--encryption measures the default SQLite store: leave --store out".into());
        }
        return compare::run(&args, shape, &compare::Variant::ENCRYPTION).await;
    }
    if args.target.is_some() && args.llm_delay.is_some() && args.llm_listen.is_none() {
        return Err(
            "--llm-delay with --target needs --llm-listen: the address the target's \
                    fixed-delay-llm agent type points at"
                .into(),
        );
    }
    let llm = match args.llm_delay {
        Some(delay) => Some(llm::FixedDelayLlm::start(delay, args.llm_listen).await?),
        None => None,
    };
    let agents = || -> Result<switchyard_agents::AgentCatalog, BoxError> {
        let mut catalog = crate::agents::load(args.agents.as_deref())?;
        if let Some(llm) = &llm {
            // The alone run's context: the prepared messages and the turn's own.
            let (config, pool) = llm.agent(args.context_messages as usize + 1);
            catalog.register(llm::AGENT_TYPE, config, pool);
        }
        Ok(catalog)
    };
    let alone = if args.scenario.contains(&Scenario::FirstDelta) {
        let catalog = agents()?;
        let pool = catalog.pool(&args.agent_type)?.clone();
        Some(alone::first_delta(&args, shape.clone(), pool).await)
    } else {
        None
    };
    let baseline = if args.no_baseline {
        None
    } else {
        let echo = EchoBaseline::start().await?;
        let payload = vec![b'x'; args.message_size as usize];
        let client = echo.client.clone();
        Some(
            load::run("raw echo (baseline)", shape.clone(), move |_| {
                let mut client = client.clone();
                let payload = payload.clone();
                async move { client.echo(EchoRequest { payload }).await.map(|_| None) }
            })
            .await,
        )
    };

    let (url, cluster, data_dir) = match &args.target {
        Some(url) => (url.clone(), None, None),
        None => {
            let catalog = agents()?;
            let (cluster, data_dir) = start_cluster_with(&args, None, |config| {
                config.agents = catalog;
                Ok(())
            })
            .await?;
            (cluster.coordinator_url(), Some(cluster), data_dir)
        }
    };
    let mut client = match &args.tls_ca {
        Some(ca) => SwitchyardClient::connect_tls(url.clone(), ca).await?,
        None => SwitchyardClient::new(connect(&url).await?),
    };
    if let Some(key) = &args.api_key {
        client = client.with_api_key(key)?;
    }
    if !args.json {
        eprintln!(
            "  preparing {} users × {} sessions",
            args.users, args.sessions_per_user
        );
    }
    let sessions = Arc::new(prepare(&client, &args).await?);
    let mut outcomes = Vec::with_capacity(args.scenario.len());
    for scenario in &args.scenario {
        outcomes.push(
            measure(
                *scenario,
                &args,
                shape.clone(),
                client.clone(),
                sessions.clone(),
            )
            .await,
        );
    }
    if let Some(alone) = alone {
        outcomes.insert(0, alone);
    }

    report(&args, &url, cluster.is_some(), baseline.as_ref(), &outcomes);
    if let Some(cluster) = cluster {
        cluster.stop().await;
    }
    if let Some(dir) = data_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// A dev cluster for the benchmark, with `adjust` applied to its configuration.
async fn start_cluster_with(
    args: &BenchArgs,
    keys: Option<KeyRing>,
    adjust: impl FnOnce(&mut DevClusterConfig) -> Result<(), BoxError>,
) -> Result<(DevCluster, Option<PathBuf>), BoxError> {
    let sealed = |options: SqlStoreOptions| match &keys {
        Some(keys) => options.with_keys(keys.clone()),
        None => options,
    };
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| "the system random source failed")?;
    let token_key = TokenKey::from_secret(&secret)?;
    let (store, data_dir): (Arc<dyn SessionStore>, Option<PathBuf>) = match args.store.as_str() {
        "memory" => (Arc::new(MemoryStore::new()), None),
        "sqlite" => {
            let dir = std::env::temp_dir().join(format!("switchyard-bench-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let store = SqlStore::open(sealed(SqlStoreOptions::sqlite_file(
                &dir.join("switchyard.db"),
            )))
            .await?;
            (Arc::new(store), Some(dir))
        }
        url => (
            Arc::new(SqlStore::open(sealed(SqlStoreOptions::new(url))).await?),
            None,
        ),
    };
    let mut config = DevClusterConfig::new(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        usize::from(args.workers),
        token_key,
        store,
    )?;
    config.limits = Limits {
        // A benchmark's sessions must not expire or leave memory under it.
        idle_timeout: Duration::from_secs(24 * 3600),
        passivate_after: Duration::from_secs(24 * 3600),
        ..Limits::default()
    };
    adjust(&mut config)?;
    let cluster = DevCluster::start(config).await?;
    Ok((cluster, data_dir))
}

fn message(size: u32) -> pb::Message {
    pb::Message {
        role: "user".to_string(),
        content: "x".repeat(size as usize),
        name: String::new(),
    }
}

/// Creates the sessions and fills their contexts, a bounded number of calls at a time.
async fn prepare(client: &SwitchyardClient, args: &BenchArgs) -> Result<Vec<String>, BoxError> {
    let mut sessions = Vec::with_capacity((args.users * args.sessions_per_user) as usize);
    let users: Vec<String> = (0..args.users)
        .map(|user| format!("bench-user-{user}"))
        .collect();
    for chunk in users.chunks(64) {
        let creates = chunk.iter().flat_map(|user| {
            (0..args.sessions_per_user).map(move |_| {
                let client = client.clone();
                let user = user.clone();
                let context: Vec<pb::Message> = (0..args.context_messages)
                    .map(|_| message(args.message_size))
                    .collect();
                async move {
                    let session = client
                        .create_session(&user, [("bench", "yes")])
                        .await?
                        .session
                        .ok_or_else(|| tonic::Status::internal("no session in the reply"))?;
                    if !context.is_empty() {
                        client.append_context(&session.session_id, context).await?;
                    }
                    Ok::<_, tonic::Status>(session.session_id)
                }
            })
        });
        for created in futures::future::join_all(creates).await {
            sessions.push(created?);
        }
    }
    Ok(sessions)
}

async fn measure(
    scenario: Scenario,
    args: &BenchArgs,
    shape: LoadShape,
    client: SwitchyardClient,
    sessions: Arc<Vec<String>>,
) -> Outcome {
    let users = args.users as u64;
    let size = args.message_size;
    let last_n = args.context_messages;
    let agent_type: Arc<str> = args.agent_type.as_str().into();
    let label = scenario.name();
    load::run(label, shape, move |index| {
        let client = client.clone();
        let sessions = sessions.clone();
        let agent_type = agent_type.clone();
        async move {
            let session = &sessions[(index % sessions.len() as u64) as usize];
            let operation = match scenario {
                Scenario::Mixed => match index % 10 {
                    0..=6 => Scenario::GetContext,
                    7 | 8 => Scenario::Append,
                    _ => Scenario::SendMessage,
                },
                other => other,
            };
            match operation {
                Scenario::Create => {
                    // Users of their own, so evictions never touch the prepared sessions
                    // that the other scenarios use.
                    let user = format!("bench-creator-{}", index % users);
                    client
                        .create_session(&user, [("bench", "yes")])
                        .await
                        .map(|_| None)
                }
                Scenario::Append => client
                    .append_context_with_id(session, vec![message(size)], None)
                    .await
                    .map(|_| None),
                Scenario::AppendOnce => client
                    .append_context(session, vec![message(size)])
                    .await
                    .map(|_| None),
                Scenario::GetContext => client.get_context(session, last_n, 0).await.map(|_| None),
                Scenario::SendMessage | Scenario::Mixed => {
                    let content = "x".repeat(size as usize);
                    client
                        .send_message_collect(session, &agent_type, &content)
                        .await
                        .map(|_| None)
                }
                Scenario::FirstDelta => {
                    let content = "x".repeat(size as usize);
                    first_delta(&client, session, &agent_type, &content).await
                }
            }
        }
    })
    .await
}

/// A turn, timed from the call to its first delta (to its end when it has none), less the
/// time the fixed-delay model held its request. The stream is read to its end either way.
async fn first_delta(
    client: &SwitchyardClient,
    session: &str,
    agent_type: &str,
    content: &str,
) -> Result<Measured, tonic::Status> {
    let called = Instant::now();
    let request_id = switchyard::client::new_request_id();
    let mut stream = client
        .send_message_with_id(session, agent_type, content, Some(&request_id))
        .await?;
    let mut first = None;
    let mut done = false;
    while let Some(event) = stream.message().await? {
        match event.event {
            Some(pb::turn_event::Event::Delta(delta)) => {
                first.get_or_insert_with(|| llm::less_model_time(called.elapsed(), &delta.text));
            }
            Some(pb::turn_event::Event::Done(_)) => done = true,
            None => {}
        }
    }
    if !done {
        return Err(tonic::Status::unavailable(
            "the turn's stream ended before its final event",
        ));
    }
    Ok(Some(first.unwrap_or_else(|| called.elapsed())))
}

fn figures(outcome: &Outcome) -> serde_json::Value {
    serde_json::json!({
        "calls": outcome.succeeded,
        "seconds": outcome.elapsed.as_secs_f64(),
        "throughput_per_second": outcome.throughput(),
        "latency_us": {
            "p50": outcome.quantile_us(0.50),
            "p90": outcome.quantile_us(0.90),
            "p99": outcome.quantile_us(0.99),
            "p99_9": outcome.quantile_us(0.999),
        },
        "errors": outcome.errors,
    })
}

fn ratios(outcome: &Outcome, baseline: &Outcome) -> (f64, f64, f64) {
    (
        outcome.throughput() / baseline.throughput().max(1e-9),
        outcome.quantile_us(0.5) / baseline.quantile_us(0.5).max(1e-9),
        outcome.quantile_us(0.99) / baseline.quantile_us(0.99).max(1e-9),
    )
}

fn report(
    args: &BenchArgs,
    url: &str,
    started_cluster: bool,
    baseline: Option<&Outcome>,
    outcomes: &[Outcome],
) {
    let names: Vec<&str> = args
        .scenario
        .iter()
        .map(|scenario| scenario.name())
        .collect();
    // What the cluster adds to an agent's own first delta.
    let alone = outcomes
        .iter()
        .find(|outcome| outcome.label.ends_with(" alone"));
    let through = outcomes
        .iter()
        .find(|outcome| outcome.label == Scenario::FirstDelta.name());
    let added = alone.zip(through).map(|(alone, through)| {
        (
            through.quantile_us(0.5) - alone.quantile_us(0.5),
            through.quantile_us(0.99) - alone.quantile_us(0.99),
        )
    });
    if args.json {
        let results: Vec<serde_json::Value> = outcomes
            .iter()
            .map(|outcome| {
                let mut value = figures(outcome);
                value["scenario"] = outcome.label.clone().into();
                if let Some(baseline) = baseline {
                    let (throughput, p50, p99) = ratios(outcome, baseline);
                    value["ratio_to_baseline"] = serde_json::json!({
                        "throughput": throughput, "p50": p50, "p99": p99,
                    });
                }
                value
            })
            .collect();
        let value = serde_json::json!({
            "scenarios": names,
            "target": url,
            "started_cluster": started_cluster,
            "concurrency": args.concurrency,
            "rate": args.rate,
            "users": args.users,
            "sessions_per_user": args.sessions_per_user,
            "message_size": args.message_size,
            "context_messages": args.context_messages,
            "baseline": baseline.map(figures),
            "results": results,
            "added_to_first_delta_us": added.map(|(p50, p99)| serde_json::json!({ "p50": p50, "p99": p99 })),
        });
        println!("{value}");
        return;
    }
    println!();
    println!(
        "{} against {}{}",
        names.join(", "),
        url,
        if started_cluster {
            format!(
                " (dev cluster started by bench: {} workers, store {})",
                args.workers, args.store
            )
        } else {
            String::new()
        }
    );
    println!(
        "concurrency {}{}, {} users × {} sessions, {} B messages, contexts of {}",
        args.concurrency,
        args.rate
            .map(|rate| format!(" at {rate}/s"))
            .unwrap_or_default(),
        args.users,
        args.sessions_per_user,
        args.message_size,
        args.context_messages
    );
    println!(
        "{:<22} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10}",
        "", "calls/s", "p50", "p90", "p99", "p99.9", "errors", "×echo/s", "×echo p50"
    );
    let row = |outcome: &Outcome| {
        let errors: u64 = outcome.errors.values().sum();
        let (throughput, p50) = match baseline {
            Some(baseline) => {
                let (throughput, p50, _) = ratios(outcome, baseline);
                (format!("{throughput:.3}"), format!("{p50:.2}"))
            }
            None => (String::new(), String::new()),
        };
        println!(
            "{:<22} {:>10.0} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10}",
            outcome.label,
            outcome.throughput(),
            micros(outcome.quantile_us(0.5)),
            micros(outcome.quantile_us(0.9)),
            micros(outcome.quantile_us(0.99)),
            micros(outcome.quantile_us(0.999)),
            errors,
            throughput,
            p50
        );
    };
    if let Some(baseline) = baseline {
        row(baseline);
    }
    for outcome in outcomes {
        row(outcome);
    }
    if let Some((p50, p99)) = added {
        println!(
            "added to the agent's own first delta: p50 {p50:+.0}µs, p99 {p99:+.0}µs (first-delta minus {})",
            alone.map_or("", |alone| alone.label.as_str())
        );
        if args.llm_delay.is_some() {
            println!(
                "(both first-delta rows leave out the time the model held each request, as it measured it)"
            );
        }
    }
    for outcome in outcomes {
        if !outcome.errors.is_empty() {
            let listed: Vec<String> = outcome
                .errors
                .iter()
                .map(|(code, count)| format!("{code} {count}"))
                .collect();
            println!("errors of {}: {}", outcome.label, listed.join(", "));
        }
    }
}

fn micros(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{:.1}ms", value / 1000.0)
    } else {
        format!("{value:.0}µs")
    }
}
