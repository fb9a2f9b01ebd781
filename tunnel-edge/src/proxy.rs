//! How the edge reaches the load balancer: directly, or through an HTTP CONNECT egress proxy
//! (enterprise IDCs often allow outbound traffic only that way). [`Egress::dial`] is the one
//! entry point: the session, the upstream connection, `join` and renewal all call it, and a
//! future transport's TCP fallback can too. It returns a plain [`TcpStream`] that carries the
//! tunnel's TLS from its first byte.
//!
//! The proxy's answer is read with `peek` and consumed exactly up to the end of its head, so
//! any byte the proxy sends after the head stays in the socket for TLS, with no wrapper type
//! holding a read-ahead buffer. Hand-rolled on purpose: `async-http-proxy` reads through a
//! `BufStream` it then drops (bytes after the head are lost) and insists on the reason phrase
//! `Connection established`; hyper's CONNECT upgrade hands back an `Upgraded`, not a
//! `TcpStream`. The head parser is `protocol::connect::response` (bounded, unit-tested,
//! fuzzed); this module adds the socket and the deadline.

mod no_proxy;
mod url;

use std::fmt;
use std::time::Duration;

use protocol::connect::{connect_request, parse_connect_response, HeadLimits, ResponseError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use no_proxy::{NoProxy, NoProxyError};
pub use url::{ProxyUrl, ProxyUrlError, DEFAULT_PROXY_PORT};

/// Most bytes a proxy's response head may take. A CONNECT answer is a status line and a few
/// headers (tinyproxy's is 72 bytes, squid's about 40); 16 KiB is the cap common proxies put
/// on heads themselves, and it bounds what a hostile proxy can make the edge buffer.
pub const MAX_RESPONSE_HEAD_BYTES: usize = 16 * 1024;
/// Most header fields in a proxy's response head (sizes the parser's array).
pub const MAX_RESPONSE_HEADERS: usize = 64;
/// Deadline for the proxy's answer to CONNECT, connection to the proxy included. The proxy
/// dials the load balancer before answering, so this covers its connect timeout too; the
/// callers' own deadlines (`server.connect_timeout`, a registration call's 15 s) still bound
/// the whole handshake.
pub const DEFAULT_PROXY_TIMEOUT: Duration = Duration::from_secs(10);

/// Environment variables naming the proxy, in the order curl reads them for an `https://`
/// URL (every connection the edge makes is TLS): the scheme's own first, lowercase before
/// uppercase, then `all_proxy`. `http_proxy` is not read: no edge connection is plain HTTP.
pub const PROXY_ENV: [&str; 4] = ["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"];
/// Environment variables listing hosts that bypass the proxy, in curl's order.
pub const NO_PROXY_ENV: [&str; 2] = ["no_proxy", "NO_PROXY"];

/// Where a proxy setting came from, for error messages and the startup log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `--proxy` or the config file's `server.proxy`.
    Configured,
    /// The named environment variable.
    Env(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Configured => f.write_str("server.proxy"),
            Source::Env(name) => f.write_str(name),
        }
    }
}

/// A proxy or no-proxy setting that cannot be used; names where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressConfigError {
    /// The proxy URL.
    #[error("{origin}: {error} (`--proxy ''` connects directly)")]
    Url {
        /// Where the URL came from.
        origin: Source,
        /// What is wrong with it.
        error: ProxyUrlError,
    },
    /// The no-proxy list.
    #[error("{origin}: {error}")]
    NoProxy {
        /// `server.no_proxy` or the environment variable.
        origin: String,
        /// The bad entry.
        error: NoProxyError,
    },
}

