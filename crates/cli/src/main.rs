//! `switchyard`: run a coordinator, a worker, or a whole cluster in one process.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

mod banner;
mod key_commands;
mod quota_flags;

use banner::print_banner;
use clap::{Args, Parser, Subcommand};
use key_commands::{ApiKeyCommand, KeysCommand, new_api_key, run_rotate_kek};
use quota_flags::QuotaArgs;
use switchyard::tls::ClientTlsFiles;
use switchyard_cli::{DevCluster, DevClusterConfig, keys, store};
use switchyard_coordinator::{ApiKeyRegistry, CallerAuth};
use switchyard_core::{DEFAULT_SLOT_COUNT, Limits, WorkerId};
use switchyard_server::{ClientCertificates, ServerLimits, ServerTlsFiles};
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
    /// How log lines look: `text` for people, `json` (one object per line, with the
    /// event's fields; audit events have the target `switchyard::audit`) for collectors.
    #[arg(long, global = true, env = "SWITCHYARD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Export every call's span to this OpenTelemetry collector over OTLP/gRPC, e.g.
    /// http://otel-collector:4317. Off by default: without it nothing is exported.
    #[arg(long, global = true, env = "SWITCHYARD_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// The share of traces whose spans --otlp-endpoint exports, 0 to 1, chosen by trace id
    /// so that every node keeps the same traces.
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_OTLP_SAMPLE_RATIO",
        default_value_t = 1.0
    )]
    otlp_sample_ratio: f64,
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
    /// (what a Kubernetes preStop hook runs before the worker pod stops); the same as
    /// `switchyard ctl drain`.
    Drain(DrainArgs),
    /// Make API keys for callers.
    #[command(subcommand, name = "api-key")]
    ApiKey(ApiKeyCommand),
    /// Show and set a user's quota, and show its usage.
    #[command(subcommand)]
    Quota(switchyard_cli::admin::QuotaCommand),
    /// Look at and operate a running cluster through its coordinator: status, workers,
    /// placement, sessions, context, usage, quota, drain, rebalance (`--json` for scripts).
    Ctl(switchyard_cli::ctl::CtlArgs),
    /// Manage the store's key-encryption keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Args)]
struct DrainArgs {
    /// The worker to drain.
    #[arg(long, env = "SWITCHYARD_WORKER_ID")]
    id: String,
    /// How long to wait for the worker to leave.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    target: switchyard_cli::admin::AdminTarget,
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
    /// Files of more token keys whose tokens are accepted but which do not sign: a key
    /// being rotated in, or one being retired (README: "Rotating the token key").
    #[arg(
        long = "token-verify-key-file",
        env = "SWITCHYARD_TOKEN_VERIFY_KEY_FILES",
        value_delimiter = ','
    )]
    token_verify_key_files: Vec<PathBuf>,
    /// File holding the cluster secret (at least 32 bytes), the same on every node: nodes
    /// prove membership with credentials made from it.
    #[arg(long, env = "SWITCHYARD_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<PathBuf>,
    /// The cluster secret itself, when no file is given.
    #[arg(
        long = "cluster-secret",
        env = "SWITCHYARD_CLUSTER_SECRET",
        hide_env_values = true,
        hide = true
    )]
    cluster_secret: Option<String>,
}

impl KeyArgs {
    fn token_key(&self) -> Result<switchyard_core::TokenKey, keys::KeyError> {
        let mut key = keys::load(self.token_key_file.as_deref(), self.token_key.as_deref())?;
        for file in &self.token_verify_key_files {
            key = key.with_verifier(&keys::load(Some(file), None)?);
        }
        Ok(key)
    }

    fn cluster_key(&self) -> Result<switchyard_core::ClusterKey, keys::KeyError> {
        keys::load_cluster_key(
            self.cluster_secret_file.as_deref(),
            self.cluster_secret.as_deref(),
        )
    }
}

