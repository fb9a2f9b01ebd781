//! PEM files on disk: atomic, permission-correct writes, and the directory `tunnel-server ca
//! init` creates (tunnel CA, server certificate, a separate frontend CA and its client).

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Ca, PkiError, CA_VALIDITY};

/// Write a PEM file atomically (temporary file in the same directory, then rename): mode 0600
/// if `secret`, else 0644. Refuses to replace an existing file unless `overwrite`.
pub fn write_pem(path: &Path, pem: &str, secret: bool, overwrite: bool) -> Result<(), PkiError> {
    let write_err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    // tempfile creates the file 0600, so a key is never readable by others, not even briefly.
    let mut tmp = tempfile::Builder::new()
        .prefix(".tether-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(write_err)?;
    #[cfg(unix)]
    if !secret {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(write_err)?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    tmp.write_all(pem.as_bytes()).map_err(write_err)?;
    // Data on disk before the rename makes it visible: a crash must not leave an empty key file.
    tmp.as_file().sync_all().map_err(write_err)?;
    let persisted = if overwrite {
        tmp.persist(path)
    } else {
        // No-clobber rename: the existence check and the rename are one atomic step.
        tmp.persist_noclobber(path)
    };
    if let Err(e) = persisted {
        return Err(if e.error.kind() == io::ErrorKind::AlreadyExists {
            PkiError::Exists {
                path: path.to_owned(),
            }
        } else {
            write_err(e.error)
        });
    }
    // Make the rename itself durable.
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_err)
}

/// The files `tunnel-server ca init --dir DIR` creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaLayout {
    /// The directory holding them.
    pub dir: PathBuf,
}

impl CaLayout {
    /// Tunnel CA certificate (`ca.pem`): edges trust it; it signs the server and edge certs.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// Tunnel CA private key (`ca-key.pem`).
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    /// Tunnel server certificate (`server.pem`).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    /// Tunnel server private key (`server-key.pem`).
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }
    /// Frontend CA certificate (`frontend-ca.pem`): the mTLS CONNECT frontend trusts only it.
    pub fn frontend_ca_cert(&self) -> PathBuf {
        self.dir.join("frontend-ca.pem")
    }
    /// Frontend CA private key (`frontend-ca-key.pem`).
    pub fn frontend_ca_key(&self) -> PathBuf {
        self.dir.join("frontend-ca-key.pem")
    }
    /// Client certificate kube-apiserver presents to the frontend (`apiserver-client.pem`).
    pub fn frontend_client_cert(&self) -> PathBuf {
        self.dir.join("apiserver-client.pem")
    }
    /// Private key of the frontend client certificate (`apiserver-client-key.pem`).
    pub fn frontend_client_key(&self) -> PathBuf {
        self.dir.join("apiserver-client-key.pem")
    }

    /// Every file with whether it is secret, keys first.
    pub(super) fn files(&self) -> [(PathBuf, bool); 8] {
        [
            (self.ca_key(), true),
            (self.server_key(), true),
            (self.frontend_ca_key(), true),
            (self.frontend_client_key(), true),
            (self.ca_cert(), false),
            (self.server_cert(), false),
            (self.frontend_ca_cert(), false),
            (self.frontend_client_cert(), false),
        ]
    }
}

/// Create `dir` (mode 0700 if new) holding: the tunnel CA; a server certificate it signs for
/// "localhost", 127.0.0.1, ::1 plus `server_dns`/`server_ips`; a *separate* frontend CA, so an
/// edge certificate can never authenticate at the apiserver-facing frontend; and a frontend
/// client certificate with CN "kube-apiserver". Both CAs last [`CA_VALIDITY`]; `validity` is the
/// lifetime of the server and frontend client certificates. Without `overwrite`, nothing is
/// written if any of the files already exists.
pub fn init_ca_dir(
    dir: &Path,
    server_dns: &[String],
    server_ips: &[IpAddr],
    validity: Duration,
    overwrite: bool,
) -> Result<CaLayout, PkiError> {
    let layout = CaLayout {
        dir: dir.to_owned(),
    };
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| PkiError::Write {
        path: dir.to_owned(),
        source,
    })?;
    if !overwrite {
        // Check all first so a refusal leaves no half-initialised directory behind.
        if let Some((path, _)) = layout.files().into_iter().find(|(p, _)| p.exists()) {
            return Err(PkiError::Exists { path });
        }
    }

    let mut dns = vec!["localhost".to_owned()];
    for name in server_dns {
        if !dns.contains(name) {
            dns.push(name.clone());
        }
    }
    let mut ips: Vec<IpAddr> = vec![[127, 0, 0, 1].into(), std::net::Ipv6Addr::LOCALHOST.into()];
    for ip in server_ips {
        if !ips.contains(ip) {
            ips.push(*ip);
        }
    }

    let tunnel_ca = Ca::generate("tether-tunnel-ca", CA_VALIDITY)?;
    let server = tunnel_ca.issue_server(&dns, &ips, validity)?;
    let frontend_ca = Ca::generate("tether-frontend-ca", CA_VALIDITY)?;
    let client = frontend_ca.issue_client("kube-apiserver", validity)?;

    let contents = [
        tunnel_ca.key_pem(),
        &server.key_pem,
        frontend_ca.key_pem(),
        &client.key_pem,
        tunnel_ca.cert_pem(),
        &server.cert_pem,
        frontend_ca.cert_pem(),
        &client.cert_pem,
    ];
    for ((path, secret), pem) in layout.files().into_iter().zip(contents) {
        write_pem(&path, pem, secret, overwrite)?;
    }
    Ok(layout)
}

pub(crate) fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}
