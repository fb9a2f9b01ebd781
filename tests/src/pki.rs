//! Certificates for one test, in one temporary directory: the tunnel CA (server certificate,
//! edge certificates), the frontend CA (the apiserver's client certificate), and a separate
//! kubelet CA whose serving certificate the tunnel never holds.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use protocol::NodeName;
use tunnel_server::pki::{self, Ca, CaLayout, CertifiedKey};

use crate::{NODE, NODE_IP};

/// Certificate and key files of one edge.
#[derive(Debug, Clone)]
pub struct EdgeFiles {
    /// The node name in the certificate.
    pub node: String,
    /// The node IPs in the certificate.
    pub ips: Vec<IpAddr>,
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// Every certificate a test needs.
pub struct Pki {
    dir: tempfile::TempDir,
    /// Paths of the files `tunnel-server ca init` creates.
    pub layout: CaLayout,
    tunnel_ca: Ca,
    /// The kubelet's own CA (PEM); clients verify the kubelet against it.
    pub kubelet_ca_pem: String,
    /// `kubelet-ca.pem` (for curl's `--cacert`).
    pub kubelet_ca_file: PathBuf,
    /// The kubelet's serving certificate for [`NODE`] and [`NODE_IP`].
    pub kubelet_cert: CertifiedKey,
}

impl Pki {
    /// Create the CAs, the server and apiserver-client certificates, and the kubelet's.
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("tether-pki-")
            .tempdir()
            .expect("temporary PKI directory");
        let layout = pki::init_ca_dir(dir.path(), &[], &[], pki::SERVER_VALIDITY, false)
            .expect("init CA directory");
        let tunnel_ca = Ca::load(&layout.ca_cert(), &layout.ca_key()).expect("load tunnel CA");
        let kubelet_ca = Ca::generate("test kubelet CA", pki::CA_VALIDITY).expect("kubelet CA");
        let kubelet_cert = kubelet_ca
            .issue_server(&[NODE.to_string()], &[NODE_IP], pki::SERVER_VALIDITY)
            .expect("kubelet serving certificate");
        let kubelet_ca_file = dir.path().join("kubelet-ca.pem");
        pki::write_pem(&kubelet_ca_file, kubelet_ca.cert_pem(), false, false)
            .expect("write kubelet CA");
        Pki {
            layout,
            tunnel_ca,
            kubelet_ca_pem: kubelet_ca.cert_pem().to_owned(),
            kubelet_ca_file,
            kubelet_cert,
            dir,
        }
    }

    /// The directory holding every file.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Issue an edge certificate from the tunnel CA.
    pub fn issue_edge(&self, node: &str, ips: &[IpAddr]) -> EdgeFiles {
        self.write_edge(&self.tunnel_ca, node, ips, "")
    }

    /// Issue an edge certificate for `node` from a CA the server does not trust.
    pub fn issue_foreign_edge(&self, node: &str, ips: &[IpAddr]) -> EdgeFiles {
        let foreign = Ca::generate("tether-tunnel-ca", pki::CA_VALIDITY).expect("foreign CA");
        self.write_edge(&foreign, node, ips, "foreign-")
    }

    fn write_edge(&self, ca: &Ca, node: &str, ips: &[IpAddr], prefix: &str) -> EdgeFiles {
        let name = NodeName::parse(node).expect("valid node name");
        let issued = ca
            .issue_edge(&name, ips, pki::EDGE_VALIDITY)
            .expect("issue edge certificate");
        let cert = self.dir().join(format!("{prefix}{node}.pem"));
        let key = self.dir().join(format!("{prefix}{node}-key.pem"));
        pki::write_pem(&cert, &issued.cert_pem, false, true).expect("write edge cert");
        pki::write_pem(&key, &issued.key_pem, true, true).expect("write edge key");
        EdgeFiles {
            node: node.to_owned(),
            ips: ips.to_vec(),
            cert,
            key,
        }
    }

    /// TLS client configuration of kube-apiserver at the mTLS frontend.
    pub fn frontend_client_tls(&self) -> Arc<rustls::ClientConfig> {
        Arc::new(
            tunnel_io::tls::client_config_mtls(
                &self.layout.ca_cert(),
                &self.layout.frontend_client_cert(),
                &self.layout.frontend_client_key(),
                &[],
            )
            .expect("frontend client TLS config"),
        )
    }

    /// A client at the mTLS frontend that trusts the server but presents `cert` and `key`.
    pub fn frontend_tls_with(&self, cert: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
        Arc::new(
            tunnel_io::tls::client_config_mtls(&self.layout.ca_cert(), cert, key, &[])
                .expect("client TLS config"),
        )
    }

    /// A client at the mTLS frontend that trusts the server and presents no certificate.
    pub fn frontend_tls_without_cert(&self) -> Arc<rustls::ClientConfig> {
        let pem = std::fs::read_to_string(self.layout.ca_cert()).expect("read ca.pem");
        Arc::new(tunnel_server::client::trust_only(&pem).expect("trust-only TLS config"))
    }

    /// TLS client configuration that verifies the kubelet against its own CA.
    pub fn kubelet_client_tls(&self) -> Arc<rustls::ClientConfig> {
        Arc::new(tunnel_server::client::trust_only(&self.kubelet_ca_pem).expect("kubelet TLS"))
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}
