//! The manifests run: the dev overlay, rendered, started as separate hosts.
//!
//! Each container's command, arguments and environment come from the rendered objects
//! (`valueFrom` resolved against the rendered ConfigMaps, a Secret made here and the
//! downward API), its files are written where its mounts say (under a test root), and each
//! pod runs in a network namespace of its own, on a bridge, with the Services' names in its
//! hosts file. The store is the machine's PostgreSQL. The test probes the pods as the
//! manifests say, drives a workload through the coordinator's Service address, rolls the
//! workers one by one through their preStop drain, and cuts a worker's link.

mod net;
mod pods;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use switchyard::SwitchyardClient;
use switchyard::pb;
use tonic_health::ServingStatus;

use crate::harness::{BINARY, health_status, temp_dir};
use net::Net;
use pods::{ENTRYPOINT, Pod};

const WORKERS: usize = 3;
const USERS: usize = 12;

fn skip(reason: &str) {
    if std::env::var_os("SWITCHYARD_REQUIRE_MULTIHOST").is_some() {
        panic!("the multi-host test cannot run: {reason}");
    }
    eprintln!("SKIPPED: the multi-host test: {reason}");
}

/// A pod's process, in its namespace.
struct Running {
    pod: Pod,
    namespace: String,
    address: String,
    child: Child,
}

