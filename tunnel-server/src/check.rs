//! `tunnel-server check-config`: load every certificate and key the server would load at
//! startup (edge listener, CONNECT and Konnectivity frontends, agent listener, registration
//! API and its CA) the way it would, and check every Unix socket's directory, so a garbage,
//! mismatched or expired file or a missing directory fails here, naming the key and the file,
//! rather than at startup or at the first handshake. Binding sockets is left to `run`.

use std::path::Path;

use tunnel_io::check::{self, CheckError};

use crate::config::ServerConfig;

/// Lines for the operator, one per listener or file.
pub type Report = Vec<String>;

fn pair(
    report: &mut Report,
    cert_key: &str,
    cert: &Path,
    key_key: &str,
    key: &Path,
    now: i64,
) -> Result<(), CheckError> {
    let info = check::cert_and_key(cert_key, cert, key_key, key, now)?;
    report.push(format!(
        "    {cert_key}: {}: {}",
        cert.display(),
        info.describe()
    ));
    Ok(())
}

fn ca(report: &mut Report, key: &str, path: &Path, now: i64) -> Result<(), CheckError> {
    let info = check::ca_bundle(key, path, now)?;
    report.push(format!(
        "    {key}: {}: {}",
        path.display(),
        info.describe()
    ));
    Ok(())
}

