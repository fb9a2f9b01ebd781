//! Feeds arbitrary stream-open metadata to the parsers on both ends of a tunneled stream
//! (`protocol::stream`, `protocol::target`): the `:authority` target the edge dials, the
//! `tether-client` header it logs, and the status and `tether-reason` the server reads back.
//! Sanitized text is one short printable line that is a valid header value and is stable;
//! statuses map to failures and back consistently; a target that passes through the
//! `:authority` of an h2 request parses to the same target as the raw text.
#![no_main]

use http::uri::Authority;
use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use protocol::stream::{sanitize_reason, DialFailure, MAX_REASON_LEN};
use protocol::Target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let status = u16::from_be_bytes([data[0], data[1]]);
    let text = String::from_utf8_lossy(&data[2..]);

    // Reason and client text: sanitized before it becomes a header value or a log field.
    let clean = sanitize_reason(&text);
    assert!(clean.len() <= MAX_REASON_LEN);
    assert!(clean.bytes().all(|b| (b' '..=b'~').contains(&b)));
    assert_eq!(sanitize_reason(&clean), clean);
    assert!(HeaderValue::from_str(&clean).is_ok(), "{clean:?}");

    // The status an edge answers with.
    if let Some(failure) = DialFailure::from_status(status) {
        assert_eq!(failure.status(), status);
        assert!(DialFailure::ALL.contains(&failure));
    }

    // The `:authority` of a CONNECT, as the edge receives it through `http`.
    if let Ok(authority) = Authority::try_from(&data[2..]) {
        let via_h2 = Target::parse(authority.as_str());
        if let Ok(raw) = std::str::from_utf8(&data[2..]) {
            assert_eq!(via_h2, Target::parse(raw));
        }
        if let Ok(target) = via_h2 {
            // What the server writes into `:authority` for this target is accepted by `http`
            // and reads back to the same target on the edge.
            let shown = target.to_string();
            let sent = Authority::try_from(shown.as_str()).expect(&shown);
            assert_eq!(Target::parse(sent.as_str()).as_ref(), Ok(&target));
        }
    }
});
