//! Interactive streams beside bulk ones (issue 16): while one stream's reader has stalled
//! and another stream moves bulk data both ways on the same edge session, small echo
//! exchanges on a third kind of stream still complete. Behaviour, not speed: the bound is
//! generous and only catches a stream starved outright (the loadtest's `hol` scenario
//! measures the latency).

use std::time::{Duration, Instant};

use tether_tests::data::{exchange, PeerRequest, MIB};
use tether_tests::frontend::metric;
use tether_tests::targets::Firehose;
use tether_tests::{poll_until, within, Cluster, ClusterOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Small echo exchanges made while the bulk stream runs.
const EXCHANGES: usize = 200;
/// Bytes per exchange, like a `kubectl exec` keystroke burst or a metrics request.
const EXCHANGE_BYTES: usize = 512;
/// Bytes the bulk stream would send each way: far more than it moves while the exchanges
/// run (it is aborted after them), so it is still running when they end on any machine.
const BULK_BYTES: u64 = 64 * 1024 * MIB;
/// The firehose's cap; the stalled stream blocks long before it (the windows bound it).
const FIREHOSE_CAP: u64 = 160 * MIB;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_echoes_complete_beside_a_bulk_stream_and_a_stalled_reader() {
    let firehose = Firehose::start(FIREHOSE_CAP).await;
    let cluster = Cluster::start(ClusterOptions {
        allow_both: vec![firehose.addr.port()],
        ..ClusterOptions::default()
    })
    .await;

    // Stream A: its client never reads, so its window fills and its target blocks.
    let _stalled = cluster
        .connect(&cluster.target(firehose.addr.port()))
        .await
        .expect("CONNECT the stalled stream");
    poll_until(
        "the stalled stream's target to write",
        Duration::from_secs(20),
        Duration::from_millis(20),
        || std::future::ready((firehose.written() > MIB).then_some(())),
    )
    .await;

    // Stream B: bulk both ways, running in the background.
    let bulk_tunnel = cluster
        .connect(&cluster.target(cluster.peer.addr.port()))
        .await
        .expect("CONNECT the bulk stream");
    let request = PeerRequest {
        seed: 16,
        reply_len: BULK_BYTES,
        reply_after_eof: false,
    };
    let bulk = tokio::spawn(exchange(bulk_tunnel, request, BULK_BYTES));

    // Stream C: small echo exchanges, each checked, while B runs.
    let mut echo = cluster
        .connect(&cluster.target(cluster.echo.addr.port()))
        .await
        .expect("CONNECT the echo stream");
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut reply = vec![0u8; EXCHANGE_BYTES];
    for i in 0..EXCHANGES {
        let message: Vec<u8> = (0..EXCHANGE_BYTES).map(|b| (b + i) as u8).collect();
        let t = Instant::now();
        within("one small echo exchange", Duration::from_secs(10), async {
            echo.write_all(&message)
                .await
                .expect("write the echo request");
            echo.read_exact(&mut reply)
                .await
                .expect("read the echo reply");
        })
        .await;
        assert_eq!(reply, message, "echo exchange {i} came back different");
        slowest = slowest.max(t.elapsed());
    }
    let took = started.elapsed();
    assert!(
        !bulk.is_finished(),
        "the bulk stream ended before the exchanges did: they did not run beside it"
    );
    // The bulk stream went to the session's lane, where it no longer takes turns with the
    // small exchanges on the session's threads (e2e/lanes.rs checks the move itself).
    let moved = metric(&cluster.metrics().await, "tether_lane_moves_total");
    assert!(
        moved >= Some(1.0),
        "the bulk stream did not move to the lane: {moved:?}"
    );
    println!(
        "{EXCHANGES} echo exchanges of {EXCHANGE_BYTES} B beside a bulk stream and a stalled \
         reader: {:.0} ms in all, slowest {:.1} ms",
        took.as_secs_f64() * 1e3,
        slowest.as_secs_f64() * 1e3
    );
    bulk.abort();
}
