//! Parsing and validation of whole config files: defaults, resolved paths, and that every
//! fail-closed rule names its key.

use super::*;

fn dir_with_pems() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in ["server.pem", "server-key.pem", "ca.pem", "fca.pem"] {
        std::fs::write(dir.path().join(f), "x").unwrap();
    }
    dir
}

const MINIMAL: &str = r#"
        [edge]
        cert = "server.pem"
        key = "server-key.pem"
        client_ca = "ca.pem"
        [connect]
        unix_socket = "connect.sock"
    "#;

#[test]
fn minimal_config_gets_defaults_and_resolved_paths() {
    let dir = dir_with_pems();
    let c = ServerConfig::parse(MINIMAL, "t.toml", dir.path()).unwrap();
    assert_eq!(c.edge.listen.port(), DEFAULT_EDGE_PORT);
    assert_eq!(c.policy.allowed_ports, vec![10250]);
    assert_eq!(c.connect.unix_socket_mode, 0o600);
    assert_eq!(c.edge.cert, dir.path().join("server.pem"));
    assert_eq!(
        c.connect.unix_socket.unwrap(),
        dir.path().join("connect.sock")
    );
}

#[test]
fn unknown_key_is_named() {
    let dir = dir_with_pems();
    let text = format!("{MINIMAL}\n[policy]\nallowed_port = [1]\n");
    let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
    assert!(err.to_string().contains("allowed_port"), "{err}");
    assert!(err.to_string().starts_with("t.toml:"), "{err}");
}

#[test]
fn tcp_frontend_without_client_ca_fails_closed() {
    let dir = dir_with_pems();
    let text = r#"
            [edge]
            cert = "server.pem"
            key = "server-key.pem"
            client_ca = "ca.pem"
            [connect]
            tcp_listen = "127.0.0.1:0"
            tcp_cert = "server.pem"
            tcp_key = "server-key.pem"
        "#;
    let err = ServerConfig::parse(text, "t.toml", dir.path()).unwrap_err();
    assert!(err.to_string().contains("connect.tcp_client_ca"), "{err}");
}

#[test]
fn misspelled_frontend_key_stops_startup() {
    let dir = dir_with_pems();
    let text = MINIMAL.replace("[connect]", "[connect]\ntcp_client_cert = \"ca.pem\"");
    let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
    assert!(err.to_string().contains("tcp_client_cert"), "{err}");
}

#[test]
fn no_frontend_is_an_error() {
    let dir = dir_with_pems();
    let text = MINIMAL.replace("unix_socket = \"connect.sock\"", "");
    let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
    assert!(err.to_string().contains("no frontend"), "{err}");
}

#[test]
fn konnectivity_alone_is_a_frontend() {
    let dir = dir_with_pems();
    let text = MINIMAL.replace("[connect]", "[konnectivity]");
    let c = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap();
    let k = c.konnectivity.unwrap();
    assert_eq!(k.unix_socket.unwrap(), dir.path().join("connect.sock"));
    assert_eq!(k.unix_socket_mode, 0o600);
    assert!(c.connect.unix_socket.is_none());
}

#[test]
fn konnectivity_tcp_without_client_ca_fails_closed() {
    let dir = dir_with_pems();
    let text = format!(
        "{MINIMAL}\n[konnectivity]\ntcp_listen = \"127.0.0.1:0\"\ntcp_cert = \"server.pem\"\ntcp_key = \"server-key.pem\"\n"
    );
    let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("konnectivity.tcp_client_ca"),
        "{err}"
    );
}

