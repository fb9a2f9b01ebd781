//! JSON logs a collector can query: both binaries run with `log.format = "json"` through a
//! tunneled exchange, a server refusal and an edge refusal; every line they write parses as
//! one JSON object with no key twice, byte counts are numbers, addresses strings, lists
//! arrays, and no value is a Rust `Debug` rendering (`Some(..)`, `None`, escaped quotes).
//! Text logs into a file carry no ANSI colour codes.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use tether_tests::{poll_until, Cluster, ClusterOptions, EdgeTuning};

/// A JSON value parsed with duplicate object keys as an error (serde_json keeps the last).
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Strict;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Strict(Value::Array(items)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Strict(value) = map.next_value()?;
            if object.insert(key.clone(), value).is_some() {
                return Err(serde::de::Error::custom(format!("key `{key}` repeated")));
            }
        }
        Ok(Strict(Value::Object(object)))
    }
}

/// Every line of `log`, parsed strictly; panics naming the line that is not one object.
fn parse_lines(who: &str, log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| match serde_json::from_str::<Strict>(line) {
            Ok(Strict(value)) if value.is_object() => value,
            Ok(_) => panic!("{who}: not an object: {line}"),
            Err(e) => panic!("{who}: {e}: {line}"),
        })
        .collect()
}

/// No string anywhere in `value` looks like a Rust `Debug` rendering.
fn assert_no_debug_strings(line: &Value, value: &Value) {
    match value {
        Value::String(s) => {
            let debug = s.starts_with("Some(") || s == "None" || s.contains("\\\"");
            assert!(!debug, "Debug rendering `{s}` in {line}");
        }
        Value::Array(items) => items.iter().for_each(|v| assert_no_debug_strings(line, v)),
        Value::Object(map) => map.values().for_each(|v| assert_no_debug_strings(line, v)),
        _ => {}
    }
}

/// The first line whose `message` is `message`.
fn find<'a>(lines: &'a [Value], message: &str) -> Option<&'a Value> {
    lines.iter().find(|l| l["message"] == message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_real_types_and_no_repeated_keys() {
    // A port the server allows but the edge's own allowlist does not: the edge refuses it.
    let edge_only_refused = 9;
    let mut cluster = Cluster::start(ClusterOptions {
        log_json: true,
        allow_server_only: vec![edge_only_refused],
        edge: EdgeTuning {
            log_json: true,
            ..EdgeTuning::default()
        },
        ..ClusterOptions::default()
    })
    .await;
    cluster.checked_exchange(1, 16 << 10).await;
    let refused = cluster.connect_answer("192.0.2.77:10250").await;
    assert_ne!(refused.status, 200, "no node owns that address");
    let target = cluster.target(edge_only_refused);
    let refused = cluster.connect_answer(&target).await;
    assert_ne!(refused.status, 200, "the edge's allowlist refuses port 9");

    let (server, edge) = poll_until(
        "the audit lines of both binaries",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let server = parse_lines("server", &cluster.server.log());
            let edge = parse_lines("edge", &cluster.edge.log());
            let done = find(&server, "stream closed").is_some()
                && find(&edge, "edge stream closed").is_some()
                && find(&edge, "edge refused dial").is_some()
                && find(&server, "edge session established").is_some();
            std::future::ready(done.then_some((server, edge)))
        },
    )
    .await;

    for line in server.iter().chain(&edge) {
        assert_no_debug_strings(line, line);
        for key in ["timestamp", "level", "target", "message"] {
            assert!(line[key].is_string(), "`{key}` in {line}");
        }
    }
    let closed = find(&server, "stream closed").unwrap();
    assert!(
        closed["bytes_to_edge"].as_u64() >= Some(16 << 10),
        "{closed}"
    );
    assert!(closed["bytes_from_edge"].is_u64(), "{closed}");
    assert!(closed["duration_ms"].is_u64(), "{closed}");
    assert!(closed["client"].is_string(), "{closed}");
    assert!(closed["dest"].is_string(), "{closed}");
    let established = find(&server, "edge session established").unwrap();
    assert_eq!(
        established["ips"],
        serde_json::json!([tether_tests::NODE_IP.to_string()]),
        "a list is an array: {established}"
    );
    assert!(established["peer"].is_string(), "{established}");
    let listening = find(&server, "tunnel-server listening").unwrap();
    assert!(listening["connect_tcp"].is_string(), "{listening}");
    assert!(listening["replicas"].is_u64(), "{listening}");

    let closed = find(&edge, "edge stream closed").unwrap();
    assert!(
        closed["bytes_to_target"].as_u64() >= Some(16 << 10),
        "{closed}"
    );
    assert!(closed["bytes_from_target"].is_u64(), "{closed}");
    assert!(closed["dialed"].is_string(), "{closed}");
    // The server's QUIC listener reports its UDP socket buffers: the sizes granted, or one
    // warning naming the sysctl to raise where the host caps them below the ask. (This edge
    // is on TCP and binds no UDP socket.)
    for (name, lines) in [("server", &server)] {
        let buffers: Vec<&Value> = lines
            .iter()
            .filter(|l| {
                l["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("QUIC UDP socket buffers"))
            })
            .collect();
        assert!(!buffers.is_empty(), "{name}: no UDP buffer line");
        for line in buffers {
            if line["level"] == "WARN" {
                let message = line["message"].as_str().unwrap_or_default();
                assert!(message.contains("net.core."), "{name}: {line}");
            } else {
                assert!(line["recv"].as_u64() >= Some(1 << 20), "{name}: {line}");
            }
        }
    }
    let refusal = find(&edge, "edge refused dial").unwrap();
    assert_eq!(refusal["level"], "WARN", "{refusal}");
    assert_eq!(refusal["dest"], target.as_str(), "{refusal}");
    // The session span's fields appear once, beside the event's own.
    let session = find(&edge, "session established").unwrap();
    assert_eq!(session["node"], tether_tests::NODE, "{session}");
    assert!(session["slot"].is_u64(), "{session}");
    assert_eq!(
        session["spans"],
        serde_json::json!(["session"]),
        "{session}"
    );

    let keys: BTreeSet<&str> = server
        .iter()
        .flat_map(|l| l.as_object().unwrap().keys().map(String::as_str))
        .collect();
    assert!(
        !keys.contains("fields"),
        "event fields are flattened: {keys:?}"
    );
}

#[tokio::test]
async fn text_logs_into_a_file_have_no_colour_codes() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let _ = cluster.connect_answer("192.0.2.77:10250").await;
    for (who, log) in [
        ("server", cluster.server.log()),
        ("edge", cluster.edge.log()),
    ] {
        assert!(log.contains("INFO"), "{who}: {log}");
        assert!(!log.contains('\u{1b}'), "{who} wrote ANSI escapes:\n{log}");
    }
}
