//! Refusals, each with the right status and a reason the operator can act on: unknown node,
//! the server's policy, the edge's own allowlist, malformed requests, and clients or edges
//! whose certificates the server must not accept.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use tether_tests::edge::Transport;
use tether_tests::frontend::{connect_answer, curl, curl_proxy_args, read_answer, tls_to, Answer};
use tether_tests::targets::EchoServer;
use tether_tests::{
    poll_until, within, Cluster, ClusterOptions, EdgeOptions, EdgeProc, NODE_IP, UNKNOWN_NODE_IP,
};
use tokio::io::AsyncWriteExt;

/// CONNECT `target` through the mTLS frontend and return the answer, whatever its status.
async fn answer_to(cluster: &Cluster, target: &str) -> Answer {
    let mut tls = tls_to(
        cluster.server.addrs.connect_tcp,
        cluster.pki.frontend_client_tls(),
    )
    .await
    .expect("TLS to the mTLS frontend");
    within(
        "the CONNECT answer",
        Duration::from_secs(10),
        connect_answer(&mut tls, target),
    )
    .await
    .expect("read the CONNECT answer")
}

/// The kubelet answers through the tunnel: the control that makes a refusal meaningful.
async fn assert_kubelet_reachable(cluster: &Cluster) {
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
    .expect("GET /healthz");
    assert_eq!((status, body.as_str()), (200, "ok"));
}

#[tokio::test]
async fn unknown_node_gets_502_naming_the_target_within_one_second() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let target = format!("{UNKNOWN_NODE_IP}:{}", cluster.kubelet.addr.port());
    let started = Instant::now();
    let answer = answer_to(&cluster, &target).await;
    let elapsed = started.elapsed();
    assert_eq!(answer.status, 502, "{answer:?}");
    assert!(
        answer.body.contains(&target),
        "the reason should name {target}: {:?}",
        answer.body
    );
    assert!(elapsed < Duration::from_secs(1), "502 took {elapsed:?}");
    // kube-apiserver drops the body and shows only the status line: the reason is there too.
    let status_line = answer.head.lines().next().unwrap_or_default();
    assert_eq!(
        status_line,
        format!("HTTP/1.1 502 no edge connected for {target}"),
        "{answer:?}"
    );
    assert_kubelet_reachable(&cluster).await;
}

/// curl, like kube-apiserver, reports a failed CONNECT by its status line: the reason must
/// be in it, not only in the body curl never shows.
#[tokio::test]
async fn curl_sees_the_reason_in_the_connect_status_line() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let port = cluster.kubelet.addr.port();
    let proxy = curl_proxy_args(cluster.server.addrs.connect_tcp, &cluster.pki);
    let cases = [
        (
            format!("{UNKNOWN_NODE_IP}:{port}"),
            format!("502 no edge connected for {UNKNOWN_NODE_IP}:{port}"),
        ),
        (
            format!("{NODE_IP}:22"),
            format!("403 target {NODE_IP}:22 refused: "),
        ),
    ];
    for (target, expected) in cases {
        let url = format!("https://{target}/healthz");
        let mut args: Vec<&str> = proxy.iter().map(String::as_str).collect();
        args.extend(["--verbose", "--write-out", "%{http_connect}", &url]);
        let out = curl(&args).await;
        assert_ne!(out.code, 0, "curl {url} succeeded: {}", out.stdout);
        assert_eq!(
            out.stdout,
            &expected[..3],
            "curl's %{{http_connect}} for {url}"
        );
        assert!(
            out.stderr.contains(&format!("< HTTP/1.1 {expected}")),
            "curl {url} should show the reason in the status line:\n{}",
            out.stderr
        );
    }
}

#[tokio::test]
async fn testplan_16_port_outside_server_policy_gets_403_without_reaching_the_edge() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let target = format!("{NODE_IP}:22");
    let answer = answer_to(&cluster, &target).await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(
        answer.body.contains(&target),
        "the reason should name {target}: {:?}",
        answer.body
    );
    assert!(
        !answer.body.contains("refused by edge"),
        "the server itself must refuse: {:?}",
        answer.body
    );
    let edge_log = cluster.edge.log();
    assert!(
        !mentions(&edge_log, &target),
        "the edge saw a stream for {target}:\n{edge_log}"
    );
    assert_kubelet_reachable(&cluster).await;
}

