//! Checksummed payloads: seeded pseudo-random bytes (so each end can compute what the other
//! should have sent), SHA-256 while reading or writing, and the small request header the
//! checksum peer understands. "Nothing lost" is checked as equal length and equal digest.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes per write: large writes are what bulk clients do and what the tunnel is tuned for.
pub const CHUNK: usize = 256 << 10;
/// Mixed into a request's seed to get the reply's seed, so the two directions differ.
pub const REPLY_SALT: u64 = 0x5eed_5a17_0000_0001;
/// One MiB, for readable sizes.
pub const MIB: u64 = 1 << 20;

/// A SHA-256 digest.
pub type Digest32 = [u8; 32];

/// An endless seeded pseudo-random byte stream.
pub struct Seeded(StdRng);

impl Seeded {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Seeded {
        Seeded(StdRng::seed_from_u64(seed))
    }

    /// Fill `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        self.0.fill_bytes(buf);
    }
}

/// The digest of the first `len` bytes of the stream for `seed`, computed independently of
/// any transfer.
pub fn seeded_digest(seed: u64, len: u64) -> Digest32 {
    let mut rng = Seeded::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        rng.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    hasher.finalize().into()
}

/// Write the first `len` bytes of the stream for `seed` in [`CHUNK`] pieces; returns their
/// digest. `progress` is called with the running total after every completed write.
pub async fn write_seeded<W: AsyncWrite + Unpin>(
    writer: &mut W,
    seed: u64,
    len: u64,
    mut progress: impl FnMut(u64),
) -> std::io::Result<Digest32> {
    let mut rng = Seeded::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    while written < len {
        let n = (len - written).min(CHUNK as u64) as usize;
        rng.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        writer.write_all(&buf[..n]).await?;
        written += n as u64;
        progress(written);
    }
    writer.flush().await?;
    Ok(hasher.finalize().into())
}

/// Read until EOF, hashing; returns the byte count and the digest.
pub async fn read_hashing<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<(u64, Digest32)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hasher.finalize().into()));
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// What a client asks the checksum peer for; sent as the first [`PeerRequest::LEN`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRequest {
    /// Seed of the client's payload; the reply uses `seed ^ REPLY_SALT`. Also the key under
    /// which the peer reports.
    pub seed: u64,
    /// Bytes the peer writes back.
    pub reply_len: u64,
    /// Write the reply only after reading EOF (tests half-close); otherwise concurrently.
    pub reply_after_eof: bool,
}

impl PeerRequest {
    /// Encoded length.
    pub const LEN: usize = 24;

    /// Little-endian seed, reply length and flags.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..8].copy_from_slice(&self.seed.to_le_bytes());
        out[8..16].copy_from_slice(&self.reply_len.to_le_bytes());
        out[16..].copy_from_slice(&u64::from(self.reply_after_eof).to_le_bytes());
        out
    }

    /// Inverse of [`PeerRequest::encode`].
    pub fn decode(bytes: &[u8; Self::LEN]) -> PeerRequest {
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w)
        };
        PeerRequest {
            seed: word(0),
            reply_len: word(1),
            reply_after_eof: word(2) & 1 == 1,
        }
    }
}

/// The client's view of one checksummed exchange.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// Payload bytes sent after the header.
    pub sent: u64,
    /// Digest of the payload sent.
    pub sent_digest: Digest32,
    /// Bytes received before EOF.
    pub received: u64,
    /// Digest of what was received.
    pub received_digest: Digest32,
    /// From the first byte written to EOF read.
    pub elapsed: Duration,
}

/// Over an established tunnel to the checksum peer: send `request`, then `send_len` seeded
/// bytes and a write shutdown, while reading and hashing everything until EOF.
pub async fn exchange<S>(
    stream: S,
    request: PeerRequest,
    send_len: u64,
) -> std::io::Result<Exchange>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let write = async {
        writer.write_all(&request.encode()).await?;
        let digest = write_seeded(&mut writer, request.seed, send_len, |_| {}).await?;
        writer.shutdown().await?;
        Ok::<_, std::io::Error>(digest)
    };
    let read = read_hashing(&mut reader);
    let (sent_digest, (received, received_digest)) = tokio::try_join!(write, read)?;
    Ok(Exchange {
        sent: send_len,
        sent_digest,
        received,
        received_digest,
        elapsed: started.elapsed(),
    })
}

/// Decimal megabytes per second.
pub fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

/// Short hex of a digest for messages.
pub fn hex(digest: &Digest32) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}
