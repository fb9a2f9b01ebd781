//! Edge → cloud upstreams: the node's own calls to the control plane (kubelet TLS bootstrap,
//! registration, status, watches) travel through the tunnel to upstreams the *server's*
//! config names. An edge opens a second TLS connection with ALPN `tether-up/1` on demand,
//! with the usual roles (edge = HTTP/2 client); each stream is a CONNECT whose authority is
//! an upstream name. Names not in the config are refused; the edge never picks an address.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Request, Response, StatusCode};
use protocol::stream::{sanitize_reason, DialFailure, REASON_HEADER};
use protocol::NodeName;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};
use tunnel_io::pipe::{pipe_metered, PipeConfig, PipeEnd};

use crate::lifecycle::Stop;
use crate::Shared;

/// `[upstreams]`: name → address the server dials for edges.
pub type UpstreamMap = BTreeMap<String, String>;

/// Upstream budgets per node, shared by all of a node's upstream connections to this server:
/// each open upstream stream and each dial in progress holds a server descriptor, and any
/// local process on a node can open them (the edge's forward port is on loopback).
/// All nodes together share one more budget, a part of the process's open-file limit, so
/// the descriptors kept in reserve stay available to the listeners, sessions and frontends.
#[derive(Default)]
pub struct NodeUpstreams {
    nodes: Mutex<HashMap<NodeName, Arc<NodeBudget>>>,
    total: std::sync::OnceLock<(usize, Arc<Semaphore>)>,
}

/// Share of the open-file limit upstream streams may use when `edge.max_upstream_streams`
/// is not set: a quarter, leaving three quarters for edge sessions, frontend tunnels (two
/// descriptors each on the server: client socket, plus the session they share) and the
/// listeners.
pub const UPSTREAM_SHARE_OF_FILE_LIMIT: usize = 4;
/// Budget when the open-file limit cannot be read (or is unlimited).
const UPSTREAM_FALLBACK_BUDGET: usize = 4096;

/// The soft open-file limit of this process, from `/proc/self/limits` (Linux).
pub fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_file_limit(&limits)
}

fn parse_open_file_limit(limits: &str) -> Option<usize> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One node's upstream budget.
struct NodeBudget {
    streams: Arc<Semaphore>,
    dials: Semaphore,
}

impl NodeUpstreams {
    /// The server-wide upstream stream budget: `edge.max_upstream_streams`, or a quarter of
    /// the open-file limit.
    fn total(&self, shared: &Shared) -> &(usize, Arc<Semaphore>) {
        self.total.get_or_init(|| {
            let n = shared.config.edge.max_upstream_streams.unwrap_or_else(|| {
                open_file_limit()
                    .map(|limit| (limit / UPSTREAM_SHARE_OF_FILE_LIMIT).max(1))
                    .unwrap_or(UPSTREAM_FALLBACK_BUDGET)
            });
            (n, Arc::new(Semaphore::new(n)))
        })
    }

    fn budget(&self, node: &NodeName, shared: &Shared) -> Arc<NodeBudget> {
        let edge = &shared.config.edge;
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes
            .entry(node.clone())
            .or_insert_with(|| {
                Arc::new(NodeBudget {
                    streams: Arc::new(Semaphore::new(edge.max_upstream_streams_per_node)),
                    dials: Semaphore::new(edge.max_upstream_dials_per_node),
                })
            })
            .clone()
    }
}

/// Check upstream names and addresses; the message names the key.
pub fn validate(upstreams: &UpstreamMap) -> Result<(), String> {
    for (name, address) in upstreams {
        let name_ok = !name.is_empty()
            && name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(format!(
                "key `upstreams.{name}`: names are 1-63 characters of [a-z0-9-]"
            ));
        }
        let port_ok = address
            .rsplit_once(':')
            .and_then(|(host, port)| (!host.is_empty()).then_some(port))
            .and_then(|p| p.parse::<u16>().ok())
            .is_some_and(|p| p != 0);
        if !port_ok {
            return Err(format!(
                "key `upstreams.{name}`: {address:?} is not host:port"
            ));
        }
    }
    Ok(())
}

