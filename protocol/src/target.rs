//! Dial targets (`host:port`) as kube-apiserver names them in CONNECT requests.
//! Owns strict parsing into one canonical form so routing and policy never see two
//! spellings of one address; it does not decide whether a target is allowed.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::node::{looks_like_ipv4, NameError, NodeName};

/// Longest target string accepted, in bytes. A bracketed IPv6 address with port
/// is at most 47 bytes and a node name with port at most 259, so this leaves room
/// without letting a peer make us walk an unbounded string.
pub const MAX_TARGET_LEN: usize = 300;

/// The host part of a [`Target`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A literal address. IPv4-mapped IPv6 addresses are stored as `V4`.
    Ip(IpAddr),
    /// A node name, routed by the identity in the edge's certificate.
    Name(NodeName),
}

/// A validated `host:port` dial target.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// Where to dial.
    pub host: Host,
    /// TCP port, never 0.
    pub port: u16,
}

/// Why a string is not a valid [`Target`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Longer than [`MAX_TARGET_LEN`] bytes; checked before anything else.
    #[error("target is {len} bytes, limit is {MAX_TARGET_LEN}")]
    TooLong {
        /// Length of the rejected target in bytes.
        len: usize,
    },
    /// The empty string.
    #[error("empty target")]
    Empty,
    /// Whitespace, a control character or non-ASCII.
    #[error("invalid character `{}` at byte {at} in target", .ch.escape_default())]
    BadChar {
        /// The offending character.
        ch: char,
        /// Byte offset of the character.
        at: usize,
    },
    /// Contains `@`: userinfo has no meaning for a dial target.
    #[error("userinfo (`@`) is not allowed in a target")]
    Userinfo,
    /// Contains `/`, `?` or `#`: a URL was given where `host:port` was expected.
    #[error("target must be host:port, without scheme, path or query")]
    NotAuthority,
    /// No `:port` suffix.
    #[error("missing port in target `{0}`")]
    MissingPort(String),
    /// The port is not decimal 1..=65535 without sign or leading zeros.
    #[error("invalid port `{0}`")]
    BadPort(String),
    /// Nothing before the `:port` (or inside the brackets).
    #[error("empty host")]
    EmptyHost,
    /// A `[` without a matching `]`, or text between `]` and `:`.
    #[error("misplaced bracket in target `{0}`")]
    BadBrackets(String),
    /// An IPv6 address written without brackets.
    #[error("IPv6 address `{0}` must be in brackets")]
    UnbracketedIpv6(String),
    /// Bracketed text that is not an IPv6 address.
    #[error("invalid IPv6 address `{0}`")]
    BadIpv6(String),
    /// An IPv6 zone id (`%eth0`): it names a local interface, never a remote node.
    #[error("IPv6 zone id not allowed in `{0}`")]
    ZoneId(String),
    /// Numeric host that is not a canonical dotted quad (leading zeros, hex,
    /// integer or short forms), which resolvers disagree on.
    #[error("non-canonical IPv4 address `{0}`")]
    NonCanonicalIpv4(String),
    /// The host is neither an address nor a valid node name.
    #[error("invalid host `{host}`: {source}")]
    BadHost {
        /// The rejected host text.
        host: String,
        /// Why it is not a node name.
        source: NameError,
    },
}

