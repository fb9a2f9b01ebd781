//! `Egress` against real sockets: a scripted proxy on 127.0.0.1:0 that answers CONNECT in
//! the ways real and hostile proxies do, and the curl-like resolution of the settings.

use std::collections::HashMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// Bound on every test's socket work.
const TEST_DEADLINE: Duration = Duration::from_secs(10);

/// A proxy that reads one request head, hands it to the test, then writes `answer` in
/// `pieces` writes (one byte each when `pieces` is the answer's length) and keeps the
/// connection open for `linger`.
async fn scripted_proxy(
    answer: Vec<u8>,
    pieces: usize,
    linger: Duration,
) -> (u16, tokio::sync::oneshot::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while !request.ends_with(b"\r\n\r\n") && request.len() < 4096 {
            if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                break;
            }
            request.push(byte[0]);
        }
        let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
        let size = answer.len().div_ceil(pieces.max(1)).max(1);
        for chunk in answer.chunks(size) {
            if socket.write_all(chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(linger).await;
    });
    (port, rx)
}

fn via(port: u16, url_tail: &str) -> Egress {
    Egress::resolve(
        Some(&format!("http://{url_tail}127.0.0.1:{port}")),
        None,
        |_| None,
    )
    .unwrap()
}

async fn dial(egress: &Egress, host: &str, port: u16) -> Result<TcpStream, DialError> {
    tokio::time::timeout(TEST_DEADLINE, egress.dial(host, port))
        .await
        .expect("dial finished")
}

#[tokio::test]
async fn bytes_sent_with_the_answer_reach_the_caller() {
    let answer = b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x03early".to_vec();
    let (port, request) = scripted_proxy(answer, 1, Duration::from_secs(2)).await;
    let egress = via(port, "alice:s3cret%21@");
    let mut tcp = dial(&egress, "lb.example", 9000).await.expect("tunnel");
    let request = request.await.unwrap();
    // base64("alice:s3cret!") = YWxpY2U6czNjcmV0IQ==
    assert_eq!(
        request,
        "CONNECT lb.example:9000 HTTP/1.1\r\nHost: lb.example:9000\r\n\
         Proxy-Authorization: Basic YWxpY2U6czNjcmV0IQ==\r\n\r\n"
    );
    let mut early = [0u8; 8];
    tcp.read_exact(&mut early).await.unwrap();
    assert_eq!(&early, b"\x16\x03\x03early");
}

#[tokio::test]
async fn an_answer_split_into_single_bytes_is_read_to_its_end_and_no_further() {
    let answer = b"HTTP/1.0 200 Connection established\r\nProxy-agent: x\r\n\r\nAB".to_vec();
    let pieces = answer.len();
    let (port, _request) = scripted_proxy(answer, pieces, Duration::from_secs(2)).await;
    let mut tcp = dial(&via(port, ""), "10.0.0.9", 443).await.expect("tunnel");
    let mut rest = [0u8; 2];
    tcp.read_exact(&mut rest).await.unwrap();
    assert_eq!(&rest, b"AB");
}

#[tokio::test]
async fn a_refusal_names_the_proxy_target_and_status_line_but_not_the_credentials() {
    let answer =
        b"HTTP/1.0 407 Proxy Authentication Required\r\nContent-Length: 3\r\n\r\nno!".to_vec();
    let (port, _request) = scripted_proxy(answer, 1, Duration::from_secs(2)).await;
    let error = dial(&via(port, "alice:hunter2@"), "lb.example", 9000)
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        format!(
            "proxy 127.0.0.1:{port} refused CONNECT to lb.example:9000: \
             407 Proxy Authentication Required"
        )
    );
    assert!(!format!("{error:?}").contains("hunter2"));
}

#[tokio::test]
async fn an_endless_head_from_a_hostile_proxy_stops_at_the_limit() {
    // One header line that never ends (a header count limit would stop a flood of short
    // lines first; this reaches the byte limit).
    let mut answer = b"HTTP/1.1 200 OK\r\nX-Pad: ".to_vec();
    answer.resize(2 * MAX_RESPONSE_HEAD_BYTES, b'a');
    let (port, _request) = scripted_proxy(answer, 8, Duration::from_secs(2)).await;
    let error = dial(&via(port, ""), "lb.example", 9000).await.unwrap_err();
    assert!(
        matches!(
            &error,
            DialError::BadAnswer {
                error: ResponseError::HeadTooLarge { .. },
                ..
            }
        ),
        "{error}"
    );
}

