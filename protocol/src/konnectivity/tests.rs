use super::*;
use proptest::prelude::*;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The test vectors of shared/DESIGN.md, "Konnectivity compatibility".
fn vectors() -> Vec<(Packet, &'static str)> {
    vec![
        (
            Packet::DialRequest(DialRequest {
                protocol: "tcp".into(),
                address: "10.0.0.1:10250".into(),
                random: 42,
            }),
            "12170a03746370120e31302e302e302e313a3130323530182a",
        ),
        (
            Packet::DialResponse(DialResponse {
                random: 42,
                result: Ok(1),
            }),
            "08011a041001182a",
        ),
        (
            Packet::Data {
                connect_id: 1,
                data: Bytes::from_static(b"hi"),
                error: None,
            },
            "0804220608011a026869",
        ),
        (Packet::CloseRequest { connect_id: 1 }, "08022a020801"),
        (
            Packet::CloseResponse {
                connect_id: 1,
                error: None,
            },
            "080332021001",
        ),
        (Packet::CloseDial { random: 42 }, "08053a02082a"),
    ]
}

#[test]
fn design_test_vectors_encode_exactly() {
    for (packet, expected) in vectors() {
        assert_eq!(hex(&packet.to_bytes()), expected, "{packet:?}");
        assert_eq!(packet.encoded_len(), expected.len() / 2);
        let mut buf = Vec::new();
        packet.encode(&mut buf);
        assert_eq!(hex(&buf), expected);
    }
}

#[test]
fn design_test_vectors_decode() {
    for (packet, encoded) in vectors() {
        assert_eq!(Packet::decode(&unhex(encoded)[..]).unwrap(), packet);
    }
}

#[test]
fn dial_response_error_round_trips_with_connect_id_zero() {
    let p = Packet::DialResponse(DialResponse {
        random: 7,
        result: Err("no edge connected for 10.0.0.9:10250".into()),
    });
    assert_eq!(Packet::decode(p.to_bytes()).unwrap(), p);
}

#[test]
fn testplan_10_malformed_frames_successful_dial_response_needs_a_connect_id() {
    // DIAL_RSP{random 42}, no error, connectID 0.
    let err = Packet::decode(&unhex("08011a02182a")[..]).unwrap_err();
    assert_eq!(err, DecodeError::ZeroConnectId);
}

#[test]
fn drain_with_and_without_payload() {
    assert_eq!(
        Packet::decode(Packet::Drain.to_bytes()).unwrap(),
        Packet::Drain
    );
    assert_eq!(Packet::decode(&unhex("0806")[..]).unwrap(), Packet::Drain);
}

#[test]
fn type_payload_mismatch_is_refused() {
    // type DATA with a CloseRequest payload.
    let err = Packet::decode(&unhex("08042a020801")[..]).unwrap_err();
    assert_eq!(err, DecodeError::MissingPayload("DATA"));
    // An empty message is DIAL_REQ (type 0) without payload.
    let err = Packet::decode(&[][..]).unwrap_err();
    assert_eq!(err, DecodeError::MissingPayload("DIAL_REQ"));
}

#[test]
fn testplan_10_malformed_frames_unknown_type_is_refused() {
    let err = Packet::decode(&unhex("0863")[..]).unwrap_err();
    assert_eq!(err, DecodeError::UnknownType(99));
}

#[test]
fn testplan_10_malformed_frames_garbage_is_a_protobuf_error() {
    // Field 2, length-delimited, claims 100 bytes, has 1.
    let err = Packet::decode(&unhex("126401")[..]).unwrap_err();
    assert!(matches!(err, DecodeError::Protobuf(_)), "{err:?}");
}

#[test]
fn testplan_10_malformed_frames_very_long_packet_is_refused_before_decoding() {
    let err = Packet::decode(&vec![0u8; MAX_PACKET + 1][..]).unwrap_err();
    assert_eq!(err, DecodeError::TooLarge(MAX_PACKET + 1));
}

#[test]
fn data_payload_limit_is_exact() {
    let at_limit = Packet::Data {
        connect_id: 3,
        data: Bytes::from(vec![7u8; MAX_DATA]),
        error: None,
    };
    assert_eq!(Packet::decode(at_limit.to_bytes()).unwrap(), at_limit);
    let over = Packet::Data {
        connect_id: 3,
        data: Bytes::from(vec![7u8; MAX_DATA + 1]),
        error: None,
    };
    let err = Packet::decode(over.to_bytes()).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::FieldTooLong {
                field: "Data.data",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn very_long_address_is_refused() {
    let p = Packet::DialRequest(DialRequest {
        protocol: "tcp".into(),
        address: "a".repeat(MAX_ADDRESS_LEN + 1),
        random: 1,
    });
    let err = Packet::decode(p.to_bytes()).unwrap_err();
    assert!(matches!(err, DecodeError::FieldTooLong { .. }), "{err:?}");
}

#[test]
fn type_names() {
    let names: Vec<_> = vectors().iter().map(|(p, _)| p.type_name()).collect();
    assert_eq!(
        names,
        [
            "DIAL_REQ",
            "DIAL_RSP",
            "DATA",
            "CLOSE_REQ",
            "CLOSE_RSP",
            "DIAL_CLS"
        ]
    );
    assert_eq!(Packet::Drain.type_name(), "DRAIN");
}

fn any_packet() -> impl Strategy<Value = Packet> {
    let text = "[ -~]{0,40}";
    let opt_text = proptest::option::of("[ -~]{1,40}");
    prop_oneof![
        (text, text, any::<i64>()).prop_map(|(protocol, address, random)| {
            Packet::DialRequest(DialRequest {
                protocol,
                address,
                random,
            })
        }),
        (
            any::<i64>(),
            prop_oneof![
                any::<i64>()
                    .prop_filter("non-zero", |id| *id != 0)
                    .prop_map(Ok),
                "[ -~]{1,40}".prop_map(Err),
            ]
        )
            .prop_map(|(random, result)| Packet::DialResponse(DialResponse { random, result })),
        any::<i64>().prop_map(|connect_id| Packet::CloseRequest { connect_id }),
        (any::<i64>(), opt_text.clone())
            .prop_map(|(connect_id, error)| Packet::CloseResponse { connect_id, error }),
        (
            any::<i64>(),
            proptest::collection::vec(any::<u8>(), 0..256),
            opt_text
        )
            .prop_map(|(connect_id, data, error)| Packet::Data {
                connect_id,
                data: data.into(),
                error,
            }),
        any::<i64>().prop_map(|random| Packet::CloseDial { random }),
        Just(Packet::Drain),
    ]
}

proptest! {
    #[test]
    fn every_packet_round_trips(packet in any_packet()) {
        prop_assert_eq!(Packet::decode(packet.to_bytes()).unwrap(), packet);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Packet::decode(&bytes[..]);
    }
}
