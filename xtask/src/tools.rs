// Where nodemesh keeps the tools it builds (bpf-linker, kube-apiserver):
// the one definition, `include!`d by xtask, agent/dataplane/build.rs and
// the test bed, which cannot share a crate.

/// The tools directory: `$NODEMESH_TOOLS`, else
/// `$XDG_CACHE_HOME/nodemesh/tools`, else `~/.cache/nodemesh/tools`
/// (outside `target/`, so `cargo clean` keeps it).
pub fn tools_dir() -> std::path::PathBuf {
    use std::{env, path::PathBuf};
    if let Some(dir) = env::var_os("NODEMESH_TOOLS") {
        return PathBuf::from(dir);
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    cache.join("nodemesh").join("tools")
}

/// The kube-apiserver version the tests run (the newest Debian builds from
/// source).
#[allow(dead_code)]
pub const KUBE_VERSION: &str = "1.20.2";
/// What changed in the build: `reflect2`, Debian's 1.0.2 replacing the
/// vendored 1.0.1, whose map iteration faults under Go 1.18+ (the API
/// server died on its first custom resource). A new value rebuilds.
pub const KUBE_BUILD: &str = "reflect2-1.0.2";

/// Where the built Kubernetes binaries live.
#[allow(dead_code)]
pub fn kube_bin_dir() -> std::path::PathBuf {
    tools_dir().join(format!("kube-{KUBE_VERSION}-{KUBE_BUILD}"))
}
