//! `tunnel-linkem` on real sockets, in a network namespace each test makes: a round trip
//! through the emulated port takes at least twice the one-way delay and one beside it does
//! not, a seeded loss drops the same datagrams twice and about the fraction asked, and a full
//! hold tail-drops with a count. Needs root, `ip` and `iptables` with NFQUEUE (`.ci/run`
//! installs them); without them these tests fail, they do not skip.

use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tunnel-linkem");

/// The one-way delay the tests ask for, in ms: far above loopback's tens of µs and the
/// scheduling noise of a shared machine, short enough to keep each test near a second.
const DELAY_MS: u64 = 20;

/// The port the link emulates, and one beside it that it leaves alone.
const PORT: u16 = 47_501;
const OTHER_PORT: u16 = 47_502;

/// Bound on any one child (the link's start, a probe): far above what each needs.
const CHILD_TIMEOUT: Duration = Duration::from_secs(30);

/// A network namespace with `lo` up at a real link's MTU, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tether-linkem-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns(name);
        run_ok(
            ns.cmd("ip")
                .args(["link", "set", "lo", "up", "mtu", "1500"]),
        );
        ns
    }

    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, program]);
        c
    }

    /// The queue rules currently in the namespace.
    fn nfqueue_rules(&self) -> usize {
        let out = run_ok(self.cmd("iptables").args(["-S", "INPUT"]));
        String::from_utf8_lossy(&out.stdout)
            .matches("NFQUEUE")
            .count()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{cmd:?}: {e} (these tests need root, iproute2 and iptables: .ci/run installs them)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A running `tunnel-linkem run`, stopped with SIGTERM by `stop`.
struct Linkem(Option<Child>);

impl Linkem {
    fn start(ns: &Netns, extra: &[&str]) -> Linkem {
        let child = ns
            .cmd(BIN)
            .args([
                "run",
                "--port",
                &PORT.to_string(),
                "--delay-ms",
                &DELAY_MS.to_string(),
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tunnel-linkem");
        let link = Linkem(Some(child));
        // Ready once its rules are in: four (TCP and UDP, to and from the port).
        let deadline = Instant::now() + CHILD_TIMEOUT;
        while ns.nfqueue_rules() < 4 {
            assert!(
                Instant::now() < deadline,
                "tunnel-linkem added no rules within {CHILD_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        link
    }

    /// SIGTERM, then its counters.
    fn stop(mut self) -> Value {
        let child = self.0.take().expect("running");
        run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        let out = child.wait_with_output().expect("wait tunnel-linkem");
        assert!(
            out.status.success(),
            "tunnel-linkem: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("tunnel-linkem prints its counters as JSON")
    }
}

impl Drop for Linkem {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn probe(ns: &Netns, args: &[&str]) -> Value {
    let out = run_ok(
        ns.cmd("timeout")
            .args([&CHILD_TIMEOUT.as_secs().to_string(), BIN, "probe"])
            .args(args),
    );
    serde_json::from_slice(&out.stdout).expect("the probe prints JSON")
}

fn ms(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

fn received(v: &Value) -> Vec<u64> {
    v["received"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|x| x.as_u64().expect("a number"))
        .collect()
}

#[test]
fn round_trips_through_the_port_take_twice_the_delay_and_others_do_not() {
    let ns = Netns::new();
    let link = Linkem::start(&ns, &[]);
    let slow = probe(&ns, &["tcp", "--port", &PORT.to_string(), "--count", "5"]);
    let fast = probe(
        &ns,
        &["tcp", "--port", &OTHER_PORT.to_string(), "--count", "5"],
    );
    let counters = link.stop();
    let rtt = 2.0 * DELAY_MS as f64;
    for t in ms(&slow["connect_ms"])
        .into_iter()
        .chain(ms(&slow["echo_ms"]))
    {
        assert!(
            t >= rtt,
            "a round trip through the link took {t} ms, under {rtt}: {slow}"
        );
    }
    for t in ms(&fast["connect_ms"])
        .into_iter()
        .chain(ms(&fast["echo_ms"]))
    {
        assert!(
            t < DELAY_MS as f64,
            "a round trip beside the link took {t} ms: {fast}"
        );
    }
    // Both directions crossed it, nothing was lost, and the rules are gone.
    for dir in ["to_port", "from_port"] {
        assert!(counters[dir]["seen"].as_u64() >= Some(10), "{counters}");
        assert_eq!(counters[dir]["lost"], 0, "{counters}");
    }
    assert_eq!(ns.nfqueue_rules(), 0);
}

#[test]
fn a_seeded_loss_drops_the_same_datagrams_near_the_fraction() {
    let ns = Netns::new();
    let count = 1000;
    let mut runs = Vec::new();
    for _ in 0..2 {
        let link = Linkem::start(&ns, &["--loss-percent", "10", "--seed", "7"]);
        let r = probe(
            &ns,
            &[
                "udp",
                "--port",
                &PORT.to_string(),
                "--count",
                &count.to_string(),
            ],
        );
        let counters = link.stop();
        let got = received(&r);
        let lost = counters["to_port"]["lost"].as_u64().expect("lost");
        // Every datagram is accounted for: delivered or lost by the draw, nothing else.
        assert_eq!(got.len() as u64 + lost, count, "{counters}");
        assert_eq!(counters["to_port"]["overflow"], 0, "{counters}");
        // 100 expected, standard deviation 9.5: 5 sigma either side.
        assert!((52..=148).contains(&lost), "lost {lost} of {count}");
        runs.push(got);
    }
    assert_eq!(runs[0], runs[1], "the same seed lost different datagrams");
}

#[test]
fn a_full_hold_tail_drops_and_counts_what_it_dropped() {
    let ns = Netns::new();
    let link = Linkem::start(&ns, &["--max-held", "10"]);
    // 200 datagrams without a pause, in far less than the delay: most find the hold full.
    let r = probe(
        &ns,
        &[
            "udp",
            "--port",
            &PORT.to_string(),
            "--count",
            "200",
            "--gap-us",
            "0",
        ],
    );
    let counters = link.stop();
    let overflow = counters["to_port"]["overflow"].as_u64().expect("overflow");
    assert!(overflow >= 100, "{counters}");
    assert_eq!(received(&r).len() as u64 + overflow, 200, "{counters}");
    assert_eq!(counters["peak_held"], 10, "{counters}");
}

#[test]
fn linkem_refuses_a_namespace_not_made_for_it() {
    // Run where this test runs (the host's namespace, or whatever CI's is): no `ip netns`.
    let mut child = Command::new(BIN)
        .args(["run", "--port", "47503"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tunnel-linkem");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("poll tunnel-linkem").is_none() {
        if Instant::now() > deadline {
            // It took the namespace: stop it the way that removes its rules, then fail.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
            panic!("tunnel-linkem ran outside a named namespace");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("tunnel-linkem output");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing"), "{err}");
}
