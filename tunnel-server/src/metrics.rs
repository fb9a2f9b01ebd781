//! Prometheus metrics of the server, in one registry, rendered as text by the admin endpoint.
//! Label values are a small fixed set (results, directions): never node names or addresses.

pub mod edge_certificates;
mod guards;
mod process;
pub mod registration;
pub mod state;
pub mod upstream;

/// The exposition formats, shared with the edge's admin endpoint.
pub use tunnel_io::metrics_text as text;

pub use guards::{GaugeGuard, StreamGuard};

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label of a dial outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DialLabels {
    /// Which frontend asked (`connect`).
    pub frontend: &'static str,
    /// `ok` or a failure label (`no_route`, `policy_denied`, `timeout`, ...).
    pub result: &'static str,
}

/// Label of a byte counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `to_edge` (apiserver → node) or `from_edge`.
    pub direction: &'static str,
}

/// Label of an edge handshake outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `ok`, `tls`, `identity`, `conflict`, `timeout`, `h2`.
    pub result: &'static str,
}

/// Label of the per-transport session gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    /// `tcp` or `quic`.
    pub transport: &'static str,
}

/// Label of the per-shard session gauge (`crate::shards`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    /// The shard's index, as in its thread's name (`tether-shard-N`).
    pub shard: String,
}

/// Label of a per-frontend gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrontendLabels {
    /// `connect` or `konnectivity`.
    pub frontend: &'static str,
}

/// Label of a refused frontend connection or stream.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `connect` or `konnectivity`.
    pub frontend: &'static str,
    /// Why (`header_block_too_large`, `bad_hpack`, `malformed_request`, ...).
    pub reason: &'static str,
}

/// Label of a certificate gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// Which of the server's certificates (`edge_listener`, `connect_frontend`, ...).
    pub certificate: &'static str,
}

/// The frontends, pre-registered so their gauges show 0 before first use.
const FRONTENDS: [&str; 2] = ["connect", "konnectivity"];

/// Buckets of `tether_stream_duration_seconds`, in seconds. API calls and one-shot
/// `kubectl exec` end within 0.1–10 s; `logs -f`, `exec -it` and `port-forward` run minutes
/// to hours; 4 h is the edge's default idle timeout; a day bounds the rest.
const STREAM_DURATION_BUCKETS: [f64; 10] = [
    0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14_400.0, 43_200.0, 86_400.0,
];

fn stream_duration_histogram() -> Histogram {
    Histogram::new(STREAM_DURATION_BUCKETS)
}

