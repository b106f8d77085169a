//! `switchyard dev --tls`: a throw-away CA and certificates under `DATA_DIR/tls/`, made
//! once and reused, so that dev serves TLS on its listener and mutual TLS between its nodes.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum DevTlsError {
    #[error("cannot make the dev certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The files `dev --tls` serves with. `ca.pem` is what clients trust (grpcurl -cacert).
#[derive(Debug, Clone)]
pub struct DevTlsFiles {
    pub ca: PathBuf,
    /// The coordinator's listener.
    pub coordinator_cert: PathBuf,
    pub coordinator_key: PathBuf,
    /// Every node's certificate for mutual TLS inside the cluster.
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
}

impl DevTlsFiles {
    fn at(dir: &Path) -> DevTlsFiles {
        DevTlsFiles {
            ca: dir.join("ca.pem"),
            coordinator_cert: dir.join("coordinator.pem"),
            coordinator_key: dir.join("coordinator.key"),
            node_cert: dir.join("node.pem"),
            node_key: dir.join("node.key"),
        }
    }

    fn all(&self) -> [&PathBuf; 5] {
        [
            &self.ca,
            &self.coordinator_cert,
            &self.coordinator_key,
            &self.node_cert,
            &self.node_key,
        ]
    }
}

/// The certificates in `data_dir/tls`, made on first use. Their names cover localhost,
/// 127.0.0.1, ::1 and `listen` (when it is a specific address).
pub fn load_or_create(data_dir: &Path, listen: IpAddr) -> Result<DevTlsFiles, DevTlsError> {
    let dir = data_dir.join("tls");
    let files = DevTlsFiles::at(&dir);
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !listen.is_unspecified() && !listen.is_loopback() {
        names.push(listen.to_string());
    }
    let names_file = dir.join("names");
    let made_for = std::fs::read_to_string(&names_file).unwrap_or_default();
    if files.all().iter().all(|path| path.exists()) && made_for == names.join("\n") {
        return Ok(files);
    }
    std::fs::create_dir_all(&dir).map_err(|source| DevTlsError::Write {
        path: dir.clone(),
        source,
    })?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "switchyard dev CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |common_name: &str| -> Result<(String, String), DevTlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.clone())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Nodes are servers to some and clients of others.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let certificate = params.signed_by(&key, &issuer)?;
        Ok((certificate.pem(), key.serialize_pem()))
    };
    let (coordinator_cert, coordinator_key) = leaf("switchyard dev coordinator")?;
    let (node_cert, node_key) = leaf("switchyard dev node")?;
    write(&files.ca, ca.pem().as_bytes(), false)?;
    write(&files.coordinator_cert, coordinator_cert.as_bytes(), false)?;
    write(&files.coordinator_key, coordinator_key.as_bytes(), true)?;
    write(&files.node_cert, node_cert.as_bytes(), false)?;
    write(&files.node_key, node_key.as_bytes(), true)?;
    write(&names_file, names.join("\n").as_bytes(), false)?;
    Ok(files)
}

fn write(path: &Path, contents: &[u8], private: bool) -> Result<(), DevTlsError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    options
        .open(path)
        .and_then(|mut file| file.write_all(contents))
        .map_err(|source| DevTlsError::Write {
            path: path.to_path_buf(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_made_once_and_load() {
        let dir = std::env::temp_dir().join(format!("switchyard-dev-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = load_or_create(&dir, IpAddr::from([127, 0, 0, 1])).unwrap();
        let ca = std::fs::read(&files.ca).unwrap();
        let again = load_or_create(&dir, IpAddr::from([127, 0, 0, 1])).unwrap();
        assert_eq!(std::fs::read(&again.ca).unwrap(), ca, "reused, not remade");
        switchyard_server::ServerTlsFiles {
            cert: files.coordinator_cert.clone(),
            key: files.coordinator_key.clone(),
            clients: switchyard_server::ClientCertificates::Required(files.ca.clone()),
        }
        .load()
        .unwrap();
        switchyard::tls::ClientTlsFiles {
            ca: files.ca.clone(),
            identity: Some((files.node_cert.clone(), files.node_key.clone())),
        }
        .load()
        .unwrap();
        // Another listen address needs names the old certificates lack: they are remade.
        let other = load_or_create(&dir, IpAddr::from([10, 1, 2, 3])).unwrap();
        assert_ne!(std::fs::read(&other.ca).unwrap(), ca);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
