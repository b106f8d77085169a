//! The trust boundary, tried as an attacker would against separate processes: callers need
//! API keys of the right scope and tenant, and only members of the cluster talk inside it.

use std::path::Path;
use std::time::{Duration, Instant};

use switchyard::SwitchyardClient;
use switchyard::auth::node_credential;
use switchyard::metadata::NODE_CREDENTIAL;
use switchyard::pb;
use switchyard::pb::admin_service_client::AdminServiceClient;
use switchyard::pb::membership_service_client::MembershipServiceClient;
use switchyard_core::{ClusterKey, NodeRole};
use tonic::Code;
use tonic::transport::Channel;

use crate::harness::{
    BINARY, CLUSTER_SECRET, Process, TOKEN_KEY, free_address, grpcurl, run_grpcurl,
    spawn_coordinator, spawn_worker, start_dev, temp_dir, wait_for_workers,
};

const REGISTER: &str = "/switchyard.v1.MembershipService/Register";

/// Runs `switchyard api-key new` and returns the key and its entry for the key file.
pub(crate) fn new_key(name: &str, scopes: &[&str], prefix: Option<&str>) -> (String, String) {
    let mut args = vec!["api-key", "new", "--name", name];
    for scope in scopes {
        args.extend(["--scope", scope]);
    }
    if let Some(prefix) = prefix {
        args.extend(["--user-prefix", prefix]);
    }
    let output = std::process::Command::new(BINARY)
        .args(&args)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let key = text
        .lines()
        .find(|line| line.starts_with("sy_"))
        .expect("the key is printed")
        .to_string();
    let entry = text
        .split_once("[[keys]]")
        .map(|(_, entry)| format!("[[keys]]{entry}"))
        .expect("the entry is printed");
    assert!(!entry.contains(&key), "the file entry holds only the hash");
    (key, entry)
}

pub(crate) fn admin_request<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}

async fn admin(url: &str) -> AdminServiceClient<Channel> {
    AdminServiceClient::connect(url.to_string()).await.unwrap()
}

