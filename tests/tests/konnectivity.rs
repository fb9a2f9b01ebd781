//! Konnectivity compatibility (issue 3): a client that behaves like kube-apiserver's
//! konnectivity-client talks `/ProxyService/Proxy` to an in-process tunnel-server (Unix socket
//! and mTLS TCP), through a real edge session, to real targets on 127.0.0.1.
//!
//! In-process rather than through the binaries so the tests can read the server's gauges and
//! run a fake edge that never answers (to cancel dials mid-flight).

#[path = "konnectivity/agent.rs"]
mod agent;
#[path = "konnectivity/agent_flow_tests.rs"]
mod agent_flow_tests;
#[path = "konnectivity/agent_tests.rs"]
mod agent_tests;
#[path = "konnectivity/client.rs"]
mod client;
#[path = "konnectivity/goaway.rs"]
mod goaway;
#[path = "konnectivity/grpcio.rs"]
mod grpcio;
#[path = "konnectivity/raw_h2.rs"]
mod raw_h2;
#[path = "konnectivity/setup.rs"]
mod setup;
#[path = "konnectivity/unix_authority.rs"]
mod unix_authority;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use protocol::konnectivity::{DialRequest, Packet, MAX_DATA, MAX_PACKET};
use sha2::{Digest, Sha256};

use client::{status_of, tunnel, GrpcConn, ProxyStream, STEP};
use setup::{FakeEdge, Rig, RigOptions, GOODBYE, NODE_IP};

/// gRPC `INVALID_ARGUMENT`.
const INVALID_ARGUMENT: u32 = 3;

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {STEP:?}"))
}

