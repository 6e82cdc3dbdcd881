//! The library's module graph, read from its source: no import cycles,
//! and data flowing one way through the stages of a swap (discover ->
//! plan -> supply -> swap -> report: no stage reaches a later one).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Modules outside the library's graph: the crate root (which declares
/// every module), the stub (a separate no_std library) and its ABI table.
const OUTSIDE: &[&str] = &["lib", "preload_stub", "stub_abi"];

/// The source of `module` without its unit tests and comments.
fn code_of(source: &str) -> String {
    let without_tests = match source.find("#[cfg(test)]\nmod tests") {
        Some(i) => &source[..i],
        None => source,
    };
    without_tests
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module of the library and the modules it names (`crate::m` in a
/// path, or `m` inside `use crate::{...}`).
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules: BTreeSet<String> = std::fs::read_dir(&src)
        .expect("src")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".rs").map(str::to_owned)
        })
        .filter(|m| !OUTSIDE.contains(&m.as_str()))
        .collect();
    let ident = |s: &str| {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<String>()
    };
    let mut graph = BTreeMap::new();
    for module in &modules {
        let code =
            code_of(&std::fs::read_to_string(src.join(format!("{module}.rs"))).expect("read"));
        let mut named = BTreeSet::new();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // use crate::{a::X, b, c::{...}}: the first name of each
                // top-level item.
                let mut depth = 0;
                let mut item_start = true;
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => item_start = true,
                        c if c.is_whitespace() => {}
                        _ if item_start => {
                            named.insert(ident(&group[j..]));
                            item_start = false;
                        }
                        _ => {}
                    }
                }
            } else {
                named.insert(ident(rest));
            }
        }
        named.retain(|m| modules.contains(m) && m != module);
        graph.insert(module.clone(), named);
    }
    graph
}

/// A path from `from` to `to`, if any.
fn path(graph: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> Option<Vec<String>> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![vec![from.to_owned()]];
    while let Some(p) = stack.pop() {
        let last = p.last().expect("non-empty").clone();
        for next in graph.get(&last).into_iter().flatten() {
            if next == to {
                let mut found = p.clone();
                found.push(next.clone());
                return Some(found);
            }
            if seen.insert(next.clone()) {
                let mut longer = p.clone();
                longer.push(next.clone());
                stack.push(longer);
            }
        }
    }
    None
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = graph();
    assert!(graph.len() > 20, "modules found: {:?}", graph.keys());
    assert!(
        graph["swap"].contains("trampoline") && graph["pipeline"].contains("swap"),
        "the reader misses imports: {graph:?}"
    );
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|m| path(&graph, m, m))
        .map(|p| p.join(" -> "))
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn no_stage_of_a_swap_reaches_a_later_one() {
    let graph = graph();
    let stages = ["discover", "plan", "supply", "swap", "report"];
    let mut wrong = Vec::new();
    for (i, early) in stages.iter().enumerate() {
        for late in &stages[i + 1..] {
            if let Some(p) = path(&graph, early, late) {
                wrong.push(p.join(" -> "));
            }
        }
    }
    assert!(wrong.is_empty(), "against the flow:\n{}", wrong.join("\n"));
    // The system-call layer and the arithmetic under it are leaves.
    assert!(graph["range"].is_empty(), "range: {:?}", graph["range"]);
    let sys: Vec<&String> = graph["sys"].iter().filter(|m| *m != "range").collect();
    assert!(sys.is_empty(), "sys depends on {sys:?}");
}
