//! What the tunnel dials in tests, all on 127.0.0.1 with kernel-chosen ports: a half-close
//! honouring echo server, the checksum peer, a firehose that writes until it is blocked, and
//! a TCP→Unix-socket byte bridge (curl cannot CONNECT over a Unix socket). Each runs as tasks
//! on the test's runtime and stops when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::data::{self, hex, seeded_digest, Digest32, Exchange, PeerRequest, REPLY_SALT};

async fn bind_loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}

/// Aborts the accept loop (and with it nothing else: connection tasks end with their peers
/// or with the runtime) when dropped.
struct AcceptTask(JoinHandle<()>);

impl Drop for AcceptTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Echoes every byte until EOF, then shuts down its write side.
pub struct EchoServer {
    /// Where it listens.
    pub addr: SocketAddr,
    _task: AcceptTask,
}

impl EchoServer {
    /// Bind and serve.
    pub async fn start() -> EchoServer {
        let listener = bind_loopback().await;
        let addr = listener.local_addr().expect("echo address");
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(async move {
                    let (mut reader, mut writer) = tcp.into_split();
                    if tokio::io::copy(&mut reader, &mut writer).await.is_ok() {
                        let _ = writer.shutdown().await;
                    }
                });
            }
        });
        EchoServer {
            addr,
            _task: AcceptTask(task),
        }
    }
}

/// What the checksum peer saw on one connection.
#[derive(Debug, Clone)]
pub struct PeerReport {
    /// The request it got (`None` when the header never arrived).
    pub request: Option<PeerRequest>,
    /// Payload bytes read after the header, until EOF.
    pub read: u64,
    /// Their digest.
    pub read_digest: Digest32,
    /// Bytes written back.
    pub written: u64,
    /// Their digest.
    pub written_digest: Digest32,
    /// The first I/O error, if any.
    pub error: Option<String>,
}

impl PeerReport {
    /// Check both directions of one exchange: what the target read is what the client sent,
    /// and what the client read is the reply the request asked for (computed independently
    /// from its seed) and what the target wrote.
    pub fn assert_matches(&self, label: &str, request: PeerRequest, sent: u64, client: &Exchange) {
        assert_eq!(self.error, None, "{label}: the peer failed");
        assert_eq!(
            self.request,
            Some(request),
            "{label}: the peer got another request"
        );
        assert_eq!(self.read, sent, "{label}: bytes the target read");
        assert_eq!(
            hex(&self.read_digest),
            hex(&client.sent_digest),
            "{label}: digest of what the target read"
        );
        assert_eq!(
            client.received, request.reply_len,
            "{label}: bytes the client read"
        );
        let expected = seeded_digest(request.seed ^ REPLY_SALT, request.reply_len);
        assert_eq!(
            hex(&client.received_digest),
            hex(&expected),
            "{label}: digest of what the client read"
        );
        assert_eq!(
            hex(&self.written_digest),
            hex(&expected),
            "{label}: digest of what the target wrote"
        );
    }
}

/// Reads a [`PeerRequest`], then hashes everything it reads until EOF while writing
/// `reply_len` seeded bytes (after EOF if asked), then shuts down its write side. Reports
/// each connection on a channel.
pub struct ChecksumPeer {
    /// Where it listens.
    pub addr: SocketAddr,
    reports: mpsc::UnboundedReceiver<PeerReport>,
    _task: AcceptTask,
}

impl ChecksumPeer {
    /// Bind and serve.
    pub async fn start() -> ChecksumPeer {
        let listener = bind_loopback().await;
        let addr = listener.local_addr().expect("peer address");
        let (tx, reports) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(serve_peer(tcp).await);
                });
            }
        });
        ChecksumPeer {
            addr,
            reports,
            _task: AcceptTask(task),
        }
    }

    /// The next connection's report, in completion order.
    pub async fn next_report(&mut self) -> PeerReport {
        self.reports.recv().await.expect("checksum peer stopped")
    }
}

async fn serve_peer(tcp: TcpStream) -> PeerReport {
    let _ = tcp.set_nodelay(true);
    let mut report = PeerReport {
        request: None,
        read: 0,
        read_digest: [0; 32],
        written: 0,
        written_digest: [0; 32],
        error: None,
    };
    let (mut reader, mut writer) = tcp.into_split();
    let mut header = [0u8; PeerRequest::LEN];
    if let Err(e) = reader.read_exact(&mut header).await {
        report.error = Some(format!("reading the request header: {e}"));
        return report;
    }
    let request = PeerRequest::decode(&header);
    report.request = Some(request);
    let (eof_tx, eof_rx) = tokio::sync::oneshot::channel::<()>();
    let read = async {
        let result = data::read_hashing(&mut reader).await;
        let _ = eof_tx.send(());
        result
    };
    let write = async {
        if request.reply_after_eof {
            let _ = eof_rx.await;
        }
        let digest = data::write_seeded(
            &mut writer,
            request.seed ^ REPLY_SALT,
            request.reply_len,
            |_| {},
        )
        .await?;
        writer.shutdown().await?;
        Ok::<_, std::io::Error>(digest)
    };
    let (read, write) = tokio::join!(read, write);
    match read {
        Ok((n, digest)) => {
            report.read = n;
            report.read_digest = digest;
        }
        Err(e) => report.error = Some(format!("read: {e}")),
    }
    match write {
        Ok(digest) => {
            report.written = request.reply_len;
            report.written_digest = digest;
        }
        Err(e) => {
            report.error.get_or_insert(format!("write: {e}"));
        }
    }
    report
}

