//! A fault-injecting TCP relay for the tests: listens on 127.0.0.1 (kernel port), forwards
//! every connection to an upstream, and lets a test change what happens to the bytes of each
//! direction while they flow: pass, added latency, a bandwidth cap, a blackhole (both sockets
//! stay open, nothing is forwarded: a half-open link), or a cut with FIN or RST.
//!
//! Faults are applied at the relay's writers, so a blackholed direction stops reading once its
//! small queue is full (the sender's kernel buffers fill, exactly as behind a dead link) and
//! resumes without loss when the fault is lifted, like a healed partition.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// Chunks queued between a direction's reader and its writer: with [`READ_CHUNK`], at most
/// 1 MiB is in the relay per direction.
const QUEUE_CHUNKS: usize = 16;
/// Largest read of one direction.
const READ_CHUNK: usize = 64 << 10;
/// A throttled writer sends this many slices per second, so the cap is smooth at any rate.
const THROTTLE_SLICES_PER_S: u64 = 50;

/// A direction of a relayed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the connecting client to the upstream (edge → server when the edge dials the relay).
    Up,
    /// From the upstream back to the client.
    Down,
}

impl Direction {
    /// Both directions.
    pub const BOTH: [Direction; 2] = [Direction::Up, Direction::Down];

    fn index(self) -> usize {
        match self {
            Direction::Up => 0,
            Direction::Down => 1,
        }
    }
}

/// What a direction does with its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward at once.
    Pass,
    /// Forward each chunk this long after it was read (added one-way latency).
    Delay(Duration),
    /// Forward at most this many bytes per second.
    Throttle(u64),
    /// Forward nothing; keep both sockets open.
    Blackhole,
}

/// How a direction is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The destination gets a FIN (a clean half-close); the other direction keeps flowing.
    Fin,
    /// The destination's socket is reset (`SO_LINGER` 0, then close): it sees a RST. The
    /// source side stays open with nothing forwarded, so it is left half-open unless its own
    /// direction is cut too.
    Rst,
}

/// Controls of one relayed connection.
struct ConnCtl {
    client: SocketAddr,
    modes: [watch::Sender<Mode>; 2],
    /// Per direction: its writer sends FIN and stops.
    fin: [CancellationToken; 2],
    /// Per socket (0 client, 1 upstream): close it, reset first if `rst` is set.
    kill: [CancellationToken; 2],
    rst: [AtomicBool; 2],
    /// Bytes written per direction.
    forwarded: [AtomicU64; 2],
    done: AtomicBool,
}

impl ConnCtl {
    fn set(&self, dir: Direction, mode: Mode) {
        self.modes[dir.index()].send_replace(mode);
    }

    fn cut(&self, dir: Direction, how: Cut) {
        match how {
            Cut::Fin => self.fin[dir.index()].cancel(),
            Cut::Rst => {
                // The destination of `Up` is the upstream socket, of `Down` the client's.
                let socket = match dir {
                    Direction::Up => 1,
                    Direction::Down => 0,
                };
                self.rst[socket].store(true, Ordering::Release);
                self.kill[socket].cancel();
            }
        }
    }
}

/// One relayed connection, to change its faults alone.
#[derive(Clone)]
pub struct RelayedConn(Arc<ConnCtl>);

impl RelayedConn {
    /// The client's address as the relay saw it.
    pub fn client(&self) -> SocketAddr {
        self.0.client
    }

    /// Set one direction's mode.
    pub fn set(&self, dir: Direction, mode: Mode) {
        self.0.set(dir, mode);
    }

    /// Cut one direction.
    pub fn cut(&self, dir: Direction, how: Cut) {
        self.0.cut(dir, how);
    }

    /// Bytes forwarded in `dir` so far.
    pub fn forwarded(&self, dir: Direction) -> u64 {
        self.0.forwarded[dir.index()].load(Ordering::Relaxed)
    }

    /// Whether both directions have ended.
    pub fn is_done(&self) -> bool {
        self.0.done.load(Ordering::Acquire)
    }
}

struct Shared {
    upstream: Mutex<SocketAddr>,
    defaults: Mutex<[Mode; 2]>,
    conns: Mutex<Vec<Arc<ConnCtl>>>,
    accepted: AtomicU64,
    stop: CancellationToken,
}

