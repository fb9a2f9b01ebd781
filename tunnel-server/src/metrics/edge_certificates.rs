//! When the certificates of the connected edges expire, without a series per node: the
//! soonest expiry (a gauge an alert compares with `time()`) and how many connected edges
//! expire within 1, 7 and 30 days (cumulative, like histogram buckets, but of the current
//! population rather than of past observations). A fleet of thousands of nodes stays three
//! series plus one; which node it is, `tunnel-server edges` tells.

use std::collections::BTreeMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The `within_days` buckets: 1 day (page someone), 7 (renewal by the edge is failing: it
/// renews at two thirds of the default 7-day lifetime), 30 (for longer-lived certificates
/// issued outside the registration API).
const WITHIN_DAYS: [u32; 3] = [1, 7, 30];
/// Seconds per day.
const DAY: i64 = 86_400;

/// Label of an expiry bucket.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WithinLabels {
    /// Days from now: `1`, `7` or `30`.
    pub within_days: u32,
}

/// Expiries (Unix seconds) of the connected edges' certificates, and the gauges made from
/// them at each scrape.
#[derive(Debug, Default)]
pub struct EdgeCertificates {
    /// Expiry → number of connected sessions with it.
    live: Mutex<BTreeMap<i64, usize>>,
    soonest: Gauge,
    expiring: Family<WithinLabels, Gauge>,
}

/// Keeps an edge certificate's expiry counted for as long as its session lives.
pub struct EdgeCertificateGuard<'a> {
    owner: &'a EdgeCertificates,
    not_after: i64,
}

impl EdgeCertificates {
    /// Register the gauges in `registry`.
    pub(super) fn register(registry: &mut Registry) -> EdgeCertificates {
        let this = EdgeCertificates::default();
        registry.register(
            "edge_certificate_soonest_expiry_timestamp_seconds",
            "Soonest expiry among connected edges' certificates, Unix seconds (0: no edge)",
            this.soonest.clone(),
        );
        registry.register(
            "edge_certificates_expiring",
            "Connected edges whose certificate expires within this many days",
            this.expiring.clone(),
        );
        for within_days in WITHIN_DAYS {
            let _ = this.expiring.get_or_create(&WithinLabels { within_days });
        }
        this
    }

    /// Count a session whose certificate expires at `not_after` (Unix seconds) until the
    /// guard is dropped.
    pub fn session(&self, not_after: i64) -> EdgeCertificateGuard<'_> {
        *self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(not_after)
            .or_default() += 1;
        EdgeCertificateGuard {
            owner: self,
            not_after,
        }
    }

    /// Set the gauges from the live expiries, as of `now` (Unix seconds).
    pub(super) fn sample(&self, now: i64) {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        self.soonest
            .set(live.keys().next().copied().unwrap_or_default());
        for within_days in WITHIN_DAYS {
            let limit = now + i64::from(within_days) * DAY;
            let n: usize = live.range(..=limit).map(|(_, n)| n).sum();
            self.expiring
                .get_or_create(&WithinLabels { within_days })
                .set(n as i64);
        }
    }
}

impl Drop for EdgeCertificateGuard<'_> {
    fn drop(&mut self) {
        let mut live = self.owner.live.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = live.get_mut(&self.not_after) {
            *n -= 1;
            if *n == 0 {
                live.remove(&self.not_after);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soonest_and_buckets_follow_live_sessions() {
        let certs = EdgeCertificates::register(&mut Registry::default());
        let now = 1_000_000;
        let a = certs.session(now + DAY / 2);
        let _b = certs.session(now + 3 * DAY);
        let _c = certs.session(now + 60 * DAY);
        certs.sample(now);
        assert_eq!(certs.soonest.get(), now + DAY / 2);
        let within = |d| {
            certs
                .expiring
                .get_or_create(&WithinLabels { within_days: d })
                .get()
        };
        assert_eq!((within(1), within(7), within(30)), (1, 2, 2));
        drop(a);
        certs.sample(now);
        assert_eq!(certs.soonest.get(), now + 3 * DAY);
        assert_eq!(within(1), 0);
    }
}
