//! `Sandbox`: an in-process cluster on loopback with fast timings, and helpers.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::SwitchyardClient;
use switchyard::pb;
use switchyard::pb::admin_service_client::AdminServiceClient;
use switchyard_agents::{AgentCatalog, EchoConfig, PoolConfig, ProcessConfig, TokenPrice};
use switchyard_cli::{DevCluster, DevClusterConfig};
use switchyard_coordinator::CallerAuth;
use switchyard_core::{Limits, TokenKey};
use switchyard_store::sealing::{Kek, KeyRing};
use switchyard_store::{SqlStore, SqlStoreOptions};
use switchyard_worker::quotas::QuotaConfig;
use tonic::transport::Channel;

/// Agent type whose turns take about a second: 6 deltas, 150 ms apart.
/// An echo agent whose turns cost exactly what they reserve: its window is the turn's own
/// message, and a reply of "echo: ping" is 3 tokens (four bytes a token).
pub const QUOTA_AGENT: &str = "quota-echo";
/// What one turn of QUOTA_AGENT on "ping" costs in tokens: 1 of prompt, 3 of reply.
pub const QUOTA_TURN_TOKENS: u64 = 4;
pub const SLOW_AGENT: &str = "slow-echo";
/// Like SLOW_AGENT, with one instance per worker and 200 ms of patience for it.
pub const SCARCE_AGENT: &str = "scarce-echo";
/// A process agent (python3) that never answers a turn whose message is "hang", with a
/// turn timeout of 10 s, one instance, and 500 ms of patience for it.
pub const SILENT_AGENT: &str = "silent";
/// The same program with a turn timeout of 1 s.
pub const HANGING_AGENT: &str = "hanging";
const SILENT_AGENT_PROGRAM: &str = r#"
def turn(message):
    if message["context"][-1]["content"] == "hang":
        time.sleep(3600)
    send({"type": "delta", "id": message["id"], "text": "awake"})
    send({"type": "done", "id": message["id"]})
"#;
/// A process agent (python3) that answers with the seqs of the context it was sent, through
/// a window of three messages.
pub const WINDOW_AGENT: &str = "window-probe";
const WINDOW_AGENT_PROGRAM: &str = r#"
def turn(message):
    seen = ",".join(str(m["seq"]) for m in message["context"])
    send({"type": "delta", "id": message["id"], "text": seen})
    send({"type": "done", "id": message["id"]})
"#;
/// A process agent (python3) whose every reply holds a NUL character.
/// A process agent (python3) whose turns on "fail" end with an error event, and whose
/// other turns echo; its slow-turn threshold is 1 ms, so every session of it is slow.
pub const FLAKY_AGENT: &str = "flaky";
const FLAKY_AGENT_PROGRAM: &str = r#"
def turn(message):
    content = message["context"][-1]["content"]
    if content == "fail":
        send({"type": "error", "id": message["id"], "message": "the model refused"})
    else:
        send({"type": "delta", "id": message["id"], "text": content})
        send({"type": "done", "id": message["id"], "usage": {"prompt_tokens": 2, "completion_tokens": 1}})
"#;
pub const NUL_AGENT: &str = "nul-replier";
const NUL_AGENT_PROGRAM: &str = r#"
def turn(message):
    send({"type": "delta", "id": message["id"], "text": "before \u0000 after"})
    send({"type": "done", "id": message["id"]})
"#;
/// The protocol loop every python test agent shares; each defines `turn(message)`.
const AGENT_LOOP: &str = r#"
import json, sys, time
def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()
send({"type": "ready"})
for line in sys.stdin:
    message = json.loads(line)
    if message["type"] == "reset":
        send({"type": "ready"})
    elif message["type"] == "turn":
        turn(message)
"#;

pub struct Sandbox {
    pub cluster: DevCluster,
    pub token_key: TokenKey,
    /// The store every node of the sandbox shares.
    pub store: Arc<SqlStore>,
    /// Holds the SQLite store; removed when the sandbox stops.
    pub data_dir: PathBuf,
}

pub struct SandboxOptions {
    pub workers: usize,
    pub limits: Limits,
    /// How long a silent worker keeps its slots.
    pub lease: Duration,
    /// How long a worker losing a slot lets its calls finish.
    pub handoff_grace: Duration,
    /// How callers authenticate at the coordinator.
    pub callers: CallerAuth,
    /// Every user's quota defaults and rate limits.
    pub quotas: QuotaConfig,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            workers: 3,
            limits: Limits::default(),
            lease: Duration::from_millis(600),
            handoff_grace: Duration::from_secs(5),
            callers: CallerAuth::Open,
            quotas: QuotaConfig::default(),
        }
    }
}

/// A fresh directory for one sandbox's store.
pub fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-cluster-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

impl Sandbox {
    pub async fn start() -> Sandbox {
        Sandbox::start_with(SandboxOptions::default()).await
    }