impl Running {
    fn start(pod: &Pod, namespace: &str, address: &str, logs: &Path) -> Running {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{}.log", pod.name)))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", namespace, BINARY])
            .args(&pod.args)
            .env_clear()
            .envs(pod.env.iter().map(|(name, value)| (name, value)))
            .env("PATH", "/usr/bin:/bin")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Running {
            pod: pod.clone(),
            namespace: namespace.to_string(),
            address: address.to_string(),
            child,
        }
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
    }

    /// Waits for the process to exit, up to its pod's termination grace.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let until = Instant::now() + Duration::from_secs(self.pod.termination_grace_seconds);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!("{} outlived its termination grace", self.pod.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The preStop command as the manifest writes it, in the pod's namespace with its
    /// environment (the image's entrypoint is the binary under test).
    fn pre_stop(&self) -> std::process::Output {
        let command = self.pod.pre_stop.as_ref().expect("a preStop hook");
        let program = if command[0] == ENTRYPOINT {
            BINARY
        } else {
            &command[0]
        };
        Command::new("ip")
            .args(["netns", "exec", &self.namespace, program])
            .args(&command[1..])
            .env_clear()
            .envs(self.pod.env.iter().map(|(name, value)| (name, value)))
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap()
    }

    /// Runs the probe until it says SERVING (readiness) or the wait is over.
    async fn wait_until(&self, readiness: bool, within: Duration) {
        let (port, service) = if readiness {
            self.pod.readiness.clone()
        } else {
            (self.pod.liveness_port, String::new())
        };
        let started = Instant::now();
        loop {
            if health_status(&format!("{}:{port}", self.address), &service).await
                == Some(ServingStatus::Serving as i32)
            {
                return;
            }
            assert!(
                started.elapsed() < within,
                "{}'s probe ({port}, {service:?}) never said SERVING",
                self.pod.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PostgreSQL as the hosts reach it: the machine's server, forwarded from the bridge.
async fn forward_postgres(listen: &str, to: String) {
    let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let to = to.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

/// An operator key (every scope) made by the binary, and its api-keys.toml entry.
fn api_key() -> (String, String) {
    let output = Command::new(BINARY)
        .args([
            "api-key",
            "new",
            "--name",
            "operator",
            "--scope",
            "sessions",
            "--scope",
            "admin",
            "--scope",
            "admin-read",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    let key = text.lines().nth(1).unwrap().trim().to_string();
    let entry = text
        .split_once("Entry for the --api-keys file:\n")
        .unwrap()
        .1
        .to_string();
    (key, entry)
}

fn random_hex() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_overlay_runs_as_separate_hosts_through_a_rolling_update_and_a_cut_link() {
    let Ok(postgres) = std::env::var("SWITCHYARD_TEST_POSTGRES_URL") else {
        return skip("no SWITCHYARD_TEST_POSTGRES_URL");
    };
    let root_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let objects = match pods::render(&root_dir.join("deploy/k8s/overlays/dev")) {
        Ok(objects) => objects,
        Err(error) => return skip(&format!("the dev overlay does not render here: {error}")),
    };
    let mut net = match Net::new() {
        Ok(net) => net,
        Err(error) => return skip(&format!("network namespaces cannot be made: {error}")),
    };

    // The store: a fresh database on the machine's PostgreSQL, reached from the bridge.
    let database = format!("switchyard_multihost_{}", std::process::id());
    let admin_url = postgres.clone();
    let psql = |sql: &str| {
        Command::new("psql")
            .args([admin_url.as_str(), "-Atqc", sql])
            .status()
            .map(|status| status.success())
            .unwrap_or(false)
    };
    psql(&format!("DROP DATABASE IF EXISTS {database}"));
    assert!(
        psql(&format!("CREATE DATABASE {database}")),
        "cannot create {database}"
    );
    let server = postgres
        .split_once('@')
        .map(|(_, rest)| rest.split('/').next().unwrap_or("127.0.0.1:5432"))
        .unwrap_or("127.0.0.1:5432")
        .to_string();
    forward_postgres(&format!("{}:5432", net.gateway()), server).await;

    // The Secret the manifests reference, made as docs/deploy.md says.
    let (key, entry) = api_key();
    let secret: BTreeMap<String, String> = [
        (
            "store-url".to_string(),
            format!("postgres://postgres@{}:5432/{database}", net.gateway()),
        ),
        ("token.key".to_string(), random_hex()),
        ("cluster.secret".to_string(), random_hex()),
        ("kek.key".to_string(), random_hex()),
        ("api-keys.toml".to_string(), entry),
        ("drain-api-key".to_string(), key.clone()),
    ]
    .into();

    let root = temp_dir("multihost");
    let namespace = "switchyard-dev";
    let coordinator_pod = pods::pod(
        &objects,
        pods::find(&objects, "Deployment", "switchyard-coordinator"),
        "switchyard-coordinator-0",
        &secret,
        &root,
    );
    let workers_set = pods::find(&objects, "StatefulSet", "switchyard-worker");
    let replicas = workers_set["spec"]["replicas"].as_u64().unwrap() as usize;
    assert_eq!(replicas, WORKERS, "the dev overlay's workers");
    let worker_pods: Vec<Pod> = (0..WORKERS)
        .map(|index| {
            pods::pod(
                &objects,
                workers_set,
                &format!("switchyard-worker-{index}"),
                &secret,
                &root,
            )
        })
        .collect();
    // The worker id and advertise address come from the pod's name, as the manifests say.
    assert_eq!(
        worker_pods[1]
            .env
            .iter()
            .find(|(name, _)| name == "SWITCHYARD_ADVERTISE")
            .unwrap()
            .1,
        format!("switchyard-worker-1.switchyard-worker.{namespace}.svc:50061")
    );

    let coordinator_ns = net.add_host("coord", 2).unwrap();
    let mut worker_ns = Vec::new();
    for index in 0..WORKERS {
        worker_ns.push(
            net.add_host(&format!("w{index}"), 10 + index as u8)
                .unwrap(),
        );
    }
    let mut hosts = format!(
        "{} switchyard-coordinator switchyard-coordinator.{namespace}.svc\n",
        net.address(2)
    );
    for index in 0..WORKERS {
        hosts += &format!(
            "{} switchyard-worker-{index}.switchyard-worker.{namespace}.svc\n",
            net.address(10 + index as u8)
        );
    }
    net.set_hosts(&hosts).unwrap();

    let logs = root.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let coordinator = Running::start(&coordinator_pod, &coordinator_ns, &net.address(2), &logs);
    coordinator.wait_until(false, Duration::from_secs(30)).await;
    coordinator.wait_until(true, Duration::from_secs(30)).await;
    let mut workers: Vec<Running> = (0..WORKERS)
        .map(|index| {
            Running::start(
                &worker_pods[index],
                &worker_ns[index],
                &net.address(10 + index as u8),
                &logs,
            )
        })
        .collect();
    for worker in &workers {
        worker.wait_until(false, Duration::from_secs(30)).await;
        worker.wait_until(true, Duration::from_secs(30)).await;
    }

    // A workload through the coordinator's Service address.
    let service = format!("http://{}:50051", net.address(2));
    let client = SwitchyardClient::connect(service.clone())
        .await
        .unwrap()
        .with_api_key(&key)
        .unwrap();
    let mut sessions = Vec::new();
    for user in 0..USERS {
        let created = client
            .create_session(&format!("user-{user}"), [("host", "test")])
            .await
            .unwrap();
        sessions.push(created.session.unwrap().session_id);
    }
    let sessions = Arc::new(sessions);
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let turns = Arc::new(AtomicU64::new(0));
    let workload = {
        let (client, sessions, stop, failed, turns) = (
            client.clone(),
            sessions.clone(),
            stop.clone(),
            failed.clone(),
            turns.clone(),
        );
        tokio::spawn(async move {
            let mut acknowledged: Vec<(usize, String)> = Vec::new();
            let started = Instant::now();
            for round in 0..20_000u64 {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(240) {
                    break;
                }
                let index = round as usize % sessions.len();
                let content = format!("acknowledged {round}");
                let message = pb::Message {
                    role: "user".into(),
                    content: content.clone(),
                    name: String::new(),
                };
                match client.append_context(&sessions[index], vec![message]).await {
                    Ok(_) => acknowledged.push((index, content)),
                    Err(status) => {
                        eprintln!("append failed: {status:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if round % 7 == 0 {
                    match client
                        .send_message_collect(&sessions[index], "assistant", "a turn")
                        .await
                    {
                        Ok(_) => {
                            turns.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(status) => {
                            eprintln!("turn failed: {status:?}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            acknowledged
        })
    };

    // A rolling update: each worker in turn runs its preStop as written, stops, and comes
    // back; the workload goes on meanwhile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for index in 0..WORKERS {
        let drained = workers[index].pre_stop();
        assert!(
            drained.status.success(),
            "worker {index}'s preStop failed: {}",
            String::from_utf8_lossy(&drained.stderr)
        );
        workers[index].signal("TERM");
        workers[index].wait_exit();
        workers[index] = Running::start(
            &worker_pods[index],
            &worker_ns[index],
            &net.address(10 + index as u8),
            &logs,
        );
        workers[index]
            .wait_until(true, Duration::from_secs(30))
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let acknowledged = workload.await.unwrap();
    eprintln!(
        "multi-host: {} appends acknowledged and {} turns through a rolling update of {WORKERS} workers",
        acknowledged.len(),
        turns.load(Ordering::Relaxed)
    );
    assert!(
        acknowledged.len() > 50,
        "only {} appends",
        acknowledged.len()
    );
    assert!(turns.load(Ordering::Relaxed) > 5);
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "calls failed past the SDK's retries"
    );
    let check_all = |client: SwitchyardClient, acknowledged: Vec<(usize, String)>| {
        let sessions = sessions.clone();
        async move {
            for (index, session) in sessions.iter().enumerate() {
                let stored: Vec<String> = client
                    .get_context(session, 0, 0)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|message| message.content)
                    .collect();
                for (_, content) in acknowledged.iter().filter(|(at, _)| *at == index) {
                    let times = stored.iter().filter(|kept| *kept == content).count();
                    assert_eq!(
                        times, 1,
                        "{content} of session {index} is there {times} times"
                    );
                }
            }
        }
    };
    check_all(client.clone(), acknowledged.clone()).await;

    // A worker's link is cut: after its lease its users are served by the others, and
    // when it comes back it registers again and writes under a new lease only.
    let mut admin = pb::admin_service_client::AdminServiceClient::connect(service.clone())
        .await
        .unwrap();
    let owner_of = |admin: &mut pb::admin_service_client::AdminServiceClient<_>, user: &str| {
        let mut request = tonic::Request::new(pb::GetPlacementRequest {
            user_id: user.to_string(),
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        let mut admin = admin.clone();
        async move {
            let placement = admin.get_placement(request).await.unwrap().into_inner();
            let assignment = &placement.assignments[0];
            (assignment.worker_id.clone(), assignment.slot)
        }
    };
    let (owner, slot) = owner_of(&mut admin, "user-0").await;
    // The slot's lease as the store keeps it: (owner, epoch).
    let lease = || {
        let output = Command::new("psql")
            .args([
                &format!("{}/{database}", postgres.rsplit_once('/').unwrap().0),
                "-Atqc",
                &format!("SELECT owner || ' ' || epoch FROM slot_leases WHERE slot = {slot}"),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8(output.stdout).unwrap();
        let (owner, epoch) = text.trim().split_once(' ').expect("a lease row");
        (owner.to_string(), epoch.parse::<u64>().unwrap())
    };
    let (leased_to, epoch_before) = lease();
    assert_eq!(leased_to, owner);
    let cut = worker_pods
        .iter()
        .position(|pod| pod.name == owner)
        .expect("user-0's worker is one of the pods");
    net.set_link(&worker_ns[cut], false).unwrap();
    let cut_at = Instant::now();
    let served_by = loop {
        let (owner, _) = owner_of(&mut admin, "user-0").await;
        if owner != worker_pods[cut].name && client.get_context(&sessions[0], 0, 0).await.is_ok() {
            break owner;
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(20),
            "user-0 was not served again after its worker's link was cut"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_ne!(served_by, worker_pods[cut].name);
    eprintln!(
        "multi-host: {}'s link cut; user-0 served by {served_by} after {:?}",
        worker_pods[cut].name,
        cut_at.elapsed()
    );
    let message = pb::Message {
        role: "user".into(),
        content: "after the cut".into(),
        name: String::new(),
    };
    client
        .append_context(&sessions[0], vec![message])
        .await
        .unwrap();
    // Fenced: the store's lease moved to the new owner at a newer epoch, so nothing the cut
    // worker still holds can be written under it.
    let (leased_to, epoch_after) = lease();
    assert_eq!(leased_to, served_by);
    assert!(
        epoch_after > epoch_before,
        "{epoch_after} after {epoch_before}"
    );
    net.set_link(&worker_ns[cut], true).unwrap();
    // Back, it learns it was declared dead: it drops every lease and session it held, and
    // registers afresh.
    let log_path = logs.join(format!("{}.log", worker_pods[cut].name));
    let back = Instant::now();
    while !std::fs::read_to_string(&log_path)
        .unwrap()
        .contains("registered again: leases and sessions are taken afresh")
    {
        assert!(
            back.elapsed() < Duration::from_secs(20),
            "the cut worker never registered again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    workers[cut].wait_until(true, Duration::from_secs(30)).await;
    let mut acknowledged = acknowledged;
    acknowledged.push((0, "after the cut".to_string()));
    check_all(client.clone(), acknowledged).await;

    for worker in &mut workers {
        worker.signal("TERM");
        worker.wait_exit();
    }
    drop(coordinator);
    psql(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)"));
}
