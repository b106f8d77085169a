//! The shared gRPC server builder and shutdown handling.

mod admission;
pub mod local;
pub mod metrics;
pub mod tls;

pub use admission::{CallClass, Gate, OpenGate, ServerLimits};
pub use local::{CallError, LocalNodes, NodeChannel};
pub use tls::{ClientCertificates, ServerTls, ServerTlsFiles, TlsConnectInfo};

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server on {address} failed: {source}")]
    Serve {
        address: String,
        source: tonic::transport::Error,
    },
}

/// How long calls in progress may run on after shutdown begins, unless configured.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A gRPC server under construction: add services, then [`GrpcServer::serve`].
pub struct GrpcServer {
    routes: RoutesBuilder,
    service_names: Vec<&'static str>,
    shutdown_grace: Duration,
    gate: Arc<dyn Gate>,
    limits: ServerLimits,
    reflection: bool,
    tls: Option<Arc<ServerTls>>,
    /// The `node` label of this server's call metrics.
    node: String,
    call_log: metrics::CallLog,
    /// The health name that reports SERVING only while this is true (a readiness probe's
    /// `service`), beside "" and the services, which report SERVING while the server runs.
    readiness: Option<(&'static str, tokio::sync::watch::Receiver<bool>)>,
    /// Where this server lists itself for callers in the same process, and under which
    /// address.
    local: Option<(LocalNodes, String)>,
}

impl Default for GrpcServer {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcServer {
    pub fn new() -> Self {
        GrpcServer {
            routes: RoutesBuilder::default(),
            service_names: Vec::new(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            gate: Arc::new(OpenGate),
            limits: ServerLimits::default(),
            reflection: true,
            tls: None,
            node: "node".to_string(),
            call_log: metrics::CallLog::default(),
            readiness: None,
            local: None,
        }
    }

    /// Whether calls without a trace context start one here, and whether each call writes
    /// an access-log line.
    pub fn with_call_log(mut self, call_log: metrics::CallLog) -> Self {
        self.call_log = call_log;
        self
    }

    /// Names this node in the call metrics (`node` label): the worker id, or `coordinator`.
    pub fn with_node(mut self, node: &str) -> Self {
        self.node = node.to_string();
        self
    }

    /// Serves TLS with `tls` (re-read when its files change), or plaintext with `None`.
    pub fn with_tls(mut self, tls: Option<Arc<ServerTls>>) -> Self {
        self.tls = tls;
        self
    }

    /// Decides who may call the services added here; health and reflection stay open.
    pub fn with_gate(mut self, gate: Arc<dyn Gate>) -> Self {
        self.gate = gate;
        self
    }

    pub fn with_limits(mut self, limits: ServerLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Reports the health of `name` as SERVING only while `ready` holds true: what a
    /// readiness probe asks, while a liveness probe asks the whole server ("").
    pub fn with_readiness(
        mut self,
        name: &'static str,
        ready: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        self.readiness = Some((name, ready));
        self
    }

    /// Lists this server in `nodes` under `address` while it accepts calls, so that nodes of
    /// the same process call it in place rather than through a socket.
    pub fn with_local(mut self, nodes: LocalNodes, address: String) -> Self {
        self.local = Some((nodes, address));
        self
    }

    /// Serves server reflection (v1 and v1alpha) or not.
    pub fn with_reflection(mut self, reflection: bool) -> Self {
        self.reflection = reflection;
        self
    }

    pub fn limits(&self) -> ServerLimits {
        self.limits
    }

    /// Bounds how long shutdown waits for calls and connections in progress.
    pub fn with_shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower_service::Service<
                http::Request<Body>,
                Response = http::Response<Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.service_names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Serves on `listener` until `shutdown` is cancelled, then reports NOT_SERVING, lets
    /// calls in progress finish (for at most the shutdown grace) and returns.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        let address = listener
            .local_addr()
            .map(|address| address.to_string())
            .unwrap_or_else(|_| "an unknown address".to_string());
        let (health, health_service) = tonic_health::server::health_reporter();
        let readiness_name = self.readiness.as_ref().map(|(name, _)| *name);
        for name in &self.service_names {
            if Some(*name) != readiness_name {
                health
                    .set_service_status(name, ServingStatus::Serving)
                    .await;
            }
        }
        health.set_service_status("", ServingStatus::Serving).await;
        if let Some((name, mut ready)) = self.readiness.clone() {
            let health = health.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let status = if *ready.borrow_and_update() {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    health.set_service_status(name, status).await;
                    tokio::select! {
                        changed = ready.changed() => if changed.is_err() { break },
                        () = shutdown.cancelled() => break,
                    }
                }
                health
                    .set_service_status(name, ServingStatus::NotServing)
                    .await;
            });
        }

