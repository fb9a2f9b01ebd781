//! Stock Konnectivity agents attached to Tether (issue 3): a Rust stand-in for `proxy-agent`
//! ([`super::agent`]) speaks `/AgentService/Connect` over real TLS to the in-process server;
//! CONNECT and `Proxy` dials are routed to it by the addresses its certificate allows.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use protocol::konnectivity::{DialRequest, Packet};
use protocol::NodeName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::agent::{StockAgent, HOLD_PORT};
use super::client::{status_of, tunnel, STEP};
use super::setup::{Rig, RigOptions, GOODBYE, NODE, NODE_IP};
use super::{echo_checked, fetch_healthz, ping, seeded, within};

/// The agent's node (its certificate's common name).
pub(super) const AGENT_NODE: &str = "agent-k";
/// The agent's node IP (TEST-NET-1; the agent dials everything at 127.0.0.1).
pub(super) const AGENT_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 30));
/// gRPC `PERMISSION_DENIED`.
const PERMISSION_DENIED: u32 = 7;

fn agent_options(extra_ports: Vec<u16>) -> RigOptions {
    RigOptions {
        connect_socket: true,
        agents: true,
        extra_ports,
        ..RigOptions::default()
    }
}

pub(super) async fn attach(rig: &Rig) -> StockAgent {
    let identifiers = format!("host={AGENT_NODE}&ipv4={AGENT_IP}");
    StockAgent::attach(rig, AGENT_NODE, &[AGENT_IP], "agent-1", &identifiers)
        .await
        .expect("the agent attaches")
}

pub(super) fn agent_target(port: u16) -> String {
    format!("{AGENT_IP}:{port}")
}

