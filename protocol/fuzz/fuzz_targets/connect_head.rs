//! Feeds arbitrary bytes to the CONNECT head parser, whole and split in two, and
//! checks that it never panics, never consumes past its limit and that split
//! delivery agrees with whole delivery.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::connect::{parse_connect_head, HeadLimits};

fuzz_target!(|data: &[u8]| {
    // Small limits too, so the size and count checks are reached often.
    for limits in [
        HeadLimits::default(),
        HeadLimits {
            max_head_bytes: 64,
            max_headers: 2,
        },
    ] {
        let whole = parse_connect_head(data, &limits);
        if let Ok(Some(req)) = &whole {
            assert!(req.head_len <= data.len());
            assert!(req.head_len <= limits.max_head_bytes);
            assert!(protocol::Target::parse(&req.target.to_string()).as_ref() == Ok(&req.target));
            // Any prefix that stops before the end of the head is incomplete or
            // already rejected, never a different complete request.
            let prefix = &data[..req.head_len - 1];
            if let Ok(Some(other)) = parse_connect_head(prefix, &limits) {
                panic!("prefix parsed as {other:?}, whole as {req:?}");
            }
        }
    }
});