/// Writes seeded bytes (seed [`Firehose::SEED`]) as fast as the connection takes them, up to
/// a cap, counting what the kernel accepted; reads and discards its input meanwhile.
pub struct Firehose {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Bytes written so far on all connections.
    pub written: Arc<AtomicU64>,
    /// The cap per connection.
    pub cap: u64,
    _task: AcceptTask,
}

impl Firehose {
    /// Seed of the bytes written.
    pub const SEED: u64 = 0xf1_2e_40_5e;

    /// Bind and serve, writing `cap` bytes per connection.
    pub async fn start(cap: u64) -> Firehose {
        let listener = bind_loopback().await;
        let addr = listener.local_addr().expect("firehose address");
        let written = Arc::new(AtomicU64::new(0));
        let counter = written.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let counter = counter.clone();
                tokio::spawn(async move {
                    let (mut reader, mut writer) = tcp.into_split();
                    tokio::spawn(async move {
                        let mut sink = tokio::io::sink();
                        let _ = tokio::io::copy(&mut reader, &mut sink).await;
                    });
                    let mut last = 0u64;
                    let progress = |total: u64| {
                        counter.fetch_add(total - last, Ordering::Relaxed);
                        last = total;
                    };
                    if data::write_seeded(&mut writer, Self::SEED, cap, progress)
                        .await
                        .is_ok()
                    {
                        let _ = writer.shutdown().await;
                    }
                });
            }
        });
        Firehose {
            addr,
            written,
            cap,
            _task: AcceptTask(task),
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// Accepts TCP on 127.0.0.1 and relays each connection's bytes to a Unix socket and back,
/// passing half-close on in both directions.
pub struct UnixBridge {
    /// Where it listens.
    pub addr: SocketAddr,
    _task: AcceptTask,
}

impl UnixBridge {
    /// Bind and relay to `socket`.
    pub async fn start(socket: PathBuf) -> UnixBridge {
        let listener = bind_loopback().await;
        let addr = listener.local_addr().expect("bridge address");
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let socket = socket.clone();
                tokio::spawn(async move {
                    let Ok(unix) = UnixStream::connect(&socket).await else {
                        return;
                    };
                    let (mut tcp_read, mut tcp_write) = tcp.into_split();
                    let (mut unix_read, mut unix_write) = unix.into_split();
                    let up = async {
                        let r = tokio::io::copy(&mut tcp_read, &mut unix_write).await;
                        let _ = unix_write.shutdown().await;
                        r
                    };
                    let down = async {
                        let r = tokio::io::copy(&mut unix_read, &mut tcp_write).await;
                        let _ = tcp_write.shutdown().await;
                        r
                    };
                    let _ = tokio::join!(up, down);
                });
            }
        });
        UnixBridge {
            addr,
            _task: AcceptTask(task),
        }
    }
}

/// Writes `chunks` seeded pieces of `chunk` bytes (seed [`Drip::SEED`]), one every
/// `interval`, then closes: traffic in one direction only, spread over time.
pub struct Drip {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Bytes each connection writes in total.
    pub total: u64,
    _task: AcceptTask,
}

impl Drip {
    /// Seed of the bytes written.
    pub const SEED: u64 = 0xd1_1f;

    /// Bind and serve.
    pub async fn start(chunk: usize, chunks: usize, interval: std::time::Duration) -> Drip {
        let listener = bind_loopback().await;
        let addr = listener.local_addr().expect("drip address");
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                tokio::spawn(async move {
                    let mut rng = data::Seeded::new(Self::SEED);
                    let mut buf = vec![0u8; chunk];
                    for i in 0..chunks {
                        if i > 0 {
                            tokio::time::sleep(interval).await;
                        }
                        rng.fill(&mut buf);
                        if tcp.write_all(&buf).await.is_err() {
                            return;
                        }
                    }
                    let _ = tcp.shutdown().await;
                });
            }
        });
        Drip {
            addr,
            total: (chunk * chunks) as u64,
            _task: AcceptTask(task),
        }
    }
}
