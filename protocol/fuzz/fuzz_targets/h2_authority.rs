//! Feeds arbitrary client bytes (after a valid preface) to the Unix-socket `:authority`
//! rewriter, whole and in pieces, and checks that it never panics, never holds more than one
//! bounded header frame, and that split delivery produces the same output as whole delivery.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use protocol::h2_authority::{Rewriter, MAX_HEADER_BLOCK};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn run(data: &[u8], piece: usize) -> (Vec<u8>, bool) {
    let mut rewriter = Rewriter::default();
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    for chunk in PREFACE.chunks(piece).chain(data.chunks(piece)) {
        input.extend_from_slice(chunk);
        if rewriter.feed(&mut input, &mut out, &mut |_| {}).is_err() {
            return (out.to_vec(), false);
        }
        // Held back: at most one header frame (bounded) plus a frame header.
        assert!(input.len() <= MAX_HEADER_BLOCK + 256 + 5 + 9 + piece);
    }
    (out.to_vec(), true)
}

fuzz_target!(|data: &[u8]| {
    let whole = run(data, data.len().max(1) + PREFACE.len());
    let split = run(data, 7);
    if whole.1 && split.1 {
        assert_eq!(whole.0, split.0);
    }
});
