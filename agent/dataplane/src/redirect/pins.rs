//! What is pinned on bpffs, and where: the layout of one version, adopting
//! pinned links at start, removing other versions, and `cleanup`.
use std::{
    collections::BTreeSet,
    fs::{self, File},
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use nix::{
    fcntl::{Flock, FlockArg},
    mount::{MsFlags, mount},
    sys::statfs::{BPF_FS_MAGIC, statfs},
};
use nodemesh_common as common;
use nodemesh_core::names::PodUid;
use tracing::{debug, info, warn};

use super::{RedirectError, io_err, sys};

/// Where bpffs is mounted on a node.
pub(super) const BPFFS: &str = "/sys/fs/bpf";

/// Pin paths for one layout version.
#[derive(Clone, Debug)]
pub(super) struct Layout {
    pub(super) base: PathBuf,
    pub(super) root: PathBuf,
}

impl Layout {
    pub(super) fn new(base: &Path) -> Self {
        Self {
            base: base.to_owned(),
            root: base.join(format!("v{}", common::LAYOUT_VERSION)),
        }
    }
    pub(super) fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub(super) fn sock_ops_link(&self) -> PathBuf {
        self.root.join("links/sock_ops")
    }
    pub(super) fn pods(&self) -> PathBuf {
        self.root.join("links/pods")
    }
    /// One directory per captured pod, one link pin per pod program.
    pub(super) fn pod_dir(&self, uid: &PodUid) -> PathBuf {
        self.pods().join(uid.as_str())
    }
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub pod_links: usize,
    pub removed: bool,
}

/// Detaches every program and removes every pin under `pin_dir`. Refuses
/// while an agent holds the directory.
pub fn cleanup(pin_dir: &Path) -> Result<CleanupReport, RedirectError> {
    let mut report = CleanupReport::default();
    if !pin_dir.exists() {
        return Ok(report);
    }
    let _lock =
        lock(pin_dir, FlockArg::LockExclusiveNonblock).map_err(|_| RedirectError::Busy {
            path: pin_dir.to_owned(),
        })?;
    let layout = Layout::new(pin_dir);
    report.pod_links = adopted(&layout).len();
    // Unpinning a link that no process holds detaches it; removing a pinned
    // map frees it once no program uses it.
    remove_pins(pin_dir)?;
    report.removed = true;
    Ok(report)
}

/// Removes the pinned objects and directories under `dir`, then `dir`.
pub(super) fn remove_pins(dir: &Path) -> Result<(), RedirectError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("cannot remove", dir)(e)),
    }
}

pub(super) fn adopted(layout: &Layout) -> BTreeSet<PodUid> {
    fs::read_dir(layout.pods())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| PodUid::new(&e.file_name().to_string_lossy()).ok())
        .collect()
}

pub(super) fn remove_other_layouts(layout: &Layout) {
    let Ok(entries) = fs::read_dir(&layout.base) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path != layout.root && name.starts_with('v') && name[1..].parse::<u32>().is_ok() {
            match remove_pins(&path) {
                Ok(()) => {
                    info!(pins = %path.display(), "eBPF state of another layout version removed")
                }
                Err(e) => warn!(pins = %path.display(), error = %e, "cannot remove old eBPF state"),
            }
        }
    }
}

/// If a link is pinned at `path` and attached to cgroup `cgroup_id`, make it
/// run `prog` and return true. A link pinned for another cgroup is removed.
pub(super) fn update_pinned_link(
    path: &Path,
    prog: std::os::fd::BorrowedFd<'_>,
    cgroup_id: u64,
) -> Result<bool, RedirectError> {
    let Ok(link) = sys::obj_get(path) else {
        return Ok(false);
    };
    match sys::link_cgroup_id(link.as_fd()) {
        Ok(id) if id == cgroup_id => {
            sys::link_update(link.as_fd(), prog).map_err(io_err("cannot update link", path))?;
            debug!(pin = %path.display(), "link adopted");
            Ok(true)
        }
        _ => {
            warn!(pin = %path.display(), "pinned link belongs to another cgroup; replacing it");
            fs::remove_file(path).map_err(io_err("cannot unpin", path))?;
            Ok(false)
        }
    }
}

/// Locks the pin directory (`flock` works on directories).
pub(super) fn lock(dir: &Path, arg: FlockArg) -> Result<Flock<File>, RedirectError> {
    let file = File::open(dir).map_err(io_err("cannot open", dir))?;
    Flock::lock(file, arg).map_err(|(_, errno)| RedirectError::Io {
        what: "cannot lock",
        path: dir.to_owned(),
        source: errno.into(),
    })
}

/// Makes sure `pin_dir` is on bpffs, mounting one at /sys/fs/bpf if that is
/// where it belongs and nothing is mounted there yet.
pub(super) fn ensure_bpffs(pin_dir: &Path) -> Result<(), RedirectError> {
    let on_bpffs = |p: &Path| statfs(p).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if on_bpffs(existing) {
        return Ok(());
    }
    let bpffs = Path::new(BPFFS);
    if pin_dir.starts_with(bpffs) && !on_bpffs(bpffs) {
        fs::create_dir_all(bpffs).map_err(io_err("cannot create", bpffs))?;
        mount(
            Some("bpf"),
            bpffs,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| RedirectError::Mount { source })?;
        info!(path = BPFFS, "mounted bpffs");
        return Ok(());
    }
    Err(RedirectError::NotBpffs {
        path: pin_dir.to_owned(),
    })
}
