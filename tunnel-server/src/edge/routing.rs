//! The route table: which live edge session owns each node name and node IP. Identity comes
//! only from verified certificates, so the table refuses a session that would take an address
//! owned by another node, and swaps a node's old session for its new one atomically.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use protocol::{Host, NodeName};

/// What the table needs to know of a session.
pub trait Routable {
    /// Unique id of this session (a node's sessions differ in id).
    fn session_id(&self) -> u64;
    /// The node this session belongs to.
    fn node(&self) -> &NodeName;
    /// The node IPs bound in its certificate.
    fn ips(&self) -> &[IpAddr];
    /// Serial of its certificate, for audit lines (`?` when unknown).
    fn certificate_serial(&self) -> &str {
        "?"
    }
    /// Whether its certificate is the node's current one; a session with an older
    /// certificate never replaces the node's live session.
    fn certificate_current(&self) -> bool {
        true
    }
}

/// A registration the table refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteConflict {
    /// Another node owns one of the addresses.
    #[error("address {ip} is already owned by node {owner} (certificate serial {owner_serial}; refused certificate serial {serial})")]
    AddressOwned {
        /// The contested address.
        ip: IpAddr,
        /// The node that owns it.
        owner: NodeName,
        /// Serial of the owner's certificate.
        owner_serial: String,
        /// Serial of the refused session's certificate.
        serial: String,
    },
    /// The node has a live session and this one's certificate is not the node's current one.
    #[error("certificate serial {serial} is not node {node}'s current certificate; the live session (serial {live_serial}) stays")]
    NotCurrent {
        /// The node.
        node: NodeName,
        /// Serial of the refused session's certificate.
        serial: String,
        /// Serial of the live session's certificate.
        live_serial: String,
    },
}

/// Node name and node IP → live session.
pub struct RouteTable<S> {
    inner: RwLock<Inner<S>>,
}

struct Inner<S> {
    by_node: HashMap<NodeName, Arc<S>>,
    by_ip: HashMap<IpAddr, NodeName>,
}

impl<S: Routable> Default for RouteTable<S> {
    fn default() -> Self {
        RouteTable {
            inner: RwLock::new(Inner {
                by_node: HashMap::new(),
                by_ip: HashMap::new(),
            }),
        }
    }
}

impl<S: Routable> RouteTable<S> {
    /// Make `session` the route for its node and IPs. Returns the session it replaced, if
    /// any, so the caller can wind it down; refuses when another node owns one of the IPs.
    pub fn register(&self, session: Arc<S>) -> Result<Option<Arc<S>>, RouteConflict> {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        for ip in session.ips() {
            if let Some(owner) = inner.by_ip.get(ip) {
                if owner != session.node() {
                    let owner_serial = inner
                        .by_node
                        .get(owner)
                        .map_or("?", |s| s.certificate_serial())
                        .to_owned();
                    return Err(RouteConflict::AddressOwned {
                        ip: *ip,
                        owner: owner.clone(),
                        owner_serial,
                        serial: session.certificate_serial().to_owned(),
                    });
                }
            }
        }
        if !session.certificate_current() {
            if let Some(live) = inner.by_node.get(session.node()) {
                return Err(RouteConflict::NotCurrent {
                    node: session.node().clone(),
                    serial: session.certificate_serial().to_owned(),
                    live_serial: live.certificate_serial().to_owned(),
                });
            }
        }
        let replaced = inner
            .by_node
            .insert(session.node().clone(), session.clone());
        if let Some(old) = &replaced {
            for ip in old.ips() {
                inner.by_ip.remove(ip);
            }
        }
        for ip in session.ips() {
            inner.by_ip.insert(*ip, session.node().clone());
        }
        Ok(replaced)
    }

    /// Remove `session` if it is still its node's current route (a replaced session must not
    /// remove its successor). Returns whether it was removed.
    pub fn deregister(&self, session: &S) -> bool {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let current = inner
            .by_node
            .get(session.node())
            .is_some_and(|s| s.session_id() == session.session_id());
        if !current {
            return false;
        }
        inner.by_node.remove(session.node());
        for ip in session.ips() {
            inner.by_ip.remove(ip);
        }
        true
    }