pub(super) fn metric_line(rig: &Rig, line: &str) -> bool {
    rig.server
        .shared
        .metrics
        .render()
        .lines()
        .any(|l| l == line)
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// A target that writes up to 512 MiB to every connection, as fast as it is read.
pub(super) async fn start_firehose() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk = vec![0xa5u8; 256 << 10];
                for _ in 0..2048 {
                    if socket.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_agent_serves_connect_and_proxy_dials_by_its_ipv4_identifier() {
    let refused_port = closed_port().await;
    let rig = Rig::start_with(agent_options(vec![refused_port])).await;
    let agent = attach(&rig).await;
    assert_eq!(agent.server_id, rig.server.shared.replica.id);
    assert_eq!(agent.server_count, "1");
    let node = NodeName::parse(AGENT_NODE).unwrap();
    let routed = rig.server.shared.routes.get(&node).expect("agent routed");
    assert_eq!(routed.kind(), "agent");

    // CONNECT frontend → agent → echo: 8 MiB each way, checksummed.
    let len = 8 << 20;
    let payload = seeded(11, len);
    let sent = Sha256::digest(&payload);
    let socket = within(
        "CONNECT through the agent",
        tunnel_server::client::connect_unix(&rig.connect_socket(), &agent_target(rig.echo.port())),
    )
    .await
    .expect("CONNECT to the agent's ipv4");
    let (mut rd, mut wr) = socket.into_split();
    let write = async {
        wr.write_all(&payload).await.unwrap();
    };
    let read = async {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < len {
            let n = rd.read(&mut buf).await.unwrap();
            assert!(n > 0, "EOF after {got} of {len} echoed bytes");
            hash.update(&buf[..n]);
            got += n;
        }
        hash.finalize()
    };
    let ((), received) = within("8 MiB echo through the agent", async {
        tokio::join!(write, read)
    })
    .await;
    assert_eq!(received, sent, "echoed bytes differ");
    // Our EOF closes the connection at the agent (CLOSE_REQ); its CLOSE_RSP becomes EOF here.
    wr.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("EOF after CLOSE_REQ", rd.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty(), "{} bytes after the echo", rest.len());

    // Proxy frontend → agent → echo, checksummed, CLOSE_REQ → CLOSE_RSP.
    let conn = rig.connect_unix().await;
    let mut stream = conn.open().await.unwrap();
    let id = stream
        .dial(&agent_target(rig.echo.port()), 21)
        .await
        .unwrap()
        .expect("Proxy dial to the agent's ipv4");
    echo_checked(stream, id, seeded(12, 2 << 20), 64 << 10).await;

    // The target closing first: its last bytes, then CLOSE_RSP unasked.
    let mut stream = conn.open().await.unwrap();
    let id = stream
        .dial(&agent_target(rig.closer.port()), 24)
        .await
        .unwrap()
        .expect("dial the closing target");
    let mut got = Vec::new();
    loop {
        match stream.recv().await.unwrap() {
            Some(Packet::Data { data, .. }) => got.extend_from_slice(&data),
            Some(Packet::CloseResponse { connect_id, error }) => {
                assert_eq!((connect_id, error), (id, None));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, GOODBYE);

    // TLS end to end to the kubelet through the agent, dialed by the agent's node name.
    let mut stream = conn.open().await.unwrap();
    let id = stream
        .dial(&format!("{AGENT_NODE}:{}", rig.kubelet.addr.port()), 22)
        .await
        .unwrap()
        .expect("Proxy dial to the agent's node name");
    let tunnel = tunnel(stream, id);
    let (status, body) = tunnel_server::client::https_get(
        tunnel.io,
        rig.kubelet_tls.clone(),
        &NODE_IP.to_string(),
        "/healthz",
    )
    .await
    .expect("GET /healthz through the agent");
    assert_eq!((status, body.trim()), (200, "ok"));

    // The agent's own dial error comes back as the DIAL_RSP error text.
    let mut stream = conn.open().await.unwrap();
    let error = stream
        .dial(&agent_target(refused_port), 23)
        .await
        .unwrap()
        .expect_err("nothing listens there");
    assert!(
        error.contains("agent: dial tcp") && error.contains(AGENT_NODE),
        "{error}"
    );

    assert!(metric_line(
        &rig,
        r#"tether_dials_total{frontend="connect",result="ok"} 1"#
    ));
    assert!(metric_line(&rig, "tether_agents_connected 1"));
    assert!(metric_line(
        &rig,
        r#"tether_agent_sessions_total{result="ok"} 1"#
    ));
    assert!(metric_line(
        &rig,
        r#"tether_dials_total{frontend="konnectivity",result="refused"} 1"#
    ));
    assert!(agent.seen.dials.load(Ordering::Relaxed) >= 4);
    // Every connection was closed: nothing open on the server or in the agent's mux.
    let deadline = Instant::now() + STEP;
    while rig.server.shared.metrics.streams_open.get() != 0 || routed.open_streams() != 0 {
        assert!(Instant::now() < deadline, "streams left open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for frontend in ["connect", "konnectivity"] {
        for gauge in ["streams_open", "dials_pending"] {
            let line = format!(r#"tether_frontend_{gauge}{{frontend="{frontend}"}} 0"#);
            assert!(metric_line(&rig, &line), "{line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_claiming_an_address_its_certificate_lacks_is_refused() {
    let rig = Rig::start_with(agent_options(vec![])).await;
    let refused = |result: anyhow::Result<StockAgent>, text: &str| {
        let error = result.err().expect("the agent must be refused");
        let status = status_of(&error).unwrap_or_else(|| panic!("not a gRPC status: {error:#}"));
        assert_eq!(status.code, PERMISSION_DENIED, "{status:?}");
        assert!(status.message.contains(text), "{status:?}");
    };
    // Self-declared: the real edge's IP, which this certificate does not name.
    let claim = format!("host={AGENT_NODE}&ipv4={NODE_IP}");
    refused(
        StockAgent::attach(&rig, AGENT_NODE, &[AGENT_IP], "hijacker", &claim).await,
        "not covered by the agent's certificate",
    );
    // Another node's name, and every address at once.
    refused(
        StockAgent::attach(
            &rig,
            AGENT_NODE,
            &[AGENT_IP],
            "hijacker",
            &format!("host={NODE}"),
        )
        .await,
        "not covered",
    );
    refused(
        StockAgent::attach(
            &rig,
            AGENT_NODE,
            &[AGENT_IP],
            "hijacker",
            "default-route=true",
        )
        .await,
        "default-route",
    );
    // A certificate that names the edge's IP: the address already has an owner.
    refused(
        StockAgent::attach(&rig, "agent-twin", &[NODE_IP], "twin", "").await,
        &format!("already owned by node {NODE}"),
    );

    // The real owner is untouched and still serves.
    let owner = rig
        .server
        .shared
        .routes
        .lookup(&protocol::Host::Ip(NODE_IP));
    assert_eq!(owner.map(|s| s.kind()), Some("tether"));
    assert!(rig
        .server
        .shared
        .routes
        .get(&NodeName::parse(AGENT_NODE).unwrap())
        .is_none());
    let conn = rig.connect_unix().await;
    fetch_healthz(&rig, &conn, 1).await;
    assert!(metric_line(
        &rig,
        r#"tether_agent_sessions_total{result="identifiers"} 3"#
    ));
    assert!(metric_line(
        &rig,
        r#"tether_agent_sessions_total{result="conflict"} 1"#
    ));
    assert!(metric_line(&rig, "tether_agents_connected 0"));
}

/// Send a DIAL_REQ to the agent's never-answering port and wait until the agent has it.
async fn held_dial(
    rig: &Rig,
    agent: &StockAgent,
    stream: &mut super::client::ProxyStream,
    random: i64,
) {
    let before = agent.seen.dials.load(Ordering::Relaxed);
    stream
        .send(&Packet::DialRequest(DialRequest {
            protocol: "tcp".into(),
            address: agent_target(HOLD_PORT),
            random,
        }))
        .await
        .unwrap();
    let deadline = Instant::now() + STEP;
    while agent.seen.dials.load(Ordering::Relaxed) == before {
        assert!(
            Instant::now() < deadline,
            "the dial did not reach the agent"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(rig.server.shared.metrics.dials_pending.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_cls_reaches_the_agent() {
    let rig = Rig::start_with(agent_options(vec![HOLD_PORT])).await;
    let agent = attach(&rig).await;
    let conn = rig.connect_unix().await;
    let mut stream = conn.open().await.unwrap();
    held_dial(&rig, &agent, &mut stream, 41).await;
    stream
        .send(&Packet::CloseDial { random: 41 })
        .await
        .unwrap();
    let deadline = Instant::now() + STEP;
    while agent.seen.dial_cancels.load(Ordering::Relaxed) == 0
        || rig.server.shared.metrics.dials_pending.get() != 0
    {
        assert!(
            Instant::now() < deadline,
            "DIAL_CLS did not reach the agent"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        stream.recv().await.unwrap(),
        None,
        "no DIAL_RSP after DIAL_CLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_loss_fails_its_dials_and_connections_at_once() {
    let rig = Rig::start_with(agent_options(vec![HOLD_PORT])).await;
    let agent = attach(&rig).await;
    let conn = rig.connect_unix().await;
    let mut open = conn.open().await.unwrap();
    let id = open
        .dial(&agent_target(rig.echo.port()), 1)
        .await
        .unwrap()
        .expect("dial echo");
    ping(&mut open, id, b"alive").await;
    let mut pending = conn.open().await.unwrap();
    held_dial(&rig, &agent, &mut pending, 2).await;

    let killed = Instant::now();
    agent.kill();
    match within("the pending dial's answer", pending.recv())
        .await
        .unwrap()
    {
        Some(Packet::DialResponse(r)) => {
            assert_eq!(r.random, 2);
            assert!(r.result.is_err(), "{r:?}");
        }
        other => panic!("expected DIAL_RSP, got {other:?}"),
    }
    match within("the open connection's end", open.recv())
        .await
        .unwrap()
    {
        Some(Packet::CloseResponse { connect_id, error }) => {
            assert_eq!(connect_id, id);
            assert!(error.is_some(), "CLOSE_RSP must carry the failure");
        }
        other => panic!("expected CLOSE_RSP, got {other:?}"),
    }
    let waited = killed.elapsed();
    assert!(
        waited < rig.dial_timeout / 2,
        "agent loss took {waited:?} to fail its dials (dial timeout {:?})",
        rig.dial_timeout
    );
    let node = NodeName::parse(AGENT_NODE).unwrap();
    let deadline = Instant::now() + STEP;
    while rig.server.shared.routes.get(&node).is_some()
        || !metric_line(&rig, "tether_agents_connected 0")
    {
        assert!(Instant::now() < deadline, "the lost agent is still routed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_agent_stream_does_not_displace_the_one_in_use() {
    use tunnel_server::edge::routing::Routable;
    let rig = Rig::start_with(agent_options(vec![])).await;
    let node = NodeName::parse(AGENT_NODE).unwrap();
    let first = attach(&rig).await;
    let current = || rig.server.shared.routes.get(&node).map(|s| s.session_id());
    // Routed as soon as the server has read the call, which can trail the response headers
    // the agent already saw by a moment on a loaded machine.
    let deadline = Instant::now() + STEP;
    let first_id = loop {
        if let Some(id) = current() {
            break id;
        }
        assert!(
            Instant::now() < deadline,
            "the first stream was never routed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };

    // The agent reaches this replica again through the load balancer and, seeing a server ID
    // it already holds, closes the new stream at once (what proxy-agent does).
    let duplicate = attach(&rig).await;
    duplicate.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        current(),
        Some(first_id),
        "the duplicate displaced the stream in use"
    );
    assert_eq!(first.seen.drains.load(Ordering::Relaxed), 0);
    let conn = rig.connect_unix().await;
    let mut stream = conn.open().await.unwrap();
    let id = stream
        .dial(&agent_target(rig.echo.port()), 1)
        .await
        .unwrap()
        .expect("the first stream still serves");
    ping(&mut stream, id, b"still routed").await;
    assert!(metric_line(
        &rig,
        r#"tether_agent_sessions_total{result="unrouted"} 1"#
    ));

    // A new stream that stays open (the agent restarted) takes over after the settle time;
    // the old one is told DRAIN.
    let _second = attach(&rig).await;
    let deadline = Instant::now() + STEP;
    while current() == Some(first_id) || first.seen.drains.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the new stream did not take over"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(current().is_some());
}
