//! The one accept loop step every listener shares: wait for the next connection unless the
//! listener is being stopped, and on an accept error (file descriptors exhausted, a reset
//! mid-handshake) log, back off exponentially and try again. A listener never exits on an
//! error and never spins on one.

use std::future::Future;
use std::io;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// First wait after an accept error.
pub const MIN_BACKOFF: Duration = Duration::from_millis(5);
/// Longest wait between accept attempts after errors.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Backoff state of one listener's accept loop.
#[derive(Debug)]
pub struct AcceptRetry {
    what: &'static str,
    delay: Duration,
}

impl AcceptRetry {
    /// `what` names the listener in logs.
    pub fn new(what: &'static str) -> AcceptRetry {
        AcceptRetry {
            what,
            delay: MIN_BACKOFF,
        }
    }

    /// The next accepted connection, or `None` once `stop` is cancelled.
    pub async fn next<T, F, Fut>(&mut self, stop: &CancellationToken, mut accept: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = io::Result<T>>,
    {
        loop {
            let accepted = tokio::select! {
                biased;
                _ = stop.cancelled() => return None,
                r = accept() => r,
            };
            match accepted {
                Ok(connection) => {
                    self.delay = MIN_BACKOFF;
                    return Some(connection);
                }
                Err(error) => {
                    tracing::warn!(%error, listener = self.what, "accept failed; backing off");
                    tokio::select! {
                        biased;
                        _ = stop.cancelled() => return None,
                        _ = tokio::time::sleep(self.delay) => {}
                    }
                    self.delay = (self.delay * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn testplan_12_accept_errors_back_off_then_a_connection_resets_the_delay() {
        let mut retry = AcceptRetry::new("test");
        let stop = CancellationToken::new();
        let mut calls = 0;
        let started = tokio::time::Instant::now();
        let got = retry
            .next(&stop, || {
                calls += 1;
                let n = calls;
                async move {
                    if n <= 4 {
                        Err(io::Error::other("EMFILE"))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(got, Some(5));
        // 5 + 10 + 20 + 40 ms of backoff.
        assert_eq!(started.elapsed(), Duration::from_millis(75));
        assert_eq!(retry.delay, MIN_BACKOFF);
    }

    #[tokio::test]
    async fn stop_ends_the_wait() {
        let mut retry = AcceptRetry::new("test");
        let stop = CancellationToken::new();
        stop.cancel();
        let got: Option<()> = retry
            .next(&stop, std::future::pending::<io::Result<()>>)
            .await;
        assert_eq!(got, None);
    }
}