/// A running relay; dropping it closes the listener and every relayed connection.
pub struct Relay {
    /// Where clients connect.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: DropGuard,
}

impl Relay {
    /// Listen on 127.0.0.1 with a kernel-chosen port and relay to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay on 127.0.0.1:0");
        let addr = listener.local_addr().expect("relay address");
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            defaults: Mutex::new([Mode::Pass; 2]),
            conns: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            stop: stop.clone(),
        });
        tokio::spawn(accept_loop(listener, shared.clone()));
        Relay {
            addr,
            shared,
            _stop: stop.drop_guard(),
        }
    }

    /// Relay new connections to `upstream` from now on (live ones keep theirs).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *lock(&self.shared.upstream) = upstream;
    }

    /// Set `dir`'s mode on every live connection and on the ones accepted from now on.
    pub fn set(&self, dir: Direction, mode: Mode) {
        lock(&self.shared.defaults)[dir.index()] = mode;
        self.set_existing(dir, mode);
    }

    /// Set `dir`'s mode on the live connections only; new ones keep the default (a link that
    /// died while a fresh connection would work, like a dropped NAT mapping).
    pub fn set_existing(&self, dir: Direction, mode: Mode) {
        for conn in self.connections() {
            conn.set(dir, mode);
        }
    }

    /// Cut `dir` of every live connection.
    pub fn cut(&self, dir: Direction, how: Cut) {
        for conn in self.connections() {
            conn.cut(dir, how);
        }
    }

    /// The live connections, oldest first.
    pub fn connections(&self) -> Vec<RelayedConn> {
        let mut conns = lock(&self.shared.conns);
        conns.retain(|c| !c.done.load(Ordering::Acquire));
        conns.iter().cloned().map(RelayedConn).collect()
    }

    /// Connections accepted since start.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let Ok((client, peer)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        let upstream = *lock(&shared.upstream);
        let defaults = *lock(&shared.defaults);
        let ctl = Arc::new(ConnCtl {
            client: peer,
            modes: defaults.map(|m| watch::channel(m).0),
            fin: Default::default(),
            kill: Default::default(),
            rst: Default::default(),
            forwarded: Default::default(),
            done: AtomicBool::new(false),
        });
        lock(&shared.conns).push(ctl.clone());
        let stop = shared.stop.clone();
        tokio::spawn(async move {
            // An unreachable upstream closes the client at once, as a refused port would.
            let Ok(Ok(server)) =
                tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(upstream)).await
            else {
                ctl.done.store(true, Ordering::Release);
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            relay_conn(client, server, &ctl, &stop).await;
            ctl.done.store(true, Ordering::Release);
        });
    }
}

async fn relay_conn(client: TcpStream, server: TcpStream, ctl: &ConnCtl, stop: &CancellationToken) {
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    let up = direction(client_r, server_w, Direction::Up, (0, 1), ctl, stop);
    let down = direction(server_r, client_w, Direction::Down, (1, 0), ctl, stop);
    tokio::join!(up, down);
}

/// What a reader hands its writer.
enum Chunk {
    Data(Instant, Bytes),
    Eof,
}