/// Why the edge could not reach a server.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// Direct connection failed.
    #[error("connect {target}: {error}")]
    Direct {
        /// `host:port` dialed.
        target: String,
        /// The socket error.
        error: std::io::Error,
    },
    /// The proxy itself could not be reached.
    #[error("connect to proxy {proxy} (for {target}): {error}")]
    ProxyUnreachable {
        /// The proxy, `host:port`.
        proxy: String,
        /// Where the CONNECT was for.
        target: String,
        /// The socket error.
        error: std::io::Error,
    },
    /// The proxy answered CONNECT with a non-2xx status.
    #[error("proxy {proxy} refused CONNECT to {target}: {status_line}")]
    Refused {
        /// The proxy, `host:port`.
        proxy: String,
        /// Where the CONNECT was for.
        target: String,
        /// Its status line, `407 Proxy Authentication Required`.
        status_line: String,
    },
    /// The proxy's answer was not an HTTP response head within the limits.
    #[error("proxy {proxy} answered CONNECT to {target} with {error}")]
    BadAnswer {
        /// The proxy, `host:port`.
        proxy: String,
        /// Where the CONNECT was for.
        target: String,
        /// What was wrong with the answer.
        error: ResponseError,
    },
    /// The proxy closed the connection, or a read or write failed, before the tunnel opened.
    #[error("proxy {proxy} (CONNECT to {target}): {error}")]
    ProxyIo {
        /// The proxy, `host:port`.
        proxy: String,
        /// Where the CONNECT was for.
        target: String,
        /// What happened.
        error: std::io::Error,
    },
    /// No answer within the deadline.
    #[error("proxy {proxy} did not answer CONNECT to {target} within {timeout:?}")]
    Timeout {
        /// The proxy, `host:port`.
        proxy: String,
        /// Where the CONNECT was for.
        target: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The target cannot be put in a request head (configuration error).
    #[error("cannot CONNECT to {target}: {error}")]
    BadTarget {
        /// The target as configured.
        target: String,
        /// Why not.
        error: protocol::connect::RequestError,
    },
}

/// How this edge reaches servers: the proxy (if any), the hosts that bypass it, and the
/// deadline for the proxy's answer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Egress {
    proxy: Option<(ProxyUrl, Source)>,
    no_proxy: NoProxy,
    timeout: Duration,
}

impl Default for Egress {
    fn default() -> Self {
        Egress::direct()
    }
}

impl Egress {
    /// Every connection direct.
    pub fn direct() -> Egress {
        Egress {
            proxy: None,
            no_proxy: NoProxy::default(),
            timeout: DEFAULT_PROXY_TIMEOUT,
        }
    }

    /// Resolve the egress as curl would: the configured proxy (`Some("")` means none, and the
    /// environment is then not read), else the first non-empty of [`PROXY_ENV`]; the
    /// configured no-proxy list, else the first non-empty of [`NO_PROXY_ENV`] (applied
    /// whichever way the proxy was set). `env` reads a variable (injectable for tests).
    pub fn resolve(
        proxy: Option<&str>,
        no_proxy: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Egress, EgressConfigError> {
        let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        let chosen = match proxy {
            Some(url) => Some((url.to_owned(), Source::Configured)),
            None => PROXY_ENV
                .into_iter()
                .find_map(|name| set(name).map(|v| (v, Source::Env(name)))),
        };
        let proxy = match chosen {
            Some((url, _)) if url.trim().is_empty() => None,
            Some((url, origin)) => match ProxyUrl::parse(&url) {
                Ok(parsed) => Some((parsed, origin)),
                Err(error) => return Err(EgressConfigError::Url { origin, error }),
            },
            None => None,
        };
        let (list, origin) = match no_proxy {
            Some(list) => (Some(list.to_owned()), "server.no_proxy".to_owned()),
            None => NO_PROXY_ENV
                .into_iter()
                .find_map(|name| set(name).map(|v| (Some(v), name.to_owned())))
                .unwrap_or((None, String::new())),
        };
        let no_proxy = match list {
            Some(list) => NoProxy::parse(&list)
                .map_err(|error| EgressConfigError::NoProxy { origin, error })?,
            None => NoProxy::default(),
        };
        Ok(Egress {
            proxy,
            no_proxy,
            timeout: DEFAULT_PROXY_TIMEOUT,
        })
    }

    /// The same egress with another deadline for the proxy's answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Egress {
        self.timeout = timeout;
        self
    }

    /// The proxy `host` is reached through, or `None` when it is dialed directly.
    pub fn proxy_for(&self, host: &str) -> Option<&ProxyUrl> {
        match &self.proxy {
            Some((proxy, _)) if !self.no_proxy.matches(host) => Some(proxy),
            _ => None,
        }
    }

