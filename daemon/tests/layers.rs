//! The module graph of the daemon and of the testbed has no cycle.
//!
//! For each crate, every `.rs` file under `src/` belongs to a top-level
//! module (the first path component below `src/`: `datapath/inbound.rs` is
//! `datapath`, `views.rs` is `views`); `lib.rs` and `main.rs` are the crate
//! root and are not sources (the binary may import anything). A file
//! *uses* another top-level module when its code (not its comments, doc
//! comments or string literals, and not its `#[cfg(test)]` modules) names
//! it: `crate::x`, `use crate::{x, y::…}`, a name the crate root re-exports
//! from `x` (`crate::Error` when lib.rs has `pub use error::Error`), or
//! `super::…::x` where the `super`s climb to the crate root. The test
//! builds the directed graph between top-level modules and fails naming
//! one full cycle per tangle, with the file and line of each edge.
//!
//! `cargo test -p causeway --test layers -- --nocapture` prints the graphs.
//!
//! Only acyclicity is enforced for now. [`Crate::layers`] is where an
//! allowed order (lowest layer first) goes once the daemon's shape has
//! settled: then a module may only use modules of its own or a lower layer.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// A crate whose module graph is checked.
struct Crate {
    /// For messages.
    name: &'static str,
    /// Its `src` folder, relative to this package's manifest directory.
    src: &'static str,
    /// Allowed layer order, lowest first; empty: acyclicity only.
    layers: &'static [&'static [&'static str]],
}

/// The daemon's layers (docs/ARCHITECTURE.md): each imports only from
/// the layers below it.
const DAEMON: Crate = Crate {
    name: "causeway (daemon)",
    src: "src",
    layers: &[
        &["packet", "candidates", "notify", "election"],
        &["views"],
        &["config"],
        &["core", "invite", "cluster"],
        &["datapath"],
        &["observe"],
        &["daemon", "node"],
    ],
};

const TESTBED: Crate = Crate {
    name: "causeway-testbed",
    src: "../testbed/src",
    layers: &[],
};

#[test]
fn daemon_modules_form_no_cycle() {
    check(&DAEMON);
}

#[test]
fn testbed_modules_form_no_cycle() {
    check(&TESTBED);
}

fn check(krate: &Crate) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(krate.src);
    let graph = Graph::of_dir(&src);
    println!("{}:\n{}", krate.name, graph.render());
    let mut problems = graph.cycles_report();
    problems.push_str(&graph.layer_violations(krate.layers));
    // Once a crate lists its layers, a new module must be placed in one.
    if !krate.layers.is_empty() {
        for module in &graph.nodes {
            if !krate.layers.iter().any(|l| l.contains(&module.as_str())) {
                let _ = writeln!(
                    problems,
                    "layer: module {module} is in no layer; add it to the list in this test"
                );
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the module graph of {} ({}) is not layered:\n{problems}",
        krate.name,
        src.display()
    );
}

/// Where an edge comes from: a file (relative to `src`) and a 1-based line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Site {
    file: String,
    line: usize,
}

/// Top-level module → the modules it uses → where (every place, in order).
#[derive(Debug, Default)]
struct Graph {
    nodes: BTreeSet<String>,
    edges: BTreeMap<String, BTreeMap<String, Vec<Site>>>,
}

/// One source file, as the graph builder sees it.
struct Source {
    /// Relative to `src`, with `/`.
    path: String,
    text: String,
}

impl Graph {
    fn of_dir(src: &Path) -> Self {
        let mut files = Vec::new();
        collect(src, &mut files);
        let sources: Vec<Source> = files
            .iter()
            .map(|f| Source {
                path: f
                    .strip_prefix(src)
                    .expect("under src")
                    .to_string_lossy()
                    .replace('\\', "/"),
                text: fs::read_to_string(f)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", f.display())),
            })
            .collect();
        assert!(!sources.is_empty(), "no .rs files under {}", src.display());
        Self::of_sources(&sources)
    }

