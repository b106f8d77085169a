//! TLS with rustls (the ring provider, the same crypto as the rest): PEM files, client
//! configurations re-read when their files change (cert-manager rotates them), and the
//! connector that gives a tonic channel TLS.
//!
//! Every new connection takes the configuration in force, so a rotated certificate is used
//! from the next connection on, with no restart and no dropped call.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

/// How often certificate files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// Bound on a TLS handshake, either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no usable {what} (PEM expected): {reason}")]
    Pem {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("invalid address {0:?}: expected http(s)://HOST:PORT")]
    Address(String),
}

/// The crypto provider every configuration is built with: ring, chosen explicitly so that
/// no other provider linked into the binary can change it.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The certificates of a PEM file (a chain: leaf first).
pub fn certificates(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
            reason: error.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
            reason: "no CERTIFICATE section".into(),
        });
    }
    Ok(certificates)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|error| TlsError::Pem {
        path: path.to_path_buf(),
        what: "private key",
        reason: error.to_string(),
    })
}

/// A root store holding the certificates of a PEM file.
pub fn roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(path, pem)? {
        roots.add(certificate).map_err(|error| TlsError::Pem {
            path: path.to_path_buf(),
            what: "CA certificate",
            reason: error.to_string(),
        })?;
    }
    Ok(roots)
}

/// Files a configuration is built from, and their contents when it was built.
#[derive(Debug, Clone)]
pub struct WatchedFiles {
    paths: Vec<PathBuf>,
    contents: Vec<Vec<u8>>,
}

impl WatchedFiles {
    pub fn read(paths: Vec<PathBuf>) -> Result<WatchedFiles, TlsError> {
        let contents = paths
            .iter()
            .map(|path| read(path))
            .collect::<Result<_, _>>()?;
        Ok(WatchedFiles { paths, contents })
    }

    pub fn len(&self) -> usize {
        self.paths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The file's contents, by its position in `paths`.
    pub fn get(&self, index: usize) -> (&Path, &[u8]) {
        (&self.paths[index], &self.contents[index])
    }

    /// The files read again, when any has changed.
    pub fn changed(&self) -> Result<Option<WatchedFiles>, TlsError> {
        let now = WatchedFiles::read(self.paths.clone())?;
        Ok((now.contents != self.contents).then_some(now))
    }

    pub fn describe(&self) -> String {
        self.paths
            .iter()
            .map(|path| path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

type Build<T> = Box<dyn Fn(&WatchedFiles) -> Result<T, TlsError> + Send + Sync>;

/// A value built from files, rebuilt when they change.
pub struct Reloading<T> {
    current: RwLock<(Arc<T>, WatchedFiles)>,
    build: Build<T>,
}

impl<T: Send + Sync + 'static> Reloading<T> {
    pub fn new(
        paths: Vec<PathBuf>,
        build: impl Fn(&WatchedFiles) -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, TlsError> {
        let files = WatchedFiles::read(paths)?;
        let value = build(&files)?;
        Ok(Arc::new(Reloading {
            current: RwLock::new((Arc::new(value), files)),
            build: Box::new(build),
        }))
    }

    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .0
            .clone()
    }

    /// Rebuilds from the files if they changed; keeps the value in force if they cannot
    /// be read or built from. Returns whether it changed.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let files = self
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .1
            .clone();
        let Some(changed) = files.changed()? else {
            return Ok(false);
        };
        let value = (self.build)(&changed)?;
        tracing::info!(files = %changed.describe(), "TLS files changed; new connections use them");
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = (Arc::new(value), changed);
        Ok(true)
    }

    /// Reloads whenever the files change, until `stop` resolves.
    pub async fn watch(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let mut stop = std::pin::pin!(stop);
        let mut reported = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep(RELOAD_INTERVAL) => {}
                () = &mut stop => return,
            }
            match self.reload() {
                Ok(_) => reported = false,
                Err(error) if !reported => {
                    reported = true;
                    tracing::error!(%error, "TLS files not reloaded; the certificates in force stay");
                }
                Err(_) => {}
            }
        }
    }
}

/// Where a client's TLS comes from: the CA it trusts, and its own certificate for mutual
/// TLS.
#[derive(Debug, Clone)]
pub struct ClientTlsFiles {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A client configuration, re-read when its files change.
pub type ClientTls = Reloading<ClientConfig>;

impl ClientTlsFiles {
    pub fn load(&self) -> Result<Arc<ClientTls>, TlsError> {
        let mut paths = vec![self.ca.clone()];
        if let Some((cert, key)) = &self.identity {
            paths.push(cert.clone());
            paths.push(key.clone());
        }
        Reloading::new(paths, build_client_config)
    }
}

fn build_client_config(files: &WatchedFiles) -> Result<ClientConfig, TlsError> {
    let (ca_path, ca) = files.get(0);
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_root_certificates(roots(ca_path, ca)?);
    let mut config = if files.len() == 3 {
        let (cert_path, cert) = files.get(1);
        let (key_path, key) = files.get(2);
        builder
            .with_client_auth_cert(certificates(cert_path, cert)?, private_key(key_path, key)?)
            .map_err(|error| TlsError::Config(error.to_string()))?
    } else {
        builder.with_no_client_auth()
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A lazy channel to `url` (`http://HOST:PORT`, or `https://HOST:PORT` with `tls`),
/// with `configure` applied to its endpoint (timeouts, keepalive). With `tls`, every
/// connection is TLS and the server is verified, against the configuration's CA, for HOST.
pub fn lazy_channel(
    url: &str,
    tls: Option<Arc<ClientTls>>,
    configure: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<Channel, TlsError> {
    let invalid = || TlsError::Address(url.to_string());
    let uri: Uri = url.parse().map_err(|_| invalid())?;
    let authority = uri.authority().ok_or_else(invalid)?.clone();
    if uri.port_u16().is_none() {
        return Err(invalid());
    }
    let secure = match uri.scheme_str() {
        Some("https") => true,
        Some("http") | None => false,
        Some(_) => return Err(invalid()),
    };
    // tonic speaks HTTP/2 over whatever stream the connector hands it.
    let endpoint =
        configure(Endpoint::from_shared(format!("http://{authority}")).map_err(|_| invalid())?);
    let Some(tls) = tls else {
        if secure {
            return Err(TlsError::Config(format!(
                "{url} is https: give the CA that signed its certificate"
            )));
        }
        return Ok(endpoint.connect_lazy());
    };
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let server_name = ServerName::try_from(host).map_err(|_| invalid())?;
    Ok(endpoint.connect_with_connector_lazy(TlsConnectorService { tls, server_name }))
}

#[derive(Clone)]
struct TlsConnectorService {
    tls: Arc<ClientTls>,
    server_name: ServerName<'static>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for TlsConnectorService {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _context: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.tls.current();
        let server_name = self.server_name.clone();
        Box::pin(async move {
            let host = uri.host().ok_or("the address has no host")?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().ok_or("the address has no port")?;
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                TlsConnector::from(config).connect(server_name, tcp),
            )
            .await
            .map_err(|_| "TLS handshake timed out")??;
            Ok(TokioIo::new(stream))
        })
    }
}
