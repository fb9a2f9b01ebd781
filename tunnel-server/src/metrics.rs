//! Prometheus metrics of the server, in one registry, rendered as text by the admin endpoint.
//! Label values are a small fixed set (results, directions): never node names or addresses.

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

/// Every server metric.
pub struct Metrics {
    registry: Registry,
    /// Edges with a live session.
    pub edges_connected: Gauge,
    /// Tunneled streams open now.
    pub streams_open: Gauge,
    /// Dials by frontend and result.
    pub dials: Family<DialLabels, Counter>,
    /// Dials waiting for the edge's answer.
    pub dials_pending: Gauge,
    /// Tunneled bytes by direction.
    pub bytes: Family<DirectionLabels, Counter>,
    /// Time from request to the edge's answer, seconds.
    pub dial_duration: Histogram,
    /// Edge session handshakes by result.
    pub edge_handshakes: Family<HandshakeLabels, Counter>,
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
        Metrics {
            registry,
            edges_connected,
            streams_open,
            dials,
            dials_pending,
            bytes,
            dial_duration,
            edge_handshakes,
        }
    }
}

impl Metrics {
    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Count one dial outcome.
    pub fn dial(&self, frontend: &'static str, result: &'static str) {
        self.dials
            .get_or_create(&DialLabels { frontend, result })
            .inc();
    }

    /// Count one handshake outcome.
    pub fn handshake(&self, result: &'static str) {
        self.edge_handshakes
            .get_or_create(&HandshakeLabels { result })
            .inc();
    }

    /// Add tunneled bytes.
    pub fn add_bytes(&self, to_edge: u64, from_edge: u64) {
        self.bytes
            .get_or_create(&DirectionLabels {
                direction: "to_edge",
            })
            .inc_by(to_edge);
        self.bytes
            .get_or_create(&DirectionLabels {
                direction: "from_edge",
            })
            .inc_by(from_edge);
    }
}