/// Serve one upstream connection from an authenticated edge until it closes or the server
/// stops.
pub async fn serve<T>(
    io: T,
    node: NodeName,
    cert_der: Vec<u8>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    stop: Stop,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut connection = match shared
        .config
        .h2
        .server_builder()
        .handshake::<_, Bytes>(io)
        .await
    {
        Ok(c) => c,
        Err(error) => {
            warn!(%node, %peer, %error, "upstream connection: HTTP/2 handshake failed");
            return;
        }
    };
    info!(%node, %peer, "upstream connection established");
    let budget = shared.upstreams.budget(&node, &shared);
    let streams = tokio_util::task::TaskTracker::new();
    // Cuts this connection's streams: at hard stop, or when the node is revoked (a stream
    // opened before the revocation must not echo on until EOF or the idle timeout).
    let cut = stop.hard.child_token();
    let revoked = crate::revocation::until_revoked(
        shared.revocations.clone(),
        node.clone(),
        crate::pki::issued_unix(&cert_der),
    );
    tokio::pin!(revoked);
    loop {
        tokio::select! {
            biased;
            _ = stop.hard.cancelled() => break,
            _ = &mut revoked => {
                warn!(target: "audit", event = "node_revoked", %node, %peer, open_streams = streams.len(), "node revoked: upstream connection and its streams closed");
                cut.cancel();
                break;
            }
            _ = stop.drain.cancelled() => {
                connection.graceful_shutdown();
                while let Some(Ok(_)) = connection.accept().await {}
                break;
            }
            accepted = connection.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    let Ok(slot) = budget.streams.clone().try_acquire_owned() else {
                        let limit = shared.config.edge.max_upstream_streams_per_node;
                        shared.metrics.upstream.stream("overloaded");
                        refuse(respond, DialFailure::Overloaded, &format!("{limit} upstream streams of this node already open"));
                        continue;
                    };
                    let (total, all) = shared.upstreams.total(&shared);
                    let Ok(global) = all.clone().try_acquire_owned() else {
                        shared.metrics.upstream.stream("overloaded");
                        warn!(%node, total, "upstream refused: the server's upstream budget is exhausted");
                        refuse(respond, DialFailure::Overloaded, &format!("the server's {total} upstream streams are all in use"));
                        continue;
                    };
                    let budget = budget.clone();
                    let shared = shared.clone();
                    let node = node.clone();
                    let cut = cut.clone();
                    let der = cert_der.clone();
                    streams.spawn(async move {
                        forward(request, respond, &node, &der, &shared, &budget, &cut).await;
                        drop((slot, global));
                    });
                }
                Some(Err(error)) => {
                    debug!(%node, %error, "upstream connection ended");
                    break;
                }
                None => break,
            },
        }
    }
    streams.close();
    streams.wait().await;
}

fn refuse(mut respond: SendResponse<Bytes>, failure: DialFailure, reason: &str) {
    let response = Response::builder()
        .status(failure.status())
        .header(REASON_HEADER, sanitize_reason(reason))
        .body(());
    if let Ok(response) = response {
        let _ = respond.send_response(response, true);
    }
}

