//! A codec that keeps protobuf messages as their encoded bytes, for forwarding.

use bytes::{Buf, BufMut, Bytes};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// A message kept as its encoded bytes.
#[derive(Debug, Clone, Default)]
pub struct RawMessage(pub Bytes);

#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = RawMessage;
    type Decode = RawMessage;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = RawMessage;
    type Error = Status;

    fn encode(&mut self, item: RawMessage, destination: &mut EncodeBuf<'_>) -> Result<(), Status> {
        destination.put(item.0);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = RawMessage;
    type Error = Status;

    fn decode(&mut self, source: &mut DecodeBuf<'_>) -> Result<Option<RawMessage>, Status> {
        let length = source.remaining();
        Ok(Some(RawMessage(source.copy_to_bytes(length))))
    }
}
