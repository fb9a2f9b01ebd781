//! The Konnectivity protocol's `Packet` (kube-apiserver's `GRPC` egress and stock
//! proxy-agents): validated types, and their protobuf encoding. The generated prost code stays
//! private in [`pb`]; everything a peer sends is size-checked and its `type` matched against
//! its payload before it becomes a [`Packet`]. No gRPC framing here: that is the I/O crates'.

use bytes::{Buf, BufMut, Bytes};
use prost::Message;

// Generated code (tests/konnectivity_codegen.rs keeps it in step with the .proto).
#[allow(missing_docs, clippy::all)]
#[rustfmt::skip]
mod pb;

#[cfg(test)]
mod tests;

/// Largest `Data.data` payload accepted, in bytes: 4 MiB, the gRPC default message limit that
/// kube-apiserver's konnectivity-client is built with.
pub const MAX_DATA: usize = 4 << 20;
/// Largest encoded packet accepted, in bytes: a full DATA payload plus room for its framing
/// fields (connect ID, error text).
pub const MAX_PACKET: usize = MAX_DATA + (8 << 10);
/// Longest `DialRequest.address` accepted, in bytes (`host:port`; DNS names are ≤ 253).
pub const MAX_ADDRESS_LEN: usize = 512;
/// Longest error text or protocol name accepted from a peer, in bytes.
pub const MAX_TEXT_LEN: usize = 4096;

/// One Konnectivity packet. The wire `type` is implied by the variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// `DIAL_REQ`: open a connection to `address`.
    DialRequest(DialRequest),
    /// `DIAL_RSP`: the answer to a dial.
    DialResponse(DialResponse),
    /// `CLOSE_REQ`: the sender closes the connection.
    CloseRequest {
        /// The connection.
        connect_id: i64,
    },
    /// `CLOSE_RSP`: the connection is closed (answer to `CLOSE_REQ`, or unasked when the
    /// target closed first).
    CloseResponse {
        /// The connection.
        connect_id: i64,
        /// Why it closed, when it failed.
        error: Option<String>,
    },
    /// `DATA`: bytes of one connection.
    Data {
        /// The connection.
        connect_id: i64,
        /// The bytes, at most [`MAX_DATA`].
        data: Bytes,
        /// An error the sender attached (rarely used).
        error: Option<String>,
    },
    /// `DIAL_CLS`: cancel the pending dial with this dial ID.
    CloseDial {
        /// The dial ID of the `DIAL_REQ`.
        random: i64,
    },
    /// `DRAIN`: the sender is going away; send new dials elsewhere.
    Drain,
}

/// `DIAL_REQ` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialRequest {
    /// Transport, `"tcp"` in practice.
    pub protocol: String,
    /// `host:port` as the caller wrote it; parse it with [`crate::Target::parse`].
    pub address: String,
    /// Dial ID chosen by the caller, echoed in the answer.
    pub random: i64,
}

/// `DIAL_RSP` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialResponse {
    /// The dial ID of the `DIAL_REQ`.
    pub random: i64,
    /// The new connection's ID (never 0), or the error text (never empty).
    pub result: Result<i64, String>,
}

/// Why bytes are not a valid [`Packet`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Longer than [`MAX_PACKET`]; refused before decoding.
    #[error("packet of {0} bytes exceeds the {MAX_PACKET}-byte limit")]
    TooLarge(usize),
    /// Not a protobuf `Packet`.
    #[error("malformed packet: {0}")]
    Protobuf(String),
    /// A `type` this implementation does not know.
    #[error("unknown packet type {0}")]
    UnknownType(i32),
    /// The payload for `type` is missing or is another type's.
    #[error("{0} packet without its payload")]
    MissingPayload(&'static str),
    /// A field longer than its limit.
    #[error("{field} is {len} bytes, limit {max}")]
    FieldTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A successful `DIAL_RSP` with connect ID 0 (0 means "no connection").
    #[error("DIAL_RSP without error and with connectID 0")]
    ZeroConnectId,
}

