//! Server reflection (v1 and v1alpha) and health, as grpcurl and Kubernetes use them.

use tokio_stream::StreamExt;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::{v1, v1alpha};

use std::time::Duration;

use crate::sandbox::{Sandbox, channel, wait_for};

const EXPECTED: [&str; 4] = [
    "grpc.health.v1.Health",
    "switchyard.v1.AdminService",
    "switchyard.v1.MembershipService",
    "switchyard.v1.SessionService",
];

#[tokio::test]
async fn reflection_lists_the_services_in_both_versions() {
    let sandbox = Sandbox::start_with(crate::sandbox::SandboxOptions {
        workers: 1,
        ..Default::default()
    })
    .await;
    let url = sandbox.cluster.coordinator_url();

    let mut alpha =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel(&url).await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = alpha
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected reflection reply: {response:?}");
    };
    let names: Vec<String> = list
        .service
        .into_iter()
        .map(|service| service.name)
        .collect();
    for expected in EXPECTED {
        assert!(
            names.iter().any(|name| name == expected),
            "{expected} missing from {names:?}"
        );
    }

    // v1, and a file lookup by symbol, as `grpcurl describe` does.
    let mut v1_client =
        v1::server_reflection_client::ServerReflectionClient::new(channel(&url).await);
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1::server_reflection_request::MessageRequest::FileContainingSymbol(
                "switchyard.v1.SessionService".to_string(),
            ),
        ),
    };
    let mut responses = v1_client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    assert!(
        matches!(
            response.message_response,
            Some(v1::server_reflection_response::MessageResponse::FileDescriptorResponse(ref files))
                if !files.file_descriptor_proto.is_empty()
        ),
        "{response:?}"
    );

    // Health, overall and per service.
    let mut health = HealthClient::new(channel(&url).await);
    for service in ["", "switchyard.v1.SessionService"] {
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.to_string(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            reply.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }

    // Workers serve reflection and health too.
    let worker = sandbox.cluster.live_workers().next().unwrap().address;
    let health = HealthClient::new(channel(&format!("http://{worker}")).await);
    // SessionService's health is the worker's readiness: SERVING once it holds its slots,
    // which a worker of a cluster that has just started may not yet.
    let reply = wait_for("the worker to be ready", Duration::from_secs(10), || {
        let mut health = health.clone();
        async move {
            let reply = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "switchyard.v1.SessionService".into(),
                })
                .await
                .ok()?
                .into_inner();
            (reply.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                .then_some(reply)
        }
    })
    .await;
    assert_eq!(
        reply.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    sandbox.stop().await;
}
