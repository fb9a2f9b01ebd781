//! The Prometheus text format (0.0.4) from the OpenMetrics text that `prometheus-client`
//! writes, for scrapers and tools that ask for `text/plain` (promtool, older Prometheus,
//! curl). The two differ only in naming and markers: a counter family's `# TYPE`/`# HELP` name
//! the `_total` sample in 0.0.4; an info family becomes a gauge named `_info`; `# UNIT`,
//! `# EOF` and `_created` samples do not exist in 0.0.4.
//!
//! Shared by tunnel-server's and tunnel-edge's admin endpoints, so both negotiate alike.

use std::collections::HashMap;

/// The `Content-Type` of [`to_prometheus_text`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The `Content-Type` of OpenMetrics output.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether an `Accept` header value asks for OpenMetrics (Prometheus servers put it first);
/// anything else gets the 0.0.4 text format.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// The `Content-Type` and body to answer a scrape with: `openmetrics` as is when `accept`
/// asks for it (Prometheus servers do), the 0.0.4 text format otherwise.
pub fn negotiate(accept: Option<&str>, openmetrics: String) -> (&'static str, String) {
    if wants_openmetrics(accept) {
        (OPENMETRICS_CONTENT_TYPE, openmetrics)
    } else {
        (CONTENT_TYPE, to_prometheus_text(&openmetrics))
    }
}

/// Rewrite OpenMetrics text as Prometheus text 0.0.4.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut types: HashMap<&str, &str> = HashMap::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = rest.split_once(' ') {
                types.insert(name, kind);
            }
        }
    }
    let renamed = |name: &str| -> (String, Option<&str>) {
        match types.get(name).copied() {
            Some("counter") => (format!("{name}_total"), Some("counter")),
            Some("info") => (format!("{name}_info"), Some("gauge")),
            other => (name.to_string(), other),
        }
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_once(' ').map_or(rest, |(n, _)| n);
            let (name, kind) = renamed(name);
            out.push_str(&format!("# TYPE {name} {}\n", kind.unwrap_or("untyped")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!("# HELP {} {help}\n", renamed(name).0));
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or_default();
        if sample.ends_with("_created")
            && types.get(&sample[..sample.len() - 8]) == Some(&"counter")
        {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_info_and_markers_are_rewritten() {
        let om = "# HELP tether_dials Dials.\n# TYPE tether_dials counter\n\
                  tether_dials_total{result=\"ok\"} 3\ntether_dials_created 1.7e9\n\
                  # HELP tether_build Build.\n# TYPE tether_build info\n\
                  tether_build_info{version=\"0.1.0\"} 1\n\
                  # HELP tether_open Open.\n# TYPE tether_open gauge\n# UNIT tether_open bytes\n\
                  tether_open 2\n# EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP tether_dials_total Dials.\n# TYPE tether_dials_total counter\n\
             tether_dials_total{result=\"ok\"} 3\n\
             # HELP tether_build_info Build.\n# TYPE tether_build_info gauge\n\
             tether_build_info{version=\"0.1.0\"} 1\n\
             # HELP tether_open Open.\n# TYPE tether_open gauge\ntether_open 2\n"
        );
    }

    #[test]
    fn accept_negotiation() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(None));
    }
}