    fn of_sources(sources: &[Source]) -> Self {
        let mut graph = Graph::default();
        for s in sources {
            if let Some(m) = top_module(&s.path) {
                graph.nodes.insert(m);
            }
        }
        // Names the crate root brings in with `use` (re-exports).
        let mut root_names = BTreeMap::new();
        for s in sources.iter().filter(|s| s.path == "lib.rs") {
            let tokens = without_test_modules(&tokenize(&strip(&s.text))).0;
            root_names = reexports(&tokens, &graph.nodes);
        }
        // Files that only exist for tests (`#[cfg(test)] mod x;`).
        let mut test_files: Vec<String> = Vec::new();
        for s in sources {
            let (_, test_mods) = without_test_modules(&tokenize(&strip(&s.text)));
            let dir = child_dir(&s.path);
            test_files.extend(test_mods.iter().map(|m| format!("{dir}{m}")));
        }
        let is_test_file = |path: &str| {
            test_files
                .iter()
                .any(|t| path == format!("{t}.rs") || path.starts_with(&format!("{t}/")))
        };
        for s in sources {
            let Some(from) = top_module(&s.path) else {
                continue;
            };
            if is_test_file(&s.path) {
                continue;
            }
            let (tokens, _) = without_test_modules(&tokenize(&strip(&s.text)));
            let depth = module_path(&s.path).len();
            for (to, line) in references(&tokens, depth) {
                let to = if graph.nodes.contains(&to) {
                    to
                } else if let Some(m) = root_names.get(&to) {
                    m.clone()
                } else {
                    continue;
                };
                if to == from {
                    continue;
                }
                graph
                    .edges
                    .entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_default()
                    .push(Site {
                        file: s.path.clone(),
                        line,
                    });
            }
        }
        graph
    }

    fn successors(&self, node: &str) -> impl Iterator<Item = &String> {
        self.edges.get(node).into_iter().flat_map(|m| m.keys())
    }

    /// `a -> b, c`, one line per module.
    fn render(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let to: Vec<&str> = self.successors(n).map(String::as_str).collect();
            let _ = writeln!(out, "  {n} -> {}", to.join(", "));
        }
        out
    }

    /// Strongly connected components with more than one module, each
    /// sorted, in order of their first module.
    fn tangles(&self) -> Vec<Vec<String>> {
        // Kosaraju: finish order on the graph, then components on the
        // reversed graph.
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for start in &self.nodes {
            if !seen.insert(start.clone()) {
                continue;
            }
            let mut stack = vec![(
                start.clone(),
                self.successors(start).cloned().collect::<Vec<_>>(),
            )];
            while let Some((node, pending)) = stack.last_mut() {
                if let Some(next) = pending.pop() {
                    if seen.insert(next.clone()) {
                        let succ = self.successors(&next).cloned().collect();
                        stack.push((next, succ));
                    }
                } else {
                    order.push(node.clone());
                    stack.pop();
                }
            }
        }
        let mut reverse: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (from, tos) in &self.edges {
            for to in tos.keys() {
                reverse.entry(to).or_default().push(from);
            }
        }
        let mut assigned = BTreeSet::new();
        let mut tangles = Vec::new();
        for root in order.iter().rev() {
            if !assigned.insert(root.as_str()) {
                continue;
            }
            let mut component = vec![root.clone()];
            let mut stack = vec![root.as_str()];
            while let Some(n) = stack.pop() {
                for &p in reverse.get(n).into_iter().flatten() {
                    if assigned.insert(p) {
                        component.push(p.to_owned());
                        stack.push(p);
                    }
                }
            }
            if component.len() > 1 {
                component.sort();
                tangles.push(component);
            }
        }
        tangles.sort();
        tangles
    }

    /// A shortest cycle through `start` that stays inside `within`.
    fn cycle_through(&self, start: &str, within: &[String]) -> Vec<String> {
        let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = VecDeque::from([start]);
        while let Some(n) = queue.pop_front() {
            for next in self.successors(n) {
                if !within.contains(next) {
                    continue;
                }
                if next == start {
                    let mut path = vec![n.to_owned()];
                    let mut at = n;
                    while at != start {
                        at = parent[at];
                        path.push(at.to_owned());
                    }
                    path.reverse();
                    return path;
                }
                if !parent.contains_key(next.as_str()) {
                    parent.insert(next.as_str(), n);
                    queue.push_back(next.as_str());
                }
            }
        }
        unreachable!("{start} is in a strongly connected component")
    }

