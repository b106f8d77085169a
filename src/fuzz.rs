//! Fuzzing, by proptest over arbitrary bytes, of everything a request meets before any
//! logic: the decoder, the id parsers, the limits, the session token and the API key.
//! Nothing may panic, and every refusal must be a clean error.
//!
//! CI runs a bounded number of cases. A long run:
//! `PROPTEST_CASES=1000000 cargo test --release -p switchyard --lib fuzz`

use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use prost::Message as _;
use switchyard_core::{ApiKeys, Limits, SessionId, TokenKey, UserId};
use tonic::Code;

use crate::codec::decode_message;
use crate::conversions::{messages_from_wire, metadata_from_wire};
use crate::pb;

/// Decodes `bytes` as a `T` the way a server does; refusals must be INVALID_ARGUMENT.
fn decode<T: prost::Message + Default + Send + 'static>(bytes: &[u8]) -> Option<T> {
    match decode_message::<T>(bytes) {
        Ok(message) => Some(message),
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            None
        }
    }
}

fn validate_request(bytes: &[u8]) {
    let limits = Limits::default();
    if let Some(request) = decode::<pb::CreateSessionRequest>(bytes) {
        let _ = UserId::parse(request.user_id);
        let _ = limits.validate_metadata(&metadata_from_wire(request.metadata));
        let _ = switchyard_core::DoubleText::parse(&request.double_text);
    }
    if let Some(request) = decode::<pb::AppendContextRequest>(bytes) {
        let _ = SessionId::parse(&request.session_id);
        if let Ok(messages) = messages_from_wire(request.messages, "messages") {
            let _ = limits.validate_messages(&messages, "messages");
        }
    }
    if let Some(request) = decode::<pb::SendMessageRequest>(bytes) {
        let _ = SessionId::parse(&request.session_id);
        let _ = limits.validate_agent_type(&request.agent_type);
        let _ = limits.validate_content(&request.content, "content");
    }
    if let Some(request) = decode::<pb::GetContextRequest>(bytes) {
        let _ = SessionId::parse(&request.session_id);
    }
    let _ = decode::<pb::ListSessionsRequest>(bytes);
    let _ = decode::<pb::RegisterRequest>(bytes);
    let _ = decode::<pb::HeartbeatRequest>(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_a_request_path(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        validate_request(&bytes);
    }

    #[test]
    fn valid_requests_with_arbitrary_strings_never_panic(
        user_id in "\\PC{0,200}|.{0,200}",
        content in ".{0,300}",
        key in ".{0,80}",
        value in ".{0,80}",
        role in ".{0,10}",
    ) {
        let request = pb::CreateSessionRequest {
            user_id: user_id.clone(),
            metadata: [(key.clone(), value)].into_iter().collect(),
            double_text: role.clone(),
        };
        validate_request(&request.encode_to_vec());
        let request = pb::AppendContextRequest {
            session_id: user_id,
            messages: vec![pb::Message { role, content, name: key }],
            request_id: String::new(),
        };
        validate_request(&request.encode_to_vec());
    }

    #[test]
    fn tokens_of_arbitrary_text_never_verify(token in ".{0,400}") {
        let key = TokenKey::from_secret(&[7; 32]).unwrap();
        prop_assert!(key.verify(&token, SystemTime::now()).is_err());
        let keys = ApiKeys::default();
        prop_assert!(keys.authenticate(Some(&token)).is_err());
    }

    #[test]
    fn a_changed_token_never_verifies_as_another_claim(index in 0usize..400, byte in any::<u8>()) {
        let key = TokenKey::from_secret(&[7; 32]).unwrap();
        let session = SessionId::new_random();
        let user = UserId::parse("alice").unwrap();
        let token = key.mint(session, &user, Duration::from_secs(60));
        let mut bytes = token.clone().into_bytes();
        let index = index % bytes.len();
        prop_assume!(bytes[index] != byte);
        bytes[index] = byte;
        let changed = String::from_utf8_lossy(&bytes).into_owned();
        prop_assume!(changed != token);
        prop_assert!(key.verify(&changed, SystemTime::now()).is_err());
    }
}

#[test]
fn the_fuzz_targets_refuse_what_they_should() {
    // The harness itself can fail: a message that breaks a limit is refused.
    let too_long = pb::SendMessageRequest {
        session_id: SessionId::new_random().to_string(),
        agent_type: "echo".into(),
        content: "x".repeat(Limits::default().max_message_bytes + 1),
        request_id: String::new(),
    };
    let decoded: pb::SendMessageRequest = decode(&too_long.encode_to_vec()).unwrap();
    assert!(
        Limits::default()
            .validate_content(&decoded.content, "content")
            .is_err()
    );
    assert!(decode::<pb::SendMessageRequest>(&[0x1a, 0x01, 0xff]).is_none());
}
