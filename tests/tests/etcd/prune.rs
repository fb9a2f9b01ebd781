//! The janitor pass: expired certified-key records and expired tokens' use counts leave etcd;
//! live ones stay.

use std::time::Duration;

use etcd_client::{Client, GetOptions};
use tether_tests::registration::JoinedEdge;

use crate::fixture::Replicas;

/// How long the pass may take to show: a few prune intervals (1 s here) and the janitor
/// lease of the previous interval running out.
const PASS_TIMEOUT: Duration = Duration::from_secs(10);

/// The keys under `prefix` (the replicas' default `/tether/`).
async fn keys_under(client: &mut Client, prefix: &str) -> Vec<String> {
    let listed = client
        .get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
        .expect("etcd get");
    listed
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect()
}

fn unix_now() -> u64 {
    tunnel_server::registration::state::unix_now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn janitor_pass_deletes_expired_key_records_and_expired_tokens_uses_only() {
    let Some(r) = Replicas::start("janitor_pass", 2, vec![10250]).await else {
        return;
    };
    let kept = r.servers[0].create_token(&[]);
    let expiring = r.servers[1].create_token(&[]);
    for (i, token) in [&kept, &expiring].into_iter().enumerate() {
        let (node, ip) = (format!("prune-{i}"), format!("10.84.0.{}", i + 1));
        let edge = JoinedEdge::new();
        let (ok, output) = edge.join(&r.pki, &r.servers[i], token, &node, &[&ip], &[]);
        assert!(ok, "{output}");
    }
    let mut etcd = Client::connect(r.etcd.endpoints(), None)
        .await
        .expect("etcd client");
    let live_keys = keys_under(&mut etcd, "/tether/keys/").await;
    assert_eq!(
        live_keys.len(),
        2,
        "one certified key per join: {live_keys:?}"
    );
    // A certified-key record whose time passed, and the second token expired (as if its TTL
    // ran out: rewritten with an expiry in the past).
    let stale = "/tether/keys/00ddba11".to_owned();
    etcd.put(stale.as_str(), (unix_now() - 10).to_string(), None)
        .await
        .expect("put");
    let id = |token: &str| token.split_once('.').expect("id.secret").0.to_owned();
    let record_key = format!("/tether/tokens/{}", id(&expiring));
    let got = etcd.get(record_key.as_str(), None).await.expect("get");
    let mut record: serde_json::Value =
        serde_json::from_slice(got.kvs()[0].value()).expect("token JSON");
    record["expires_unix"] = serde_json::json!(unix_now() - 10);
    etcd.put(record_key.as_str(), record.to_string(), None)
        .await
        .expect("put");

    let (expired_uses, kept_uses) = (
        format!("/tether/uses/{}", id(&expiring)),
        format!("/tether/uses/{}", id(&kept)),
    );
    let pruned = tether_tests::poll_until(
        "the expired records pruned",
        PASS_TIMEOUT,
        Duration::from_millis(200),
        || {
            let mut etcd = etcd.clone();
            let (stale, expired_uses) = (stale.clone(), expired_uses.clone());
            async move {
                let keys = keys_under(&mut etcd, "/tether/keys/").await;
                let uses = keys_under(&mut etcd, "/tether/uses/").await;
                (!keys.contains(&stale) && !uses.contains(&expired_uses)).then_some((keys, uses))
            }
        },
    )
    .await;
    let (keys, uses) = pruned;
    assert_eq!(keys, live_keys, "live certified keys stay");
    assert_eq!(uses, vec![kept_uses], "the live token's count stays");
    // The expired token's record itself stays: `token list` shows it as expired.
    assert!(r.servers[0].admin(&["token", "list"]).contains("expired"));
    let passes: usize = r
        .servers
        .iter()
        .map(|s| s.log_lines_with(&["pruned expired state records"]))
        .sum();
    assert!(passes >= 1, "a replica logged its pass");
}
