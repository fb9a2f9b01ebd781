//! In-memory tests of moving a pipe to its lane (`tunnel_io::pipe::lane`): a session and a
//! lane, each an HTTP/2 connection over `tokio::io::duplex`, the server's pipe deciding to
//! move ([`Lane::Open`]) and the edge's taking the lane stream it is handed
//! ([`Lane::Offered`]). Deterministic, no network. The ordering rules: every byte arrives
//! once and in order whichever directions are open when the stream moves, and whether or
//! not the pipe stops to continue elsewhere ([`Piped::Moving`]).

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_util::sync::CancellationToken;
use tunnel_io::h2tune::H2Tuning;
use tunnel_io::pipe::lane::{handoff, Lane, Moved, OpenLane, BULK_BYTES};
use tunnel_io::pipe::{pipe_resume, pipe_stream, PipeConfig, PipeEnd, PipeReport, Piped, Stream};

const CONFIG: PipeConfig = PipeConfig {
    write_timeout: Duration::from_secs(5),
    idle_timeout: None,
};

/// An h2 connection over a duplex pipe: the client's sender, and the server's connection.
async fn connection() -> (
    h2::client::SendRequest<Bytes>,
    h2::server::Connection<DuplexStream, Bytes>,
) {
    let (client_io, server_io) = tokio::io::duplex(1 << 20);
    let tuning = H2Tuning::default();
    let server = tokio::spawn(async move {
        tuning
            .server_builder()
            .handshake::<_, Bytes>(server_io)
            .await
            .unwrap()
    });
    let (sender, conn) = tuning
        .client_builder()
        .handshake::<_, Bytes>(client_io)
        .await
        .unwrap();
    tokio::spawn(conn);
    (sender, server.await.unwrap())
}

/// Pipe to the end, continuing in place when the pipe stops to move.
async fn run_pipe(socket: DuplexStream, stream: Stream) -> PipeReport {
    let cancel = CancellationToken::new();
    match pipe_stream(socket, stream, Bytes::new(), CONFIG, &(), &cancel).await {
        Piped::Ended(report, _) => report,
        Piped::Moving(resume) => pipe_resume(resume, CONFIG, &(), &cancel).await.0,
    }
}

/// One stream from the app's socket (server side) to the target's (edge side), with a lane
/// beside the session; `handover` makes both pipes stop and resume when they move.
async fn moved_tunnel(
    handover: bool,
) -> (
    DuplexStream,
    DuplexStream,
    tokio::task::JoinHandle<PipeReport>,
    tokio::task::JoinHandle<PipeReport>,
) {
    let (session, mut session_conn) = connection().await;
    let (lane, mut lane_conn) = connection().await;
    let (handoff, takers) = handoff();
    // The edge's lane: hands the one lane stream to the edge's pipe.
    tokio::spawn(async move {
        let (request, mut respond) = lane_conn.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while lane_conn.accept().await.is_some() {} });
        let send = respond.send_response(Response::new(()), false).unwrap();
        handoff.deliver(Moved {
            send: send.into(),
            recv: request.into_body().into(),
        });
    });
    let (target_end, target_socket) = tokio::io::duplex(256 << 10);
    let edge = tokio::spawn(async move {
        let (request, mut respond) = session_conn.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while session_conn.accept().await.is_some() {} });
        let send = respond.send_response(Response::new(()), false).unwrap();
        let stream = Stream {
            send: send.into(),
            recv: request.into_body().into(),
            lane: Some(Lane::Offered(takers)),
            handover,
        };
        run_pipe(target_socket, stream).await
    });
    let mut session = session.ready().await.unwrap();
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri("192.0.2.1:10250")
        .body(())
        .unwrap();
    let (response, send) = session.send_request(request, false).unwrap();
    let response = response.await.unwrap();
    let open: OpenLane = Box::new(move || {
        Box::pin(async move {
            let mut lane = lane.ready().await.ok()?;
            let request = Request::builder()
                .method(Method::POST)
                .uri("https://tether/tether.v1/lane")
                .body(())
                .ok()?;
            let (response, send) = lane.send_request(request, false).ok()?;
            let response = response.await.ok()?;
            (response.status() == StatusCode::OK).then(|| Moved {
                send: send.into(),
                recv: response.into_body().into(),
            })
        })
    });
    let (app_end, app_socket) = tokio::io::duplex(256 << 10);
    let stream = Stream {
        send: send.into(),
        recv: response.into_body().into(),
        lane: Some(Lane::Open(open)),
        handover,
    };
    let server = tokio::spawn(run_pipe(app_socket, stream));
    (app_end, target_end, server, edge)
}