/// One direction: a reader that queues chunks (stamped with their arrival) and a writer that
/// applies the direction's mode. `sockets` = (index of the source socket, of the destination).
/// Each half observes its socket's kill token, so a socket closes (with RST when asked) once
/// both of its halves, held by the two directions, are dropped.
async fn direction(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    dir: Direction,
    sockets: (usize, usize),
    ctl: &ConnCtl,
    stop: &CancellationToken,
) {
    let (tx, mut rx) = mpsc::channel::<Chunk>(QUEUE_CHUNKS);
    let kill_from = &ctl.kill[sockets.0];
    let kill_to = &ctl.kill[sockets.1];
    let reader = async move {
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(READ_CHUNK);
            let read = tokio::select! {
                _ = kill_from.cancelled() => break,
                _ = stop.cancelled() => break,
                r = from.read_buf(&mut buf) => r,
            };
            let chunk = match read {
                Ok(0) => Chunk::Eof,
                Ok(_) => Chunk::Data(Instant::now(), buf.split().freeze()),
                Err(_) => {
                    // Pass a reset on as a reset, never as a clean FIN; a blackhole holds it.
                    let mut mode = ctl.modes[dir.index()].subscribe();
                    tokio::select! {
                        _ = kill_from.cancelled() => break,
                        _ = stop.cancelled() => break,
                        _ = mode.wait_for(|m| *m != Mode::Blackhole) => {}
                    }
                    ctl.rst[sockets.1].store(true, Ordering::Release);
                    ctl.kill[sockets.1].cancel();
                    kill_from.cancel();
                    break;
                }
            };
            let eof = matches!(chunk, Chunk::Eof);
            if tx.send(chunk).await.is_err() || eof {
                break;
            }
        }
        if ctl.rst[sockets.0].load(Ordering::Acquire) {
            let _ = from.as_ref().set_zero_linger();
        }
    };
    let writer = async move {
        let mut mode = ctl.modes[dir.index()].subscribe();
        let fin = &ctl.fin[dir.index()];
        let forwarded = &ctl.forwarded[dir.index()];
        let pump = async {
            loop {
                match rx.recv().await {
                    Some(Chunk::Data(at, data)) => {
                        if write_chunk(&mut to, &mut mode, at, data, forwarded)
                            .await
                            .is_err()
                        {
                            return false;
                        }
                    }
                    // The source's clean EOF becomes our FIN, unless a blackhole holds it.
                    Some(Chunk::Eof) => {
                        let _ = mode.wait_for(|m| *m != Mode::Blackhole).await;
                        return true;
                    }
                    // The reader died (its socket was cut): leave this side open.
                    None => std::future::pending::<()>().await,
                }
            }
        };
        let send_fin = tokio::select! {
            _ = kill_to.cancelled() => false,
            _ = stop.cancelled() => false,
            _ = fin.cancelled() => true,
            f = pump => f,
        };
        if send_fin {
            let _ = to.shutdown().await;
        }
        if ctl.rst[sockets.1].load(Ordering::Acquire) {
            // Dropping a write half sends FIN first; a reset must come alone.
            let _ = to.as_ref().set_zero_linger();
            to.forget();
        }
    };
    tokio::join!(reader, writer);
}

