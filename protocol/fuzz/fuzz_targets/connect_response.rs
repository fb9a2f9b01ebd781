//! Feeds arbitrary bytes to the parser of a proxy's answer to CONNECT (what an edge behind
//! an HTTP egress proxy reads), whole and byte by byte, and checks that it never panics,
//! never claims a head past its limit or past the input, and that incremental delivery
//! finds the same head as whole delivery.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::connect::{parse_connect_response, HeadLimits};

fuzz_target!(|data: &[u8]| {
    for limits in [
        HeadLimits::default(),
        HeadLimits {
            max_head_bytes: 64,
            max_headers: 2,
        },
    ] {
        let whole = parse_connect_response(data, &limits);
        if let Ok(Some(r)) = &whole {
            assert!(r.head_len <= data.len());
            assert!(r.head_len <= limits.max_head_bytes);
            assert!(r.status_line.bytes().all(|b| (b' '..=b'~').contains(&b)));
            // The shortest prefix that parses is exactly the head.
            let first = (1..=r.head_len)
                .find_map(|n| parse_connect_response(&data[..n], &limits).ok().flatten());
            assert_eq!(first.as_ref(), Some(r));
        }
    }
});