impl Target {
    /// Parses `a.b.c.d:port`, `[ipv6]:port` or `nodename:port`, strictly.
    pub fn parse(s: &str) -> Result<Target, TargetError> {
        if s.len() > MAX_TARGET_LEN {
            return Err(TargetError::TooLong { len: s.len() });
        }
        if s.is_empty() {
            return Err(TargetError::Empty);
        }
        // After this every byte is printable ASCII, so the strings stored in
        // errors below are safe to show in logs and response bodies.
        if let Some((at, ch)) = s.char_indices().find(|&(_, c)| !c.is_ascii_graphic()) {
            return Err(TargetError::BadChar { ch, at });
        }
        if s.contains('@') {
            return Err(TargetError::Userinfo);
        }
        if s.contains(['/', '?', '#']) {
            return Err(TargetError::NotAuthority);
        }

        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (inner, after) = rest
                .split_once(']')
                .ok_or_else(|| TargetError::BadBrackets(s.to_owned()))?;
            let port = match after.strip_prefix(':') {
                Some(port) => port,
                None if after.is_empty() => return Err(TargetError::MissingPort(s.to_owned())),
                None => return Err(TargetError::BadBrackets(s.to_owned())),
            };
            (parse_ipv6(inner)?, port)
        } else {
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| TargetError::MissingPort(s.to_owned()))?;
            if host.contains(':') {
                return Err(TargetError::UnbracketedIpv6(host.to_owned()));
            }
            if host.contains(['[', ']']) {
                return Err(TargetError::BadBrackets(s.to_owned()));
            }
            (parse_unbracketed_host(host)?, port)
        };
        let port = parse_port(port)?;
        Ok(Target { host, port })
    }

    /// True when the host is a literal address rather than a node name.
    pub fn is_ip(&self) -> bool {
        matches!(self.host, Host::Ip(_))
    }
}

/// The inside of `[...]`: an IPv6 address, with IPv4-mapped ones unwrapped so a
/// policy on `127.0.0.0/8` also catches `[::ffff:127.0.0.1]`.
fn parse_ipv6(inner: &str) -> Result<Host, TargetError> {
    if inner.is_empty() {
        return Err(TargetError::EmptyHost);
    }
    if inner.contains('%') {
        return Err(TargetError::ZoneId(inner.to_owned()));
    }
    let v6 = Ipv6Addr::from_str(inner).map_err(|_| TargetError::BadIpv6(inner.to_owned()))?;
    Ok(Host::Ip(match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }))
}

/// An unbracketed host: a canonical dotted quad, or else a node name. Anything
/// numeric-looking that is not canonical is refused rather than guessed at.
fn parse_unbracketed_host(host: &str) -> Result<Host, TargetError> {
    if host.is_empty() {
        return Err(TargetError::EmptyHost);
    }
    if looks_like_ipv4(host) {
        return canonical_ipv4(host)
            .map(|v4| Host::Ip(IpAddr::V4(v4)))
            .ok_or_else(|| TargetError::NonCanonicalIpv4(host.to_owned()));
    }
    NodeName::parse(host)
        .map(Host::Name)
        .map_err(|source| TargetError::BadHost {
            host: host.to_owned(),
            source,
        })
}

/// Exactly four decimal octets 0..=255, no leading zeros, no empty parts.
fn canonical_ipv4(s: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = s.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        let well_formed = !part.is_empty()
            && part.len() <= 3
            && part.bytes().all(|b| b.is_ascii_digit())
            && (part == "0" || !part.starts_with('0'));
        if !well_formed {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    match parts.next() {
        Some(_) => None,
        None => Some(Ipv4Addr::from(octets)),
    }
}

/// Decimal 1..=65535, at most five digits, no sign and no leading zero.
fn parse_port(s: &str) -> Result<u16, TargetError> {
    let well_formed = !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && !s.starts_with('0');
    match well_formed.then(|| s.parse::<u16>()) {
        Some(Ok(port)) => Ok(port),
        _ => Err(TargetError::BadPort(s.to_owned())),
    }
}

impl fmt::Display for Host {
    /// The bare address or name; IPv6 is shown without brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Name(name) => write!(f, "{name}"),
        }
    }
}

impl fmt::Display for Target {
    /// The canonical form that [`Target::parse`] accepts back unchanged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(v6)) => write!(f, "[{v6}]:{}", self.port),
            host => write!(f, "{host}:{}", self.port),
        }
    }
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Target::parse(s)
    }
}

#[cfg(test)]
mod tests;
