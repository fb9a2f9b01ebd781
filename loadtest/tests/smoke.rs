//! Smoke test: every scenario through the real `tunnel-loadtest` binary for about a second,
//! with `--json`, asserting that it produced sane, non-zero figures (never timing targets:
//! CI machines are noisy).

use std::process::Command;

use serde_json::Value;

/// Run the binary with `args` (plus a short duration and `--json`) and parse its output.
fn run(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tunnel-loadtest"))
        .args(args)
        .args(["--duration", "0.8", "--json"])
        .output()
        .expect("run tunnel-loadtest");
    assert!(
        out.status.success(),
        "tunnel-loadtest {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// A figure that must be a finite number above zero.
fn positive(report: &Value, name: &str) -> f64 {
    let v = report["figures"][name]
        .as_f64()
        .unwrap_or_else(|| panic!("no figure {name} in {report}"));
    assert!(v.is_finite() && v > 0.0, "{name} = {v} in {report}");
    v
}

#[test]
fn bulk_moves_checked_bytes_both_ways() {
    for path in [
        &["--direct"][..],
        &["--frontend", "unix"],
        &["--frontend", "tls"],
    ] {
        let r = run(&[&["bulk"][..], path].concat());
        assert_eq!(r["scenario"], "bulk");
        positive(&r, "up_mb_s");
        positive(&r, "down_mb_s");
    }
}

#[test]
fn rr_reports_rate_and_ordered_percentiles() {
    let r = run(&["rr", "--connections", "4"]);
    assert_eq!(r["path"], "tether-unix");
    positive(&r, "rps");
    let p50 = positive(&r, "latency_p50_us");
    let p99 = positive(&r, "latency_p99_us");
    let p999 = positive(&r, "latency_p999_us");
    assert!(p50 <= p99 && p99 <= p999, "{r}");
}

#[test]
fn hol_reports_idle_and_busy_rates() {
    let r = run(&["hol", "--connections", "2", "--frontend", "tls"]);
    positive(&r, "idle_rps");
    positive(&r, "busy_rps");
    positive(&r, "rps_ratio");
    positive(&r, "bulk_mb_s");
    positive(&r, "bulk_alone_mb_s");
    positive(&r, "bulk_ratio");
    for phase in ["idle", "busy"] {
        for q in ["p50", "p99", "p999"] {
            positive(&r, &format!("{phase}_{q}_us"));
        }
    }
}

#[test]
fn connect_opens_many_connections_concurrently() {
    let r = run(&["connect", "--concurrency", "8"]);
    assert!(positive(&r, "connections") >= 8.0, "{r}");
    positive(&r, "conn_per_s");
    positive(&r, "latency_p50_us");
}

#[test]
fn hold_keeps_idle_connections_and_measures_rss() {
    let r = run(&["hold", "--hold", "200"]);
    assert_eq!(positive(&r, "connections"), 200.0);
    positive(&r, "rss_after_mib");
    // Growth may round to zero only if the allocator had room; it can never be negative.
    assert!(r["figures"]["rss_per_conn_kib"].as_f64().unwrap() >= 0.0);
}

#[test]
fn hold_reads_the_rss_of_server_and_edge_processes() {
    let r = run(&["hold", "--hold", "100", "--processes"]);
    assert_eq!(r["path"], "tether-unix-procs");
    assert_eq!(positive(&r, "connections"), 100.0);
    for process in ["server", "edge"] {
        positive(&r, &format!("{process}_rss_after_mib"));
        let growth = r["figures"][format!("{process}_rss_per_conn_kib")].as_f64();
        assert!(growth.is_some_and(|g| g >= 0.0), "{r}");
    }
}

#[test]
fn processes_report_their_cpu_per_gb_and_per_request() {
    let r = run(&["bulk", "--processes"]);
    for process in ["server", "edge"] {
        positive(&r, &format!("{process}_cpu_ms"));
        positive(&r, &format!("{process}_cpu_ms_per_gb"));
    }
    let r = run(&["rr", "--processes", "--connections", "4"]);
    for process in ["server", "edge"] {
        positive(&r, &format!("{process}_cpu_us_per_request"));
    }
}

#[test]
fn hol_runs_its_bulk_stream_on_a_second_node_with_bulk_session() {
    // The bulk stream asks for the second node's IP: without its session it is refused.
    let r = run(&["hol", "--connections", "2", "--bulk-session"]);
    positive(&r, "busy_rps");
    positive(&r, "bulk_alone_mb_s");
    positive(&r, "bulk_mb_s");
    // As processes, the second node's edge is a process of its own, and did the bulk work.
    let r = run(&["hol", "--connections", "2", "--bulk-session", "--processes"]);
    positive(&r, "bulk_mb_s");
    positive(&r, "edge_bulk_cpu_ms");
}

#[test]
fn hol_as_processes_leaves_no_server_or_edge_running() {
    // The bulk stream's thread could hold the last reference to the Tether past the
    // process's exit, so its children were never killed: about one run in three left a
    // server and an edge behind. Their command lines name the temp dir, which TMPDIR puts
    // in one this test owns.
    let tmp = tempfile::tempdir().expect("temp dir");
    for _ in 0..6 {
        let out = Command::new(env!("CARGO_BIN_EXE_tunnel-loadtest"))
            .args([
                "hol",
                "--processes",
                "--connections",
                "2",
                "--duration",
                "0.6",
            ])
            .env("TMPDIR", tmp.path())
            .output()
            .expect("run tunnel-loadtest");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let needle = tmp.path().to_string_lossy().into_owned();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(&needle))
        .collect();
    assert!(left.is_empty(), "still running: {left:?}");
}

#[test]
fn attach_reads_the_rss_of_a_named_process() {
    let pid = std::process::id().to_string();
    let r = run(&[
        "hold",
        "--hold",
        "50",
        "--direct",
        "--attach",
        &format!("watched={pid}"),
    ]);
    positive(&r, "watched_rss_after_mib");
}

#[test]
fn attach_refuses_a_process_that_does_not_exist() {
    let out = Command::new(env!("CARGO_BIN_EXE_tunnel-loadtest"))
        .args(["hold", "--direct", "--attach", "server=4000000000"])
        .output()
        .expect("run tunnel-loadtest");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("process 4000000000"), "{stderr}");
}

#[test]
fn edges_join_and_all_come_back_after_a_server_restart() {
    let r = run(&["edges", "--edges", "20", "--limit", "60"]);
    assert_eq!(r["scenario"], "edges");
    assert_eq!(positive(&r, "edges"), 20.0);
    positive(&r, "join_secs");
    positive(&r, "server_rss_mib");
    positive(&r, "storm_secs");
    // Every edge made at least one new session after the restart.
    assert!(positive(&r, "storm_sessions_per_edge") >= 1.0, "{r}");
}

/// `--edge-port` is what lets `lossy.sh` drop the session's packets and no others: with its
/// UDP port number taken, a QUIC run cannot start; once free, the session runs on it.
#[test]
fn edge_port_puts_the_session_listener_on_that_port() {
    let port = port_outside_the_ephemeral_range();
    let taken = std::net::UdpSocket::bind(("127.0.0.1", port)).expect("bind udp");
    let port = port.to_string();
    let args = [
        "rr",
        "--connections",
        "2",
        "--transport",
        "quic",
        "--edge-port",
        &port,
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_tunnel-loadtest"))
        .args(args)
        .args(["--duration", "0.8", "--json"])
        .output()
        .expect("run tunnel-loadtest");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ran beside a taken port: {stderr}");
    assert!(stderr.contains("in use"), "{stderr}");
    drop(taken);
    positive(&run(&args), "rps");
}

/// A loopback port free for both TCP and UDP, below Linux's default ephemeral range (32768 and
/// up): a port from that range can be handed to another test's outgoing connection between
/// this test's two runs, so the second would find it taken.
fn port_outside_the_ephemeral_range() -> u16 {
    let seed = std::process::id() as u16
        ^ (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()) as u16);
    (0..500u16)
        .map(|i| 20_000 + (seed.wrapping_add(i.wrapping_mul(37)) % 12_000))
        .find(|&port| {
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
                && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        })
        .expect("a free port in 20000-31999 for TCP and UDP")
}

#[test]
fn proxy_mode_speaks_connect_to_an_external_proxy() {
    let proxy = connect_proxy();
    let r = run(&["rr", "--connections", "2", "--proxy", &proxy.to_string()]);
    assert_eq!(r["path"], format!("proxy {proxy}"));
    positive(&r, "rps");
}

/// A minimal plain-HTTP CONNECT proxy on a loopback port (a thread per connection), standing
/// in for an external one. It lives as long as the test process.
fn connect_proxy() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut client = client;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
                    if client.read_exact(&mut byte).is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split_whitespace().nth(1).unwrap_or_default();
                let Ok(upstream) = TcpStream::connect(target) else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c2, &mut u2);
                    let _ = u2.shutdown(std::net::Shutdown::Write);
                });
                let (mut u, mut c) = (upstream, client);
                let _ = std::io::copy(&mut u, &mut c);
                let _ = c.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}
