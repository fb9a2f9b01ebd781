//! A Konnectivity frontend client as kube-apiserver's konnectivity-client behaves: one gRPC
//! connection, one `/ProxyService/Proxy` stream per tunneled connection, one DIAL_REQ per
//! stream, wait for DIAL_RSP, CLOSE_REQ on close. Written on raw h2 (not tonic) so the server
//! is tested against an independent gRPC framing, and so tests can send malformed bytes.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use http::{HeaderMap, Request};
use protocol::konnectivity::{DialRequest, DialResponse, Packet};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tunnel_io::pipe::{send_all, PipeConfig};

/// Longest a test waits for any single packet or window: generous, never infinite.
pub const STEP: Duration = Duration::from_secs(20);

/// One gRPC (HTTP/2) connection to the frontend.
#[derive(Clone)]
pub struct GrpcConn {
    send_request: h2::client::SendRequest<Bytes>,
}

impl GrpcConn {
    /// HTTP/2 over an established socket (Unix or TLS with ALPN `h2`).
    pub async fn handshake<S>(io: S) -> anyhow::Result<GrpcConn>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send_request, connection) = h2::client::Builder::new()
            .initial_window_size(8 << 20)
            .initial_connection_window_size(64 << 20)
            .handshake(io)
            .await
            .context("HTTP/2 handshake with the konnectivity frontend")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(GrpcConn { send_request })
    }

    /// Open a `Proxy` stream (no packet sent yet).
    pub async fn open(&self) -> anyhow::Result<ProxyStream> {
        self.call("/ProxyService/Proxy", &[]).await
    }

    /// Open a bidirectional call of `path` with extra request `metadata` (no packet sent
    /// yet); `/AgentService/Connect` for a stock agent.
    pub async fn call(&self, path: &str, metadata: &[(&str, &str)]) -> anyhow::Result<ProxyStream> {
        let mut sender = self.send_request.clone().ready().await?;
        let mut request = Request::builder()
            .method("POST")
            .uri(format!("http://konnectivity{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (name, value) in metadata {
            request = request.header(*name, *value);
        }
        let request = request.body(())?;
        let (response, send) = sender.send_request(request, false)?;
        Ok(ProxyStream {
            sender: Sender { send },
            receiver: Receiver {
                response: Some(response),
                headers: None,
                recv: None,
                buf: BytesMut::new(),
            },
        })
    }
}

/// How a stream ended, from the client's view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcStatus {
    /// `grpc-status` (0 = OK).
    pub code: u32,
    /// `grpc-message`.
    pub message: String,
}

/// One `Proxy` stream.
pub struct ProxyStream {
    /// Sending half.
    pub sender: Sender,
    /// Receiving half.
    pub receiver: Receiver,
}

/// The receiving half of a `Proxy` stream.
pub struct Receiver {
    response: Option<h2::client::ResponseFuture>,
    headers: Option<HeaderMap>,
    recv: Option<RecvStream>,
    buf: BytesMut,
}

/// The sending half of a `Proxy` stream.
pub struct Sender {
    send: SendStream<Bytes>,
}

fn pipe_config() -> PipeConfig {
    PipeConfig {
        write_timeout: STEP,
        idle_timeout: None,
    }
}

impl Sender {
    /// Send one packet in gRPC framing, respecting HTTP/2 flow control.
    pub async fn send(&mut self, packet: &Packet) -> anyhow::Result<()> {
        self.send_raw(packet.to_bytes()).await
    }

    /// Send arbitrary message bytes in gRPC framing (for malformed-packet tests).
    pub async fn send_raw(&mut self, message: Bytes) -> anyhow::Result<()> {
        let mut framed = BytesMut::with_capacity(5 + message.len());
        framed.put_u8(0);
        framed.put_u32(message.len() as u32);
        framed.put_slice(&message);
        send_all(&mut self.send, framed.freeze(), pipe_config())
            .await
            .map_err(|e| anyhow!("send: {e}"))
    }
}

impl Receiver {
    async fn body(&mut self) -> anyhow::Result<&mut RecvStream> {
        if let Some(response) = self.response.take() {
            let response = tokio::time::timeout(STEP, response)
                .await
                .context("no response headers")??;
            anyhow::ensure!(response.status() == 200, "HTTP {}", response.status());
            self.headers = Some(response.headers().clone());
            if let Some(status) = grpc_status(response.headers()) {
                // Trailers-only response: the stream is over.
                if status.code != 0 {
                    bail!(StreamFailed(status));
                }
            }
            self.recv = Some(response.into_body());
        }
        self.recv.as_mut().context("stream already ended")
    }

    /// The response headers, waiting for them; a call refused at once fails with its
    /// [`StreamFailed`] status.
    pub async fn headers(&mut self) -> anyhow::Result<HeaderMap> {
        self.body().await?;
        Ok(self.headers.clone().unwrap_or_default())
    }

