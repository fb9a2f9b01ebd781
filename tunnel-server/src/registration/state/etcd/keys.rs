//! The key layout under the configured prefix (see the table in [`super`]): one function per
//! kind of record, so no key is spelled twice.

use std::net::IpAddr;

/// Keys under one prefix (ends with `/`).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix`.
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// The prefix of every key.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The prefix of one kind (`tokens/`, `revoked/`, ...).
    pub fn kind(&self, kind: &str) -> String {
        format!("{}{kind}/", self.prefix)
    }

    /// A token record.
    pub fn token(&self, id: &str) -> String {
        format!("{}tokens/{id}", self.prefix)
    }

    /// A token's use count.
    pub fn uses(&self, id: &str) -> String {
        format!("{}uses/{id}", self.prefix)
    }

    /// A certified public key, by the hex SHA-256 of its DER.
    pub fn certified(&self, key_sha256: &str) -> String {
        format!("{}keys/{key_sha256}", self.prefix)
    }

    /// A node's issued identity.
    pub fn identity(&self, node: &str) -> String {
        format!("{}identities/{node}", self.prefix)
    }

    /// Which node holds `ip`.
    pub fn ip(&self, ip: &IpAddr) -> String {
        format!("{}ips/{ip}", self.prefix)
    }

    /// A node's revocation.
    pub fn revoked(&self, node: &str) -> String {
        format!("{}revoked/{node}", self.prefix)
    }

    /// A live session of `node` on `replica`.
    pub fn session(&self, node: &str, replica: &str) -> String {
        format!("{}sessions/{node}/{replica}", self.prefix)
    }

    /// Held, under a lease of one prune interval, by the replica pruning this interval.
    pub fn janitor(&self) -> String {
        format!("{}janitor", self.prefix)
    }

    /// The last path segment of `key` under `kind/` (a node name, token ID), if it is one.
    pub fn name_in<'k>(&self, kind: &str, key: &'k [u8]) -> Option<&'k str> {
        let key = std::str::from_utf8(key).ok()?;
        key.strip_prefix(&self.prefix)?
            .strip_prefix(kind)?
            .strip_prefix('/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sit_under_the_prefix_and_names_come_back() {
        let k = Keys::new("/tether/");
        assert_eq!(k.token("abcdef"), "/tether/tokens/abcdef");
        assert_eq!(k.ip(&"10.0.0.1".parse().unwrap()), "/tether/ips/10.0.0.1");
        assert_eq!(
            k.session("node-a", "replica-0"),
            "/tether/sessions/node-a/replica-0"
        );
        let key = k.revoked("node-a");
        assert_eq!(k.name_in("revoked", key.as_bytes()), Some("node-a"));
        assert_eq!(k.name_in("identities", key.as_bytes()), None);
        assert_eq!(k.name_in("revoked", b"/other/revoked/node-a"), None);
    }
}
