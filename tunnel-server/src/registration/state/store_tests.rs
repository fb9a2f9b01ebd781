//! Admission, usage and pruning of the token store, against real files.

use super::super::files::unix_now;
use super::super::tokens::{create, list, revoke, DEFAULT_TOKEN_TTL};
use super::*;
use std::time::Duration;
use tunnel_io::secret::Secret;

/// A certificate expiry far in the future, Unix seconds.
const FAR: u64 = u64::MAX / 2;

fn node(name: &str) -> NodeName {
    NodeName::parse(name).unwrap()
}

fn pool() -> NodePool {
    NodePool {
        name: "idc".into(),
        labels: [("tether.io/pool".to_string(), "idc".to_string())].into(),
        taints: vec!["tether.io/edge=true:NoSchedule".into()],
        extra_ports: vec![10255],
        node_ip_cidrs: vec![],
    }
}

#[test]
fn file_holds_only_the_hash_and_admission_checks_everything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.json");
    let (token, record) = create(
        &path,
        pool(),
        Duration::from_secs(3600),
        Some(2),
        Some("idc-*".into()),
        "test".into(),
        vec![],
    )
    .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(
        !text.contains(token.secret.expose()),
        "secret stored in clear"
    );
    assert!(text.contains(&record.secret_sha256));

    let store = TokenStore::open(&path).unwrap();
    let now = unix_now();
    let a = store
        .admit(&token, &node("idc-1"), &[], b"key-1", now, FAR)
        .unwrap();
    assert_eq!(a.pool, pool());
    // Replay: the same key again.
    assert_eq!(
        store
            .admit(&token, &node("idc-2"), &[], b"key-1", now, FAR)
            .unwrap_err(),
        Refusal::KeyReused
    );
    assert_eq!(
        store
            .admit(&token, &node("cloud-1"), &[], b"key-2", now, FAR)
            .unwrap_err(),
        Refusal::NodeNameNotAllowed
    );
    let wrong = BootstrapToken {
        id: token.id.clone(),
        secret: Secret::new("0000000000000000"),
    };
    assert_eq!(
        store
            .admit(&wrong, &node("idc-2"), &[], b"key-2", now, FAR)
            .unwrap_err(),
        Refusal::WrongSecret
    );
    let unknown = BootstrapToken::parse("zzzzzz.0123456789abcdef").unwrap();
    assert_eq!(
        store
            .admit(&unknown, &node("idc-2"), &[], b"key-2", now, FAR)
            .unwrap_err(),
        Refusal::Unknown
    );
    assert_eq!(
        store
            .admit(
                &token,
                &node("idc-2"),
                &[],
                b"key-2",
                record.expires_unix,
                FAR
            )
            .unwrap_err(),
        Refusal::Expired
    );
    store
        .admit(&token, &node("idc-2"), &[], b"key-2", now, FAR)
        .unwrap();
    assert_eq!(
        store
            .admit(&token, &node("idc-3"), &[], b"key-3", now, FAR)
            .unwrap_err(),
        Refusal::Exhausted
    );
    // Usage survives a restart.
    let reopened = TokenStore::open(&path).unwrap();
    assert_eq!(
        reopened
            .admit(&token, &node("idc-3"), &[], b"key-3", now, FAR)
            .unwrap_err(),
        Refusal::Exhausted
    );
    assert_eq!(list(&path).unwrap()[0].1, 2);
}

#[test]
fn revocation_and_new_tokens_are_picked_up_on_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.json");
    let store = TokenStore::open(&path).unwrap();
    let (token, _) = create(
        &path,
        pool(),
        DEFAULT_TOKEN_TTL,
        None,
        None,
        String::new(),
        vec![],
    )
    .unwrap();
    let now = unix_now();
    store
        .admit(&token, &node("n1"), &[], b"k1", now, FAR)
        .unwrap();
    revoke(&path, &token.id).unwrap();
    assert_eq!(
        store
            .admit(&token, &node("n2"), &[], b"k2", now, FAR)
            .unwrap_err(),
        Refusal::Revoked
    );
    assert!(matches!(
        revoke(&path, "nosuch"),
        Err(StoreError::NoSuchToken(_))
    ));
}

