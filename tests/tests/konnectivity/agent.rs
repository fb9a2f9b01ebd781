//! A stock Konnectivity `proxy-agent` as far as the tests need one: `/AgentService/Connect`
//! over TLS with a client certificate, `agentid`/`agentidentifiers` metadata, `serverid` and
//! `servercount` read from the response headers before any packet, and dials served by
//! dialing the requested port on 127.0.0.1. Like the real agent it carries every connection
//! on its one stream, reads targets in 32 KiB pieces and has no per-connection flow control:
//! a target that produces faster than its frontend reads keeps the agent sending, as far as
//! the HTTP/2 window of its one stream allows. And like grpc-go under the real agent, it
//! drops its stream (and with it every connection) shortly after the server sends GOAWAY.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use protocol::konnectivity::{DialRequest, DialResponse, Packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::client::{GrpcConn, Receiver, Sender};
use super::goaway::GoawayWatch;
use super::setup::Rig;

/// What a real agent reads from a target at once.
const READ_CHUNK: usize = 32 << 10;
/// Packets the agent queues for its one stream before its target readers wait.
const OUT_QUEUE: usize = 64;
/// Dials to this port are never answered, like a target that drops SYNs, so tests can
/// cancel them or lose the agent mid-dial.
pub const HOLD_PORT: u16 = 9;
/// How long after a GOAWAY the agent drops its stream: a stock agent's gRPC channel leaves
/// READY on GOAWAY, and the agent closed its connections about 0.4 s later when tried.
const GOAWAY_DROP: Duration = Duration::from_millis(400);

/// Counts of what the server sent, for assertions.
#[derive(Debug, Default)]
pub struct Seen {
    /// DIAL_REQ packets.
    pub dials: AtomicUsize,
    /// CLOSE_REQ packets.
    pub close_requests: AtomicUsize,
    /// DIAL_CLS packets.
    pub dial_cancels: AtomicUsize,
    /// DRAIN packets.
    pub drains: AtomicUsize,
    /// HTTP/2 GOAWAY frames on the agent's connection (at most 1 is counted).
    pub goaways: AtomicUsize,
}

/// An attached agent.
pub struct StockAgent {
    /// The `serverid` response header.
    pub server_id: String,
    /// The `servercount` response header.
    pub server_count: String,
    /// What the server sent so far.
    pub seen: Arc<Seen>,
    /// Ends when the server ends the stream: `Ok` for grpc-status 0.
    pub done: JoinHandle<anyhow::Result<()>>,
    sending: JoinHandle<()>,
}

type Conns = Arc<Mutex<HashMap<i64, Conn>>>;

struct Conn {
    to_target: mpsc::UnboundedSender<Bytes>,
    reader: tokio::task::AbortHandle,
}

impl StockAgent {
    /// Connect to `rig`'s agent listener with a certificate for `node`/`cert_ips` and the
    /// given metadata; wait for the response headers. A refusal is the error (a
    /// `client::StreamFailed` carrying the gRPC status).
    pub async fn attach(
        rig: &Rig,
        node: &str,
        cert_ips: &[std::net::IpAddr],
        agent_id: &str,
        identifiers: &str,
    ) -> anyhow::Result<StockAgent> {
        let addr = rig.agent_addr();
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let tls = tokio_rustls::TlsConnector::from(rig.agent_tls(node, cert_ips))
            .connect(name, tcp)
            .await
            .context("TLS to the agent listener")?;
        let tls = GoawayWatch::new(tls);
        let goaway = tls.seen();
        let conn = GrpcConn::handshake(tls).await?;
        let mut metadata = vec![("agentid", agent_id)];
        if !identifiers.is_empty() {
            metadata.push(("agentidentifiers", identifiers));
        }
        let stream = conn.call("/AgentService/Connect", &metadata).await?;
        let (sender, mut receiver) = stream.split();
        // The server answers with its identity before any packet.
        let headers = receiver.headers().await?;
        let header = |name: &str| -> anyhow::Result<String> {
            Ok(headers
                .get(name)
                .with_context(|| format!("no {name} response header"))?
                .to_str()?
                .to_owned())
        };
        let (server_id, server_count) = (header("serverid")?, header("servercount")?);
        let seen = Arc::new(Seen::default());
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let sending = tokio::spawn(send_packets(sender, out_rx));
        let done = tokio::spawn(serve(receiver, out, seen.clone()));
        let (stop_serving, stop_sending) = (done.abort_handle(), sending.abort_handle());
        let goaway_seen = seen.clone();
        tokio::spawn(async move {
            goaway.cancelled().await;
            goaway_seen.goaways.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(GOAWAY_DROP).await;
            stop_serving.abort();
            stop_sending.abort();
        });
        Ok(StockAgent {
            server_id,
            server_count,
            seen,
            done,
            sending,
        })
    }

