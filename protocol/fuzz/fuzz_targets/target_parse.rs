//! Feeds arbitrary strings to `Target::parse` and `NodeName::parse`; whatever
//! they accept must print back to a string that parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::{NodeName, Target};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(target) = Target::parse(s) {
        let shown = target.to_string();
        assert_eq!(Target::parse(&shown).as_ref(), Ok(&target), "{shown}");
    }
    if let Ok(name) = NodeName::parse(s) {
        assert_eq!(name.as_str(), s);
        assert!(s.parse::<std::net::Ipv4Addr>().is_err());
    }
});
