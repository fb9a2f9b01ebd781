//! Stock agents under load and during a drain (issue 10): a stock agent has no per-connection
//! flow control, so the server pauses the agent's whole stream while one connection's buffer
//! is full instead of dropping bytes, resets a connection only once its reader took nothing
//! for `write_timeout`, and keeps an agent's gRPC connection (no GOAWAY) while a drain waits
//! for its connections.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::konnectivity::Packet;
use protocol::NodeName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::agent_tests::{agent_target, attach, metric_line, start_firehose, AGENT_NODE};
use super::client::STEP;
use super::setup::{Rig, RigOptions};
use super::{ping, seeded, within};

/// The 64 MiB the HTTPS download moved.
const BULK: usize = 64 << 20;
/// A drain's grace period in these tests: long, so exiting early is visible.
const GRACE: Duration = Duration::from_secs(30);

fn options(extra_ports: Vec<u16>, write_timeout: Option<Duration>) -> RigOptions {
    RigOptions {
        connect_socket: true,
        agents: true,
        extra_ports,
        write_timeout,
        transport: None,
    }
}

/// A target that writes `payload` to every connection as fast as it is read, then closes.
async fn start_bulk(payload: Arc<Vec<u8>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let payload = payload.clone();
            tokio::spawn(async move {
                for chunk in payload.chunks(256 << 10) {
                    if socket.write_all(chunk).await.is_err() {
                        return;
                    }
                }
                let _ = socket.shutdown().await;
            });
        }
    });
    addr
}

/// Read `reader` to EOF: the byte count and its SHA-256.
async fn read_hashed(mut reader: impl AsyncRead + Unpin) -> (usize, Vec<u8>) {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0;
    loop {
        let n = reader.read(&mut buf).await.expect("read the download");
        if n == 0 {
            return (got, hash.finalize().to_vec());
        }
        hash.update(&buf[..n]);
        got += n;
    }
}

/// Read a dialed `Proxy` stream until CLOSE_RSP: the byte count, its SHA-256, the error.
async fn proxy_hashed(stream: &mut super::client::ProxyStream) -> (usize, Vec<u8>, Option<String>) {
    let mut hash = Sha256::new();
    let mut got = 0;
    loop {
        match stream.recv().await.unwrap() {
            Some(Packet::Data { data, .. }) => {
                hash.update(&data);
                got += data.len();
            }
            Some(Packet::CloseResponse { error, .. }) => {
                return (got, hash.finalize().to_vec(), error)
            }
            other => panic!("expected DATA or CLOSE_RSP, got {other:?}"),
        }
    }
}

/// Write `payload` and read its echo back at once; compare checksums.
async fn echo(
    rd: &mut (impl AsyncRead + Unpin),
    wr: &mut (impl tokio::io::AsyncWrite + Unpin),
    payload: Vec<u8>,
) {
    let sent = Sha256::digest(&payload);
    let mut echoed = vec![0u8; payload.len()];
    let (w, r) = tokio::join!(wr.write_all(&payload), rd.read_exact(&mut echoed));
    w.unwrap();
    r.unwrap();
    assert_eq!(Sha256::digest(&echoed), sent, "echoed bytes differ");
}

