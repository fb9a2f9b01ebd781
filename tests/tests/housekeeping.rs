//! Facts about the project a packager relies on: the declared `rust-version` is exactly the
//! highest one the locked dependencies need (a lower one promises builds that fail, a higher
//! one refuses toolchains that work), and the license file matches the crates' license.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn version(v: &str) -> Vec<u64> {
    let mut parts: Vec<u64> = v.split('.').map(|p| p.parse().unwrap_or(0)).collect();
    parts.resize(3, 0);
    parts
}

#[test]
fn rust_version_is_what_the_lockfile_needs() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .current_dir(root())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let members: Vec<&str> = metadata["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let mut needed = (vec![0, 0, 0], String::new());
    let mut declared = Vec::new();
    for package in metadata["packages"].as_array().unwrap() {
        let Some(rv) = package["rust_version"].as_str() else {
            continue;
        };
        if members.contains(&package["id"].as_str().unwrap_or_default()) {
            declared.push((package["name"].as_str().unwrap().to_string(), version(rv)));
        } else if version(rv) > needed.0 {
            needed = (version(rv), package["name"].as_str().unwrap().to_string());
        }
    }
    assert!(
        !declared.is_empty(),
        "no workspace member declares rust-version"
    );
    for (name, rv) in declared {
        assert_eq!(
            rv, needed.0,
            "{name} declares rust-version {rv:?}; the locked dependencies need {:?} ({})",
            needed.0, needed.1
        );
    }
}

#[test]
fn license_file_matches_the_crates_license() {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"Apache-2.0\""));
    let license = std::fs::read_to_string(root().join("LICENSE")).expect("LICENSE");
    assert!(license.contains("Apache License") && license.contains("Version 2.0"));
}

#[test]
fn completions_and_man_pages_come_from_the_cli() {
    for binary in ["tunnel-server", "tunnel-edge"] {
        let path = tether_tests::binary(binary);
        for shell in ["bash", "zsh", "fish"] {
            let out = std::process::Command::new(&path)
                .args(["completions", shell])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && text.contains(binary),
                "{binary} {shell}: {text}"
            );
            assert!(
                text.contains("check-config"),
                "{binary} {shell} lacks subcommands"
            );
        }
        let out = std::process::Command::new(&path)
            .arg("man")
            .output()
            .unwrap();
        let roff = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && roff.contains(".TH"), "{roff}");
        assert!(roff.contains(binary), "{roff}");
    }
}
