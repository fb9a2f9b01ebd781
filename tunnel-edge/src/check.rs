//! `tunnel-edge check-config`: load every file the edge would load at startup (CA bundle,
//! certificate and key) the way it would, so a garbage, mismatched or expired file fails here
//! with the key and the file named, instead of at the first connection attempt.

use tunnel_io::check::{self, CheckError};

use crate::EdgeConfig;

/// Check the files of a validated config at `now` (Unix seconds); one line per file for the
/// operator.
pub fn check_files(config: &EdgeConfig, now: i64) -> Result<Vec<String>, CheckError> {
    let s = &config.server;
    let mut lines = Vec::new();
    if let Some(dir) = &config.state_dir {
        lines.push(format!("state_dir:     {} (renewal on)", dir.display()));
    } else {
        lines.push("state_dir:     none (the certificate is not renewed)".to_owned());
    }
    if let Some(ca) = &s.ca {
        let info = check::ca_bundle("server.ca", ca, now)?;
        lines.push(format!(
            "server.ca:     {}: {}",
            ca.display(),
            info.describe()
        ));
    }
    if let (Some(cert), Some(key)) = (&s.cert, &s.key) {
        let info = check::cert_and_key("server.cert", cert, "server.key", key, now)?;
        lines.push(format!(
            "server.cert:   {}: {}",
            cert.display(),
            info.describe()
        ));
        lines.push(format!("server.key:    {}: matches", key.display()));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    /// A CA and an edge certificate valid from `from` to `until` (Unix seconds), written to
    /// `dir`; returns (ca, cert, key).
    fn issue(dir: &Path, from: i64, until: i64) -> (PathBuf, PathBuf, PathBuf) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["idc-node-1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "idc-node-1");
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("192.0.2.10".parse().unwrap()));
        params.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(until).unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        let paths = (
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem"),
        );
        std::fs::write(&paths.0, ca.pem()).unwrap();
        std::fs::write(&paths.1, cert.pem()).unwrap();
        std::fs::write(&paths.2, key.serialize_pem()).unwrap();
        paths
    }

    fn config(ca: &Path, cert: &Path, key: &Path) -> EdgeConfig {
        let mut c = EdgeConfig::default();
        c.server.ca = Some(ca.to_owned());
        c.server.cert = Some(cert.to_owned());
        c.server.key = Some(key.to_owned());
        c
    }

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn valid_files_show_identity_sans_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = issue(dir.path(), NOW - 60, NOW + 3600);
        let lines = check_files(&config(&ca, &cert, &key), NOW)
            .unwrap()
            .join("\n");
        assert!(lines.contains("CN=idc-node-1"), "{lines}");
        assert!(lines.contains("192.0.2.10"), "{lines}");
        assert!(lines.contains("2027-01-15T09:00:00Z"), "{lines}");
    }

    #[test]
    fn garbage_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = issue(dir.path(), NOW - 60, NOW + 3600);
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = check_files(&config(&ca, &cert, &key), NOW)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`server.key`") && err.contains(&key.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn unreadable_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, _) = issue(dir.path(), NOW - 60, NOW + 3600);
        let key = dir.path().join("absent-key.pem");
        let err = check_files(&config(&ca, &cert, &key), NOW)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`server.key`") && err.contains("cannot read"),
            "{err}"
        );
    }

    #[test]
    fn mismatched_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, _) = issue(dir.path(), NOW - 60, NOW + 3600);
        let other = tempfile::tempdir().unwrap();
        let (_, _, key) = issue(other.path(), NOW - 60, NOW + 3600);
        let err = check_files(&config(&ca, &cert, &key), NOW)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`server.key`") && err.contains("does not match"),
            "{err}"
        );
    }

    #[test]
    fn expired_certificate_is_refused_with_its_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = issue(dir.path(), NOW - 7200, NOW - 3600);
        let err = check_files(&config(&ca, &cert, &key), NOW)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`server.cert`") && err.contains("expired at 2027-01-15T07:00:00Z"),
            "{err}"
        );
    }
}
