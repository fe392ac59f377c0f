//! Memory that fits the container: the agent reads the memory limit its
//! cgroup puts on it (cgroup v2 `memory.max`, or the v1 memory
//! controller's `memory.limit_in_bytes`, where a hybrid host and
//! containerd on it apply the DaemonSet's limit), the tightest of its
//! cgroup and every ancestor, and derives the admission budgets from it —
//! so a node full of connections is refused work, never OOM-killed.
//!
//! The cost per connection is what the proxy holds for one: its task and
//! sockets while idle (no relay buffer: buffers are taken only while data
//! moves, see `proxy::relay`), plus the two buffers while it moves data.
//! The figures are measured (`cargo xtask soak` prints them); the
//! derivation keeps a margin over them.
use std::path::{Path, PathBuf};

/// What the agent itself needs beyond its connections: the state store,
/// the API server's caches, TLS, the runtime.
pub const BASE_BYTES: u64 = 96 << 20;

/// What one open connection may hold at once besides its relay buffers:
/// its task, two sockets' kernel and user state (an idle one measures
/// under 8 KiB; see the README's soak table).
pub const CONNECTION_BYTES: u64 = 16 << 10;

/// Without a limit, or with flags that say so: the budgets of old.
pub const DEFAULT_CONNECTIONS: usize = 20_000;

/// The fewest connections a derived budget allows (a tiny limit still
/// proxies something).
const MIN_CONNECTIONS: usize = 256;

/// The agent's memory limit and where it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    /// The file that said it.
    pub file: PathBuf,
}

/// The node's budgets, as derived (or as the flags set them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budgets {
    pub connections: usize,
    pub requests: usize,
    /// The limit they were derived from, if any.
    pub limit: Option<MemoryLimit>,
    /// Bytes of relay buffers allowed at once (the rest of the memory
    /// after the base and the connections' own).
    pub buffer_bytes: u64,
}

impl Budgets {
    /// Budgets under `limit` with relay buffers of `buffer_size`; a flag's
    /// value (`Some`) is taken as it is.
    pub fn derive(
        limit: Option<MemoryLimit>,
        buffer_size: usize,
        connections: Option<usize>,
        requests: Option<usize>,
    ) -> Self {
        let Some(l) = &limit else {
            let connections = connections.unwrap_or(DEFAULT_CONNECTIONS);
            return Self {
                connections,
                requests: requests.unwrap_or(connections),
                limit,
                buffer_bytes: u64::MAX,
            };
        };
        // Half of what is left after the base for the connections' own
        // state, half for the buffers of those moving data.
        let spare = l.bytes.saturating_sub(BASE_BYTES);
        let derived = usize::try_from(spare / 2 / CONNECTION_BYTES)
            .unwrap_or(usize::MAX)
            .clamp(MIN_CONNECTIONS, 1 << 20);
        let connections = connections.unwrap_or(derived);
        let buffer_bytes = (spare / 2).max(2 * buffer_size as u64 * 64);
        Self {
            connections,
            requests: requests.unwrap_or(connections),
            limit,
            buffer_bytes,
        }
    }
}

/// Arenas glibc's allocator may make (one per thread by default, up to
/// eight per core: memory freed in one is not reused by another).
#[cfg(target_env = "gnu")]
const ARENAS: libc::c_int = 2;

/// Sets the allocator up to give memory back: few arenas (so what one
/// connection's task freed serves the next), set before the runtime's
/// threads start.
#[allow(unsafe_code)] // two libc calls that take and return plain integers
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a parameter of the allocator.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// Returns the free memory at the top of the allocator's heaps to the
/// kernel (after many connections closed: their pages stay resident
/// otherwise).
#[allow(unsafe_code)] // one libc call that takes and returns an integer
pub fn give_back() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The agent's own memory limit: the tightest of its cgroup's and its
/// ancestors', v2 first, then the v1 memory controller. `None`: no limit.
pub fn own_limit() -> Option<MemoryLimit> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let (v2, v1) = cgroup_paths(&cgroups);
    let (v2_mount, v1_mount) = mount_points(&mounts);
    let mut found = None;
    if let (Some(path), Some(mount)) = (v2, v2_mount) {
        found = tightest(&mount, &path, "memory.max");
    }
    if let (Some(path), Some(mount)) = (v1, v1_mount) {
        let v1 = tightest(&mount, &path, "memory.limit_in_bytes");
        found = match (found, v1) {
            (Some(a), Some(b)) => Some(if b.bytes < a.bytes { b } else { a }),
            (a, b) => a.or(b),
        };
    }
    found
}

