//! What `check-config` verifies about files a binary would load at startup: each certificate
//! and key parses, a key matches its certificate, a certificate is inside its validity window,
//! and a Unix socket's directory exists and is writable. Every failure names the config key
//! and the file, so an operator can fix it without reading code. Reports carry what an operator
//! wants to see (subject, SANs, expiry in RFC 3339). Nothing here opens a socket.

use std::path::{Path, PathBuf};

use rustls::sign::CertifiedKey;
use x509_parser::extensions::GeneralName;

/// A file that would not load, named by its config key.
#[derive(Debug, thiserror::Error)]
#[error("key `{key}` ({path}): {message}")]
pub struct CheckError {
    /// The config key, e.g. `edge.key`.
    pub key: String,
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

fn fail(key: &str, path: &Path, message: impl Into<String>) -> CheckError {
    CheckError {
        key: key.to_owned(),
        path: path.to_owned(),
        message: message.into(),
    }
}

/// What one certificate says.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// The subject, e.g. `CN=idc-node-1`.
    pub subject: String,
    /// DNS and IP subject alternative names.
    pub sans: Vec<String>,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

impl CertInfo {
    /// One line for check-config output.
    pub fn describe(&self) -> String {
        let sans = if self.sans.is_empty() {
            "none".to_owned()
        } else {
            self.sans.join(", ")
        };
        format!(
            "{}, SANs: {sans}, valid until {}",
            self.subject,
            rfc3339(self.not_after)
        )
    }
}

fn cert_info(key: &str, path: &Path, der: &[u8], now: i64) -> Result<CertInfo, CheckError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| fail(key, path, format!("not a valid X.509 certificate: {e}")))?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => sans.push((*d).to_owned()),
                GeneralName::IPAddress(b) => sans.push(ip_text(b)),
                _ => {}
            }
        }
    }
    let info = CertInfo {
        subject: cert.subject().to_string(),
        sans,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    };
    if now >= info.not_after {
        return Err(fail(
            key,
            path,
            format!("certificate expired at {}", rfc3339(info.not_after)),
        ));
    }
    if now < info.not_before {
        return Err(fail(
            key,
            path,
            format!("certificate not valid before {}", rfc3339(info.not_before)),
        ));
    }
    Ok(info)
}

fn ip_text(bytes: &[u8]) -> String {
    match bytes.len() {
        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(bytes).unwrap_or_default()).to_string(),
        16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap_or_default()).to_string(),
        _ => format!("<{} bytes>", bytes.len()),
    }
}

/// Load a certificate (config key `cert_key`) and its private key (`key_key`) as the binary
/// would, check they belong together and the certificate is valid at `now` (Unix seconds).
pub fn cert_and_key(
    cert_key: &str,
    cert: &Path,
    key_key: &str,
    key: &Path,
    now: i64,
) -> Result<CertInfo, CheckError> {
    let chain = crate::tls::load_certs(cert).map_err(|e| fail(cert_key, cert, e.to_string()))?;
    let info = cert_info(cert_key, cert, chain[0].as_ref(), now)?;
    let private = crate::tls::load_key(key).map_err(|e| fail(key_key, key, e.to_string()))?;
    let signing = crate::tls::provider()
        .key_provider
        .load_private_key(private)
        .map_err(|e| fail(key_key, key, format!("unusable private key: {e}")))?;
    match CertifiedKey::new(chain, signing).keys_match() {
        Ok(()) => Ok(info),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(info),
        Err(_) => Err(fail(
            key_key,
            key,
            format!(
                "private key does not match the certificate {} (`{cert_key}`)",
                cert.display()
            ),
        )),
    }
}

/// Load a CA bundle (config key `key`): every certificate parses and the first is valid at
/// `now`.
pub fn ca_bundle(key: &str, path: &Path, now: i64) -> Result<CertInfo, CheckError> {
    let certs = crate::tls::load_certs(path).map_err(|e| fail(key, path, e.to_string()))?;
    crate::tls::load_roots(path).map_err(|e| fail(key, path, e.to_string()))?;
    cert_info(key, path, certs[0].as_ref(), now)
}

/// A file that must exist and be readable (config key `key`), e.g. a token file.
pub fn readable_file(key: &str, path: &Path) -> Result<(), CheckError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| fail(key, path, format!("cannot read: {e}")))
}

/// The directory a Unix socket (config key `key`) would be created in exists, is a directory,
/// and this process may create files there.
pub fn socket_dir(key: &str, socket: &Path) -> Result<(), CheckError> {
    parent_dir(key, socket, "socket directory")
}

/// The directory a file (config key `key`) is written in exists and is writable.
pub fn file_dir(key: &str, file: &Path) -> Result<(), CheckError> {
    parent_dir(key, file, "directory")
}

fn parent_dir(key: &str, socket: &Path, what: &str) -> Result<(), CheckError> {
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let directory_error = |m: String| fail(key, socket, format!("{what} {}: {m}", dir.display()));
    let meta = std::fs::metadata(dir).map_err(|e| directory_error(format!("{e}")))?;
    if !meta.is_dir() {
        return Err(directory_error("not a directory".into()));
    }
    // Writability is what binding needs; probe it the way binding would, with a file that is
    // removed at once.
    let probe = dir.join(format!(".tether-check-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| directory_error(format!("not writable: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Seconds since the Unix epoch now.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Unix seconds as RFC 3339 in UTC (`2026-11-29T11:28:16Z`), for CLI output and logs: people
/// read these, not epoch seconds.
pub fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(4_102_444_799), "2099-12-31T23:59:59Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn missing_socket_directory_is_named_as_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("absent").join("connect.sock");
        let err = socket_dir("connect.unix_socket", &socket)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("connect.unix_socket") && err.contains("socket directory"),
            "{err}"
        );
        assert!(socket_dir("connect.unix_socket", &dir.path().join("ok.sock")).is_ok());
    }
}
