//! Socket isolation (TESTPLAN 20, the kubelet's side): every tunneled connection gets its
//! own socket at the target, which closes with its stream and never carries another
//! client's bytes; and the tunnel is L4, so the client's TLS with the kubelet is verified
//! end to end against the kubelet's own CA, which no tunnel process holds.

use std::time::Duration;

use tether_tests::{within, Cluster, ClusterOptions, NODE_IP};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sequential clients, each of which must get a socket of its own.
const CLIENTS: usize = 5;
/// Writes into a stream whose client left, 500 ms apart, until one fails.
const LATE_WRITES: usize = 10;

/// The next connection the edge makes to the target.
async fn next_socket(target: &TcpListener) -> TcpStream {
    within("the edge's dial", Duration::from_secs(5), target.accept())
        .await
        .expect("the edge connects to the target")
        .0
}

/// Read until EOF or an error, at most `limit`: what arrived, and whether it ended.
async fn drain(socket: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buf)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn testplan_20_kubelet_side_socket_closes_with_its_stream_and_is_never_reused() {
    let target = TcpListener::bind("127.0.0.1:0").await.expect("target");
    let port = target.local_addr().expect("addr").port();
    let cluster = Cluster::start(ClusterOptions {
        allow_both: vec![port],
        ..ClusterOptions::default()
    })
    .await;
    let mut peers = Vec::new();
    let mut closed_sockets = Vec::new();
    for i in 0..CLIENTS {
        let mut tunnel = cluster
            .connect(&format!("{NODE_IP}:{port}"))
            .await
            .expect("CONNECT");
        let mut socket = next_socket(&target).await;
        let peer = socket.peer_addr().expect("peer");
        assert!(!peers.contains(&peer), "socket {peer} was handed out twice");
        peers.push(peer);
        let message = format!("client {i}");
        tunnel.write_all(message.as_bytes()).await.expect("write");
        let mut got = vec![0u8; message.len()];
        within(
            "the bytes",
            Duration::from_secs(5),
            socket.read_exact(&mut got),
        )
        .await
        .expect("read");
        assert_eq!(got, message.as_bytes());
        socket.write_all(b"reply").await.expect("reply");
        let mut reply = [0u8; 5];
        within(
            "the reply",
            Duration::from_secs(5),
            tunnel.read_exact(&mut reply),
        )
        .await
        .expect("read the reply");

        // The client goes away without a word. Its socket at the target sees EOF, and once
        // the target writes into the dead stream the edge closes the socket: it is not kept
        // for anyone else.
        drop(tunnel);
        let (rest, eof) = drain(&mut socket, Duration::from_secs(5)).await;
        assert!(
            eof && rest.is_empty(),
            "client {i}: {rest:?} then eof={eof}"
        );
        // The target's read side has ended; whether the edge still holds the socket shows
        // on writes: once the edge has closed it, a write draws an RST and the next one
        // fails. (The server learns that the client is gone on its own second write at the
        // latest, and resets the stream.)
        let mut closed = false;
        for _ in 0..LATE_WRITES {
            if socket
                .write_all(b"late bytes for a gone client")
                .await
                .is_err()
            {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            closed,
            "client {i}: the edge kept its socket after the stream ended"
        );
        closed_sockets.push(socket);
    }
    // No earlier socket ever saw a later client's bytes (each was drained to its end above,
    // and reads after the end return nothing).
    for (i, socket) in closed_sockets.iter_mut().enumerate() {
        let (rest, _) = drain(socket, Duration::from_millis(100)).await;
        assert!(
            rest.is_empty(),
            "socket {i} got {rest:?} after its stream ended"
        );
    }

    // apiserver↔kubelet TLS is never terminated: the client verifies the kubelet's own
    // certificate, issued by a CA that no tunnel process is given, through the tunnel.
    let tunnel = cluster
        .connect(&cluster.target(cluster.kubelet.addr.port()))
        .await
        .expect("CONNECT to the kubelet");
    let (status, body) = tunnel_server::client::https_get(
        tunnel,
        cluster.pki.kubelet_client_tls(),
        &NODE_IP.to_string(),
        "/healthz",
    )
    .await
    .expect("TLS to the kubelet, verified end to end");
    assert_eq!((status, body.as_str()), (200, "ok"));
}
