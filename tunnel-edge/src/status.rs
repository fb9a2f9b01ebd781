//! What a running edge reports about its sessions to the process that runs it (tests, the
//! demo); operators read the same through the admin listener's metrics.

/// Observable state, for tests and the demo.
#[derive(Debug, Default)]
pub struct EdgeStatus {
    /// Sessions established since start.
    pub sessions: std::sync::atomic::AtomicU64,
    /// Whether at least one session is up now.
    pub connected: std::sync::atomic::AtomicBool,
    /// Sessions up now.
    pub live_sessions: std::sync::atomic::AtomicUsize,
    /// Sessions closed because they reached a replica another session already holds.
    pub duplicates: std::sync::atomic::AtomicU64,
}

impl EdgeStatus {
    pub(crate) fn session_up(&self) {
        use std::sync::atomic::Ordering;
        self.sessions.fetch_add(1, Ordering::Relaxed);
        self.live_sessions.fetch_add(1, Ordering::AcqRel);
        self.connected.store(true, Ordering::Release);
    }

    pub(crate) fn session_down(&self) {
        use std::sync::atomic::Ordering;
        let left = self.live_sessions.fetch_sub(1, Ordering::AcqRel) - 1;
        self.connected.store(left > 0, Ordering::Release);
    }
}
