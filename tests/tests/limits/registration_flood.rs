//! Registration slot exhaustion (issue 11 point 2): TLS connections that never send a byte
//! once used to hold every registration slot indefinitely, so joins timed out and renewals
//! (same listener) could not happen. Now: a per-source cap, an idle deadline, idle
//! connections evicted when the join pool is full, and renewals in a pool of their own.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether_tests::flood::{self, source};
use tether_tests::registration::{RegistrationOptions, RegistrationServer};
use tether_tests::{within, Pki};
use tunnel_io::registration::pb::{Credentials, JoinRequest, RenewRequest};

const NODE: &str = "flood-victim";
const NODE_IP: &str = "192.0.2.10";
/// `registration.max_connections_per_source` in this test.
const PER_SOURCE: usize = 4;
/// `registration.max_connections` (the join pool) in this test.
const JOIN_POOL: usize = 16;
/// `registration.idle_timeout` in this test.
const IDLE: Duration = Duration::from_secs(3);

/// A TLS client for the registration API without a certificate (a would-be joiner).
fn anonymous_tls(pki: &Pki) -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(tunnel_io::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(
            tunnel_io::tls::load_roots(&pki.layout.ca_cert()).expect("tunnel CA"),
        )
        .with_no_client_auth();
    config.alpn_protocols = vec![tunnel_io::registration::ALPN_REGISTRATION.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

async fn join(pki: &Pki, server: &RegistrationServer, token: &str) -> (Credentials, String) {
    let ip: std::net::IpAddr = NODE_IP.parse().expect("ip");
    let (key, csr_der) = tunnel_edge::join::new_csr(NODE, &[ip]).expect("csr");
    let request = JoinRequest {
        token: token.to_owned(),
        node_name: NODE.to_owned(),
        node_ips: vec![NODE_IP.to_owned()],
        csr_der,
    };
    let answer = tunnel_edge::join::call_join(
        &server.registration.to_string(),
        "127.0.0.1",
        &pki.layout.ca_cert(),
        request,
    )
    .await
    .expect("registration API reachable")
    .expect("join accepted");
    (answer, key.serialize_pem())
}

async fn renew(pki: &Pki, server: &RegistrationServer, dir: &Path) -> Credentials {
    let ip: std::net::IpAddr = NODE_IP.parse().expect("ip");
    let (_, csr_der) = tunnel_edge::join::new_csr(NODE, &[ip]).expect("csr");
    tunnel_edge::join::call_renew(
        &server.registration.to_string(),
        "127.0.0.1",
        &pki.layout.ca_cert(),
        (&dir.join("cert.pem"), &dir.join("key.pem")),
        RenewRequest { csr_der },
    )
    .await
    .expect("registration API reachable")
    .expect("renewal accepted")
}

#[tokio::test]
async fn testplan_11_registration_slot_exhaustion_by_idle_tls_connections() {
    let pki = Pki::new();
    let server = RegistrationServer::start(
        &pki,
        &RegistrationOptions {
            registration_extra: format!(
                "max_connections = {JOIN_POOL}\nmax_connections_per_source = {PER_SOURCE}\n\
                 idle_timeout = \"{}ms\"\nfirst_byte_timeout = \"1s\"\nhandshake_timeout = \"2s\"\n",
                IDLE.as_millis()
            ),
            ..Default::default()
        },
    )
    .await;
    let token = server.create_token(&["--usage-limit", "5"]);
    // A node joined before the attack, so it has a certificate to renew.
    let (credentials, key_pem) = join(&pki, &server, &token).await;
    let node_dir = tempfile::tempdir().expect("node dir");
    std::fs::write(
        node_dir.path().join("cert.pem"),
        &credentials.certificate_pem,
    )
    .unwrap();
    std::fs::write(node_dir.path().join("key.pem"), key_pem).unwrap();

    let tls = anonymous_tls(&pki);
    let limit = Duration::from_secs(5);
    // One source opens the join pool's size plus 200 TLS connections that never send a byte.
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..JOIN_POOL + 200 {
        attempts.spawn(flood::tls_from(
            source(2),
            server.registration,
            tls.clone(),
            limit,
        ));
    }
    let mut one_source = Vec::new();
    while let Some(attempt) = attempts.join_next().await {
        one_source.extend(attempt.expect("attempt task"));
    }
    // More sources (127.0.0.3..=8) each take their share: 24 > the join pool.
    let mut spread = Vec::new();
    for last in 3..=8 {
        for _ in 0..PER_SOURCE {
            if let Some(conn) =
                flood::tls_from(source(last), server.registration, tls.clone(), limit).await
            {
                spread.push(conn);
            }
        }
    }
    let flooded = Instant::now();
    let from_one = one_source.len();
    let watches: Vec<_> = one_source
        .into_iter()
        .chain(spread)
        .map(|conn| flood::watch_close(conn, IDLE * 3))
        .collect();

    // A handshake can finish on the client before the server refuses the connection, so
    // count only those still open a moment later.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let open_now = watches.iter().filter(|w| !w.is_finished()).count();
    let open_from_one = watches[..from_one]
        .iter()
        .filter(|w| !w.is_finished())
        .count();
    assert!(
        open_from_one <= PER_SOURCE,
        "one source holds {open_from_one} connections, its cap is {PER_SOURCE}"
    );
    assert!(
        open_now <= JOIN_POOL,
        "{open_now} idle connections held, the join pool is {JOIN_POOL}"
    );
    assert!(
        open_now >= JOIN_POOL - 2,
        "the flood filled the pool: {open_now} open"
    );

    // Meanwhile (the pool is full of idle connections, none idle for IDLE yet), a node
    // joins and a node renews.
    let started = Instant::now();
    let other = within("join during the flood", Duration::from_secs(5), async {
        let ip: std::net::IpAddr = "192.0.2.11".parse().unwrap();
        let (_, csr_der) = tunnel_edge::join::new_csr("flood-newcomer", &[ip]).unwrap();
        tunnel_edge::join::call_join(
            &server.registration.to_string(),
            "127.0.0.1",
            &pki.layout.ca_cert(),
            JoinRequest {
                token: token.clone(),
                node_name: "flood-newcomer".into(),
                node_ips: vec!["192.0.2.11".into()],
                csr_der,
            },
        )
        .await
    })
    .await;
    let joined_in = started.elapsed();
    assert!(
        matches!(other, Ok(Ok(_))),
        "join during the flood failed: {other:?}"
    );
    let started = Instant::now();
    let renewed = within(
        "renewal during the flood",
        Duration::from_secs(5),
        renew(&pki, &server, node_dir.path()),
    )
    .await;
    assert!(!renewed.certificate_pem.is_empty());
    let renewed_in = started.elapsed();
    assert!(
        flooded.elapsed() < IDLE,
        "join and renewal must have happened before the idle deadline freed anything"
    );
    eprintln!("during the flood: join {joined_in:?}, renewal {renewed_in:?}");

    // Every idle connection is closed at its deadline (IDLE after its handshake), none left.
    let mut closed_at = Vec::new();
    for watch in watches {
        if let Some(at) = watch.await.expect("watch task") {
            closed_at.push(at);
        } else {
            panic!(
                "an idle registration connection is still open after {:?}",
                IDLE * 3
            );
        }
    }
    let late = closed_at
        .iter()
        .filter(|at| **at > IDLE + Duration::from_millis(1500))
        .count();
    assert_eq!(late, 0, "idle connections closed late: {closed_at:?}");
    let at_deadline = closed_at
        .iter()
        .filter(|at| **at >= IDLE - Duration::from_millis(1500))
        .count();
    assert!(
        at_deadline + 2 >= open_now,
        "held connections are closed by the idle deadline, not earlier ({closed_at:?})"
    );
}
