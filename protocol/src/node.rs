//! Kubernetes node names: the one identity an edge routes by.
//! Owns the DNS-1123 subdomain check and the rule that a node name can never be
//! read as an IPv4 address; it does not resolve or compare names to addresses.

use std::borrow::Borrow;
use std::fmt;
use std::str::FromStr;

/// Longest node name in bytes, as Kubernetes limits a DNS-1123 subdomain.
pub const MAX_NODE_NAME_LEN: usize = 253;

/// Longest single dot-separated label in bytes (DNS-1123 label limit).
pub const MAX_LABEL_LEN: usize = 63;

/// A validated Kubernetes node name (DNS-1123 subdomain, lowercase only).
///
/// Besides the Kubernetes rules, names made only of numeric labels (`10.0.0.1`,
/// `2130706433`, `0x7f.1`) are rejected: a system resolver would read them as an
/// IPv4 address, so letting them through as names would bypass address policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(String);

/// Why a string is not a valid [`NodeName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is the empty string.
    #[error("empty node name")]
    Empty,
    /// The name is longer than [`MAX_NODE_NAME_LEN`] bytes.
    #[error("node name is {len} bytes, limit is {MAX_NODE_NAME_LEN}")]
    TooLong {
        /// Length of the rejected name in bytes.
        len: usize,
    },
    /// The name contains an uppercase ASCII letter (names are not case-folded).
    #[error("uppercase letter `{ch}` at byte {at} in node name")]
    Uppercase {
        /// The offending letter.
        ch: char,
        /// Byte offset of the letter.
        at: usize,
    },
    /// The name contains a character outside `a-z`, `0-9`, `-` and `.`.
    #[error("invalid character `{}` at byte {at} in node name", .ch.escape_default())]
    BadChar {
        /// The offending character.
        ch: char,
        /// Byte offset of the character.
        at: usize,
    },
    /// The name ends with a dot (absolute DNS form is not a node name).
    #[error("node name ends with `.`")]
    TrailingDot,
    /// Two dots in a row, or a leading dot.
    #[error("empty label in node name")]
    EmptyLabel,
    /// One label is longer than [`MAX_LABEL_LEN`] bytes.
    #[error("label is {len} bytes, limit is {MAX_LABEL_LEN}")]
    LabelTooLong {
        /// Length of the rejected label in bytes.
        len: usize,
    },
    /// A label starts or ends with `-`.
    #[error("label starts or ends with `-`")]
    HyphenAtLabelEdge,
    /// Every label is numeric, so resolvers would treat the name as an IPv4 address.
    #[error("node name looks like an IPv4 address")]
    LooksLikeIpv4,
}

