//! A second server instance started with the same Unix socket path must fail with a message
//! naming the path, and leave the first instance's socket serving; a stale socket (nobody
//! listening) is replaced.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tunnel_server::config::ServerConfig;
use tunnel_server::pki;
use tunnel_server::RunningServer;

fn config(dir: &Path, name: &str, admin: &str) -> ServerConfig {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!(
            r#"
[edge]
listen = "127.0.0.1:0"
cert = "server.pem"
key = "server-key.pem"
client_ca = "ca.pem"
[connect]
unix_socket = "{}"
[admin]
listen = "{admin}"
"#,
            dir.join("connect.sock").display()
        ),
    )
    .unwrap();
    ServerConfig::load(&file).expect("server config")
}

/// The status line a CONNECT through `socket` gets (no edge is connected: a 502).
async fn status_line(socket: &Path) -> String {
    let mut s = UnixStream::connect(socket)
        .await
        .expect("connect to the socket");
    s.write_all(b"CONNECT 192.0.2.1:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut answer))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&answer[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn second_instance_never_takes_over_a_live_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki::init_ca_dir(d, &[], &[], pki::SERVER_VALIDITY, true).expect("pki");
    let socket = d.join("connect.sock");

    let first = RunningServer::start(config(d, "first", "127.0.0.1:0"))
        .await
        .expect("first instance");
    assert!(status_line(&socket).await.starts_with("HTTP/1.1 502"));
    let admin = first.addrs.admin.expect("admin address").to_string();

    // Other ports, same socket: refused, naming the path.
    let error = RunningServer::start(config(d, "second", "127.0.0.1:0"))
        .await
        .err()
        .expect("a second instance on the same socket must fail");
    let message = format!("{error:#}");
    assert!(
        message.contains(&socket.display().to_string()) && message.contains("in use"),
        "{message}"
    );
    // The first one's admin port, same socket: fails on the port, before touching the socket.
    let error = RunningServer::start(config(d, "third", &admin))
        .await
        .err()
        .expect("a third instance on the same admin port must fail");
    assert!(format!("{error:#}").contains("admin"), "{error:#}");
    // The first instance still answers on its socket.
    let line = status_line(&socket).await;
    assert!(line.starts_with("HTTP/1.1 502"), "{line}");

    first.shutdown(Duration::from_secs(1)).await;
    // A socket file nobody listens on is stale and replaced.
    let stale = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    drop(stale);
    assert!(socket.exists());
    let again = RunningServer::start(config(d, "again", "127.0.0.1:0"))
        .await
        .expect("a stale socket is replaced");
    assert!(status_line(&socket).await.starts_with("HTTP/1.1 502"));
    again.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_missing_socket_directory_is_named_as_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki::init_ca_dir(d, &[], &[], pki::SERVER_VALIDITY, true).expect("pki");
    let file = d.join("server.toml");
    std::fs::write(
        &file,
        r#"
[edge]
listen = "127.0.0.1:0"
cert = "server.pem"
key = "server-key.pem"
client_ca = "ca.pem"
[connect]
unix_socket = "no-such-dir/connect.sock"
"#,
    )
    .unwrap();
    let config = ServerConfig::load(&file).expect("server config");
    let error = RunningServer::start(config).await.err().expect("must fail");
    let message = format!("{error:#}");
    assert!(
        message.contains("socket directory")
            && message.contains("no-such-dir")
            && message.contains("does not exist"),
        "{message}"
    );
}
