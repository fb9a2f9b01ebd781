//! Certificate renewal while the edge runs: at about two thirds of the certificate's lifetime
//! (±5% jitter) call `Renew` with the current certificate, write the new key and certificate
//! into the state directory, and have new sessions use them. Live sessions and their streams
//! are not touched: a TLS session does not need its certificate after the handshake.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use tunnel_io::check::rfc3339;

use crate::join::{certificate_window, renew, renewal_due, unix_now, StateDir};
use crate::Edge;

/// Jitter of the renewal time, as a fraction of the lifetime.
const JITTER: f64 = 0.05;
/// Retry delay bounds after a failed renewal.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// Observable renewal state, for tests and logs.
#[derive(Debug, Default)]
pub struct RenewStatus {
    /// Successful renewals since start.
    pub renewals: std::sync::atomic::AtomicU64,
}

/// Renew until `cancel`.
pub async fn renew_loop(
    edge: Arc<Edge>,
    state: StateDir,
    status: Arc<RenewStatus>,
    cancel: CancellationToken,
) {
    let mut retry = RETRY_MIN;
    loop {
        let (issued, not_after) = match certificate_window(&state.cert()) {
            Ok(w) => w,
            Err(error) => {
                warn!(%error, "cannot read the certificate; renewal stopped");
                return;
            }
        };
        let unit: f64 = rand::thread_rng().gen();
        let due = renewal_due(issued, not_after, JITTER, unit);
        let wait = Duration::from_secs(due.saturating_sub(unix_now()).max(0) as u64);
        info!(
            due = %rfc3339(due),
            not_after = %rfc3339(not_after),
            "certificate renewal scheduled"
        );
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        loop {
            let outcome = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                r = renew(&state, edge.egress()) => r,
            };
            match outcome.and_then(|()| edge.reload_tls()) {
                Ok(()) => {
                    status
                        .renewals
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    info!("certificate renewed; new sessions use it");
                    retry = RETRY_MIN;
                    break;
                }
                Err(error) => {
                    warn!(error = %format!("{error:#}"), retry_ms = retry.as_millis() as u64, "certificate renewal failed; retrying");
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(RETRY_MAX);
                    if unix_now() >= not_after {
                        warn!(
                            not_after = %rfc3339(not_after),
                            "certificate expired before it could be renewed; join again"
                        );
                    }
                }
            }
        }
    }
}
