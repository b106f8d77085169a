//! Loading and creating the secrets every node of a cluster shares: the session-token
//! signing key, the cluster secret (from which node credentials are made) and the
//! key-encryption keys of the store.

use std::path::{Path, PathBuf};
use switchyard_store::sealing::{Kek, KeyRing};

use ring::rand::{SecureRandom, SystemRandom};
use switchyard_core::{ClusterKey, TokenKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key from {origin}: {reason}")]
    Invalid { origin: String, reason: String },
    #[error(
        "no token key: pass --token-key-file (or set SWITCHYARD_TOKEN_KEY_FILE or SWITCHYARD_TOKEN_KEY) with the same secret of at least 32 bytes on every node"
    )]
    Missing,
    #[error(
        "no cluster secret: pass --cluster-secret-file (or set SWITCHYARD_CLUSTER_SECRET_FILE or SWITCHYARD_CLUSTER_SECRET) with the same secret of at least 32 bytes on every node"
    )]
    MissingClusterSecret,
    #[error("cannot generate a secret: the system random source failed")]
    Random,
}

/// The cluster secret from a file, or from the secret itself; the file wins.
pub fn load_cluster_key(file: Option<&Path>, secret: Option<&str>) -> Result<ClusterKey, KeyError> {
    let (secret, origin) = match (file, secret) {
        (Some(path), _) => (
            std::fs::read(path).map_err(|source| KeyError::Read {
                path: path.to_path_buf(),
                source,
            })?,
            path.display().to_string(),
        ),
        (None, Some(secret)) => (
            secret.as_bytes().to_vec(),
            "SWITCHYARD_CLUSTER_SECRET".to_string(),
        ),
        (None, None) => return Err(KeyError::MissingClusterSecret),
    };
    ClusterKey::from_secret(secret.trim_ascii()).map_err(|error| KeyError::Invalid {
        origin,
        reason: error.to_string(),
    })
}

/// The cluster secret in `data_dir/cluster.key`, created on first use.
/// The key-encryption keys in `files`: the first wraps new data keys, the others unwrap.
/// `None` without files.
pub fn load_keks(files: &[PathBuf]) -> Result<Option<KeyRing>, KeyError> {
    let mut keks = Vec::with_capacity(files.len());
    for path in files {
        let contents = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.clone(),
            source,
        })?;
        let kek = Kek::from_secret(contents.trim_ascii()).map_err(|error| KeyError::Invalid {
            origin: path.display().to_string(),
            reason: error.to_string(),
        })?;
        keks.push(kek);
    }
    let mut keks = keks.into_iter();
    Ok(keks
        .next()
        .map(|active| KeyRing::new(active, keks.collect())))
}

/// A KEK given as the secret itself (`SWITCHYARD_KEK`).
pub fn kek_from_secret(secret: &str) -> Result<KeyRing, KeyError> {
    let kek = Kek::from_secret(secret.trim().as_bytes()).map_err(|error| KeyError::Invalid {
        origin: "SWITCHYARD_KEK".to_string(),
        reason: error.to_string(),
    })?;
    Ok(KeyRing::new(kek, Vec::new()))
}

/// The key-encryption key in `data_dir/kek.key`, created on first use (`switchyard dev`).
pub fn load_or_create_kek(data_dir: &Path) -> Result<KeyRing, KeyError> {
    let path = create_secret_file(data_dir, "kek.key")?;
    load_keks(&[path])?.ok_or(KeyError::Missing)
}

pub fn load_or_create_cluster_key(data_dir: &Path) -> Result<ClusterKey, KeyError> {
    let path = create_secret_file(data_dir, "cluster.key")?;
    load_cluster_key(Some(&path), None)
}

/// `data_dir/name`, holding 32 random bytes in hex, made on first use (mode 0600).
fn create_secret_file(data_dir: &Path, name: &str) -> Result<PathBuf, KeyError> {
    let path = data_dir.join(name);
    if path.exists() {
        return Ok(path);
    }
    let hex = random_hex(32)?;
    std::fs::create_dir_all(data_dir)
        .and_then(|()| write_private(&path, hex.as_bytes()))
        .map_err(|source| KeyError::Write {
            path: path.clone(),
            source,
        })?;
    Ok(path)
}

/// `bytes` random bytes from the system's secure source, in hex.
pub fn random_hex(bytes: usize) -> Result<String, KeyError> {
    let mut secret = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| KeyError::Random)?;
    Ok(secret.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// The key from a file, or from the secret itself; the file wins.
pub fn load(file: Option<&Path>, secret: Option<&str>) -> Result<TokenKey, KeyError> {
    if let Some(path) = file {
        let contents = std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        return from_bytes(contents.trim_ascii(), &path.display().to_string());
    }
    if let Some(secret) = secret {
        return from_bytes(secret.trim().as_bytes(), "SWITCHYARD_TOKEN_KEY");
    }
    Err(KeyError::Missing)
}

fn from_bytes(secret: &[u8], origin: &str) -> Result<TokenKey, KeyError> {
    TokenKey::from_secret(secret).map_err(|error| KeyError::Invalid {
        origin: origin.to_string(),
        reason: error.to_string(),
    })
}

/// The key in `data_dir/token.key`, created on first use, so tokens survive restarts.
pub fn load_or_create(data_dir: &Path) -> Result<TokenKey, KeyError> {
    let path = create_secret_file(data_dir, "token.key")?;
    load(Some(&path), None)
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_keys_are_reused() {
        let dir = std::env::temp_dir().join(format!("switchyard-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = load_or_create(&dir).unwrap();
        let second = load_or_create(&dir).unwrap();
        assert_eq!(first.id(), second.id());
        load_or_create_cluster_key(&dir).unwrap();
        let cluster = std::fs::read(dir.join("cluster.key")).unwrap();
        load_or_create_cluster_key(&dir).unwrap();
        assert_eq!(std::fs::read(dir.join("cluster.key")).unwrap(), cluster);
        assert_ne!(cluster, std::fs::read(dir.join("token.key")).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn short_or_missing_keys_are_refused() {
        assert!(matches!(
            load(None, Some("short")),
            Err(KeyError::Invalid { .. })
        ));
        assert!(matches!(load(None, None), Err(KeyError::Missing)));
        assert!(load(None, Some(&"k".repeat(32))).is_ok());
        assert!(matches!(
            load_cluster_key(None, None),
            Err(KeyError::MissingClusterSecret)
        ));
        assert!(load_cluster_key(None, Some("short")).is_err());
        assert!(load_cluster_key(None, Some(&"c".repeat(32))).is_ok());
    }
}
