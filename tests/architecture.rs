//! The floors of the crate (docs/architecture.md): every module imports only modules on lower
//! floors (or its own), never the crate root's re-exports. Read from the sources, so a new arrow
//! pointing up fails here before it spreads.

use std::collections::BTreeMap;
use std::path::Path;

/// Module -> floor. A module on floor n may use modules of floors < n.
const FLOORS: &[(&str, u32)] = &[
    ("error", 0),
    ("tuning", 0),
    ("testing", 0),
    ("config", 1),
    ("pth", 1),
    ("quantize", 1),
    ("tokenizer", 1),
    ("sampling", 1),
    ("checkpoint", 2),
    ("chat_format", 2),
    ("kernels", 2),
    ("device", 3),
    ("model", 3),
    ("generate", 4),
    ("gguf", 4),
    ("pipeline", 5),
    ("session", 6),
    ("engine", 6),
    ("server", 7),
    ("python", 8),
];

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_imports_a_module_above_it() {
    let floors: BTreeMap<&str, u32> = FLOORS.iter().copied().collect();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let mut wrong = vec![];
    for f in files {
        let rel = f
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let top = rel
            .split('/')
            .next()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" {
            continue;
        }
        let floor = *floors
            .get(top.as_str())
            .unwrap_or_else(|| panic!("{rel}: module {top} has no floor in FLOORS"));
        let text = std::fs::read_to_string(&f).unwrap();
        // unit tests may use anything
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        for (i, line) in code.lines().enumerate() {
            let line = line.split("//").next().unwrap();
            for part in line.split("crate::").skip(1) {
                let name: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if name == top {
                    continue;
                }
                match floors.get(name.as_str()) {
                    Some(&f2) if f2 < floor => {}
                    Some(&f2) => wrong.push(format!(
                        "{rel}:{}: {top} (floor {floor}) uses {name} (floor {f2})",
                        i + 1
                    )),
                    None => wrong.push(format!(
                        "{rel}:{}: {top} uses crate::{name}, a root re-export: name the module",
                        i + 1
                    )),
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "arrows pointing up:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn no_file_over_700_lines_outside_kernels() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    let long: Vec<String> = files
        .iter()
        .filter(|f| !f.starts_with(src.join("kernels")))
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).unwrap().lines().count();
            (n > 700).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these: {long:?}");
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    assert!(lib.lines().count() <= 150, "lib.rs is the crate's face");
}
