//! Three replicas on one etcd: each a `tunnel-server` with `[state] backend = "etcd"` and its
//! own `[replica] id`, all with the same CA, so a node joined on one is known to all.

use std::net::SocketAddr;
use std::time::Duration;

use tether_tests::etcd::{binary_or_skip, EtcdCluster};
use tether_tests::haproxy::{Backend, Haproxy};
use tether_tests::registration::{JoinedEdge, RegistrationOptions, RegistrationServer};
use tether_tests::Pki;

pub const REFUSED: &str = "registration refused";
/// How long a whole burst of joins may take: each `tunnel-edge join` takes ~50 ms alone.
pub const JOINS_TIMEOUT: Duration = Duration::from_secs(60);

/// The replicas' `state.prune_interval` here (default 60 s): a janitor pass within a test.
pub const PRUNE_INTERVAL: &str = "1s";

pub struct Replicas {
    pub servers: Vec<RegistrationServer>,
    pub pki: Pki,
    pub etcd: EtcdCluster,
}

impl Replicas {
    /// `None` when etcd is not installed (the test is skipped).
    pub async fn start(test: &str, replicas: usize, allowed_ports: Vec<u16>) -> Option<Replicas> {
        Replicas::start_with(test, replicas, allowed_ports, "1h").await
    }

    /// [`Replicas::start`] issuing certificates for `cert_lifetime` (a humantime string).
    pub async fn start_with(
        test: &str,
        replicas: usize,
        allowed_ports: Vec<u16>,
        cert_lifetime: &'static str,
    ) -> Option<Replicas> {
        let binary = binary_or_skip(test)?;
        let etcd = EtcdCluster::start(binary, 3).await;
        let pki = Pki::new();
        let endpoints = etcd
            .endpoints()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut servers = Vec::new();
        for i in 0..replicas {
            let options = RegistrationOptions {
                allowed_ports: allowed_ports.clone(),
                cert_lifetime,
                // `[state]` and `[replica]` after the `[registration]` keys; TOML allows
                // `[registration.rate]` to follow them.
                registration_extra: format!(
                    "\n[state]\nbackend = \"etcd\"\nendpoints = [{endpoints}]\nrequest_timeout = \"2s\"\nsession_ttl = \"3s\"\nprune_interval = \"{PRUNE_INTERVAL}\"\n\n[replica]\nid = \"replica-{i}\"\ncount = 1\n"
                ),
                ..RegistrationOptions::default()
            };
            servers.push(RegistrationServer::start(&pki, &options).await);
        }
        Some(Replicas { servers, pki, etcd })
    }

    /// haproxy (round robin, TCP) in front of the replicas' registration listeners, as the
    /// load balancer's port 443 is in production; `None` when haproxy is not installed.
    pub async fn balancer(&self, test: &str) -> Option<Haproxy> {
        let binary = tether_tests::haproxy::binary_or_skip(test)?;
        let backends: Vec<Backend> = self
            .servers
            .iter()
            .map(|s| Backend {
                addr: s.registration,
                admin: s.admin,
            })
            .collect();
        Some(Haproxy::start(binary, &backends, false).await)
    }

    /// `n` concurrent `tunnel-edge join`s with `token` to `address` (the balancer); node `i`
    /// is `<prefix>-i` with IP 10.77.<k>.i. Returns (successes, the refusals' outputs).
    pub async fn join_burst(
        &self,
        address: SocketAddr,
        token: &str,
        prefix: &str,
        k: u8,
        n: usize,
    ) -> (usize, Vec<String>) {
        let mut tasks = Vec::new();
        for i in 0..n {
            let (registration, ca) = (address, self.pki.layout.ca_cert());
            let token = token.to_owned();
            let node = format!("{prefix}-{i}");
            let ip = format!("10.77.{k}.{}", i + 1);
            tasks.push(tokio::task::spawn_blocking(move || {
                let edge = JoinedEdge::new();
                edge.join_at(registration, &ca, &token, &node, &[&ip], &[])
            }));
        }
        let mut ok = 0;
        let mut refused = Vec::new();
        for task in tasks {
            let (success, output) =
                tether_tests::within("a join of the burst", JOINS_TIMEOUT, task)
                    .await
                    .expect("join task");
            match success {
                true => ok += 1,
                false => refused.push(output),
            }
        }
        (ok, refused)
    }
}
