//! The edge listener's settings (`[edge]`): the port every node dials before any credential
//! is seen, so its deadlines and per-source and global caps live here together with the
//! per-session and per-node limits that keep one node from starving the others.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The edge listener's default port: the load balancer's tunnel port.
pub const DEFAULT_EDGE_PORT: u16 = 9000;

/// The listener edges dial.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeListenerConfig {
    /// Address to listen on.
    #[serde(default = "default_edge_listen")]
    pub listen: SocketAddr,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA that issues edge certificates (PEM).
    pub client_ca: PathBuf,
    /// Time from TCP accept to a confirmed session (PROXY header, TLS, HTTP/2, session info).
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time from TCP accept to the first byte: a connection that never speaks goes early
    /// instead of holding a handshake slot for the whole `handshake_timeout`.
    #[serde(default = "default_first_byte_timeout", with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Interval between liveness PINGs on each session.
    #[serde(default = "default_ping_interval", with = "humantime_serde")]
    pub ping_interval: Duration,
    /// Unanswered PING intervals after which a session is declared dead.
    #[serde(default = "default_ping_misses")]
    pub ping_misses: u32,
    /// Streams the server opens at once on one edge session.
    #[serde(default = "default_max_streams_per_edge")]
    pub max_streams_per_edge: usize,
    /// Dials waiting for one edge's answer at once; beyond, new dials get 503 at once.
    #[serde(default = "default_max_pending_dials")]
    pub max_pending_dials: usize,
    /// Expect a PROXY protocol v1/v2 header from the load balancer on every connection and
    /// take the edge's address from it (connections without one are refused).
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Networks of the load balancers whose PROXY headers are believed (required with
    /// `proxy_protocol`). A header from elsewhere refuses the connection; a direct TLS
    /// connection from elsewhere is served under its own address.
    #[serde(default)]
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
    /// Concurrent edge handshakes in progress (TLS exhaustion guard); beyond, new
    /// connections are closed at once.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Concurrent handshakes from one source address (IPv6: one /64; the PROXY header's
    /// source with `proxy_protocol`), so one machine cannot hold every handshake slot. Many
    /// nodes of one site may share a NAT address, so this is not tiny.
    #[serde(default = "default_max_handshakes_per_source")]
    pub max_handshakes_per_source: usize,
    /// PING and SETTINGS frames per second an edge may send on one connection (session or
    /// upstream). Legitimate traffic is one PING and one PING ACK per `ping_interval`; a peer
    /// above the rate has its connection closed.
    #[serde(default = "default_control_frames_per_second")]
    pub control_frames_per_second: u32,
    /// Control frames allowed at once before `control_frames_per_second` applies.
    #[serde(default = "default_control_frames_burst")]
    pub control_frames_burst: u32,
    /// Edge → cloud upstream streams one node may have open on this server (each holds a
    /// server descriptor); beyond, new streams are refused with 503.
    #[serde(default = "default_max_upstream_streams_per_node")]
    pub max_upstream_streams_per_node: usize,
    /// Upstream dials of one node in progress at once; beyond, refused with 503.
    #[serde(default = "default_max_upstream_dials_per_node")]
    pub max_upstream_dials_per_node: usize,
    /// Upstream streams of all nodes together; absent = a quarter of the process's open-file
    /// limit, so the rest stays available to the listeners, sessions and frontends.
    #[serde(default)]
    pub max_upstream_streams: Option<usize>,
    /// Serve edge sessions over QUIC on UDP as well (ALPN `tether-quic/1`).
    #[serde(default = "default_quic")]
    pub quic: bool,
    /// UDP address of the QUIC listener; absent = `listen`'s address and port number (the
    /// port actually bound, when `listen` asks for port 0).
    #[serde(default)]
    pub quic_listen: Option<SocketAddr>,
    /// QUIC handshakes from unvalidated addresses in progress at once before every further
    /// one is answered with a stateless Retry (address validation, one extra round trip);
    /// 0 = always Retry. See `edge/session/quic.rs` for the measurement behind the default.
    #[serde(default = "default_quic_retry_above")]
    pub quic_retry_above: usize,
    /// Take lanes: a second TCP connection per edge session, on another shard, that streams
    /// shown to be bulk move to so the session's small exchanges keep their pace
    /// (docs/ARCHITECTURE.md, "Lanes"). An edge opens one only when its `server.lane` is on.
    #[serde(default = "default_lanes")]
    pub lanes: bool,
}

