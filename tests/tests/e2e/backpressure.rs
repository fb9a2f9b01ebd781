//! Backpressure without head-of-line blocking (TESTPLAN 6): a stream whose reader stalls
//! blocks its own target within the windows, while another stream on the same edge keeps
//! moving, and memory stays bounded.

use std::time::{Duration, Instant};

use tether_tests::data::{exchange, hex, mb_per_s, read_hashing, seeded_digest, PeerRequest, MIB};
use tether_tests::targets::Firehose;
use tether_tests::{poll_until, within, Cluster, ClusterOptions};

/// Kernel socket buffer maxima (send, receive) in bytes: what TCP autotuning may hold per
/// socket beyond anything the tunnel buffers.
fn socket_buffer_maxima() -> (u64, u64) {
    let max = |file: &str| -> u64 {
        std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.split_whitespace().last()?.parse().ok())
            .unwrap_or(32 * MIB)
    };
    (
        max("/proc/sys/net/ipv4/tcp_wmem"),
        max("/proc/sys/net/ipv4/tcp_rmem"),
    )
}

/// Resident memory of a process in bytes.
fn rss(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib << 10
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_blocks_its_own_target_while_other_streams_keep_flowing() {
    // What the tunnel may hold for one stalled stream: the receiver's stream window (16 MiB
    // by default) plus one read chunk per hop, and the kernel's buffers on the two sockets
    // the stream crosses (target→edge and server→client: a send and a receive buffer each).
    const STREAM_WINDOW: u64 = 16 * MIB;
    const CHUNK_SLACK: u64 = 4 * MIB;
    const CAP: u64 = 160 * MIB;
    const B_LEN: u64 = 32 * MIB;
    let (wmem, rmem) = socket_buffer_maxima();
    let bound = STREAM_WINDOW + CHUNK_SLACK + 2 * (wmem + rmem);
    assert!(
        bound < CAP,
        "kernel buffers too large for this test: bound {bound}"
    );

    let firehose = Firehose::start(CAP).await;
    let mut cluster = Cluster::start(ClusterOptions {
        allow_both: vec![firehose.addr.port()],
        ..ClusterOptions::default()
    })
    .await;
    let rss_before = (rss(cluster.server.pid()), rss(cluster.edge.pid()));

    // Stream A: its client never reads.
    let mut stalled = cluster
        .connect(&cluster.target(firehose.addr.port()))
        .await
        .expect("CONNECT stream A");
    let mut last = (0u64, Instant::now());
    let blocked_at = poll_until(
        "stream A's target to block",
        Duration::from_secs(30),
        Duration::from_millis(50),
        || {
            let now = firehose.written();
            assert!(
                now < CAP,
                "stream A's target wrote all {CAP} bytes to a client that reads nothing"
            );
            let stable = if now != last.0 {
                last = (now, Instant::now());
                None
            } else {
                (now > 0 && last.1.elapsed() >= Duration::from_secs(1)).then_some(now)
            };
            std::future::ready(stable)
        },
    )
    .await;
    assert!(
        blocked_at <= bound,
        "stream A's target wrote {blocked_at} bytes before blocking; the windows bound it to {bound}"
    );

    // Stream B on the same edge moves its bytes meanwhile.
    let b_target = cluster.target(cluster.peer.addr.port());
    let tunnel = cluster.connect(&b_target).await.expect("CONNECT stream B");
    let request = PeerRequest {
        seed: 32,
        reply_len: B_LEN,
        reply_after_eof: false,
    };
    let client = within(
        "stream B while A is stalled",
        Duration::from_secs(60),
        exchange(tunnel, request, B_LEN),
    )
    .await
    .expect("stream B");
    let peer = within(
        "the peer's report",
        Duration::from_secs(10),
        cluster.peer.next_report(),
    )
    .await;
    peer.assert_matches("stream B", request, B_LEN, &client);
    assert_eq!(
        firehose.written(),
        blocked_at,
        "stream A's target moved while its reader stalled"
    );
    let rss_during = (rss(cluster.server.pid()), rss(cluster.edge.pid()));
    println!(
        "stalled stream A blocked its target after {:.1} MiB (bound {:.1} MiB); stream B moved 32 MiB each way in {:.2} s ({:.0} MB/s per direction); RSS server {} -> {} MiB, edge {} -> {} MiB",
        blocked_at as f64 / MIB as f64,
        bound as f64 / MIB as f64,
        client.elapsed.as_secs_f64(),
        mb_per_s(B_LEN, client.elapsed),
        rss_before.0 >> 20,
        rss_during.0 >> 20,
        rss_before.1 >> 20,
        rss_during.1 >> 20,
    );
    // Each process buffers at most one connection window (64 MiB by default) of stream data;
    // allow 16 MiB more for allocator slack.
    for (who, before, during) in [
        ("server", rss_before.0, rss_during.0),
        ("edge", rss_before.1, rss_during.1),
    ] {
        assert!(
            during.saturating_sub(before) <= 80 * MIB,
            "{who} RSS grew from {} to {} MiB",
            before >> 20,
            during >> 20
        );
    }

    // A resumes reading: everything its target wrote arrives, in order, nothing lost.
    let (n, digest) = within(
        "stream A to drain",
        Duration::from_secs(60),
        read_hashing(&mut stalled),
    )
    .await
    .expect("read stream A");
    assert_eq!(n, CAP, "stream A's bytes");
    assert_eq!(
        hex(&digest),
        hex(&seeded_digest(Firehose::SEED, CAP)),
        "stream A's digest"
    );
}
