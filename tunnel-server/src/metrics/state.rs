//! Metrics of the shared control state (the etcd backend): latency and failures of each
//! store operation, how late revocations reach this replica, and when its views were last
//! confirmed current. Operation labels are a fixed set of `&'static str` (`join`, `renew`,
//! `sync`, `watch`, `session_put`, ...).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label of a store operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// The operation (`join`, `renew`, `sync`, `watch`, `token_create`, ...).
    pub op: &'static str,
}

type Latency = Family<OpLabels, Histogram, fn() -> Histogram>;

/// Buckets from 1 ms doubling to ~4 s: a healthy transaction takes a few milliseconds, a
/// leader election about a second, and `state.request_timeout` (3 s) ends the rest.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 13))
}

/// The state store's metrics (clones share the series).
#[derive(Clone, Debug)]
pub struct StateMetrics {
    /// Operation latency, seconds, by operation.
    pub latency: Latency,
    /// Operations that failed (error or timeout), by operation.
    pub errors: Family<OpLabels, Counter>,
    /// Seconds between a revocation's time and its arrival through the watch.
    pub watch_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// When the views were last confirmed current (a full read or a watch message), Unix s.
    pub last_sync: Gauge,
}

impl Default for StateMetrics {
    fn default() -> StateMetrics {
        StateMetrics {
            latency: Family::new_with_constructor(latency_histogram),
            errors: Family::default(),
            watch_lag: Gauge::default(),
            last_sync: Gauge::default(),
        }
    }
}

impl StateMetrics {
    /// Register the families in `registry`.
    pub(super) fn register(registry: &mut Registry) -> StateMetrics {
        let metrics = StateMetrics::default();
        registry.register(
            "state_operation_duration_seconds",
            "Latency of state store operations (etcd backend), by operation",
            metrics.latency.clone(),
        );
        registry.register(
            "state_operation_errors",
            "State store operations that failed or timed out, by operation",
            metrics.errors.clone(),
        );
        registry.register(
            "state_watch_lag_seconds",
            "Seconds between the last revocation seen through the watch and its arrival",
            metrics.watch_lag.clone(),
        );
        registry.register(
            "state_last_sync_timestamp_seconds",
            "When this replica last confirmed its revocation and identity views current (Unix seconds; 0: never)",
            metrics.last_sync.clone(),
        );
        metrics
    }

    /// Record one operation.
    pub fn observe(&self, op: &'static str, took: Duration, ok: bool) {
        self.latency
            .get_or_create(&OpLabels { op })
            .observe(took.as_secs_f64());
        if !ok {
            self.errors.get_or_create(&OpLabels { op }).inc();
        }
    }

    /// The views are current as of now; `lag` seconds behind the change that was applied.
    pub fn synced(&self, lag: f64) {
        let now = crate::registration::state::unix_now();
        self.last_sync.set(i64::try_from(now).unwrap_or(i64::MAX));
        self.watch_lag.set(lag);
    }

    /// A watch broke or could not start.
    pub fn watch_error(&self) {
        self.errors.get_or_create(&OpLabels { op: "watch" }).inc();
    }
}