#[derive(Args)]
struct PublicTlsArgs {
    /// Certificate chain (PEM) to serve TLS with on the listener; re-read when it changes.
    #[arg(long, env = "SWITCHYARD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "SWITCHYARD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(Args)]
struct ClusterTlsArgs {
    /// The cluster CA (PEM). With it, nodes talk over mutual TLS: each presents
    /// --cluster-cert and verifies the other's certificate against this CA.
    #[arg(long, env = "SWITCHYARD_CLUSTER_CA", requires_all = ["cluster_cert", "cluster_key"])]
    cluster_ca: Option<PathBuf>,
    /// This node's certificate (PEM), signed by the cluster CA; re-read when it changes.
    #[arg(long, env = "SWITCHYARD_CLUSTER_CERT", requires = "cluster_ca")]
    cluster_cert: Option<PathBuf>,
    /// The private key (PEM) of --cluster-cert.
    #[arg(long, env = "SWITCHYARD_CLUSTER_KEY", requires = "cluster_ca")]
    cluster_key: Option<PathBuf>,
}

impl ClusterTlsArgs {
    /// This node as a client of another: the cluster CA and its own certificate.
    fn client(&self) -> Option<ClientTlsFiles> {
        let (Some(ca), Some(cert), Some(key)) =
            (&self.cluster_ca, &self.cluster_cert, &self.cluster_key)
        else {
            return None;
        };
        Some(ClientTlsFiles {
            ca: ca.clone(),
            identity: Some((cert.clone(), key.clone())),
        })
    }
}

#[derive(Args)]
struct CallerArgs {
    /// TOML file of API keys (name, sha256, scopes, user_prefix), read again when it
    /// changes. Make keys with `switchyard api-key new`.
    #[arg(long, env = "SWITCHYARD_API_KEYS")]
    api_keys: Option<PathBuf>,
    /// Serve callers without API keys: anyone who reaches the port acts as every user and
    /// as an operator.
    #[arg(long, env = "SWITCHYARD_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
}

impl CallerArgs {
    /// The keys, or no keys where that is allowed: with --insecure-no-auth, or for `dev`
    /// on loopback (`open_on_loopback`).
    fn callers(&self, listen: SocketAddr, open_on_loopback: bool) -> Result<CallerAuth, BoxError> {
        if let Some(path) = &self.api_keys {
            return Ok(CallerAuth::ApiKeys(ApiKeyRegistry::from_file(path)?));
        }
        if self.insecure_no_auth || (open_on_loopback && listen.ip().is_loopback()) {
            return Ok(CallerAuth::Open);
        }
        Err(format!(
            "no API keys for callers on {listen}: pass --api-keys PATH (make keys with `switchyard api-key new`), or --insecure-no-auth to let anyone who reaches {listen} act as every user"
        )
        .into())
    }
}

#[derive(Args)]
struct ServerArgs {
    /// Serve server reflection (grpcurl list/describe); --reflection=false turns it off.
    #[arg(long, env = "SWITCHYARD_REFLECTION", default_value_t = true, action = clap::ArgAction::Set)]
    reflection: bool,
    /// Calls served at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "SWITCHYARD_MAX_IN_FLIGHT", default_value_t = ServerLimits::default().max_in_flight)]
    max_in_flight: usize,
    /// Bytes of requests still arriving, across all streams, before new ones are refused.
    #[arg(long, env = "SWITCHYARD_RECEIVE_BUDGET_BYTES", default_value_t = ServerLimits::default().receive_budget_bytes)]
    receive_budget_bytes: usize,
    /// The largest gRPC message on either hop.
    #[arg(long, env = "SWITCHYARD_MAX_GRPC_MESSAGE_BYTES", default_value_t = Limits::default().max_grpc_message_bytes)]
    max_grpc_message_bytes: usize,
    /// Streams one HTTP/2 connection may have open at once.
    #[arg(long, env = "SWITCHYARD_MAX_CONCURRENT_STREAMS", default_value_t = ServerLimits::default().max_concurrent_streams)]
    max_concurrent_streams: u32,
    /// Write one log line per call served (target `switchyard::access`): method, code,
    /// duration and trace id.
    #[arg(long, env = "SWITCHYARD_ACCESS_LOG")]
    access_log: bool,
    /// Serve Prometheus metrics (GET /metrics) on this address; `switchyard dev` serves its
    /// nodes' together, each sample naming its node. Off by default.
    #[arg(long, env = "SWITCHYARD_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

impl ServerArgs {
    /// Starts the Prometheus endpoint, when asked for.
    fn serve_metrics(&self) -> Result<(), BoxError> {
        let Some(address) = self.metrics_listen else {
            return Ok(());
        };
        switchyard_cli::metrics::serve(address)?;
        tracing::info!(%address, "metrics served at http://{address}/metrics");
        Ok(())
    }

