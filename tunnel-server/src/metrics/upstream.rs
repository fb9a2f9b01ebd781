//! Metrics of edge → cloud upstream streams (the node's kubelet reaching the apiserver
//! through the tunnel): streams by result and bytes each way, counted as they move.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{DirectionLabels, HandshakeLabels};

/// Upstream families (clones share the series).
#[derive(Clone, Debug)]
pub struct UpstreamMetrics {
    /// Upstream streams by result (`ok`, `not_configured`, `overloaded`, `refused`, ...).
    pub streams: Family<HandshakeLabels, Counter>,
    /// Node → upstream.
    to_upstream: Counter,
    /// Upstream → node.
    from_upstream: Counter,
}

impl UpstreamMetrics {
    /// Register the families in `registry`.
    pub(super) fn register(registry: &mut Registry) -> UpstreamMetrics {
        let streams = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "upstream_streams",
            "Edge to cloud upstream streams by result",
            streams.clone(),
        );
        let bytes = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "upstream_bytes",
            "Edge to cloud upstream bytes by direction",
            bytes.clone(),
        );
        let _ = streams.get_or_create(&HandshakeLabels { result: "ok" });
        let series = |direction| bytes.get_or_create(&DirectionLabels { direction }).clone();
        UpstreamMetrics {
            streams,
            to_upstream: series("to_upstream"),
            from_upstream: series("from_upstream"),
        }
    }

    /// Count one upstream stream outcome.
    pub fn stream(&self, result: &'static str) {
        self.streams
            .get_or_create(&HandshakeLabels { result })
            .inc();
    }
}

/// The server's socket is the upstream's: what it reads goes to the node.
impl tunnel_io::pipe::ByteMeter for UpstreamMetrics {
    fn socket_to_stream(&self, n: u64) {
        self.from_upstream.inc_by(n);
    }
    fn stream_to_socket(&self, n: u64) {
        self.to_upstream.inc_by(n);
    }
}