/// Whether `log` names `target` exactly (not as the prefix of a longer port).
fn mentions(log: &str, target: &str) -> bool {
    log.match_indices(target).any(|(i, _)| {
        !log[i + target.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

#[tokio::test]
async fn testplan_16_port_refused_by_edge_allowlist_carries_the_edge_reason() {
    refused_by_edge_allowlist(Transport::Tcp).await;
}

#[tokio::test]
async fn quic_testplan_16_port_refused_by_edge_allowlist_carries_the_edge_reason() {
    refused_by_edge_allowlist(Transport::Quic).await;
}

async fn refused_by_edge_allowlist(transport: Transport) {
    // A listening port the server's policy allows but the edge's allowlist does not: only
    // the edge stands between the cloud side and this port.
    let unlisted = EchoServer::start().await;
    let cluster = Cluster::start(ClusterOptions {
        allow_server_only: vec![unlisted.addr.port()],
        ..ClusterOptions::over(transport)
    })
    .await;
    let target = cluster.target(unlisted.addr.port());
    let answer = answer_to(&cluster, &target).await;
    // The edge answers the stream with its policy refusal (403 on the session); the server
    // keeps 403 for its own policy and answers 502 (the node refused) with the edge's reason.
    assert_eq!(answer.status, 502, "{answer:?}");
    assert!(answer.body.contains("refused by edge"), "{:?}", answer.body);
    assert!(
        answer.body.contains("edge allowlist"),
        "the edge's reason should be relayed: {:?}",
        answer.body
    );
    assert!(
        answer.body.contains(&unlisted.addr.port().to_string()),
        "{:?}",
        answer.body
    );
    poll_until(
        "the edge's audit line",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            std::future::ready(
                cluster
                    .edge
                    .log()
                    .contains("edge refused dial")
                    .then_some(()),
            )
        },
    )
    .await;
}

#[tokio::test]
async fn non_connect_method_gets_405() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let mut tls = tls_to(
        cluster.server.addrs.connect_tcp,
        cluster.pki.frontend_client_tls(),
    )
    .await
    .expect("TLS to the mTLS frontend");
    let request = format!(
        "GET http://{}/healthz HTTP/1.1\r\nHost: {NODE_IP}\r\n\r\n",
        cluster.target(cluster.kubelet.addr.port())
    );
    tls.write_all(request.as_bytes()).await.expect("send GET");
    let answer = within(
        "the 405",
        Duration::from_secs(10),
        read_answer(&mut tls, false),
    )
    .await
    .expect("read the answer");
    assert_eq!(answer.status, 405, "{answer:?}");
    assert_eq!(answer.header("allow"), Some("CONNECT"), "{}", answer.head);
}

#[tokio::test]
async fn testplan_11_oversized_connect_head_gets_431() {
    const MAX_HEAD: usize = 4096;
    let cluster = Cluster::start(ClusterOptions {
        max_head_bytes: Some(MAX_HEAD),
        ..ClusterOptions::default()
    })
    .await;
    let mut tls = tls_to(
        cluster.server.addrs.connect_tcp,
        cluster.pki.frontend_client_tls(),
    )
    .await
    .expect("TLS to the mTLS frontend");
    // Exactly the limit and no end of head in sight: the server has read everything we sent
    // when it answers, so its close cannot turn into a reset that eats the answer.
    let mut head = format!(
        "CONNECT {} HTTP/1.1\r\nHost: {NODE_IP}\r\nX-Padding: ",
        cluster.target(cluster.kubelet.addr.port())
    )
    .into_bytes();
    head.resize(MAX_HEAD, b'a');
    tls.write_all(&head).await.expect("send the head");
    tls.flush().await.expect("flush");
    let answer = within(
        "the 431",
        Duration::from_secs(10),
        read_answer(&mut tls, false),
    )
    .await
    .expect("read the answer");
    assert_eq!(answer.status, 431, "{answer:?}");
}

#[tokio::test]
async fn mtls_frontend_refuses_clients_without_a_frontend_ca_certificate() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let target = cluster.target(cluster.kubelet.addr.port());
    let proxy = cluster.server.addrs.connect_tcp;
    let cases = [
        (
            "no client certificate",
            cluster.pki.frontend_tls_without_cert(),
            "CertificateRequired",
        ),
        (
            // An edge certificate comes from the tunnel CA, not the frontend CA: an edge must
            // never be able to use the apiserver's path.
            "an edge certificate",
            cluster
                .pki
                .frontend_tls_with(&cluster.edge_files.cert, &cluster.edge_files.key),
            "UnknownCA",
        ),
    ];
    for (case, tls, alert) in cases {
        let result = within(
            case,
            Duration::from_secs(10),
            tunnel_server::client::connect_tls(proxy, tls, &target),
        )
        .await;
        let error = match result {
            Ok(_) => panic!("{case}: the frontend established a tunnel"),
            Err(e) => format!("{e:#}"),
        };
        // TLS 1.3: the client finishes its handshake first and learns of the refusal from
        // the server's alert on its first read.
        assert!(
            error.contains(&format!("fatal alert: {alert}")),
            "{case}: expected alert {alert}, got: {error}"
        );
    }
    poll_until(
        "two refused frontend handshakes in the server log",
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            let refused = cluster
                .server
                .log()
                .matches("connect frontend: TLS handshake refused")
                .count();
            std::future::ready((refused >= 2).then_some(()))
        },
    )
    .await;
    assert_kubelet_reachable(&cluster).await;
}

#[tokio::test]
async fn edge_with_foreign_ca_certificate_never_gets_a_session() {
    const FOREIGN_NODE: &str = "edge-f";
    const FOREIGN_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20));
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let port = cluster.kubelet.addr.port();
    // Same CA name as the real one, different key: only the signature tells them apart.
    let files = cluster.pki.issue_foreign_edge(FOREIGN_NODE, &[FOREIGN_IP]);
    let mut foreign = EdgeProc::start(
        &cluster.pki,
        cluster.server.addrs.edge,
        &EdgeOptions {
            files,
            allow_ports: vec![port],
        },
    );
    // Refused at least twice: the first attempt and a retry after backoff.
    poll_until(
        "the server to refuse the foreign edge twice",
        Duration::from_secs(15),
        Duration::from_millis(20),
        || {
            let log = cluster.server.log();
            let refused = log
                .lines()
                .filter(|l| {
                    l.contains("edge session refused") && l.contains("TLS handshake failed")
                })
                .count();
            std::future::ready((refused >= 2).then_some(()))
        },
    )
    .await;
    assert!(foreign.running(), "the foreign edge should keep retrying");
    let server_log = cluster.server.log();
    assert!(
        !server_log.lines().any(
            |l| l.contains(tether_tests::server::EDGE_ESTABLISHED) && l.contains(FOREIGN_NODE)
        ),
        "the foreign edge got a session:\n{server_log}"
    );
    let answer = answer_to(&cluster, &format!("{FOREIGN_IP}:{port}")).await;
    assert_eq!(answer.status, 502, "{answer:?}");
    assert!(answer.body.contains("no edge"), "{:?}", answer.body);
    assert_kubelet_reachable(&cluster).await;
}
