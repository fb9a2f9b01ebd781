//! A UDP relay for QUIC tests, the datagram sibling of [`crate::relay`]: it forwards each
//! client address's datagrams to one target through its own upstream socket and the
//! replies back, and can black-hole everything (UDP blocked by a firewall that drops, the
//! case `transport = "auto"` must get past within its bound). Bounded: at most
//! [`MAX_CLIENTS`] client addresses, each pump stops with the relay.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// Client addresses one relay serves; datagrams from more are dropped.
pub const MAX_CLIENTS: usize = 64;
/// Largest datagram relayed: QUIC never sends more than 1452 bytes on Ethernet-sized
/// paths; 64 KiB holds any UDP datagram.
const MAX_DATAGRAM: usize = 65_535;

/// A running UDP relay.
pub struct UdpRelay {
    /// Where clients send.
    pub addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    cancel: CancellationToken,
}

impl UdpRelay {
    /// Relay datagrams sent to `bind` (port 0: any) to `target`.
    pub async fn start(bind: SocketAddr, target: SocketAddr) -> std::io::Result<UdpRelay> {
        let socket = Arc::new(UdpSocket::bind(bind).await?);
        let addr = socket.local_addr()?;
        let blackhole = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        let clients: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
        let (hole, lost, stop) = (blackhole.clone(), dropped.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                let (n, from) = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = socket.recv_from(&mut buf) => match r {
                        Ok(r) => r,
                        Err(_) => continue,
                    },
                };
                if hole.load(Ordering::Relaxed) {
                    lost.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let known = clients.lock().unwrap().get(&from).cloned();
                let upstream = match known {
                    Some(up) => up,
                    None => {
                        if clients.lock().unwrap().len() >= MAX_CLIENTS {
                            lost.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        let Ok(up) = UdpSocket::bind("127.0.0.1:0").await else {
                            continue;
                        };
                        if up.connect(target).await.is_err() {
                            continue;
                        }
                        let up = Arc::new(up);
                        clients.lock().unwrap().insert(from, up.clone());
                        let (back, up2, stop2, hole2) =
                            (socket.clone(), up.clone(), stop.clone(), hole.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; MAX_DATAGRAM];
                            loop {
                                let n = tokio::select! {
                                    _ = stop2.cancelled() => return,
                                    r = up2.recv(&mut buf) => match r {
                                        Ok(n) => n,
                                        Err(_) => continue,
                                    },
                                };
                                if !hole2.load(Ordering::Relaxed) {
                                    let _ = back.send_to(&buf[..n], from).await;
                                }
                            }
                        });
                        up
                    }
                };
                let _ = upstream.send(&buf[..n]).await;
            }
        });
        Ok(UdpRelay {
            addr,
            blackhole,
            dropped,
            cancel,
        })
    }

    /// Drop every datagram either way (`true`), or forward again (`false`).
    pub fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::Relaxed);
    }

    /// Datagrams from clients dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
