//! Calls between the nodes of one process without a socket. In `switchyard dev` (and the
//! cluster sandboxes) the coordinator forwards to workers in the same process: each such
//! call would otherwise cross HTTP/2 framing and loopback TCP twice, encoding, writing,
//! waking and decoding every frame of a streamed reply once more than the caller's own hop.
//!
//! A server given [`LocalNodes`] lists its service stack there, under the address it serves
//! on, for as long as it accepts calls. The stack is the one its socket serves (the call
//! metrics, the admission gate, the routes), so a local call is checked, limited and
//! counted like any other. Only the transport is left out: TLS (there is no wire to
//! protect) and HTTP/2's own limits per connection.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tonic::body::Body;
use tower::util::BoxCloneSyncService;

/// A server's whole service stack, called in place; or a channel to one elsewhere, so that
/// a caller holds either the same way.
pub type NodeChannel = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, CallError>;

/// Why a call did not reach its server (a channel's connection failed, say).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct CallError(#[from] pub tower::BoxError);

/// The servers of one process that its other nodes may call in place, by the address each
/// serves on. Each cluster in a process has its own: a sandbox's coordinator never reaches
/// another sandbox's worker that once had the same address.
#[derive(Clone, Default)]
pub struct LocalNodes {
    servers: Arc<RwLock<HashMap<String, NodeChannel>>>,
}

impl LocalNodes {
    pub fn new() -> Self {
        Self::default()
    }

    /// The server serving on `address` in this process, while it accepts calls.
    pub fn get(&self, address: &str) -> Option<NodeChannel> {
        self.servers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(address)
            .cloned()
    }

    /// Lists `service` under `address` until the returned guard drops.
    pub(crate) fn list(&self, address: String, service: NodeChannel) -> Listed {
        self.servers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(address.clone(), service);
        Listed {
            nodes: self.clone(),
            address,
        }
    }
}

/// Keeps a server listed in its [`LocalNodes`]; dropped when it stops accepting calls, or
/// when its task is aborted.
pub(crate) struct Listed {
    nodes: LocalNodes,
    address: String,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.nodes
            .servers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&self.address);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use switchyard::bench_pb::echo_client::EchoClient;
    use switchyard::bench_pb::echo_server::{Echo, EchoServer};
    use switchyard::bench_pb::{EchoRequest, EchoResponse};
    use tokio_util::sync::CancellationToken;
    use tonic::{Code, Request, Response, Status};

    use super::*;
    use crate::{CallClass, Gate, GrpcServer};

    struct Answer;

    #[tonic::async_trait]
    impl Echo for Answer {
        async fn echo(
            &self,
            request: Request<EchoRequest>,
        ) -> Result<Response<EchoResponse>, Status> {
            Ok(Response::new(EchoResponse {
                payload: request.into_inner().payload,
            }))
        }
    }

    /// Admits a call only if it says the password, and counts what it was asked.
    #[derive(Default)]
    struct Password {
        asked: std::sync::atomic::AtomicUsize,
    }

    impl Gate for Password {
        fn admit(
            &self,
            _path: &str,
            headers: &http::HeaderMap,
            _extensions: &mut http::Extensions,
        ) -> Result<CallClass, Status> {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match headers.get("password") {
                Some(value) if value == "swordfish" => Ok(CallClass::Work),
                _ => Err(Status::unauthenticated("say the password")),
            }
        }
    }

    /// The server listed under `address`, once its task has started serving.
    async fn listed(nodes: &LocalNodes, address: &str) -> NodeChannel {
        for _ in 0..500 {
            if let Some(service) = nodes.get(address) {
                return service;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the server never listed itself under {address}");
    }

    #[tokio::test]
    async fn a_server_is_called_in_place_through_its_gate_until_it_shuts_down() {
        let nodes = LocalNodes::new();
        let gate = std::sync::Arc::new(Password::default());
        let listener = crate::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let address = "worker-address:1".to_string();
        let shutdown = CancellationToken::new();
        let server = GrpcServer::new()
            .with_gate(gate.clone())
            .with_local(nodes.clone(), address.clone())
            .add_service(EchoServer::new(Answer));
        let serving = tokio::spawn(server.serve(listener, shutdown.clone()));
        let mut client = EchoClient::new(listed(&nodes, &address).await);
        let mut request = Request::new(EchoRequest {
            payload: b"in place".to_vec(),
        });
        request
            .metadata_mut()
            .insert("password", "swordfish".parse().unwrap());
        let answer = client.echo(request).await.unwrap().into_inner();
        assert_eq!(answer.payload, b"in place");

        // The gate decides in place as it does on the socket.
        let refused = client
            .echo(EchoRequest { payload: vec![1] })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert_eq!(gate.asked.load(std::sync::atomic::Ordering::SeqCst), 2);

        shutdown.cancel();
        serving.await.unwrap().unwrap();
        assert!(
            nodes.get(&address).is_none(),
            "a server that stopped is no longer listed"
        );
    }

    #[tokio::test]
    async fn a_server_whose_task_is_aborted_is_no_longer_listed() {
        let nodes = LocalNodes::new();
        let listener = crate::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let server = GrpcServer::new()
            .with_local(nodes.clone(), "aborted:1".to_string())
            .add_service(EchoServer::new(Answer));
        let serving = tokio::spawn(server.serve(listener, CancellationToken::new()));
        listed(&nodes, "aborted:1").await;
        serving.abort();
        let _ = serving.await;
        assert!(nodes.get("aborted:1").is_none());
    }
}