/// The agent's cgroup paths from `/proc/self/cgroup`: (v2, v1 memory).
fn cgroup_paths(text: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    let mut v2 = None;
    let mut v1 = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if controllers.is_empty() {
            v2 = Some(PathBuf::from(path));
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(PathBuf::from(path));
        }
    }
    (v2, v1)
}

/// Where the v2 hierarchy and the v1 memory controller are mounted.
fn mount_points(text: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    let mut v2 = None;
    let mut v1 = None;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, dir, fstype, options, ..] = fields[..] else {
            continue;
        };
        match fstype {
            "cgroup2" if v2.is_none() => v2 = Some(PathBuf::from(dir)),
            "cgroup" if options.split(',').any(|o| o == "memory") => {
                v1 = Some(PathBuf::from(dir));
            }
            _ => {}
        }
    }
    (v2, v1)
}

/// The smallest limit in `file` from `mount`/`path` up to `mount`.
fn tightest(mount: &Path, path: &Path, file: &str) -> Option<MemoryLimit> {
    let relative = path.strip_prefix("/").unwrap_or(path);
    let mut dir = mount.join(relative);
    let mut best: Option<MemoryLimit> = None;
    loop {
        let at = dir.join(file);
        if let Some(bytes) = std::fs::read_to_string(&at)
            .ok()
            .and_then(|t| parse_limit(&t))
            && best.as_ref().is_none_or(|b| bytes < b.bytes)
        {
            best = Some(MemoryLimit { bytes, file: at });
        }
        if dir == mount || !dir.pop() || !dir.starts_with(mount) {
            return best;
        }
    }
}

/// A limit file's value: `max` (v2) or a number near `i64::MAX` (v1's
/// "none", rounded to pages) mean no limit.
fn parse_limit(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "max" {
        return None;
    }
    let bytes: u64 = text.parse().ok()?;
    (bytes < (1 << 60)).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hybrid_hosts_paths_and_mounts() {
        let cgroups = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/x.slice/y\n";
        let (v2, v1) = cgroup_paths(cgroups);
        assert_eq!(v2, Some(PathBuf::from("/x.slice/y")));
        assert_eq!(v1, Some(PathBuf::from("/process_api/abc")));
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
            cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0\n\
            cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
            cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";
        let (v2m, v1m) = mount_points(mounts);
        assert_eq!(v2m, Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(v1m, Some(PathBuf::from("/sys/fs/cgroup/memory")));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("536870912\n"), Some(512 << 20));
        assert_eq!(parse_limit("garbage"), None);
    }

    #[test]
    fn the_tightest_ancestor_wins() {
        let dir = std::env::temp_dir().join(format!("nodemesh-memory-{}", std::process::id()));
        let leaf = dir.join("a/b");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(dir.join("memory.max"), "max\n").unwrap();
        std::fs::write(dir.join("a/memory.max"), "1048576\n").unwrap();
        std::fs::write(leaf.join("memory.max"), "4194304\n").unwrap();
        let found = tightest(&dir, Path::new("/a/b"), "memory.max").unwrap();
        assert_eq!(found.bytes, 1 << 20);
        assert_eq!(found.file, dir.join("a/memory.max"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn budgets_from_the_daemonsets_limit() {
        let limit = MemoryLimit {
            bytes: 512 << 20,
            file: PathBuf::from("memory.limit_in_bytes"),
        };
        let b = Budgets::derive(Some(limit.clone()), 128 << 10, None, None);
        // (512 - 96) MiB / 2 / 16 KiB.
        assert_eq!(b.connections, 13_312);
        assert_eq!(b.requests, b.connections);
        assert_eq!(b.buffer_bytes, 208 << 20);
        // Flags win; no limit: the old defaults.
        let b = Budgets::derive(Some(limit), 128 << 10, Some(100), Some(7));
        assert_eq!((b.connections, b.requests), (100, 7));
        let b = Budgets::derive(None, 128 << 10, None, None);
        assert_eq!(b.connections, DEFAULT_CONNECTIONS);
        // A tiny limit still proxies something.
        let tiny = MemoryLimit {
            bytes: 64 << 20,
            file: PathBuf::new(),
        };
        assert_eq!(
            Budgets::derive(Some(tiny), 128 << 10, None, None).connections,
            MIN_CONNECTIONS
        );
    }
}