    /// A TCP connection to `host:port` that carries the caller's bytes end to end: direct,
    /// or a tunnel through the proxy whose `CONNECT` answer has been read and consumed
    /// exactly (nothing after it is lost).
    pub async fn dial(&self, host: &str, port: u16) -> Result<TcpStream, DialError> {
        let target = authority(host, port);
        let Some(proxy) = self.proxy_for(host) else {
            return TcpStream::connect((host, port))
                .await
                .map_err(|error| DialError::Direct { target, error });
        };
        let request = connect_request(&target, proxy.authorization().map(|s| s.expose())).map_err(
            |error| DialError::BadTarget {
                target: target.clone(),
                error,
            },
        )?;
        let name = proxy.to_string();
        let tunnel = async {
            let mut tcp = TcpStream::connect((proxy.host(), proxy.port()))
                .await
                .map_err(|error| DialError::ProxyUnreachable {
                    proxy: name.clone(),
                    target: target.clone(),
                    error,
                })?;
            let io = |error| DialError::ProxyIo {
                proxy: name.clone(),
                target: target.clone(),
                error,
            };
            tcp.write_all(&request).await.map_err(io)?;
            let answer = read_answer(&mut tcp).await.map_err(|e| match e {
                AnswerError::Io(error) => io(error),
                AnswerError::Head(error) => DialError::BadAnswer {
                    proxy: name.clone(),
                    target: target.clone(),
                    error,
                },
            })?;
            if !answer.is_success() {
                return Err(DialError::Refused {
                    proxy: name.clone(),
                    target: target.clone(),
                    status_line: answer.status_line,
                });
            }
            Ok::<TcpStream, DialError>(tcp)
        };
        tokio::time::timeout(self.timeout, tunnel)
            .await
            .unwrap_or_else(|_| {
                Err(DialError::Timeout {
                    proxy: name.clone(),
                    target: target.clone(),
                    timeout: self.timeout,
                })
            })
    }
}

/// For the startup log: `direct`, or `http://host:port (from HTTPS_PROXY, basic auth; no_proxy
/// set)`. Never the credentials.
impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.proxy {
            None => f.write_str("direct"),
            Some((proxy, source)) => {
                write!(f, "http://{proxy} (from {source}")?;
                if proxy.authorization().is_some() {
                    f.write_str(", basic auth")?;
                }
                if !self.no_proxy.is_empty() {
                    f.write_str(", no_proxy set")?;
                }
                f.write_str(")")
            }
        }
    }
}

/// `host:port`, IPv6 in brackets.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

enum AnswerError {
    Io(std::io::Error),
    Head(ResponseError),
}

/// Read the proxy's response head and nothing after it: peek at what has arrived, parse the
/// head seen so far, then consume either all of it (head incomplete: wait for more) or
/// exactly up to the head's end. Each round consumes what it peeked, so the next peek waits
/// for new bytes instead of spinning.
async fn read_answer(
    tcp: &mut TcpStream,
) -> Result<protocol::connect::ConnectResponse, AnswerError> {
    let limits = HeadLimits {
        max_head_bytes: MAX_RESPONSE_HEAD_BYTES,
        max_headers: MAX_RESPONSE_HEADERS,
    };
    let mut head: Vec<u8> = Vec::with_capacity(512);
    let mut peeked = vec![0u8; 2048];
    loop {
        // `parse_connect_response` refuses a partial head once it reaches the limit, so
        // there is always room here.
        let room = (limits.max_head_bytes - head.len()).min(peeked.len());
        let n = tcp
            .peek(&mut peeked[..room])
            .await
            .map_err(AnswerError::Io)?;
        if n == 0 {
            return Err(AnswerError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before a complete answer",
            )));
        }
        let before = head.len();
        head.extend_from_slice(&peeked[..n]);
        let parsed = parse_connect_response(&head, &limits).map_err(AnswerError::Head)?;
        let take = match &parsed {
            Some(answer) => answer.head_len - before,
            None => n,
        };
        tcp.read_exact(&mut peeked[..take])
            .await
            .map_err(AnswerError::Io)?;
        if let Some(answer) = parsed {
            return Ok(answer);
        }
    }
}

#[cfg(test)]
mod tests;
