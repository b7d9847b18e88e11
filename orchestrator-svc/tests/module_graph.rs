//! The crate's modules import one way: among the children of any module (the top-level modules of the crate, the
//! parts of `jobs`, ...), the graph of "something in A names something in B" has no cycle. And no source file is
//! longer than one sitting's reading.
//!
//! Read from the source, not the compiler: every `crate::`, `super::` and `self::` path (in `use` trees, braces
//! expanded, and inline) counts as an edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest file allowed in src/, in lines (issue 10: "no file over ~400 lines").
const MAX_LINES: usize = 420;

/// The crate's src/ (MODULE_GRAPH_SRC points the check at another checkout, e.g. to see it fail on an old one).
fn src() -> PathBuf {
    std::env::var_os("MODULE_GRAPH_SRC")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `jobs/item/mod.rs` -> ["jobs", "item"]; `lib.rs` and `main.rs` -> [].
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// Source without comments (so doc examples do not count).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Expands a use tree (`a::{b, c::{d, e}}`) into paths.
fn expand(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else {
        return vec![tree.split(" as ").next().unwrap().trim().to_string()];
    };
    let Some(close) = tree.rfind('}').filter(|&c| c > open) else {
        return Vec::new();
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..close];
    let mut items = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&inner[start..]);
    items
        .into_iter()
        .filter(|i| !i.trim().is_empty())
        .flat_map(|i| {
            expand(i)
                .into_iter()
                .map(|p| format!("{prefix}{p}"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every `crate::`/`super::`/`self::` path the code names.
fn paths_in(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    // `use` trees, braces and all.
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before = rest[..i].chars().last();
        let tail = &rest[i + 4..];
        let end = tail.find(';').unwrap_or(tail.len());
        if before.is_none_or(|c| !c.is_alphanumeric() && c != '_') {
            paths.extend(expand(&tail[..end].replace('\n', " ")));
        }
        rest = &tail[end.min(tail.len())..];
    }
    // Inline paths.
    for root in ["crate::", "super::", "self::"] {
        let mut rest = code;
        while let Some(i) = rest.find(root) {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .unwrap_or(tail.len());
            paths.push(tail[..end].trim_end_matches(':').to_string());
            rest = &tail[end..];
        }
    }
    paths
}

/// A path named in `module` (a file's module path) as an absolute module path, cut to the modules that exist.
fn resolve(module: &[String], path: &str, modules: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    let mut segments = path.split("::").map(str::trim).filter(|s| !s.is_empty());
    let mut base: Vec<String> = match segments.next()? {
        "crate" => Vec::new(),
        // In `a/b.rs` (module a::b) `super` is `a`; in `a/b/mod.rs` (also a::b) too.
        "super" => {
            let mut b = module.to_vec();
            b.pop();
            b
        }
        "self" => module.to_vec(),
        _ => return None,
    };
    for s in segments {
        if s == "super" {
            base.pop();
            continue;
        }
        let mut next = base.clone();
        next.push(s.to_string());
        if modules.contains(&next) {
            base = next;
        } else {
            break;
        }
    }
    Some(base)
}

#[test]
fn sibling_modules_import_one_way() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(f)).collect();
    // parent module -> (child -> children it depends on)
    let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in &files {
        let from = module_of(file);
        let code = strip_comments(&std::fs::read_to_string(file).unwrap());
        for path in paths_in(&code) {
            let Some(to) = resolve(&from, &path, &modules) else {
                continue;
            };
            // The first level where the two differ: both sides are children of the common parent.
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common < from.len() && common < to.len() {
                graphs
                    .entry(from[..common].to_vec())
                    .or_default()
                    .entry(from[common].clone())
                    .or_default()
                    .insert(to[common].clone());
            }
        }
    }
    let cycles: Vec<String> = graphs
        .iter()
        .filter_map(|(parent, graph)| {
            let cycle = find_cycle(graph)?;
            Some(format!(
                "in crate::{}: {}",
                parent.join("::"),
                cycle.join(" -> ")
            ))
        })
        .collect();
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
    assert!(
        graphs.get(&Vec::new()).is_some_and(|g| g.len() > 5),
        "the parser found no edges between top-level modules: {graphs:?}"
    );
}

fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_checker_sees_a_cycle() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("item".to_string(), ["pipeline".to_string()].into()),
        ("pipeline".to_string(), ["item".to_string()].into()),
    ]
    .into();
    assert!(find_cycle(&graph).is_some());
    assert_eq!(
        expand("super::{a, b::{c, d as e}}"),
        ["super::a", "super::b::c", "super::b::d"]
    );
}

#[test]
fn files_stay_short() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let lines = std::fs::read_to_string(f).unwrap().lines().count();
            (lines > MAX_LINES).then(|| format!("{} ({lines} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these: {long:?}");
}