/// Write one chunk as the current mode says; a blackhole holds it until lifted.
async fn write_chunk(
    to: &mut OwnedWriteHalf,
    mode: &mut watch::Receiver<Mode>,
    read_at: Instant,
    mut data: Bytes,
    forwarded: &AtomicU64,
) -> std::io::Result<()> {
    loop {
        let current = *mode
            .wait_for(|m| *m != Mode::Blackhole)
            .await
            .map_err(|_| std::io::ErrorKind::BrokenPipe)?;
        match current {
            Mode::Blackhole => unreachable!("waited for another mode"),
            Mode::Pass => {
                to.write_all(&data).await?;
                forwarded.fetch_add(data.len() as u64, Ordering::Relaxed);
                return Ok(());
            }
            Mode::Delay(delay) => {
                // Re-check the mode after the wait: it may have become a blackhole.
                tokio::time::sleep_until(read_at + delay).await;
                if *mode.borrow() != current {
                    continue;
                }
                to.write_all(&data).await?;
                forwarded.fetch_add(data.len() as u64, Ordering::Relaxed);
                return Ok(());
            }
            Mode::Throttle(rate) => {
                let rate = rate.max(1);
                let slice = (rate / THROTTLE_SLICES_PER_S).max(1) as usize;
                while !data.is_empty() {
                    if *mode.borrow() != current {
                        break;
                    }
                    let part = data.split_to(slice.min(data.len()));
                    let started = Instant::now();
                    to.write_all(&part).await?;
                    forwarded.fetch_add(part.len() as u64, Ordering::Relaxed);
                    let budget = Duration::from_secs_f64(part.len() as f64 / rate as f64);
                    tokio::time::sleep_until(started + budget).await;
                }
                if data.is_empty() {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::EchoServer;

    async fn relayed_echo() -> (EchoServer, Relay, TcpStream) {
        let echo = EchoServer::start().await;
        let relay = Relay::start(echo.addr).await;
        let client = TcpStream::connect(relay.addr).await.unwrap();
        client.set_nodelay(true).unwrap();
        (echo, relay, client)
    }

    async fn round_trip(client: &mut TcpStream, data: &[u8]) -> Duration {
        let started = Instant::now();
        client.write_all(data).await.unwrap();
        let mut back = vec![0u8; data.len()];
        tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut back))
            .await
            .expect("echo within 10 s")
            .unwrap();
        assert_eq!(back, data);
        started.elapsed()
    }

    #[tokio::test]
    async fn pass_forwards_both_ways_and_counts_bytes() {
        let (_echo, relay, mut client) = relayed_echo().await;
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
        round_trip(&mut client, &data).await;
        let conn = &relay.connections()[0];
        assert_eq!(conn.forwarded(Direction::Up), data.len() as u64);
        assert_eq!(conn.forwarded(Direction::Down), data.len() as u64);
        assert_eq!(relay.accepted(), 1);
    }

    #[tokio::test]
    async fn delay_adds_latency_each_way() {
        let (_echo, relay, mut client) = relayed_echo().await;
        round_trip(&mut client, b"warm").await;
        relay.set(Direction::Up, Mode::Delay(Duration::from_millis(150)));
        relay.set(Direction::Down, Mode::Delay(Duration::from_millis(100)));
        let took = round_trip(&mut client, b"slow").await;
        assert!(took >= Duration::from_millis(250), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[tokio::test]
    async fn throttle_caps_the_rate() {
        let (_echo, relay, mut client) = relayed_echo().await;
        relay.set(Direction::Down, Mode::Throttle(256 << 10));
        // 64 KiB at 256 KiB/s: about 250 ms.
        let took = round_trip(&mut client, &[7u8; 64 << 10]).await;
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[tokio::test]
    async fn blackhole_holds_bytes_with_sockets_open_and_releases_them_whole() {
        let (_echo, relay, mut client) = relayed_echo().await;
        round_trip(&mut client, b"before").await;
        relay.set(Direction::Up, Mode::Blackhole);
        client.write_all(b"held").await.unwrap();
        let mut buf = [0u8; 4];
        let waited =
            tokio::time::timeout(Duration::from_millis(300), client.read_exact(&mut buf)).await;
        assert!(waited.is_err(), "a blackhole forwarded {waited:?}");
        relay.set(Direction::Up, Mode::Pass);
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut buf))
            .await
            .expect("bytes released after the blackhole")
            .unwrap();
        assert_eq!(&buf, b"held");
    }

    #[tokio::test]
    async fn blackhole_holds_a_fin_too() {
        let (_echo, relay, mut client) = relayed_echo().await;
        round_trip(&mut client, b"x").await;
        relay.set(Direction::Down, Mode::Blackhole);
        // The echo closes after our FIN; its FIN must not cross the blackhole.
        client.shutdown().await.unwrap();
        let mut buf = [0u8; 1];
        let waited = tokio::time::timeout(Duration::from_millis(300), client.read(&mut buf)).await;
        assert!(waited.is_err(), "the FIN crossed the blackhole: {waited:?}");
        relay.set(Direction::Down, Mode::Pass);
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("FIN after the blackhole lifts");
        assert_eq!(read.unwrap(), 0);
    }

    #[tokio::test]
    async fn fin_half_closes_one_direction() {
        // The upstream sees EOF and, being an echo, closes its side: the client reads EOF.
        let (_echo, relay, mut client) = relayed_echo().await;
        round_trip(&mut client, b"x").await;
        relay.cut(Direction::Up, Cut::Fin);
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .expect("EOF after FIN")
            .unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn rst_resets_the_destination_and_leaves_the_source_open() {
        let (_echo, relay, mut client) = relayed_echo().await;
        round_trip(&mut client, b"x").await;
        relay.cut(Direction::Down, Cut::Rst);
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the reset arrives");
        let error = read.expect_err("a reset, not data or EOF");
        assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);

        // Upstream cut with RST: the client's socket stays open and silent (half-open).
        let mut client = TcpStream::connect(relay.addr).await.unwrap();
        round_trip(&mut client, b"y").await;
        relay
            .connections()
            .last()
            .unwrap()
            .cut(Direction::Up, Cut::Rst);
        client.write_all(b"lost").await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(300), client.read(&mut buf)).await;
        assert!(
            waited.is_err(),
            "the client side must stay open: {waited:?}"
        );
    }
}
