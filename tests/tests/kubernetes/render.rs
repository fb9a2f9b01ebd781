//! Rendering a Kustomize directory with the machine's `kubectl kustomize` and reading every
//! object into a typed struct that refuses unknown fields: a misspelt field is an error here,
//! where the API server would silently drop it (or, for a strict decoder, refuse the apply).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::objects::Object;

/// The repository's deploy/kubernetes directory.
pub fn kubernetes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// `kubectl kustomize DIR`: the rendered YAML stream. Fails with a clear message when kubectl
/// is missing (`.ci/run` checks for it too).
pub fn kustomize(dir: &Path) -> String {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `kubectl kustomize` ({e}): these tests need kubectl on PATH \
                 (it carries Kustomize; .ci/run says where to get it)"
            )
        });
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("kustomize output is UTF-8")
}

/// Every document of a YAML stream, as JSON values (empty documents skipped).
pub fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("valid YAML document"))
        .filter(|value| !value.is_null())
        .collect()
}

/// Deserialize `value` as `T`, refusing any field `T` does not have. The error names each
/// unknown field by its path.
pub fn strict<T: DeserializeOwned>(value: &Value, what: &str) -> Result<T, String> {
    let mut unknown = Vec::new();
    let typed = serde_ignored::deserialize(value.clone(), |path| {
        unknown.push(path.to_string().replace(".?", ""))
    })
    .map_err(|e| format!("{what}: {e}"))?;
    if unknown.is_empty() {
        Ok(typed)
    } else {
        Err(format!("{what}: unknown fields {unknown:?}"))
    }
}

/// Render `dir` (relative to deploy/kubernetes) and read every object strictly.
pub fn render(dir: &str) -> Vec<Object> {
    let yaml = kustomize(&kubernetes_dir().join(dir));
    let objects: Vec<Object> = documents(&yaml)
        .iter()
        .map(|doc| Object::from_value(doc).unwrap_or_else(|e| panic!("{dir}: {e}")))
        .collect();
    assert!(!objects.is_empty(), "{dir} rendered no object");
    objects
}

/// Read a YAML file of deploy/ (relative to the repository root) strictly as `T`.
pub fn read_file<T: DeserializeOwned>(path: &str) -> T {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let docs = documents(&text);
    assert_eq!(docs.len(), 1, "{path}: expected one YAML document");
    strict(&docs[0], path).unwrap_or_else(|e| panic!("{e}"))
}
