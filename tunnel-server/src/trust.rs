//! Keeps the two trust domains apart. Edge certificates (issued to every node by the tunnel
//! CA) must never authenticate at an apiserver-facing frontend: if a frontend trusted the
//! edge CA, any node's certificate could open tunnels to every other node. Checked at load
//! on the certificates themselves (public keys), not on paths, so a copy of the edge CA
//! under another name is caught too.

use std::path::Path;

use crate::config::ServerConfig;

/// The subject public keys of the certificates in a PEM file (empty when it holds none).
fn ca_keys(path: &Path) -> Vec<Vec<u8>> {
    let Ok(pem) = std::fs::read(path) else {
        return Vec::new();
    };
    tunnel_io::tls::certs_from_pem(&pem)
        .iter()
        .filter_map(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
            Some(cert.public_key().raw.to_vec())
        })
        .collect()
}

/// Refuse a frontend client CA that is (or shares a key with) a CA edge certificates chain
/// to: `edge.client_ca`, `registration.ca_cert`, `konnectivity.agent_client_ca`. The
/// message names both keys.
pub fn check_separate_frontend_ca(config: &ServerConfig) -> Result<(), String> {
    let mut edge_side: Vec<(&str, &Path)> = vec![("edge.client_ca", &config.edge.client_ca)];
    if let Some(r) = &config.registration {
        edge_side.push(("registration.ca_cert", &r.ca_cert));
    }
    let mut frontends: Vec<(&str, &Path)> = Vec::new();
    if let Some(ca) = &config.connect.tcp_client_ca {
        frontends.push(("connect.tcp_client_ca", ca));
    }
    if let Some(k) = &config.konnectivity {
        if let Some(ca) = &k.agent_client_ca {
            edge_side.push(("konnectivity.agent_client_ca", ca));
        }
        if let Some(ca) = &k.tcp_client_ca {
            frontends.push(("konnectivity.tcp_client_ca", ca));
        }
    }
    for (frontend_key, frontend) in &frontends {
        let frontend_keys = ca_keys(frontend);
        for (edge_key, edge) in &edge_side {
            let edge_keys = ca_keys(edge);
            if frontend_keys.iter().any(|k| edge_keys.contains(k)) {
                return Err(format!(
                    "key `{frontend_key}`: {} is the same CA as `{edge_key}` ({}); the frontend \
                     needs its own CA, or every node certificate could open tunnels to every \
                     node (`tunnel-server ca init` creates a separate frontend-ca.pem)",
                    frontend.display(),
                    edge.display()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, connect_ca: &str, extra: &str) -> Result<ServerConfig, String> {
        let text = format!(
            "[edge]\nlisten = \"127.0.0.1:0\"\ncert = \"server.pem\"\nkey = \"server-key.pem\"\n\
             client_ca = \"ca.pem\"\n[connect]\ntcp_listen = \"127.0.0.1:0\"\n\
             tcp_cert = \"server.pem\"\ntcp_key = \"server-key.pem\"\n\
             tcp_client_ca = \"{connect_ca}\"\n{extra}"
        );
        ServerConfig::parse(&text, "server.toml", dir).map_err(|e| e.to_string())
    }

    #[test]
    fn a_frontend_trusting_the_edge_ca_is_refused_by_certificate_not_path() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        crate::pki::init_ca_dir(d, &[], &[], crate::pki::SERVER_VALIDITY, true).unwrap();
        config(d, "frontend-ca.pem", "").expect("separate CAs load");
        let err = config(d, "ca.pem", "").unwrap_err();
        assert!(
            err.contains("connect.tcp_client_ca") && err.contains("edge.client_ca"),
            "{err}"
        );
        // The edge CA copied under another name is the same CA.
        std::fs::copy(d.join("ca.pem"), d.join("copy.pem")).unwrap();
        let err = config(d, "copy.pem", "").unwrap_err();
        assert!(err.contains("same CA"), "{err}");
        // A bundle that also holds the edge CA counts too.
        let bundle = [
            std::fs::read_to_string(d.join("frontend-ca.pem")).unwrap(),
            std::fs::read_to_string(d.join("ca.pem")).unwrap(),
        ]
        .concat();
        std::fs::write(d.join("bundle.pem"), bundle).unwrap();
        assert!(config(d, "bundle.pem", "").is_err());
        // The Konnectivity frontend's CA likewise.
        let konnectivity = "[konnectivity]\nunix_socket = \"k.sock\"\n\
                            tcp_listen = \"127.0.0.1:0\"\ntcp_cert = \"server.pem\"\n\
                            tcp_key = \"server-key.pem\"\ntcp_client_ca = \"copy.pem\"\n";
        let err = config(d, "frontend-ca.pem", konnectivity).unwrap_err();
        assert!(err.contains("konnectivity.tcp_client_ca"), "{err}");
    }
}
