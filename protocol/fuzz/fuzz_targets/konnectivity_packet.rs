//! Feeds arbitrary bytes to the Konnectivity packet decoder; whatever it accepts must encode
//! and decode back to the same packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::konnectivity::Packet;

fuzz_target!(|data: &[u8]| {
    if let Ok(packet) = Packet::decode(data) {
        assert_eq!(Packet::decode(packet.to_bytes()).as_ref(), Ok(&packet));
    }
});
