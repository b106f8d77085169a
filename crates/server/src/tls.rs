//! The server side of TLS: a configuration re-read when its files change, and the accept
//! loop that hands tonic connections whose handshake is done.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use switchyard::tls::{
    HANDSHAKE_TIMEOUT, Reloading, TlsError, WatchedFiles, certificates, private_key, provider,
    roots,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

/// Handshakes in progress at once; more connections wait to be accepted.
const MAX_HANDSHAKES: usize = 1024;

/// Who a TLS listener asks for a client certificate.
#[derive(Debug, Clone)]
pub enum ClientCertificates {
    /// Nobody: server TLS only.
    NotAsked,
    /// Anyone may present one, verified against the CA; calls that need one check for it.
    Optional(PathBuf),
    /// Every client must present one signed by the CA (mutual TLS).
    Required(PathBuf),
}

/// Where a server's TLS comes from.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub clients: ClientCertificates,
}

/// A server configuration, re-read when its files change.
pub type ServerTls = Reloading<ServerConfig>;

impl ServerTlsFiles {
    pub fn load(&self) -> Result<Arc<ServerTls>, TlsError> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        let required = match &self.clients {
            ClientCertificates::NotAsked => None,
            ClientCertificates::Optional(ca) => {
                paths.push(ca.clone());
                Some(false)
            }
            ClientCertificates::Required(ca) => {
                paths.push(ca.clone());
                Some(true)
            }
        };
        Reloading::new(paths, move |files| build_server_config(files, required))
    }
}

fn build_server_config(
    files: &WatchedFiles,
    client_certificate_required: Option<bool>,
) -> Result<ServerConfig, TlsError> {
    let (cert_path, cert) = files.get(0);
    let (key_path, key) = files.get(1);
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?;
    let builder = match client_certificate_required {
        None => builder.with_no_client_auth(),
        Some(required) => {
            let (ca_path, ca) = files.get(2);
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca_path, ca)?),
                provider(),
            );
            let verifier = if required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|error| TlsError::Config(error.to_string()))?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(certificates(cert_path, cert)?, private_key(key_path, key)?)
        .map_err(|error| TlsError::Config(format!("{}: {error}", cert_path.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// What tonic puts in every request's extensions about a TLS connection.
#[derive(Debug, Clone)]
pub struct TlsConnectInfo {
    pub remote_address: Option<SocketAddr>,
    /// The client's certificate chain, verified against the listener's CA, when it sent one.
    pub peer_certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// A connection whose TLS handshake is done.
pub struct TlsConnection(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsConnection {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> TlsConnectInfo {
        let (tcp, session) = self.0.get_ref();
        TlsConnectInfo {
            remote_address: tcp.peer_addr().ok(),
            peer_certificates: session.peer_certificates().map(|chain| {
                Arc::new(chain.iter().map(|cert| cert.clone().into_owned()).collect())
            }),
        }
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(context, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(context, buf)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(context)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(context, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// Accepts connections on `listener` and completes their handshakes concurrently (each
/// bounded by the handshake timeout), yielding those that succeed, until `shutdown`.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ServerTls>,
    shutdown: CancellationToken,
) -> ReceiverStream<std::io::Result<TlsConnection>> {
    let (sender, receiver) = mpsc::channel(64);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        continue;
                    }
                },
                () = shutdown.cancelled() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.current());
            let sender = sender.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send(Ok(TlsConnection(stream))).await;
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(%peer, %error, "TLS handshake failed (a plaintext client, or an untrusted certificate?)");
                    }
                    Err(_) => {
                        tracing::warn!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}