    fn server_limits(&self) -> ServerLimits {
        ServerLimits {
            max_in_flight: self.max_in_flight.max(1),
            receive_budget_bytes: self.receive_budget_bytes,
            max_message_bytes: self.max_grpc_message_bytes,
            max_concurrent_streams: self.max_concurrent_streams.max(1),
            ..ServerLimits::default()
        }
    }
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
    /// Files of key-encryption keys (32 bytes or more each), repeatable: with them, message
    /// contents and session metadata are encrypted at rest (a plaintext store is encrypted
    /// when it opens). The first wraps new sessions' data keys; the others still unwrap, for
    /// a rotation (`switchyard keys rotate-kek`). `switchyard dev` makes one in --data-dir.
    #[arg(long = "kek-file", env = "SWITCHYARD_KEK_FILES", value_delimiter = ',')]
    kek_files: Vec<PathBuf>,
    /// The key-encryption key itself, from the environment, when no --kek-file is given.
    #[arg(
        long = "kek",
        env = "SWITCHYARD_KEK",
        hide_env_values = true,
        hide = true
    )]
    kek: Option<String>,
}

impl StoreArgs {
    /// The KEKs of --kek-file, or the one of SWITCHYARD_KEK without files.
    fn keks(&self) -> Result<Option<switchyard_store::sealing::KeyRing>, keys::KeyError> {
        match (&self.kek, self.kek_files.is_empty()) {
            (Some(secret), true) => keys::kek_from_secret(secret).map(Some),
            _ => keys::load_keks(&self.kek_files),
        }
    }

