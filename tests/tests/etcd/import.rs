//! `tunnel-server state import`: a single server's file store moves into etcd, and an import
//! never silently overwrites what etcd already holds differently.

use std::path::Path;
use std::process::Command;

use tether_tests::etcd::{binary_or_skip, EtcdCluster};
use tether_tests::registration::{JoinedEdge, RegistrationOptions, RegistrationServer};
use tether_tests::Pki;

/// `tunnel-server ARGS --config CONFIG`: (success, stdout + stderr).
fn operator(config: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new(tether_tests::binary("tunnel-server"))
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .output()
        .expect("run tunnel-server");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[tokio::test]
async fn state_import_copies_the_file_store_and_refuses_to_overwrite_differing_keys() {
    let Some(etcd) = binary_or_skip("state_import") else {
        return;
    };
    let etcd = EtcdCluster::start(etcd, 1).await;
    let pki = Pki::new();
    // A single server on files: a token with a use, a joined node, a revoked node.
    let server = RegistrationServer::start(&pki, &RegistrationOptions::default()).await;
    let token = server.create_token(&["--usage-limit", "3"]);
    let id = token.split_once('.').expect("id.secret").0.to_owned();
    let (ok, output) = JoinedEdge::new().join(&pki, &server, &token, "imp-a", &["10.81.0.1"], &[]);
    assert!(ok, "{output}");
    server.admin(&["node", "revoke", "imp-gone"]);

    // The same config pointed at etcd (the files stay where `[registration]` names them).
    let config = server.dir().join("server-etcd.toml");
    let text = std::fs::read_to_string(&server.config).expect("server.toml");
    std::fs::write(
        &config,
        format!(
            "{text}\n[state]\nbackend = \"etcd\"\nendpoints = [{:?}]\n",
            etcd.endpoint(0)
        ),
    )
    .expect("write config");

    let (ok, first) = operator(&config, &["state", "import"]);
    assert!(ok, "{first}");
    // token, its use count, the certified key, the identity and its IP, the revocation.
    assert!(first.contains("6 keys written, 0 already equal"), "{first}");
    let (ok, again) = operator(&config, &["state", "import"]);
    assert!(
        ok && again.contains("0 keys written, 6 already equal"),
        "{again}"
    );
    let (_, listed) = operator(&config, &["token", "list"]);
    let row = listed
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_default();
    assert!(
        row.contains(" 1 ") && row.contains("active"),
        "one use, from the files:\n{listed}"
    );

    // etcd changes (the token revoked there): a new import refuses, --overwrite restores it.
    let (ok, out) = operator(&config, &["token", "revoke", &id]);
    assert!(ok, "{out}");
    let (ok, refused) = operator(&config, &["state", "import"]);
    assert!(!ok, "an import over a differing key must fail: {refused}");
    assert!(
        refused.contains("differs in etcd") && refused.contains(&format!("tokens/{id}")),
        "{refused}"
    );
    let (_, listed) = operator(&config, &["token", "list"]);
    assert!(
        listed.contains("revoked"),
        "nothing written by the refused import:\n{listed}"
    );
    let (ok, forced) = operator(&config, &["state", "import", "--overwrite"]);
    assert!(ok && forced.contains("1 keys written"), "{forced}");
    let (_, listed) = operator(&config, &["token", "list"]);
    assert!(!listed.contains("revoked"), "{listed}");
}