    pub async fn start_with(options: SandboxOptions) -> Sandbox {
        let token_key = TokenKey::from_secret(&rand_secret()).expect("a 32-byte secret");
        let mut agents = AgentCatalog::with_builtin();
        agents.register(
            SLOW_AGENT,
            Arc::new(EchoConfig {
                chunk_chars: 4,
                delay: Duration::from_millis(150),
            }),
            PoolConfig::default(),
        );
        agents.register(
            SCARCE_AGENT,
            Arc::new(EchoConfig {
                chunk_chars: 4,
                delay: Duration::from_millis(150),
            }),
            PoolConfig {
                max: 1,
                acquire_timeout: Duration::from_millis(200),
                ..PoolConfig::default()
            },
        );
        agents.register(
            FLAKY_AGENT,
            python_agent(FLAKY_AGENT, FLAKY_AGENT_PROGRAM),
            PoolConfig {
                slow_turn: Duration::from_millis(1),
                ..PoolConfig::default()
            },
        );
        agents.register(
            NUL_AGENT,
            python_agent(NUL_AGENT, NUL_AGENT_PROGRAM),
            PoolConfig::default(),
        );
        for (name, turn_timeout) in [
            (SILENT_AGENT, Duration::from_secs(10)),
            (HANGING_AGENT, Duration::from_secs(1)),
        ] {
            agents.register(
                name,
                python_agent(name, SILENT_AGENT_PROGRAM),
                PoolConfig {
                    max: 1,
                    acquire_timeout: Duration::from_millis(500),
                    turn_timeout,
                    ..PoolConfig::default()
                },
            );
        }
        agents.register(
            WINDOW_AGENT,
            python_agent(WINDOW_AGENT, WINDOW_AGENT_PROGRAM),
            PoolConfig {
                context_window: switchyard_core::ContextWindow {
                    max_messages: 3,
                    ..switchyard_core::ContextWindow::default()
                },
                ..PoolConfig::default()
            },
        );
        agents.register(
            QUOTA_AGENT,
            Arc::new(EchoConfig::default()),
            PoolConfig {
                max: 64,
                context_window: switchyard_core::ContextWindow {
                    max_messages: 1,
                    ..switchyard_core::ContextWindow::default()
                },
                max_reply_tokens: 3,
                price: TokenPrice {
                    prompt_per_1k: 1.0,
                    completion_per_1k: 2.0,
                },
                ..PoolConfig::default()
            },
        );
        // The real default: an embedded SQLite store that every node shares.
        let data_dir = temp_dir();
        // Encrypted at rest, as `switchyard dev` is.
        let store = SqlStore::open(
            SqlStoreOptions::sqlite_file(&data_dir.join("switchyard.db")).with_keys(KeyRing::new(
                Kek::from_secret(b"the sandbox's key-encryption key, 32 bytes+")
                    .expect("a long enough secret"),
                Vec::new(),
            )),
        )
        .await
        .expect("store opens");
        let store = Arc::new(store);
        let mut config = DevClusterConfig::new(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            options.workers,
            token_key.clone(),
            store.clone(),
        )
        .expect("a dev cluster config");
        config.limits = options.limits;
        config.heartbeat_interval = Duration::from_millis(100);
        config.lease = options.lease;
        config.handoff_grace = options.handoff_grace;
        config.agents = agents;
        config.callers = options.callers;
        config.quotas = options.quotas;
        let cluster = DevCluster::start(config).await.expect("cluster starts");
        let sandbox = Sandbox {
            cluster,
            token_key,
            store,
            data_dir,
        };
        sandbox.wait_until_serving().await;
        sandbox
    }

    pub async fn client(&self) -> SwitchyardClient {
        SwitchyardClient::connect(self.cluster.coordinator_url())
            .await
            .expect("client connects")
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::connect(self.cluster.coordinator_url())
            .await
            .expect("admin client connects")
    }

    /// Waits until every slot has a live owner and every running worker holds slots.
    pub async fn wait_until_serving(&self) {
        let expected = self.cluster.live_workers().count() as u32;
        self.wait_for_status("every slot to have a live owner", |status| {
            status.serving && status.live_workers == expected
        })
        .await;
    }

    /// Polls ClusterStatus (which follows the published placement) until `ready` holds.
    pub async fn wait_for_status(
        &self,
        what: &str,
        ready: impl Fn(&pb::ClusterStatusResponse) -> bool,
    ) {
        let admin = self.admin().await;
        let ready = &ready;
        wait_for(what, Duration::from_secs(10), || {
            let mut admin = admin.clone();
            async move {
                let status = admin
                    .cluster_status(pb::ClusterStatusRequest {})
                    .await
                    .ok()?
                    .into_inner();
                ready(&status).then_some(())
            }
        })
        .await;
    }

    /// The worker that owns `user_id`'s slot, as the coordinator says.
    pub async fn owner_of(&self, user_id: &str) -> String {
        let placement = self
            .admin()
            .await
            .get_placement(pb::GetPlacementRequest {
                user_id: user_id.to_string(),
            })
            .await
            .expect("placement")
            .into_inner();
        placement.assignments[0].worker_id.clone()
    }

    pub async fn stop(self) {
        self.cluster.stop().await;
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// Polls `check` until it yields a value, panicking after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("valid url")
        .connect()
        .await
        .expect("connects")
}

pub fn text(role: &str, content: &str) -> pb::Message {
    pb::Message {
        role: role.to_string(),
        content: content.to_string(),
        name: String::new(),
    }
}

pub async fn create(client: &SwitchyardClient, user_id: &str) -> pb::Session {
    client
        .create_session(user_id, [("test", "yes")])
        .await
        .expect("session created")
        .session
        .expect("response holds the session")
}

/// A process agent run by python3: `turn`, a python `turn(message)`, inside the shared loop.
fn python_agent(agent_type: &str, turn: &str) -> Arc<ProcessConfig> {
    Arc::new(ProcessConfig {
        agent_type: agent_type.to_string(),
        program: "python3".to_string(),
        args: vec!["-c".to_string(), format!("{turn}{AGENT_LOOP}")],
        env: Vec::new(),
        ready_timeout: Duration::from_secs(10),
    })
}

fn rand_secret() -> Vec<u8> {
    [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()]
        .iter()
        .flat_map(|id| *id.as_bytes())
        .collect()
}
