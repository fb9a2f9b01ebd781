//! The egress proxy's URL: `http://[user[:password]@]host[:port]`, read as curl reads it
//! (no scheme means `http://`, the port defaults to 1080), with the credentials kept only as
//! the ready `Proxy-Authorization` value in a [`Secret`]. What the rest of the edge may
//! print is [`ProxyUrl`]'s `Display`: `host:port`, never the user or the password.

use std::fmt;

use base64::Engine;
use tunnel_io::secret::Secret;

/// curl's default proxy port, used when the URL names none (most proxies listen on 3128 or
/// 8080, so the URL usually does).
pub const DEFAULT_PROXY_PORT: u16 = 1080;

/// Why a proxy URL was refused. Messages never contain the URL's credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyUrlError {
    /// `https://` asks for TLS to the proxy itself, which the edge does not speak.
    #[error(
        "https:// proxies (TLS to the proxy) are not supported: give the proxy as http://host:port \
         (the tunnel inside the CONNECT is TLS end to end either way)"
    )]
    HttpsProxy,
    /// Any scheme but `http` (`socks5://`, ...).
    #[error("proxy scheme `{0}://` is not supported: only http:// (HTTP CONNECT) proxies")]
    Scheme(String),
    /// Empty host, bad port, a path, or characters a host cannot hold.
    #[error("bad proxy address: {0}")]
    Address(String),
    /// The user or password is not valid percent-encoded UTF-8.
    #[error("proxy credentials are not valid percent-encoded UTF-8")]
    Credentials,
}

/// A parsed `http://` proxy URL.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    host: String,
    port: u16,
    /// `Basic base64(user:password)`, when the URL had a user.
    authorization: Option<Secret>,
}

impl ProxyUrl {
    /// Parse `[http://][user[:password]@]host[:port][/]`. User and password are
    /// percent-decoded (`p%40ss` is `p@ss`); a user without a password sends an empty one,
    /// as curl does.
    pub fn parse(url: &str) -> Result<ProxyUrl, ProxyUrlError> {
        let url = url.trim();
        let rest = match url.split_once("://") {
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "http" => rest,
                "https" => return Err(ProxyUrlError::HttpsProxy),
                other => return Err(ProxyUrlError::Scheme(other.to_owned())),
            },
            None => url,
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        // The last `@` ends the userinfo: a raw `@` in a password is common enough in
        // hand-written URLs, and a host never contains one.
        let (userinfo, address) = match rest.rsplit_once('@') {
            Some((userinfo, address)) => (Some(userinfo), address),
            None => (None, rest),
        };
        let (host, port) = split_address(address)?;
        let authorization = userinfo
            .map(|userinfo| {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let user = decode(user)?;
                let password = decode(password)?;
                let token =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                Ok::<_, ProxyUrlError>(Secret::new(format!("Basic {token}")))
            })
            .transpose()?;
        Ok(ProxyUrl {
            host,
            port,
            authorization,
        })
    }

    /// The proxy's host (a name, an IPv4 address, or an IPv6 address without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `Proxy-Authorization` value, when the URL carried credentials.
    pub fn authorization(&self) -> Option<&Secret> {
        self.authorization.as_ref()
    }
}

/// `host:port` (IPv6 in brackets): safe for logs and errors.
impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyUrl")
            .field("address", &self.to_string())
            .field("authorization", &self.authorization)
            .finish()
    }
}

fn decode(part: &str) -> Result<String, ProxyUrlError> {
    percent_encoding::percent_decode_str(part)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ProxyUrlError::Credentials)
}

