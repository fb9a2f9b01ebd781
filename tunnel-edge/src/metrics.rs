//! Prometheus metrics of the edge, served by its admin listener ([`crate::admin`]). One
//! registry per edge; label values are small fixed sets (results, directions) plus the
//! replica IDs the servers announce, which are bounded by `MAX_SERVER_COUNT`. Never target
//! addresses or client names: those belong in the audit log.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Label of a dial or upstream stream outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or a failure label (`policy_denied`, `refused`, `timeout`, `unreachable`, ...).
    pub result: &'static str,
}

/// Label of a byte counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `to_target`/`from_target` for tunneled streams, `to_upstream`/`from_upstream` for
    /// edge → cloud streams.
    pub direction: &'static str,
}

/// Label of a per-replica gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    /// The replica ID the server announced on the session.
    pub replica: String,
}

/// Label of a per-transport gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    /// `tcp` or `quic`.
    pub transport: &'static str,
}

/// Every edge metric.
pub struct EdgeMetrics {
    registry: Registry,
    /// Sessions up now (including ones whose replica is not announced yet).
    pub sessions_up: Gauge,
    /// 1 per replica this edge holds a session with; the series goes when the session does.
    pub replica_sessions: Family<ReplicaLabels, Gauge>,
    /// How many replicas the servers announce (0 until the first announcement).
    pub replicas_announced: Gauge,
    /// Sessions established since start.
    pub sessions_established: Counter,
    /// Connection attempts that followed an ended or failed one (a slot's first is not one).
    pub reconnects: Counter,
    /// Local dials by result.
    pub dials: Family<ResultLabels, Counter>,
    /// Tunneled stream bytes; the two series are also in [`EdgeMetrics::tunneled`].
    pub tunneled: ByteCounters,
    /// Edge → cloud upstream streams by result.
    pub upstream_streams: Family<ResultLabels, Counter>,
    /// Edge → cloud upstream bytes.
    pub upstream: ByteCounters,
    /// When this node's certificate expires, Unix seconds.
    pub certificate_expiry: Gauge,
    /// Sessions up now by transport (`tcp`, `quic`).
    pub session_transport: Family<TransportLabels, Gauge>,
    /// Times `transport = "auto"` found no QUIC handshake within its bound and used TCP.
    pub quic_fallbacks: Counter,
    /// Lane connections up now (one at most per TCP session).
    pub lanes_up: Gauge,
    /// Streams the server moved to a lane.
    pub lane_moves: Counter,
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tether_edge");
        let sessions_up = Gauge::default();
        registry.register(
            "sessions_up",
            "Sessions with tunnel-server up now",
            sessions_up.clone(),
        );
        let replica_sessions = Family::<ReplicaLabels, Gauge>::default();
        registry.register(
            "replica_session_up",
            "1 for each replica this edge holds a session with",
            replica_sessions.clone(),
        );
        let replicas_announced = Gauge::default();
        registry.register(
            "replicas_announced",
            "Replicas the servers announce (0 before the first session)",
            replicas_announced.clone(),
        );
        let sessions_established = Counter::default();
        registry.register(
            "sessions_established",
            "Sessions established since start",
            sessions_established.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "reconnects",
            "Session attempts after an ended or failed session",
            reconnects.clone(),
        );
        let dials = Family::<ResultLabels, Counter>::default();
        registry.register("dials", "Local dials by result", dials.clone());
        let tunneled_family = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "tunneled_bytes",
            "Tunneled bytes by direction (to_target: apiserver to this node's target)",
            tunneled_family.clone(),
        );
        let upstream_streams = Family::<ResultLabels, Counter>::default();
        registry.register(
            "upstream_streams",
            "Edge to cloud upstream streams by result",
            upstream_streams.clone(),
        );
        let upstream_family = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "upstream_bytes",
            "Edge to cloud upstream bytes by direction",
            upstream_family.clone(),
        );
        let certificate_expiry = Gauge::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When this node's certificate expires, in Unix seconds",
            certificate_expiry.clone(),
        );
        registry.register(
            "build",
            "The running tunnel-edge build",
            Info::new(vec![(
                "version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            )]),
        );
        let session_transport = Family::<TransportLabels, Gauge>::default();
        registry.register(
            "session_transport",
            "Sessions up now by transport (tcp or quic)",
            session_transport.clone(),
        );
        for transport in ["tcp", "quic"] {
            let _ = session_transport.get_or_create(&TransportLabels { transport });
        }
        let quic_fallbacks = Counter::default();
        registry.register(
            "quic_fallbacks",
            "Times auto transport found no QUIC handshake within its bound and used TCP",
            quic_fallbacks.clone(),
        );
        let lanes_up = Gauge::default();
        registry.register(
            "lanes_up",
            "Lane connections up now: second connections beside TCP sessions that bulk streams move to",
            lanes_up.clone(),
        );
        let lane_moves = Counter::default();
        registry.register(
            "lane_moves",
            "Streams the server moved to a lane after they showed themselves to be bulk",
            lane_moves.clone(),
        );
        let ok = ResultLabels { result: "ok" };
        let _ = dials.get_or_create(&ok);
        let _ = upstream_streams.get_or_create(&ok);
        EdgeMetrics {
            registry,
            sessions_up,
            replica_sessions,
            replicas_announced,
            sessions_established,
            reconnects,
            dials,
            tunneled: ByteCounters::of(&tunneled_family, "to_target", "from_target"),
            upstream_streams,
            upstream: ByteCounters::of(&upstream_family, "from_upstream", "to_upstream"),
            certificate_expiry,
            session_transport,
            quic_fallbacks,
            lanes_up,
            lane_moves,
        }
    }
}

impl EdgeMetrics {
    /// OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Count one local dial outcome.
    pub fn dial(&self, result: &'static str) {
        self.dials.get_or_create(&ResultLabels { result }).inc();
    }

    /// Count one upstream stream outcome.
    pub fn upstream_stream(&self, result: &'static str) {
        self.upstream_streams
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Record the expiry of the certificate in `der`.
    pub fn certificate_expiry_from_der(&self, der: &[u8]) {
        if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
            self.certificate_expiry
                .set(cert.validity().not_after.timestamp());
        }
    }
}

/// A byte counter's two series, looked up once so the data path adds with one atomic add.
/// Streams add as bytes move, so a long `logs -f` shows while it runs.
#[derive(Clone, Debug)]
pub struct ByteCounters {
    /// Read from the local socket, sent into the tunnel.
    from_socket: Counter,
    /// Received from the tunnel, written to the local socket.
    to_socket: Counter,
}

impl ByteCounters {
    /// The series named `to_socket_label` counts bytes written to the local socket (the
    /// target's, or for upstreams the local client's), `from_socket_label` bytes read from it.
    fn of(
        family: &Family<DirectionLabels, Counter>,
        to_socket_label: &'static str,
        from_socket_label: &'static str,
    ) -> ByteCounters {
        let series = |direction| family.get_or_create(&DirectionLabels { direction }).clone();
        ByteCounters {
            to_socket: series(to_socket_label),
            from_socket: series(from_socket_label),
        }
    }
}

impl tunnel_io::pipe::ByteMeter for ByteCounters {
    fn socket_to_stream(&self, n: u64) {
        self.from_socket.inc_by(n);
    }
    fn stream_to_socket(&self, n: u64) {
        self.to_socket.inc_by(n);
    }
}
