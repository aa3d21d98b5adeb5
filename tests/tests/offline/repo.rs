//! The repository stands alone: no file of it refers a reader to files outside it, and
//! every Rust source file begins with a `//!` line saying what it is for.

use std::{
    fs,
    path::{Path, PathBuf},
};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests lives in the workspace")
        .to_owned()
}

/// The repository's files, relative to the root, without `.git` and build output (`target/`,
/// and any directory Cargo marked with a `CACHEDIR.TAG`). Walked rather than asked of git:
/// `./x test` runs the tests as root, for whom git refuses a checkout another user owns.
fn files() -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display())) {
            let path = entry.expect("a directory entry").path();
            let name = path.file_name().expect("an entry has a name");
            if name == ".git" {
                continue;
            }
            if path.is_dir() {
                if name != "target" && !path.join("CACHEDIR.TAG").exists() {
                    walk(root, &path, out);
                }
            } else {
                let relative = path.strip_prefix(root).expect("under the root");
                out.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    let root = repo_root();
    let mut out = Vec::new();
    walk(&root, &root, &mut out);
    out.sort();
    out
}

#[test]
fn no_file_refers_to_files_outside_the_repository() {
    // Team notes that users do not have. Built at run time, so that this file does not
    // name them itself.
    let outside: Vec<String> = ["SPEC", "TOOLCHAIN", "STYLE", "LAB"]
        .iter()
        .map(|note| format!("{note}.md"))
        .chain([format!("SPEC {}", "section"), format!("../{}", "shared")])
        .collect();
    let root = repo_root();
    let mut hits = Vec::new();
    for path in files() {
        // Files that are not text name nothing.
        let Ok(text) = fs::read_to_string(root.join(&path)) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            for name in outside.iter().filter(|name| line.contains(name.as_str())) {
                hits.push(format!("{path}:{}: {name}", n + 1));
            }
        }
    }
    assert!(
        hits.is_empty(),
        "files outside the repository named (state the facts instead):\n{}",
        hits.join("\n")
    );
}

#[test]
fn every_rust_file_says_what_it_is_for() {
    let dirs = [
        "monitor/src/",
        "monitor-common/src/",
        "monitor-ebpf/src/",
        "tests/src/",
        "tests/tests/",
        "xtask/src/",
    ];
    let root = repo_root();
    let missing: Vec<String> = files()
        .into_iter()
        .filter(|path| path.ends_with(".rs") && dirs.iter().any(|dir| path.starts_with(dir)))
        .filter(|path| {
            !fs::read_to_string(root.join(path)).is_ok_and(|text| text.starts_with("//!"))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "these files do not begin with a `//!` line saying what they are for:\n{}",
        missing.join("\n")
    );
}
