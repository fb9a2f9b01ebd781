//! This process's descriptors and resident memory, read from /proc at each scrape.

use prometheus_client::metrics::gauge::Gauge;

/// Read this process's descriptors and resident memory from /proc (Linux; left at 0
/// elsewhere).
pub(super) fn sample(open_fds: &Gauge, resident_memory: &Gauge) {
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        open_fds.set(dir.count() as i64);
    }
    // statm: size resident shared ... in pages.
    let resident = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok());
    if let Some(pages) = resident {
        resident_memory.set(pages * PAGE_SIZE);
    }
}

/// Bytes per page of /proc/self/statm: 4 KiB on the x86_64 and arm64 Linux this runs on.
const PAGE_SIZE: i64 = 4096;