/// Byte `i` of the pattern seeded `seed`.
fn pattern(seed: u8, i: u64) -> u8 {
    (i % 251) as u8 ^ seed
}

/// Write `len` pattern bytes, then half-close.
async fn write_pattern(mut w: impl tokio::io::AsyncWrite + Unpin, seed: u8, len: u64) {
    let mut sent = 0u64;
    while sent < len {
        let n = (len - sent).min(64 << 10);
        let chunk: Vec<u8> = (sent..sent + n).map(|i| pattern(seed, i)).collect();
        w.write_all(&chunk).await.unwrap();
        sent += n;
    }
    w.shutdown().await.unwrap();
}

/// Read to EOF; the count, panicking at the first byte out of place.
async fn read_pattern(mut r: impl tokio::io::AsyncRead + Unpin, seed: u8) -> u64 {
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0u64;
    loop {
        let n = r.read(&mut buf).await.unwrap();
        if n == 0 {
            return got;
        }
        for (k, b) in buf[..n].iter().enumerate() {
            let i = got + k as u64;
            assert_eq!(*b, pattern(seed, i), "byte {i} out of place");
        }
        got += n as u64;
    }
}

/// `up` bytes app → target and `down` target → app, the reply only after the upload when
/// `reply_after_eof`; both pipes must report a clean end and the move.
async fn exchange(handover: bool, up: u64, down: u64, reply_after_eof: bool) {
    let (app, target, server, edge) = moved_tunnel(handover).await;
    let (app_r, app_w) = tokio::io::split(app);
    let (target_r, target_w) = tokio::io::split(target);
    let run = async {
        let upload = async {
            write_pattern(app_w, 1, up).await;
        };
        let target_side = async {
            if reply_after_eof {
                let got = read_pattern(target_r, 1).await;
                write_pattern(target_w, 2, down).await;
                got
            } else {
                let (got, ()) =
                    tokio::join!(read_pattern(target_r, 1), write_pattern(target_w, 2, down));
                got
            }
        };
        let ((), got_up, got_down) = tokio::join!(upload, target_side, read_pattern(app_r, 2));
        (got_up, got_down)
    };
    let (got_up, got_down) = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the exchange to finish");
    assert_eq!((got_up, got_down), (up, down), "every byte, once");
    let (server, edge) = (server.await.unwrap(), edge.await.unwrap());
    assert_eq!(server.result, Ok(PipeEnd::Complete), "server: {server:?}");
    assert_eq!(edge.result, Ok(PipeEnd::Complete), "edge: {edge:?}");
    assert_eq!(
        (server.socket_to_stream, server.stream_to_socket),
        (up, down)
    );
    assert_eq!((edge.stream_to_socket, edge.socket_to_stream), (up, down));
    assert!(server.moved, "the server's pipe moved");
}

const BULK: u64 = 3 * BULK_BYTES;

#[tokio::test]
async fn both_directions_open_move_and_arrive_in_order() {
    exchange(false, BULK, BULK, false).await;
}

#[tokio::test]
async fn both_directions_open_move_and_arrive_in_order_when_the_pipe_stops_and_resumes() {
    exchange(true, BULK, BULK, false).await;
}

#[tokio::test]
async fn an_upload_ended_before_the_move_leaves_only_the_reply_to_move() {
    exchange(false, 1 << 10, BULK, true).await;
    exchange(true, 1 << 10, BULK, true).await;
}

#[tokio::test]
async fn an_upload_that_moved_then_the_reply_after_it() {
    exchange(true, BULK, BULK, true).await;
}
