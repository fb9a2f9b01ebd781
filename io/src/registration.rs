//! The registration API's wire types and gRPC plumbing (generated from
//! `protocol/proto/registration.proto`), shared by the server (which serves it) and the edge
//! (which calls it). Unlike the tunnel's own codecs this is plain protobuf over gRPC, so the
//! generated types are public here; both ends validate every field before use.

// Generated code (tests/registration_codegen.rs keeps it in step with the .proto).
#[allow(missing_docs, clippy::all)]
#[rustfmt::skip]
pub mod pb;

/// ALPN of the registration listener: plain gRPC over HTTP/2.
pub const ALPN_REGISTRATION: &[u8] = b"h2";
/// Largest registration message accepted either way, in bytes (a CSR or a certificate with
/// its CA bundle is a few KiB).
pub const MAX_MESSAGE: usize = 64 << 10;
/// The one answer to every refused join or renewal, whatever was wrong: no oracle.
pub const REFUSED: &str = "registration refused";

impl std::fmt::Debug for pb::JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a credential: never in a log line, at any level.
        f.debug_struct("JoinRequest")
            .field("token", &"<redacted>")
            .field("node_name", &self.node_name)
            .field("node_ips", &self.node_ips)
            .field("csr_der", &format_args!("{} bytes", self.csr_der.len()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_request_debug_hides_the_token() {
        let request = pb::JoinRequest {
            token: "abcdef.0123456789abcdef".into(),
            node_name: "node-a".into(),
            node_ips: vec!["10.0.0.1".into()],
            csr_der: vec![1, 2, 3],
        };
        let shown = format!("{request:?}");
        assert!(!shown.contains("0123456789abcdef"), "{shown}");
        assert!(shown.contains("node-a"), "{shown}");
    }
}
