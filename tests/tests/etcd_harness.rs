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
    assert!(
        cluster.healthy(1).await,
        "two of three members keep a quorum"
    );
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
    assert!(cluster.healthy(2).await, "quorum back");
}
