//! The etcd the state-store tests run against: a three-member cluster on loopback starts,
//! keeps a quorum with one member killed, loses it with two, and recovers when they return.

use std::time::Duration;

use tether_tests::etcd::{binary_or_skip, EtcdCluster};

#[tokio::test]
async fn three_member_etcd_keeps_quorum_with_one_member_killed_and_recovers() {
    let Some(etcd) = binary_or_skip("three_member_etcd_keeps_quorum") else {
        return;
    };
    let mut cluster = EtcdCluster::start(etcd, 3).await;
    assert_eq!(cluster.endpoints().len(), 3);
    cluster.kill(0);
    // When the killed member led, the other two elect a new leader first (one election
    // timeout, 1 s by default): healthy again within a few seconds, not at once.
    tether_tests::poll_until(
        "two of three members keep a quorum",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async { cluster.healthy(1).await.then_some(()) },
    )
    .await;
    cluster.kill(1);
    // etcd reports no leader once its election timeout (1 s) passes without a quorum.
    tether_tests::poll_until(
        "member 2 without quorum",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async { (!cluster.healthy(2).await).then_some(()) },
    )
    .await;
    cluster.restart(0).await;
    cluster.restart(1).await;
    tether_tests::poll_until(
        "quorum back",
        Duration::from_secs(10),
        Duration::from_millis(200),
        || async { cluster.healthy(2).await.then_some(()) },
    )
    .await;
}
