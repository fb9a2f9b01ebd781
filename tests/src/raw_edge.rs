//! An edge that speaks HTTP/2 by hand, frame by frame, over a real TLS session with a real
//! edge certificate: for attacks an h2 library will not send (endless header blocks, PING and
//! SETTINGS floods). It plays the HTTP/2 server of a tunnel session, as `tunnel-edge` does.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::pki::Pki;

/// Frame type HEADERS.
pub const HEADERS: u8 = 0x1;
/// Frame type SETTINGS.
pub const SETTINGS: u8 = 0x4;
/// Frame type PING.
pub const PING: u8 = 0x6;
/// Frame type CONTINUATION.
pub const CONTINUATION: u8 = 0x9;
/// Flag END_STREAM.
pub const END_STREAM: u8 = 0x1;
/// Flag END_HEADERS (and ACK on SETTINGS/PING).
pub const END_HEADERS: u8 = 0x4;
/// Largest frame payload this helper reads; the server sends nothing near it.
const MAX_READ_FRAME: usize = 1 << 20;
/// The client connection preface the server (HTTP/2 client) sends first.
const PREFACE: usize = 24;

/// One hand-driven edge session.
pub struct RawEdge {
    tls: TlsStream<TcpStream>,
}

impl RawEdge {
    /// TLS to the edge listener as `node` with `ips`, read the server's preface and send
    /// our (empty) SETTINGS.
    pub async fn connect(
        pki: &Pki,
        server: SocketAddr,
        node: &str,
        ips: &[IpAddr],
    ) -> std::io::Result<RawEdge> {
        Self::connect_from(pki, server, node, ips, crate::flood::source(1), b"").await
    }

    /// As [`RawEdge::connect`], from the local address `from`, sending `prefix` (a PROXY
    /// header, say) before TLS.
    pub async fn connect_from(
        pki: &Pki,
        server: SocketAddr,
        node: &str,
        ips: &[IpAddr],
        from: IpAddr,
        prefix: &[u8],
    ) -> std::io::Result<RawEdge> {
        let alpn = tunnel_io::tls::ALPN_EDGE_SESSION;
        Self::connect_as(pki, server, (node, ips), alpn, from, prefix).await
    }

    /// A session's lane (ALPN `tether-lane/1`) as `node`, with a certificate of its own (a
    /// new one, not the session's).
    pub async fn connect_lane(
        pki: &Pki,
        server: SocketAddr,
        node: &str,
        ips: &[IpAddr],
    ) -> std::io::Result<RawEdge> {
        let alpn = tunnel_io::tls::ALPN_LANE;
        Self::connect_as(pki, server, (node, ips), alpn, crate::flood::source(1), b"").await
    }

    async fn connect_as(
        pki: &Pki,
        server: SocketAddr,
        (node, ips): (&str, &[IpAddr]),
        alpn: &[u8],
        from: IpAddr,
        prefix: &[u8],
    ) -> std::io::Result<RawEdge> {
        let files = pki.issue_edge(node, ips);
        let config = tunnel_io::tls::client_config_mtls(
            &pki.layout.ca_cert(),
            &files.cert,
            &files.key,
            &[alpn],
        )
        .map_err(std::io::Error::other)?;
        let mut tcp = crate::flood::connect_from(from, server).await?;
        tcp.set_nodelay(true)?;
        tcp.write_all(prefix).await?;
        let name = rustls::pki_types::ServerName::IpAddress(server.ip().into());
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        let mut preface = [0u8; PREFACE];
        tls.read_exact(&mut preface).await?;
        let mut edge = RawEdge { tls };
        edge.write_frame(SETTINGS, 0, 0, &[]).await?;
        Ok(edge)
    }

    /// Write one frame.
    pub async fn write_frame(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        self.tls
            .write_all(&frame(kind, flags, stream, payload))
            .await
    }

    /// Write raw bytes (several frames at once).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.tls.write_all(bytes).await
    }

    /// Read one frame: (type, flags, stream, payload).
    pub async fn read_frame(&mut self) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
        let mut head = [0u8; 9];
        self.tls.read_exact(&mut head).await?;
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        if len > MAX_READ_FRAME {
            return Err(std::io::Error::other(format!("frame of {len} bytes")));
        }
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        self.tls.read_exact(&mut payload).await?;
        Ok((head[3], head[4], stream, payload))
    }

    /// Read frames (acknowledging SETTINGS) until the server opens a stream; its ID.
    pub async fn next_request(&mut self) -> std::io::Result<u32> {
        loop {
            let (kind, flags, stream, _) = self.read_frame().await?;
            if kind == SETTINGS && flags & 0x1 == 0 {
                self.write_frame(SETTINGS, 0x1, 0, &[]).await?;
            }
            if kind == HEADERS {
                return Ok(stream);
            }
        }
    }

    /// Answer `stream` with `200` and no body (the session-info confirm).
    pub async fn answer_ok(&mut self, stream: u32) -> std::io::Result<()> {
        // 0x88: `:status: 200` from the HPACK static table.
        self.write_frame(HEADERS, END_HEADERS | END_STREAM, stream, &[0x88])
            .await
    }

    /// Keep reading until the server closes the connection (or fails it); frames are
    /// acknowledged where needed and otherwise dropped.
    pub async fn until_closed(&mut self) {
        let mut buf = vec![0u8; 64 << 10];
        while matches!(self.tls.read(&mut buf).await, Ok(n) if n > 0) {}
    }
}

/// One frame's bytes.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = Vec::with_capacity(9 + len);
    f.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK literal header field without indexing, new name (RFC 7541 §6.2.2).
pub fn hpack_literal(name: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = vec![0x00];
    hpack_string(&mut out, name);
    hpack_string(&mut out, value);
    out
}

fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    // Not Huffman-coded; length as an integer with a 7-bit prefix.
    let mut len = s.len();
    if len < 127 {
        out.push(len as u8);
    } else {
        out.push(127);
        len -= 127;
        while len >= 128 {
            out.push((len % 128) as u8 | 0x80);
            len /= 128;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s);
}