/// Check every file and socket directory of a parsed, validated config at `now` (Unix
/// seconds).
pub fn check_files(config: &ServerConfig, now: i64) -> Result<Report, CheckError> {
    let mut r = Report::new();
    let e = &config.edge;
    r.push(format!("  edge listener:   {}", e.listen));
    pair(&mut r, "edge.cert", &e.cert, "edge.key", &e.key, now)?;
    ca(&mut r, "edge.client_ca", &e.client_ca, now)?;

    let c = &config.connect;
    if let Some(p) = &c.unix_socket {
        check::socket_dir("connect.unix_socket", p)?;
        r.push(format!(
            "  CONNECT (unix):  {} mode {:o}",
            p.display(),
            c.unix_socket_mode
        ));
    }
    if let Some(a) = c.tcp_listen {
        r.push(format!("  CONNECT (mTLS):  {a}"));
        if let (Some(cert), Some(key)) = (&c.tcp_cert, &c.tcp_key) {
            pair(
                &mut r,
                "connect.tcp_cert",
                cert,
                "connect.tcp_key",
                key,
                now,
            )?;
        }
        if let Some(p) = &c.tcp_client_ca {
            ca(&mut r, "connect.tcp_client_ca", p, now)?;
        }
    }

    if let Some(k) = &config.konnectivity {
        if let Some(p) = &k.unix_socket {
            check::socket_dir("konnectivity.unix_socket", p)?;
            r.push(format!(
                "  Konnectivity (unix): {} mode {:o}",
                p.display(),
                k.unix_socket_mode
            ));
        }
        if let Some(a) = k.tcp_listen {
            r.push(format!("  Konnectivity (mTLS): {a}"));
            if let (Some(cert), Some(key)) = (&k.tcp_cert, &k.tcp_key) {
                pair(
                    &mut r,
                    "konnectivity.tcp_cert",
                    cert,
                    "konnectivity.tcp_key",
                    key,
                    now,
                )?;
            }
            if let Some(p) = &k.tcp_client_ca {
                ca(&mut r, "konnectivity.tcp_client_ca", p, now)?;
            }
        }
        if let Some(a) = k.agent_listen {
            r.push(format!("  Konnectivity agents: {a}"));
            if let (Some(cert), Some(key)) = (&k.agent_cert, &k.agent_key) {
                pair(
                    &mut r,
                    "konnectivity.agent_cert",
                    cert,
                    "konnectivity.agent_key",
                    key,
                    now,
                )?;
            }
            if let Some(p) = &k.agent_client_ca {
                ca(&mut r, "konnectivity.agent_client_ca", p, now)?;
            }
        }
    }

    if let Some(g) = &config.registration {
        r.push(format!("  registration:    {}", g.listen));
        if let (Some(cert), Some(key)) = (&g.cert, &g.key) {
            pair(
                &mut r,
                "registration.cert",
                cert,
                "registration.key",
                key,
                now,
            )?;
        }
        // The signing CA: its key must match, or every join would be signed by a stranger.
        pair(
            &mut r,
            "registration.ca_cert",
            &g.ca_cert,
            "registration.ca_key",
            &g.ca_key,
            now,
        )?;
        // The token file may not exist yet (`token create` writes it), but its directory must.
        check::file_dir("registration.token_file", &g.token_file)?;
        r.push(format!("    token file: {}", g.token_file.display()));
    }

    match config.admin.listen {
        Some(a) => r.push(format!(
            "  admin:           {a} (/healthz /readyz /metrics)"
        )),
        None => r.push("  admin:           off".to_owned()),
    }
    for (name, address) in &config.upstreams {
        r.push(format!("  upstream:        {name} -> {address}"));
    }
    r.push(format!(
        "  allowed ports:   {:?}",
        config.policy.allowed_ports
    ));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Ca;
    use std::time::Duration;

    /// A year, in seconds: far enough ahead that every test certificate has expired.
    const YEAR: i64 = 365 * 24 * 3600;

    /// A directory with a CA, a server certificate and key, and a config using them with a
    /// CONNECT socket and the registration API.
    fn setup() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("test-ca", Duration::from_secs(3600 * 24 * 30)).unwrap();
        let server = ca
            .issue_server(&["tether.test".into()], &[], Duration::from_secs(3600))
            .unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        write("ca.pem", ca.cert_pem());
        write("ca-key.pem", ca.key_pem());
        write("server.pem", &server.cert_pem);
        write("server-key.pem", &server.key_pem);
        let text = r#"
            [edge]
            cert = "server.pem"
            key = "server-key.pem"
            client_ca = "ca.pem"
            [connect]
            unix_socket = "run/connect.sock"
            [registration]
            token_file = "tokens.json"
            ca_cert = "ca.pem"
            ca_key = "ca-key.pem"
        "#
        .to_owned();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        (dir, text)
    }

    fn check_text(dir: &Path, text: &str, now: i64) -> Result<Report, String> {
        let config = ServerConfig::parse(text, "server.toml", dir).map_err(|e| e.to_string())?;
        check_files(&config, now).map_err(|e| e.to_string())
    }

    #[test]
    fn good_config_shows_certificates_listeners_and_sockets() {
        let (dir, text) = setup();
        let report = check_text(dir.path(), &text, check::unix_now())
            .unwrap()
            .join("\n");
        for want in [
            "CN=tether.test",
            "SANs: tether.test",
            "valid until",
            "registration",
            "connect.sock",
        ] {
            assert!(report.contains(want), "{want} missing:\n{report}");
        }
    }

    #[test]
    fn garbage_key_is_named() {
        let (dir, text) = setup();
        std::fs::write(dir.path().join("server-key.pem"), "not a key").unwrap();
        let err = check_text(dir.path(), &text, check::unix_now()).unwrap_err();
        assert!(
            err.contains("`edge.key`") && err.contains("server-key.pem"),
            "{err}"
        );
    }

    #[test]
    fn mismatched_registration_ca_key_is_refused() {
        let (dir, text) = setup();
        let other = Ca::generate("other-ca", Duration::from_secs(3600)).unwrap();
        std::fs::write(dir.path().join("ca-key.pem"), other.key_pem()).unwrap();
        let err = check_text(dir.path(), &text, check::unix_now()).unwrap_err();
        assert!(
            err.contains("`registration.ca_key`") && err.contains("does not match"),
            "{err}"
        );
    }

    #[test]
    fn expired_server_certificate_is_refused() {
        let (dir, text) = setup();
        let err = check_text(dir.path(), &text, check::unix_now() + YEAR).unwrap_err();
        assert!(
            err.contains("`edge.cert`") && err.contains("expired at 20"),
            "{err}"
        );
    }

    #[test]
    fn missing_socket_directory_is_named() {
        let (dir, text) = setup();
        std::fs::remove_dir(dir.path().join("run")).unwrap();
        let err = check_text(dir.path(), &text, check::unix_now()).unwrap_err();
        assert!(
            err.contains("`connect.unix_socket`") && err.contains("socket directory"),
            "{err}"
        );
    }
}
