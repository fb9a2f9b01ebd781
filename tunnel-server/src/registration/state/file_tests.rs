//! The file backend through [`StateStore`], the interface every backend answers: one token's
//! uses and the certified keys are decided atomically under concurrent joins.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use protocol::NodeName;

use super::super::decision::{Declined, Issued, JoinClaim};
use super::super::identities::IssuedIdentity;
use super::super::store::Refusal;
use super::super::tokens::{create, BootstrapToken, NodePool};
use super::super::{unix_now, StateStore};
use super::FileState;

/// Concurrent joins in the race tests: the registration API's own test count.
const JOINS: usize = 20;

fn open(dir: &std::path::Path) -> StateStore {
    let config: crate::registration::RegistrationConfig = toml::from_str(&format!(
        "token_file = {:?}\nca_cert = \"ca.pem\"\nca_key = \"ca-key.pem\"\n",
        dir.join("tokens.json")
    ))
    .unwrap();
    StateStore::File(FileState::open(&config).unwrap())
}

fn token(dir: &std::path::Path, limit: Option<u32>) -> BootstrapToken {
    let pool = NodePool {
        name: "idc".into(),
        ..NodePool::default()
    };
    let path = dir.join("tokens.json");
    let ttl = Duration::from_secs(3600);
    create(&path, pool, ttl, limit, None, String::new(), vec![])
        .unwrap()
        .0
}

fn issued(node: &str, now: u64) -> Issued {
    Issued {
        pem: String::new(),
        identity: IssuedIdentity {
            ips: Vec::new(),
            serial: format!("serial-{node}"),
            key_sha256: format!("key-{node}"),
            previous_serial: None,
            pool: "idc".into(),
            token_id: String::new(),
            issued_unix: now,
            expires_unix: now + 3600,
        },
    }
}

/// `JOINS` nodes join at once with `token`, each with its own key; how many got in, and
/// every refusal.
async fn race(state: Arc<StateStore>, token: BootstrapToken) -> (usize, Vec<Declined>) {
    let mut joins = tokio::task::JoinSet::new();
    for i in 0..JOINS {
        let (state, token) = (state.clone(), token.clone());
        joins.spawn(async move {
            let name = format!("node-{i}");
            let node = NodeName::parse(&name).unwrap();
            let ips: [IpAddr; 0] = [];
            let now = unix_now();
            let key = format!("key-{i}").into_bytes();
            let claim = JoinClaim {
                token: &token,
                node: &node,
                ips: &ips,
                public_key: &key,
                now,
                certificate_expires: now + 3600,
            };
            state
                .join(claim, &mut |_| Ok(issued(&name, now)))
                .await
                .map(|_| ())
        });
    }
    let (mut admitted, mut refused) = (0, Vec::new());
    while let Some(done) = tokio::time::timeout(Duration::from_secs(10), joins.join_next())
        .await
        .expect("joins finished")
    {
        match done.unwrap() {
            Ok(()) => admitted += 1,
            Err(declined) => refused.push(declined),
        }
    }
    (admitted, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_joins_with_a_single_use_token_admit_exactly_one() {
    let dir = tempfile::tempdir().unwrap();
    let single = token(dir.path(), Some(1));
    let state = Arc::new(open(dir.path()));
    let (admitted, refused) = race(state.clone(), single).await;
    assert_eq!(admitted, 1);
    assert_eq!(refused.len(), JOINS - 1);
    assert!(refused
        .iter()
        .all(|d| matches!(d, Declined::Token(Refusal::Exhausted))));

    let five = token(dir.path(), Some(5));
    let (admitted, _) = race(state, five).await;
    assert_eq!(admitted, 5, "a limit-5 token admits exactly 5");
}

#[tokio::test]
async fn csr_replay_is_refused_and_a_failed_issue_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let token = token(dir.path(), Some(2));
    let state = open(dir.path());
    let now = unix_now();
    let (a, b) = (
        NodeName::parse("node-a").unwrap(),
        NodeName::parse("node-b").unwrap(),
    );
    let claim = |node| JoinClaim {
        token: &token,
        node,
        ips: &[],
        public_key: b"same-key",
        now,
        certificate_expires: now + 3600,
    };
    // Issuing fails: nothing is used up or remembered.
    let failed = state.join(claim(&a), &mut |_| Err("issue_failed")).await;
    assert!(matches!(failed, Err(Declined::Issue("issue_failed"))));
    let joined = state
        .join(claim(&a), &mut |_| Ok(issued("node-a", now)))
        .await;
    assert!(joined.is_ok(), "{joined:?}");
    // The same CSR key again, for another node, with a use left: a replay.
    let replay = state
        .join(claim(&b), &mut |_| Ok(issued("node-b", now)))
        .await;
    assert!(matches!(replay, Err(Declined::Token(Refusal::KeyReused))));
}
