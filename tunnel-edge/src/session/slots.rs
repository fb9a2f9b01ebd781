//! Session slots: one worker per session the edge wants (one per announced replica, see
//! [`crate::replicas`]), each connecting, serving until the session ends, backing off with
//! jitter and reconnecting until cancelled. A server that refuses the node as revoked is
//! retried only at the maximum backoff until the certificate on disk changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use super::Edge;
use crate::backoff::Backoff;
use crate::refusal::{RefusedCertificate, SessionError};
use crate::replicas::Replicas;
use crate::status::EdgeStatus;

impl Edge {
    /// Keep sessions up until `cancel`: one per server address, and as many as the servers
    /// report replicas (each a distinct replica; a session that lands on a replica already
    /// held is closed and retried). Then stop taking streams and let in-flight ones finish
    /// for up to `shutdown_grace`.
    pub async fn run(self: Arc<Self>, status: Arc<EdgeStatus>, cancel: CancellationToken) {
        let streams = TaskTracker::new();
        let replicas = self.replicas.clone();
        let mut wanted_rx = replicas.wanted.subscribe();
        let mut workers: Vec<(CancellationToken, tokio::task::JoinHandle<()>)> = Vec::new();
        loop {
            let want = (*wanted_rx.borrow_and_update())
                .max(self.targets.len())
                .min(protocol::stream::MAX_SERVER_COUNT);
            while workers.len() < want {
                let index = workers.len();
                let token = cancel.child_token();
                let worker = self.clone().worker(
                    index,
                    status.clone(),
                    replicas.clone(),
                    streams.clone(),
                    token.clone(),
                );
                workers.push((token, tokio::spawn(worker)));
            }
            while workers.len() > want {
                if let Some((token, _)) = workers.pop() {
                    token.cancel();
                }
            }
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                changed = wanted_rx.changed() => if changed.is_err() { break },
            }
        }
        for (_, handle) in workers {
            let _ = handle.await;
        }
        streams.close();
        if tokio::time::timeout(self.config.shutdown_grace, streams.wait())
            .await
            .is_err()
        {
            warn!("streams still open after the shutdown grace period; closing them");
        }
    }

    /// One session slot: connect, serve, back off, reconnect, until cancelled.
    async fn worker(
        self: Arc<Self>,
        index: usize,
        status: Arc<EdgeStatus>,
        replicas: Arc<Replicas>,
        streams: TaskTracker,
        cancel: CancellationToken,
    ) {
        let r = &self.config.reconnect;
        let mut backoff = Backoff::new(r.min, r.max);
        let (host, port) = self.targets[index % self.targets.len()].clone();
        // Set while the server refuses this node as revoked: attempts wait the maximum.
        let mut refused: Option<RefusedCertificate> = None;
        // A QUIC connection the last session's probe found: the next session runs on it.
        let mut pending: Option<quinn::Connection> = None;
        for attempt in 0u64.. {
            if attempt > 0 {
                self.metrics.reconnects.inc();
            }
            let started = Instant::now();
            // The certificate this attempt presents, read before it starts: a re-join that
            // lands while the refusal is still under way then counts as a change.
            let presented = RefusedCertificate::of(self.config.server.cert.as_deref());
            let span =
                tracing::info_span!("session", node = %self.node(), server = %host, slot = index);
            let outcome = self
                .session(
                    index,
                    &host,
                    port,
                    &status,
                    &replicas,
                    &streams,
                    &cancel,
                    &mut pending,
                )
                .instrument(span)
                .await;
            match outcome {
                Ok(reason) => info!(node = %self.node(), slot = index, reason, "session ended"),
                Err(SessionError::Failed(reason)) => {
                    warn!(node = %self.node(), slot = index, reason, "session failed")
                }
                Err(SessionError::Revoked { at, reason }) => {
                    let revoked_at = at.map(|at| tunnel_io::check::rfc3339(at as i64));
                    let message = crate::refusal::message(self.node(), at, &reason);
                    error!(node = %self.node(), slot = index, revoked_at = revoked_at.as_deref(), retry_in_ms = r.max.as_millis() as u64, "{message}");
                    refused = Some(presented);
                }
            }
            if cancel.is_cancelled() {
                break;
            }
            let delay = if pending.is_some() {
                Duration::ZERO
            } else if refused.is_some() {
                r.max
            } else {
                backoff.session_ended(started.elapsed(), r.stable_after);
                backoff.next_delay(&mut rand::thread_rng())
            };
            debug!(
                delay_ms = delay.as_millis() as u64,
                "reconnecting after backoff"
            );
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
            if refused.as_ref().is_some_and(RefusedCertificate::changed) {
                match self.reload_tls() {
                    Ok(()) => info!("certificate changed since the refusal; reconnecting with it"),
                    Err(error) => warn!(%error, "certificate changed but does not load"),
                }
                refused = None;
                backoff = Backoff::new(r.min, r.max);
            }
        }
    }
}
