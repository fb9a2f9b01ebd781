//! Telling an operator that `server.address` points at the wrong port. The registration API,
//! the CONNECT frontend and the admin listener often sit on the same host as the edge listener;
//! dialing one of them fails deep in TLS ("NoApplicationProtocol", "corrupt message") or, on
//! the mTLS CONNECT port, only later with "UnknownCA". Where the handshake shows it (the peer
//! refused our ALPN, did not speak TLS, or negotiated no tunnel protocol), say so plainly.

use rustls::AlertDescription;

/// The message for a failed TLS handshake with `host:port`.
pub fn describe(host: &str, port: u16, error: &std::io::Error) -> String {
    let rustls_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let detail = match rustls_error {
        Some(rustls::Error::AlertReceived(AlertDescription::NoApplicationProtocol)) => {
            "it refused the tunnel's application protocol"
        }
        Some(rustls::Error::InvalidMessage(_)) => "it does not answer TLS",
        _ => return format!("TLS handshake: {error}"),
    };
    not_an_edge_listener(host, port, detail)
}

/// After a successful handshake: the peer must have chosen the tunnel session protocol.
pub fn check_alpn(host: &str, port: u16, negotiated: Option<&[u8]>) -> Result<(), String> {
    if negotiated == Some(tunnel_io::tls::ALPN_EDGE_SESSION) {
        return Ok(());
    }
    let got = negotiated
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_else(|| "none".into());
    Err(not_an_edge_listener(
        host,
        port,
        &format!("it negotiated application protocol {got}"),
    ))
}

fn not_an_edge_listener(host: &str, port: u16, detail: &str) -> String {
    format!(
        "{host}:{port} is not a Tether edge listener ({detail}); point `server.address` at \
         the tunnel port of the load balancer (9000 by default), not the registration, \
         CONNECT or admin port"
    )
}
