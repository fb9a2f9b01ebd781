//! Real sockets on 127.0.0.1: the kernel's grant against the host's `net.core.*mem_max`.

use std::io::Write;
use std::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

/// A sysctl of /proc/sys/net/core, in bytes.
fn core_sysctl(name: &str) -> usize {
    let path = format!("/proc/sys/net/core/{name}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Log lines written while `f` runs.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let sink = Sink(Arc::new(Mutex::new(Vec::new())));
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&sink.0.lock().unwrap()).into_owned();
    (out, text)
}

/// The socket answers: a datagram to itself comes back.
fn echoes(socket: &UdpSocket) {
    socket.set_nonblocking(false).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    socket
        .send_to(b"ping", socket.local_addr().unwrap())
        .unwrap();
    let mut buf = [0u8; 8];
    let (n, _) = socket.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping");
}

#[test]
fn quic_socket_gets_the_ask_up_to_the_hosts_max() {
    let (rmem_max, wmem_max) = (core_sysctl("rmem_max"), core_sysctl("wmem_max"));
    let ((socket, buffers), _) =
        logged(|| bind_udp("127.0.0.1:0".parse().unwrap(), QUIC_SOCKET_BUFFER).unwrap());
    let read_back = socket2::SockRef::from(&socket);
    let (recv, send) = (
        read_back.recv_buffer_size().unwrap(),
        read_back.send_buffer_size().unwrap(),
    );
    assert!(
        recv >= QUIC_SOCKET_BUFFER.min(rmem_max),
        "SO_RCVBUF {recv} < min(ask, rmem_max {rmem_max})"
    );
    assert!(
        send >= QUIC_SOCKET_BUFFER.min(wmem_max),
        "SO_SNDBUF {send} < min(ask, wmem_max {wmem_max})"
    );
    assert_eq!(buffers.recv, QUIC_SOCKET_BUFFER.min(rmem_max));
    assert_eq!(buffers.send, QUIC_SOCKET_BUFFER.min(wmem_max));
    // Larger than what a socket gets unasked, wherever the host allows more.
    let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
    let default = socket2::SockRef::from(&plain).recv_buffer_size().unwrap();
    if rmem_max * 2 > default {
        assert!(
            recv > default,
            "SO_RCVBUF {recv} not above the default {default}"
        );
    }
    echoes(&socket);
}

#[test]
fn ask_above_rmem_max_warns_naming_the_sysctl_and_still_binds() {
    let rmem_max = core_sysctl("rmem_max");
    let asked = rmem_max.max(core_sysctl("wmem_max")) + 1024 * 1024;
    let ((socket, buffers), log) =
        logged(|| bind_udp("127.0.0.1:0".parse().unwrap(), asked).unwrap());
    assert_eq!(buffers.recv, rmem_max);
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    assert_eq!(warnings.len(), 1, "one warning expected:\n{log}");
    let warning = warnings[0];
    assert!(warning.contains("net.core.rmem_max"), "{warning}");
    assert!(warning.contains("net.core.wmem_max"), "{warning}");
    assert!(
        warning.contains(&format!("receive {rmem_max}")),
        "{warning}"
    );
    assert!(warning.contains(&asked.to_string()), "{warning}");
    echoes(&socket);
}

#[test]
fn ask_within_the_max_logs_no_warning() {
    let asked = core_sysctl("rmem_max").min(core_sysctl("wmem_max")) / 2;
    let ((_socket, buffers), log) =
        logged(|| bind_udp("127.0.0.1:0".parse().unwrap(), asked).unwrap());
    assert_eq!(buffers.shortfall(), None, "{buffers:?}");
    assert!(!log.contains("WARN"), "{log}");
}
