//! Feeds arbitrary bytes to the QUIC stream-head decoder (`protocol::quic_head`): it never
//! panics, never asks for more than one bounded frame, and whatever it accepts encodes back
//! to the same bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use protocol::quic_head::{decode, encode, MAX_HEAD_LEN};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    if let Ok(Some(head)) = decode(&mut buf) {
        let used = data.len() - buf.len();
        assert!(used <= 2 + MAX_HEAD_LEN);
        let mut again = BytesMut::new();
        encode(&head, &mut again).expect("a decoded head encodes");
        assert_eq!(&again[..], &data[..used]);
    }
});
