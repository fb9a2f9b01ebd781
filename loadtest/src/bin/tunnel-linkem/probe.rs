//! `probe`: traffic on 127.0.0.1 to check what the link does, with figures on stdout as
//! JSON. `tcp` times connects and one-byte echoes (each a round trip, so at least twice the
//! one-way delay through the link); `udp` sends numbered datagrams and says which arrived.
//! Run it in the namespace the link runs in, on the link's port or, for a baseline, another.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a probe waits for any one reply before it gives up, in seconds: far above any
/// delay the link is run with here (tens of ms), and TCP's first SYN retransmission (1 s).
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the UDP receiver keeps reading after the last datagram was sent, in ms: the
/// link's delay plus margin; asked for as an argument because the probe does not know it.
fn udp_quiet(delay_ms: u64) -> Duration {
    Duration::from_millis(delay_ms * 2 + 200)
}

/// `count` connects to a local echo server on `port`, each followed by a one-byte echo.
pub fn tcp(port: u16, count: u32) -> anyhow::Result<Value> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
    std::thread::spawn(move || {
        for conn in listener.incoming().take(count as usize) {
            let Ok(mut conn) = conn else { continue };
            let mut b = [0u8; 1];
            if conn.read_exact(&mut b).is_ok() {
                let _ = conn.write_all(&b);
            }
        }
    });
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let (mut connect_ms, mut echo_ms) = (Vec::new(), Vec::new());
    for i in 0..count {
        let t0 = Instant::now();
        let mut c = TcpStream::connect_timeout(&addr, REPLY_TIMEOUT)?;
        connect_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        c.set_read_timeout(Some(REPLY_TIMEOUT))?;
        c.set_nodelay(true)?;
        let t1 = Instant::now();
        c.write_all(&[i as u8])?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b)?;
        anyhow::ensure!(b[0] == i as u8, "echo {i} came back as {}", b[0]);
        echo_ms.push(t1.elapsed().as_secs_f64() * 1e3);
    }
    Ok(json!({"connect_ms": connect_ms, "echo_ms": echo_ms}))
}

/// `count` numbered datagrams to `port`, `gap` apart; reports the numbers that arrived.
pub fn udp(port: u16, count: u32, gap: Duration, delay_ms: u64) -> anyhow::Result<Value> {
    let rx = UdpSocket::bind((Ipv4Addr::LOCALHOST, port))?;
    let tx = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    tx.connect((Ipv4Addr::LOCALHOST, port))?;
    let reader = std::thread::spawn(move || -> std::io::Result<Vec<u32>> {
        let quiet = udp_quiet(delay_ms);
        rx.set_read_timeout(Some(quiet))?;
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        loop {
            match rx.recv(&mut buf) {
                Ok(4) => got.push(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]])),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(got)
                }
                Err(e) => return Err(e),
            }
        }
    });
    for i in 0..count {
        tx.send(&i.to_be_bytes())?;
        std::thread::sleep(gap);
    }
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the UDP reader panicked"))??;
    Ok(json!({"sent": count, "received": got}))
}
