//! In-memory tests of the h2 pipe: two HTTP/2 endpoints over `tokio::io::duplex`, each end
//! piping one stream to a duplex "socket". Deterministic, no network.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;
use tunnel_io::h2tune::H2Tuning;
use tunnel_io::pipe::{pipe, pipe_metered, ByteMeter, PipeConfig, PipeEnd, PipeReport};

const CONFIG: PipeConfig = PipeConfig {
    write_timeout: Duration::from_secs(2),
    idle_timeout: None,
};

/// Bytes a pipe reported while it ran.
#[derive(Default)]
struct Counted {
    up: AtomicU64,
    down: AtomicU64,
}

impl ByteMeter for Counted {
    fn socket_to_stream(&self, n: u64) {
        self.up.fetch_add(n, Ordering::Relaxed);
    }
    fn stream_to_socket(&self, n: u64) {
        self.down.fetch_add(n, Ordering::Relaxed);
    }
}

type Tunnel = (
    DuplexStream,
    DuplexStream,
    tokio::task::JoinHandle<PipeReport>,
    tokio::task::JoinHandle<PipeReport>,
);

/// Returns (app end, target end, the two pipe tasks: client side then server side).
async fn tunnel(target_buffer: usize) -> Tunnel {
    tunnel_metered(target_buffer, Arc::default()).await
}

/// [`tunnel`] whose client-side pipe (the app's) counts into `meter`.
async fn tunnel_metered(target_buffer: usize, meter: Arc<Counted>) -> Tunnel {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let tuning = H2Tuning {
        stream_window: 256 << 10,
        connection_window: 1 << 20,
        ..H2Tuning::default()
    };
    let server = tokio::spawn(async move {
        let mut conn = tuning
            .server_builder()
            .handshake::<_, Bytes>(server_io)
            .await
            .unwrap();
        let (request, mut respond) = conn.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let send = respond.send_response(Response::new(()), false).unwrap();
        (request.into_body(), send)
    });
    let (sender, conn) = tuning
        .client_builder()
        .handshake::<_, Bytes>(client_io)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut sender = sender.ready().await.unwrap();
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri("192.0.2.1:10250")
        .body(())
        .unwrap();
    let (response, client_send) = sender.send_request(request, false).unwrap();
    let (server_recv, server_send) = server.await.unwrap();
    let client_recv = response.await.unwrap().into_body();

    let (app, app_socket) = tokio::io::duplex(64 << 10);
    let (target, target_socket) = tokio::io::duplex(target_buffer);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let client_pipe = tokio::spawn(async move {
        pipe_metered(
            app_socket,
            client_send,
            client_recv,
            Bytes::new(),
            CONFIG,
            &*meter,
            &c,
        )
        .await
    });
    let server_pipe = tokio::spawn(async move {
        pipe(
            target_socket,
            server_send,
            server_recv,
            Bytes::new(),
            CONFIG,
            &cancel,
        )
        .await
    });
    (app, target, client_pipe, server_pipe)
}

#[tokio::test]
async fn testplan_05_half_close_passes_exactly_n_bytes_then_eof_and_the_reply_returns() {
    let (mut app, mut target, client_pipe, server_pipe) = tunnel(64 << 10).await;
    let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    app.write_all(&sent).await.unwrap();
    app.shutdown().await.unwrap();

    let mut got = Vec::new();
    target.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, sent, "target must see exactly the bytes, then EOF");
    target.write_all(b"reply after half-close").await.unwrap();
    target.shutdown().await.unwrap();

    let mut reply = Vec::new();
    app.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"reply after half-close");

    let c = client_pipe.await.unwrap();
    let s = server_pipe.await.unwrap();
    assert_eq!(c.result, Ok(PipeEnd::Complete));
    assert_eq!(s.result, Ok(PipeEnd::Complete));
    assert_eq!(c.socket_to_stream, sent.len() as u64);
    assert_eq!(s.stream_to_socket, sent.len() as u64);
    assert_eq!(c.stream_to_socket, 22);
}

#[tokio::test(start_paused = true)]
async fn stalled_reader_is_reset_after_the_write_timeout_and_the_far_end_sees_an_error() {
    // The target never reads: its socket buffer fills, then the h2 window, then the app.
    let (mut app, _target, client_pipe, server_pipe) = tunnel(16 << 10).await;
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 64 << 10];
        for _ in 0..64 {
            if app.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let s = tokio::time::timeout(Duration::from_secs(30), server_pipe)
        .await
        .expect("server side must give up")
        .unwrap();
    assert!(
        matches!(s.result, Err(tunnel_io::pipe::PipeError::WriteTimeout(_))),
        "{:?}",
        s.result
    );
    // Bounded by the stream window plus the duplex buffers, far below what the app offered.
    assert!(s.stream_to_socket <= 16 << 10, "{}", s.stream_to_socket);
    let c = tokio::time::timeout(Duration::from_secs(30), client_pipe)
        .await
        .expect("client side must see the reset")
        .unwrap();
    assert!(c.result.is_err(), "a reset must not look like a clean end");
    assert!(c.socket_to_stream < 64 * (64 << 10));
    writer.abort();
}

