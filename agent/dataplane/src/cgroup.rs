//! cgroup v2: finding the hierarchy, opening a pod's cgroup, and the
//! processes inside it.
//!
//! eBPF programs attach to cgroup directories and match sockets by the cgroup
//! of the process that made them; a cgroup's id is its directory's inode.
use std::{
    fs::{self, File},
    io,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy in /proc/self/mountinfo: is cgroup v2 mounted?")]
    NoHierarchy,
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cgroup {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("{path} is not on a cgroup v2 file system: is cgroup v2 mounted there?")]
    NotCgroup2 { path: PathBuf },
    #[error("cgroup path {path:?} must stay inside the cgroup root {root}")]
    Escapes { path: PathBuf, root: PathBuf },
    #[error("no process runs in cgroup {path} yet")]
    Empty { path: PathBuf },
    #[error(
        "no kubelet cgroup for pod {uid} under {root} yet (tried {tried} layouts: systemd and cgroupfs drivers, each QoS class)"
    )]
    NoPodCgroup {
        uid: String,
        root: PathBuf,
        tried: usize,
    },
}

/// One mount of the cgroup v2 hierarchy: where, and which of its
/// directories is mounted there (`/` for the whole hierarchy; a container
/// may get a subtree, e.g. a hostPath of the kubelet's cgroup root).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cgroup2Mount {
    mountpoint: PathBuf,
    root: PathBuf,
}

