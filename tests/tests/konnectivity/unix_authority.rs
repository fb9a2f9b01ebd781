//! The Konnectivity Unix socket takes whatever `:authority` a local gRPC client sends:
//! kube-apiserver's grpc-go client sends the socket path, grpcio its %-escaped form, and some
//! clients none. Requests are written frame by frame (`raw_h2`), since no HTTP/2 library
//! sends such authorities; the mTLS TCP listener must still refuse them.

use protocol::konnectivity::{DialRequest, Packet};
use tokio::net::UnixStream;

use super::raw_h2::{Event, RawH2};
use super::setup::Rig;

/// RST_STREAM / GOAWAY code PROTOCOL_ERROR.
const PROTOCOL_ERROR: u32 = 1;

fn request(authority: Option<&str>) -> Vec<(&str, &str)> {
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/ProxyService/Proxy"),
    ];
    if let Some(authority) = authority {
        fields.push((":authority", authority));
    }
    fields.extend([
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("user-agent", "grpc-go/1.58.3"),
    ]);
    fields
}

/// Dial the echo target on stream 1 with `authority`, echo a line, close: what
/// kube-apiserver does for every connection it tunnels.
async fn echo_with_authority<S>(
    rig: &Rig,
    h2: &mut RawH2<S>,
    authority: Option<&str>,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    h2.headers(1, &request(authority)).await?;
    h2.send(
        1,
        &Packet::DialRequest(DialRequest {
            protocol: "tcp".into(),
            address: rig.target(rig.echo.port()),
            random: 77,
        }),
    )
    .await?;
    let connect_id = match h2.packet(1).await? {
        Packet::DialResponse(answer) => {
            anyhow::ensure!(answer.random == 77, "answer to another dial: {answer:?}");
            answer
                .result
                .map_err(|e| anyhow::anyhow!("dial failed: {e}"))?
        }
        other => anyhow::bail!("expected DIAL_RSP, got {other:?}"),
    };
    let line = bytes::Bytes::from_static(b"through the unix socket\n");
    h2.send(
        1,
        &Packet::Data {
            connect_id,
            data: line.clone(),
            error: None,
        },
    )
    .await?;
    match h2.packet(1).await? {
        Packet::Data { data, .. } => anyhow::ensure!(data == line, "echo {data:?}"),
        other => anyhow::bail!("expected the echo, got {other:?}"),
    }
    h2.send(1, &Packet::CloseRequest { connect_id }).await?;
    match h2.packet(1).await? {
        Packet::CloseResponse {
            connect_id: id,
            error: None,
        } if id == connect_id => Ok(()),
        other => anyhow::bail!("expected CLOSE_RSP, got {other:?}"),
    }
}

async fn over_unix(rig: &Rig) -> RawH2<UnixStream> {
    RawH2::start(UnixStream::connect(rig.unix_socket()).await.unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn unix_socket_accepts_the_socket_path_as_authority() {
    let rig = Rig::start().await;
    let path = rig.unix_socket().canonicalize().unwrap();
    let path = path.to_str().unwrap();
    assert!(path.starts_with('/'));
    let mut h2 = over_unix(&rig).await;
    echo_with_authority(&rig, &mut h2, Some(path))
        .await
        .expect("socket path as :authority");
    let metrics = rig.server.shared.metrics.render();
    assert!(
        metrics.contains("tether_konnectivity_authority_rewrites_total 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn unix_socket_accepts_the_percent_escaped_path_as_authority() {
    let rig = Rig::start().await;
    let escaped = rig
        .unix_socket()
        .canonicalize()
        .unwrap()
        .to_str()
        .unwrap()
        .replace('/', "%2F");
    let mut h2 = over_unix(&rig).await;
    echo_with_authority(&rig, &mut h2, Some(&escaped))
        .await
        .expect("%-escaped path as :authority");
}

#[tokio::test]
async fn unix_socket_accepts_a_request_without_authority() {
    let rig = Rig::start().await;
    let mut h2 = over_unix(&rig).await;
    echo_with_authority(&rig, &mut h2, None)
        .await
        .expect("no :authority");
}

#[tokio::test]
async fn tcp_listener_still_refuses_a_socket_path_authority() {
    let rig = Rig::start().await;
    let tls = rig.tls_stream(rig.frontend_tls()).await.unwrap();
    let mut h2 = RawH2::start(tls).await.unwrap();
    h2.headers(
        1,
        &request(Some("/etc/kubernetes/tether/konnectivity.sock")),
    )
    .await
    .unwrap();
    let refused = loop {
        match h2.next().await.unwrap() {
            Event::Reset(1, code) => break code,
            Event::Headers(..) | Event::Packet(..) => {
                panic!("the TCP listener took a malformed authority")
            }
            Event::GoAway(code) => break code,
            Event::Closed => panic!("closed without RST_STREAM"),
            _ => {}
        }
    };
    assert_eq!(refused, PROTOCOL_ERROR);
}

#[tokio::test]
async fn oversized_header_block_on_the_unix_socket_is_refused_logged_and_counted() {
    let rig = Rig::start().await;
    let mut h2 = over_unix(&rig).await;
    // A HEADERS frame announcing 1 MiB of header block: refused before it is buffered.
    let mut head = vec![0x10, 0x00, 0x00, 0x1, 0x4];
    head.extend_from_slice(&1u32.to_be_bytes());
    use tokio::io::AsyncWriteExt;
    let mut socket = UnixStream::connect(rig.unix_socket()).await.unwrap();
    socket
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    socket.write_all(&head).await.unwrap();
    let mut rest = Vec::new();
    use tokio::io::AsyncReadExt;
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        socket.read_to_end(&mut rest),
    )
    .await;
    assert!(closed.is_ok(), "connection not closed");
    let metrics = rig.server.shared.metrics.render();
    assert!(
        metrics.contains(r#"tether_frontend_refusals_total{frontend="konnectivity",reason="header_block_too_large"} 1"#),
        "{metrics}"
    );
    // Other connections are unaffected.
    echo_with_authority(&rig, &mut h2, Some("localhost"))
        .await
        .unwrap();
}
