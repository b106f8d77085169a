//! Choosing and opening the session store from the command line.

use std::path::Path;
use std::sync::Arc;

use switchyard_store::sealing::KeyRing;
use switchyard_store::{MemoryStore, SessionStore, SqlStore, SqlStoreOptions, StoreError};

/// Opens the store named by `--store`: `memory`, a `sqlite://` or `postgres://` URL, or,
/// when none is given, the SQLite file `switchyard.db` in `data_dir`; with `keys`, its
/// contents are encrypted at rest.
pub async fn open(
    store: Option<&str>,
    data_dir: &Path,
    keys: Option<KeyRing>,
) -> Result<Arc<dyn SessionStore>, StoreError> {
    let with_keys = |options: SqlStoreOptions| match &keys {
        Some(keys) => options.with_keys(keys.clone()),
        None => options,
    };
    match store {
        Some("memory") => Ok(Arc::new(MemoryStore::new())),
        Some(url) => Ok(Arc::new(
            SqlStore::open(with_keys(SqlStoreOptions::new(url))).await?,
        )),
        None => {
            std::fs::create_dir_all(data_dir).map_err(|error| {
                StoreError::Unavailable(format!(
                    "cannot create the data directory {}: {error}",
                    data_dir.display()
                ))
            })?;
            let path = data_dir.join("switchyard.db");
            Ok(Arc::new(
                SqlStore::open(with_keys(SqlStoreOptions::sqlite_file(&path))).await?,
            ))
        }
    }
}

/// How a store is shown to people: never with a password.
pub fn describe(store: Option<&str>, data_dir: &Path) -> String {
    match store {
        Some("memory") => "in memory (nothing survives a restart)".to_string(),
        Some(url) => redact(url),
        None => format!("sqlite {}", data_dir.join("switchyard.db").display()),
    }
}

fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    match rest.split_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_never_shown() {
        assert_eq!(
            redact("postgres://sy:secret@db:5432/sy"),
            "postgres://sy:***@db:5432/sy"
        );
        assert_eq!(redact("postgres://db/sy"), "postgres://db/sy");
    }
}
