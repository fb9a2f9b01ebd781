//! Replicas behind the load balancer (TESTPLAN 8): the edge dials only haproxy yet ends up
//! with a session on every replica, so every replica's CONNECT frontend reaches it; PROXY
//! protocol v2 gives the servers the edge's own address; killing a replica leaves traffic on
//! the others untouched, and the edge rejoins the replica within the reconnect bound when it
//! returns.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_tests::data::{read_hashing, seeded_digest, write_seeded};
use tether_tests::frontend::{admin_get, curl, curl_proxy_args, metric};
use tether_tests::ha::{HaCluster, HaOptions};
use tether_tests::haproxy::CHECK_INTERVAL;
use tether_tests::server::{log_field, EDGE_ENDED};
use tether_tests::targets::EchoServer;
use tether_tests::{
    poll_until, within, EdgeOptions, EdgeProc, EdgeTuning, Pki, ServerOptions, ServerProc, NODE,
    NODE_IP,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// `GET /healthz` on the kubelet with curl through replica `i`'s mTLS frontend.
async fn curl_healthz_via(cluster: &HaCluster, i: usize) {
    let proxy = curl_proxy_args(cluster.servers[i].addrs.connect_tcp, &cluster.pki);
    let url = format!("https://{NODE_IP}:{}/healthz", cluster.kubelet.addr.port());
    let mut args: Vec<&str> = proxy.iter().map(String::as_str).collect();
    args.push(&url);
    let out = curl(&args).await;
    assert_eq!(out.code, 0, "curl via replica {i}: {}", out.stderr);
    assert_eq!(out.stdout, "ok", "curl via replica {i}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_behind_haproxy_two_replicas_reach_the_edge_and_proxy_v2_shows_its_address() {
    let test = "replicas_behind_haproxy_two_replicas_reach_the_edge_and_proxy_v2_shows_its_address";
    let Some(mut cluster) = HaCluster::start(
        test,
        HaOptions {
            replicas: 2,
            proxy_protocol: true,
            ..HaOptions::default()
        },
    )
    .await
    else {
        return;
    };
    for i in 0..2 {
        curl_healthz_via(&cluster, i).await;
        cluster
            .checked_exchange_via(i, 100 + i as u64, 4 << 20)
            .await;
    }
    // Each replica's audit log names the edge's own source port toward haproxy, which only
    // the PROXY header can tell it: haproxy's connections to the replicas come from other
    // ports.
    // Each session gets its lane through the balancer too: a lane that lands on a replica
    // holding one already is refused and retried, until every replica has one.
    for (i, server) in cluster.servers.iter().enumerate() {
        poll_until(
            &format!("replica {i}'s lane"),
            Duration::from_secs(15),
            Duration::from_millis(50),
            || async move {
                let (_, text) = admin_get(server.addrs.admin, "/metrics").await.ok()?;
                (metric(&text, "tether_edge_lanes") == Some(1.0)).then_some(())
            },
        )
        .await;
    }
    let edge_ports = cluster.edge.local_ports_to(cluster.haproxy.addr);
    assert_eq!(
        edge_ports.len(),
        4,
        "a session and its lane to haproxy per replica: {edge_ports:?}"
    );
    for (i, server) in cluster.servers.iter().enumerate() {
        let lines = server.established_lines();
        let line = lines.last().expect("an established line");
        let peer = log_field(line, "peer").expect("a peer field");
        let port: u16 = peer
            .strip_prefix("127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("replica {i}: peer {peer:?} is not 127.0.0.1:<port>"));
        assert!(
            edge_ports.contains(&port),
            "replica {i} logged peer {peer}, not one of the edge's ports {edge_ports:?}: {line}"
        );
    }
    // A connection that skips the balancer (no PROXY header) is refused: nobody picks their
    // own apparent address by leaving the header out.
    let direct = cluster.servers[0].addrs.edge;
    let mut tcp = TcpStream::connect(direct).await.expect("connect directly");
    tcp.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not a PROXY header")
        .await
        .unwrap();
    poll_until(
        "the refusal of a connection without PROXY header",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            let log = cluster.servers[0].log();
            std::future::ready(log.contains("no PROXY protocol header").then_some(()))
        },
    )
    .await;
    assert!(
        cluster.servers[0].has_edge_session(NODE),
        "the real session is untouched"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_listed_as_addresses_each_get_a_session_without_a_balancer() {
    // `server.addresses`: two servers (one replica each as far as they know), no balancer.
    let pki = Pki::new();
    let echo = EchoServer::start().await;
    let options = ServerOptions {
        allowed_ports: vec![echo.addr.port()],
        ..ServerOptions::default()
    };
    let servers = [
        ServerProc::start(&pki, &options).await,
        ServerProc::start(&pki, &options).await,
    ];
    let edge = EdgeProc::start_tuned(
        &pki,
        &[servers[0].addrs.edge, servers[1].addrs.edge],
        &EdgeOptions {
            files: pki.issue_edge(NODE, &[NODE_IP]),
            allow_ports: vec![echo.addr.port()],
        },
        &EdgeTuning::default(),
    );
    for (i, server) in servers.iter().enumerate() {
        server.wait_for_edge_session(NODE).await;
        echo_checked(
            server.addrs.connect_tcp,
            pki.frontend_client_tls(),
            &format!("{NODE_IP}:{}", echo.addr.port()),
            i as u64,
            1 << 20,
        )
        .await
        .unwrap_or_else(|e| panic!("server {i}: {e}"));
    }
    drop(edge);
}

/// Echo `len` seeded bytes through the mTLS frontend at `proxy` and check them: length and
/// SHA-256.
async fn echo_checked(
    proxy: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    target: &str,
    seed: u64,
    len: u64,
) -> Result<(), String> {
    let tunnel = tunnel_server::client::connect_tls(proxy, tls, target)
        .await
        .map_err(|e| format!("CONNECT via {proxy}: {e:#}"))?;
    let (mut reader, mut writer) = tokio::io::split(tunnel);
    let write = async {
        write_seeded(&mut writer, seed, len, |_| {}).await?;
        writer.shutdown().await
    };
    let (written, read) = tokio::join!(write, read_hashing(&mut reader));
    written.map_err(|e| format!("write via {proxy}: {e}"))?;
    let (n, digest) = read.map_err(|e| format!("read via {proxy}: {e}"))?;
    if n != len || digest != seeded_digest(seed, len) {
        return Err(format!(
            "via {proxy}: {n} of {len} bytes echoed, or a different digest"
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_behind_haproxy_three_replicas_survive_a_killed_one_and_the_edge_rejoins_it() {
    let test =
        "replicas_behind_haproxy_three_replicas_survive_a_killed_one_and_the_edge_rejoins_it";
    let options = HaOptions {
        replicas: 3,
        ..HaOptions::default()
    };
    let reconnect_max = options.edge.reconnect_max;
    let Some(mut cluster) = HaCluster::start(test, options).await else {
        return;
    };
    for i in 0..3 {
        cluster
            .checked_exchange_via(i, 200 + i as u64, 1 << 20)
            .await;
    }
    let sessions_before: Vec<usize> = cluster
        .servers
        .iter()
        .map(|s| s.established_lines().len())
        .collect();

    // Traffic through replicas 0 and 2 for the whole episode, every exchange checksummed.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let traffic = {
        let proxies = [0, 2].map(|i| cluster.servers[i].addrs.connect_tcp);
        let tls = cluster.pki.frontend_client_tls();
        let target = format!("{NODE_IP}:{}", cluster.echo.addr.port());
        let (stop, rounds) = (stop.clone(), rounds.clone());
        tokio::spawn(async move {
            // Bounded: at most 5 000 rounds, and the test stops it much earlier.
            for round in 0..5_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                for (j, proxy) in proxies.iter().enumerate() {
                    let seed = round * 2 + j as u64;
                    within(
                        "an echo through a surviving replica",
                        Duration::from_secs(10),
                        echo_checked(*proxy, tls.clone(), &target, seed, 256 << 10),
                    )
                    .await?;
                }
                rounds.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, String>(())
        })
    };

    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused_before = duplicates_refused(&cluster).await;
    cluster.servers[1].kill();
    // The replica stays down for a while; the edge keeps landing on the others (refused as
    // duplicates) and backs off.
    let killed_at = rounds.load(Ordering::Relaxed);
    let downtime = Duration::from_millis(1500);
    tokio::time::sleep(downtime).await;
    let rounds_while_down = rounds.load(Ordering::Relaxed) - killed_at;
    let refused = duplicates_refused(&cluster).await - refused_before;
    // Jittered backoff from 50 ms: a handful of attempts, not a hot loop.
    let most = (downtime.as_millis() / 50) as u64;
    assert!(
        (1..=most).contains(&refused),
        "{refused} duplicate sessions refused while a replica was down (expected 1..={most})"
    );
    cluster.servers[1].restart().await;
    let restarted = Instant::now();
    let bound = reconnect_max + CHECK_INTERVAL * 2 + Duration::from_secs(3);
    poll_until(
        "the edge to rejoin the restarted replica",
        bound,
        Duration::from_millis(20),
        || std::future::ready(cluster.servers[1].has_edge_session(NODE).then_some(())),
    )
    .await;
    let rejoined = restarted.elapsed();
    println!(
        "edge rejoined the restarted replica after {rejoined:?} (reconnect max {reconnect_max:?}); \
         {rounds_while_down} rounds of traffic and {refused} duplicate refusals while it was down"
    );
    stop.store(true, Ordering::Relaxed);
    within("the traffic task", Duration::from_secs(20), traffic)
        .await
        .expect("traffic task")
        .expect("traffic through the surviving replicas");
    assert!(
        rounds_while_down > 0,
        "no traffic flowed while the replica was down"
    );

    cluster.checked_exchange_via(1, 300, 1 << 20).await;
    // The sessions with the surviving replicas were never disturbed.
    for i in [0, 2] {
        let server = &cluster.servers[i];
        assert_eq!(
            server.established_lines().len(),
            sessions_before[i],
            "replica {i} saw a new session"
        );
        let ended = server
            .log()
            .lines()
            .filter(|l| l.contains(EDGE_ENDED) && l.contains(NODE))
            .count();
        assert_eq!(ended, 0, "replica {i} lost its session:\n{}", server.log());
    }
    assert!(cluster.edge.running(), "the edge process exited");
}

/// Sessions the surviving replicas (0 and 2) refused because the edge already held them.
async fn duplicates_refused(cluster: &HaCluster) -> u64 {
    let mut total = 0.0;
    for i in [0, 2] {
        let (_, text) = admin_get(cluster.servers[i].addrs.admin, "/metrics")
            .await
            .expect("GET /metrics");
        total += metric(
            &text,
            r#"tether_edge_handshakes_total{result="unconfirmed"}"#,
        )
        .unwrap_or(0.0);
    }
    total as u64
}