        let mut routes = self.routes;
        routes.add_service(health_service);
        if self.reflection {
            // Reflection lists only what this server serves, not every service in the files.
            let served: Vec<&'static str> = self
                .service_names
                .iter()
                .copied()
                .chain([
                    "grpc.health.v1.Health",
                    "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection",
                ])
                .collect();
            let reflection = || {
                served.iter().fold(
                    tonic_reflection::server::Builder::configure()
                        .register_encoded_file_descriptor_set(switchyard::FILE_DESCRIPTOR_SET)
                        .register_encoded_file_descriptor_set(
                            tonic_health::pb::FILE_DESCRIPTOR_SET,
                        ),
                    |builder, name| builder.with_service_name(*name),
                )
            };
            routes
                .add_service(reflection().build_v1()?)
                .add_service(reflection().build_v1alpha()?);
        }

        let limits = self.limits;
        let routes = routes.routes();
        let metrics_layer = metrics::RpcMetricsLayer::new(&self.node, self.call_log);
        let admission_layer = admission::AdmissionLayer::new(self.gate.clone(), limits);
        // The same stack as the socket's, called in place; unlisted as shutdown begins.
        let listed = self.local.map(|(nodes, local_address)| {
            let service = tower::ServiceBuilder::new()
                .map_err(|never: Infallible| -> local::CallError { match never {} })
                .layer(metrics_layer.clone())
                .layer(admission_layer.clone())
                .service(routes.clone());
            nodes.list(local_address, NodeChannel::new(service))
        });
        let stopping = {
            let shutdown = shutdown.clone();
            let health = health.clone();
            let names = self.service_names.clone();
            async move {
                shutdown.cancelled().await;
                drop(listed);
                report_not_serving(&health, &names).await;
            }
        };
        let router = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // One connection cannot hold more than its share: streams, headers, and
            // streams reset before they were served.
            .max_concurrent_streams(limits.max_concurrent_streams)
            .http2_max_header_list_size(limits.max_header_list_bytes)
            .http2_max_pending_accept_reset_streams(Some(64))
            .initial_stream_window_size(Some(1024 * 1024))
            .initial_connection_window_size(Some(4 * 1024 * 1024))
            .layer(metrics_layer)
            .layer(admission_layer)
            .trace_fn(|request| tracing::debug_span!("grpc", path = %request.uri().path()))
            .add_routes(routes);
        let serving: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
            match self.tls {
                Some(tls) => {
                    tokio::spawn(tls.clone().watch(shutdown.clone().cancelled_owned()));
                    let incoming = tls::incoming(listener, tls, shutdown.clone());
                    Box::pin(router.serve_with_incoming_shutdown(incoming, stopping))
                }
                None => {
                    let incoming = TcpListenerStream::new(listener).map(|stream| {
                        let stream = stream?;
                        stream.set_nodelay(true)?;
                        Ok::<_, std::io::Error>(stream)
                    });
                    Box::pin(router.serve_with_incoming_shutdown(incoming, stopping))
                }
            };
        // A client that never closes its connection must not hold the process up forever.
        let grace_over = async {
            shutdown.cancelled().await;
            tokio::time::sleep(self.shutdown_grace).await;
        };
        tokio::select! {
            result = serving => result.map_err(|source| ServerError::Serve { address, source }),
            () = grace_over => {
                tracing::warn!(%address, grace = ?self.shutdown_grace, "connections still open after the shutdown grace; closing them");
                Ok(())
            }
        }
    }
}

async fn report_not_serving(health: &HealthReporter, names: &[&'static str]) {
    for name in names {
        health
            .set_service_status(name, ServingStatus::NotServing)
            .await;
    }
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
}

/// Binds a listener, with the address in the error.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|error| {
        std::io::Error::new(error.kind(), format!("cannot listen on {address}: {error}"))
    })
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM; exits the process at once on a second.
pub fn cancel_on_signal(shutdown: CancellationToken) {
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down; send the signal again to exit at once");
        shutdown.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal, exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; watching only Ctrl-C");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
