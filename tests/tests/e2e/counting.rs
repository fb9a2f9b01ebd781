//! What the server reports about a stream while it runs and when it ends: tunneled bytes
//! counted as they move (kube-apiserver keeps its kubelet connections open, so a count taken
//! only at the end hid whole transfers), and a client leaving a follow stream audited as the
//! normal close it is.

use std::time::Duration;

use tether_tests::frontend::metric;
use tether_tests::server::log_field;
use tether_tests::targets::Drip;
use tether_tests::{poll_until, within, Cluster, ClusterOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FROM_EDGE: &str = r#"tether_tunneled_bytes_total{direction="from_edge"}"#;

#[tokio::test]
async fn tunneled_bytes_show_in_metrics_while_a_long_transfer_runs() {
    // 64 KiB every 50 ms for 10 s: far longer than the test looks at it.
    const CHUNK: usize = 64 << 10;
    const READ_FIRST: usize = 4 * CHUNK;
    let drip = Drip::start(CHUNK, 200, Duration::from_millis(50)).await;
    let cluster = Cluster::start(ClusterOptions {
        allow_both: vec![drip.addr.port()],
        ..ClusterOptions::default()
    })
    .await;
    let mut tunnel = cluster
        .connect(&cluster.target(drip.addr.port()))
        .await
        .expect("CONNECT to the drip");
    let mut buf = vec![0u8; READ_FIRST];
    within(
        "the first chunks",
        Duration::from_secs(10),
        tunnel.read_exact(&mut buf),
    )
    .await
    .expect("read the first chunks");
    poll_until(
        "the open stream's bytes in /metrics",
        Duration::from_secs(5),
        Duration::from_millis(50),
        || async {
            let text = cluster.metrics().await;
            let counted = metric(&text, FROM_EDGE).unwrap_or_default();
            (counted >= READ_FIRST as f64).then_some(())
        },
    )
    .await;
    // The stream is still the same live transfer.
    within(
        "one more chunk",
        Duration::from_secs(10),
        tunnel.read_exact(&mut buf[..CHUNK]),
    )
    .await
    .expect("the transfer goes on");
    let text = cluster.metrics().await;
    assert_eq!(
        metric(&text, "tether_streams_open"),
        Some(1.0),
        "the transfer must still be open while its bytes are counted:\n{text}"
    );
}

/// `kubectl logs -f` ending: the client has sent everything (TLS close_notify, FIN), then
/// closes its socket while the node still streams. Writes then fail with EPIPE; that is the
/// client leaving, not a socket error.
#[tokio::test]
async fn client_closing_a_follow_stream_is_audited_as_a_normal_close() {
    // 1 KiB every 20 ms for 20 s: a log that keeps coming.
    let drip = Drip::start(1024, 1000, Duration::from_millis(20)).await;
    let cluster = Cluster::start(ClusterOptions {
        allow_both: vec![drip.addr.port()],
        log_json: true,
        ..ClusterOptions::default()
    })
    .await;
    let target = cluster.target(drip.addr.port());
    let mut tunnel = cluster.connect(&target).await.expect("CONNECT to the drip");
    let mut buf = [0u8; 2048];
    within(
        "the first lines",
        Duration::from_secs(10),
        tunnel.read_exact(&mut buf),
    )
    .await
    .expect("read the first lines");
    tunnel.shutdown().await.expect("close_notify and FIN");
    // Let the server read the EOF before the socket goes, as a client reading its last
    // lines would; then close with the follow data still arriving.
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(tunnel);
    let line = poll_until(
        "the stream's audit line",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let log = cluster.server.log();
            let line = log
                .lines()
                .find(|l| l.contains("stream closed") && l.contains(&target))
                .map(str::to_owned);
            std::future::ready(line)
        },
    )
    .await;
    assert_eq!(
        log_field(&line, "result").as_deref(),
        Some("ok: client closed"),
        "{line}"
    );
}