/// Fetch `/healthz` from the HTTPS kubelet through one `Proxy` stream, TLS end to end.
async fn fetch_healthz(rig: &Rig, conn: &GrpcConn, random: i64) {
    let mut stream = conn.open().await.unwrap();
    let id = stream
        .dial(&rig.target(rig.kubelet.addr.port()), random)
        .await
        .unwrap()
        .expect("dial to the kubelet");
    assert_ne!(id, 0, "connectID 0 means no connection");
    let tunnel = tunnel(stream, id);
    let (status, body) = tunnel_server::client::https_get(
        tunnel.io,
        rig.kubelet_tls.clone(),
        &NODE_IP.to_string(),
        "/healthz",
    )
    .await
    .expect("GET /healthz through the konnectivity tunnel");
    assert_eq!((status, body.trim()), (200, "ok"));
    // Either our CLOSE_REQ is answered or the kubelet closed first and the server said so
    // unasked: both end with CLOSE_RSP.
    let closed = within("close", tunnel.done).await.unwrap().unwrap();
    assert!(closed, "the connection ended without CLOSE_RSP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_over_unix_socket_fetches_https_from_kubelet() {
    let rig = Rig::start().await;
    let mode = std::fs::metadata(rig.unix_socket()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    let conn = rig.connect_unix().await;
    fetch_healthz(&rig, &conn, 42).await;
    // A second connection reuses nothing of the first.
    fetch_healthz(&rig, &conn, 43).await;
    let metrics = rig.server.shared.metrics.render();
    assert!(
        metrics.contains(r#"tether_dials_total{frontend="konnectivity",result="ok"} 2"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_over_mtls_tcp_fetches_https_from_kubelet() {
    let rig = Rig::start().await;
    let conn = rig.connect_tls().await;
    fetch_healthz(&rig, &conn, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_frontend_refuses_a_client_without_certificate() {
    let rig = Rig::start().await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in tunnel_io::tls::load_certs(&rig.layout.ca_cert()).unwrap() {
        roots.add(cert).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(tunnel_io::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let attempt = async {
        let stream = rig.tls_stream(std::sync::Arc::new(tls)).await?;
        let conn = GrpcConn::handshake(stream).await?;
        let mut stream = conn.open().await?;
        stream.dial(&rig.target(rig.kubelet.addr.port()), 1).await
    };
    let result = within("refused client", attempt).await;
    assert!(
        result.is_err(),
        "a client without certificate got {result:?}"
    );
}

/// Send `payload` on a dialed echo connection in DATA packets of `packet` bytes, read the echo
/// back, compare checksums, then CLOSE_REQ → CLOSE_RSP.
async fn echo_checked(mut stream: ProxyStream, id: i64, payload: Vec<u8>, packet: usize) {
    let sent = Sha256::digest(&payload);
    let len = payload.len();
    let (sender, receiver) = stream_halves(&mut stream);
    let send = async {
        let payload = Bytes::from(payload);
        let mut offset = 0;
        while offset < len {
            let end = (offset + packet).min(len);
            sender
                .send(&Packet::Data {
                    connect_id: id,
                    data: payload.slice(offset..end),
                    error: None,
                })
                .await
                .unwrap();
            offset = end;
        }
    };
    let receive = async {
        let mut hash = Sha256::new();
        let mut got = 0;
        while got < len {
            match receiver.recv().await.unwrap() {
                Some(Packet::Data {
                    connect_id, data, ..
                }) => {
                    assert_eq!(connect_id, id);
                    got += data.len();
                    hash.update(&data);
                }
                other => panic!("expected DATA, got {other:?}"),
            }
        }
        assert_eq!(got, len, "echo longer than what was sent");
        hash.finalize()
    };
    let ((), received) = tokio::join!(send, receive);
    assert_eq!(received, sent, "echoed bytes differ");
    sender
        .send(&Packet::CloseRequest { connect_id: id })
        .await
        .unwrap();
    assert_eq!(
        receiver.recv().await.unwrap(),
        Some(Packet::CloseResponse {
            connect_id: id,
            error: None
        })
    );
    assert_eq!(receiver.recv().await.unwrap(), None, "stream should end OK");
}

fn stream_halves(stream: &mut ProxyStream) -> (&mut client::Sender, &mut client::Receiver) {
    (&mut stream.sender, &mut stream.receiver)
}

fn seeded(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_concurrent_streams_on_one_connection_arrive_whole() {
    hundred_concurrent_streams(Rig::start().await).await;
}

/// Over a QUIC edge session, where the server carries each stream on a QUIC stream directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_hundred_concurrent_streams_on_one_connection_arrive_whole() {
    hundred_concurrent_streams(quic_rig().await).await;
}

async fn quic_rig() -> Rig {
    Rig::start_with(RigOptions {
        transport: Some("quic"),
        ..RigOptions::default()
    })
    .await
}

async fn hundred_concurrent_streams(rig: Rig) {
    let conn = rig.connect_unix().await;
    let target = rig.target(rig.echo.port());
    let mut tasks = Vec::new();
    for i in 0..100u64 {
        let conn = conn.clone();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let mut stream = conn.open().await.unwrap();
            let id = stream
                .dial(&target, 1000 + i as i64)
                .await
                .unwrap()
                .expect("dial echo");
            let len = 32 * 1024 + i as usize * 997;
            echo_checked(stream, id, seeded(i, len), 16 * 1024).await;
            id
        }));
    }
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(within("a checksummed stream", task).await.unwrap());
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 100, "connectIDs must be unique");
    // Every stream was closed: nothing is left open on the server.
    let deadline = Instant::now() + STEP;
    while rig.server.shared.metrics.streams_open.get() != 0 {
        assert!(Instant::now() < deadline, "streams left open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_packet_of_4_mib_is_accepted() {
    let rig = Rig::start().await;
    let conn = rig.connect_tls().await;
    let mut stream = conn.open().await.unwrap();
    let id = stream
        .dial(&rig.target(rig.echo.port()), 5)
        .await
        .unwrap()
        .unwrap();
    echo_checked(stream, id, seeded(7, MAX_DATA), MAX_DATA).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_closing_first_gets_close_rsp_unasked() {
    target_closing_first(Rig::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_target_closing_first_gets_close_rsp_unasked() {
    target_closing_first(quic_rig().await).await;
}

async fn target_closing_first(rig: Rig) {
    let conn = rig.connect_unix().await;
    let mut stream = conn.open().await.unwrap();
    let id = stream
        .dial(&rig.target(rig.closer.port()), 3)
        .await
        .unwrap()
        .unwrap();
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
    assert_eq!(stream.recv().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_address_gets_an_error_text() {
    let rig = Rig::start().await;
    let conn = rig.connect_unix().await;
    let port = rig.kubelet.addr.port();
    // The same words the CONNECT frontend puts in its status line.
    let no_edge = format!("no edge connected for 192.0.2.99:{port}");
    let cases = [
        (format!("192.0.2.99:{port}"), no_edge.as_str()),
        (format!("{NODE_IP}:22"), "refused"),
        ("not an address".to_string(), "bad address"),
    ];
    for (i, (address, expected)) in cases.iter().enumerate() {
        let mut stream = conn.open().await.unwrap();
        let error = stream
            .dial(address, i as i64)
            .await
            .unwrap()
            .expect_err("dial must fail");
        assert!(error.contains(expected), "{address}: {error}");
        assert_eq!(
            stream.recv().await.unwrap(),
            None,
            "stream ends after the error"
        );
    }
    let mut stream = conn.open().await.unwrap();
    stream
        .send(&Packet::DialRequest(DialRequest {
            protocol: "udp".into(),
            address: rig.target(port),
            random: 9,
        }))
        .await
        .unwrap();
    match stream.recv().await.unwrap() {
        Some(Packet::DialResponse(r)) => {
            assert!(r.result.unwrap_err().contains("unsupported protocol"))
        }
        other => panic!("{other:?}"),
    }
    // The connection still serves a good dial.
    fetch_healthz(&rig, &conn, 77).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dial_cls_cancels_a_pending_dial_at_the_edge() {
    let rig = Rig::start().await;
    let fake_ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 20));
    let mut fake = FakeEdge::start(&rig, "fake-k", fake_ip).await;
    let conn = rig.connect_unix().await;
    let mut stream = conn.open().await.unwrap();
    stream
        .send(&Packet::DialRequest(DialRequest {
            protocol: "tcp".into(),
            address: format!("{fake_ip}:{}", rig.kubelet.addr.port()),
            random: 31,
        }))
        .await
        .unwrap();
    let mut pending = within("dial reaching the fake edge", fake.dials.recv())
        .await
        .expect("fake edge got the dial");
    assert_eq!(rig.server.shared.metrics.dials_pending.get(), 1);
    stream
        .send(&Packet::CloseDial { random: 31 })
        .await
        .unwrap();
    // The edge's stream is reset: it knows to drop a socket that connects late.
    let reason = within(
        "reset at the edge",
        std::future::poll_fn(|cx| pending.poll_reset(cx)),
    )
    .await
    .unwrap();
    assert_eq!(reason, h2::Reason::CANCEL);
    assert_eq!(
        stream.recv().await.unwrap(),
        None,
        "no DIAL_RSP after DIAL_CLS"
    );
    let deadline = Instant::now() + STEP;
    while rig.server.shared.metrics.dials_pending.get() != 0 {
        assert!(Instant::now() < deadline, "pending-dial gauge stuck");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let metrics = rig.server.shared.metrics.render();
    assert!(
        metrics
            .contains(r#"tether_dials_total{frontend="konnectivity",result="client_cancelled"} 1"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_loss_mid_dial_fails_the_dial_at_once() {
    let rig = Rig::start().await;
    let fake_ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 21));
    let mut fake = FakeEdge::start(&rig, "fake-loss", fake_ip).await;
    let conn = rig.connect_unix().await;
    let mut stream = conn.open().await.unwrap();
    stream
        .send(&Packet::DialRequest(DialRequest {
            protocol: "tcp".into(),
            address: format!("{fake_ip}:{}", rig.kubelet.addr.port()),
            random: 5,
        }))
        .await
        .unwrap();
    let _pending = within("dial reaching the fake edge", fake.dials.recv()).await;
    let killed = Instant::now();
    fake.kill.cancel();
    match stream.recv().await.unwrap() {
        Some(Packet::DialResponse(r)) => {
            assert_eq!(r.random, 5);
            let error = r.result.expect_err("dial must fail");
            assert!(!error.is_empty());
        }
        other => panic!("expected DIAL_RSP, got {other:?}"),
    }
    let waited = killed.elapsed();
    assert!(
        waited < rig.dial_timeout / 2,
        "edge loss took {waited:?} to fail the dial (dial timeout {:?})",
        rig.dial_timeout
    );
}

/// Send `text` on an echo connection and read it back.
async fn ping(stream: &mut ProxyStream, id: i64, text: &'static [u8]) {
    stream
        .send(&Packet::Data {
            connect_id: id,
            data: Bytes::from_static(text),
            error: None,
        })
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < text.len() {
        match stream.recv().await.unwrap() {
            Some(Packet::Data { data, .. }) => got.extend_from_slice(&data),
            other => panic!("healthy stream got {other:?}"),
        }
    }
    assert_eq!(got, text);
}

/// TESTPLAN 6 on the gRPC side: a stream whose reader stopped (its echo piles up) does not
/// slow down another stream on the same gRPC connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_does_not_block_other_streams() {
    let rig = Rig::start().await;
    let conn = rig.connect_unix().await;
    let echo = rig.target(rig.echo.port());
    let mut stalled = conn.open().await.unwrap();
    let stalled_id = stalled.dial(&echo, 1).await.unwrap().unwrap();
    let (mut stalled_tx, _stalled_rx_never_read) = stalled.split();
    // 256 MiB that will never be read back, far more than every window and socket buffer on
    // the path together: the echo blocks once they are full, so the flood cannot finish.
    let flood = tokio::spawn(async move {
        let chunk = Bytes::from(vec![0x5a; 256 << 10]);
        for _ in 0..1024 {
            let packet = Packet::Data {
                connect_id: stalled_id,
                data: chunk.clone(),
                error: None,
            };
            if stalled_tx.send(&packet).await.is_err() {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !flood.is_finished(),
        "the flood should be held back by flow control"
    );

    let mut lively = conn.open().await.unwrap();
    let lively_id = lively.dial(&echo, 2).await.unwrap().unwrap();
    let started = Instant::now();
    for _ in 0..50 {
        ping(&mut lively, lively_id, b"still here").await;
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "50 round trips took {took:?}"
    );
    flood.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testplan_10_malformed_packets_close_only_their_stream() {
    let rig = Rig::start().await;
    let conn = rig.connect_unix().await;
    let echo = rig.target(rig.echo.port());

    // A healthy connection that must survive everything below.
    let mut healthy = conn.open().await.unwrap();
    let healthy_id = healthy.dial(&echo, 1).await.unwrap().unwrap();
    ping(&mut healthy, healthy_id, b"before").await;

    let expect_status = |result: anyhow::Result<Option<Packet>>, code: u32, text: &str| {
        let error = result.expect_err("the stream must fail");
        let status = status_of(&error).unwrap_or_else(|| panic!("not a gRPC status: {error:#}"));
        assert_eq!(status.code, code, "{status:?}");
        assert!(status.message.contains(text), "{status:?}");
    };

    // DATA before any DIAL_REQ.
    let mut s = conn.open().await.unwrap();
    s.send(&Packet::Data {
        connect_id: 1,
        data: Bytes::from_static(b"x"),
        error: None,
    })
    .await
    .unwrap();
    expect_status(s.recv().await, INVALID_ARGUMENT, "expected DIAL_REQ");

    // Bytes that are not a Packet.
    let mut s = conn.open().await.unwrap();
    s.send_raw(Bytes::from_static(&[0x12, 0x64, 0x01]))
        .await
        .unwrap();
    expect_status(s.recv().await, INVALID_ARGUMENT, "malformed packet");

    // DATA for a connectID this stream does not own (the healthy stream's, even).
    let mut s = conn.open().await.unwrap();
    let id = s.dial(&echo, 2).await.unwrap().unwrap();
    s.send(&Packet::Data {
        connect_id: healthy_id,
        data: Bytes::from_static(b"hijack"),
        error: None,
    })
    .await
    .unwrap();
    expect_status(s.recv().await, INVALID_ARGUMENT, "unknown connectID");
    assert_ne!(id, healthy_id);

    // DATA payload one byte over the limit.
    let mut s = conn.open().await.unwrap();
    let id = s.dial(&echo, 3).await.unwrap().unwrap();
    s.send(&Packet::Data {
        connect_id: id,
        data: Bytes::from(vec![0u8; MAX_DATA + 1]),
        error: None,
    })
    .await
    .unwrap();
    expect_status(s.recv().await, INVALID_ARGUMENT, "Data.data");

    // A message over the gRPC decoding limit: refused from its length prefix.
    let mut s = conn.open().await.unwrap();
    let _ = s.dial(&echo, 4).await.unwrap().unwrap();
    let _ = s.send_raw(Bytes::from(vec![0u8; MAX_PACKET + 1])).await;
    expect_status(s.recv().await, INVALID_ARGUMENT, "too large");

    // The healthy stream and the connection are unaffected.
    ping(&mut healthy, healthy_id, b"after").await;
    fetch_healthz(&rig, &conn, 99).await;
    let metrics = rig.server.shared.metrics.render();
    assert!(
        metrics.contains(r#"tether_dials_total{frontend="konnectivity",result="bad_request"} 2"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_without_dial_req_times_out() {
    let rig = Rig::start().await;
    let conn = rig.connect_unix().await;
    let mut s = conn.open().await.unwrap();
    // Headers only: the server gives up after `first_packet_timeout` (2 s here).
    let started = Instant::now();
    let error = s.recv().await.expect_err("must time out");
    let status = status_of(&error).expect("gRPC status");
    assert_eq!(status.code, 4, "{status:?}"); // DEADLINE_EXCEEDED
    assert!(started.elapsed() < STEP);
}

/// Every EgressSelectorConfiguration under deploy/egress names the `cluster` selection and a
/// complete transport for its protocol (the files README points kube-apiserver at).
#[test]
fn egress_selector_examples_are_complete() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/egress");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let keys = yaml_paths(&text);
        let get = |key: &str| keys.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
        let name = path.display();
        assert_eq!(
            get("apiVersion"),
            Some("apiserver.k8s.io/v1beta1"),
            "{name}"
        );
        assert_eq!(get("kind"), Some("EgressSelectorConfiguration"), "{name}");
        assert_eq!(get("egressSelections[].name"), Some("cluster"), "{name}");
        let protocol = get("egressSelections[].connection.proxyProtocol");
        let uds = get("egressSelections[].connection.transport.uds.udsName");
        let tcp = get("egressSelections[].connection.transport.tcp.url");
        match protocol {
            Some("GRPC") => assert!(uds.is_some_and(|p| p.starts_with('/')), "{name}"),
            Some("HTTPConnect") => {
                assert!(
                    uds.is_some() != tcp.is_some(),
                    "{name}: exactly one transport"
                );
                if let Some(url) = tcp {
                    assert!(url.starts_with("https://"), "{name}");
                    for key in ["caBundle", "clientCert", "clientKey"] {
                        let full =
                            format!("egressSelections[].connection.transport.tcp.tlsConfig.{key}");
                        assert!(get(&full).is_some(), "{name}: {key} (mTLS is mandatory)");
                    }
                }
            }
            other => panic!("{name}: proxyProtocol {other:?}"),
        }
        seen.push(protocol.unwrap().to_string());
    }
    seen.sort();
    assert_eq!(
        seen,
        ["GRPC", "HTTPConnect", "HTTPConnect"],
        "expected files missing"
    );
}

/// `key.path` → scalar value of a small block-style YAML document (maps, `- ` list items,
/// scalars; comments ignored). Enough for EgressSelectorConfiguration; not a YAML parser.
fn yaml_paths(text: &str) -> Vec<(String, String)> {
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut out = Vec::new();
    for raw in text.lines() {
        let line = raw.split(" #").next().unwrap_or("");
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let mut indent = line.len() - line.trim_start().len();
        let mut body = line.trim_start();
        if let Some(rest) = body.strip_prefix("- ") {
            // A list item: mark its parent as a list and treat the rest as a map entry.
            while stack.last().is_some_and(|(i, _)| *i >= indent) {
                stack.pop();
            }
            if let Some((_, parent)) = stack.last_mut() {
                if !parent.ends_with("[]") {
                    parent.push_str("[]");
                }
            }
            indent += 2;
            body = rest;
        }
        let (key, value) = body.split_once(':').expect("key: value");
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        let path: Vec<&str> = stack.iter().map(|(_, k)| k.as_str()).collect();
        let mut full = path.join(".");
        if !full.is_empty() {
            full.push('.');
        }
        full.push_str(key.trim());
        let value = value.trim();
        if value.is_empty() {
            stack.push((indent, key.trim().to_string()));
        } else {
            out.push((full, value.trim_matches('"').to_string()));
        }
    }
    out
}
