//! The benchmark target, run in-process on its own thread and runtime (like a separate
//! process). One port serves every scenario; the first byte a client sends picks the mode:
//! `E` echo (rr, connect, hold), `B` bulk (drain and check the upload while sending a seeded
//! download until the upload ends). It must not hold a buffer while a connection is idle,
//! so `hold` measures the path, not the target.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Mode byte: echo everything back.
pub const ECHO: u8 = b'E';
/// Mode byte: bulk both ways.
pub const BULK: u8 = b'B';
/// Seed of the client's upload pattern.
pub const UPLOAD_SEED: u64 = 1;
/// Seed of the target's download pattern.
pub const DOWNLOAD_SEED: u64 = 2;
/// Length of the repeating seeded pattern; 1 MiB keeps writes large (h2 prefers ≥ 256 KiB).
pub const PATTERN: usize = 1 << 20;

/// Upload bytes the target checked, and bytes that did not match the pattern (must stay 0).
pub static UPLOAD_CHECKED: AtomicU64 = AtomicU64::new(0);
/// Upload bytes that differed from the seeded pattern.
pub static UPLOAD_BAD: AtomicU64 = AtomicU64::new(0);

/// Deterministic pattern: the same seed gives the same bytes at both ends.
pub fn pattern(seed: u64) -> Vec<u8> {
    use rand::{Rng, SeedableRng};
    let mut data = vec![0u8; PATTERN];
    rand::rngs::StdRng::seed_from_u64(seed).fill(&mut data[..]);
    data
}

/// Count the bytes of `got` (at stream offset `offset`) that differ from the pattern.
pub fn mismatches(pattern: &[u8], offset: u64, got: &[u8]) -> u64 {
    let mut bad = 0;
    let mut pos = (offset % pattern.len() as u64) as usize;
    let mut rest = got;
    while !rest.is_empty() {
        let n = rest.len().min(pattern.len() - pos);
        if rest[..n] != pattern[pos..pos + n] {
            bad += rest[..n]
                .iter()
                .zip(&pattern[pos..pos + n])
                .filter(|(a, b)| a != b)
                .count() as u64;
        }
        rest = &rest[n..];
        pos = 0;
    }
    bad
}

/// Start the target on its own thread; returns its address.
pub fn spawn(port: u16) -> anyhow::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("target".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("target runtime");
            runtime.block_on(async move {
                let listener = match TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return eprintln!("target listener: {e}"),
                };
                let download = Arc::new(pattern(DOWNLOAD_SEED));
                let upload = Arc::new(pattern(UPLOAD_SEED));
                loop {
                    match listener.accept().await {
                        Ok((tcp, _)) => {
                            let _ = tcp.set_nodelay(true);
                            tokio::spawn(serve(tcp, download.clone(), upload.clone()));
                        }
                        // Out of descriptors and the like: skip, as accept loops should.
                        Err(_) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                    }
                }
            });
        })?;
    Ok(addr)
}

async fn serve(mut tcp: TcpStream, download: Arc<Vec<u8>>, upload: Arc<Vec<u8>>) {
    let mut mode = [0u8; 1];
    if tcp.read_exact(&mut mode).await.is_err() {
        return;
    }
    match mode[0] {
        ECHO => echo(tcp).await,
        // A bulk connection gets its own thread, as a multi-threaded kubelet would give it a
        // core: otherwise it starves the echo connections on this thread and `hol` would
        // measure the target, not the path.
        BULK => {
            let Ok(std) = tcp.into_std() else { return };
            let _ = std::thread::Builder::new()
                .name("target-bulk".into())
                .spawn(move || {
                    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    else {
                        return;
                    };
                    rt.block_on(async move {
                        if let Ok(tcp) = TcpStream::from_std(std) {
                            bulk(tcp, download, upload).await
                        }
                    });
                });
        }
        _ => {}
    }
}

/// Echo with a buffer that exists only while data is in hand.
async fn echo(mut tcp: TcpStream) {
    loop {
        if tcp.readable().await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 16 << 10];
        match tcp.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if tcp.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        }
    }
}

async fn bulk(tcp: TcpStream, download: Arc<Vec<u8>>, upload: Arc<Vec<u8>>) {
    let (mut r, mut w) = tcp.into_split();
    let done = Arc::new(Notify::new());
    let stop = done.clone();
    let drain = async move {
        let mut buf = vec![0u8; 256 << 10];
        let (mut total, mut bad) = (0u64, 0u64);
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    bad += mismatches(&upload, total, &buf[..n]);
                    total += n as u64;
                }
            }
        }
        UPLOAD_CHECKED.fetch_add(total, Ordering::SeqCst);
        UPLOAD_BAD.fetch_add(bad, Ordering::SeqCst);
        stop.notify_one();
    };
    let send = async move {
        // Send the pattern until the client's upload ends (its deadline), then close.
        loop {
            tokio::select! {
                biased;
                _ = done.notified() => break,
                r = w.write_all(&download) => if r.is_err() { break },
            }
        }
        let _ = w.shutdown().await;
    };
    tokio::join!(drain, send);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatches_follow_the_offset_across_the_wrap() {
        let p = pattern(7);
        let mut got = p[PATTERN - 10..].to_vec();
        got.extend_from_slice(&p[..10]);
        assert_eq!(mismatches(&p, (PATTERN - 10) as u64, &got), 0);
        got[15] ^= 1;
        assert_eq!(mismatches(&p, (PATTERN - 10) as u64, &got), 1);
    }
}
