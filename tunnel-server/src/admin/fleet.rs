//! The operator's fleet views: `tunnel-server edges` and `tunnel-server node list` ask
//! running replicas' admin listeners (`/api/v1/edges`, `/api/v1/nodes`, see
//! [`crate::admin::api`]) over plain HTTP/1.1 and print a table or JSON. They read live state
//! only: a replica that does not answer is named in a clear error, never silently left out.

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::admin::api::{EdgeView, EdgesResponse, NodesResponse, EDGES_PATH, NODES_PATH};

/// How long one admin request may take, connect included: the admin listener answers from
/// memory in milliseconds; a replica slower than this is as good as down for an operator.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest admin answer read, bytes: ~500 bytes per edge, so room for ~30k edges.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// The admin address when none is given: `admin.listen`'s default.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9090";

/// How to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON with real types (numbers, arrays, null), for machines.
    Json,
}

/// `tunnel-server edges`.
#[derive(clap::Args, Debug)]
pub struct EdgesArgs {
    /// A replica's admin address (`admin.listen`), host:port; repeat once per replica to see
    /// which replica holds each edge.
    #[arg(long = "admin", value_name = "ADDR", default_value = DEFAULT_ADMIN)]
    pub admin: Vec<String>,
    /// Instead of admin APIs: the server config of a replica using `[state] backend =
    /// "etcd"`; the whole fleet's sessions are read from etcd.
    #[arg(long, short, conflicts_with = "admin")]
    pub config: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// `tunnel-server node list`.
#[derive(clap::Args, Debug)]
pub struct NodeListArgs {
    /// The admin address (`admin.listen`) of a running replica, host:port. The list comes
    /// from the live server (registration state plus who is connected to that replica).
    #[arg(long = "admin", value_name = "ADDR", default_value = DEFAULT_ADMIN)]
    pub admin: String,
    /// Instead of an admin API: the server config of a replica using `[state] backend =
    /// "etcd"`; identities, revocations and live sessions (on any replica) are read from
    /// etcd, so no replica needs to be running.
    #[arg(long, short, conflicts_with = "admin")]
    pub config: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Why an admin view could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Nothing answered at the address.
    #[error("admin API at {admin} does not answer: {reason} (is tunnel-server running there with `admin.listen = \"{admin}\"`?)")]
    Unreachable {
        /// The address asked.
        admin: String,
        /// What connecting said.
        reason: String,
    },
    /// Something answered, but not as a Tether admin listener does.
    #[error("admin API at {admin}: {reason}")]
    BadAnswer {
        /// The address asked.
        admin: String,
        /// What was wrong.
        reason: String,
    },
    /// Some replicas answered, others did not (each named on stderr already).
    #[error("{failed} of {asked} admin addresses did not answer")]
    Partial {
        /// How many failed.
        failed: usize,
        /// How many were asked.
        asked: usize,
    },
    /// Writing the output failed.
    #[error("output: {0}")]
    Output(String),
}

/// GET `path` from the admin listener at `admin` and parse its JSON.
pub async fn get<T: DeserializeOwned>(admin: &str, path: &str) -> Result<T, FleetError> {
    let bad = |reason: String| FleetError::BadAnswer {
        admin: admin.to_owned(),
        reason,
    };
    let fetch = async {
        let tcp =
            tokio::net::TcpStream::connect(admin)
                .await
                .map_err(|e| FleetError::Unreachable {
                    admin: admin.to_owned(),
                    reason: e.to_string(),
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| bad(format!("HTTP handshake: {e}")))?;
        let driver = tokio::spawn(connection);
        let request = Request::get(path)
            .header(http::header::HOST, admin)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| bad(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| bad(format!("GET {path}: {e} (not an HTTP admin listener?)")))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| bad(format!("GET {path}: body: {e}")))?
            .to_bytes();
        driver.abort();
        if status != StatusCode::OK {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(bad(format!(
                "GET {path} answered {status}: {} (a tunnel-server older than this command?)",
                text.trim()
            )));
        }
        serde_json::from_slice(&body)
            .map_err(|e| bad(format!("GET {path}: not the expected JSON: {e}")))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, fetch)
        .await
        .map_err(|_| FleetError::Unreachable {
            admin: admin.to_owned(),
            reason: format!("no answer within {REQUEST_TIMEOUT:?}"),
        })?
}

fn runtime() -> Result<tokio::runtime::Runtime, FleetError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| FleetError::Output(e.to_string()))
}

