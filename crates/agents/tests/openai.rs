//! The openai backend against a real HTTP server started by the test, speaking the
//! OpenAI chat-completions protocol (streamed over SSE) from a script.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use switchyard_agents::{AgentError, AgentFactory, OpenAiConfig};
use switchyard_core::{ContextMessage, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

#[derive(Clone)]
enum Reply {
    Error {
        status: u16,
        message: &'static str,
    },
    /// 429 with this Retry-After.
    Limited(String),
    Stream(Vec<&'static str>),
    /// 200 with this event-stream body as it is.
    Raw(String),
}

struct FakeServer {
    url: String,
    /// Each request's head and body, in arrival order.
    requests: Arc<Mutex<Vec<(String, String)>>>,
}

/// Serves `script` one reply per request; the last reply repeats.
async fn serve(script: Vec<Reply>) -> FakeServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    tokio::spawn(async move {
        let mut served = 0;
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut received = Vec::new();
            let mut buffer = [0u8; 4096];
            let (head, body) = loop {
                let read = socket.read(&mut buffer).await.unwrap();
                received.extend_from_slice(&buffer[..read]);
                if let Some((head, body, _)) = whole_request(&received) {
                    break (head, body);
                }
            };
            seen.lock().unwrap().push((head, body));
            let reply = script[served.min(script.len() - 1)].clone();
            served += 1;
            match reply {
                Reply::Error { status, message } => {
                    let body = format!("{{\"error\": {{\"message\": \"{message}\"}}}}");
                    let response = format!(
                        "HTTP/1.1 {status} Scripted\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 0\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    socket.write_all(response.as_bytes()).await.unwrap();
                }
                Reply::Limited(retry_after) => {
                    let body = r#"{"error": {"message": "slow down"}}"#;
                    let response = format!(
                        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: {retry_after}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    socket.write_all(response.as_bytes()).await.unwrap();
                }
                Reply::Raw(body) => {
                    socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
                        .await
                        .unwrap();
                    let _ = socket.write_all(body.as_bytes()).await;
                }
                Reply::Stream(events) => {
                    socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
                        .await
                        .unwrap();
                    for event in events {
                        socket
                            .write_all(format!("data: {event}\n\n").as_bytes())
                            .await
                            .unwrap();
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    socket.write_all(b"data: [DONE]\n\n").await.unwrap();
                }
            }
            let _ = socket.shutdown().await;
        }
    });
    FakeServer { url, requests }
}

/// The first request in `received` once it is whole (its head, then as much body as its
/// `content-length` announces): its head, its body, and the bytes it took.
fn whole_request(received: &[u8]) -> Option<(String, String, usize)> {
    let text = String::from_utf8_lossy(received);
    let (head, rest) = text.split_once("\r\n\r\n")?;
    let length: usize = head
        .lines()
        .find_map(|line| {
            line.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let body = rest.get(..length)?;
    Some((head.to_string(), body.to_string(), head.len() + 4 + length))
}

const HELLO: [&str; 3] = [
    r#"{"choices":[{"delta":{"role":"assistant","content":"Hel"}}]}"#,
    r#"{"choices":[{"delta":{"content":"lo!"}}]}"#,
    r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":2}}"#,
];

fn config(url: &str) -> OpenAiConfig {
    OpenAiConfig {
        agent_type: "assistant".into(),
        base_url: url.to_string(),
        model: "test-model".into(),
        api_key_env: None,
        temperature: Some(0.2),
        max_tokens: Some(64),
        system_prompt: OpenAiConfig::system_prompt(
            "a support agent",
            "answer billing questions",
            "Be brief.",
        ),
        timeout: Duration::from_secs(10),
        max_retries: 2,
        backoff: Duration::from_millis(10),
    }
}

async fn turn(config: &OpenAiConfig) -> (Result<switchyard_agents::Usage, AgentError>, String) {
    let mut agent = config.create().await.unwrap();
    let context = [ContextMessage {
        seq: 1,
        role: Role::User,
        content: "hi".into(),
        name: String::new(),
        created_at: SystemTime::now(),
    }];
    let (sender, mut receiver) = mpsc::channel(64);
    let result = agent.run_turn(&context, &sender).await;
    drop(sender);
    let mut text = String::new();
    while let Some(delta) = receiver.recv().await {
        text.push_str(&delta);
    }
    (result, text)
}

#[tokio::test]
async fn streams_the_reply_and_reports_the_servers_usage() {
    let server = serve(vec![Reply::Stream(HELLO.to_vec())]).await;
    let mut config = config(&server.url);
    // The key comes from the variable the configuration names; cargo sets this one for
    // every test it runs, so the test changes no environment.
    config.api_key_env = Some("CARGO_PKG_NAME".into());
    let (usage, text) = turn(&config).await;
    let usage = usage.unwrap();
    assert_eq!(text, "Hello!");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (12, 2));

    let requests = server.requests.lock().unwrap();
    let (head, body) = &requests[0];
    assert!(head.starts_with("POST /v1/chat/completions"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("authorization: bearer switchyard-agents"),
        "{head}"
    );
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["model"], "test-model");
    assert_eq!(body["stream"], true);
    assert_eq!(body["max_tokens"], 64);
    let system = body["messages"][0]["content"].as_str().unwrap();
    assert_eq!(body["messages"][0]["role"], "system");
    assert!(
        system.contains("a support agent")
            && system.contains("billing")
            && system.contains("Be brief."),
        "{system}"
    );
    assert_eq!(body["messages"][1]["content"], "hi");
}

#[tokio::test]
async fn a_429_is_retried_then_succeeds() {
    let server = serve(vec![
        Reply::Error {
            status: 429,
            message: "slow down",
        },
        Reply::Stream(HELLO.to_vec()),
    ])
    .await;
    let (usage, text) = turn(&config(&server.url)).await;
    assert!(usage.is_ok(), "{usage:?}");
    assert_eq!(text, "Hello!");
    assert_eq!(server.requests.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_500_that_persists_fails_with_the_providers_message() {
    let server = serve(vec![Reply::Error {
        status: 500,
        message: "model overloaded",
    }])
    .await;
    let (result, text) = turn(&config(&server.url)).await;
    let Err(AgentError::Failed(message)) = result else {
        panic!("{result:?}")
    };
    assert!(
        message.contains("model overloaded") && message.contains("500"),
        "{message}"
    );
    assert!(text.is_empty());
    assert_eq!(
        server.requests.lock().unwrap().len(),
        3,
        "one try and two retries"
    );
}

#[tokio::test]
async fn a_rate_limit_that_persists_is_resource_exhausted() {
    let server = serve(vec![Reply::Error {
        status: 429,
        message: "quota exceeded",
    }])
    .await;
    let (result, _) = turn(&config(&server.url)).await;
    let Err(error @ AgentError::RateLimited(_)) = result else {
        panic!("{result:?}")
    };
    assert!(error.to_string().contains("quota exceeded"));
    use switchyard_core::ServiceError;
    assert_eq!(
        error.error_code(),
        switchyard_core::ErrorCode::ResourceExhausted
    );
}

#[tokio::test]
async fn a_client_error_is_not_retried_and_a_missing_key_is_named() {
    let server = serve(vec![Reply::Error {
        status: 400,
        message: "unknown model",
    }])
    .await;
    let (result, _) = turn(&config(&server.url)).await;
    assert!(
        matches!(result, Err(AgentError::Failed(ref m)) if m.contains("unknown model")),
        "{result:?}"
    );
    assert_eq!(server.requests.lock().unwrap().len(), 1);

    let mut keyed = config(&server.url);
    keyed.api_key_env = Some("SWITCHYARD_TEST_MISSING_KEY_VARIABLE".into());
    let Err(AgentError::Backend(message)) = keyed.create().await else {
        panic!("a missing key must fail")
    };
    assert!(
        message.contains("SWITCHYARD_TEST_MISSING_KEY_VARIABLE"),
        "{message}"
    );
}

#[tokio::test]
async fn a_retry_after_given_as_an_http_date_is_honoured() {
    let at = SystemTime::now() + Duration::from_secs(2);
    let server = serve(vec![
        Reply::Limited(httpdate::fmt_http_date(at)),
        Reply::Stream(HELLO.to_vec()),
    ])
    .await;
    let started = std::time::Instant::now();
    let (usage, text) = turn(&config(&server.url)).await;
    usage.unwrap();
    assert_eq!(text, "Hello!");
    // The date has a resolution of a second: the retry waited at least until the second
    // before it, far beyond the 10 ms backoff of the configuration.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.requests.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn an_event_stream_line_without_end_ends_the_turn() {
    let endless = format!("data: {}", "x".repeat(1024 * 1024 + 10));
    let server = serve(vec![Reply::Raw(endless)]).await;
    let (result, _) = turn(&config(&server.url)).await;
    let error = result.unwrap_err().to_string();
    assert!(error.contains("bytes"), "{error}");
}

/// A server that keeps its connections open and answers each request on them after
/// `delay`, with a one-delta stream; counts the connections it accepted.
async fn serve_kept_alive(delay: Duration) -> (String, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let connections = Arc::new(Mutex::new(0));
    let accepted = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            *accepted.lock().unwrap() += 1;
            tokio::spawn(async move {
                let mut received = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    let Some((_, _, used)) = whole_request(&received) else {
                        match socket.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => received.extend_from_slice(&buffer[..read]),
                        }
                        continue;
                    };
                    received.drain(..used);
                    tokio::time::sleep(delay).await;
                    let body = "data: {\"choices\":[{\"delta\":{\"content\":\"ok\"}}]}\n\ndata: [DONE]\n\n";
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if socket.write_all(response.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, connections)
}

/// Instances of an agent type share one HTTP client: the second instance's request goes
/// out on the connection the first one opened, and each request keeps its own type's
/// timeout.
#[tokio::test]
async fn instances_share_connections_and_each_type_keeps_its_timeout() {
    let (url, connections) = serve_kept_alive(Duration::ZERO).await;
    let shared = config(&url);
    for _ in 0..3 {
        let (result, text) = turn(&shared).await;
        result.unwrap();
        assert_eq!(text, "ok");
    }
    assert_eq!(
        *connections.lock().unwrap(),
        1,
        "three instances, one connection"
    );

    let (url, _) = serve_kept_alive(Duration::from_millis(400)).await;
    let mut impatient = config(&url);
    impatient.timeout = Duration::from_millis(100);
    impatient.max_retries = 0;
    let patient = config(&url);
    let (result, _) = turn(&impatient).await;
    let error = result.unwrap_err().to_string();
    assert!(error.contains("cannot reach"), "{error}");
    let (result, text) = turn(&patient).await;
    result.unwrap();
    assert_eq!(text, "ok");
}