#[test]
fn node_ips_must_lie_in_the_pools_networks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.json");
    let site = NodePool {
        node_ip_cidrs: vec![
            "10.8.0.0/16".parse().unwrap(),
            "fd00:8::/32".parse().unwrap(),
        ],
        ..pool()
    };
    let (token, _) = create(
        &path,
        site,
        DEFAULT_TOKEN_TTL,
        None,
        None,
        String::new(),
        vec![],
    )
    .unwrap();
    let store = TokenStore::open(&path).unwrap();
    let now = unix_now();
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    // One address outside is enough to refuse, and the refusal uses nothing up.
    assert_eq!(
        store
            .admit(
                &token,
                &node("n1"),
                &[ip("10.8.1.2"), ip("10.9.0.1")],
                b"k1",
                now,
                FAR
            )
            .unwrap_err(),
        Refusal::NodeIpNotAllowed
    );
    store
        .admit(
            &token,
            &node("n1"),
            &[ip("10.8.1.2"), ip("fd00:8::5")],
            b"k1",
            now,
            FAR,
        )
        .unwrap();
    assert_eq!(list(&path).unwrap()[0].1, 1);
    // The networks survive the file round trip.
    assert_eq!(list(&path).unwrap()[0].0.pool.node_ip_cidrs.len(), 2);
}

#[test]
fn a_broken_file_keeps_the_last_good_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.json");
    let (token, _) = create(
        &path,
        pool(),
        DEFAULT_TOKEN_TTL,
        None,
        None,
        String::new(),
        vec![],
    )
    .unwrap();
    let store = TokenStore::open(&path).unwrap();
    std::fs::write(&path, "{ not json").unwrap();
    store
        .admit(&token, &node("n1"), &[], b"k1", unix_now(), FAR)
        .unwrap();
}

#[test]
fn usage_record_forgets_keys_whose_certificates_expired() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.json");
    let (token, record) = create(
        &path,
        pool(),
        Duration::from_secs(60),
        None,
        None,
        String::new(),
        vec![],
    )
    .unwrap();
    let store = TokenStore::open(&path).unwrap();
    let now = unix_now();
    // Joins and renewals, each key's certificate valid for 10 s (the token for 60 s).
    for i in 0..20u32 {
        let key = format!("join-{i}");
        store
            .admit(&token, &node("n1"), &[], key.as_bytes(), now, now + 10)
            .unwrap();
        assert!(store.remember_key(format!("renew-{i}").as_bytes(), now, now + 10));
    }
    let usage_file = dir.path().join("tokens.json.usage.json");
    let keys = |text: &str| {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        v["keys"].as_object().unwrap().len()
    };
    let full = std::fs::read_to_string(&usage_file).unwrap();
    assert_eq!(keys(&full), 40, "{full}");
    // A key is refused as a replay until both its certificate and its token expired...
    let later = record.expires_unix + 1;
    assert_eq!(
        store
            .check(&token, &node("n1"), &[], b"join-0", now + 11)
            .unwrap_err(),
        Refusal::KeyReused
    );
    // ...then the next write forgets it: the file holds what can still matter.
    assert!(store.remember_key(b"renew-late", later, later + 10));
    let pruned = std::fs::read_to_string(&usage_file).unwrap();
    assert!(!pruned.contains(&sha256_hex(b"join-0")), "{pruned}");
    assert!(!pruned.contains(&sha256_hex(b"renew-0")), "{pruned}");
    assert!(pruned.contains(&sha256_hex(b"renew-late")), "{pruned}");
    assert_eq!(keys(&pruned), 1, "{pruned}");
    assert!(
        pruned.contains(&token.id),
        "the live token's use count went: {pruned}"
    );
}

#[test]
fn a_usage_file_without_expiries_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.json");
    let (token, _) = create(
        &path,
        pool(),
        DEFAULT_TOKEN_TTL,
        None,
        None,
        String::new(),
        vec![],
    )
    .unwrap();
    let legacy = format!(
        "{{\"uses\": {{\"{}\": 1}}, \"keys\": [\"{}\"]}}",
        token.id,
        sha256_hex(b"old-key")
    );
    std::fs::write(dir.path().join("tokens.json.usage.json"), legacy).unwrap();
    let store = TokenStore::open(&path).unwrap();
    assert_eq!(
        store
            .admit(&token, &node("n1"), &[], b"old-key", unix_now(), FAR)
            .unwrap_err(),
        Refusal::KeyReused
    );
    assert_eq!(list(&path).unwrap()[0].1, 1);
}
