//! The gRPC codec of the Konnectivity services: message bytes ⇄ the validated
//! [`Packet`](protocol::konnectivity::Packet). Tonic has already checked the message length
//! against the decoding limit before this runs; anything invalid becomes a gRPC error that
//! ends only the stream it arrived on.

use protocol::konnectivity::Packet;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// Encodes and decodes [`Packet`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct PacketCodec;

impl Codec for PacketCodec {
    type Encode = Packet;
    type Decode = Packet;
    type Encoder = PacketCodec;
    type Decoder = PacketCodec;

    fn encoder(&mut self) -> Self::Encoder {
        PacketCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        PacketCodec
    }
}

impl Encoder for PacketCodec {
    type Item = Packet;
    type Error = Status;

    fn encode(&mut self, item: Packet, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.encoded_len());
        item.encode(dst);
        Ok(())
    }
}

impl Decoder for PacketCodec {
    type Item = Packet;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Packet>, Status> {
        Packet::decode(src)
            .map(Some)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }
}