/// Every server metric.
pub struct Metrics {
    registry: Registry,
    /// Edges with a live session.
    pub edges_connected: Gauge,
    /// Tether edge sessions up now, by transport (replaced ones still draining included).
    pub edge_sessions: Family<TransportLabels, Gauge>,
    /// TCP edge sessions up now on each shard (none without shards).
    pub shard_sessions: Family<ShardLabels, Gauge>,
    /// Lane connections up now (one at most per TCP edge session).
    pub lanes: Gauge,
    /// Streams moved to their session's lane.
    pub lane_moves: Counter,
    /// Tunneled streams open now.
    pub streams_open: Gauge,
    /// Dials by frontend and result.
    pub dials: Family<DialLabels, Counter>,
    /// Dials waiting for the edge's answer.
    pub dials_pending: Gauge,
    /// Tunneled bytes by direction.
    pub bytes: Family<DirectionLabels, Counter>,
    /// The two series of `bytes`, for pipes to add to as bytes move.
    pub tunneled: TunneledBytes,
    /// Time from request to the edge's answer, seconds.
    pub dial_duration: Histogram,
    /// Edge session handshakes by result.
    pub edge_handshakes: Family<HandshakeLabels, Counter>,
    /// Dials waiting for the node's answer, by frontend (the sum is `dials_pending`).
    pub frontend_dials_pending: Family<FrontendLabels, Gauge>,
    /// Tunneled streams open now, by frontend (the sum is `streams_open`).
    pub frontend_streams_open: Family<FrontendLabels, Gauge>,
    /// Konnectivity agents attached now (routed, or draining their last connections).
    pub agents_connected: Gauge,
    /// Konnectivity agent session attempts by result (`ok`, `identity`, `identifiers`,
    /// `metadata`, `conflict`, `draining`).
    pub agent_sessions: Family<HandshakeLabels, Counter>,
    /// Agent connections reset while the agent's stream waited on them: their buffer was
    /// full and their frontend took no bytes for `connect.write_timeout` (or went away).
    /// Each one paused every other connection of its agent until the reset.
    pub agent_stalled_resets: Counter,
    /// Frontend connections or streams refused before any service code saw them, by reason
    /// (what h2 would otherwise refuse silently).
    pub frontend_refusals: Family<RefusalLabels, Counter>,
    /// `:authority` values on the Konnectivity Unix socket replaced because they were not
    /// valid URI authorities (socket paths sent by gRPC clients).
    pub authority_rewrites: Counter,
    /// When each of the server's own certificates expires (Unix seconds), so alerts can
    /// compare it with `time()`.
    pub certificate_expiry: Family<CertificateLabels, Gauge>,
    /// How long tunneled streams lasted, by frontend, seconds.
    pub stream_duration: Family<FrontendLabels, Histogram>,
    /// Registration API calls: issued, refused, lockouts.
    pub registration: registration::RegistrationMetrics,
    /// The shared control state (etcd backend): operations, watch lag, last sync.
    pub state: std::sync::Arc<state::StateMetrics>,
    /// Edge → cloud upstream streams and bytes.
    pub upstream: upstream::UpstreamMetrics,
    /// Certificate expiry of the connected edges.
    pub edge_certificates: edge_certificates::EdgeCertificates,
    /// Open file descriptors of this process (read from /proc at each scrape).
    process_open_fds: Gauge,
    /// Resident memory of this process in bytes (read from /proc at each scrape).
    process_resident_memory: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tether");
        let edges_connected = Gauge::default();
        registry.register(
            "edges_connected",
            "Edges with a live session",
            edges_connected.clone(),
        );
        let edge_sessions = Family::<TransportLabels, Gauge>::default();
        registry.register(
            "edge_sessions",
            "Tether edge sessions up now by transport (tcp or quic)",
            edge_sessions.clone(),
        );
        for transport in ["tcp", "quic"] {
            let _ = edge_sessions.get_or_create(&TransportLabels { transport });
        }
        let shard_sessions = Family::<ShardLabels, Gauge>::default();
        registry.register(
            "shard_edge_sessions",
            "TCP edge sessions up now on each shard (thread) of the server",
            shard_sessions.clone(),
        );
        let lanes = Gauge::default();
        registry.register(
            "edge_lanes",
            "Lane connections up now: second connections of TCP edge sessions that bulk streams move to",
            lanes.clone(),
        );
        let lane_moves = Counter::default();
        registry.register(
            "lane_moves",
            "Streams moved to their session's lane after showing themselves to be bulk",
            lane_moves.clone(),
        );
        let streams_open = Gauge::default();
        registry.register(
            "streams_open",
            "Tunneled streams open now",
            streams_open.clone(),
        );
        let dials = Family::<DialLabels, Counter>::default();
        registry.register("dials", "Dials by frontend and result", dials.clone());
        let dials_pending = Gauge::default();
        registry.register(
            "dials_pending",
            "Dials waiting for the edge's answer",
            dials_pending.clone(),
        );
        let bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "tunneled_bytes",
            "Tunneled bytes by direction",
            bytes.clone(),
        );
        // 100 µs .. ~13 s.
        let dial_duration = Histogram::new(exponential_buckets(0.0001, 2.0, 18));
        registry.register(
            "dial_duration_seconds",
            "Time from a frontend request to the edge's answer",
            dial_duration.clone(),
        );
        let edge_handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "edge_handshakes",
            "Edge session handshakes by result",
            edge_handshakes.clone(),
        );
        let frontend_dials_pending = Family::<FrontendLabels, Gauge>::default();
        registry.register(
            "frontend_dials_pending",
            "Dials waiting for the node's answer, by frontend",
            frontend_dials_pending.clone(),
        );
        let frontend_streams_open = Family::<FrontendLabels, Gauge>::default();
        registry.register(
            "frontend_streams_open",
            "Tunneled streams open now, by frontend",
            frontend_streams_open.clone(),
        );
        for frontend in FRONTENDS {
            let _ = frontend_dials_pending.get_or_create(&FrontendLabels { frontend });
            let _ = frontend_streams_open.get_or_create(&FrontendLabels { frontend });
        }
        let agents_connected = Gauge::default();
        registry.register(
            "agents_connected",
            "Konnectivity agents attached now",
            agents_connected.clone(),
        );
        let agent_sessions = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "agent_sessions",
            "Konnectivity agent session attempts by result",
            agent_sessions.clone(),
        );
        let agent_stalled_resets = Counter::default();
        registry.register(
            "agent_stalled_resets",
            "Agent connections reset while the agent's stream waited on their full buffer",
            agent_stalled_resets.clone(),
        );
        let frontend_refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "frontend_refusals",
            "Frontend connections or streams refused before any service code saw them",
            frontend_refusals.clone(),
        );
        let authority_rewrites = Counter::default();
        registry.register(
            "konnectivity_authority_rewrites",
            "Unix-socket gRPC requests whose :authority (a socket path) was replaced",
            authority_rewrites.clone(),
        );
        let certificate_expiry = Family::<CertificateLabels, Gauge>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the server's own certificates expire, in Unix seconds",
            certificate_expiry.clone(),
        );
        let stream_duration = Family::<FrontendLabels, Histogram>::new_with_constructor(
            stream_duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "stream_duration_seconds",
            "How long tunneled streams lasted, by frontend",
            stream_duration.clone(),
        );
        let registration = registration::RegistrationMetrics::register(&mut registry);
        let state = std::sync::Arc::new(state::StateMetrics::register(&mut registry));
        let upstream = upstream::UpstreamMetrics::register(&mut registry);
        let edge_certificates = edge_certificates::EdgeCertificates::register(&mut registry);
        let process_open_fds = Gauge::default();
        registry.register(
            "process_open_fds",
            "Open file descriptors of the tunnel-server process",
            process_open_fds.clone(),
        );
        let process_resident_memory = Gauge::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the tunnel-server process in bytes",
            process_resident_memory.clone(),
        );
        registry.register(
            "build",
            "The running tunnel-server build",
            prometheus_client::metrics::info::Info::new(vec![(
                "version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            )]),
        );
        Metrics {
            registry,
            stream_duration,
            registration,
            state,
            upstream,
            edge_certificates,
            certificate_expiry,
            process_open_fds,
            process_resident_memory,
            frontend_refusals,
            authority_rewrites,
            frontend_dials_pending,
            frontend_streams_open,
            agents_connected,
            agent_sessions,
            agent_stalled_resets,
            edges_connected,
            edge_sessions,
            shard_sessions,
            lanes,
            lane_moves,
            streams_open,
            dials,
            dials_pending,
            tunneled: TunneledBytes::of(&bytes),
            bytes,
            dial_duration,
            edge_handshakes,
        }
    }
}

impl Metrics {
    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        process::sample(&self.process_open_fds, &self.process_resident_memory);
        self.edge_certificates.sample(tunnel_io::check::unix_now());
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Record when the certificate in PEM file `path` expires, as `certificate`.
    pub fn certificate_expiry_from(&self, certificate: &'static str, path: &std::path::Path) {
        let not_after = std::fs::read(path).ok().and_then(|pem| {
            let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
            let cert = pem.parse_x509().ok()?;
            Some(cert.validity().not_after.timestamp())
        });
        if let Some(at) = not_after {
            self.certificate_expiry
                .get_or_create(&CertificateLabels { certificate })
                .set(at);
        }
    }

    /// Count one dial outcome.
    pub fn dial(&self, frontend: &'static str, result: &'static str) {
        self.dials
            .get_or_create(&DialLabels { frontend, result })
            .inc();
    }

    /// Count a dial of `frontend` as pending until the guard is dropped (also when the dial
    /// future is dropped mid-flight because the client went away).
    pub fn dial_pending(&self, frontend: &'static str) -> GaugeGuard {
        GaugeGuard::new([
            self.dials_pending.clone(),
            self.frontend_dials_pending
                .get_or_create(&FrontendLabels { frontend })
                .clone(),
        ])
    }

    /// Count a tunneled stream of `frontend` as open until the guard is dropped; then
    /// observe how long it lasted.
    pub fn stream_open(&self, frontend: &'static str) -> StreamGuard {
        let labels = FrontendLabels { frontend };
        StreamGuard {
            _open: GaugeGuard::new([
                self.streams_open.clone(),
                self.frontend_streams_open.get_or_create(&labels).clone(),
            ]),
            duration: self.stream_duration.get_or_create(&labels).clone(),
            started: Instant::now(),
        }
    }

    /// Count one Konnectivity agent session attempt.
    pub fn agent_session(&self, result: &'static str) {
        self.agent_sessions
            .get_or_create(&HandshakeLabels { result })
            .inc();
    }

    /// Count one handshake outcome.
    pub fn handshake(&self, result: &'static str) {
        self.edge_handshakes
            .get_or_create(&HandshakeLabels { result })
            .inc();
    }

    /// Add tunneled bytes in one go. Pipes add as they go instead ([`Metrics::tunneled`]),
    /// so a long transfer shows while it runs.
    pub fn add_bytes(&self, to_edge: u64, from_edge: u64) {
        self.tunneled.add_to_edge(to_edge);
        self.tunneled.add_from_edge(from_edge);
    }
}

/// `tether_tunneled_bytes_total`'s two series, looked up once: a pipe adds every chunk it
/// moves with one atomic add, no label lookup on the data path. Counting only when a stream
/// ended hid long transfers: three 64 MiB downloads over kube-apiserver's pooled (long-lived)
/// connections showed 32 KB.
#[derive(Clone, Debug)]
pub struct TunneledBytes {
    /// Frontend client → node.
    to_edge: Counter,
    /// Node → frontend client.
    from_edge: Counter,
}

impl TunneledBytes {
    fn of(family: &Family<DirectionLabels, Counter>) -> TunneledBytes {
        let series = |direction| family.get_or_create(&DirectionLabels { direction }).clone();
        TunneledBytes {
            to_edge: series("to_edge"),
            from_edge: series("from_edge"),
        }
    }

    /// `n` more bytes went from a frontend client to a node.
    pub fn add_to_edge(&self, n: u64) {
        self.to_edge.inc_by(n);
    }

    /// `n` more bytes went from a node to a frontend client.
    pub fn add_from_edge(&self, n: u64) {
        self.from_edge.inc_by(n);
    }
}

/// The frontend's socket is the client's: what it reads goes to the edge.
impl tunnel_io::pipe::ByteMeter for TunneledBytes {
    fn socket_to_stream(&self, n: u64) {
        self.add_to_edge(n);
    }
    fn stream_to_socket(&self, n: u64) {
        self.add_from_edge(n);
    }
}
