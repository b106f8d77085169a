//! The protobuf codec of every generated client and server: prost's, except that a request
//! that cannot be decoded (invalid UTF-8 in a string field, say) is INVALID_ARGUMENT naming
//! the field, not INTERNAL with the decoder's internals.

use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

use crate::status::invalid_argument;

/// `tonic_prost::ProstCodec` with decode errors a caller can act on.
#[derive(Debug)]
pub struct ValidatingCodec<T, U> {
    _types: PhantomData<(T, U)>,
}

impl<T, U> Default for ValidatingCodec<T, U> {
    fn default() -> Self {
        ValidatingCodec {
            _types: PhantomData,
        }
    }
}

impl<T, U> Codec for ValidatingCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ValidatingDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        ValidatingDecoder { _type: PhantomData }
    }
}

#[derive(Debug)]
pub struct ValidatingDecoder<U> {
    _type: PhantomData<U>,
}

impl<U: Message + Default> Decoder for ValidatingDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode_message(buf).map(Some)
    }
}

/// Decodes a message as every server does: INVALID_ARGUMENT naming the field when it
/// cannot.
pub fn decode_message<U: Message + Default>(bytes: impl prost::bytes::Buf) -> Result<U, Status> {
    U::decode(bytes).map_err(|error| undecodable(&error.to_string()))
}

/// INVALID_ARGUMENT for a message prost could not decode, naming the field from prost's
/// description (`failed to decode Protobuf message: Outer.field: Inner.field: reason`).
fn undecodable(description: &str) -> Status {
    let detail = description
        .strip_prefix("failed to decode Protobuf message: ")
        .unwrap_or(description);
    let mut fields = Vec::new();
    let mut reason = Vec::new();
    for part in detail.split(": ") {
        match part.split_once('.') {
            Some((message, field))
                if reason.is_empty()
                    && !message.is_empty()
                    && message
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                fields.push(field)
            }
            _ => reason.push(part),
        }
    }
    let reason = match reason.join(": ") {
        reason if reason.contains("UTF-8") => "must be valid UTF-8".to_string(),
        reason => format!("cannot be decoded ({reason})"),
    };
    // prost lists the innermost field first.
    fields.reverse();
    if fields.is_empty() {
        return invalid_argument(
            "request",
            &format!("is not a valid protobuf message: {reason}"),
        );
    }
    invalid_argument(&fields.join("."), &reason)
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn invalid_utf8_names_its_field() {
        // SendMessageRequest { session_id: "x", content: <0xff> }
        let bytes = [0x0a, 0x01, b'x', 0x1a, 0x01, 0xff];
        let error = crate::pb::SendMessageRequest::decode(&bytes[..]).unwrap_err();
        let status = undecodable(&error.to_string());
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "content: must be valid UTF-8");

        // AppendContextRequest { messages: [Message { content: <0xff> }] }
        let bytes = [0x12, 0x03, 0x12, 0x01, 0xff];
        let error = crate::pb::AppendContextRequest::decode(&bytes[..]).unwrap_err();
        let status = undecodable(&error.to_string());
        assert_eq!(status.message(), "messages.content: must be valid UTF-8");

        let error = crate::pb::SendMessageRequest::decode(&[0x0a, 0x09][..]).unwrap_err();
        let status = undecodable(&error.to_string());
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(!status.message().is_empty());
    }
}
