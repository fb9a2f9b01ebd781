//! Idle streams (TESTPLAN 9): a tunneled connection with no byte moving either way is closed
//! after the idle timeout, on the server or on the edge, with the reason in the audit log;
//! session PINGs (every 200 ms here) do not count as traffic; bytes in either direction alone
//! keep a stream alive, and arrive whole.

use std::time::{Duration, Instant};

use tether_tests::data::{read_hashing, seeded_digest, PeerRequest, Seeded, REPLY_SALT};
use tether_tests::targets::Drip;
use tether_tests::{poll_until, within, Cluster, ClusterOptions, EdgeTuning, ServerOptions, NODE};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const IDLE: Duration = Duration::from_secs(1);
const PING: Duration = Duration::from_millis(200);

/// A cluster with 200 ms PINGs both ways and the given idle timeouts.
async fn cluster(
    server_idle: Option<Duration>,
    edge_idle: Option<Duration>,
    extra: Vec<u16>,
) -> Cluster {
    Cluster::start(ClusterOptions {
        allow_both: extra,
        server: ServerOptions {
            ping_interval: PING,
            ping_misses: 3,
            idle_timeout: server_idle,
            ..ServerOptions::default()
        },
        edge: EdgeTuning {
            ping_interval: PING,
            ping_misses: 3,
            idle_timeout: edge_idle,
            ..EdgeTuning::default()
        },
        ..ClusterOptions::default()
    })
    .await
}

/// Read until the stream ends, one way or another; how long that took.
async fn wait_closed<R: AsyncRead + Unpin>(reader: &mut R) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let read = within("the idle stream to close", IDLE * 10, reader.read(&mut buf)).await;
    assert!(
        !matches!(read, Ok(n) if n > 0),
        "an idle stream received bytes"
    );
    started.elapsed()
}

/// Wait for a log line of `log()` containing every needle.
async fn log_line(what: &str, log: impl Fn() -> String, needles: &[&str]) -> String {
    poll_until(
        what,
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            let found = log()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_owned);
            std::future::ready(found)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_are_closed_by_the_server_with_a_logged_reason_despite_session_pings() {
    // The edge's own idle timeout is long: the server's must act.
    let cluster = cluster(Some(IDLE), Some(Duration::from_secs(60)), vec![]).await;
    let mut tunnel = cluster
        .connect(&cluster.target(cluster.echo.addr.port()))
        .await
        .expect("CONNECT to echo");
    // One round trip, then silence both ways while PINGs keep flowing on the session.
    tunnel.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    tunnel.read_exact(&mut back).await.unwrap();
    let took = wait_closed(&mut tunnel).await;
    println!("idle stream closed after {took:?} (idle timeout {IDLE:?}, PING every {PING:?})");
    assert!(
        took >= IDLE - Duration::from_millis(50) && took < IDLE + Duration::from_millis(1500),
        "closed after {took:?}"
    );
    let line = log_line(
        "the server's audit line",
        || cluster.server.log(),
        &["stream closed", "idle for longer than"],
    )
    .await;
    assert!(line.contains(NODE), "{line}");
    // The session itself is alive: PINGs were answered all along.
    assert!(cluster.server.has_edge_session(NODE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_are_closed_by_the_edge_with_a_logged_reason() {
    // The server's idle timeout is off (`0s`): the edge's must act.
    let cluster = cluster(Some(Duration::ZERO), Some(IDLE), vec![]).await;
    let mut tunnel = cluster
        .connect(&cluster.target(cluster.echo.addr.port()))
        .await
        .expect("CONNECT to echo");
    let took = wait_closed(&mut tunnel).await;
    assert!(
        took >= IDLE - Duration::from_millis(50) && took < IDLE + Duration::from_millis(1500),
        "closed after {took:?}"
    );
    let line = log_line(
        "the edge's audit line",
        || cluster.edge.log(),
        &["edge stream closed", "idle for longer than"],
    )
    .await;
    assert!(
        line.contains(&cluster.echo.addr.port().to_string()),
        "{line}"
    );
    log_line(
        "the server's audit line",
        || cluster.server.log(),
        &["stream closed", NODE],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_traffic_one_way_only_resets_the_timer() {
    const CHUNK: usize = 4096;
    const CHUNKS: usize = 7;
    let gap = Duration::from_millis(400);
    // Downloads only: the target writes a chunk every 400 ms for 2.4 s, > 2 × the timeout.
    let drip = Drip::start(CHUNK, CHUNKS, gap).await;
    let mut cluster = cluster(Some(IDLE), Some(IDLE), vec![drip.addr.port()]).await;

    let mut down = cluster
        .connect(&cluster.target(drip.addr.port()))
        .await
        .expect("CONNECT to the drip");
    let started = Instant::now();
    let (len, digest) = within("the drip", Duration::from_secs(10), read_hashing(&mut down))
        .await
        .expect("read the drip to its end");
    assert!(started.elapsed() > IDLE * 2, "{:?}", started.elapsed());
    assert_eq!(len, drip.total, "bytes from the drip");
    assert_eq!(
        digest,
        seeded_digest(Drip::SEED, drip.total),
        "digest of the drip"
    );
    // Close our side too: a half-closed stream left alone would (rightly) idle out.
    drop(down);

    // Uploads only: the checksum peer replies only after our EOF, so for 2.4 s the bytes
    // move toward the target alone.
    let tunnel = cluster
        .connect(&cluster.target(cluster.peer.addr.port()))
        .await
        .expect("CONNECT to the peer");
    let request = PeerRequest {
        seed: 9,
        reply_len: 64 << 10,
        reply_after_eof: true,
    };
    let (mut reader, mut writer) = tokio::io::split(tunnel);
    let started = Instant::now();
    let write = async {
        writer.write_all(&request.encode()).await?;
        let mut rng = Seeded::new(request.seed);
        let mut buf = vec![0u8; CHUNK];
        for i in 0..CHUNKS {
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            rng.fill(&mut buf);
            writer.write_all(&buf).await?;
            writer.flush().await?;
        }
        writer.shutdown().await?;
        Ok::<_, std::io::Error>(())
    };
    let read = read_hashing(&mut reader);
    let (written, read) = within("the spaced upload", Duration::from_secs(15), async {
        tokio::join!(write, read)
    })
    .await;
    written.expect("upload");
    let (got, got_digest) = read.expect("reply");
    assert!(started.elapsed() > IDLE * 2, "{:?}", started.elapsed());
    let report = within(
        "the peer's report",
        Duration::from_secs(5),
        cluster.peer.next_report(),
    )
    .await;
    assert_eq!(report.error, None);
    assert_eq!(report.read, (CHUNK * CHUNKS) as u64, "bytes the peer read");
    assert_eq!(
        report.read_digest,
        seeded_digest(request.seed, (CHUNK * CHUNKS) as u64),
        "digest of what the peer read"
    );
    assert_eq!(got, request.reply_len, "reply bytes");
    assert_eq!(
        got_digest,
        seeded_digest(request.seed ^ REPLY_SALT, request.reply_len),
        "reply digest"
    );
    assert!(
        !cluster.server.log().contains("idle for longer than"),
        "a stream with one-way traffic was closed as idle"
    );
}