    /// Empty when there is no cycle; otherwise one cycle per tangle, each
    /// edge with the first place that makes it.
    fn cycles_report(&self) -> String {
        let mut out = String::new();
        for tangle in self.tangles() {
            let cycle = self.cycle_through(&tangle[0], &tangle);
            let mut names = cycle.clone();
            names.push(cycle[0].clone());
            let _ = writeln!(
                out,
                "cycle: {}   (tangle of {} modules: {})",
                names.join(" → "),
                tangle.len(),
                tangle.join(", ")
            );
            for pair in names.windows(2) {
                let _ = writeln!(out, "  {}", self.edge_line(&pair[0], &pair[1]));
            }
            let _ = writeln!(out, "  every edge inside the tangle:");
            for from in &tangle {
                for to in self.successors(from).filter(|t| tangle.contains(t)) {
                    let _ = writeln!(out, "    {}", self.edge_line(from, to));
                }
            }
        }
        out
    }

    /// `a → b: file:line (and n more)`.
    fn edge_line(&self, from: &str, to: &str) -> String {
        let sites = &self.edges[from][to];
        format!(
            "{from} → {to}: {}:{}{}",
            sites[0].file,
            sites[0].line,
            match sites.len() {
                1 => String::new(),
                n => format!(" (and {} more)", n - 1),
            }
        )
    }

