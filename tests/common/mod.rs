//! Finding the reference fixtures (`GLM2RS_FIXTURES`, default `../shared/fixtures/tiny-glm2`).
#![allow(dead_code)]

use std::path::PathBuf;

pub use glm2rs::testing::max_abs_diff;

/// The fixture directory, or `None` (with a note) when it is absent outside CI.
/// Under `CI=true` a missing fixture fails the test.
pub fn fixtures() -> Option<PathBuf> {
    let dir = match std::env::var_os("GLM2RS_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tiny-glm2"),
    };
    if dir.join("golden").is_dir() {
        return Some(dir);
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!(
            "fixtures not found at {} (CI=true: a missing fixture is a failure)",
            dir.display()
        );
    }
    eprintln!("SKIP: fixtures not found at {}", dir.display());
    None
}

pub fn read_json(path: PathBuf) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}
