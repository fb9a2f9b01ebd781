//! Tests for the CONNECT head parser and response heads, including the attacks:
//! oversized heads, header floods, smuggled bodies and header injection.

use super::*;
use crate::target::Host;
use proptest::prelude::*;

const APISERVER_HEAD: &[u8] =
    b"CONNECT 10.0.0.7:10250 HTTP/1.1\r\nHost: 10.0.0.7:10250\r\nUser-Agent: kube-apiserver/v1.30\r\n\r\n";

fn parse(buf: &[u8]) -> Result<Option<ConnectRequest>, ConnectError> {
    parse_connect_head(buf, &HeadLimits::default())
}

fn complete(buf: &[u8]) -> ConnectRequest {
    match parse(buf) {
        Ok(Some(req)) => req,
        other => panic!("expected a complete head, got {other:?}"),
    }
}

fn rejected(buf: &[u8]) -> ConnectError {
    match parse(buf) {
        Err(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn parses_apiserver_request() {
    let req = complete(APISERVER_HEAD);
    assert_eq!(req.authority, "10.0.0.7:10250");
    assert_eq!(req.target, Target::parse("10.0.0.7:10250").unwrap());
    assert_eq!(req.user_agent.as_deref(), Some("kube-apiserver/v1.30"));
    assert_eq!(req.head_len, APISERVER_HEAD.len());
}

#[test]
fn parses_node_name_and_ipv6_targets() {
    let req = complete(b"CONNECT node-a:10250 HTTP/1.1\r\n\r\n");
    assert!(matches!(req.target.host, Host::Name(_)));
    assert_eq!(req.user_agent, None);
    let req = complete(b"CONNECT [fd00::7]:10250 HTTP/1.1\r\nHost: [fd00::7]:10250\r\n\r\n");
    assert_eq!(req.target.to_string(), "[fd00::7]:10250");
}

#[test]
fn accepts_http_1_0() {
    assert_eq!(complete(b"CONNECT a:1 HTTP/1.0\r\n\r\n").target.port, 1);
}

#[test]
fn early_tunnel_bytes_after_head_are_preserved() {
    let client_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
    let mut buf = APISERVER_HEAD.to_vec();
    buf.extend_from_slice(client_hello);
    let req = complete(&buf);
    assert_eq!(&buf[req.head_len..], client_hello);
}

#[test]
fn testplan_10_slow_drip_incomplete_head_asks_for_more_at_every_split() {
    for cut in 0..APISERVER_HEAD.len() {
        assert_eq!(parse(&APISERVER_HEAD[..cut]), Ok(None), "cut at {cut}");
    }
}

#[test]
fn target_comes_from_request_line_not_host_header() {
    let req = complete(b"CONNECT node-a:10250 HTTP/1.1\r\nHost: 169.254.169.254:80\r\n\r\n");
    assert_eq!(req.target.to_string(), "node-a:10250");
}

#[test]
fn testplan_10_growing_head_is_none_below_limit_then_head_too_large() {
    let limits = HeadLimits {
        max_head_bytes: 1024,
        max_headers: 64,
    };
    let mut buf = b"CONNECT a:1 HTTP/1.1\r\nX-Pad: ".to_vec();
    while buf.len() < limits.max_head_bytes {
        assert_eq!(
            parse_connect_head(&buf, &limits),
            Ok(None),
            "len {}",
            buf.len()
        );
        buf.push(b'a');
    }
    assert_eq!(
        parse_connect_head(&buf, &limits),
        Err(ConnectError::HeadTooLarge { limit: 1024 })
    );
    // Growing further (a flood) keeps failing the same way, cheaply.
    buf.resize(1 << 20, b'a');
    let err = parse_connect_head(&buf, &limits).unwrap_err();
    assert_eq!(err, ConnectError::HeadTooLarge { limit: 1024 });
    assert_eq!(err.status(), 431);
}

#[test]
fn complete_head_longer_than_limit_is_head_too_large() {
    let mut buf = b"CONNECT a:1 HTTP/1.1\r\nX-Pad: ".to_vec();
    buf.resize(DEFAULT_MAX_HEAD_BYTES + 10, b'a');
    buf.extend_from_slice(b"\r\n\r\n");
    assert_eq!(
        rejected(&buf),
        ConnectError::HeadTooLarge {
            limit: DEFAULT_MAX_HEAD_BYTES
        }
    );
}

#[test]
fn head_of_exactly_the_limit_is_accepted() {
    let mut buf = b"CONNECT a:1 HTTP/1.1\r\nX-Pad: ".to_vec();
    buf.resize(DEFAULT_MAX_HEAD_BYTES - 4, b'a');
    buf.extend_from_slice(b"\r\n\r\n");
    assert_eq!(buf.len(), DEFAULT_MAX_HEAD_BYTES);
    buf.extend_from_slice(b"early");
    let req = complete(&buf);
    assert_eq!(req.head_len, DEFAULT_MAX_HEAD_BYTES);
    assert_eq!(&buf[req.head_len..], b"early");
}

#[test]
fn header_flood_is_too_many_headers() {
    let mut buf = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
    for i in 0..=DEFAULT_MAX_HEADERS {
        buf.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    buf.extend_from_slice(b"\r\n");
    let err = rejected(&buf);
    assert_eq!(err, ConnectError::TooManyHeaders { limit: 64 });
    assert_eq!(err.status(), 431);

    // Exactly the limit is fine.
    let mut buf = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
    for i in 0..DEFAULT_MAX_HEADERS {
        buf.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
    }
    buf.extend_from_slice(b"\r\n");
    complete(&buf);
}

#[test]
fn lowercase_connect_is_not_connect() {
    let err = rejected(b"connect a:1 HTTP/1.1\r\n\r\n");
    assert_eq!(err, ConnectError::MethodNotAllowed("connect".into()));
    assert_eq!(err.status(), 405);
}

#[test]
fn other_methods_are_refused_before_the_head_completes() {
    assert_eq!(
        rejected(b"GET / "),
        ConnectError::MethodNotAllowed("GET".into())
    );
    assert_eq!(
        rejected(b"POST /api HTTP/1.1\r\nHost: x\r\n\r\n").status(),
        405
    );
    let long = format!("{} a:1 HTTP/1.1\r\n\r\n", "X".repeat(5000));
    match rejected(long.as_bytes()) {
        ConnectError::MethodNotAllowed(m) => assert_eq!(m.len(), MAX_METHOD_SHOWN),
        e => panic!("{e:?}"),
    }
}

#[test]
fn absolute_form_target_is_bad_request() {
    let err = rejected(b"CONNECT http://x/ HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(err, ConnectError::BadTarget(TargetError::NotAuthority));
    assert_eq!(err.status(), 400);
}

#[test]
fn bad_targets_are_bad_request_as_soon_as_seen() {
    assert!(matches!(
        rejected(b"CONNECT 010.0.0.1:10250 "),
        ConnectError::BadTarget(TargetError::NonCanonicalIpv4(_))
    ));
    assert!(matches!(
        rejected(b"CONNECT * HTTP/1.1\r\n\r\n"),
        ConnectError::BadTarget(TargetError::MissingPort(_))
    ));
    assert!(matches!(
        rejected(b"CONNECT user@node-a:1 HTTP/1.1\r\n\r\n"),
        ConnectError::BadTarget(TargetError::Userinfo)
    ));
    let long = format!("CONNECT {}:1 HTTP/1.1\r\n\r\n", "a".repeat(400));
    assert!(matches!(
        rejected(long.as_bytes()),
        ConnectError::BadTarget(TargetError::TooLong { .. })
    ));
}

#[test]
fn smuggled_bodies_are_refused() {
    for head in [
        &b"CONNECT a:1 HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"[..],
        b"CONNECT a:1 HTTP/1.1\r\nContent-Length: 0\r\ncontent-length: 5\r\n\r\n",
        b"CONNECT a:1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        assert!(matches!(rejected(head), ConnectError::Malformed(_)));
    }
    complete(b"CONNECT a:1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
}

#[test]
fn malformed_heads() {
    for head in [
        &b"CONNECT a:1 HTTP/2.0\r\n\r\n"[..],
        b"CONNECT a:1 HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"CONNECT a:1 HTTP/1.1\r\n folded: x\r\n\r\n",
        b"CONNECT a:1 HTTP/1.1\rX\n\r\n",
        b"\x16\x03\x01\x00\x05hello",
        b"CONNECT  a:1 HTTP/1.1\r\n\r\n",
    ] {
        let err = rejected(head);
        assert!(
            matches!(err, ConnectError::Malformed(_)),
            "{head:?}: {err:?}"
        );
        assert_eq!(err.status(), 400);
    }
}

#[test]
fn user_agent_is_sanitized() {
    let req = complete(b"CONNECT a:1 HTTP/1.1\r\nUser-Agent: curl/8\xff\xfe\tx\r\n\r\n");
    assert_eq!(req.user_agent.as_deref(), Some("curl/8?? x"));
    // Control characters never get that far: httparse refuses them.
    assert!(matches!(
        rejected(b"CONNECT a:1 HTTP/1.1\r\nUser-Agent: a\x01\r\n\r\n"),
        ConnectError::Malformed(_)
    ));
}

#[test]
fn error_labels_and_messages() {
    assert_eq!(
        ConnectError::HeadTooLarge { limit: 1 }.label(),
        "head_too_large"
    );
    assert_eq!(
        ConnectError::BadTarget(TargetError::NonCanonicalIpv4("010.0.0.1".into())).to_string(),
        "bad CONNECT target: non-canonical IPv4 address `010.0.0.1`"
    );
}

/// Parses a response head we built, returning status and headers.
fn parse_response(bytes: &[u8]) -> (u16, Vec<(String, String)>, usize) {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(bytes).expect("well-formed response") {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => panic!("incomplete response"),
    };
    let headers = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_owned(),
                String::from_utf8(h.value.to_vec()).unwrap(),
            )
        })
        .collect();
    (resp.code.unwrap(), headers, len)
}

#[test]
fn response_head_exact_bytes() {
    assert_eq!(
        response_head(403, "target 10.0.0.1:22 denied by policy"),
        b"HTTP/1.1 403 target 10.0.0.1:22 denied by policy\r\nContent-Type: text/plain\r\n\
          Content-Length: 36\r\nConnection: close\r\n\r\ntarget 10.0.0.1:22 denied by policy\n"
    );
    assert_eq!(
        response_head(405, "only CONNECT"),
        b"HTTP/1.1 405 only CONNECT\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\
          Allow: CONNECT\r\nConnection: close\r\n\r\nonly CONNECT\n"
    );
}

/// kube-apiserver shows `kubectl` users only the status line of a failed CONNECT.
#[test]
fn reason_line_is_the_status_lines_reason_phrase() {
    let bytes = response_head(502, "no edge connected for 10.8.0.21:10250");
    assert!(bytes.starts_with(b"HTTP/1.1 502 no edge connected for 10.8.0.21:10250\r\n"));
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    assert!(resp.parse(&bytes).unwrap().is_complete());
    assert_eq!(resp.reason, Some("no edge connected for 10.8.0.21:10250"));
}

#[test]
fn empty_reason_line_falls_back_to_the_standard_phrase() {
    for blank in ["", "   ", "\r\n"] {
        let bytes = response_head(504, blank);
        assert!(
            bytes.starts_with(b"HTTP/1.1 504 Gateway Timeout\r\n"),
            "{blank:?}: {:?}",
            String::from_utf8_lossy(&bytes)
        );
    }
}

#[test]
fn reason_phrase_is_bounded_and_printable() {
    let bytes = response_head(502, &format!("n\u{f6}de\0 {}", "x".repeat(10_000)));
    let line_end = bytes.windows(2).position(|w| w == b"\r\n").unwrap();
    let phrase = &bytes["HTTP/1.1 502 ".len()..line_end];
    assert_eq!(phrase.len(), crate::stream::MAX_REASON_LEN);
    assert!(phrase.starts_with(b"n?de? x"));
    assert!(phrase.iter().all(|b| (b' '..=b'~').contains(b)));
}

#[test]
fn response_head_content_length_matches_body() {
    for status in [400, 403, 405, 431, 502, 503, 504, 599] {
        let bytes = response_head(status, "some reason");
        let (code, headers, len) = parse_response(&bytes);
        assert_eq!(code, status);
        let cl: usize = headers
            .iter()
            .find(|(n, _)| n == "Content-Length")
            .unwrap()
            .1
            .parse()
            .unwrap();
        assert_eq!(bytes.len() - len, cl);
    }
}

#[test]
fn reason_line_cannot_inject_headers() {
    let evil =
        "nope\r\nSet-Cookie: session=stolen\r\n\r\nHTTP/1.1 200 Connection established\r\n\r\n";
    let bytes = response_head(502, evil);
    let (code, headers, len) = parse_response(&bytes);
    assert_eq!(code, 502);
    let names: Vec<_> = headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["Content-Type", "Content-Length", "Connection"]);
    let body = &bytes[len..];
    assert_eq!(body.iter().filter(|&&b| b == b'\n').count(), 1);
    assert!(!body.contains(&b'\r'));
    // The status line carries the same text, flattened onto one line.
    let status_line = &bytes[..bytes.windows(2).position(|w| w == b"\r\n").unwrap()];
    assert!(status_line.starts_with(b"HTTP/1.1 502 nope  Set-Cookie"));
}

#[test]
fn response_head_never_signals_success() {
    for status in [0, 101, 200, 204, 302, 600, 65535] {
        assert!(response_head(status, "x").starts_with(b"HTTP/1.1 500 x\r\n"));
        assert!(response_head(status, "").starts_with(b"HTTP/1.1 500 Internal Server Error\r\n"));
    }
    assert!(response_head(418, "").starts_with(b"HTTP/1.1 418 \r\n"));
}

#[test]
fn established_is_a_complete_200_head() {
    let (code, headers, len) = parse_response(ESTABLISHED);
    assert_eq!(code, 200);
    assert!(headers.is_empty());
    assert_eq!(len, ESTABLISHED.len());
}

proptest! {
    #[test]
    fn never_panics_on_arbitrary_bytes(buf in proptest::collection::vec(any::<u8>(), 0..512),
                                       max_head_bytes in 0usize..600, max_headers in 0usize..8) {
        let limits = HeadLimits { max_head_bytes, max_headers };
        if let Ok(Some(req)) = parse_connect_head(&buf, &limits) {
            prop_assert!(req.head_len <= buf.len());
            prop_assert!(req.head_len <= max_head_bytes);
        }
    }

    #[test]
    fn never_panics_on_connect_like_heads(
        lines in proptest::collection::vec("[A-Za-z0-9:./\\[\\] -]{0,30}", 0..6),
    ) {
        let mut buf = b"CONNECT ".to_vec();
        for line in &lines {
            buf.extend_from_slice(line.as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        let _ = parse(&buf);
    }

    #[test]
    fn split_delivery_gives_the_same_answer(cut in 0usize..APISERVER_HEAD.len(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        prop_assert_eq!(parse(&APISERVER_HEAD[..cut]), Ok(None));
        let mut buf = APISERVER_HEAD.to_vec();
        buf.extend_from_slice(&tail);
        let req = complete(&buf);
        prop_assert_eq!(&buf[req.head_len..], &tail[..]);
    }
}
