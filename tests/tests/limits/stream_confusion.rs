//! Stream confusion on an edge session (TESTPLAN 20), with HTTP/2 written by hand: a node
//! sends DATA on a stream that already ended, or on a stream ID the server never opened.
//! The server rejects it (RST_STREAM, or GOAWAY for the session), no byte reaches any
//! client, and other nodes' tunnels carry on. (The Konnectivity side, a connectID the
//! stream does not own, is `testplan_10_malformed_packets_close_only_their_stream` in konnectivity.rs.)

use std::net::IpAddr;
use std::time::Duration;

use tether_tests::raw_edge::{RawEdge, END_HEADERS, END_STREAM, HEADERS, PING};
use tether_tests::{poll_until, within, Cluster, ClusterOptions, ServerOptions, NODE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Frame type DATA.
const DATA: u8 = 0x0;
/// Frame type RST_STREAM.
const RST_STREAM: u8 = 0x3;
/// Frame type GOAWAY.
const GOAWAY: u8 = 0x7;
/// What the confused frames carry; no client may ever read it.
const HIJACK: &[u8] = b"HIJACK";
/// How long the server has to reject a confused frame.
const REJECT_WITHIN: Duration = Duration::from_secs(5);

/// A raw edge for `node` with `ip` whose session the server has confirmed and routed.
async fn routed_raw_edge(cluster: &Cluster, node: &str, ip: IpAddr) -> RawEdge {
    let mut edge = RawEdge::connect(&cluster.pki, cluster.server.addrs.edge, node, &[ip])
        .await
        .expect("raw edge connects");
    let info = edge.next_request().await.expect("session-info request");
    edge.answer_ok(info).await.expect("confirm the session");
    poll_until(
        "the raw edge's session",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || std::future::ready(cluster.server.has_edge_session(node).then_some(())),
    )
    .await;
    edge
}

/// A client's CONNECT to `ip` (on a port the server's policy allows), answered once the
/// raw edge accepts the stream, that sends `hello` and ends its side. Yields once the
/// tunnel is up, then everything the client reads until the tunnel ends.
fn client(
    cluster: &Cluster,
    ip: IpAddr,
    hello: &'static [u8],
) -> (oneshot::Receiver<()>, JoinHandle<Vec<u8>>) {
    let proxy = cluster.server.addrs.connect_tcp;
    let tls = cluster.pki.frontend_client_tls();
    let target = format!("{ip}:{}", cluster.kubelet.addr.port());
    let (up, is_up) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut tunnel = tunnel_server::client::connect_tls(proxy, tls, &target)
            .await
            .expect("CONNECT");
        let _ = up.send(());
        tunnel.write_all(hello).await.expect("write");
        // A clean half-close (TLS close_notify, then FIN): the server ends its side of the
        // stream with END_STREAM, not a reset, so the stream can end cleanly both ways.
        tunnel.shutdown().await.expect("shut down the write side");
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut got)).await;
        got
    });
    (is_up, task)
}

/// Accept the next CONNECT stream with `200` (stream left open) and send it `bytes`.
async fn accept_stream(edge: &mut RawEdge, bytes: &[u8]) -> u32 {
    let stream = edge.next_request().await.expect("a CONNECT stream");
    edge.write_frame(HEADERS, END_HEADERS, stream, &[0x88])
        .await
        .expect("answer 200");
    edge.write_frame(DATA, 0, stream, bytes)
        .await
        .expect("data");
    stream
}

/// Read frames (answering PINGs) until the server resets `stream` or sends GOAWAY; which
/// one, or `None` if the connection just ended.
async fn rejection(edge: &mut RawEdge, stream: u32) -> Option<u8> {
    loop {
        let (kind, flags, id, payload) = edge.read_frame().await.ok()?;
        match kind {
            RST_STREAM if id == stream => return Some(RST_STREAM),
            GOAWAY => return Some(GOAWAY),
            PING if flags & 0x1 == 0 => {
                let _ = edge.write_frame(PING, 0x1, 0, &payload).await;
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn testplan_20_stream_confusion_data_on_closed_or_never_opened_streams_is_rejected() {
    let mut cluster = Cluster::start(ClusterOptions {
        server: ServerOptions {
            // The raw edges answer PINGs only while the test reads their frames.
            ping_interval: Duration::from_secs(10),
            ..ServerOptions::default()
        },
        ..ClusterOptions::default()
    })
    .await;

    // DATA after the stream ended, on a session that keeps another stream open.
    let ip_a: IpAddr = "192.0.2.31".parse().expect("ip");
    let mut edge = routed_raw_edge(&cluster, "confused-a", ip_a).await;
    let (_, first) = client(&cluster, ip_a, b"first");
    let first_stream = accept_stream(&mut edge, b"to first").await;
    let (second_up, second) = client(&cluster, ip_a, b"second");
    accept_stream(&mut edge, b"to second").await;
    within("the second tunnel", Duration::from_secs(10), second_up)
        .await
        .expect("the second client connected");
    edge.write_frame(DATA, END_STREAM, first_stream, b"")
        .await
        .expect("end the first stream");
    let first = within("the first client", Duration::from_secs(15), first)
        .await
        .expect("first client");
    assert_eq!(first, b"to first", "the first client got exactly its bytes");
    // Both sides have ended the stream (the client's half-close became END_STREAM).
    tokio::time::sleep(Duration::from_millis(200)).await;
    edge.write_frame(DATA, 0, first_stream, HIJACK)
        .await
        .expect("data on the ended stream");
    let answer = within(
        "the rejection",
        REJECT_WITHIN,
        rejection(&mut edge, first_stream),
    )
    .await;
    assert!(
        answer.is_some(),
        "DATA on an ended stream was neither reset nor refused"
    );
    drop(edge);
    let second = within("the second client", Duration::from_secs(15), second)
        .await
        .expect("second client");
    assert!(
        second.starts_with(b"to second") && !second.windows(HIJACK.len()).any(|w| w == HIJACK),
        "the second stream got {second:?}"
    );

    // DATA on a stream ID the server never opened.
    let ip_b: IpAddr = "192.0.2.32".parse().expect("ip");
    let mut edge = routed_raw_edge(&cluster, "confused-b", ip_b).await;
    let (open_up, open) = client(&cluster, ip_b, b"open");
    let open_stream = accept_stream(&mut edge, b"to open").await;
    within("the open tunnel", Duration::from_secs(10), open_up)
        .await
        .expect("the open client connected");
    let never_opened = open_stream + 100;
    edge.write_frame(DATA, 0, never_opened, HIJACK)
        .await
        .expect("data on a never-opened stream");
    let answer = within(
        "the rejection",
        REJECT_WITHIN,
        rejection(&mut edge, never_opened),
    )
    .await;
    assert!(
        answer.is_some(),
        "DATA on a never-opened stream was accepted"
    );
    drop(edge);
    let open = within("the open client", Duration::from_secs(15), open)
        .await
        .expect("open client");
    assert!(
        !open.windows(HIJACK.len()).any(|w| w == HIJACK),
        "a client got the confused bytes: {open:?}"
    );

    // The real node's tunnels were never touched.
    cluster.checked_exchange(20, 256 << 10).await;
    assert!(cluster.server.has_edge_session(NODE));
}
