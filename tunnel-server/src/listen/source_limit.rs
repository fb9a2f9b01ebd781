//! Per-source connection caps for listeners that accept connections before any credential is
//! seen (the edge listener's handshakes, the registration API's unauthenticated connections).
//! One source must not be able to hold every slot of a listener: a global cap alone lets a
//! single machine starve everyone. The source is the PROXY header's address when the listener
//! takes one from a trusted balancer, else the TCP peer. IPv6 sources are counted per /64,
//! since one host usually owns a whole /64 and could otherwise spread over 2^64 addresses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The key a source is counted under: the IPv4 address, or the /64 of an IPv6 address
/// (IPv4-mapped IPv6 counts as the IPv4 address).
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// Connections held per source, each at most `max`.
#[derive(Debug)]
pub struct SourceLimit {
    max: usize,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One connection counted against its source; released when dropped.
#[derive(Debug)]
pub struct SourceSlot {
    key: IpAddr,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl SourceLimit {
    /// At most `max` connections per source at once.
    pub fn new(max: usize) -> SourceLimit {
        SourceLimit {
            max,
            held: Arc::default(),
        }
    }

    /// Count one more connection from `ip`, or `None` when its source already holds `max`.
    pub fn try_acquire(&self, ip: IpAddr) -> Option<SourceSlot> {
        let key = source_key(ip);
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let count = held.entry(key).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            key,
            held: self.held.clone(),
        })
    }

    /// Connections `ip`'s source holds now.
    pub fn held(&self, ip: IpAddr) -> usize {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.get(&source_key(ip)).copied().unwrap_or(0)
    }

    /// Sources holding at least one connection (the map never keeps empty entries).
    pub fn sources(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = held.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_source_is_capped_and_others_are_not() {
        let limit = SourceLimit::new(2);
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let b: IpAddr = "198.51.100.8".parse().unwrap();
        let first = limit.try_acquire(a).unwrap();
        let _second = limit.try_acquire(a).unwrap();
        assert!(limit.try_acquire(a).is_none());
        assert!(limit.try_acquire(b).is_some());
        drop(first);
        assert!(limit.try_acquire(a).is_some());
    }

    #[test]
    fn released_sources_leave_no_entry() {
        let limit = SourceLimit::new(4);
        let slots: Vec<_> = (0..3)
            .map(|i| limit.try_acquire(IpAddr::from([10, 0, 0, i])).unwrap())
            .collect();
        assert_eq!(limit.sources(), 3);
        drop(slots);
        assert_eq!(limit.sources(), 0);
    }

    #[test]
    fn ipv6_counts_per_slash_64_and_mapped_ipv4_as_ipv4() {
        let limit = SourceLimit::new(1);
        let _one = limit
            .try_acquire("2001:db8:1:2::1".parse().unwrap())
            .unwrap();
        assert!(limit
            .try_acquire("2001:db8:1:2:ffff::9".parse().unwrap())
            .is_none());
        assert!(limit
            .try_acquire("2001:db8:1:3::1".parse().unwrap())
            .is_some());
        let _v4 = limit.try_acquire("192.0.2.1".parse().unwrap()).unwrap();
        assert!(limit
            .try_acquire("::ffff:192.0.2.1".parse().unwrap())
            .is_none());
    }
}