pub(crate) fn print_json(value: &impl Serialize) -> Result<(), FleetError> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| FleetError::Output(e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// An edge with the admin address it was read from (`-o json` of `edges`).
#[derive(Debug, Serialize)]
struct EdgeRow<'a> {
    admin: &'a str,
    #[serde(flatten)]
    edge: &'a EdgeView,
}

/// Run `tunnel-server edges`: every replica's sessions, one table or one JSON array.
pub fn run_edges(args: EdgesArgs) -> Result<(), FleetError> {
    let answers = runtime()?.block_on(async {
        let mut answers = Vec::new();
        for admin in &args.admin {
            answers.push((
                admin.as_str(),
                get::<EdgesResponse>(admin, EDGES_PATH).await,
            ));
        }
        answers
    });
    let mut failed = 0;
    let mut rows = Vec::new();
    for (admin, answer) in &answers {
        match answer {
            Ok(response) => rows.extend(response.edges.iter().map(|edge| EdgeRow { admin, edge })),
            Err(error) => {
                failed += 1;
                eprintln!("error: {error}");
            }
        }
    }
    if failed == answers.len() {
        return Err(FleetError::Partial {
            failed,
            asked: answers.len(),
        });
    }
    rows.sort_by(|a, b| (&a.edge.node, &a.edge.replica).cmp(&(&b.edge.node, &b.edge.replica)));
    match args.output {
        Output::Json => print_json(&rows)?,
        Output::Table => print!("{}", edges_table(&rows)),
    }
    match failed {
        0 => Ok(()),
        failed => Err(FleetError::Partial {
            failed,
            asked: answers.len(),
        }),
    }
}

/// Run `tunnel-server node list`.
pub fn run_node_list(args: NodeListArgs) -> Result<(), FleetError> {
    let response = runtime()?.block_on(get::<NodesResponse>(&args.admin, NODES_PATH))?;
    if !response.registration && args.output == Output::Table {
        eprintln!(
            "note: {} has no [registration]: only connected nodes are listed",
            args.admin
        );
    }
    print_nodes(&response, args.output)
}

/// Print a nodes view, from an admin API or from the state store alike.
pub(crate) fn print_nodes(response: &NodesResponse, output: Output) -> Result<(), FleetError> {
    match output {
        Output::Json => print_json(&response.nodes),
        Output::Table => {
            print!("{}", nodes_table(response));
            Ok(())
        }
    }
}

fn or_dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_owned()
}

fn ips(list: &[std::net::IpAddr]) -> String {
    if list.is_empty() {
        return "-".into();
    }
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn edges_table(rows: &[EdgeRow<'_>]) -> String {
    let header = [
        "NODE",
        "IPS",
        "REPLICA",
        "SINCE",
        "STREAMS",
        "BYTES-TO-EDGE",
        "BYTES-FROM-EDGE",
        "TRANSPORT",
        "CERT-SERIAL",
        "CERT-EXPIRES",
    ];
    let body = rows
        .iter()
        .map(|r| {
            let e = r.edge;
            vec![
                e.node.clone(),
                ips(&e.ips),
                e.replica.clone(),
                e.since.clone(),
                e.streams_open.to_string(),
                e.bytes_to_edge.to_string(),
                e.bytes_from_edge.to_string(),
                e.transport.clone(),
                or_dash(e.certificate_serial.as_deref()),
                or_dash(e.certificate_expires.as_deref()),
            ]
        })
        .collect::<Vec<_>>();
    table(&header, &body)
}

fn nodes_table(response: &NodesResponse) -> String {
    let header = [
        "NODE",
        "IPS",
        "POOL",
        "CONNECTED",
        "CERT-EXPIRES",
        "REVOKED",
        "REVOKED-AT",
    ];
    let yes_no = |b: bool| if b { "yes" } else { "no" }.to_owned();
    let body = response
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.node.clone(),
                ips(&n.ips),
                or_dash(n.pool.as_deref()),
                yes_no(n.connected),
                or_dash(n.certificate_expires.as_deref()),
                yes_no(n.revoked),
                or_dash(n.revoked_at.as_deref()),
            ]
        })
        .collect::<Vec<_>>();
    table(&header, &body)
}

/// Left-aligned columns two spaces apart, a header line first.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_columns_line_up() {
        let t = table(
            &["NODE", "IPS"],
            &[
                vec!["a".into(), "10.0.0.1".into()],
                vec!["long-name".into(), "-".into()],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "NODE       IPS");
        assert_eq!(lines[1], "a          10.0.0.1");
        assert_eq!(lines[2], "long-name  -");
    }
}
