//! Commands as docs/QUICKSTART.md prints them, so the tests run what an operator pastes: the
//! `ca init` line that names the certificates and the `kubectl create secret` line that
//! decides which files the server's Secret holds.

use std::path::Path;

/// The words of every command in the fenced code blocks of QUICKSTART's `## {heading}` section
/// that starts with `program` (after an optional `sudo`), continuation lines joined.
pub fn commands(heading: &str, program: &[&str]) -> Vec<Vec<String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/QUICKSTART.md");
    let text = std::fs::read_to_string(&path).expect("read docs/QUICKSTART.md");
    let start = text
        .find(&format!("\n## {heading}\n"))
        .unwrap_or_else(|| panic!("QUICKSTART has no section `## {heading}`"));
    let section = &text[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    let mut found = Vec::new();
    let mut in_code = false;
    let mut pending = String::new();
    for line in section.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if !in_code {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(line);
                let mut words: Vec<String> =
                    pending.split_whitespace().map(str::to_owned).collect();
                pending.clear();
                if words.first().map(String::as_str) == Some("sudo") {
                    words.remove(0);
                }
                if words.len() >= program.len() && words[..program.len()] == *program {
                    found.push(words);
                }
            }
        }
    }
    assert!(
        !found.is_empty(),
        "QUICKSTART's `## {heading}` shows no `{}` command",
        program.join(" ")
    );
    found
}

/// The one command of `heading` that starts with `program`.
pub fn command(heading: &str, program: &[&str]) -> Vec<String> {
    let mut all = commands(heading, program);
    assert_eq!(
        all.len(),
        1,
        "QUICKSTART's `## {heading}`: expected one `{}` command, found {all:?}",
        program.join(" ")
    );
    all.remove(0)
}

/// The file names a `kubectl create secret generic ... --from-file=PATH` line puts in the
/// Secret (kubectl's key is the file's base name), and the Secret's name and namespace.
pub fn secret_files(words: &[String]) -> (String, String, Vec<String>) {
    let generic = words
        .iter()
        .position(|w| w == "generic")
        .expect("`create secret generic`");
    let name = words[generic + 1].clone();
    let namespace = words
        .iter()
        .position(|w| w == "-n" || w == "--namespace")
        .map(|i| words[i + 1].clone())
        .expect("the secret line names its namespace");
    let files = words
        .iter()
        .filter_map(|w| w.strip_prefix("--from-file="))
        .map(|p| {
            Path::new(p)
                .file_name()
                .expect("a file")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    (name, namespace, files)
}
