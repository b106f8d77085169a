//! The raw single-hop echo every figure is compared with: a tonic server in this process,
//! built like every Switchyard server, answering with what it was sent.

use std::net::{Ipv4Addr, SocketAddr};

use switchyard::bench_pb::echo_client::EchoClient;
use switchyard::bench_pb::echo_server::{Echo, EchoServer};
use switchyard::bench_pb::{EchoRequest, EchoResponse};
use switchyard_server::GrpcServer;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        Ok(Response::new(EchoResponse {
            payload: request.into_inner().payload,
        }))
    }
}

/// A running echo server; stops when dropped.
pub struct EchoBaseline {
    pub client: EchoClient<Channel>,
    shutdown: CancellationToken,
}

impl EchoBaseline {
    pub async fn start() -> std::io::Result<Self> {
        let listener = switchyard_server::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
        let address = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let server = GrpcServer::new().add_service(EchoServer::new(EchoService));
        tokio::spawn(server.serve(listener, shutdown.clone()));
        let channel = super::connect(&format!("http://{address}")).await?;
        Ok(EchoBaseline {
            client: EchoClient::new(channel),
            shutdown,
        })
    }
}

impl Drop for EchoBaseline {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
