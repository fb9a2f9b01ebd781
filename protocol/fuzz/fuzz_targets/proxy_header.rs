//! Feeds arbitrary bytes to the PROXY v1/v2 header reader (`tunnel_server::proxy_protocol`),
//! whole and in small reads, and checks that both deliveries agree, that nothing past the
//! header is consumed (TLS follows it on the same socket), that no more than a v1 line or a
//! bounded v2 block is read, and that an accepted v1 address prints back to the same address.
#![no_main]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};
use tunnel_server::proxy_protocol::read_header;

/// v2: 12-byte signature + 4 fixed bytes + the largest block the reader accepts (1024).
const MAX_CONSUMED: usize = 16 + 1024;

/// An in-memory socket that hands out at most `piece` bytes per read and counts what it gave.
struct Drip<'a> {
    data: &'a [u8],
    pos: usize,
    piece: usize,
}

impl AsyncRead for Drip<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self
            .piece
            .min(buf.remaining())
            .min(self.data.len() - self.pos);
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Drive a future whose reads are always ready; the reader never waits on anything else.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..100_000 {
        if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("the PROXY reader returned Pending on an always-ready stream");
}

/// The header's outcome (errors by their text) and how many bytes it consumed.
fn run(data: &[u8], piece: usize) -> (Result<Option<SocketAddr>, String>, usize) {
    let mut drip = Drip {
        data,
        pos: 0,
        piece,
    };
    let result = block_on(read_header(&mut drip)).map_err(|e| e.to_string());
    (result, drip.pos)
}

fuzz_target!(|data: &[u8]| {
    let (whole, used) = run(data, data.len().max(1));
    let (split, split_used) = run(data, 1);
    assert_eq!(whole, split);
    assert!(used <= MAX_CONSUMED, "consumed {used} bytes");
    if whole.is_ok() {
        // Exactly the header, not a byte of what follows.
        assert_eq!(used, split_used);
        if data.starts_with(b"PROXY ") {
            let end = data.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
            assert_eq!(used, end);
        } else {
            let len = u16::from_be_bytes([data[14], data[15]]) as usize;
            assert_eq!(used, 16 + len);
        }
    }
    if let (Ok(Some(addr)), true) = (&whole, data.starts_with(b"PROXY ")) {
        // An accepted source prints back into a header that reads the same.
        let (family, dst) = if addr.is_ipv4() {
            ("TCP4", "10.0.0.1")
        } else {
            ("TCP6", "fd00::1")
        };
        let line = format!("PROXY {family} {} {dst} {} 443\r\n", addr.ip(), addr.port());
        assert_eq!(run(line.as_bytes(), 3).0, Ok(Some(*addr)), "{line:?}");
    }
});