#[tokio::test]
async fn early_bytes_are_sent_first() {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        let mut conn = h2::server::handshake(server_io).await.unwrap();
        let (request, mut respond) = conn.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let _send = respond.send_response(Response::new(()), true).unwrap();
        let mut body = request.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            got.extend_from_slice(&chunk);
        }
        got
    });
    let (sender, conn) = h2::client::handshake(client_io).await.unwrap();
    tokio::spawn(conn);
    let mut sender = sender.ready().await.unwrap();
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri("192.0.2.1:10250")
        .body(())
        .unwrap();
    let (response, send) = sender.send_request(request, false).unwrap();
    let recv = response.await.unwrap().into_body();
    let (mut app, socket) = tokio::io::duplex(1024);
    app.write_all(b" and the rest").await.unwrap();
    app.shutdown().await.unwrap();
    let report = pipe(
        socket,
        send,
        recv,
        Bytes::from_static(b"early"),
        CONFIG,
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(report.result, Ok(PipeEnd::Complete));
    assert_eq!(server.await.unwrap(), b"early and the rest");
}

#[tokio::test(start_paused = true)]
async fn idle_stream_is_closed_after_the_idle_timeout_and_traffic_resets_the_timer() {
    // TESTPLAN 9, in memory: the server side pipe has a 10 s idle timeout.
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        let mut conn = h2::server::handshake(server_io).await.unwrap();
        let (request, mut respond) = conn.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let send = respond.send_response(Response::new(()), false).unwrap();
        (request.into_body(), send)
    });
    let (sender, conn) = h2::client::handshake(client_io).await.unwrap();
    tokio::spawn(conn);
    let mut sender = sender.ready().await.unwrap();
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri("192.0.2.1:10250")
        .body(())
        .unwrap();
    let (response, _client_send) = sender.send_request(request, false).unwrap();
    let (recv, send) = server.await.unwrap();
    let mut client_recv = response.await.unwrap().into_body();
    let (mut target, socket) = tokio::io::duplex(1024);
    let config = PipeConfig {
        write_timeout: Duration::from_secs(60),
        idle_timeout: Some(Duration::from_secs(10)),
    };
    let started = tokio::time::Instant::now();
    let pipe_task = tokio::spawn(async move {
        pipe(
            socket,
            send,
            recv,
            Bytes::new(),
            config,
            &CancellationToken::new(),
        )
        .await
    });
    // Traffic every 6 s keeps it open past 10 s.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(6)).await;
        target.write_all(b"tick").await.unwrap();
        let chunk = client_recv.data().await.unwrap().unwrap();
        client_recv
            .flow_control()
            .release_capacity(chunk.len())
            .unwrap();
        assert!(!pipe_task.is_finished());
    }
    let report = pipe_task.await.unwrap();
    assert_eq!(
        report.result,
        Err(tunnel_io::pipe::PipeError::Idle(Duration::from_secs(10)))
    );
    let lived = started.elapsed();
    assert!(
        lived >= Duration::from_secs(28) && lived < Duration::from_secs(30),
        "{lived:?}"
    );
    // The far end sees a reset, not a clean end of stream.
    assert!(client_recv
        .data()
        .await
        .map(|r| r.is_err())
        .unwrap_or(false));
}

#[tokio::test]
async fn bytes_are_metered_while_the_stream_is_still_open() {
    let meter = Arc::new(Counted::default());
    let (mut app, mut target, client_pipe, _server_pipe) =
        tunnel_metered(64 << 10, meter.clone()).await;
    app.write_all(&[1u8; 3000]).await.unwrap();
    let mut got = vec![0u8; 3000];
    target.read_exact(&mut got).await.unwrap();
    target.write_all(&[2u8; 5000]).await.unwrap();
    let mut got = vec![0u8; 5000];
    app.read_exact(&mut got).await.unwrap();
    // The app's pipe counted both directions, and the stream is still open.
    tokio::time::timeout(Duration::from_secs(2), async {
        while meter.up.load(Ordering::Relaxed) < 3000 || meter.down.load(Ordering::Relaxed) < 5000 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the meter shows the bytes before the stream ends");
    assert_eq!(meter.up.load(Ordering::Relaxed), 3000);
    assert_eq!(meter.down.load(Ordering::Relaxed), 5000);
    assert!(!client_pipe.is_finished());
    drop((app, target));
    let report = client_pipe.await.unwrap();
    assert_eq!(report.socket_to_stream, 3000);
    assert_eq!(report.stream_to_socket, 5000);
}

/// `kubectl logs -f` ending: the client has sent all it will (EOF), the target keeps
/// sending, the client closes its socket. A normal end, and the target's stream is reset.
#[tokio::test]
async fn client_leaving_a_follow_stream_after_eof_is_a_normal_end() {
    let (mut app, mut target, client_pipe, server_pipe) = tunnel(64 << 10).await;
    app.write_all(b"GET /logs?follow=true").await.unwrap();
    app.shutdown().await.unwrap();
    let mut request = Vec::new();
    target.read_to_end(&mut request).await.unwrap();
    assert_eq!(request, b"GET /logs?follow=true");
    target.write_all(b"line 1\n").await.unwrap();
    let mut line = [0u8; 7];
    app.read_exact(&mut line).await.unwrap();
    drop(app);
    let follow = tokio::spawn(async move {
        // The follow stream keeps writing until the tunnel gives up on it.
        for _ in 0..1000 {
            if target.write_all(b"line n\n").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        false
    });
    let c = tokio::time::timeout(Duration::from_secs(10), client_pipe)
        .await
        .expect("the client side ends")
        .unwrap();
    assert_eq!(c.result, Ok(PipeEnd::SocketLeft));
    let s = tokio::time::timeout(Duration::from_secs(10), server_pipe)
        .await
        .expect("the target side ends")
        .unwrap();
    assert!(s.result.is_err(), "the target's side sees the reset: {s:?}");
    assert!(follow.await.unwrap(), "the target's socket is closed");
}