async fn forward(
    request: Request<RecvStream>,
    respond: SendResponse<Bytes>,
    node: &NodeName,
    cert_der: &[u8],
    shared: &Shared,
    budget: &NodeBudget,
    cancel: &tokio_util::sync::CancellationToken,
) {
    let started = Instant::now();
    let name = request
        .uri()
        .authority()
        .map(|a| a.host().to_owned())
        .unwrap_or_default();
    let metrics = &shared.metrics.upstream;
    if request.method() != Method::CONNECT {
        metrics.stream("bad_request");
        refuse(
            respond,
            DialFailure::PolicyDenied,
            "only CONNECT to an upstream name",
        );
        return;
    }
    // Every stream is authorized, not only the handshake: a revoked node loses its upstreams
    // at once, even on a connection opened before the revocation.
    if shared.revocations.as_ref().is_some_and(|r| {
        r.refresh();
        r.der_revoked(node, cert_der)
    }) {
        metrics.stream("node_revoked");
        warn!(target: "audit", %node, upstream = name, "upstream refused: node revoked");
        refuse(respond, DialFailure::PolicyDenied, "node revoked");
        return;
    }
    let Some(address) = shared.config.upstreams.get(&name) else {
        metrics.stream("not_configured");
        warn!(target: "audit", %node, upstream = name, "upstream refused: not configured");
        refuse(
            respond,
            DialFailure::PolicyDenied,
            &format!("upstream {name:?} is not configured on the server"),
        );
        return;
    };
    let Ok(dialing) = budget.dials.try_acquire() else {
        let limit = shared.config.edge.max_upstream_dials_per_node;
        metrics.stream("overloaded");
        refuse(
            respond,
            DialFailure::Overloaded,
            &format!("{limit} upstream dials of this node already pending"),
        );
        return;
    };
    let mut respond = respond;
    let timeout = shared.config.connect.dial_timeout;
    let dial = tokio::time::timeout(timeout, TcpStream::connect(address.as_str()));
    // A stream reset by the edge cancels its dial (and a stream reset before this point is
    // never dialed): rapid reset must not turn into server descriptors.
    let reset = std::future::poll_fn(|cx| respond.poll_reset(cx));
    let dialed = tokio::select! {
        biased;
        _ = reset => {
            metrics.stream("cancelled");
            debug!(%node, upstream = name, "upstream stream reset by the edge; dial cancelled");
            return;
        }
        dialed = dial => dialed,
    };
    drop(dialing);
    let tcp = match dialed {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let reason = format!("connect upstream {name} ({address}): {e}");
            metrics.stream("refused");
            info!(target: "audit", %node, upstream = name, result = "refused", reason, "upstream dial failed");
            refuse(respond, DialFailure::Refused, &reason);
            return;
        }
        Err(_) => {
            let reason = format!("connect upstream {name} ({address}): timed out");
            metrics.stream("timeout");
            info!(target: "audit", %node, upstream = name, result = "timeout", reason, "upstream dial failed");
            refuse(respond, DialFailure::Timeout, &reason);
            return;
        }
    };
    tunnel_io::set_nodelay(&tcp);
    metrics.stream("ok");
    let send = match Response::builder().status(StatusCode::OK).body(()) {
        Ok(ok) => match respond.send_response(ok, false) {
            Ok(send) => send,
            Err(_) => return,
        },
        Err(_) => return,
    };
    let report = pipe_metered(
        tcp,
        send,
        request.into_body(),
        Bytes::new(),
        PipeConfig {
            write_timeout: shared.config.connect.write_timeout,
            idle_timeout: shared.config.connect.idle_timeout,
        },
        metrics,
        cancel,
    )
    .await;
    let result = match &report.result {
        Ok(PipeEnd::Complete) => "ok".to_string(),
        Ok(PipeEnd::SocketLeft) => "ok: upstream closed".to_string(),
        Err(e) => e.to_string(),
    };
    info!(
        target: "audit",
        %node,
        upstream = name,
        result,
        bytes_to_upstream = report.stream_to_socket,
        bytes_from_upstream = report.socket_to_stream,
        duration_ms = started.elapsed().as_millis() as u64,
        "upstream stream closed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_file_limit_is_read_from_proc_limits() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             62987                62987                processes \n\
                      Max open files            4096                 524288               files     \n";
        assert_eq!(parse_open_file_limit(limits), Some(4096));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_open_file_limit(unlimited), None);
        assert!(open_file_limit().is_some_and(|n| n > 0));
    }

    #[test]
    fn upstream_names_and_addresses_are_checked() {
        let mut m = UpstreamMap::new();
        m.insert("kube-apiserver".into(), "10.0.0.1:6443".into());
        assert!(validate(&m).is_ok());
        m.insert("Bad_Name".into(), "10.0.0.1:6443".into());
        assert!(validate(&m).unwrap_err().contains("Bad_Name"));
        m.remove("Bad_Name");
        m.insert("x".into(), "no-port".into());
        assert!(validate(&m).unwrap_err().contains("upstreams.x"));
    }
}