    /// Lose the agent: its stream and connection go away without a word.
    pub fn kill(&self) {
        self.done.abort();
        self.sending.abort();
    }
}

async fn send_packets(mut sender: Sender, mut packets: mpsc::Receiver<Packet>) {
    while let Some(packet) = packets.recv().await {
        if sender.send(&packet).await.is_err() {
            return;
        }
    }
}

/// The agent's receive loop.
async fn serve(
    mut receiver: Receiver,
    out: mpsc::Sender<Packet>,
    seen: Arc<Seen>,
) -> anyhow::Result<()> {
    let conns: Conns = Arc::default();
    let next_id = Arc::new(AtomicI64::new(1));
    loop {
        let packet = match receiver.recv().await {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(()),
            // Idle agents wait far longer than the client's per-packet step.
            Err(e) if e.to_string().contains("no packet from the server") => continue,
            Err(e) => return Err(e),
        };
        match packet {
            Packet::DialRequest(request) => {
                seen.dials.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(dial(request, out.clone(), conns.clone(), next_id.clone()));
            }
            Packet::Data {
                connect_id, data, ..
            } => {
                if let Some(conn) = conns.lock().unwrap().get(&connect_id) {
                    let _ = conn.to_target.send(data);
                }
            }
            Packet::CloseRequest { connect_id } => {
                seen.close_requests.fetch_add(1, Ordering::Relaxed);
                if let Some(conn) = conns.lock().unwrap().remove(&connect_id) {
                    conn.reader.abort();
                }
                let _ = out
                    .send(Packet::CloseResponse {
                        connect_id,
                        error: None,
                    })
                    .await;
            }
            Packet::CloseDial { .. } => {
                seen.dial_cancels.fetch_add(1, Ordering::Relaxed);
            }
            Packet::Drain => {
                seen.drains.fetch_add(1, Ordering::Relaxed);
            }
            Packet::DialResponse(_) | Packet::CloseResponse { .. } => {}
        }
    }
}

async fn dial(
    request: DialRequest,
    out: mpsc::Sender<Packet>,
    conns: Conns,
    next_id: Arc<AtomicI64>,
) {
    let DialRequest {
        address, random, ..
    } = request;
    let port = address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok());
    if port == Some(HOLD_PORT) {
        return;
    }
    let socket = match port {
        Some(port) => TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("dial tcp {address}: {e}")),
        None => Err(format!("bad address {address}")),
    };
    let socket = match socket {
        Ok(s) => s,
        Err(error) => {
            let _ = out
                .send(Packet::DialResponse(DialResponse {
                    random,
                    result: Err(error),
                }))
                .await;
            return;
        }
    };
    let _ = socket.set_nodelay(true);
    let connect_id = next_id.fetch_add(1, Ordering::Relaxed);
    let (mut rd, mut wr) = socket.into_split();
    let (to_target, mut from_server) = mpsc::unbounded_channel::<Bytes>();
    tokio::spawn(async move {
        while let Some(data) = from_server.recv().await {
            if wr.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = wr.shutdown().await;
    });
    let (go, ready) = tokio::sync::oneshot::channel::<()>();
    let reader_out = out.clone();
    let reader_conns = conns.clone();
    let reader = tokio::spawn(async move {
        // DATA only after DIAL_RSP, as the protocol requires.
        if ready.await.is_err() {
            return;
        }
        let mut buf = vec![0u8; READ_CHUNK];
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let packet = Packet::Data {
                connect_id,
                data: Bytes::copy_from_slice(&buf[..n]),
                error: None,
            };
            if reader_out.send(packet).await.is_err() {
                return;
            }
        }
        // The target closed first: tell the server unasked.
        if reader_conns.lock().unwrap().remove(&connect_id).is_some() {
            let _ = reader_out
                .send(Packet::CloseResponse {
                    connect_id,
                    error: None,
                })
                .await;
        }
    });
    // Known before the server can send DATA for it.
    conns.lock().unwrap().insert(
        connect_id,
        Conn {
            to_target,
            reader: reader.abort_handle(),
        },
    );
    let _ = out
        .send(Packet::DialResponse(DialResponse {
            random,
            result: Ok(connect_id),
        }))
        .await;
    let _ = go.send(());
}
