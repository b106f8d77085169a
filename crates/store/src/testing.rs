//! Test support (feature `testing`): a throw-away PostgreSQL database per test.
//!
//! Tests that need PostgreSQL read the server's URL from `SWITCHYARD_TEST_POSTGRES_URL`
//! (for example `postgres://postgres@127.0.0.1:5432/postgres`). Without it they are
//! skipped, and say so on stderr; `tests/run.sh` starts the machine's server and sets it.

use std::io::Write;

use sqlx::{Connection, Executor};

pub const POSTGRES_URL_VARIABLE: &str = "SWITCHYARD_TEST_POSTGRES_URL";

/// A database created for one test and dropped when the value is dropped.
pub struct TestDatabase {
    admin_url: String,
    name: String,
    pub url: String,
}

impl TestDatabase {
    /// Creates a fresh database, or returns `None` (after saying why) when no server is set.
    pub async fn create(test: &str) -> Option<TestDatabase> {
        let Some(admin_url) = std::env::var(POSTGRES_URL_VARIABLE)
            .ok()
            .filter(|url| !url.is_empty())
        else {
            if std::env::var_os("SWITCHYARD_REQUIRE_POSTGRES").is_some() {
                panic!("{POSTGRES_URL_VARIABLE} is not set but SWITCHYARD_REQUIRE_POSTGRES is");
            }
            // Straight to stderr, past the test harness's capture, so a skip is never silent.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: set {POSTGRES_URL_VARIABLE} to run it against PostgreSQL"
            );
            return None;
        };
        sqlx::any::install_default_drivers();
        let name = format!("switchyard_test_{}", uuid_hex());
        let mut admin = sqlx::AnyConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|error| panic!("cannot reach PostgreSQL at {admin_url}: {error}"));
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap_or_else(|error| panic!("cannot create database {name}: {error}"));
        let base = admin_url
            .rsplit_once('/')
            .map(|(base, _)| base)
            .unwrap_or(&admin_url);
        let url = format!("{base}/{name}");
        Some(TestDatabase {
            admin_url,
            name,
            url,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Dropping needs its own runtime: this may run outside one, or inside one that is
        // shutting down.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut admin = sqlx::AnyConnection::connect(&admin_url).await.ok()?;
                admin
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .await
                    .ok()
            })
        })
        .join();
        if !matches!(dropped, Ok(Some(_))) {
            eprintln!("note: test database {} was not dropped", self.name);
        }
    }
}

fn uuid_hex() -> String {
    switchyard_core::SessionId::new_random()
        .as_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// A store that can hold an operation midway, for tests that stage a race: the operation
/// waits, once it has begun, until the test lets it go.
pub struct GatedStore {
    inner: std::sync::Arc<dyn crate::SessionStore>,
    creates: std::sync::Arc<Gate>,
    appends: std::sync::Arc<Gate>,
    follow_ups: std::sync::Arc<Gate>,
    request_record_reads: std::sync::atomic::AtomicUsize,
    system_message_reads: std::sync::atomic::AtomicUsize,
}

/// Holds the operations that reach it while closed.
#[derive(Default)]
pub struct Gate {
    closed: std::sync::atomic::AtomicBool,
    /// Operations that have reached the closed gate.
    arrivals: std::sync::atomic::AtomicUsize,
    reached: tokio::sync::Notify,
    opened: tokio::sync::Notify,
}

impl Gate {
    /// Operations from now wait at the gate.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lets waiting operations (and later ones) through.
    pub fn open(&self) {
        self.closed
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.opened.notify_waiters();
    }

    /// Resolves once an operation has reached the closed gate.
    pub async fn reached(&self) {
        loop {
            let reached = self.reached.notified();
            tokio::pin!(reached);
            reached.as_mut().enable();
            if self.arrivals.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                return;
            }
            reached.await;
        }
    }

    async fn pass(&self) {
        let mut counted = false;
        loop {
            let opened = self.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            if !self.closed.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            if !counted {
                counted = true;
                self.arrivals
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                self.reached.notify_waiters();
            }
            opened.await;
        }
    }
}

impl GatedStore {
    pub fn new(inner: std::sync::Arc<dyn crate::SessionStore>) -> Self {
        GatedStore {
            inner,
            creates: Default::default(),
            appends: Default::default(),
            follow_ups: Default::default(),
            request_record_reads: Default::default(),
            system_message_reads: Default::default(),
        }
    }

    /// The gate appends wait at, before they write.
    pub fn appends(&self) -> &Gate {
        &self.appends
    }

    /// The gate that appends queued to follow another (a turn's reply) also wait at.
    pub fn follow_ups(&self) -> &Gate {
        &self.follow_ups
    }

