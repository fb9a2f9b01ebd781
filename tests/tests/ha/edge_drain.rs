//! Drains that keep their promise. An edge that gets SIGTERM keeps serving its in-flight
//! streams (a `kubectl logs -f`-like stream) until they end or its `shutdown_grace` is over,
//! while new streams are no longer sent to it. A server with the registration API exits as
//! soon as nothing is in flight instead of waiting out its grace period.

use std::time::{Duration, Instant};

use tether_tests::registration::{RegistrationOptions, RegistrationServer};
use tether_tests::{poll_until, Cluster, ClusterOptions, Pki};

use super::drain::{follow_logs_via, Lines};

fn count_after(lines: &Lines, at: Instant) -> usize {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, _)| *t > at)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_drain_keeps_a_follow_stream_until_the_grace_runs_out() {
    const GRACE: Duration = Duration::from_secs(4);
    let mut options = ClusterOptions::default();
    options.edge.shutdown_grace = GRACE;
    let mut cluster = Cluster::start(options).await;
    let (mut curl, lines) = follow_logs_via(
        cluster.server.addrs.connect_tcp,
        &cluster.pki,
        cluster.kubelet.addr.port(),
    );
    poll_until(
        "3 log lines before the signal",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || std::future::ready((lines.lock().unwrap().len() >= 3).then_some(())),
    )
    .await;

    cluster.edge.signal("TERM");
    let term = Instant::now();
    // New streams are not sent to the draining edge: the dial fails instead of reaching it.
    let answer = cluster
        .connect_answer(&cluster.target(cluster.echo.addr.port()))
        .await;
    assert_ne!(answer.status, 200, "a new stream reached the draining edge");

    // The follow stream keeps receiving well past the point where it used to be cut.
    tokio::time::sleep(GRACE / 2).await;
    let mid = count_after(&lines, term);
    assert!(
        mid >= 3,
        "only {mid} lines in {:?} after SIGTERM: the stream was cut\n{}",
        GRACE / 2,
        cluster.edge.log()
    );
    assert!(
        cluster.edge.running(),
        "the edge exited with a stream in flight"
    );

    // The stream never ends by itself, so the grace period ends it, and the edge exits.
    let exited = cluster
        .edge
        .wait_exit(GRACE + Duration::from_secs(5))
        .await
        .expect("the edge exits once the grace period is over");
    let after_term = term.elapsed();
    assert!(
        after_term + Duration::from_millis(500) >= GRACE,
        "the edge exited {after_term:?} after SIGTERM, before its {GRACE:?} grace"
    );
    println!(
        "{} lines after SIGTERM; edge exited {:?} after it (grace {GRACE:?}), waited {exited:?}",
        count_after(&lines, term),
        after_term
    );
    let log = cluster.edge.log();
    assert!(log.contains("grace period over"), "{log}");
    let _ = curl.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_server_with_registration_exits_promptly_on_sigterm() {
    let pki = Pki::new();
    let mut server = RegistrationServer::start(
        &pki,
        &RegistrationOptions {
            shutdown_grace: "30s",
            ..RegistrationOptions::default()
        },
    )
    .await;
    let term = Instant::now();
    server.signal("TERM");
    let took = server
        .wait_exit(Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM\n{}", server.log()));
    println!("idle server with registration exited {took:?} after SIGTERM");
    assert!(
        term.elapsed() < Duration::from_secs(3),
        "an idle server waited {took:?} (grace 30 s)"
    );
}