#[test]
fn empty_konnectivity_section_and_misspelled_key_are_errors() {
    let dir = dir_with_pems();
    let err = ServerConfig::parse(
        &format!("{MINIMAL}\n[konnectivity]\n"),
        "t.toml",
        dir.path(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("section `konnectivity`"), "{err}");
    let text = format!("{MINIMAL}\n[konnectivity]\nunix_sock = \"k.sock\"\n");
    let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
    assert!(err.to_string().contains("unix_sock"), "{err}");
    let text =
        format!("{MINIMAL}\n[konnectivity]\nunix_socket = \"k.sock\"\nunix_socket_mode = 0o606\n");
    let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("konnectivity.unix_socket_mode"),
        "{err}"
    );
}

#[test]
fn konnectivity_agents_alone_are_not_a_frontend() {
    let dir = dir_with_pems();
    let text = MINIMAL.replace(
        "[connect]\n        unix_socket = \"connect.sock\"",
        "[konnectivity]\nagent_listen = \"127.0.0.1:0\"",
    );
    let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
    assert!(err.to_string().contains("no frontend"), "{err}");
    let both = format!("{MINIMAL}\n[konnectivity]\nagent_listen = \"127.0.0.1:0\"\n");
    let c = ServerConfig::parse(&both, "t.toml", dir.path()).unwrap();
    assert!(c.konnectivity.unwrap().agent_listen.is_some());
}

#[test]
fn world_accessible_socket_is_refused() {
    let dir = dir_with_pems();
    let text = MINIMAL.replace("[connect]", "[connect]\nunix_socket_mode = 0o666");
    let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
    assert!(err.to_string().contains("unix_socket_mode"), "{err}");
}

#[test]
fn missing_cert_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = ServerConfig::parse(MINIMAL, "t.toml", dir.path()).unwrap_err();
    assert!(err.to_string().contains("edge.cert"), "{err}");
}

#[test]
fn bad_duration_is_named() {
    let dir = dir_with_pems();
    let text = MINIMAL.replace("[connect]", "[connect]\ndial_timeout = \"ten\"");
    let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
    assert!(err.to_string().contains("dial_timeout"), "{err}");
}

#[test]
fn zero_ping_misses_refused() {
    let dir = dir_with_pems();
    let text = MINIMAL.replace(
        "client_ca = \"ca.pem\"",
        "client_ca = \"ca.pem\"\nping_misses = 0",
    );
    let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
    assert!(err.to_string().contains("edge.ping_misses"), "{err}");
}

#[test]
fn proxy_protocol_without_balancer_networks_fails_closed() {
    let dir = dir_with_pems();
    let with = |extra: &str| {
        MINIMAL.replace(
            "client_ca = \"ca.pem\"",
            &format!("client_ca = \"ca.pem\"\n{extra}"),
        )
    };
    let err =
        ServerConfig::parse(&with("proxy_protocol = true"), "t.toml", dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("edge.proxy_protocol_from"),
        "{err}"
    );
    let err = ServerConfig::parse(
        &with("proxy_protocol_from = [\"10.0.0.0/8\"]"),
        "t.toml",
        dir.path(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("edge.proxy_protocol"), "{err}");
    let c = ServerConfig::parse(
        &with("proxy_protocol = true\nproxy_protocol_from = [\"10.0.0.0/8\"]"),
        "t.toml",
        dir.path(),
    )
    .unwrap();
    assert_eq!(c.edge.proxy_protocol_from.len(), 1);
}

#[test]
fn first_byte_deadline_beyond_the_handshake_deadline_is_refused() {
    let dir = dir_with_pems();
    let text = MINIMAL.replace(
        "client_ca = \"ca.pem\"",
        "client_ca = \"ca.pem\"\nfirst_byte_timeout = \"20s\"",
    );
    let err = ServerConfig::parse(&text, "t.toml", dir.path()).unwrap_err();
    assert!(err.to_string().contains("edge.first_byte_timeout"), "{err}");
}

#[test]
fn shipped_example_uses_only_known_keys() {
    let text = include_str!("../../../deploy/examples/server.toml");
    let parsed: Result<ServerConfig, _> = toml::from_str(text);
    assert!(parsed.is_ok(), "{:?}", parsed.err());
}
