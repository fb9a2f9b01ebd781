//! PROXY protocol v1/v2 on a listener behind a load balancer (haproxy `send-proxy[-v2]`,
//! cloud NLBs): read exactly the header, no byte more (TLS follows), and return the real
//! client address. When enabled on a listener, a missing or malformed header refuses the
//! connection: a client must not be able to choose its own apparent address by omission.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature (12 bytes).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes including CRLF.
const V1_MAX: usize = 107;
/// Largest v2 address + TLV block we accept (TLVs from cloud balancers are small).
const V2_MAX_PAYLOAD: usize = 1024;

/// Why a PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The connection closed or failed while reading.
    #[error("reading PROXY header: {0}")]
    Io(#[from] std::io::Error),
    /// The connection does not start with a PROXY v1 or v2 signature.
    #[error("no PROXY protocol header (expected from the load balancer)")]
    Missing,
    /// A v1 line longer than the protocol allows.
    #[error("PROXY v1 header longer than {V1_MAX} bytes")]
    TooLong,
    /// The v2 address block is larger than we accept.
    #[error("PROXY v2 header announces {0} bytes")]
    V2TooLarge(usize),
    /// The parser refused the header.
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
}

/// Read one PROXY header from `stream` and return the client's address: the header's
/// source, or `peer` (the balancer's own connection) for a `LOCAL`/`UNKNOWN` header.
pub async fn client_address<S: AsyncRead + Unpin>(
    stream: &mut S,
    peer: SocketAddr,
) -> Result<SocketAddr, ProxyHeaderError> {
    Ok(read_header(stream).await?.unwrap_or(peer))
}

/// Read one PROXY header from `stream`. Returns the original source address, or `None`
/// for a `LOCAL`/`UNKNOWN` header (health checks from the balancer itself).
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut header = vec![0u8; 12];
    stream.read_exact(&mut header).await?;
    if &header[..] == V2_SIGNATURE {
        let mut fixed = [0u8; 4];
        stream.read_exact(&mut fixed).await?;
        header.extend_from_slice(&fixed);
        let len = u16::from_be_bytes([fixed[2], fixed[3]]) as usize;
        if len > V2_MAX_PAYLOAD {
            return Err(ProxyHeaderError::V2TooLarge(len));
        }
        let start = header.len();
        header.resize(start + len, 0);
        stream.read_exact(&mut header[start..]).await?;
        return match ppp::v2::Header::try_from(&header[..]) {
            Ok(h) => Ok(match h.addresses {
                ppp::v2::Addresses::IPv4(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v2::Addresses::IPv6(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                _ => None,
            }),
            Err(e) => Err(ProxyHeaderError::Malformed(e.to_string())),
        };
    }
    if !header.starts_with(b"PROXY ") {
        return Err(ProxyHeaderError::Missing);
    }
    // v1: a text line; read byte by byte so nothing after CRLF is consumed.
    while !header.ends_with(b"\r\n") {
        if header.len() >= V1_MAX {
            return Err(ProxyHeaderError::TooLong);
        }
        header.push(stream.read_u8().await?);
    }
    match ppp::v1::Header::try_from(&header[..]) {
        Ok(h) => Ok(match h.addresses {
            ppp::v1::Addresses::Tcp4(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v1::Addresses::Tcp6(a) => {
                Some(SocketAddr::from((a.source_address, a.source_port)))
            }
            ppp::v1::Addresses::Unknown => None,
        }),
        Err(e) => Err(ProxyHeaderError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> (Result<Option<SocketAddr>, ProxyHeaderError>, Vec<u8>) {
        let mut cursor = std::io::Cursor::new(bytes.to_vec());
        let result = read_header(&mut cursor).await;
        let pos = cursor.position() as usize;
        (result, bytes[pos..].to_vec())
    }

    #[tokio::test]
    async fn v1_gives_the_source_and_leaves_the_rest() {
        let (r, rest) = read(b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 9000\r\n\x16\x03\x01").await;
        assert_eq!(r.unwrap(), Some("198.51.100.7:40000".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01");
    }

    #[tokio::test]
    async fn v2_gives_the_source_and_leaves_the_rest() {
        let header = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            ppp::v2::IPv4::new([198, 51, 100, 7], [10, 0, 0, 1], 40000, 9000),
        )
        .build()
        .unwrap();
        let mut bytes = header.clone();
        bytes.extend_from_slice(b"\x16\x03\x01");
        let (r, rest) = read(&bytes).await;
        assert_eq!(r.unwrap(), Some("198.51.100.7:40000".parse().unwrap()));
        assert_eq!(rest, b"\x16\x03\x01");
    }

    #[tokio::test]
    async fn local_and_unknown_give_no_address() {
        let (r, _) = read(b"PROXY UNKNOWN\r\n").await;
        assert_eq!(r.unwrap(), None);
    }

    #[tokio::test]
    async fn testplan_10_malformed_proxy_headers_missing_garbage_huge_or_truncated_are_refused() {
        let (r, _) = read(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00").await;
        assert!(matches!(r, Err(ProxyHeaderError::Missing)));
        let (r, _) = read(b"PROXY TCP4 not-an-address 10.0.0.1 1 2\r\n").await;
        assert!(matches!(r, Err(ProxyHeaderError::Malformed(_))));
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        let (r, _) = read(long.as_bytes()).await;
        assert!(matches!(r, Err(ProxyHeaderError::TooLong)));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        let (r, _) = read(&huge).await;
        assert!(matches!(r, Err(ProxyHeaderError::V2TooLarge(65535))));
        let (r, _) = read(b"PROX").await;
        assert!(matches!(r, Err(ProxyHeaderError::Io(_))));
    }

    /// A header dripped one byte per read (on a real pipe, so every read is short) is read
    /// whole and exactly: nothing after it is consumed, whatever the split.
    #[tokio::test]
    async fn testplan_10_slow_drip_proxy_header_one_byte_at_a_time_is_read_exactly() {
        use tokio::io::AsyncWriteExt;
        let v2 = ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            ppp::v2::IPv4::new([198, 51, 100, 7], [10, 0, 0, 1], 40000, 9000),
        )
        .build()
        .unwrap();
        let v1 = b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 9000\r\n".to_vec();
        for header in [v1, v2] {
            let (mut client, mut server) = tokio::io::duplex(1);
            let mut bytes = header.clone();
            bytes.extend_from_slice(b"\x16\x03\x01");
            let drip = tokio::spawn(async move {
                for b in bytes {
                    client.write_all(&[b]).await.unwrap();
                    tokio::task::yield_now().await;
                }
                client
            });
            let source = read_header(&mut server).await.unwrap();
            assert_eq!(source, Some("198.51.100.7:40000".parse().unwrap()));
            let mut rest = [0u8; 3];
            server.read_exact(&mut rest).await.unwrap();
            assert_eq!(
                &rest, b"\x16\x03\x01",
                "the TLS bytes after the header are left"
            );
            drop(drip.await.unwrap());
        }
    }
}
