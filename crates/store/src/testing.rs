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
