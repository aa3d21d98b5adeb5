//! The agent's modules import one way: no cycles among them, and only `config` and `run`
//! read the command line's types (a component takes the configuration `config` builds).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::Path,
};

/// Modules allowed to import `cli`.
const ABOVE_CONFIG: [&str; 3] = ["cli", "config", "run"];

/// Each top-level module of the library and the other top-level modules its code (not its
/// tests, not its comments) names through `crate::`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| top_module(&src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = top_module(&src, file);
        if from == "lib" || from == "main" {
            continue;
        }
        let text = fs::read_to_string(file).expect("a source file");
        let code = code_of(&text);
        let named = graph.entry(from.clone()).or_default();
        for to in crate_names(&code) {
            if to != from && modules.contains(&to) {
                named.insert(to);
            }
        }
    }
    graph
}

fn collect(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).expect("a source directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

fn top_module(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("under src");
    let first = relative.components().next().expect("a file name");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_owned()
}

/// The text before the unit tests, without comments.
fn code_of(text: &str) -> String {
    let before_tests = text.split("#[cfg(test)]").next().unwrap_or_default();
    before_tests
        .lines()
        .map(|line| line.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first path segment after every `crate::`, including each name of a
/// `use crate::{a::x, b, c::{y, z}}` group.
fn crate_names(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && is_ident(c) => {
                        names.insert(ident(&group[i..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            names.insert(ident(rest));
        }
    }
    names
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn ident(text: &str) -> String {
    text.chars().take_while(|&c| is_ident(c)).collect()
}

#[test]
fn only_config_and_run_read_the_command_line() {
    let readers: Vec<String> = imports()
        .into_iter()
        .filter(|(from, to)| to.contains("cli") && !ABOVE_CONFIG.contains(&from.as_str()))
        .map(|(from, _)| from)
        .collect();
    assert!(
        readers.is_empty(),
        "modules below config that import cli: {readers:?}"
    );
}

#[test]
fn no_module_imports_back() {
    let graph = imports();
    let mut done = BTreeSet::new();
    for start in graph.keys() {
        let mut path = Vec::new();
        if let Some(cycle) = cycle_from(start, &graph, &mut path, &mut done) {
            panic!("an import cycle: {}", cycle.join(" -> "));
        }
    }
}

/// Depth first from `at`: a cycle through the modules on `path`, if any.
fn cycle_from(
    at: &str,
    graph: &BTreeMap<String, BTreeSet<String>>,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(i) = path.iter().position(|m| m == at) {
        let mut cycle = path[i..].to_vec();
        cycle.push(at.to_owned());
        return Some(cycle);
    }
    if done.contains(at) {
        return None;
    }
    path.push(at.to_owned());
    for next in graph.get(at).into_iter().flatten() {
        if let Some(cycle) = cycle_from(next, graph, path, done) {
            return Some(cycle);
        }
    }
    path.pop();
    done.insert(at.to_owned());
    None
}