/// `host[:port]`, IPv6 in brackets; the port defaults to [`DEFAULT_PROXY_PORT`].
fn split_address(address: &str) -> Result<(String, u16), ProxyUrlError> {
    // The address is not echoed: `http://user:password` (the host forgotten) would put the
    // password in the message.
    let bad = |why: &str| ProxyUrlError::Address(why.to_owned());
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
        host.parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad("not an IPv6 address in brackets"))?;
        match after {
            "" => (host, None),
            _ => (
                host,
                Some(
                    after
                        .strip_prefix(':')
                        .ok_or_else(|| bad("junk after `]`"))?,
                ),
            ),
        }
    } else {
        match address.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (address, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
    {
        return Err(bad(
            "a host holds only letters, digits, `-`, `.` (or an IP address)",
        ));
    }
    let port = match port {
        None => DEFAULT_PROXY_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("bad port"))?,
    };
    Ok((host.to_owned(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(url: &str) -> String {
        ProxyUrl::parse(url)
            .unwrap()
            .authorization()
            .map(|s| s.expose().to_owned())
            .unwrap_or_default()
    }

    #[test]
    fn forms_curl_accepts() {
        let p = ProxyUrl::parse("http://proxy.corp:3128").unwrap();
        assert_eq!((p.host(), p.port()), ("proxy.corp", 3128));
        assert!(p.authorization().is_none());
        let p = ProxyUrl::parse("proxy.corp").unwrap();
        assert_eq!((p.host(), p.port()), ("proxy.corp", DEFAULT_PROXY_PORT));
        let p = ProxyUrl::parse("HTTP://10.0.0.1:8080/").unwrap();
        assert_eq!(p.to_string(), "10.0.0.1:8080");
        let p = ProxyUrl::parse("http://[fd00::3]:3128").unwrap();
        assert_eq!(
            (p.host(), p.to_string().as_str()),
            ("fd00::3", "[fd00::3]:3128")
        );
    }

    #[test]
    fn credentials_are_percent_decoded_into_basic_auth() {
        // base64("alice:p@ss w") = YWxpY2U6cEBzcyB3
        assert_eq!(
            auth("http://alice:p%40ss%20w@proxy:3128"),
            "Basic YWxpY2U6cEBzcyB3"
        );
        // A raw `@` in the password: the last one ends the userinfo.
        assert_eq!(
            auth("http://alice:p@ss w@proxy:3128"),
            "Basic YWxpY2U6cEBzcyB3"
        );
        // User only: empty password (base64("bob:") = Ym9iOg==).
        assert_eq!(auth("http://bob@proxy:3128"), "Basic Ym9iOg==");
        assert_eq!(
            ProxyUrl::parse("http://u:%FF@proxy:1"),
            Err(ProxyUrlError::Credentials)
        );
    }

    #[test]
    fn credentials_never_reach_display_debug_or_errors() {
        let p = ProxyUrl::parse("http://alice:hunter2@proxy:3128").unwrap();
        for shown in [p.to_string(), format!("{p:?}")] {
            assert!(
                !shown.contains("hunter2") && !shown.contains("alice"),
                "{shown}"
            );
            assert!(!shown.contains("aHVudGVyMg"), "{shown}"); // base64 of the password
        }
        assert!(format!("{p:?}").contains("<redacted>"));
        for bad in [
            "http://alice:hunter2@",
            "http://alice:hunter2@proxy:x",
            "http://alice:hunter2",
            "socks5://alice:hunter2@p:1",
        ] {
            let e = ProxyUrl::parse(bad).unwrap_err().to_string();
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn https_and_other_schemes_are_refused_clearly() {
        let e = ProxyUrl::parse("https://proxy:3128").unwrap_err();
        assert_eq!(e, ProxyUrlError::HttpsProxy);
        assert!(e.to_string().contains("http://host:port"), "{e}");
        assert_eq!(
            ProxyUrl::parse("socks5h://proxy:1080"),
            Err(ProxyUrlError::Scheme("socks5h".into()))
        );
    }

    #[test]
    fn bad_addresses_are_refused() {
        for bad in [
            "http://",
            "http://:3128",
            "http://proxy:0",
            "http://proxy:99999",
            "http://proxy:3128/path",
            "http://[fd00::3",
            "http://[nope]:1",
            "http://pro xy:1",
            "http://proxy\r\nX: y:1",
        ] {
            assert!(
                matches!(ProxyUrl::parse(bad), Err(ProxyUrlError::Address(_))),
                "{bad}"
            );
        }
    }
}
