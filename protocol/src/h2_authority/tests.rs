use super::*;

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

fn fields(list: &[(&str, &str)]) -> Fields {
    list.iter()
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect()
}

fn grpc_request(authority: &str) -> Fields {
    fields(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/ProxyService/Proxy"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("user-agent", "grpc-go/1.58.3"),
    ])
}

fn header(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    out.extend_from_slice(&(len as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// A frame stream from the client: preface, SETTINGS, then `blocks` as HEADERS frames
/// (encoded with a stateful encoder, as clients do), each followed by a DATA frame.
fn client_bytes(blocks: &[Fields]) -> Vec<u8> {
    let mut encoder = loona_hpack::Encoder::new();
    let mut out = PREFACE.to_vec();
    header(&mut out, 0, 0x4, 0, 0);
    for (i, block) in blocks.iter().enumerate() {
        let stream = 1 + 2 * i as u32;
        let encoded = encoder.encode(block.iter().map(|(n, v)| (&n[..], &v[..])));
        header(&mut out, encoded.len(), HEADERS, END_HEADERS, stream);
        out.extend_from_slice(&encoded);
        let data = format!("payload of stream {stream}");
        header(&mut out, data.len(), 0x0, END_STREAM, stream);
        out.extend_from_slice(data.as_bytes());
    }
    out
}

/// What the server side (h2) gets: the frames, with header blocks decoded by a decoder that
/// has seen nothing but the rewriter's output.
#[derive(Debug, Default)]
struct Parsed {
    blocks: Vec<(u32, u8, Fields)>,
    data: Vec<(u32, Vec<u8>)>,
}

fn parse_server_side(bytes: &[u8]) -> Parsed {
    assert_eq!(&bytes[..24], PREFACE);
    let mut rest = &bytes[24..];
    let mut decoder = loona_hpack::Decoder::new();
    let mut parsed = Parsed::default();
    let mut block = Vec::new();
    let mut block_flags = 0;
    while !rest.is_empty() {
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        let (kind, flags) = (rest[3], rest[4]);
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
        assert!(len <= MAX_OUT_FRAME || kind == 0, "frame of {len} bytes");
        let payload = &rest[9..9 + len];
        rest = &rest[9 + len..];
        match kind {
            HEADERS | CONTINUATION => {
                let skip = if kind == HEADERS && flags & PRIORITY != 0 {
                    5
                } else {
                    0
                };
                if kind == HEADERS {
                    block_flags = flags;
                }
                block.extend_from_slice(&payload[skip..]);
                if flags & END_HEADERS != 0 {
                    let decoded = decoder.decode(&block).expect("rewritten block decodes");
                    parsed.blocks.push((stream, block_flags, decoded));
                    block.clear();
                }
            }
            0x0 => parsed.data.push((stream, payload.to_vec())),
            _ => {}
        }
    }
    parsed
}

/// Feed `bytes` in pieces of `piece` bytes, as reads would deliver them.
fn rewrite(bytes: &[u8], piece: usize) -> (Result<Vec<u8>, Refusal>, Vec<BlockSeen>) {
    let mut rewriter = Rewriter::default();
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    let mut seen = Vec::new();
    for chunk in bytes.chunks(piece) {
        input.extend_from_slice(chunk);
        if let Err(refusal) = rewriter.feed(&mut input, &mut out, &mut |s| seen.push(s)) {
            return (Err(refusal), seen);
        }
    }
    assert!(input.is_empty(), "bytes left over: {input:?}");
    (Ok(out.to_vec()), seen)
}

#[test]
fn socket_path_authorities_become_local_and_everything_else_is_kept() {
    let blocks = vec![
        grpc_request("/etc/kubernetes/tether/konnectivity.sock"),
        grpc_request("%2Fetc%2Fkubernetes%2Ftether%2Fkonnectivity.sock"),
        grpc_request("localhost"),
        // The same path again: the client's encoder now sends it from its dynamic table.
        grpc_request("/etc/kubernetes/tether/konnectivity.sock"),
    ];
    let bytes = client_bytes(&blocks);
    for piece in [1, 7, 100, bytes.len()] {
        let (out, seen) = rewrite(&bytes, piece);
        let parsed = parse_server_side(&out.unwrap());
        assert_eq!(parsed.blocks.len(), 4);
        for (i, (stream, flags, decoded)) in parsed.blocks.iter().enumerate() {
            assert_eq!(*stream, 1 + 2 * i as u32);
            assert_eq!(*flags, END_HEADERS);
            let mut expected = blocks[i].clone();
            for (name, value) in &mut expected {
                if name.as_slice() == b":authority"
                    && http::uri::Authority::try_from(value.as_slice()).is_err()
                {
                    *value = LOCAL_AUTHORITY.to_vec();
                }
            }
            assert_eq!(decoded, &expected, "block {i} with reads of {piece}");
        }
        assert_eq!(parsed.data.len(), 4);
        assert_eq!(parsed.data[2], (5, b"payload of stream 5".to_vec()));
        assert_eq!(
            seen[0].rewritten_from.as_deref(),
            Some("/etc/kubernetes/tether/konnectivity.sock")
        );
        assert_eq!(seen[2].rewritten_from, None);
        assert!(seen.iter().all(|s| s.malformed.is_none()));
    }
}

#[test]
fn huffman_coded_blocks_decode() {
    // RFC 7541 C.4.1: GET http://www.example.com/ with Huffman-coded strings.
    let block: Vec<u8> = [
        0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90,
        0xf4, 0xff,
    ]
    .to_vec();
    let mut bytes = PREFACE.to_vec();
    header(
        &mut bytes,
        block.len(),
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
    );
    bytes.extend_from_slice(&block);
    let parsed = parse_server_side(&rewrite(&bytes, 5).0.unwrap());
    assert_eq!(
        parsed.blocks[0].2,
        fields(&[
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ])
    );
    assert_eq!(parsed.blocks[0].1, END_HEADERS | END_STREAM);
}

#[test]
fn padding_priority_and_continuation_are_handled() {
    let mut encoder = loona_hpack::Encoder::new();
    let request = grpc_request("/run/k.sock");
    let block = encoder.encode(request.iter().map(|(n, v)| (&n[..], &v[..])));
    let (a, b) = block.split_at(10);
    let mut bytes = PREFACE.to_vec();
    // HEADERS, padded (3 bytes) and with priority, carrying the first 10 bytes.
    header(
        &mut bytes,
        1 + 5 + a.len() + 3,
        HEADERS,
        PADDED | PRIORITY,
        3,
    );
    bytes.push(3);
    bytes.extend_from_slice(&[0x80, 0, 0, 1, 15]);
    bytes.extend_from_slice(a);
    bytes.extend_from_slice(&[0, 0, 0]);
    header(&mut bytes, b.len(), CONTINUATION, END_HEADERS, 3);
    bytes.extend_from_slice(b);
    let out = rewrite(&bytes, 3).0.unwrap();
    let parsed = parse_server_side(&out);
    let (stream, flags, decoded) = &parsed.blocks[0];
    assert_eq!((*stream, *flags), (3, PRIORITY | END_HEADERS));
    assert_eq!(decoded[3].1, LOCAL_AUTHORITY);
    // The priority fields travel unchanged.
    assert_eq!(&out[24 + 9..24 + 14], &[0x80, 0, 0, 1, 15]);
}

#[test]
fn large_blocks_are_split_into_valid_frames() {
    let mut request = grpc_request("/run/k.sock");
    request.push((b"x-big".to_vec(), vec![b'a'; 15_000]));
    let bytes = client_bytes(&[request.clone()]);
    let parsed = parse_server_side(&rewrite(&bytes, 4096).0.unwrap());
    assert_eq!(parsed.blocks[0].2[7], request[7]);
}

#[test]
fn oversized_header_block_is_refused_before_it_is_buffered() {
    let mut bytes = PREFACE.to_vec();
    header(&mut bytes, 1 << 20, HEADERS, END_HEADERS, 1);
    // Only the frame header arrives: the refusal must not wait for the megabyte.
    assert_eq!(rewrite(&bytes, 64).0, Err(Refusal::HeaderBlockTooLarge));

    // CONTINUATION frames adding up past the bound.
    let mut bytes = PREFACE.to_vec();
    header(&mut bytes, 0, HEADERS, 0, 1);
    for _ in 0..5 {
        header(&mut bytes, 4000, CONTINUATION, 0, 1);
        bytes.extend_from_slice(&[0u8; 4000]);
    }
    assert_eq!(rewrite(&bytes, 4096).0, Err(Refusal::HeaderBlockTooLarge));
}

#[test]
fn a_small_block_cannot_expand_past_the_list_bound() {
    // One 4000-byte field inserted into the dynamic table, then referenced 10 times by
    // one-byte indexes: 40 KB decoded from a 4 KB block.
    let mut block = vec![0x40, 0x01, b'x'];
    let _ = loona_hpack::encoder::encode_integer_into(4000, 7, 0, &mut block);
    block.extend_from_slice(&[b'v'; 4000]);
    block.extend_from_slice(&[0x80 | 62; 10]);
    let mut bytes = PREFACE.to_vec();
    header(&mut bytes, block.len(), HEADERS, END_HEADERS, 1);
    bytes.extend_from_slice(&block);
    assert_eq!(rewrite(&bytes, 1000).0, Err(Refusal::HeaderListTooLarge));
}

#[test]
fn interleaved_and_stray_header_frames_are_refused() {
    let mut bytes = PREFACE.to_vec();
    header(&mut bytes, 0, HEADERS, 0, 1);
    header(&mut bytes, 0, 0x0, 0, 1);
    assert_eq!(rewrite(&bytes, 100).0, Err(Refusal::BrokenHeaderBlock));

    let mut bytes = PREFACE.to_vec();
    header(&mut bytes, 0, CONTINUATION, END_HEADERS, 1);
    assert_eq!(rewrite(&bytes, 100).0, Err(Refusal::BrokenHeaderBlock));

    let mut bytes = PREFACE.to_vec();
    header(&mut bytes, 1, HEADERS, PADDED | END_HEADERS, 1);
    bytes.push(9);
    assert_eq!(rewrite(&bytes, 100).0, Err(Refusal::BadPadding));
}

#[test]
fn undecodable_hpack_is_refused_without_panicking() {
    for block in [
        vec![0xff],                   // truncated index
        vec![0x80 | 70],              // index past both tables
        vec![0x3f],                   // truncated table size update
        vec![0x3f, 0xe1, 0x7f],       // table size update above the announced 4096
        vec![0x00, 0x85, 0xff, 0xff], // Huffman string longer than its bytes
    ] {
        let mut bytes = PREFACE.to_vec();
        header(&mut bytes, block.len(), HEADERS, END_HEADERS, 1);
        bytes.extend_from_slice(&block);
        let (out, _) = rewrite(&bytes, 100);
        assert!(matches!(out, Err(Refusal::Hpack(_))), "{block:x?}: {out:?}");
    }
}

#[test]
fn requests_h2_will_refuse_are_named() {
    let mut upper = grpc_request("localhost");
    upper.push((b"X-Upper".to_vec(), b"1".to_vec()));
    let mut no_method = grpc_request("localhost");
    no_method.remove(0);
    let (_, seen) = rewrite(&client_bytes(&[upper, no_method]), 50);
    assert_eq!(seen[0].malformed, Some("upper-case header name"));
    assert_eq!(seen[1].malformed, Some("no :method"));
}

#[test]
fn non_http2_bytes_pass_untouched() {
    let bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    assert_eq!(rewrite(&bytes, 4).0.unwrap(), bytes);
}