fn read_mountinfo() -> Result<String, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`
/// (a mount of the whole hierarchy first).
pub fn find_cgroup2_mount() -> Result<PathBuf, CgroupError> {
    let mounts = parse_cgroup2_mounts(&read_mountinfo()?);
    mounts
        .iter()
        .find(|m| m.root == Path::new("/"))
        .or(mounts.first())
        .map(|m| m.mountpoint.clone())
        .ok_or(CgroupError::NoHierarchy)
}

/// Every `cgroup2` mount in mountinfo text, in order.
fn parse_cgroup2_mounts(mountinfo: &str) -> Vec<Cgroup2Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // id parent major:minor root mountpoint options... - fstype source superopts
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            let mut fields = left.split_whitespace();
            let root = fields.nth(3)?;
            let mountpoint = fields.next()?;
            Some(Cgroup2Mount {
                mountpoint: PathBuf::from(unescape_mountinfo(mountpoint)),
                root: PathBuf::from(unescape_mountinfo(root)),
            })
        })
        .collect()
}

#[cfg(test)]
fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    parse_cgroup2_mounts(mountinfo)
        .into_iter()
        .next()
        .map(|m| m.mountpoint)
}

/// Where the cgroup at `path` (as `/proc/self/cgroup` names it) is, under
/// whichever mount holds it.
fn locate(mounts: &[Cgroup2Mount], path: &Path) -> Vec<PathBuf> {
    mounts
        .iter()
        .filter_map(|m| {
            let rest = path.strip_prefix(&m.root).ok()?;
            Some(m.mountpoint.join(rest))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| {
                d.iter()
                    .fold(0u8, |acc, b| acc.wrapping_mul(8).wrapping_add(b - b'0'))
            });
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An open cgroup v2 directory.
#[derive(Debug)]
pub struct CgroupDir {
    path: PathBuf,
    dir: File,
    id: u64,
}

impl CgroupDir {
    /// Opens `path`, which must be a directory on cgroup v2.
    pub fn open(path: &Path) -> Result<Self, CgroupError> {
        let dir = File::open(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => CgroupError::NotFound {
                path: path.to_owned(),
            },
            _ => CgroupError::Read {
                path: path.to_owned(),
                source,
            },
        })?;
        let fs = statfs(path).map_err(|e| CgroupError::Read {
            path: path.to_owned(),
            source: e.into(),
        })?;
        if fs.filesystem_type() != CGROUP2_SUPER_MAGIC {
            return Err(CgroupError::NotCgroup2 {
                path: path.to_owned(),
            });
        }
        let meta = dir.metadata().map_err(|source| CgroupError::Read {
            path: path.to_owned(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(CgroupError::NotFound {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            path: path.to_owned(),
            id: meta.ino(),
            dir,
        })
    }

    /// Opens `relative` under this cgroup, refusing paths that leave it.
    pub fn open_child(&self, relative: &Path) -> Result<Self, CgroupError> {
        let joined = if relative.is_absolute() {
            relative.to_owned()
        } else {
            self.path.join(relative)
        };
        let escapes = !joined.starts_with(&self.path)
            || joined
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir));
        if escapes {
            return Err(CgroupError::Escapes {
                path: relative.to_owned(),
                root: self.path.clone(),
            });
        }
        Self::open(&joined)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id (what `bpf_get_current_cgroup_id` returns).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn file(&self) -> &File {
        &self.dir
    }

    /// Processes that may be the pod's sandbox, likeliest first: the first
    /// process of each container cgroup that is none of `containers`
    /// (their runtime ids: the sandbox is the one the pod's status never
    /// lists), oldest first. Never just any process below the pod: a
    /// container that made a network namespace of its own must not be
    /// taken for the pod (the caller checks the netns holds the pod's
    /// addresses).
    pub fn sandbox_candidates(&self, containers: &[String]) -> Result<Vec<u32>, CgroupError> {
        let mut dirs: Vec<(i64, u64, PathBuf)> = fs::read_dir(&self.path)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter(|e| {
                        let name = e.file_name();
                        let name = name.to_string_lossy();
                        !containers.iter().any(|id| name.contains(id.as_str()))
                    })
                    .filter_map(|e| {
                        let meta = e.metadata().ok()?;
                        Some((meta.ctime(), meta.ino(), e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        dirs.sort();
        let pids: Vec<u32> = dirs
            .iter()
            .filter_map(|(_, _, dir)| {
                fs::read_to_string(dir.join("cgroup.procs"))
                    .ok()?
                    .lines()
                    .find_map(|l| l.trim().parse::<u32>().ok())
            })
            .collect();
        if pids.is_empty() {
            return Err(CgroupError::Empty {
                path: self.path.clone(),
            });
        }
        Ok(pids)
    }
}

/// A pod's Kubernetes QoS class: it decides where kubelet puts the pod's
/// cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// From `status.qosClass`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Guaranteed" => Some(Self::Guaranteed),
            "Burstable" => Some(Self::Burstable),
            "BestEffort" => Some(Self::BestEffort),
            _ => None,
        }
    }
}

/// Where kubelet puts the cgroup of the pod with `uid`, relative to its
/// cgroup root: both cgroup drivers (systemd, cgroupfs), the given QoS class
/// or, when unknown, every class. The first that exists is the pod's.
pub fn kubelet_pod_cgroups(uid: &str, qos: Option<QosClass>) -> Vec<PathBuf> {
    let classes = match qos {
        Some(q) => vec![q],
        None => vec![
            QosClass::Burstable,
            QosClass::BestEffort,
            QosClass::Guaranteed,
        ],
    };
    let systemd_uid = uid.replace('-', "_");
    let mut paths = Vec::new();
    for class in classes {
        // systemd driver: slices, with '-' in the uid escaped as '_'.
        paths.push(PathBuf::from(match class {
            QosClass::Guaranteed => format!("kubepods.slice/kubepods-pod{systemd_uid}.slice"),
            QosClass::Burstable => format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{systemd_uid}.slice"
            ),
            QosClass::BestEffort => format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{systemd_uid}.slice"
            ),
        }));
        // cgroupfs driver: plain directories.
        paths.push(PathBuf::from(match class {
            QosClass::Guaranteed => format!("kubepods/pod{uid}"),
            QosClass::Burstable => format!("kubepods/burstable/pod{uid}"),
            QosClass::BestEffort => format!("kubepods/besteffort/pod{uid}"),
        }));
    }
    paths
}

/// The cgroup of the calling process, as an open directory.
pub fn own_cgroup() -> Result<CgroupDir, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_owned(),
        source,
    })?;
    let own = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CgroupError::NoHierarchy)?;
    let candidates = locate(
        &parse_cgroup2_mounts(&read_mountinfo()?),
        Path::new(own.trim()),
    );
    let mut last = CgroupError::NoHierarchy;
    for candidate in candidates {
        match CgroupDir::open(&candidate) {
            Ok(dir) => return Ok(dir),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
35 33 0:30 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory
";

    #[test]
    fn finds_the_cgroup2_mount_in_a_hybrid_layout() {
        assert_eq!(
            parse_cgroup2_mount(MOUNTINFO),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_cgroup2_line_means_none() {
        assert_eq!(
            parse_cgroup2_mount("35 33 0:30 / /x rw - cgroup cgroup rw\n"),
            None
        );
    }

    #[test]
    fn a_process_cgroup_is_found_under_a_mount_of_a_subtree() {
        // A container: the v2 hierarchy's /k8s subtree at /host/cgroup.
        let info = "\
40 30 0:29 /k8s /host/cgroup ro,relatime - cgroup2 cgroup2 rw
41 30 0:29 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        let mounts = parse_cgroup2_mounts(info);
        assert_eq!(
            locate(&mounts, Path::new("/k8s/kubepods/besteffort/pod1/c1")),
            vec![
                PathBuf::from("/host/cgroup/kubepods/besteffort/pod1/c1"),
                PathBuf::from("/sys/fs/cgroup/unified/k8s/kubepods/besteffort/pod1/c1"),
            ]
        );
        assert_eq!(
            locate(&mounts, Path::new("/other/x")),
            vec![PathBuf::from("/sys/fs/cgroup/unified/other/x")]
        );
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    #[test]
    fn kubelet_layouts_for_every_driver_and_class() {
        let uid = "0f1e2d3c-aaaa-bbbb-cccc-000000000001";
        let all = kubelet_pod_cgroups(uid, None);
        assert_eq!(all.len(), 6);
        let expected = [
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_aaaa_bbbb_cccc_000000000001.slice",
            "kubepods/burstable/pod0f1e2d3c-aaaa-bbbb-cccc-000000000001",
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f1e2d3c_aaaa_bbbb_cccc_000000000001.slice",
            "kubepods/besteffort/pod0f1e2d3c-aaaa-bbbb-cccc-000000000001",
            "kubepods.slice/kubepods-pod0f1e2d3c_aaaa_bbbb_cccc_000000000001.slice",
            "kubepods/pod0f1e2d3c-aaaa-bbbb-cccc-000000000001",
        ];
        assert_eq!(all, expected.map(PathBuf::from));
        assert_eq!(
            kubelet_pod_cgroups(uid, Some(QosClass::Guaranteed)),
            expected[4..].iter().map(PathBuf::from).collect::<Vec<_>>()
        );
    }

    #[test]
    fn child_paths_cannot_escape_the_root() {
        let Ok(mount) = find_cgroup2_mount() else {
            return; // no cgroup v2 here: nothing to open
        };
        let root = CgroupDir::open(&mount).expect("open cgroup2 root");
        for bad in ["../etc", "a/../../b", "/etc"] {
            let err = root.open_child(Path::new(bad)).unwrap_err();
            assert!(matches!(err, CgroupError::Escapes { .. }), "{bad}: {err}");
        }
        let err = root
            .open_child(Path::new("nodemesh-no-such-cgroup"))
            .unwrap_err();
        assert!(matches!(err, CgroupError::NotFound { .. }), "{err}");
    }

    #[test]
    fn a_directory_off_cgroup2_is_refused() {
        let err = CgroupDir::open(Path::new("/tmp")).unwrap_err();
        assert!(matches!(err, CgroupError::NotCgroup2 { .. }), "{err}");
    }
}