#[tokio::test]
async fn a_silent_proxy_times_out_and_a_closing_one_is_an_error() {
    let (port, _request) = scripted_proxy(Vec::new(), 1, Duration::from_secs(5)).await;
    let egress = via(port, "").with_timeout(Duration::from_millis(200));
    let error = dial(&egress, "lb.example", 9000).await.unwrap_err();
    assert!(matches!(error, DialError::Timeout { .. }), "{error}");

    let (port, _request) =
        scripted_proxy(b"HTTP/1.1 200".to_vec(), 1, Duration::from_millis(0)).await;
    let error = dial(&via(port, ""), "lb.example", 9000).await.unwrap_err();
    assert!(matches!(error, DialError::ProxyIo { .. }), "{error}");
}

#[tokio::test]
async fn an_unreachable_proxy_is_named() {
    // Bind and drop: nothing listens on the port any more.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let error = dial(&via(port, ""), "lb.example", 9000).await.unwrap_err();
    assert!(
        error.to_string().starts_with(&format!(
            "connect to proxy 127.0.0.1:{port} (for lb.example:9000)"
        )),
        "{error}"
    );
}

fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| map.get(name).cloned()
}

fn proxied(egress: &Egress, host: &str) -> Option<String> {
    egress.proxy_for(host).map(ToString::to_string)
}

#[test]
fn environment_is_read_in_curls_order() {
    let e = Egress::resolve(
        None,
        None,
        env(&[
            ("HTTPS_PROXY", "http://upper:1"),
            ("https_proxy", "http://lower:1"),
            ("ALL_PROXY", "http://all:1"),
            ("http_proxy", "http://plain:1"),
        ]),
    )
    .unwrap();
    assert_eq!(proxied(&e, "lb").as_deref(), Some("lower:1"));
    let e = Egress::resolve(None, None, env(&[("ALL_PROXY", "http://all:1")])).unwrap();
    assert_eq!(proxied(&e, "lb").as_deref(), Some("all:1"));
    // http_proxy is for plain HTTP, which the edge never speaks; empty values are unset.
    let e = Egress::resolve(
        None,
        None,
        env(&[("http_proxy", "http://plain:1"), ("https_proxy", " ")]),
    )
    .unwrap();
    assert_eq!(proxied(&e, "lb"), None);
    assert_eq!(e.to_string(), "direct");
}

#[test]
fn configured_proxy_wins_and_an_empty_one_ignores_the_environment() {
    let vars = env(&[("HTTPS_PROXY", "http://envproxy:1")]);
    let e = Egress::resolve(Some("http://u:p@conf:3128"), None, &vars).unwrap();
    assert_eq!(proxied(&e, "lb").as_deref(), Some("conf:3128"));
    assert_eq!(
        e.to_string(),
        "http://conf:3128 (from server.proxy, basic auth)"
    );
    let e = Egress::resolve(Some(""), None, &vars).unwrap();
    assert_eq!(proxied(&e, "lb"), None);
}

#[test]
fn no_proxy_applies_to_either_source_and_the_configured_list_wins() {
    let vars = env(&[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", "lb.internal")]);
    let e = Egress::resolve(None, None, &vars).unwrap();
    assert_eq!(proxied(&e, "lb.internal"), None);
    assert_eq!(proxied(&e, "lb.example").as_deref(), Some("p:1"));
    assert_eq!(e.to_string(), "http://p:1 (from HTTPS_PROXY, no_proxy set)");
    let e = Egress::resolve(Some("http://q:2"), None, &vars).unwrap();
    assert_eq!(proxied(&e, "lb.internal"), None);
    let e = Egress::resolve(None, Some("10.0.0.0/8"), &vars).unwrap();
    assert_eq!(proxied(&e, "lb.internal").as_deref(), Some("p:1"));
    assert_eq!(proxied(&e, "10.1.2.3"), None);
    let e = Egress::resolve(None, None, env(&[("no_proxy", "a"), ("NO_PROXY", "b")])).unwrap();
    assert!(e.no_proxy.matches("a") && !e.no_proxy.matches("b"));
}

#[test]
fn unusable_settings_name_their_source_without_credentials() {
    let e =
        Egress::resolve(None, None, env(&[("HTTPS_PROXY", "https://u:hunter2@p:1")])).unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("HTTPS_PROXY: https:// proxies"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let e = Egress::resolve(None, None, env(&[("ALL_PROXY", "socks5://p:1080")])).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("ALL_PROXY: proxy scheme `socks5://`"),
        "{e}"
    );
    let e = Egress::resolve(Some("http://p:1"), Some("10.0.0.0/99"), |_| None).unwrap_err();
    assert!(e.to_string().starts_with("server.no_proxy: "), "{e}");
}
