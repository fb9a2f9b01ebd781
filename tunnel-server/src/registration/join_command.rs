//! `token create --print-join-command`: the line an operator runs on a node to import it,
//! carrying the registration address, the token and the pin of the CA the registration
//! listener's certificate chains to (kubeadm's `--discovery-token-ca-cert-hash` format).
//!
//! Everything that would make that line fail on the node (no address, an address whose host
//! the certificate does not name, a certificate without its CA) is refused here, before a
//! token is created: a printed command must work.

use anyhow::Context;
use tunnel_io::ca_pin::{CaPin, PinnedCaVerifier};

use super::chain;
use crate::config::ServerConfig;

/// Where nodes reach the registration API and which name they verify.
#[derive(Debug, Clone)]
pub struct JoinTarget {
    /// `host:port` of the registration API as nodes reach it (the load balancer's 443).
    pub address: String,
    /// A name in the registration certificate, when the address's host is not one.
    pub server_name: Option<String>,
    /// The pin of the CA nodes must find in the served chain.
    pub pin: CaPin,
}

/// Work out the join target from the server config and the flags, checking the served
/// chain as a node would: under the pinned CA, for the name the node will verify.
pub fn join_target(
    config: &ServerConfig,
    address: Option<&str>,
    server_name: Option<&str>,
) -> anyhow::Result<JoinTarget> {
    let address = address.context(
        "--print-join-command needs --server-address HOST:PORT: the registration API's address \
         as nodes reach it (the load balancer's port 443); the server config does not record it",
    )?;
    let (host, _port) = split_address(address)?;
    let registration = config
        .registration
        .as_ref()
        .context("the server config has no [registration] section")?;
    let cert = chain::certificate_path(registration, &config.edge);
    let served = chain::served_chain(cert, &registration.ca_cert)?;
    let pin = chain::join_pin(cert, &registration.ca_cert)?;
    let name = server_name.unwrap_or(host);
    let server_name = tunnel_io::tls::server_name(name).map_err(anyhow::Error::msg)?;
    let (verifier, _) = PinnedCaVerifier::new(pin);
    verifier
        .verify_presented(
            &served[0],
            &served[1..],
            &server_name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "a node could not join with this command: {e} ({}); give --server-name with a \
                 name the certificate holds, or a certificate naming {name}",
                cert.display()
            )
        })?;
    Ok(JoinTarget {
        address: address.to_owned(),
        server_name: server_name_flag(server_name, host),
        pin,
    })
}

fn server_name_flag(name: rustls::pki_types::ServerName<'_>, host: &str) -> Option<String> {
    let name = match name {
        rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_owned(),
        rustls::pki_types::ServerName::IpAddress(ip) => std::net::IpAddr::from(ip).to_string(),
        _ => return None,
    };
    (name != host).then_some(name)
}

/// `host:port` with a port; IPv6 in brackets.
fn split_address(address: &str) -> anyhow::Result<(&str, u16)> {
    let (host, port) = address
        .rsplit_once(':')
        .with_context(|| format!("--server-address {address:?}: want HOST:PORT"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("--server-address {address:?}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    anyhow::ensure!(
        !host.is_empty(),
        "--server-address {address:?}: want HOST:PORT"
    );
    Ok((host, port))
}

/// The lines to print after the token: the installer's command and the bare `tunnel-edge
/// join` for nodes without the installer. Shell comments, so the block pastes as is.
pub fn join_command_lines(target: &JoinTarget, token: &str) -> Vec<String> {
    let name = target
        .server_name
        .as_ref()
        .map(|n| format!(" --server-name {n}"))
        .unwrap_or_default();
    vec![
        "# On the node, as root, with install.sh and tunnel-edge in one directory (add \
         --node-ip for each InternalIP kube-apiserver dials):"
            .to_owned(),
        format!(
            "sh install.sh --server {} --token {token} --ca-hash {}{name}",
            target.address, target.pin
        ),
        "# Or without the installer:".to_owned(),
        format!(
            "tunnel-edge join --server https://{} --token {token} --ca-hash {}{name} \
             --node-name \"$(hostname)\"",
            target.address, target.pin
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_need_a_host_and_a_port() {
        assert_eq!(
            split_address("lb.example:443").unwrap(),
            ("lb.example", 443)
        );
        assert_eq!(
            split_address("[2001:db8::1]:443").unwrap(),
            ("2001:db8::1", 443)
        );
        for bad in ["lb.example", ":443", "lb.example:0", "lb.example:x"] {
            assert!(split_address(bad).is_err(), "{bad}");
        }
    }
}