    /// The next packet; `Ok(None)` when the server ended the stream with status OK; an error
    /// ([`StreamFailed`] for a gRPC error status) otherwise.
    pub async fn recv(&mut self) -> anyhow::Result<Option<Packet>> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes(self.buf[1..5].try_into().unwrap()) as usize;
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let message = self.buf.split_to(len);
                    return Ok(Some(Packet::decode(message.freeze())?));
                }
            }
            let body = self.body().await?;
            let next = tokio::time::timeout(STEP, body.data())
                .await
                .context("no packet from the server")?;
            match next {
                Some(Ok(chunk)) => {
                    let _ = body.flow_control().release_capacity(chunk.len());
                    self.buf.extend_from_slice(&chunk);
                }
                Some(Err(e)) => bail!("stream broke: {e}"),
                None => {
                    let trailers = tokio::time::timeout(STEP, body.trailers())
                        .await
                        .context("no trailers")??
                        .unwrap_or_default();
                    let status = grpc_status(&trailers).unwrap_or(GrpcStatus {
                        code: 2,
                        message: "no grpc-status".into(),
                    });
                    anyhow::ensure!(self.buf.is_empty(), "stream ended inside a message");
                    if status.code == 0 {
                        return Ok(None);
                    }
                    bail!(StreamFailed(status));
                }
            }
        }
    }
}

/// The server ended the stream with a gRPC error.
#[derive(Debug)]
pub struct StreamFailed(pub GrpcStatus);

impl std::fmt::Display for StreamFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "grpc-status {}: {}", self.0.code, self.0.message)
    }
}
impl std::error::Error for StreamFailed {}

/// The gRPC status an error carries, if it is one.
pub fn status_of(error: &anyhow::Error) -> Option<&GrpcStatus> {
    error.downcast_ref::<StreamFailed>().map(|s| &s.0)
}

fn grpc_status(headers: &HeaderMap) -> Option<GrpcStatus> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some(GrpcStatus { code, message })
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match decoded {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ProxyStream {
    /// Split into halves that can be used from two tasks.
    pub fn split(self) -> (Sender, Receiver) {
        (self.sender, self.receiver)
    }

    /// Send one packet.
    pub async fn send(&mut self, packet: &Packet) -> anyhow::Result<()> {
        self.sender.send(packet).await
    }

    /// Send raw message bytes.
    pub async fn send_raw(&mut self, message: Bytes) -> anyhow::Result<()> {
        self.sender.send_raw(message).await
    }

    /// Receive one packet.
    pub async fn recv(&mut self) -> anyhow::Result<Option<Packet>> {
        self.receiver.recv().await
    }

    /// DIAL_REQ and wait for DIAL_RSP: the connect ID, or the server's error text.
    pub async fn dial(
        &mut self,
        address: &str,
        random: i64,
    ) -> anyhow::Result<Result<i64, String>> {
        self.send(&Packet::DialRequest(DialRequest {
            protocol: "tcp".into(),
            address: address.into(),
            random,
        }))
        .await?;
        match self.recv().await? {
            Some(Packet::DialResponse(DialResponse { random: r, result })) => {
                anyhow::ensure!(r == random, "DIAL_RSP for dial {r}, expected {random}");
                Ok(result)
            }
            other => bail!("expected DIAL_RSP, got {other:?}"),
        }
    }
}

/// A dialed connection as a byte stream: what an HTTP or TLS client runs on. A pump task
/// turns bytes into DATA packets and back; closing the returned stream sends CLOSE_REQ.
pub struct Tunnel {
    /// The application's end.
    pub io: DuplexStream,
    /// Resolves with how the connection ended: `Ok(true)` when the server's CLOSE_RSP came.
    pub done: tokio::task::JoinHandle<anyhow::Result<bool>>,
}

/// Turn a dialed stream into a [`Tunnel`].
pub fn tunnel(stream: ProxyStream, connect_id: i64) -> Tunnel {
    let (io, pump) = tokio::io::duplex(256 << 10);
    let (mut sender, mut receiver) = stream.split();
    let done = tokio::spawn(async move {
        let (mut rd, mut wr) = tokio::io::split(pump);
        let up = async {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = rd.read(&mut buf).await?;
                if n == 0 {
                    sender.send(&Packet::CloseRequest { connect_id }).await?;
                    return anyhow::Ok(());
                }
                sender
                    .send(&Packet::Data {
                        connect_id,
                        data: Bytes::copy_from_slice(&buf[..n]),
                        error: None,
                    })
                    .await?;
            }
        };
        let down = async {
            loop {
                match receiver.recv().await? {
                    Some(Packet::Data {
                        connect_id: id,
                        data,
                        ..
                    }) if id == connect_id => {
                        wr.write_all(&data).await?;
                    }
                    Some(Packet::CloseResponse {
                        connect_id: id,
                        error,
                    }) if id == connect_id => {
                        let _ = wr.shutdown().await;
                        if let Some(error) = error {
                            bail!("CLOSE_RSP with error: {error}");
                        }
                        return anyhow::Ok(true);
                    }
                    Some(other) => bail!("unexpected {other:?}"),
                    None => return Ok(false),
                }
            }
        };
        // The connection is over when the server says so (CLOSE_RSP or end of stream).
        tokio::pin!(down);
        tokio::select! {
            r = &mut down => r,
            r = up => {
                r?;
                down.await
            }
        }
    });
    Tunnel { io, done }
}
