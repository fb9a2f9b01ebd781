//! How the server's parts start listening and stop, below everything that listens: the
//! two-stage [`Stop`] every accept loop and session watches, and Unix socket binding that
//! never takes a socket from a live process. Nothing here knows sessions, frontends or
//! configuration, so every module can depend on it and it depends on none of them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::Context;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

/// The two stages of stopping. `drain`: stop accepting, retire sessions (no new streams),
/// let in-flight streams run. `hard`: end everything now.
#[derive(Clone, Default)]
pub struct Stop {
    /// Cancelled when draining starts.
    pub drain: CancellationToken,
    /// Cancelled when the grace period is over (or on a second signal).
    pub hard: CancellationToken,
}

/// Bind a Unix socket with `mode`, replacing a stale socket file but never another file,
/// and never a socket another process still serves: a second instance started with the same
/// path must fail, not silently take the first one's clients.
pub(crate) fn bind_unix(path: &Path, mode: u32) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        anyhow::bail!(
            "socket directory {} does not exist (for {}): create it first",
            parent.display(),
            path.display()
        );
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => anyhow::bail!(
                "{} is in use: another process is listening on it (another tunnel-server \
                 instance?); refusing to take it over",
                path.display()
            ),
            // Nobody listens: a socket file left by a process that is gone.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)
                    .with_context(|| format!("remove stale socket {}", path.display()))?;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "{} exists; cannot tell whether it is in use",
                        path.display()
                    )
                })
            }
        }
    }
    // Bind inside a fresh 0700 directory, set the mode, then move it into place: there is no
    // moment where the socket exists at `path` with wider permissions.
    let staging = tempfile::Builder::new()
        .prefix(".tether-sock")
        .tempdir_in(parent)
        .with_context(|| format!("create staging directory in {}", parent.display()))?;
    let staged = staging.path().join("s");
    let listener = UnixListener::bind(&staged)
        .with_context(|| format!("bind connect socket {}", path.display()))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {:o} {}", mode, path.display()))?;
    std::fs::rename(&staged, path).with_context(|| format!("move socket to {}", path.display()))?;
    Ok(listener)
}
