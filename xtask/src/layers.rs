//! `cargo xtask layers`: the dependency rules of docs/architecture.md,
//! checked on the code as it is (part of `cargo xtask test`).
//!
//! 1. Crates: `nodemesh-core` depends on no other nodemesh crate;
//!    `nodemesh-cli` and `nodemesh-identity` only on the core;
//!    `nodemesh-dataplane` on the core and the eBPF types only.
//! 2. Modules of the data plane point down only: a module uses `crate::X`
//!    only for an `X` in a lower layer (so no circles, and nothing below
//!    the proxy imports it); inside the proxy, the stages likewise.
//! 3. `unsafe` is allowed only in the modules that make syscalls by hand.
//!
//! Imports are read as text (`crate::…`, `super::…`, `self::…` paths),
//! which is what the rules are about.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// Layers of `nodemesh-dataplane`, top first: a module may use the ones
/// below its own layer.
const LAYERS: &[&[&str]] = &[
    &["app"],
    // The tap port serves the admin routes over mutual TLS.
    &["tapport"],
    &["admin", "capture"],
    &["proxy"],
    &["discovery", "identity"],
    &["state"],
    &["redirect"],
    &[
        "telemetry",
        "netns",
        "cgroup",
        "config",
        "sockdiag",
        "memory",
    ],
];

/// Stages of `proxy`, top first (`proxy` itself may use all of them).
const PROXY_LAYERS: &[&[&str]] = &[
    &["outbound"],
    &["inbound"],
    &["tunnel"],
    // What both sides' HTTP paths share (over the balancer's load).
    &["http"],
    &[
        "accept", "balance", "connect", "detect", "orig_dst", "pods", "relay",
    ],
    // What every door takes a ticket from.
    &["admission"],
];

/// Which nodemesh crates each crate may depend on.
const CRATES: &[(&str, &[&str])] = &[
    ("nodemesh-core", &[]),
    ("nodemesh-cli", &["nodemesh-core"]),
    ("nodemesh-identity", &["nodemesh-core"]),
    ("nodemesh-dataplane", &["nodemesh-core", "nodemesh-common"]),
];

/// The only files that may allow `unsafe` (each says why).
const UNSAFE_ALLOWED: &[&str] = &[
    "agent/dataplane/build.rs",
    // Two glibc allocator calls (mallopt, malloc_trim).
    "agent/dataplane/src/memory.rs",
    "agent/dataplane/src/netns.rs",
    "agent/dataplane/src/redirect/logs.rs",
    "agent/dataplane/src/redirect/sys.rs",
    "tests/src/mesh.rs",
    "tests/src/sys.rs",
];

pub fn run(workspace: &Path) -> Result<()> {
    let mut problems = crates(workspace)?;
    problems.extend(modules(&workspace.join("agent/dataplane/src"))?);
    problems.extend(unsafe_code(workspace)?);
    if !problems.is_empty() {
        bail!(
            "the dependency rules (docs/architecture.md) are broken:\n  {}",
            problems.join("\n  ")
        );
    }
    println!(
        "layers: crates one way (core ← cli, identity, dataplane); {} data-plane layers and {} proxy stages point down only; unsafe only in {} files",
        LAYERS.len(),
        PROXY_LAYERS.len(),
        UNSAFE_ALLOWED.len()
    );
    Ok(())
}

/// Rule 1, from `cargo metadata`.
fn crates(workspace: &Path) -> Result<Vec<String>> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace)
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("cargo metadata's output")?;
    let mut problems = Vec::new();
    let packages = meta["packages"].as_array().cloned().unwrap_or_default();
    for (name, allowed) in CRATES {
        let Some(pkg) = packages.iter().find(|p| p["name"] == *name) else {
            problems.push(format!("crate {name} is missing from the workspace"));
            continue;
        };
        for dep in pkg["dependencies"].as_array().into_iter().flatten() {
            let dep_name = dep["name"].as_str().unwrap_or_default();
            let normal = dep["kind"].is_null();
            if normal && dep_name.starts_with("nodemesh") && !allowed.contains(&dep_name) {
                problems.push(format!("crate {name} depends on {dep_name}"));
            }
        }
    }
    Ok(problems)
}

/// A module path (`["proxy", "outbound", "tcp"]`) for a file under `src`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The `crate::`/`super::`/`self::` paths a file uses, as module paths:
/// every `use` tree expanded, and every path written in the code.
fn uses(module: &[String], text: &str) -> Vec<Vec<String>> {
    // An inline `mod tests { … }` (by convention last in its file) is a
    // child module: its `super::` is this file's module.
    if let Some(at) = text.find("\nmod tests {") {
        let mut child = module.to_vec();
        child.push("tests".to_owned());
        let mut found = uses_in(module, &text[..at]);
        found.extend(uses_in(&child, &text[at..]));
        return found;
    }
    uses_in(module, text)
}

fn uses_in(module: &[String], text: &str) -> Vec<Vec<String>> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut found = Vec::new();
    // `use` statements, which may group paths in braces.
    for stmt in code.split(';') {
        let stmt = stmt.trim();
        let tree = stmt
            .strip_prefix("pub use ")
            .or_else(|| stmt.strip_prefix("pub(crate) use "))
            .or_else(|| stmt.strip_prefix("pub(super) use "))
            .or_else(|| stmt.strip_prefix("use "))
            .or_else(|| stmt.rsplit_once("\nuse ").map(|(_, t)| t))
            .or_else(|| stmt.rsplit_once("\npub use ").map(|(_, t)| t));
        if let Some(tree) = tree {
            for path in expand(tree) {
                found.extend(resolve(module, &path));
            }
        }
    }
    // Paths written out in the code.
    for prefix in ["crate::", "super::", "self::"] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().last();
            rest = &rest[at..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                rest = &rest[prefix.len()..];
                continue;
            }
            let path: Vec<String> = rest
                .split("::")
                .map(|seg| {
                    seg.chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect::<String>()
                })
                .take_while(|seg| !seg.is_empty())
                .collect();
            found.extend(resolve(module, &path));
            rest = &rest[prefix.len()..];
        }
    }
    found
}