fn mb_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / 1e6 / took.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_agent_sending_64_mib_as_fast_as_it_can_loses_nothing() {
    let payload = Arc::new(seeded(64, BULK));
    let expected = Sha256::digest(&payload[..]).to_vec();
    let bulk = start_bulk(payload).await;
    let rig = Rig::start_with(options(vec![bulk.port()], None)).await;
    let _agent = attach(&rig).await;

    // CONNECT: the agent reads the target in 32 KiB pieces and sends as fast as its stream's
    // window allows; the frontend reads normally.
    let started = Instant::now();
    let socket = within(
        "CONNECT through the agent",
        tunnel_server::client::connect_unix(&rig.connect_socket(), &agent_target(bulk.port())),
    )
    .await
    .expect("CONNECT to the bulk target");
    let (got, hash) = within("64 MiB through CONNECT", read_hashed(socket)).await;
    assert_eq!(got, BULK, "bytes delivered through CONNECT");
    assert_eq!(hash, expected, "CONNECT download differs");
    let connect = started.elapsed();

    // The same through the Konnectivity frontend: every byte, then CLOSE_RSP without error.
    let started = Instant::now();
    let conn = rig.connect_unix().await;
    let mut stream = conn.open().await.unwrap();
    stream
        .dial(&agent_target(bulk.port()), 1)
        .await
        .unwrap()
        .expect("dial the bulk target");
    let (got, hash, error) = within("64 MiB through Proxy", proxy_hashed(&mut stream)).await;
    assert_eq!((got, error), (BULK, None), "bytes delivered through Proxy");
    assert_eq!(hash, expected, "Proxy download differs");
    let proxy = started.elapsed();
    println!(
        "64 MiB from a stock agent: CONNECT {:.0} MB/s, Proxy {:.0} MB/s",
        mb_per_s(BULK, connect),
        mb_per_s(BULK, proxy)
    );
    assert!(metric_line(&rig, "tether_agent_stalled_resets_total 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_is_reset_after_write_timeout_and_the_agents_other_connections_resume() {
    let write_timeout = Duration::from_secs(2);
    let firehose = start_firehose().await;
    let len = 16 << 20;
    let payload = Arc::new(seeded(16, len));
    let expected = Sha256::digest(&payload[..]).to_vec();
    let bulk = start_bulk(payload).await;
    let rig = Rig::start_with(options(
        vec![firehose.port(), bulk.port()],
        Some(write_timeout),
    ))
    .await;
    let agent = attach(&rig).await;
    let conn = rig.connect_unix().await;
    let mut lively = conn.open().await.unwrap();
    let lively_id = lively
        .dial(&agent_target(rig.echo.port()), 1)
        .await
        .unwrap()
        .expect("dial echo");
    ping(&mut lively, lively_id, b"before").await;

    // A connection whose client never reads while its target writes as fast as it can.
    let mut slow = conn.open().await.unwrap();
    slow.dial(&agent_target(firehose.port()), 2)
        .await
        .unwrap()
        .expect("dial the firehose");
    let slow_opened = Instant::now();
    // A download through CONNECT on the same agent, read normally throughout.
    let (path, target) = (rig.connect_socket(), agent_target(bulk.port()));
    let download = tokio::spawn(async move {
        let socket = tunnel_server::client::connect_unix(&path, &target).await;
        read_hashed(socket.expect("CONNECT to the bulk target")).await
    });

    // Round trips on another connection of the agent: they wait while the slow connection
    // holds the agent's stream, and resume once it is reset.
    let resets = &rig.server.shared.metrics.agent_stalled_resets;
    let deadline = Instant::now() + write_timeout * 5;
    let (mut worst, mut after_reset, mut reset_at) = (Duration::ZERO, 0, None);
    while after_reset < 20 {
        assert!(
            Instant::now() < deadline,
            "no reset of the stalled connection"
        );
        let started = Instant::now();
        ping(&mut lively, lively_id, b"round trip").await;
        worst = worst.max(started.elapsed());
        if resets.get() > 0 {
            reset_at.get_or_insert_with(|| slow_opened.elapsed());
            after_reset += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reset_at = reset_at.unwrap();
    assert!(
        reset_at >= write_timeout,
        "reset {reset_at:?} after opening, before write_timeout {write_timeout:?}"
    );
    let (got, hash) = within("the download beside the stall", download)
        .await
        .unwrap();
    assert_eq!(
        (got, hash),
        (len, expected),
        "the download beside the stall"
    );
    println!(
        "stalled reader: reset {reset_at:?} after it opened (write_timeout {write_timeout:?}); \
         worst round trip of another connection {worst:?}"
    );

    // The slow client, reading at last, gets what was buffered, then CLOSE_RSP with an error.
    let (_, _, error) = within("the slow stream's end", proxy_hashed(&mut slow)).await;
    assert!(error.is_some(), "CLOSE_RSP must carry the failure");
    assert_eq!(resets.get(), 1, "only the stalled connection is reset");
    assert!(agent.seen.close_requests.load(Ordering::Relaxed) >= 1);
    ping(&mut lively, lively_id, b"after the reset").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_keeps_an_agent_carried_stream_flowing_until_it_completes() {
    let rig = Rig::start_with(options(vec![], None)).await;
    let agent = attach(&rig).await;
    let shared = rig.server.shared.clone();
    let socket = within(
        "CONNECT through the agent",
        tunnel_server::client::connect_unix(&rig.connect_socket(), &agent_target(rig.echo.port())),
    )
    .await
    .expect("CONNECT to echo");
    let (mut rd, mut wr) = socket.into_split();
    echo(&mut rd, &mut wr, seeded(1, 64 << 10)).await;

    let drain = tokio::spawn(rig.shutdown(GRACE));
    let deadline = Instant::now() + STEP;
    while agent.seen.drains.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "no DRAIN within {STEP:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        shared
            .routes
            .get(&NodeName::parse(AGENT_NODE).unwrap())
            .is_none(),
        "a draining agent takes no new dial"
    );
    // Well past the moment a stock agent drops its connections after a GOAWAY.
    tokio::time::sleep(Duration::from_secs(1)).await;
    within(
        "8 MiB echo during the drain",
        echo(&mut rd, &mut wr, seeded(2, 8 << 20)),
    )
    .await;
    assert_eq!(
        agent.seen.goaways.load(Ordering::Relaxed),
        0,
        "GOAWAY reached the agent while its connection was open"
    );
    assert!(!agent.done.is_finished(), "the agent's stream ended early");
    assert!(!drain.is_finished(), "the drain ended with a stream open");

    // Our EOF closes the connection at the agent; then its stream ends and the server exits
    // long before the grace period.
    wr.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("EOF after CLOSE_REQ", rd.read_to_end(&mut rest))
        .await
        .unwrap();
    within("the agent's stream to end", agent.done)
        .await
        .unwrap()
        .expect("stream ends with grpc-status 0");
    let took = within("the drain to finish", drain).await.unwrap();
    assert!(took < GRACE / 2, "drain took {took:?}");
    assert_eq!(shared.metrics.agents_connected.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_with_the_agent_listener_on_exits_promptly_when_nothing_is_in_flight() {
    // No agent at all.
    let rig = Rig::start_with(options(vec![], None)).await;
    let took = within("an idle drain", rig.shutdown(GRACE)).await;
    assert!(took < Duration::from_secs(3), "idle drain took {took:?}");

    // An attached agent with no connection: told DRAIN, its stream ends OK, the server exits.
    let rig = Rig::start_with(options(vec![], None)).await;
    let agent = attach(&rig).await;
    let took = within("a drain with an idle agent", rig.shutdown(GRACE)).await;
    assert!(took < Duration::from_secs(3), "drain took {took:?}");
    assert_eq!(agent.seen.drains.load(Ordering::Relaxed), 1);
    within("the agent's stream to end", agent.done)
        .await
        .unwrap()
        .expect("stream ends with grpc-status 0");
}
