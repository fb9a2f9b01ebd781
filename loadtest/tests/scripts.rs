//! The benchmark scripts (`compare.sh`, `lossy.sh`, `longlink.sh`) are `shellcheck` clean:
//! they run as root (`lossy.sh` and `longlink.sh` make network namespaces and iptables rules),
//! so quoting mistakes matter.

use std::path::Path;
use std::process::Command;

#[test]
fn benchmark_scripts_are_shellcheck_clean() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("shellcheck")
        .arg(dir.join("compare.sh"))
        .arg(dir.join("lossy.sh"))
        .arg(dir.join("longlink.sh"))
        .output()
        .unwrap_or_else(|e| {
            panic!("shellcheck not found ({e}): .ci/run installs it (apt-get install shellcheck)")
        });
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
}
