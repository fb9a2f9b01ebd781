//! Metrics of the registration API: joins and renewals, refusals by reason, lockouts. The
//! reason label takes the refusal labels of `registration::service` (throttling, token,
//! request and identity refusals): a fixed set of `&'static str`, never a node name or an
//! address, which stay in the audit log.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Label of a successful registration call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `join` or `renew`.
    pub call: &'static str,
}

/// Label of a refused registration call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedCallLabels {
    /// `join` or `renew`.
    pub call: &'static str,
    /// Why (`locked_out`, `source_rate`, `unknown`, `expired`, `ip_taken`, ...).
    pub reason: &'static str,
}

/// The registration API's counters (clones share the series).
#[derive(Clone, Debug, Default)]
pub struct RegistrationMetrics {
    /// Certificates issued, by call.
    pub issued: Family<CallLabels, Counter>,
    /// Calls refused, by call and reason.
    pub refused: Family<RefusedCallLabels, Counter>,
    /// Sources locked out after repeated failures.
    pub lockouts: Counter,
}

impl RegistrationMetrics {
    /// Register the families in `registry`; both calls show 0 before their first use.
    pub(super) fn register(registry: &mut Registry) -> RegistrationMetrics {
        let metrics = RegistrationMetrics::default();
        registry.register(
            "joins",
            "Node certificates issued by the registration API, by call (join, renew)",
            metrics.issued.clone(),
        );
        registry.register(
            "join_refusals",
            "Registration calls refused, by call and reason",
            metrics.refused.clone(),
        );
        registry.register(
            "join_lockouts",
            "Sources locked out of the registration API after repeated failures",
            metrics.lockouts.clone(),
        );
        for call in ["join", "renew"] {
            let _ = metrics.issued.get_or_create(&CallLabels { call });
        }
        metrics
    }

    /// Count one issued certificate.
    pub fn issued(&self, call: &'static str) {
        self.issued.get_or_create(&CallLabels { call }).inc();
    }

    /// Count one refusal.
    pub fn refused(&self, call: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedCallLabels { call, reason })
            .inc();
    }
}
