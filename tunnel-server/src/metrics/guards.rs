//! Guards that keep a stream or a pending dial counted for exactly as long as it lives,
//! also when its future is dropped mid-flight.

use std::time::Instant;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

/// An open tunneled stream: counted open while it lives, its lifetime observed when dropped.
pub struct StreamGuard {
    pub(super) _open: GaugeGuard,
    pub(super) duration: Histogram,
    pub(super) started: Instant,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.duration.observe(self.started.elapsed().as_secs_f64());
    }
}

/// Keeps gauges incremented for as long as it lives.
pub struct GaugeGuard([Gauge; 2]);

impl GaugeGuard {
    pub(super) fn new(gauges: [Gauge; 2]) -> GaugeGuard {
        for gauge in &gauges {
            gauge.inc();
        }
        GaugeGuard(gauges)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        for gauge in &self.0 {
            gauge.dec();
        }
    }
}
