//! `switchyard`: run a coordinator, a worker, or a whole cluster in one process.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use switchyard_cli::{DevCluster, DevClusterConfig, keys, store};
use switchyard_core::{DEFAULT_SLOT_COUNT, Limits, WorkerId};
use switchyard_store::SessionStore;
use switchyard_worker::WorkerConfig;
use tokio_util::sync::CancellationToken;

// glibc's malloc serialises threads on its arena locks under load (a sixth of the CPU in a
// profile of routed GetContext); mimalloc keeps per-thread heaps.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "gRPC control plane for the sessions of multi-agent systems"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator: membership, placement, routing and admin.
    Coordinator(CoordinatorArgs),
    /// Run a worker that hosts sessions for the slots the coordinator gives it.
    Worker(WorkerArgs),
    /// Run a coordinator and several workers in this process, on loopback.
    Dev(DevArgs),
    /// Measure a cluster (or a dev cluster it starts) against a raw gRPC echo baseline.
    Bench(switchyard_cli::bench::BenchArgs),
    /// Drain a worker: move its slots away and wait until it has handed them over and left
    /// (what a Kubernetes preStop hook runs before the worker pod stops).
    Drain(DrainArgs),
}

#[derive(Args)]
struct DrainArgs {
    /// The coordinator's URL, e.g. http://coordinator:50051.
    #[arg(long, env = "SWITCHYARD_COORDINATOR")]
    coordinator: String,
    /// The worker to drain.
    #[arg(long, env = "SWITCHYARD_WORKER_ID")]
    id: String,
    /// How long to wait for the worker to leave.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Args)]
struct KeyArgs {
    /// File holding the session-token signing secret (at least 32 bytes), the same on every node.
    #[arg(long, env = "SWITCHYARD_TOKEN_KEY_FILE")]
    token_key_file: Option<PathBuf>,
    /// The signing secret itself, when no file is given.
    #[arg(
        long = "token-key",
        env = "SWITCHYARD_TOKEN_KEY",
        hide_env_values = true,
        hide = true
    )]
    token_key: Option<String>,
}

#[derive(Args)]
struct StoreArgs {
    /// The session store: `sqlite://PATH`, `postgres://USER@HOST/DB` (for many nodes), or
    /// `memory`. Default: the SQLite file switchyard.db in --data-dir.
    #[arg(long, env = "SWITCHYARD_STORE", hide_env_values = true)]
    store: Option<String>,
    /// Where the embedded store and dev's token key live.
    #[arg(long, env = "SWITCHYARD_DATA_DIR", default_value = "switchyard-data")]
    data_dir: PathBuf,
}

impl StoreArgs {
    async fn open(&self) -> Result<Arc<dyn SessionStore>, BoxError> {
        let store = store::open(self.store.as_deref(), &self.data_dir).await?;
        tracing::info!(store = %store::describe(self.store.as_deref(), &self.data_dir), "session store ready");
        Ok(store)
    }
}

#[derive(Args)]
struct ClusterTimingArgs {
    /// How often workers heartbeat.
    #[arg(long, env = "SWITCHYARD_HEARTBEAT_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// A worker silent for this long is declared dead and its slots move.
    #[arg(long, env = "SWITCHYARD_LEASE", default_value = "2s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// How long a worker losing a slot (to a join, a drain or a rebalance) lets the slot's
    /// calls finish before cancelling them with UNAVAILABLE and handing the slot over.
    #[arg(long, env = "SWITCHYARD_HANDOFF_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    handoff_grace: Duration,
    /// Placement's load bound: no worker carries more than (1+ε) times the average load.
    #[arg(long, env = "SWITCHYARD_PLACEMENT_EPSILON", default_value_t = switchyard_core::bounded::DEFAULT_EPSILON, value_parser = parse_epsilon)]
    placement_epsilon: f64,
    /// Slots per cluster; fixed for the life of the cluster.
    #[arg(long, env = "SWITCHYARD_SLOT_COUNT", default_value_t = DEFAULT_SLOT_COUNT, value_parser = clap::value_parser!(u32).range(1..=65536))]
    slot_count: u32,
}