    /// The store; `dev` makes a KEK in the data dir when none is given. `keeps_contexts`:
    /// this node writes contexts (a worker, dev), so it warns when they would be plaintext.
    async fn open_as(
        &self,
        dev: bool,
        keeps_contexts: bool,
    ) -> Result<Arc<dyn SessionStore>, BoxError> {
        let keys = match self.keks()? {
            Some(keys) => Some(keys),
            None if dev && self.store.as_deref() != Some("memory") => {
                Some(keys::load_or_create_kek(&self.data_dir)?)
            }
            None => None,
        };
        if keys.is_none() && keeps_contexts && self.store.as_deref() != Some("memory") {
            tracing::warn!("no --kek-file: contexts and metadata are stored in plaintext");
        }
        let store = store::open(self.store.as_deref(), &self.data_dir, keys).await?;
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

#[derive(Args)]
struct InputLimitArgs {
    /// Bytes of one message's content.
    #[arg(long, env = "SWITCHYARD_MAX_MESSAGE_BYTES", default_value_t = Limits::default().max_message_bytes)]
    max_message_bytes: usize,
    /// Messages a session keeps; past it the oldest are dropped as new ones come.
    #[arg(long, env = "SWITCHYARD_MAX_CONTEXT_MESSAGES", default_value_t = Limits::default().max_context_messages, value_parser = clap::value_parser!(u64).range(1..))]
    max_context_messages: u64,
    /// Messages in one AppendContext.
    #[arg(long, env = "SWITCHYARD_MAX_MESSAGES_PER_APPEND", default_value_t = Limits::default().max_messages_per_append)]
    max_messages_per_append: usize,
    /// Messages in one GetContext or ListSessions page.
    #[arg(long, env = "SWITCHYARD_MAX_PAGE_MESSAGES", default_value_t = Limits::default().max_page_messages)]
    max_page_messages: usize,
    /// Content bytes in one GetContext page.
    #[arg(long, env = "SWITCHYARD_MAX_PAGE_BYTES", default_value_t = Limits::default().max_page_bytes)]
    max_page_bytes: usize,
    /// Bytes of one agent reply; a longer reply ends its turn with an error.
    #[arg(long, env = "SWITCHYARD_MAX_REPLY_BYTES", default_value_t = Limits::default().max_reply_bytes)]
    max_reply_bytes: usize,
    /// Metadata entries of one session.
    #[arg(long, env = "SWITCHYARD_MAX_METADATA_ENTRIES", default_value_t = Limits::default().max_metadata_entries)]
    max_metadata_entries: usize,
    /// Bytes of one metadata key.
    #[arg(long, env = "SWITCHYARD_MAX_METADATA_KEY_BYTES", default_value_t = Limits::default().max_metadata_key_bytes)]
    max_metadata_key_bytes: usize,
    /// Bytes of one metadata value.
    #[arg(long, env = "SWITCHYARD_MAX_METADATA_VALUE_BYTES", default_value_t = Limits::default().max_metadata_value_bytes)]
    max_metadata_value_bytes: usize,
    /// Bytes of an agent type's name.
    #[arg(long, env = "SWITCHYARD_MAX_AGENT_TYPE_BYTES", default_value_t = Limits::default().max_agent_type_bytes)]
    max_agent_type_bytes: usize,
}

impl SessionArgs {
    /// The limits from these flags, the input limits and the server's message size.
    fn limits(&self, inputs: &InputLimitArgs, server: &ServerArgs) -> Result<Limits, BoxError> {
        let limits = Limits {
            max_sessions_per_user: self.max_sessions_per_user,
            idle_timeout: self.idle_timeout,
            passivate_after: self.passivate_after,
            token_ttl: self.token_ttl,
            max_message_bytes: inputs.max_message_bytes,
            max_context_messages: inputs.max_context_messages,
            max_messages_per_append: inputs.max_messages_per_append,
            max_page_messages: inputs.max_page_messages,
            max_page_bytes: inputs.max_page_bytes,
            max_reply_bytes: inputs.max_reply_bytes,
            max_metadata_entries: inputs.max_metadata_entries,
            max_metadata_key_bytes: inputs.max_metadata_key_bytes,
            max_metadata_value_bytes: inputs.max_metadata_value_bytes,
            max_agent_type_bytes: inputs.max_agent_type_bytes,
            max_grpc_message_bytes: server.max_grpc_message_bytes,
            ..Limits::default()
        };
        limits.validate()?;
        Ok(limits)
    }
}

#[derive(Args)]
struct CoordinatorArgs {
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    callers: CallerArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    tls: PublicTlsArgs,
    #[command(flatten)]
    cluster_tls: ClusterTlsArgs,
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
    /// With --cluster-ca, the worker's certificate must name this host.
    #[arg(long, env = "SWITCHYARD_ADVERTISE")]
    advertise: Option<String>,
    /// CA (PEM) that signed the coordinator's certificate, for an https:// --coordinator;
    /// the cluster CA when not given.
    #[arg(long, env = "SWITCHYARD_COORDINATOR_CA")]
    coordinator_ca: Option<PathBuf>,
    #[command(flatten)]
    cluster_tls: ClusterTlsArgs,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    sessions: SessionArgs,
    #[command(flatten)]
    quotas: QuotaArgs,
    #[command(flatten)]
    inputs: InputLimitArgs,
    #[command(flatten)]
    server: ServerArgs,
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
    quotas: QuotaArgs,
    #[command(flatten)]
    inputs: InputLimitArgs,
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    callers: CallerArgs,
    /// Serve TLS on the listener and mutual TLS between the nodes, with a throw-away CA
    /// and certificates made in DATA_DIR/tls/ (clients trust DATA_DIR/tls/ca.pem).
    #[arg(long)]
    tls: bool,
    #[command(flatten)]
    agents: AgentArgs,
    #[command(flatten)]
    timing: ClusterTimingArgs,
}

/// mimalloc asks the kernel for transparent huge pages on its arena (`MADV_HUGEPAGE`), and
/// khugepaged, when its slow scan reaches the arena, collapses every 2 MiB range there
/// into one huge page, filling the range's unused pages: in the 30-minute soak the RSS
/// stepped up by 3–12 MiB at the same minute of every run, with 28 MiB of the arena in
/// huge pages after it. Without them the RSS follows what is allocated.
fn without_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(error) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("warning: cannot turn transparent huge pages off: {error}");
    }
}

