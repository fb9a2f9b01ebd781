//! Every key the binaries accept is documented, commented or not, in deploy/examples/server.toml
//! and deploy/examples/edge.toml. The accepted keys come from the config types themselves, with
//! no list to keep in sync: each table is probed with an unknown key, and the
//! `deny_unknown_fields` error names every field that table has. A field added to a config
//! struct therefore fails this test until the example documents it.

use std::collections::BTreeSet;
use std::path::Path;

/// The probe key: no config field is named like this.
const PROBE: &str = "zz_probe_key";
/// Deepest nesting of config tables (`registration.rate` is 2); bounds the recursion.
const MAX_DEPTH: usize = 4;

/// Parse `text` with the binary's own parser; the error message, if any.
type Parser = fn(&str) -> Option<String>;

fn server_parser(text: &str) -> Option<String> {
    tunnel_server::config::ServerConfig::parse(text, "probe.toml", Path::new("/"))
        .err()
        .map(|e| e.to_string())
}

fn edge_parser(text: &str) -> Option<String> {
    tunnel_edge::EdgeConfig::parse(text, "probe.toml", Path::new("/"))
        .err()
        .map(|e| e.to_string())
}

/// The fields serde lists in "unknown field `zz_probe_key`, expected one of `a`, `b`" (or
/// "expected `a`"); `None` when the error is about something else (the table is a map or a
/// value, not a struct).
fn expected_fields(error: &str) -> Option<Vec<String>> {
    let rest = error.split(&format!("unknown field `{PROBE}`")).nth(1)?;
    if rest.contains("there are no fields") {
        return Some(Vec::new());
    }
    let list = rest.split("expected").nth(1)?;
    let list = list.split(" at line").next().unwrap_or(list);
    Some(
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect(),
    )
}

/// The struct fields of the table at `path` (dotted; empty for the root), probed as a plain
/// table and as an array of tables.
fn table_fields(parse: Parser, path: &str) -> Option<Vec<String>> {
    let probes = if path.is_empty() {
        vec![format!("{PROBE} = 1\n")]
    } else {
        vec![
            format!("[{path}]\n{PROBE} = 1\n"),
            format!("[[{path}]]\n{PROBE} = 1\n"),
        ]
    };
    probes
        .iter()
        .find_map(|text| parse(text).as_deref().and_then(expected_fields))
}

/// Every accepted key as `section.key`, recursing into tables.
fn accepted_keys(parse: Parser, path: &str, depth: usize, keys: &mut BTreeSet<String>) {
    assert!(
        depth <= MAX_DEPTH,
        "config nesting deeper than {MAX_DEPTH} at {path}"
    );
    let fields = table_fields(parse, path)
        .unwrap_or_else(|| panic!("probing `{path}` found no struct fields"));
    for field in fields {
        let full = if path.is_empty() {
            field.clone()
        } else {
            format!("{path}.{field}")
        };
        keys.insert(full.clone());
        if table_fields(parse, &full).is_some() {
            accepted_keys(parse, &full, depth + 1, keys);
        }
    }
}

/// Keys present in an example file, commented out or not, as `section.key`. A section header
/// (`[a.b]`, `[[a]]`, commented or not) starts a section; `name = value` lines are keys.
fn documented_keys(text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim_start().trim_start_matches('#').trim();
        if let Some(header) = line.strip_prefix('[') {
            let name = header.trim_start_matches('[');
            if let Some(end) = name.find(']') {
                section = name[..end].trim().to_owned();
                keys.insert(section.clone());
                continue;
            }
        }
        let Some((key, _)) = line.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let is_key = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if is_key {
            keys.insert(if section.is_empty() {
                key.to_owned()
            } else {
                format!("{section}.{key}")
            });
        }
    }
    keys
}

fn check(parse: Parser, example: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(example);
    let text = std::fs::read_to_string(&path).expect("read the example");
    let mut accepted = BTreeSet::new();
    accepted_keys(parse, "", 0, &mut accepted);
    assert!(
        accepted.len() > 10,
        "probing found too few keys: {accepted:?}"
    );
    let documented = documented_keys(&text);
    let missing: Vec<_> = accepted.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "{example} does not document these accepted keys: {missing:?}"
    );
    // And the example names nothing the binary would refuse once uncommented.
    let unknown: Vec<_> = documented
        .iter()
        .filter(|k| !accepted.contains(*k) && !k.starts_with("upstreams."))
        .collect();
    assert!(
        unknown.is_empty(),
        "{example} documents unknown keys: {unknown:?}"
    );
}

#[test]
fn server_example_documents_every_accepted_key() {
    check(server_parser, "deploy/examples/server.toml");
}

#[test]
fn edge_example_documents_every_accepted_key() {
    check(edge_parser, "deploy/examples/edge.toml");
}

#[test]
fn probing_finds_nested_tables_and_arrays_of_tables() {
    let mut keys = BTreeSet::new();
    accepted_keys(edge_parser, "", 0, &mut keys);
    for key in [
        "state_dir",
        "server.address",
        "allow.extra.cidr",
        "forward.upstream",
    ] {
        assert!(keys.contains(key), "{key} not found in {keys:?}");
    }
}