#[derive(Args)]
struct SessionArgs {
    /// Sessions a user may hold; one more ends the least recently created.
    #[arg(long, env = "SWITCHYARD_MAX_SESSIONS_PER_USER", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    max_sessions_per_user: u32,
    /// A session with no call for this long ends.
    #[arg(long, env = "SWITCHYARD_IDLE_TIMEOUT", default_value = "30m", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// A session with no call for this long leaves memory (it stays in the store).
    #[arg(long, env = "SWITCHYARD_PASSIVATE_AFTER", default_value = "5m", value_parser = humantime::parse_duration)]
    passivate_after: Duration,
    /// How long session tokens stay valid.
    #[arg(long, env = "SWITCHYARD_TOKEN_TTL", default_value = "7days", value_parser = humantime::parse_duration)]
    token_ttl: Duration,
}

#[derive(Args)]
struct AgentArgs {
    /// TOML file of agent types (backend, role, goal, instructions, pool sizes); without it
    /// only the built-in `echo` agent exists.
    #[arg(long, env = "SWITCHYARD_AGENTS")]
    agents: Option<PathBuf>,
}

impl SessionArgs {
    fn limits(&self) -> Limits {
        Limits {
            max_sessions_per_user: self.max_sessions_per_user,
            idle_timeout: self.idle_timeout,
            passivate_after: self.passivate_after,
            token_ttl: self.token_ttl,
            ..Limits::default()
        }
    }
}

#[derive(Args)]
struct CoordinatorArgs {
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    timing: ClusterTimingArgs,
}

#[derive(Args)]
struct WorkerArgs {
    /// The coordinator's URL, e.g. http://coordinator:50051.
    #[arg(long, env = "SWITCHYARD_COORDINATOR")]
    coordinator: String,
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "0.0.0.0:50061")]
    listen: SocketAddr,
    /// This worker's id: letters, digits, '.', '_' and '-'; stable across restarts.
    #[arg(long, env = "SWITCHYARD_WORKER_ID")]
    id: String,
    /// host:port the coordinator reaches this worker at; defaults to the listen address.
    #[arg(long, env = "SWITCHYARD_ADVERTISE")]
    advertise: Option<String>,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    sessions: SessionArgs,
    #[command(flatten)]
    agents: AgentArgs,
}