/// Waits until `check` holds, for at most `timeout`.
pub(crate) async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < timeout, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn write_keys(path: &Path, entries: &[&str]) {
    // Written whole and renamed into place, as a mounted Secret changes.
    let staged = path.with_extension("staged");
    std::fs::write(&staged, entries.join("\n")).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_need_keys_of_the_right_scope_and_tenant() {
    let dir = temp_dir("api-keys");

    // No keys and no --insecure-no-auth: the coordinator refuses to start.
    let mut refused = Process::spawn(
        "keyless-coordinator",
        &["coordinator", "--listen", "127.0.0.1:0"],
        &dir,
    );
    let status = refused.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    assert!(refused.log().contains("--api-keys"), "{}", refused.log());
    // Nor does dev, off loopback.
    let mut exposed = Process::spawn(
        "exposed-dev",
        &["dev", "--listen", "0.0.0.0:0", "--data-dir", "exposed"],
        &dir,
    );
    assert!(!exposed.wait_exit(Duration::from_secs(20)).success());
    assert!(
        exposed.log().contains("--insecure-no-auth"),
        "{}",
        exposed.log()
    );

    // Reflection can be turned off; health stays.
    if let Some(grpcurl) = grpcurl() {
        let address = free_address().to_string();
        let _quiet = start_dev(&dir, &address, &["--reflection=false"]);
        let listed = std::process::Command::new(grpcurl)
            .args(["-plaintext", &address, "list"])
            .output()
            .unwrap();
        assert!(!listed.status.success(), "reflection answered: {listed:?}");
        assert!(
            String::from_utf8_lossy(&listed.stderr).contains("reflection"),
            "{listed:?}"
        );
    }

    let (app_key, app) = new_key("acme-app", &["sessions"], Some("acme:"));
    let (globex_key, globex) = new_key("globex-app", &["sessions"], Some("globex:"));
    let (viewer_key, viewer) = new_key("dashboard", &["admin-read"], None);
    let (ops_key, ops) = new_key("operator", &["admin"], None);
    let keys_file = dir.join("api-keys.toml");
    write_keys(&keys_file, &[&app, &globex, &viewer, &ops]);
    let keys_path = keys_file.to_str().unwrap();
    let timing = ["--heartbeat-interval", "100ms", "--lease", "1s"];
    let mut args = vec!["--api-keys", keys_path];
    args.extend(timing);
    let (_coordinator, url) = spawn_coordinator(&dir, &args);
    let _worker = spawn_worker(&dir, &url, "worker-a", &[]);

    // Wait for the worker, as an operator with a key would.
    eventually("one worker serving", Duration::from_secs(20), || {
        let url = url.clone();
        let key = viewer_key.clone();
        async move {
            let Ok(mut admin) = AdminServiceClient::connect(url).await else {
                return false;
            };
            admin
                .cluster_status(admin_request(pb::ClusterStatusRequest {}, Some(&key)))
                .await
                .is_ok_and(|status| status.into_inner().serving)
        }
    })
    .await;

    let bare = SwitchyardClient::connect(url.clone()).await.unwrap();
    let status = bare
        .create_session("acme:alice", [("k", "v")])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("API key"), "{}", status.message());

    let wrong = bare.clone().with_api_key("sy_not-a-key").unwrap();
    let status = wrong
        .create_session("acme:alice", [("k", "v")])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        !status.message().contains("sy_not-a-key"),
        "{}",
        status.message()
    );

    let dashboard = bare.clone().with_api_key(&viewer_key).unwrap();
    let status = dashboard
        .create_session("acme:alice", [("k", "v")])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains("sessions"),
        "{}",
        status.message()
    );
    assert!(!status.message().contains(&viewer_key));

    let acme = bare.clone().with_api_key(&app_key).unwrap();
    let created = acme
        .create_session("acme:alice", [("k", "v")])
        .await
        .unwrap();
    let session_id = created.session.unwrap().session_id;
    acme.send_message_collect(&session_id, "echo", "hi")
        .await
        .unwrap();
    let status = acme
        .create_session("globex:bob", [("k", "v")])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("acme:"), "{}", status.message());
    let status = acme.list_sessions("globex:bob").await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // Another tenant's key, even with the session's token, cannot read it.
    let globex_client = bare.clone().with_api_key(&globex_key).unwrap();
    globex_client.set_token(session_id.clone(), created.token.clone());
    let status = globex_client
        .get_context(&session_id, 0, 0)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    let mut admin_client = admin(&url).await;
    let status = admin_client
        .list_workers(admin_request(pb::ListWorkersRequest {}, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    admin_client
        .list_workers(admin_request(pb::ListWorkersRequest {}, Some(&viewer_key)))
        .await
        .unwrap();
    let status = admin_client
        .rebalance(admin_request(pb::RebalanceRequest {}, Some(&viewer_key)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("admin"), "{}", status.message());
    let status = admin_client
        .rebalance(admin_request(pb::RebalanceRequest {}, Some(&app_key)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    admin_client
        .rebalance(admin_request(pb::RebalanceRequest {}, Some(&ops_key)))
        .await
        .unwrap();

    // Health and reflection stay open.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    if let Some(grpcurl) = grpcurl() {
        let address = url.trim_start_matches("http://");
        let listed = run_grpcurl(grpcurl, &["-plaintext", address, "list"]);
        assert!(listed.contains("switchyard.v1.SessionService"), "{listed}");
    }

    // The file changes (a rotated Secret): the new key works and the removed one stops,
    // without a restart.
    let (late_key, late) = new_key("late-app", &["sessions"], None);
    write_keys(&keys_file, &[&late, &globex, &viewer, &ops]);
    let late_client = bare.clone().with_api_key(&late_key).unwrap();
    eventually("the new key to work", Duration::from_secs(10), || {
        let late_client = late_client.clone();
        async move {
            late_client
                .create_session("late-user", [("k", "v")])
                .await
                .is_ok()
        }
    })
    .await;
    let status = acme
        .create_session("acme:carol", [("k", "v")])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // A broken file keeps the keys in force.
    std::fs::write(&keys_file, "this is not toml [").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    late_client
        .create_session("late-user", [("k", "v")])
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a member knows: the cluster id (from the shared store) and the token key's id.
struct Insider {
    cluster_id: String,
    token_key_id: String,
}

impl Insider {
    async fn of(dir: &Path) -> Insider {
        use switchyard_store::{SessionStore, SqlStore, SqlStoreOptions};
        let store = SqlStore::open(SqlStoreOptions::sqlite_file(
            &dir.join("switchyard-data").join("switchyard.db"),
        ))
        .await
        .unwrap();
        Insider {
            cluster_id: store.cluster_id().await.unwrap(),
            token_key_id: switchyard_core::TokenKey::from_secret(TOKEN_KEY.as_bytes())
                .unwrap()
                .id(),
        }
    }

    fn register(
        &self,
        worker_id: &str,
        address: &str,
        known_epoch: u64,
        credential_for: Option<&str>,
    ) -> tonic::Request<pb::RegisterRequest> {
        register_request(
            pb::RegisterRequest {
                worker_id: worker_id.to_string(),
                address: address.to_string(),
                token_key_id: self.token_key_id.clone(),
                known_epoch,
                cluster_id: self.cluster_id.clone(),
                incarnation_id: uuid_like(),
            },
            credential_for,
        )
    }
}

fn register_request(
    message: pb::RegisterRequest,
    credential_for: Option<&str>,
) -> tonic::Request<pb::RegisterRequest> {
    let mut request = tonic::Request::new(message);
    if let Some(node) = credential_for {
        let key = ClusterKey::from_secret(CLUSTER_SECRET.as_bytes()).unwrap();
        request.metadata_mut().insert(
            NODE_CREDENTIAL,
            node_credential(&key, NodeRole::Worker, node, REGISTER),
        );
    }
    request
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

async fn workers(url: &str) -> Vec<pb::WorkerInfo> {
    admin(url)
        .await
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_of_the_cluster_talk_inside_it() {
    let dir = temp_dir("members");
    let timing = ["--heartbeat-interval", "100ms", "--lease", "1s"];
    let (_coordinator, url) = spawn_coordinator(&dir, &timing);
    let _worker = spawn_worker(&dir, &url, "worker-a", &[]);
    wait_for_workers(&url, 1).await;
    let before = workers(&url).await;
    assert_eq!(before.len(), 1);
    let worker_address = before[0].address.clone();
    let coordinator_address = url.trim_start_matches("http://").to_string();
    let mut membership = MembershipServiceClient::connect(url.clone()).await.unwrap();
    let insider = Insider::of(&dir).await;

    // A rogue process without the credential: refused, told nothing of the cluster.
    let status = membership
        .register(insider.register("rogue", "127.0.0.1:1", 0, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        !status.message().contains(&insider.cluster_id),
        "{}",
        status.message()
    );
    assert!(
        !status.message().contains(&insider.token_key_id),
        "{}",
        status.message()
    );
    // Even with the wrong ids, an outsider learns nothing.
    let status = membership
        .register(register_request(
            pb::RegisterRequest {
                worker_id: "rogue".into(),
                address: "127.0.0.1:1".into(),
                incarnation_id: "x".into(),
                ..Default::default()
            },
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        !status.message().contains(&insider.cluster_id),
        "{}",
        status.message()
    );
    let status = membership
        .heartbeat(pb::HeartbeatRequest {
            worker_id: "worker-a".into(),
            known_epoch: u64::MAX,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // A credential made for another node does not speak for this one.
    let status = membership
        .register(insider.register("worker-x", "127.0.0.1:1", 0, Some("worker-y")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);

    // Taking a live worker's id (another incarnation): refused while its lease runs.
    let status = membership
        .register(insider.register("worker-a", "127.0.0.1:9", 0, Some("worker-a")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

    // An epoch above every kept one: refused, and placement goes on.
    let status = membership
        .register(insider.register("worker-evil", "127.0.0.1:2", u64::MAX, Some("worker-evil")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("known_epoch"),
        "{}",
        status.message()
    );
    let after = workers(&url).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].address, worker_address);

    let client = SwitchyardClient::connect(url.clone()).await.unwrap();
    let created = client.create_session("eve", [("k", "v")]).await.unwrap();
    let session_id = created.session.unwrap().session_id;
    client
        .send_message_collect(&session_id, "echo", "still placing")
        .await
        .unwrap();
    let _worker_b = spawn_worker(&dir, &url, "worker-b", &[]);
    wait_for_workers(&url, 2).await;

    // Workers are internal: a direct call is refused, whatever key and token it carries.
    let direct = SwitchyardClient::connect(format!("http://{worker_address}"))
        .await
        .unwrap()
        .with_api_key("sy_anything")
        .unwrap();
    direct.set_token(session_id.clone(), created.token.clone());
    let status = direct
        .create_session("eve", [("k", "v")])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let status = direct.get_context(&session_id, 0, 0).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        !status.message().contains(&insider.cluster_id),
        "{}",
        status.message()
    );

    // A member that advertises the coordinator's own address: forwarded calls for its
    // slots are refused at the coordinator instead of looping.
    let looped = membership
        .register(insider.register("worker-loop", &coordinator_address, 0, Some("worker-loop")))
        .await
        .unwrap()
        .into_inner();
    let table = looped.placement.unwrap();
    let loop_index = table
        .workers
        .iter()
        .position(|worker| worker.worker_id == "worker-loop")
        .unwrap() as u32;
    let slot_count = table.slot_count;
    let user = (0..10_000)
        .map(|index| format!("looped-{index}"))
        .find(|user| {
            let slot = switchyard_core::slot_of(user, slot_count);
            table.slot_owners[slot as usize] == loop_index
        })
        .expect("some user lands on the looping worker");
    let status = client
        .create_session(&user, [("k", "v")])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("forwarded"),
        "{}",
        status.message()
    );
    // Its lease runs out (it never heartbeats) and the slots come back to real workers.
    eventually(
        "the looping worker's slots to move back",
        Duration::from_secs(10),
        || {
            let client = client.clone();
            let user = user.clone();
            async move { client.create_session(&user, [("k", "v")]).await.is_ok() }
        },
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}