/// The paths of a `use` tree: `a::{b, c::{d, e}}` → `a::b`, `a::c::d`,
/// `a::c::e`.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let mut out = Vec::new();
    expand_into(&tree, &mut Vec::new(), &mut out);
    out
}

fn expand_into(tree: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let Some(open) = tree.find('{') else {
        let mut path = prefix.clone();
        path.extend(
            tree.split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        );
        out.push(path);
        return;
    };
    let head: Vec<String> = tree[..open]
        .split("::")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let inner = tree[open + 1..]
        .strip_suffix('}')
        .unwrap_or(&tree[open + 1..]);
    let n = prefix.len();
    prefix.extend(head);
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                expand_into(&inner[start..i], prefix, out);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < inner.len() {
        expand_into(&inner[start..], prefix, out);
    }
    prefix.truncate(n);
}

/// A path as a module path of this crate (`None` for other crates'),
/// cut at its first item (a type, a function…).
fn resolve(module: &[String], path: &[String]) -> Option<Vec<String>> {
    let (base, rest) = match path.first().map(String::as_str) {
        Some("crate") => (Vec::new(), &path[1..]),
        Some("super") => (
            module[..module.len().saturating_sub(1)].to_vec(),
            &path[1..],
        ),
        Some("self") => (module.to_vec(), &path[1..]),
        _ => return None,
    };
    let mut out = base;
    for seg in rest {
        if seg == "self" || seg == "*" {
            break;
        }
        if seg.starts_with(char::is_uppercase) {
            break;
        }
        out.push(seg.clone());
    }
    Some(out)
}

fn layer_of(layers: &[&[&str]], name: &str) -> Option<usize> {
    layers.iter().position(|l| l.contains(&name))
}

/// Rule 2.
fn modules(src: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    walk(src, &mut files)?;
    for file in files {
        let text = fs::read_to_string(&file)?;
        let module = module_of(src, &file);
        let Some(top) = module.first() else { continue };
        let Some(own) = layer_of(LAYERS, top) else {
            problems.push(format!(
                "module {top} ({}) is in no layer of xtask/src/layers.rs",
                file.display()
            ));
            continue;
        };
        for target in uses(&module, &text) {
            let Some(dst) = target.first() else { continue };
            if dst == top {
                // Inside the proxy, its stages point down too.
                if top == "proxy" && module.len() >= 2 && target.len() >= 2 {
                    let (from, to) = (&module[1], &target[1]);
                    if from != to {
                        match (layer_of(PROXY_LAYERS, from), layer_of(PROXY_LAYERS, to)) {
                            (Some(a), Some(b)) if a < b => {}
                            (Some(_), Some(_)) => problems.push(format!(
                                "proxy::{from} uses proxy::{to}, which is not below it ({})",
                                file.display()
                            )),
                            _ => problems.push(format!(
                                "proxy::{from} or proxy::{to} is in no proxy stage of xtask/src/layers.rs"
                            )),
                        }
                    }
                }
                continue;
            }
            match layer_of(LAYERS, dst) {
                Some(layer) if layer > own => {}
                Some(_) => problems.push(format!(
                    "{} uses crate::{dst}, which is not below it ({})",
                    module.join("::"),
                    file.display()
                )),
                None => {}
            }
        }
    }
    problems.sort();
    problems.dedup();
    Ok(problems)
}

/// Rule 3.
fn unsafe_code(workspace: &Path) -> Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    for dir in ["agent", "tests", "xtask"] {
        walk(&workspace.join(dir), &mut files)?;
    }
    for file in files {
        let rel = file
            .strip_prefix(workspace)
            .unwrap_or(&file)
            .to_string_lossy()
            .into_owned();
        if rel == "xtask/src/layers.rs" {
            continue;
        }
        let text = fs::read_to_string(&file)?;
        let allows = text.matches("allow(unsafe_code)").count();
        if allows > 0 && !UNSAFE_ALLOWED.contains(&rel.as_str()) {
            problems.push(format!(
                "{rel} allows unsafe code: only {} may",
                UNSAFE_ALLOWED.join(", ")
            ));
        }
    }
    Ok(problems)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            walk(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_from_where_they_are_written() {
        let m = |s: &str| s.split("::").map(str::to_owned).collect::<Vec<_>>();
        let found = uses(
            &m("proxy::outbound::tcp"),
            "use super::{Outbound, route::Route};\nuse crate::{\n    state::Pod,\n    proxy::{inbound::{Accepted, Accounting}, relay},\n};\nfn f() { crate::redirect::logs::forward(); }\n",
        );
        for want in [
            "proxy::outbound",
            "proxy::outbound::route",
            "state",
            "proxy::inbound",
            "proxy::relay",
            "redirect::logs::forward",
        ] {
            assert!(found.contains(&m(want)), "{want} not in {found:?}");
        }
        // A test module's `super::` is the file's own module.
        let found = uses(
            &m("proxy::outbound"),
            "use super::route;\n#[cfg(test)]\nmod tests {\n    use super::is_h2;\n}\n",
        );
        assert!(found.contains(&m("proxy::route")), "{found:?}");
        assert!(found.contains(&m("proxy::outbound::is_h2")), "{found:?}");
        assert_eq!(
            module_of(Path::new("/s"), Path::new("/s/proxy/mod.rs")),
            m("proxy")
        );
    }
}
