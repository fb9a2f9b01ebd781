//! Bytes arrive whole or the stream fails visibly: bulk transfers, many concurrent streams,
//! half-close and HTTP/1.1 upgrades.
//! Every payload is seeded pseudo-random data checked by length and SHA-256 at both ends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_tests::data::{exchange, hex, mb_per_s, read_hashing, write_seeded, PeerRequest, MIB};
use tether_tests::edge::Transport;
use tether_tests::frontend::read_answer;
use tether_tests::targets::PeerReport;
use tether_tests::{within, Cluster, ClusterOptions, NODE_IP};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_arrive_intact_through_one_stream() {
    sixty_four_mib_each_way(Transport::Tcp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_sixty_four_mib_each_way_arrive_intact_through_one_stream() {
    sixty_four_mib_each_way(Transport::Quic).await;
}

async fn sixty_four_mib_each_way(transport: Transport) {
    const LEN: u64 = 64 * MIB;
    let mut cluster = Cluster::start(ClusterOptions::over(transport)).await;
    let tunnel = cluster
        .connect(&cluster.target(cluster.peer.addr.port()))
        .await
        .expect("CONNECT to the checksum peer");
    let request = PeerRequest {
        seed: 64,
        reply_len: LEN,
        reply_after_eof: false,
    };
    let client = within(
        "64 MiB each way",
        Duration::from_secs(90),
        exchange(tunnel, request, LEN),
    )
    .await
    .expect("transfer");
    let peer = within(
        "the peer's report",
        Duration::from_secs(10),
        cluster.peer.next_report(),
    )
    .await;
    peer.assert_matches("64 MiB", request, LEN, &client);
    println!(
        "64 MiB each way through one {} stream in {:.2} s: {:.0} MB/s per direction, {:.0} MB/s both ways",
        transport.as_str(),
        client.elapsed.as_secs_f64(),
        mb_per_s(LEN, client.elapsed),
        mb_per_s(2 * LEN, client.elapsed),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams_arrive_intact() {
    const STREAMS: u64 = 200;
    const LEN: u64 = 256 << 10;
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let proxy = cluster.server.addrs.connect_tcp;
    let tls = cluster.pki.frontend_client_tls();
    let target = cluster.target(cluster.peer.addr.port());
    // Every stream is open (CONNECT answered) before any of them sends a byte, so the edge
    // really carries 200 streams at once.
    let all_open = Arc::new(tokio::sync::Barrier::new(STREAMS as usize));
    let started = Instant::now();
    let tasks: Vec<_> = (0..STREAMS)
        .map(|seed| {
            let (tls, target, all_open) = (tls.clone(), target.clone(), all_open.clone());
            tokio::spawn(async move {
                let tunnel = tunnel_server::client::connect_tls(proxy, tls, &target).await;
                all_open.wait().await;
                let request = PeerRequest {
                    seed,
                    reply_len: LEN,
                    reply_after_eof: false,
                };
                let tunnel = tunnel.map_err(|e| format!("stream {seed}: CONNECT: {e:#}"))?;
                let client = exchange(tunnel, request, LEN)
                    .await
                    .map_err(|e| format!("stream {seed}: transfer: {e}"))?;
                Ok::<_, String>((request, client))
            })
        })
        .collect();
    let mut clients = Vec::new();
    let mut failures = Vec::new();
    for task in tasks {
        match within("200 concurrent streams", Duration::from_secs(90), task).await {
            Ok(Ok(done)) => clients.push(done),
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(format!("task panicked: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {STREAMS} streams failed: {failures:#?}",
        failures.len()
    );
    let elapsed = started.elapsed();
    let mut reports: HashMap<u64, PeerReport> = HashMap::new();
    for _ in 0..STREAMS {
        let report = within(
            "the peer's reports",
            Duration::from_secs(10),
            cluster.peer.next_report(),
        )
        .await;
        let seed = report
            .request
            .map(|r| r.seed)
            .expect("a report without a request");
        assert!(
            reports.insert(seed, report).is_none(),
            "two peer connections used seed {seed}"
        );
    }
    for (request, client) in &clients {
        let peer = &reports[&request.seed];
        peer.assert_matches(&format!("stream {}", request.seed), *request, LEN, client);
    }
    println!(
        "{STREAMS} concurrent streams x 256 KiB each way in {:.2} s ({:.0} MB/s both ways)",
        elapsed.as_secs_f64(),
        mb_per_s(2 * STREAMS * LEN, elapsed)
    );
}

/// Half-close on `tunnel`: N bytes, write shutdown, then the reply the peer sends only after
/// it has seen EOF.
async fn check_half_close<S: AsyncRead + AsyncWrite + Unpin>(
    cluster: &mut Cluster,
    tunnel: S,
    label: &str,
) {
    const N: u64 = 100_003;
    let request = PeerRequest {
        seed: 5,
        reply_len: MIB + 7,
        reply_after_eof: true,
    };
    let client = within(label, Duration::from_secs(30), exchange(tunnel, request, N))
        .await
        .unwrap_or_else(|e| panic!("{label}: {e}"));
    let peer = within(
        "the peer's report",
        Duration::from_secs(10),
        cluster.peer.next_report(),
    )
    .await;
    // The peer writes only after EOF, so any reply at all proves the write shutdown arrived
    // as EOF (not as a reset) and the other direction stayed open.
    peer.assert_matches(label, request, N, &client);
}

#[tokio::test]
async fn testplan_05_half_close_delivers_exactly_n_bytes_then_eof_and_the_reply_still_arrives() {
    half_close(Transport::Tcp).await;
}

#[tokio::test]
async fn quic_testplan_05_half_close_delivers_exactly_n_bytes_then_eof_and_the_reply_still_arrives()
{
    half_close(Transport::Quic).await;
}

async fn half_close(transport: Transport) {
    let mut cluster = Cluster::start(ClusterOptions::over(transport)).await;
    let target = cluster.target(cluster.peer.addr.port());
    let tls = cluster.connect(&target).await.expect("CONNECT (mTLS)");
    check_half_close(&mut cluster, tls, "half-close through the mTLS frontend").await;
    let unix = tunnel_server::client::connect_unix(&cluster.server.addrs.connect_unix, &target)
        .await
        .expect("CONNECT (Unix socket)");
    check_half_close(
        &mut cluster,
        unix,
        "half-close through the Unix socket frontend",
    )
    .await;

    // `echo x | kubectl exec -i -- cat`: the echo of every byte, then EOF.
    const N: u64 = 77_777;
    let echo = cluster
        .connect(&cluster.target(cluster.echo.addr.port()))
        .await
        .expect("CONNECT to the echo server");
    let (mut reader, mut writer) = tokio::io::split(echo);
    let write = async {
        let digest = write_seeded(&mut writer, 77, N, |_| {}).await?;
        writer.shutdown().await?;
        Ok::<_, std::io::Error>(digest)
    };
    let (sent, echoed) = within(
        "the echo after a write shutdown",
        Duration::from_secs(30),
        async { tokio::join!(write, read_hashing(&mut reader)) },
    )
    .await;
    let sent = sent.expect("write to the echo server");
    let (n, digest) = echoed.expect("read the echo to EOF");
    assert_eq!(n, N, "echoed bytes before EOF");
    assert_eq!(hex(&digest), hex(&sent), "digest of the echo");
}

#[tokio::test]
async fn http_upgrade_passes_through_and_echoes_end_to_end_tls() {
    const LEN: u64 = 3 * MIB + 11;
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let tunnel = cluster
        .connect(&cluster.target(cluster.kubelet.addr.port()))
        .await
        .expect("CONNECT to the kubelet");
    // TLS with the kubelet itself, verified against the kubelet's CA: the tunnel carries it
    // without terminating it.
    let name = tunnel_io::tls::server_name(&NODE_IP.to_string()).expect("server name");
    let mut tls = tokio_rustls::TlsConnector::from(cluster.pki.kubelet_client_tls())
        .connect(name, tunnel)
        .await
        .expect("TLS to the kubelet through the tunnel");
    tls.write_all(
        b"POST /exec/default/web/app?command=cat&stdin=true HTTP/1.1\r\nHost: 192.0.2.10\r\n\
          Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .expect("send the upgrade request");
    let answer = within(
        "the 101 answer",
        Duration::from_secs(10),
        read_answer(&mut tls, false),
    )
    .await
    .expect("read the answer");
    assert_eq!(answer.status, 101, "{}", answer.head);
    assert_eq!(
        answer.header("upgrade"),
        Some("SPDY/3.1"),
        "{}",
        answer.head
    );

    let (mut reader, mut writer) = tokio::io::split(tls);
    let write = async {
        let digest = write_seeded(&mut writer, 101, LEN, |_| {}).await?;
        writer.shutdown().await?;
        Ok::<_, std::io::Error>(digest)
    };
    let (sent, received) = within(
        "echo through the upgraded connection",
        Duration::from_secs(30),
        async { tokio::join!(write, read_hashing(&mut reader)) },
    )
    .await;
    let sent = sent.expect("write to the upgraded connection");
    let (n, digest) = received.expect("read the echo");
    assert_eq!(n, LEN, "echoed bytes");
    assert_eq!(hex(&digest), hex(&sent), "digest of the echo");
}