    /// How many times a request id was looked up.
    pub fn request_record_reads(&self) -> usize {
        self.request_record_reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many times a session's older system messages were read.
    pub fn system_message_reads(&self) -> usize {
        self.system_message_reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The gate `create_session` waits at, before it writes.
    pub fn creates(&self) -> &Gate {
        &self.creates
    }
}

#[async_trait::async_trait]
impl crate::SessionStore for GatedStore {
    async fn cluster_id(&self) -> crate::Result<String> {
        self.inner.cluster_id().await
    }

    async fn acquire_slots(
        &self,
        owner: &switchyard_core::WorkerId,
        epoch: switchyard_core::Epoch,
        slots: &[switchyard_core::Slot],
    ) -> crate::Result<Vec<switchyard_core::Slot>> {
        self.inner.acquire_slots(owner, epoch, slots).await
    }

    async fn max_lease_epoch(&self) -> crate::Result<switchyard_core::Epoch> {
        self.inner.max_lease_epoch().await
    }

    async fn slot_leases(
        &self,
        slots: &[switchyard_core::Slot],
    ) -> crate::Result<Vec<crate::SlotLease>> {
        self.inner.slot_leases(slots).await
    }

    async fn release_slots(&self, fences: &[crate::Fence]) -> crate::Result<usize> {
        self.inner.release_slots(fences).await
    }

    async fn save_placement(&self, placement: &crate::StoredPlacement) -> crate::Result<bool> {
        self.inner.save_placement(placement).await
    }

    async fn load_placement(&self) -> crate::Result<Option<crate::StoredPlacement>> {
        self.inner.load_placement().await
    }

    async fn create_session(
        &self,
        fence: &crate::Fence,
        session: &switchyard_core::Session,
    ) -> crate::Result<()> {
        self.creates.pass().await;
        self.inner.create_session(fence, session).await
    }

    async fn get_session(
        &self,
        session_id: switchyard_core::SessionId,
    ) -> crate::Result<Option<switchyard_core::Session>> {
        self.inner.get_session(session_id).await
    }

    async fn list_user_sessions(
        &self,
        user_id: &switchyard_core::UserId,
    ) -> crate::Result<Vec<switchyard_core::Session>> {
        self.inner.list_user_sessions(user_id).await
    }

    async fn delete_session(
        &self,
        fence: &crate::Fence,
        session_id: switchyard_core::SessionId,
    ) -> crate::Result<bool> {
        self.inner.delete_session(fence, session_id).await
    }

    async fn append_keyed(
        &self,
        fence: &crate::Fence,
        session_id: switchyard_core::SessionId,
        messages: &[switchyard_core::Message],
        at: std::time::SystemTime,
        key: &crate::AppendKey,
        keep_last: u64,
    ) -> crate::Result<crate::Appended> {
        self.appends.pass().await;
        self.inner
            .append_keyed(fence, session_id, messages, at, key, keep_last)
            .await
    }

    /// Queued at once, committed in the background once past the gates; a follow-up reaches
    /// the inner store only after its predecessor settled, so the order holds.
    async fn queue_append(
        &self,
        append: crate::Append,
        after: Option<&crate::AppendTicket>,
    ) -> crate::Result<crate::QueuedAppend> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let ticket = crate::AppendTicket::default();
        let settle = ticket.clone();
        let (inner, appends, follow_ups) = (
            self.inner.clone(),
            self.appends.clone(),
            self.follow_ups.clone(),
        );
        let after = after.cloned();
        tokio::spawn(async move {
            appends.pass().await;
            if let Some(after) = &after {
                follow_ups.pass().await;
                after.committed().await;
            }
            let outcome = match inner.queue_append(append, after.as_ref()).await {
                Ok(queued) => queued.outcome().await,
                Err(error) => Err(error),
            };
            settle.settle(outcome.is_ok());
            let _ = reply.send(outcome);
        });
        Ok(crate::QueuedAppend::waiting(ticket, answer))
    }

    async fn request_record(
        &self,
        session_id: switchyard_core::SessionId,
        request_id: &str,
    ) -> crate::Result<Option<crate::RequestRecord>> {
        self.request_record_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.request_record(session_id, request_id).await
    }

    async fn read_system_messages(
        &self,
        session_id: switchyard_core::SessionId,
        before_seq: u64,
        limit: u32,
    ) -> crate::Result<Vec<switchyard_core::ContextMessage>> {
        self.system_message_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner
            .read_system_messages(session_id, before_seq, limit)
            .await
    }

    async fn read_context(
        &self,
        session_id: switchyard_core::SessionId,
        last_n: u32,
        after_seq: u64,
    ) -> crate::Result<Vec<switchyard_core::ContextMessage>> {
        self.inner.read_context(session_id, last_n, after_seq).await
    }

    async fn read_context_page(
        &self,
        session_id: switchyard_core::SessionId,
        after_seq: u64,
        limit: u32,
    ) -> crate::Result<Vec<switchyard_core::ContextMessage>> {
        self.inner
            .read_context_page(session_id, after_seq, limit)
            .await
    }

    async fn touch_session(
        &self,
        fence: &crate::Fence,
        session_id: switchyard_core::SessionId,
        at: std::time::SystemTime,
    ) -> crate::Result<()> {
        self.inner.touch_session(fence, session_id, at).await
    }

    async fn count_sessions(&self, slots: &[switchyard_core::Slot]) -> crate::Result<u64> {
        self.inner.count_sessions(slots).await
    }

    async fn idle_sessions(
        &self,
        slots: &[switchyard_core::Slot],
        before: std::time::SystemTime,
        limit: usize,
    ) -> crate::Result<Vec<crate::IdleSession>> {
        self.inner.idle_sessions(slots, before, limit).await
    }

    async fn load_user_quota(
        &self,
        user_id: &switchyard_core::UserId,
    ) -> crate::Result<crate::UserQuotaRecord> {
        self.inner.load_user_quota(user_id).await
    }

    async fn set_user_quota(
        &self,
        fence: &crate::Fence,
        user_id: &switchyard_core::UserId,
        overrides: &[crate::StoredLimit],
        clear: bool,
    ) -> crate::Result<()> {
        self.inner
            .set_user_quota(fence, user_id, overrides, clear)
            .await
    }

    async fn save_usage(
        &self,
        usage: &[(crate::Fence, crate::StoredUsage)],
    ) -> crate::Result<usize> {
        self.inner.save_usage(usage).await
    }

    async fn erase_user_quota(
        &self,
        fence: &crate::Fence,
        user_id: &switchyard_core::UserId,
    ) -> crate::Result<(bool, bool)> {
        self.inner.erase_user_quota(fence, user_id).await
    }

    async fn user_storage_bytes(&self, user_id: &switchyard_core::UserId) -> crate::Result<u64> {
        self.inner.user_storage_bytes(user_id).await
    }
}
