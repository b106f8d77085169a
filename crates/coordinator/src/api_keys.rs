//! The API key file (`--api-keys PATH`): parsed, checked, and read again when it changes,
//! so a rotated Kubernetes Secret takes effect without a restart.
//!
//! ```toml
//! [[keys]]
//! name = "billing-service"
//! sha256 = "…64 hex digits…"
//! scopes = ["sessions"]
//! user_prefix = "acme:"      # optional: the key acts only for these users
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use switchyard_core::api_key::parse_sha256_hex;
use switchyard_core::{ApiKey, ApiKeys, Scope};
use tokio_util::sync::CancellationToken;

/// How often the file is checked for changes. A mounted Secret changes by a symlink swap,
/// which file-change events do not reliably report, so it is read and compared.
const RELOAD_INTERVAL: Duration = Duration::from_secs(2);
/// A key file larger than this is refused (it holds hashes, not data).
const MAX_FILE_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApiKeyFileError {
    #[error("cannot read the API key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the API key file {path} is over {MAX_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("the API key file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    sha256: String,
    scopes: Vec<String>,
    user_prefix: Option<String>,
}

/// Parses the text of a key file.
pub fn parse_api_keys(text: &str) -> Result<ApiKeys, String> {
    let file: KeyFile = toml::from_str(text).map_err(|error| error.to_string())?;
    let mut keys = Vec::with_capacity(file.keys.len());
    for (index, entry) in file.keys.into_iter().enumerate() {
        let at =
            |error: switchyard_core::Error| format!("keys[{index}] ({:?}): {error}", entry.name);
        let hash = parse_sha256_hex(&entry.sha256).map_err(at)?;
        let scopes = entry
            .scopes
            .iter()
            .map(|scope| Scope::parse(scope))
            .collect::<Result<Vec<_>, _>>()
            .map_err(at)?;
        keys.push(ApiKey {
            name: entry.name,
            hash,
            scopes,
            user_prefix: entry.user_prefix,
        });
    }
    ApiKeys::new(keys).map_err(|error| error.to_string())
}

/// The keys in force, from a file that is read again when it changes, or fixed.
pub struct ApiKeyRegistry {
    path: Option<PathBuf>,
    current: RwLock<(Arc<ApiKeys>, Vec<u8>)>,
}

impl ApiKeyRegistry {
    /// Keys that never change (tests, embedding).
    pub fn fixed(keys: ApiKeys) -> Arc<Self> {
        Arc::new(ApiKeyRegistry {
            path: None,
            current: RwLock::new((Arc::new(keys), Vec::new())),
        })
    }

    /// Reads the file; a file that cannot be read or parsed is an error at start.
    pub fn from_file(path: &Path) -> Result<Arc<Self>, ApiKeyFileError> {
        let contents = read(path)?;
        let keys = parse(path, &contents)?;
        Ok(Arc::new(ApiKeyRegistry {
            path: Some(path.to_path_buf()),
            current: RwLock::new((Arc::new(keys), contents)),
        }))
    }

    pub fn current(&self) -> Arc<ApiKeys> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0
            .clone()
    }

    /// Reads the file again; keeps the keys in force when it cannot be read or parsed.
    /// Returns whether the keys changed.
    pub fn reload(&self) -> Result<bool, ApiKeyFileError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let contents = read(path)?;
        if self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .1
            == contents
        {
            return Ok(false);
        }
        let keys = parse(path, &contents)?;
        let count = keys.len();
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = (Arc::new(keys), contents);
        tracing::info!(path = %path.display(), keys = count, "API keys reloaded");
        Ok(true)
    }

    /// Reloads the file whenever it changes, until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        if self.path.is_none() {
            return;
        }
        let mut reported = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep(RELOAD_INTERVAL) => {}
                () = shutdown.cancelled() => return,
            }
            match self.reload() {
                Ok(_) => reported = false,
                // One line per bad version of the file, not one every interval.
                Err(error) if !reported => {
                    reported = true;
                    tracing::error!(%error, "API key file not reloaded; the keys in force stay");
                }
                Err(_) => {}
            }
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ApiKeyFileError> {
    let metadata = std::fs::metadata(path).map_err(|source| ApiKeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if metadata.len() > MAX_FILE_BYTES {
        return Err(ApiKeyFileError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    std::fs::read(path).map_err(|source| ApiKeyFileError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse(path: &Path, contents: &[u8]) -> Result<ApiKeys, ApiKeyFileError> {
    let invalid = |reason: String| ApiKeyFileError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::str::from_utf8(contents).map_err(|_| invalid("not UTF-8".into()))?;
    parse_api_keys(text).map_err(invalid)
}

#[cfg(test)]
mod tests {
    use switchyard_core::api_key::{hash_api_key, sha256_hex};

    use super::*;

    fn entry(name: &str, key: &str, scopes: &str, prefix: Option<&str>) -> String {
        let prefix = prefix
            .map(|prefix| format!("user_prefix = {prefix:?}\n"))
            .unwrap_or_default();
        format!(
            "[[keys]]\nname = {name:?}\nsha256 = \"{}\"\nscopes = {scopes}\n{prefix}\n",
            sha256_hex(&hash_api_key(key))
        )
    }

    #[test]
    fn a_key_file_parses_and_bad_ones_say_where() {
        let text = entry("app", "sy_a", r#"["sessions"]"#, Some("acme:"))
            + &entry("ops", "sy_o", r#"["admin", "admin-read"]"#, None);
        let keys = parse_api_keys(&text).unwrap();
        assert_eq!(keys.len(), 2);
        let app = keys.authenticate(Some("Bearer sy_a")).unwrap();
        assert_eq!(app.user_prefix.as_deref(), Some("acme:"));

        let error = parse_api_keys(&entry("x", "k", r#"["root"]"#, None)).unwrap_err();
        assert!(
            error.contains("keys[0]") && error.contains("root"),
            "{error}"
        );
        let error =
            parse_api_keys("[[keys]]\nname = \"x\"\nsha256 = \"00\"\nscopes = [\"sessions\"]\n")
                .unwrap_err();
        assert!(error.contains("sha256"), "{error}");
        assert!(parse_api_keys("[[keys]]\nname = \"x\"\nsecret = \"k\"\n").is_err());
        assert!(parse_api_keys("").unwrap().is_empty());
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_old_keys() {
        let dir =
            std::env::temp_dir().join(format!("switchyard-api-keys-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys.toml");
        std::fs::write(&path, entry("one", "sy_1", r#"["sessions"]"#, None)).unwrap();
        let registry = ApiKeyRegistry::from_file(&path).unwrap();
        assert!(registry.current().authenticate(Some("Bearer sy_1")).is_ok());
        assert!(!registry.reload().unwrap());

        std::fs::write(&path, entry("two", "sy_2", r#"["sessions"]"#, None)).unwrap();
        assert!(registry.reload().unwrap());
        assert!(
            registry
                .current()
                .authenticate(Some("Bearer sy_1"))
                .is_err()
        );
        assert!(registry.current().authenticate(Some("Bearer sy_2")).is_ok());

        std::fs::write(&path, "not toml [").unwrap();
        assert!(registry.reload().is_err());
        assert!(registry.current().authenticate(Some("Bearer sy_2")).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