#[derive(Args)]
struct DevArgs {
    /// Where the coordinator listens; the workers take free ports on the same host.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    workers: u16,
    /// The store, and the data dir that also holds the token key, created on first start
    /// and reused after, so sessions and tokens survive restarts.
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    sessions: SessionArgs,
    #[command(flatten)]
    agents: AgentArgs,
    #[command(flatten)]
    timing: ClusterTimingArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A benchmark's own report is what matters; its cluster speaks only of trouble.
    init_tracing(if matches!(cli.command, Command::Bench(_)) {
        "warn"
    } else {
        "info"
    });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Coordinator(args) => run_coordinator(args).await,
            Command::Worker(args) => run_worker(args).await,
            Command::Dev(args) => run_dev(args).await,
            Command::Bench(args) => switchyard_cli::bench::run(args).await,
            Command::Drain(args) => run_drain(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn run_coordinator(args: CoordinatorArgs) -> Result<(), BoxError> {
    let token_key = keys::load(
        args.keys.token_key_file.as_deref(),
        args.keys.token_key.as_deref(),
    )?;
    let shutdown = CancellationToken::new();
    switchyard_server::cancel_on_signal(shutdown.clone());
    let store = args.store.open().await?;
    let listener = switchyard_server::bind(args.listen).await?;
    let mut config = switchyard_coordinator::CoordinatorConfig::new(token_key);
    config.slot_count = args.timing.slot_count;
    config.heartbeat_interval = args.timing.heartbeat_interval;
    config.lease = args.timing.lease;
    config.handoff_grace = args.timing.handoff_grace;
    config.epsilon = args.timing.placement_epsilon;
    validate_timing(config.heartbeat_interval, config.lease)?;
    let coordinator = switchyard_coordinator::start(config, store, listener, shutdown).await?;
    coordinator.wait().await;
    Ok(())
}

async fn run_worker(args: WorkerArgs) -> Result<(), BoxError> {
    let token_key = keys::load(
        args.keys.token_key_file.as_deref(),
        args.keys.token_key.as_deref(),
    )?;
    let worker_id = WorkerId::parse(args.id).map_err(|error| format!("--id: {error}"))?;
    let shutdown = CancellationToken::new();
    switchyard_server::cancel_on_signal(shutdown.clone());
    let listener = switchyard_server::bind(args.listen).await?;
    let config = WorkerConfig {
        worker_id,
        coordinator_url: args.coordinator,
        advertise_address: args.advertise,
        token_key,
        limits: args.sessions.limits(),
        agents: switchyard_cli::agents::load(args.agents.agents.as_deref())?,
    };
    let store = args.store.open().await?;
    let worker = switchyard_worker::start(config, listener, store, shutdown.clone()).await?;
    shutdown.cancelled().await;
    worker.stop().await;
    Ok(())
}

async fn run_drain(args: DrainArgs) -> Result<(), BoxError> {
    use switchyard::pb;
    use switchyard::pb::admin_service_client::AdminServiceClient;

    let channel = tonic::transport::Endpoint::from_shared(args.coordinator.clone())
        .map_err(|error| format!("--coordinator {:?}: {error}", args.coordinator))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|error| {
            format!(
                "cannot reach the coordinator at {}: {error}",
                args.coordinator
            )
        })?;
    let mut request = tonic::Request::new(pb::DrainWorkerRequest {
        worker_id: args.id.clone(),
        wait: true,
    });
    request.set_timeout(args.timeout);
    let reply = AdminServiceClient::new(channel)
        .drain_worker(request)
        .await
        .map_err(|status| format!("{:?}: {}", status.code(), status.message()))?
        .into_inner();
    if !reply.left {
        return Err(format!(
            "worker {} has not left within {} (slots moved: {}, epoch {}); it goes on handing over",
            args.id,
            humantime::format_duration(args.timeout),
            reply.slots_moved,
            reply.epoch
        )
        .into());
    }
    let _ = writeln!(
        std::io::stdout(),
        "worker {} drained: {} slots moved (epoch {}), and it has left the cluster",
        args.id,
        reply.slots_moved,
        reply.epoch
    );
    Ok(())
}

async fn run_dev(args: DevArgs) -> Result<(), BoxError> {
    validate_timing(args.timing.heartbeat_interval, args.timing.lease)?;
    let agents = switchyard_cli::agents::load(args.agents.agents.as_deref())?;
    let token_key = keys::load_or_create(&args.store.data_dir)?;
    let store = args.store.open().await?;
    let shutdown = CancellationToken::new();
    switchyard_server::cancel_on_signal(shutdown.clone());
    let mut config =
        DevClusterConfig::new(args.listen, usize::from(args.workers), token_key, store);
    config.limits = args.sessions.limits();
    config.agents = agents;
    config.slot_count = args.timing.slot_count;
    config.heartbeat_interval = args.timing.heartbeat_interval;
    config.lease = args.timing.lease;
    config.handoff_grace = args.timing.handoff_grace;
    config.epsilon = args.timing.placement_epsilon;
    let cluster = DevCluster::start(config).await?;
    print_banner(&cluster, &args.store);
    shutdown.cancelled().await;
    cluster.stop().await;
    // stdout may be gone (a closed pipe) by now; that is no reason to fail.
    let _ = writeln!(std::io::stdout(), "switchyard dev stopped");
    Ok(())
}

fn parse_epsilon(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(epsilon) if epsilon.is_finite() && epsilon > 0.0 => Ok(epsilon),
        _ => Err(format!(
            "{text:?} is not a positive number (0.25 lets a worker carry 125% of the average load)"
        )),
    }
}

fn validate_timing(heartbeat_interval: Duration, lease: Duration) -> Result<(), String> {
    if heartbeat_interval.is_zero() || lease <= heartbeat_interval {
        return Err(format!(
            "--lease ({}) must be longer than --heartbeat-interval ({})",
            humantime::format_duration(lease),
            humantime::format_duration(heartbeat_interval)
        ));
    }
    Ok(())
}

fn print_banner(cluster: &DevCluster, store: &StoreArgs) {
    let address = cluster.coordinator_address();
    let mut banner = format!(
        "switchyard dev is running\n  coordinator  {address}  (SessionService, AdminService, health, reflection)\n"
    );
    for worker in cluster.live_workers() {
        banner += &format!("  worker       {}  {}\n", worker.address, worker.worker_id);
    }
    banner += &format!(
        "  data dir     {}\n  store        {}\n\ntry:\n  grpcurl -plaintext {address} list\n  \
         grpcurl -plaintext -d '{{\"user_id\": \"alice\"}}' {address} switchyard.v1.SessionService/CreateSession\n\n\
         Ctrl-C stops it.\n",
        store.data_dir.display(),
        switchyard_cli::store::describe(store.store.as_deref(), &store.data_dir)
    );
    // A closed stdout must not stop the cluster.
    let _ = std::io::stdout().write_all(banner.as_bytes());
    let _ = std::io::stdout().flush();
}