impl NodeName {
    /// Validates `s` as a node name. Uppercase is rejected, never lowercased,
    /// so the name matches the certificate identity byte for byte.
    pub fn parse(s: &str) -> Result<NodeName, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        // Bound first: everything after this walks the string.
        if s.len() > MAX_NODE_NAME_LEN {
            return Err(NameError::TooLong { len: s.len() });
        }
        for (at, ch) in s.char_indices() {
            match ch {
                'a'..='z' | '0'..='9' | '-' | '.' => {}
                'A'..='Z' => return Err(NameError::Uppercase { ch, at }),
                _ => return Err(NameError::BadChar { ch, at }),
            }
        }
        if s.ends_with('.') {
            return Err(NameError::TrailingDot);
        }
        for label in s.split('.') {
            if label.is_empty() {
                return Err(NameError::EmptyLabel);
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(NameError::LabelTooLong { len: label.len() });
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(NameError::HyphenAtLabelEdge);
            }
        }
        if looks_like_ipv4(s) {
            return Err(NameError::LooksLikeIpv4);
        }
        Ok(NodeName(s.to_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Consumes the name, returning the inner string.
    pub fn into_string(self) -> String {
        self.0
    }
}

/// True when every non-empty dot-separated label is something `inet_aton` would
/// take as a number (decimal, octal with a leading zero, or `0x` hex), and there
/// is at least one such label. Shared with `target`, which uses it to decide that
/// an unbracketed host was meant as an IPv4 address rather than a name.
pub(crate) fn looks_like_ipv4(s: &str) -> bool {
    let mut any = false;
    for label in s.split('.') {
        if label.is_empty() {
            continue;
        }
        any = true;
        let numeric = label.bytes().all(|b| b.is_ascii_digit())
            || label
                .strip_prefix("0x")
                .or_else(|| label.strip_prefix("0X"))
                .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if !numeric {
            return false;
        }
    }
    any
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for NodeName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeName::parse(s)
    }
}

impl AsRef<str> for NodeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Lets a `HashMap<NodeName, _>` be queried with a `&str`; sound because the
/// derived `Hash`/`Eq`/`Ord` are exactly those of the inner `String`.
impl Borrow<str> for NodeName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<NodeName> for String {
    fn from(name: NodeName) -> String {
        name.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(s: &str) -> NodeName {
        NodeName::parse(s).unwrap_or_else(|e| panic!("{s:?} should parse: {e}"))
    }

    #[test]
    fn accepts_ordinary_names() {
        for s in [
            "a",
            "node-a",
            "idc-01.rack-3.example.com",
            "ip-10-0-0-1.ec2.internal",
            "0node",
            "1.2.3.a",
            "a1-b2",
            "123abc",
        ] {
            assert_eq!(ok(s).as_str(), s);
            assert_eq!(ok(s).to_string(), s);
            assert_eq!(s.parse::<NodeName>(), Ok(ok(s)));
        }
    }

    #[test]
    fn length_limits() {
        let label = "a".repeat(63);
        assert!(NodeName::parse(&label).is_ok());
        assert_eq!(
            NodeName::parse(&"a".repeat(64)),
            Err(NameError::LabelTooLong { len: 64 })
        );
        // 63*3 + 61 + 3 dots = 253 exactly.
        let max = format!("{label}.{label}.{label}.{}", "b".repeat(61));
        assert_eq!(max.len(), 253);
        assert!(NodeName::parse(&max).is_ok());
        let over = format!("{max}c");
        assert_eq!(NodeName::parse(&over), Err(NameError::TooLong { len: 254 }));
        assert_eq!(
            NodeName::parse(&"x".repeat(100_000)),
            Err(NameError::TooLong { len: 100_000 })
        );
    }

    #[test]
    fn rejects_empty_and_bad_dots() {
        assert_eq!(NodeName::parse(""), Err(NameError::Empty));
        assert_eq!(NodeName::parse("node."), Err(NameError::TrailingDot));
        assert_eq!(NodeName::parse("."), Err(NameError::TrailingDot));
        assert_eq!(NodeName::parse(".node"), Err(NameError::EmptyLabel));
        assert_eq!(NodeName::parse("a..b"), Err(NameError::EmptyLabel));
    }

    #[test]
    fn rejects_uppercase_instead_of_folding() {
        assert_eq!(
            NodeName::parse("Node-a"),
            Err(NameError::Uppercase { ch: 'N', at: 0 })
        );
        assert_eq!(
            NodeName::parse("node-A"),
            Err(NameError::Uppercase { ch: 'A', at: 5 })
        );
    }

    #[test]
    fn rejects_bad_characters() {
        for (s, ch, at) in [
            ("node_a", '_', 4),
            ("node a", ' ', 4),
            ("node:1", ':', 4),
            ("nöde", 'ö', 1),
            ("node\0", '\0', 4),
            ("a/b", '/', 1),
            ("a@b", '@', 1),
        ] {
            assert_eq!(
                NodeName::parse(s),
                Err(NameError::BadChar { ch, at }),
                "{s:?}"
            );
        }
    }

    #[test]
    fn rejects_hyphen_at_label_edges() {
        for s in ["-a", "a-", "a.-b", "a.b-", "-"] {
            assert_eq!(NodeName::parse(s), Err(NameError::HyphenAtLabelEdge), "{s}");
        }
    }

    #[test]
    fn ipv4_spellings_are_not_node_names() {
        for s in [
            "10.0.0.1",
            "127.0.0.1",
            "127.1",
            "2130706433",
            "0x7f.0.0.1",
            "0x7f000001",
            "010.0.0.1",
            "1.2.3.4.5",
            "0x",
        ] {
            assert_eq!(NodeName::parse(s), Err(NameError::LooksLikeIpv4), "{s}");
        }
    }

    #[test]
    fn error_messages_are_short_and_printable() {
        let e = NodeName::parse("a\nb").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid character `\\n` at byte 1 in node name"
        );
        assert_eq!(
            NameError::LooksLikeIpv4.to_string(),
            "node name looks like an IPv4 address"
        );
    }

    #[test]
    fn borrow_lets_maps_be_queried_by_str() {
        let mut map = std::collections::HashMap::new();
        map.insert(ok("node-a"), 1);
        assert_eq!(map.get("node-a"), Some(&1));
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in any::<String>()) {
            let _ = NodeName::parse(&s);
        }

        #[test]
        fn valid_names_round_trip(s in "[a-z]([a-z0-9-]{0,20}[a-z0-9])?(\\.[a-z]([a-z0-9-]{0,20}[a-z0-9])?){0,4}") {
            let name = NodeName::parse(&s).unwrap();
            prop_assert_eq!(name.to_string(), s.clone());
            prop_assert_eq!(NodeName::parse(name.as_str()).unwrap(), name);
        }

        #[test]
        fn accepted_names_obey_the_rules(s in "[a-zA-Z0-9.-]{0,80}") {
            if let Ok(name) = NodeName::parse(&s) {
                let n = name.as_str();
                prop_assert!(!n.is_empty() && n.len() <= MAX_NODE_NAME_LEN);
                prop_assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'));
                prop_assert!(n.parse::<std::net::Ipv4Addr>().is_err());
                for label in n.split('.') {
                    prop_assert!(!label.is_empty() && label.len() <= MAX_LABEL_LEN);
                    prop_assert!(!label.starts_with('-') && !label.ends_with('-'));
                }
            }
        }
    }
}