fn main() -> ExitCode {
    without_transparent_huge_pages();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // A benchmark's own report is what matters; its cluster speaks only of trouble.
    let logging = {
        let _inside = runtime.enter();
        switchyard_cli::logs::init(
            if matches!(cli.command, Command::Bench(_)) {
                "warn"
            } else {
                "info"
            },
            cli.log_format == "json",
            cli.otlp_endpoint.as_deref(),
            cli.otlp_sample_ratio,
            cli.command.service_name(),
        )
    };
    let logging = match logging {
        Ok(logging) => logging,
        Err(error) => {
            eprintln!("error: {error}");
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
            Command::ApiKey(ApiKeyCommand::New(args)) => new_api_key(args),
            Command::Quota(command) => switchyard_cli::admin::run_quota(command).await,
            Command::Keys(KeysCommand::RotateKek(args)) => run_rotate_kek(args).await,
            Command::Ctl(args) => switchyard_cli::ctl::run(args).await,
        }
    });
    {
        let _inside = runtime.enter();
        logging.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

impl Command {
    /// The service name of the spans this command exports.
    fn service_name(&self) -> &'static str {
        match self {
            Command::Coordinator(_) => "switchyard-coordinator",
            Command::Worker(_) => "switchyard-worker",
            Command::Dev(_) => "switchyard-dev",
            _ => "switchyard",
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn run_coordinator(args: CoordinatorArgs) -> Result<(), BoxError> {
    args.server.serve_metrics()?;
    let token_key = args.keys.token_key()?;
    let cluster_key = args.keys.cluster_key()?;
    let callers = args.callers.callers(args.listen, false)?;
    let shutdown = CancellationToken::new();
    switchyard_server::cancel_on_signal(shutdown.clone());
    let store = args.store.open_as(false, false).await?;
    let listener = switchyard_server::bind(args.listen).await?;
    let mut config =
        switchyard_coordinator::CoordinatorConfig::new(token_key, cluster_key, callers);
    config.server_limits = args.server.server_limits();
    config.reflection = args.server.reflection;
    config.access_log = args.server.access_log;
    config.tls = match (&args.tls.tls_cert, &args.tls.tls_key) {
        (Some(cert), Some(key)) => Some(
            ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                clients: match &args.cluster_tls.cluster_ca {
                    Some(ca) => ClientCertificates::Optional(ca.clone()),
                    None => ClientCertificates::NotAsked,
                },
            }
            .load()?,
        ),
        _ => None,
    };
    if args.cluster_tls.cluster_ca.is_some() && config.tls.is_none() {
        return Err("--cluster-ca needs --tls-cert and --tls-key: workers reach the coordinator's listener over TLS".into());
    }
    config.worker_tls = match args.cluster_tls.client() {
        Some(files) => Some(files.load()?),
        None => None,
    };
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
    args.server.serve_metrics()?;
    let token_key = args.keys.token_key()?;
    let cluster_key = args.keys.cluster_key()?;
    let limits = args.sessions.limits(&args.inputs, &args.server)?;
    let worker_id = WorkerId::parse(args.id).map_err(|error| format!("--id: {error}"))?;
    let shutdown = CancellationToken::new();
    switchyard_server::cancel_on_signal(shutdown.clone());
    let listener = switchyard_server::bind(args.listen).await?;
    let coordinator_is_https = args.coordinator.starts_with("https://");
    if args.cluster_tls.cluster_ca.is_some() && !coordinator_is_https {
        return Err("with --cluster-ca, --coordinator must be an https:// URL: membership goes over TLS too".into());
    }
    let tls = match (
        &args.cluster_tls.cluster_cert,
        &args.cluster_tls.cluster_key,
        &args.cluster_tls.cluster_ca,
    ) {
        (Some(cert), Some(key), Some(ca)) => Some(
            ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                clients: ClientCertificates::Required(ca.clone()),
            }
            .load()?,
        ),
        _ => None,
    };
    let coordinator_tls = if coordinator_is_https {
        let ca = args
            .coordinator_ca
            .clone()
            .or_else(|| args.cluster_tls.cluster_ca.clone())
            .ok_or("an https:// --coordinator needs --coordinator-ca (or --cluster-ca)")?;
        let identity = args.cluster_tls.client().and_then(|files| files.identity);
        Some(ClientTlsFiles { ca, identity }.load()?)
    } else {
        None
    };
    let config = WorkerConfig {
        worker_id,
        coordinator_url: args.coordinator,
        advertise_address: args.advertise,
        token_key,
        cluster_key,
        limits,
        agents: switchyard_cli::agents::load(args.agents.agents.as_deref())?,
        server_limits: args.server.server_limits(),
        reflection: args.server.reflection,
        access_log: args.server.access_log,
        tls,
        coordinator_tls,
        quotas: args.quotas.config(&args.sessions)?,
        local: None,
    };
    let store = args.store.open_as(false, true).await?;
    let worker = switchyard_worker::start(config, listener, store, shutdown.clone()).await?;
    shutdown.cancelled().await;
    worker.stop().await;
    Ok(())
}

async fn run_drain(args: DrainArgs) -> Result<(), BoxError> {
    use switchyard_cli::ctl::{CtlArgs, CtlCommand, DrainArgs as CtlDrain, run};
    run(CtlArgs {
        command: CtlCommand::Drain(CtlDrain {
            worker_id: args.id,
            timeout: args.timeout,
            target: args.target,
            json: false,
        }),
    })
    .await
}

async fn run_dev(args: DevArgs) -> Result<(), BoxError> {
    args.server.serve_metrics()?;
    validate_timing(args.timing.heartbeat_interval, args.timing.lease)?;
    let agents = switchyard_cli::agents::load(args.agents.agents.as_deref())?;
    let callers = args.callers.callers(args.listen, true)?;
    let limits = args.sessions.limits(&args.inputs, &args.server)?;
    let token_key = keys::load_or_create(&args.store.data_dir)?;
    let cluster_key = keys::load_or_create_cluster_key(&args.store.data_dir)?;
    let store = args.store.open_as(true, true).await?;
    let shutdown = CancellationToken::new();
    switchyard_server::cancel_on_signal(shutdown.clone());
    let mut config =
        DevClusterConfig::new(args.listen, usize::from(args.workers), token_key, store)?;
    config.cluster_key = cluster_key;
    let keys_in_use = matches!(callers, CallerAuth::ApiKeys(_));
    config.callers = callers;
    config.limits = limits;
    config.quotas = args.quotas.config(&args.sessions)?;
    config.server_limits = args.server.server_limits();
    config.reflection = args.server.reflection;
    config.access_log = args.server.access_log;
    config.agents = agents;
    config.slot_count = args.timing.slot_count;
    config.heartbeat_interval = args.timing.heartbeat_interval;
    config.lease = args.timing.lease;
    config.handoff_grace = args.timing.handoff_grace;
    config.epsilon = args.timing.placement_epsilon;
    if args.tls {
        config.tls = Some(switchyard_cli::tls::load_or_create(
            &args.store.data_dir,
            args.listen.ip(),
        )?);
    }
    let cluster = DevCluster::start(config).await?;
    print_banner(
        &cluster,
        &args.store,
        keys_in_use,
        args.server.metrics_listen,
    );
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
