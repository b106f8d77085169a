//! Hostile input, a table of it, sent as raw bytes through the coordinator as an attacker
//! would. Each case checks the status code, the field named (message and
//! `google.rpc.BadRequest`), that nothing was written, and that the cluster still serves.

use std::time::{Duration, SystemTime};

use bytes::{Buf, BufMut, Bytes};
use switchyard::pb;
use switchyard_core::{SessionId, TokenKey, UserId};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::sandbox::{NUL_AGENT, Sandbox, SandboxOptions, channel, create, text};

const CREATE: &str = "/switchyard.v1.SessionService/CreateSession";
const GET: &str = "/switchyard.v1.SessionService/GetSession";
const LIST: &str = "/switchyard.v1.SessionService/ListSessions";
const APPEND: &str = "/switchyard.v1.SessionService/AppendContext";
const CONTEXT: &str = "/switchyard.v1.SessionService/GetContext";
const SEND: &str = "/switchyard.v1.SessionService/SendMessage";
const PLACEMENT: &str = "/switchyard.v1.AdminService/GetPlacement";
const DRAIN: &str = "/switchyard.v1.AdminService/DrainWorker";
/// Messages in the fixture session before the cases run; no case may add one.
const FIXTURE_MESSAGES: usize = 2;

#[derive(Clone, Copy, Default)]
struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> BytesCodec {
        BytesCodec
    }

    fn decoder(&mut self) -> BytesCodec {
        BytesCodec
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, destination: &mut EncodeBuf<'_>) -> Result<(), Status> {
        destination.put(item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, source: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        let length = source.remaining();
        Ok(Some(source.copy_to_bytes(length)))
    }
}

/// Sends `body` to `path` with `token` as it is; a streaming reply is read to its end.
async fn raw_call(
    channel: &Channel,
    path: &'static str,
    body: Vec<u8>,
    token: Option<&str>,
) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone())
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);
    grpc.ready()
        .await
        .map_err(|error| Status::unavailable(error.to_string()))?;
    let mut request = Request::new(Bytes::from(body));
    request.set_timeout(Duration::from_secs(10));
    if let Some(token) = token {
        let value = MetadataValue::try_from(token)
            .map_err(|_| Status::internal("test token is not ASCII"))?;
        request.metadata_mut().insert("x-session-token", value);
    }
    if path == SEND {
        let mut stream = grpc
            .server_streaming(request, PathAndQuery::from_static(path), BytesCodec)
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        Ok(())
    } else {
        grpc.unary(request, PathAndQuery::from_static(path), BytesCodec)
            .await
            .map(|_| ())
    }
}

struct Case {
    name: &'static str,
    path: &'static str,
    body: Vec<u8>,
    token: Option<String>,
    code: Code,
    /// For INVALID_ARGUMENT: the field the message starts with and the BadRequest names.
    field: Option<&'static str>,
}

fn case(
    name: &'static str,
    path: &'static str,
    body: impl Body,
    token: Option<&str>,
    code: Code,
    field: Option<&'static str>,
) -> Case {
    Case {
        name,
        path,
        body: body.into_bytes(),
        token: token.map(str::to_string),
        code,
        field,
    }
}

fn invalid(
    name: &'static str,
    path: &'static str,
    body: impl Body,
    token: Option<&str>,
    field: &'static str,
) -> Case {
    case(name, path, body, token, Code::InvalidArgument, Some(field))
}

fn context_of(session_id: &str) -> pb::GetContextRequest {
    pb::GetContextRequest {
        session_id: session_id.to_string(),
        ..Default::default()
    }
}

fn append(session_id: &str, messages: Vec<pb::Message>) -> pb::AppendContextRequest {
    pb::AppendContextRequest {
        session_id: session_id.to_string(),
        messages,
        request_id: String::new(),
    }
}