impl Packet {
    /// The wire name of the packet's type (`DIAL_REQ`, ...), for logs and errors.
    pub fn type_name(&self) -> &'static str {
        self.kind().as_str_name()
    }

    fn kind(&self) -> pb::PacketType {
        match self {
            Packet::DialRequest(_) => pb::PacketType::DialReq,
            Packet::DialResponse(_) => pb::PacketType::DialRsp,
            Packet::CloseRequest { .. } => pb::PacketType::CloseReq,
            Packet::CloseResponse { .. } => pb::PacketType::CloseRsp,
            Packet::Data { .. } => pb::PacketType::Data,
            Packet::CloseDial { .. } => pb::PacketType::DialCls,
            Packet::Drain => pb::PacketType::Drain,
        }
    }

    /// Append the protobuf encoding to `buf`.
    pub fn encode(&self, buf: &mut impl BufMut) {
        // Encoding into a BufMut that grows cannot fail; a fixed one too small is a caller bug.
        self.to_pb()
            .encode(buf)
            .expect("buffer too small for a Konnectivity packet");
    }

    /// The protobuf encoding.
    pub fn to_bytes(&self) -> Bytes {
        self.to_pb().encode_to_vec().into()
    }

    /// Length of the protobuf encoding.
    pub fn encoded_len(&self) -> usize {
        self.to_pb().encoded_len()
    }

    /// Decode and validate one packet (the whole of `buf`).
    pub fn decode(mut buf: impl Buf) -> Result<Packet, DecodeError> {
        let len = buf.remaining();
        if len > MAX_PACKET {
            return Err(DecodeError::TooLarge(len));
        }
        let raw = pb::Packet::decode(&mut buf).map_err(|e| DecodeError::Protobuf(e.to_string()))?;
        Packet::try_from(raw)
    }

    fn to_pb(&self) -> pb::Packet {
        use pb::packet::Payload;
        let payload = match self.clone() {
            Packet::DialRequest(d) => Payload::DialRequest(pb::DialRequest {
                protocol: d.protocol,
                address: d.address,
                random: d.random,
            }),
            Packet::DialResponse(d) => {
                let (connect_id, error) = match d.result {
                    Ok(id) => (id, String::new()),
                    Err(e) => (0, e),
                };
                Payload::DialResponse(pb::DialResponse {
                    error,
                    connect_id,
                    random: d.random,
                })
            }
            Packet::CloseRequest { connect_id } => {
                Payload::CloseRequest(pb::CloseRequest { connect_id })
            }
            Packet::CloseResponse { connect_id, error } => {
                Payload::CloseResponse(pb::CloseResponse {
                    error: error.unwrap_or_default(),
                    connect_id,
                })
            }
            Packet::Data {
                connect_id,
                data,
                error,
            } => Payload::Data(pb::Data {
                connect_id,
                error: error.unwrap_or_default(),
                data,
            }),
            Packet::CloseDial { random } => Payload::CloseDial(pb::CloseDial { random }),
            Packet::Drain => Payload::Drain(pb::Drain {}),
        };
        pb::Packet {
            r#type: self.kind() as i32,
            payload: Some(payload),
        }
    }
}

impl TryFrom<pb::Packet> for Packet {
    type Error = DecodeError;

    fn try_from(raw: pb::Packet) -> Result<Packet, DecodeError> {
        use pb::packet::Payload;
        use pb::PacketType as T;
        let kind = T::try_from(raw.r#type).map_err(|_| DecodeError::UnknownType(raw.r#type))?;
        let missing = || DecodeError::MissingPayload(kind.as_str_name());
        Ok(match (kind, raw.payload) {
            (T::DialReq, Some(Payload::DialRequest(d))) => {
                check_len("DialRequest.address", &d.address, MAX_ADDRESS_LEN)?;
                check_len("DialRequest.protocol", &d.protocol, MAX_TEXT_LEN)?;
                Packet::DialRequest(DialRequest {
                    protocol: d.protocol,
                    address: d.address,
                    random: d.random,
                })
            }
            (T::DialRsp, Some(Payload::DialResponse(d))) => {
                let result = if !d.error.is_empty() {
                    check_len("DialResponse.error", &d.error, MAX_TEXT_LEN)?;
                    Err(d.error)
                } else if d.connect_id == 0 {
                    return Err(DecodeError::ZeroConnectId);
                } else {
                    Ok(d.connect_id)
                };
                Packet::DialResponse(DialResponse {
                    random: d.random,
                    result,
                })
            }
            (T::CloseReq, Some(Payload::CloseRequest(c))) => Packet::CloseRequest {
                connect_id: c.connect_id,
            },
            (T::CloseRsp, Some(Payload::CloseResponse(c))) => Packet::CloseResponse {
                connect_id: c.connect_id,
                error: optional_text("CloseResponse.error", c.error)?,
            },
            (T::Data, Some(Payload::Data(d))) => {
                if d.data.len() > MAX_DATA {
                    return Err(DecodeError::FieldTooLong {
                        field: "Data.data",
                        len: d.data.len(),
                        max: MAX_DATA,
                    });
                }
                Packet::Data {
                    connect_id: d.connect_id,
                    data: d.data,
                    error: optional_text("Data.error", d.error)?,
                }
            }
            (T::DialCls, Some(Payload::CloseDial(c))) => Packet::CloseDial { random: c.random },
            // DRAIN carries nothing; accept it with or without its empty payload.
            (T::Drain, None | Some(Payload::Drain(_))) => Packet::Drain,
            _ => return Err(missing()),
        })
    }
}

fn check_len(field: &'static str, text: &str, max: usize) -> Result<(), DecodeError> {
    if text.len() > max {
        return Err(DecodeError::FieldTooLong {
            field,
            len: text.len(),
            max,
        });
    }
    Ok(())
}

fn optional_text(field: &'static str, text: String) -> Result<Option<String>, DecodeError> {
    check_len(field, &text, MAX_TEXT_LEN)?;
    Ok((!text.is_empty()).then_some(text))
}