impl EdgeListenerConfig {
    /// The control-frame limit of every edge connection.
    pub fn control_frame_quota(&self) -> tunnel_io::control_frames::ControlFrameQuota {
        tunnel_io::control_frames::ControlFrameQuota {
            per_second: self.control_frames_per_second,
            burst: self.control_frames_burst,
        }
    }

    /// The edge listener's own rules (deadlines, limits, PROXY trust); the message names the
    /// key. Called by [`ServerConfig::validate`](super::ServerConfig::validate).
    pub(super) fn validate(&self) -> Result<(), String> {
        let e = self;
        for (key, path) in [
            ("edge.cert", &e.cert),
            ("edge.key", &e.key),
            ("edge.client_ca", &e.client_ca),
        ] {
            if !path.is_file() {
                return Err(format!("key `{key}`: file {} not found", path.display()));
            }
        }
        if e.ping_interval.is_zero() {
            return Err("key `edge.ping_interval` must be > 0".into());
        }
        if e.ping_misses == 0 {
            return Err("key `edge.ping_misses` must be >= 1".into());
        }
        if e.handshake_timeout.is_zero() || e.first_byte_timeout.is_zero() {
            return Err(
                "keys `edge.handshake_timeout` and `edge.first_byte_timeout` must be > 0".into(),
            );
        }
        if e.first_byte_timeout > e.handshake_timeout {
            return Err(
                "key `edge.first_byte_timeout` must not exceed `edge.handshake_timeout`".into(),
            );
        }
        if e.max_streams_per_edge == 0 || e.max_handshakes == 0 || e.max_handshakes_per_source == 0
        {
            return Err(
                "keys `edge.max_streams_per_edge`, `edge.max_handshakes` and `edge.max_handshakes_per_source` must be > 0".into(),
            );
        }
        crate::registration::config::check_proxy_from(
            "edge",
            e.proxy_protocol,
            &e.proxy_protocol_from,
        )?;
        if e.max_upstream_streams_per_node == 0
            || e.max_upstream_dials_per_node == 0
            || e.max_upstream_streams == Some(0)
        {
            return Err("keys `edge.max_upstream_streams_per_node`, `edge.max_upstream_dials_per_node` and `edge.max_upstream_streams` must be > 0".into());
        }
        if e.control_frames_per_second == 0 || e.control_frames_burst == 0 {
            return Err(
                "keys `edge.control_frames_per_second` and `edge.control_frames_burst` must be > 0"
                    .into(),
            );
        }
        Ok(())
    }
}

fn default_quic() -> bool {
    true
}
fn default_lanes() -> bool {
    true
}
/// Default of `edge.quic_retry_above`: a fleet's reconnect after a replica restart brings at
/// most a few hundred handshakes at once per replica, well below this; a flood of Initials
/// passes it within milliseconds and then costs no state.
fn default_quic_retry_above() -> usize {
    64
}
fn default_edge_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_EDGE_PORT))
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_ping_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_ping_misses() -> u32 {
    3
}
fn default_max_streams_per_edge() -> usize {
    10_000
}
fn default_max_pending_dials() -> usize {
    1000
}
fn default_max_handshakes() -> usize {
    1024
}
fn default_first_byte_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_max_handshakes_per_source() -> usize {
    64
}
fn default_control_frames_per_second() -> u32 {
    10
}
fn default_control_frames_burst() -> u32 {
    50
}
fn default_max_upstream_streams_per_node() -> usize {
    256
}
fn default_max_upstream_dials_per_node() -> usize {
    32
}