    /// Edges from a lower layer to a higher one (modules not listed are
    /// not checked). Empty when `layers` is.
    fn layer_violations(&self, layers: &[&[&str]]) -> String {
        let layer_of = |m: &str| layers.iter().position(|l| l.contains(&m));
        let mut out = String::new();
        for (from, tos) in &self.edges {
            for (to, sites) in tos {
                if let (Some(a), Some(b)) = (layer_of(from), layer_of(to))
                    && b > a
                {
                    let _ = writeln!(
                        out,
                        "layer: {from} (layer {a}) uses {to} (layer {b}): {}:{}",
                        sites[0].file, sites[0].line
                    );
                }
            }
        }
        out
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module of a file (relative to `src`), `None` for the
/// crate roots and binaries.
fn top_module(path: &str) -> Option<String> {
    if matches!(path, "lib.rs" | "main.rs") || path.starts_with("bin/") {
        return None;
    }
    let first = path.split('/').next()?;
    Some(first.strip_suffix(".rs").unwrap_or(first).to_owned())
}

/// The module path of a file: `datapath/inbound.rs` → [datapath, inbound],
/// `datapath/mod.rs` → [datapath].
fn module_path(path: &str) -> Vec<&str> {
    let mut parts: Vec<&str> = path.split('/').collect();
    if let Some(last) = parts.pop() {
        let stem = last.strip_suffix(".rs").unwrap_or(last);
        if !matches!(stem, "mod" | "lib" | "main") {
            parts.push(stem);
        }
    }
    parts
}

/// Where the files of a file's child modules live, relative to `src`,
/// ending in `/` (or empty for the crate root).
fn child_dir(path: &str) -> String {
    let parts = module_path(path);
    if parts.is_empty() {
        String::new()
    } else {
        format!("{}/", parts.join("/"))
    }
}

/// The source with comments, string and character literals blanked out
/// (newlines kept, so lines still count).
fn strip(src: &str) -> String {
    let chars: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let prev_ident = i > 0 && is_ident(chars[i - 1]);
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if let Some(j) = raw_string_at(&chars, i).filter(|_| !prev_ident) {
            // chars[j] is the opening quote of r"…", r#"…"# or br"…".
            let hashes = chars[i..j].iter().filter(|&&h| h == '#').count();
            for _ in i..=j {
                out.push(' ');
            }
            i = j + 1;
            while i < chars.len() {
                if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += hashes + 1;
                    break;
                }
                out.push(blank(chars[i]));
                i += 1;
            }
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() {
                match chars[i] {
                    '\\' => {
                        out.push(' ');
                        if let Some(&e) = chars.get(i + 1) {
                            out.push(blank(e));
                        }
                        i += 2;
                    }
                    '"' => {
                        out.push(' ');
                        i += 1;
                        break;
                    }
                    other => {
                        out.push(blank(other));
                        i += 1;
                    }
                }
            }
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{..}'), or a lifetime.
            let end = if next == Some('\\') {
                (i + 2..chars.len()).find(|&k| chars[k] == '\'')
            } else if chars.get(i + 2) == Some(&'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(end) => {
                    for _ in i..=end {
                        out.push(' ');
                    }
                    i = end + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Where the opening quote is, if a raw string starts at `i`.
fn raw_string_at(chars: &[char], i: usize) -> Option<usize> {
    let mut j = match (chars.get(i), chars.get(i + 1)) {
        (Some('r'), _) => i + 1,
        (Some('b'), Some('r')) => i + 2,
        _ => return None,
    };
    while chars.get(j) == Some(&'#') {
        j += 1;
    }
    (chars.get(j) == Some(&'"')).then_some(j)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident(String),
    /// `::`
    PathSep,
    Punct(char),
}

/// Tokens with their 1-based line.
fn tokenize(code: &str) -> Vec<(Tok, usize)> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push((Tok::Ident(chars[start..i].iter().collect()), line));
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push((Tok::PathSep, line));
            i += 2;
        } else {
            out.push((Tok::Punct(c), line));
            i += 1;
        }
    }
    out
}

fn is(t: Option<&(Tok, usize)>, want: &str) -> bool {
    match t {
        Some((Tok::Ident(s), _)) => s == want,
        Some((Tok::Punct(c), _)) => want.len() == 1 && want.starts_with(*c),
        Some((Tok::PathSep, _)) => want == "::",
        None => false,
    }
}

/// Index just past the bracket group that opens at `i` (`(`, `[` or `{`).
fn skip_group(tokens: &[(Tok, usize)], i: usize) -> usize {
    let mut depth = 0usize;
    let mut j = i;
    while j < tokens.len() {
        match tokens[j].0 {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    j
}

/// The tokens without `#[cfg(test)]` modules, and the names of the
/// `#[cfg(test)] mod x;` declared in other files.
fn without_test_modules(tokens: &[(Tok, usize)]) -> (Vec<(Tok, usize)>, Vec<String>) {
    let cfg_test = ["#", "[", "cfg", "(", "test", ")", "]"];
    let mut out = Vec::with_capacity(tokens.len());
    let mut files = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if cfg_test
            .iter()
            .enumerate()
            .all(|(k, w)| is(tokens.get(i + k), w))
        {
            let mut j = i + cfg_test.len();
            // Further attributes, then a visibility.
            while is(tokens.get(j), "#") && is(tokens.get(j + 1), "[") {
                j = skip_group(tokens, j + 1);
            }
            if is(tokens.get(j), "pub") {
                j += 1;
                if is(tokens.get(j), "(") {
                    j = skip_group(tokens, j);
                }
            }
            if is(tokens.get(j), "mod")
                && let Some((Tok::Ident(name), _)) = tokens.get(j + 1)
            {
                if is(tokens.get(j + 2), "{") {
                    i = skip_group(tokens, j + 2);
                    continue;
                }
                if is(tokens.get(j + 2), ";") {
                    files.push(name.clone());
                    i = j + 3;
                    continue;
                }
            }
        }
        out.push(tokens[i].clone());
        i += 1;
    }
    (out, files)
}

/// The first identifier of each item of the `{…}` group opening at `i`,
/// with its line (`self` and globs left out).
fn group_heads(tokens: &[(Tok, usize)], i: usize) -> Vec<(String, usize)> {
    let end = skip_group(tokens, i);
    let mut out = Vec::new();
    let mut depth = 0;
    let mut expect_head = false;
    for (tok, line) in &tokens[i..end] {
        match tok {
            Tok::Punct('{') => {
                depth += 1;
                expect_head = depth == 1;
            }
            Tok::Punct('}') => depth -= 1,
            Tok::Punct(',') if depth == 1 => expect_head = true,
            Tok::Ident(name) if expect_head => {
                if name != "self" {
                    out.push((name.clone(), *line));
                }
                expect_head = false;
            }
            _ => expect_head = false,
        }
    }
    out
}

/// The names that paths from the crate root name in this file, with their
/// lines: `crate::x`, `crate::{x, y}`, and `super::…::x` whose `super`s
/// reach the root from a file at module depth `depth`.
fn references(tokens: &[(Tok, usize)], depth: usize) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    // Brace depths at which inline `mod x {` blocks close.
    let mut inline_mods: Vec<usize> = Vec::new();
    let mut braces = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i].0 {
            Tok::Punct('{') => braces += 1,
            Tok::Punct('}') => {
                braces = braces.saturating_sub(1);
                if inline_mods.last() == Some(&braces) {
                    inline_mods.pop();
                }
            }
            Tok::Ident(word) if word == "mod" => {
                if let Some((Tok::Ident(_), _)) = tokens.get(i + 1)
                    && is(tokens.get(i + 2), "{")
                {
                    inline_mods.push(braces);
                }
            }
            Tok::Ident(word) if word == "crate" || word == "super" => {
                let starts_path = i == 0 || !matches!(tokens[i - 1].0, Tok::PathSep);
                let mut j = i;
                let at_root = if word == "crate" {
                    j += 1;
                    true
                } else {
                    let mut supers = 0;
                    while is(tokens.get(j), "super") && is(tokens.get(j + 1), "::") {
                        supers += 1;
                        j += 2;
                    }
                    if supers == 0 {
                        // `pub(super)`
                        i += 1;
                        continue;
                    }
                    j -= 1;
                    supers == depth + inline_mods.len()
                };
                if starts_path && at_root && is(tokens.get(j), "::") {
                    match tokens.get(j + 1) {
                        Some((Tok::Ident(name), line)) => out.push((name.clone(), *line)),
                        Some((Tok::Punct('{'), _)) => out.extend(group_heads(tokens, j + 1)),
                        _ => {}
                    }
                }
                i = j + 1;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The names the crate root's `use` items bring in from its own modules:
/// name → module (`pub use lab::{Lab, Wan}` gives Lab → lab, Wan → lab).
fn reexports(tokens: &[(Tok, usize)], modules: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut braces = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i].0 {
            Tok::Punct('{') => braces += 1,
            Tok::Punct('}') => braces = braces.saturating_sub(1),
            Tok::Ident(word) if word == "use" && braces == 0 => {
                let end = (i..tokens.len())
                    .find(|&k| is(tokens.get(k), ";"))
                    .unwrap_or(tokens.len());
                let mut path = &tokens[i + 1..end];
                while matches!(path.first(), Some((Tok::Ident(s), _)) if s == "self" || s == "crate")
                    || is(path.first(), "::")
                {
                    path = &path[1..];
                }
                if let Some((Tok::Ident(module), _)) = path.first()
                    && modules.contains(module)
                {
                    for name in leaves(path) {
                        out.insert(name, module.clone());
                    }
                }
                i = end;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// The names a use tree binds: the last segment of each path, or its
/// `as` alias.
fn leaves(tree: &[(Tok, usize)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut last: Option<String> = None;
    let mut k = 0;
    while k < tree.len() {
        match &tree[k].0 {
            Tok::Ident(s) if s == "as" => {
                if let Some((Tok::Ident(alias), _)) = tree.get(k + 1) {
                    last = Some(alias.clone());
                    k += 1;
                }
            }
            Tok::Ident(s) => last = Some(s.clone()),
            Tok::Punct(',' | '}') => {
                out.extend(last.take());
            }
            Tok::Punct('{') | Tok::PathSep => last = None,
            _ => {}
        }
        k += 1;
    }
    out.extend(last);
    out
}

#[cfg(test)]
mod parser {
    use super::*;

    fn graph(files: &[(&str, &str)]) -> Graph {
        let sources: Vec<Source> = files
            .iter()
            .map(|(path, text)| Source {
                path: (*path).to_owned(),
                text: (*text).to_owned(),
            })
            .collect();
        Graph::of_sources(&sources)
    }

    fn edges(g: &Graph) -> Vec<(String, String)> {
        g.edges
            .iter()
            .flat_map(|(a, tos)| tos.keys().map(move |b| (a.clone(), b.clone())))
            .collect()
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn a_cycle_is_found_and_named_with_its_lines() {
        let g = graph(&[
            ("lib.rs", "mod a; mod b; mod c;"),
            ("a.rs", "use crate::b::Thing;\n"),
            ("b/mod.rs", "mod inner;\n"),
            ("b/inner.rs", "\n\nfn f() { crate::c::go() }\n"),
            ("c.rs", "use crate::{\n    x::Y,\n    a::{self, Z},\n};\n"),
        ]);
        assert_eq!(edges(&g), pairs(&[("a", "b"), ("b", "c"), ("c", "a")]));
        let report = g.cycles_report();
        assert!(report.contains("cycle: a → b → c → a"), "{report}");
        assert!(report.contains("a → b: a.rs:1"), "{report}");
        assert!(report.contains("b → c: b/inner.rs:3"), "{report}");
        assert!(report.contains("c → a: c.rs:3"), "{report}");
    }

    #[test]
    fn a_dag_passes() {
        let g = graph(&[
            ("lib.rs", "pub mod a; pub mod b; mod c;"),
            ("a.rs", "use crate::b; use crate::c::X;"),
            ("b.rs", "use crate::c::{X, Y};"),
            ("c.rs", "use std::fmt; pub(crate) struct X;"),
        ]);
        assert_eq!(edges(&g), pairs(&[("a", "b"), ("a", "c"), ("b", "c")]));
        assert_eq!(g.cycles_report(), "");
        assert_eq!(g.render(), "  a -> b, c\n  b -> c\n  c -> \n");
    }

    #[test]
    fn comments_strings_and_test_modules_are_ignored() {
        let g = graph(&[
            ("lib.rs", "mod a; mod b;"),
            (
                "a.rs",
                r##"
                //! Uses [`crate::b`] in prose only.
                /// See [`crate::b::Thing`].
                // crate::b
                /* crate::b /* nested crate::b */ crate::b */
                const S: &str = "crate::b::x";
                const R: &str = r#"crate::b "quoted" crate::b"#;
                const C: char = '"';
                fn f<'a>(x: &'a str) -> &'a str { x }
                #[cfg(test)]
                #[allow(clippy::unwrap_used)]
                mod tests {
                    use crate::b::Thing;
                    mod deeper { fn g() { crate::b::h() } }
                }
                #[cfg(test)]
                mod more;
                "##,
            ),
            ("a/more.rs", "use crate::b::Thing;"),
            ("b.rs", "use crate::a::Y;"),
        ]);
        assert_eq!(edges(&g), pairs(&[("b", "a")]));
        assert_eq!(g.cycles_report(), "");
    }

    #[test]
    fn super_paths_and_root_reexports_count_when_they_reach_another_module() {
        let g = graph(&[
            (
                "lib.rs",
                "mod error; mod lab; mod wire;\npub use error::Error;\npub use lab::{Lab, Wan as Link};\npub use other_crate::keys;",
            ),
            ("error.rs", "pub struct Error;"),
            // From a folder's mod.rs, `super` is the crate root.
            ("lab/mod.rs", "mod part; use super::error;"),
            // One level deeper, `super` is lab itself; two reach the root.
            (
                "lab/part.rs",
                "use super::Lab; fn f() { super::super::wire::go() }",
            ),
            // Root re-exports name the module they come from; an inline
            // module adds a level; other crates' names are not modules.
            (
                "wire.rs",
                "use crate::{Error, Link, keys}; mod inner { use super::super::lab; use super::Wire; }",
            ),
        ]);
        assert_eq!(
            edges(&g),
            pairs(&[
                ("lab", "error"),
                ("lab", "wire"),
                ("wire", "error"),
                ("wire", "lab"),
            ])
        );
        let report = g.cycles_report();
        assert!(report.contains("cycle: lab → wire → lab"), "{report}");
        assert!(report.contains("lab → wire: lab/part.rs:1"), "{report}");
    }

    #[test]
    fn layers_can_be_enforced_once_listed() {
        let g = graph(&[
            ("lib.rs", ""),
            ("packet.rs", ""),
            ("peer.rs", "use crate::packet;"),
            ("datapath.rs", "use crate::{peer, packet};"),
        ]);
        assert_eq!(g.layer_violations(&[]), "");
        assert_eq!(
            g.layer_violations(&[&["packet"], &["peer"], &["datapath"]]),
            ""
        );
        let wrong = g.layer_violations(&[&["peer"], &["packet", "datapath"]]);
        assert!(
            wrong.contains("peer (layer 0) uses packet (layer 1): peer.rs:1"),
            "{wrong}"
        );
    }
}