    /// The session that owns `host`.
    pub fn lookup(&self, host: &Host) -> Option<Arc<S>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let node = match host {
            Host::Name(name) => name,
            Host::Ip(ip) => inner.by_ip.get(ip)?,
        };
        inner.by_node.get(node).cloned()
    }

    /// The current session of `node`.
    pub fn get(&self, node: &NodeName) -> Option<Arc<S>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner.by_node.get(node).cloned()
    }

    /// Every node's live session, for the admin API (a copy: the table is not held).
    pub fn sessions(&self) -> Vec<Arc<S>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner.by_node.values().cloned().collect()
    }

    /// Number of nodes with a live session.
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .by_node
            .len()
    }

    /// Whether no node is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fake {
        id: u64,
        node: NodeName,
        ips: Vec<IpAddr>,
        serial: String,
        current: bool,
    }
    impl Routable for Fake {
        fn session_id(&self) -> u64 {
            self.id
        }
        fn node(&self) -> &NodeName {
            &self.node
        }
        fn ips(&self) -> &[IpAddr] {
            &self.ips
        }
        fn certificate_serial(&self) -> &str {
            &self.serial
        }
        fn certificate_current(&self) -> bool {
            self.current
        }
    }
    fn fake(id: u64, node: &str, ips: &[&str]) -> Arc<Fake> {
        Arc::new(Fake {
            id,
            node: NodeName::parse(node).unwrap(),
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            serial: format!("serial-{id}"),
            current: true,
        })
    }
    fn ip(s: &str) -> Host {
        Host::Ip(s.parse().unwrap())
    }

    #[test]
    fn lookup_by_name_and_ip() {
        let t = RouteTable::default();
        t.register(fake(1, "node-a", &["10.0.0.1"])).unwrap();
        assert_eq!(t.lookup(&ip("10.0.0.1")).unwrap().id, 1);
        let name = Host::Name(NodeName::parse("node-a").unwrap());
        assert_eq!(t.lookup(&name).unwrap().id, 1);
        assert!(t.lookup(&ip("10.0.0.2")).is_none());
    }

    #[test]
    fn another_node_cannot_claim_an_owned_ip() {
        let t = RouteTable::default();
        t.register(fake(1, "node-a", &["10.0.0.1"])).unwrap();
        let err = t.register(fake(2, "node-b", &["10.0.0.1"])).unwrap_err();
        assert!(
            matches!(&err, RouteConflict::AddressOwned { owner, owner_serial, serial, .. }
                if owner.as_str() == "node-a" && owner_serial == "serial-1" && serial == "serial-2"),
            "{err}"
        );
        assert_eq!(t.lookup(&ip("10.0.0.1")).unwrap().id, 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn same_node_replacement_is_atomic_and_old_deregister_is_a_no_op() {
        let t = RouteTable::default();
        let old = fake(1, "node-a", &["10.0.0.1", "10.0.0.9"]);
        t.register(old.clone()).unwrap();
        let replaced = t.register(fake(2, "node-a", &["10.0.0.1"])).unwrap();
        assert_eq!(replaced.unwrap().id, 1);
        assert!(!t.deregister(&old));
        assert_eq!(t.lookup(&ip("10.0.0.1")).unwrap().id, 2);
        // The address the new certificate dropped is no longer routed.
        assert!(t.lookup(&ip("10.0.0.9")).is_none());
    }

    #[test]
    fn a_stale_certificate_never_replaces_the_live_session() {
        let t = RouteTable::default();
        t.register(fake(1, "node-a", &["10.0.0.1"])).unwrap();
        let mut stale = Arc::into_inner(fake(2, "node-a", &["10.0.0.1"])).unwrap();
        stale.current = false;
        let stale = Arc::new(stale);
        let err = t.register(stale.clone()).unwrap_err();
        assert!(matches!(err, RouteConflict::NotCurrent { .. }), "{err}");
        assert_eq!(t.lookup(&ip("10.0.0.1")).unwrap().id, 1);
        // With no live session it may serve (the node's own older certificate).
        assert!(t.deregister(&t.get(&stale.node).unwrap()));
        assert!(t.register(stale).unwrap().is_none());
    }

    #[test]
    fn deregister_frees_addresses() {
        let t = RouteTable::default();
        let a = fake(1, "node-a", &["10.0.0.1"]);
        t.register(a.clone()).unwrap();
        assert!(t.deregister(&a));
        assert!(t.is_empty());
        t.register(fake(2, "node-b", &["10.0.0.1"])).unwrap();
    }
}
