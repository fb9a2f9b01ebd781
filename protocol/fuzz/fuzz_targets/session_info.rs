//! Feeds arbitrary header bytes to the session-info exchange's parsers (the server's
//! `tether-server-id` and `tether-server-count`, as the edge reads them through `http`):
//! an accepted count is in 1..=MAX_SERVER_COUNT and prints back to itself, an accepted
//! replica ID is a short plain token that is a valid header value on its own.
#![no_main]

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use protocol::stream::{parse_server_count, valid_server_id, MAX_SERVER_COUNT};

fuzz_target!(|data: &[u8]| {
    // The first byte splits the input into the two header values.
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let (id, count) = rest.split_at((cut as usize).min(rest.len()));
    // The edge only sees values h2 and `http` accepted, read with `to_str`.
    let as_header = |bytes: &[u8]| {
        HeaderValue::from_bytes(bytes)
            .ok()
            .and_then(|v| v.to_str().ok().map(str::to_owned))
    };
    if let Some(count) = as_header(count) {
        if let Some(n) = parse_server_count(&count) {
            assert!((1..=MAX_SERVER_COUNT).contains(&n), "{count:?}");
            assert_eq!(parse_server_count(&n.to_string()), Some(n));
        }
    }
    if let Some(id) = as_header(id) {
        if valid_server_id(&id) {
            assert!(!id.is_empty() && id.len() <= 64, "{id:?}");
            assert!(id.bytes().all(|b| b.is_ascii_graphic()), "{id:?}");
            // What the server sends is what the edge stores and logs, unchanged.
            let sent = HeaderValue::from_str(&id).unwrap();
            assert_eq!(sent.to_str().unwrap(), id);
        }
    }
    // Raw bytes straight from the input (including invalid UTF-8 rejected above) never pass.
    if let Ok(s) = std::str::from_utf8(rest) {
        let _ = parse_server_count(s);
        if valid_server_id(s) {
            assert!(s.len() <= 64);
        }
    }
});