fn send(session_id: &str, agent_type: &str, content: &str) -> pb::SendMessageRequest {
    pb::SendMessageRequest {
        session_id: session_id.to_string(),
        agent_type: agent_type.to_string(),
        content: content.to_string(),
        request_id: String::new(),
    }
}

fn create_for(user_id: &str, metadata: &[(String, String)]) -> pb::CreateSessionRequest {
    pb::CreateSessionRequest {
        user_id: user_id.to_string(),
        metadata: metadata.iter().cloned().collect(),
        double_text: String::new(),
    }
}

/// A protobuf string field `tag` holding `bytes` as they are (invalid UTF-8, say).
fn raw_string_field(tag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut encoded = vec![(tag << 3) | 2, bytes.len() as u8];
    encoded.extend_from_slice(bytes);
    encoded
}

#[tokio::test]
async fn hostile_input_is_refused_naming_the_field_and_writes_nothing() {
    let sandbox = Sandbox::start_with(SandboxOptions {
        limits: switchyard_core::Limits {
            max_reply_bytes: 1000,
            ..switchyard_core::Limits::default()
        },
        ..SandboxOptions::default()
    })
    .await;
    let client = sandbox.client().await;
    let coordinator = channel(&sandbox.cluster.coordinator_url()).await;

    let alice = create(&client, "alice").await;
    let alice_other = create(&client, "alice").await;
    let bob = create(&client, "bob").await;
    let ended = create(&client, "carol").await;
    client
        .append_context(
            &alice.session_id,
            vec![text("user", "first"), text("assistant", "second")],
        )
        .await
        .unwrap();
    let token = client.token(&alice.session_id).unwrap();
    let other_token = client.token(&alice_other.session_id).unwrap();
    let bob_token = client.token(&bob.session_id).unwrap();
    let ended_token = client.token(&ended.session_id).unwrap();
    assert!(client.end_session(&ended.session_id).await.unwrap());
    let id = alice.session_id.as_str();
    let tok = Some(token.as_str());

    let (head, mac) = token.rsplit_once('.').unwrap();
    let mut flipped = mac.as_bytes().to_vec();
    flipped[3] = if flipped[3] == b'A' { b'B' } else { b'A' };
    let flipped = format!("{head}.{}", String::from_utf8(flipped).unwrap());
    let truncated = token[..token.len() - 6].to_string();
    let session_id = SessionId::parse(id).unwrap();
    let alice_user = UserId::parse("alice").unwrap();
    let expired = sandbox.token_key.mint_expiring_at(
        session_id,
        &alice_user,
        SystemTime::now() - Duration::from_secs(1),
    );
    let foreign = TokenKey::from_secret(&[42; 32]).unwrap().mint(
        session_id,
        &alice_user,
        Duration::from_secs(60),
    );
    let huge_token = "x".repeat(1024 * 1024);
    let metadata = |count: usize, key: usize, value: usize| -> Vec<(String, String)> {
        (0..count)
            .map(|index| (format!("{index:0>key$}"), "v".repeat(value)))
            .collect()
    };
    let named = |name: &str| pb::Message {
        role: "user".into(),
        content: "hi".into(),
        name: name.into(),
    };
    let mut utf8_in_content = raw_string_field(1, id.as_bytes());
    let inner = [0x0a, 0x04, b'u', b's', b'e', b'r', 0x12, 0x02, 0xc3, 0x28];
    utf8_in_content.push(0x12);
    utf8_in_content.push(inner.len() as u8);
    utf8_in_content.extend_from_slice(&inner);
    let mut utf8_in_metadata = raw_string_field(1, b"mallory");
    let entry = [0x0a, 0x01, b'k', 0x12, 0x02, 0xff, 0xfe];
    utf8_in_metadata.push(0x12);
    utf8_in_metadata.push(entry.len() as u8);
    utf8_in_metadata.extend_from_slice(&entry);

    let cases = vec![
        // Tokens.
        case(
            "no token",
            CONTEXT,
            context_of(id),
            None,
            Code::Unauthenticated,
            None,
        ),
        case(
            "forged token",
            CONTEXT,
            context_of(id),
            Some("sy1.AAAA.BBBB"),
            Code::Unauthenticated,
            None,
        ),
        case(
            "truncated token",
            CONTEXT,
            context_of(id),
            Some(&truncated),
            Code::Unauthenticated,
            None,
        ),
        case(
            "bit-flipped token",
            CONTEXT,
            context_of(id),
            Some(&flipped),
            Code::Unauthenticated,
            None,
        ),
        case(
            "expired token",
            CONTEXT,
            context_of(id),
            Some(&expired),
            Code::Unauthenticated,
            None,
        ),
        case(
            "token of another cluster's key",
            CONTEXT,
            context_of(id),
            Some(&foreign),
            Code::Unauthenticated,
            None,
        ),
        case(
            "another session's token",
            CONTEXT,
            context_of(id),
            Some(&other_token),
            Code::PermissionDenied,
            None,
        ),
        case(
            "another user's token",
            CONTEXT,
            context_of(id),
            Some(&bob_token),
            Code::PermissionDenied,
            None,
        ),
        case(
            "another user's token, appending",
            APPEND,
            append(id, vec![text("user", "x")]),
            Some(&bob_token),
            Code::PermissionDenied,
            None,
        ),
        case(
            "an ended session's token",
            CONTEXT,
            context_of(&ended.session_id),
            Some(&ended_token),
            Code::NotFound,
            None,
        ),
        // Refused by the HTTP/2 header limit before anything reads it; the connection goes.
        case(
            "a 1 MB token",
            CONTEXT,
            context_of(id),
            Some(&huge_token),
            Code::ResourceExhausted,
            None,
        ),
        // Session ids.
        invalid(
            "empty session id",
            CONTEXT,
            context_of(""),
            tok,
            "session_id",
        ),
        invalid(
            "huge session id",
            CONTEXT,
            context_of(&"a".repeat(10_000)),
            tok,
            "session_id",
        ),
        invalid(
            "session id with NUL",
            CONTEXT,
            context_of(&format!("{}\0", &id[..35])),
            tok,
            "session_id",
        ),
        invalid(
            "session id in upper case",
            CONTEXT,
            context_of(&id.to_uppercase()),
            tok,
            "session_id",
        ),
        invalid(
            "session id without hyphens",
            CONTEXT,
            context_of(&id.replace('-', "")),
            tok,
            "session_id",
        ),
        invalid(
            "traversal as session id",
            GET,
            pb::GetSessionRequest {
                session_id: "../../etc/passwd".into(),
            },
            tok,
            "session_id",
        ),
        // User and worker ids.
        invalid(
            "empty user id",
            CREATE,
            create_for("", &[]),
            None,
            "user_id",
        ),
        invalid(
            "huge user id",
            CREATE,
            create_for(&"u".repeat(129), &[]),
            None,
            "user_id",
        ),
        invalid(
            "user id with NUL",
            CREATE,
            create_for("mal\0lory", &[]),
            None,
            "user_id",
        ),
        invalid(
            "user id with an escape sequence",
            CREATE,
            create_for("mal\u{1b}[31mlory", &[]),
            None,
            "user_id",
        ),
        invalid(
            "user id with a bidi override",
            CREATE,
            create_for("mallory\u{202e}yrollam", &[]),
            None,
            "user_id",
        ),
        invalid(
            "user id with a bidi isolate",
            LIST,
            pb::ListSessionsRequest {
                user_id: "a\u{2066}b".into(),
                ..Default::default()
            },
            None,
            "user_id",
        ),
        invalid(
            "listing with NUL in the user id",
            LIST,
            pb::ListSessionsRequest {
                user_id: "\0".into(),
                ..Default::default()
            },
            None,
            "user_id",
        ),
        invalid(
            "placement of a user id with NUL",
            PLACEMENT,
            pb::GetPlacementRequest {
                user_id: "a\0".into(),
            },
            None,
            "user_id",
        ),
        invalid(
            "traversal as worker id",
            DRAIN,
            pb::DrainWorkerRequest {
                worker_id: "../../etc".into(),
                wait: false,
            },
            None,
            "worker_id",
        ),
        invalid(
            "a page cursor that is no session",
            LIST,
            pb::ListSessionsRequest {
                user_id: "alice".into(),
                after_session_id: "../x".into(),
            },
            None,
            "after_session_id",
        ),
        // Bytes that are not what the schema says.
        invalid(
            "invalid UTF-8 in the user id",
            CREATE,
            Raw(raw_string_field(1, &[b'a', 0xff])),
            None,
            "user_id",
        ),
        invalid(
            "invalid UTF-8 in the session id",
            CONTEXT,
            Raw(raw_string_field(1, &[0xc3, 0x28])),
            tok,
            "session_id",
        ),
        invalid(
            "invalid UTF-8 in a message",
            APPEND,
            Raw(utf8_in_content),
            tok,
            "messages.content",
        ),
        invalid(
            "invalid UTF-8 in a metadata value",
            CREATE,
            Raw(utf8_in_metadata),
            None,
            "metadata",
        ),
        case(
            "bytes that are no protobuf",
            CREATE,
            Raw(vec![0xff; 16]),
            None,
            Code::InvalidArgument,
            None,
        ),
        // Sizes.
        invalid(
            "content over 64 KiB",
            APPEND,
            append(id, vec![text("user", &"x".repeat(64 * 1024 + 1))]),
            tok,
            "messages[0].content",
        ),
        invalid(
            "101 messages in one append",
            APPEND,
            append(id, (0..101).map(|_| text("user", "x")).collect()),
            tok,
            "messages",
        ),
        invalid(
            "no message in an append",
            APPEND,
            append(id, vec![]),
            tok,
            "messages",
        ),
        invalid(
            "a message name over 64 bytes",
            APPEND,
            append(id, vec![named(&"n".repeat(65))]),
            tok,
            "messages[0].name",
        ),
        invalid(
            "a message name with NUL",
            APPEND,
            append(id, vec![named("a\0b")]),
            tok,
            "messages[0].name",
        ),
        invalid(
            "NUL in content",
            APPEND,
            append(id, vec![text("user", "a\0b")]),
            tok,
            "messages[0].content",
        ),
        invalid(
            "an unknown role",
            APPEND,
            append(id, vec![text("root", "x")]),
            tok,
            "messages[0].role",
        ),
        invalid(
            "33 metadata entries",
            CREATE,
            create_for("mallory", &metadata(33, 2, 1)),
            None,
            "metadata",
        ),
        invalid(
            "a metadata key of 65 bytes",
            CREATE,
            create_for("mallory", &metadata(1, 65, 1)),
            None,
            "metadata",
        ),
        invalid(
            "a metadata value of 1025 bytes",
            CREATE,
            create_for("mallory", &metadata(1, 1, 1025)),
            None,
            "metadata[0]",
        ),
        invalid(
            "an unknown double-text policy",
            CREATE,
            pb::CreateSessionRequest {
                user_id: "mallory".into(),
                double_text: "shout".into(),
                ..Default::default()
            },
            None,
            "double_text",
        ),
        invalid(
            "an agent type of 65 bytes",
            SEND,
            send(id, &"a".repeat(65), "hi"),
            tok,
            "agent_type",
        ),
        invalid(
            "an unknown agent type",
            SEND,
            send(id, "no-such-agent", "hi"),
            tok,
            "agent_type",
        ),
        invalid("an empty turn", SEND, send(id, "echo", ""), tok, "content"),
        invalid(
            "a turn over 64 KiB",
            SEND,
            send(id, "echo", &"x".repeat(64 * 1024 + 1)),
            tok,
            "content",
        ),
        invalid(
            "NUL in a turn",
            SEND,
            send(id, "echo", "a\0b"),
            tok,
            "content",
        ),
        case(
            "a request over the gRPC message limit",
            APPEND,
            append(id, vec![text("user", &"x".repeat(9 * 1024 * 1024))]),
            tok,
            Code::ResourceExhausted,
            None,
        ),
    ];
    assert!(cases.len() >= 40, "the table has {} cases", cases.len());

    let mut checked = 0;
    for case in &cases {
        let status = raw_call(
            &coordinator,
            case.path,
            case.body.clone(),
            case.token.as_deref(),
        )
        .await
        .expect_err(case.name);
        assert_eq!(status.code(), case.code, "{}: {status:?}", case.name);
        if let Some(field) = case.field {
            assert!(
                status.message().starts_with(field),
                "{}: the message does not start with {field}: {}",
                case.name,
                status.message()
            );
            let violations = status
                .get_details_bad_request()
                .unwrap_or_else(|| panic!("{}: no BadRequest detail in {status:?}", case.name))
                .field_violations;
            assert!(
                violations
                    .iter()
                    .any(|violation| violation.field.starts_with(field)),
                "{}: BadRequest names {violations:?}, not {field}",
                case.name
            );
        }
        assert!(
            !status.message().contains(&token) && !status.message().contains(&bob_token),
            "{}: a token leaked into the message",
            case.name
        );
        // Nothing written, and still serving.
        let context = client.get_context(id, 0, 0).await.unwrap();
        assert_eq!(
            context.len(),
            FIXTURE_MESSAGES,
            "{}: the context changed",
            case.name
        );
        assert_eq!(
            client.list_sessions("alice").await.unwrap().len(),
            2,
            "{}",
            case.name
        );
        assert!(
            client.list_sessions("mallory").await.unwrap().is_empty(),
            "{}: a session was created",
            case.name
        );
        assert_serving(&coordinator, case.name).await;
        checked += 1;
    }
    assert_eq!(checked, cases.len());

    // Replies: one too long, and one holding NUL while another session appends.
    let mut long = client
        .send_message(id, "echo", &"y".repeat(1200))
        .await
        .unwrap();
    let status = loop {
        match long.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("a reply over the limit ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("agent echo"),
        "{}",
        status.message()
    );

    let nul_turn = client.send_message_collect(&bob.session_id, NUL_AGENT, "hi");
    let beside = client.append_context(&alice_other.session_id, vec![text("user", "beside")]);
    let (nul_turn, beside) = tokio::join!(nul_turn, beside);
    let status = nul_turn.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(status.message().contains(NUL_AGENT), "{}", status.message());
    assert_eq!(beside.unwrap(), 1);
    // The refused reply was never committed; the user message was.
    let bob_context = client.get_context(&bob.session_id, 0, 0).await.unwrap();
    assert_eq!(bob_context.len(), 1);
    assert_eq!(bob_context[0].role, "user");
    // The fixture still holds exactly its messages plus the too-long turn's user message.
    assert_eq!(
        client.get_context(id, 0, 0).await.unwrap().len(),
        FIXTURE_MESSAGES + 1
    );
    assert_serving(&coordinator, "after the replies").await;
    sandbox.stop().await;
}

/// A message already encoded (or deliberately broken).
struct Raw(Vec<u8>);

impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Raw({} bytes)", self.0.len())
    }
}

/// What a case sends: a message, encoded, or bytes as they are.
trait Body {
    fn into_bytes(self) -> Vec<u8>;
}

impl<M: prost::Message> Body for M {
    fn into_bytes(self) -> Vec<u8> {
        self.encode_to_vec()
    }
}

impl Body for Raw {
    fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

async fn assert_serving(channel: &Channel, after: &str) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap_or_else(|status| panic!("{after}: health check failed: {status:?}"))
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        "{after}"
    );
}
