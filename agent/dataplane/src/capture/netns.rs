//! Where a pod is: its cgroup, and its sandbox's network namespace (never
//! a netns one of its containers made for itself).
use std::{net::IpAddr, path::PathBuf, sync::Arc};

use super::{CaptureError, Captures};
use crate::{
    cgroup::{CgroupDir, CgroupError, kubelet_pod_cgroups},
    netns::{Netns, NetnsError},
    state::{CgroupRef, Pod},
};

impl Captures {
    /// The pod's netns and every address in it: the one its entry names,
    /// else its sandbox's — the first candidate (see
    /// [`CgroupDir::sandbox_candidates`]) that is not the agent's and, once
    /// the API has the pod's addresses, holds them all: a netns a container
    /// made for itself is never taken for the pod's.
    pub(super) fn pod_netns(
        &self,
        pod: &Pod,
        cgroup: &CgroupDir,
    ) -> Result<(Arc<Netns>, Vec<IpAddr>), CaptureError> {
        let addresses = |netns: &Netns| {
            netns.addresses().map_err(|source| CaptureError::Addresses {
                netns: netns.path().to_owned(),
                source,
            })
        };
        if let Some(path) = &pod.netns {
            let netns = Netns::open(path)?;
            let found = addresses(&netns)?;
            return Ok((Arc::new(netns), found));
        }
        if let Some(dir) = &self.cfg.netns_dir {
            return self.runtime_netns(pod, dir);
        }
        let mut refused = None;
        for pid in cgroup.sandbox_candidates(&pod.container_ids)? {
            let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
            let Ok(netns) = Netns::open(&path) else {
                continue;
            };
            // A process of a container still starting: not the pod's yet.
            if netns.is_agents_own() {
                refused.get_or_insert(CaptureError::Netns(NetnsError::AgentsOwn { path }));
                continue;
            }
            let found = addresses(&netns)?;
            let missing: Vec<_> = pod.ips.iter().filter(|ip| !found.contains(ip)).collect();
            if missing.is_empty() {
                return Ok((Arc::new(netns), found));
            }
            refused = Some(CaptureError::NotThePods {
                netns: path,
                missing: format!("{missing:?}"),
            });
        }
        Err(refused.unwrap_or(CaptureError::Cgroup(CgroupError::Empty {
            path: cgroup.path().to_owned(),
        })))
    }

    /// The pod's netns among the runtime's (`dir`): the one holding every
    /// address the API gives the pod (none yet: it is starting).
    fn runtime_netns(
        &self,
        pod: &Pod,
        dir: &std::path::Path,
    ) -> Result<(Arc<Netns>, Vec<IpAddr>), CaptureError> {
        if pod.ips.is_empty() {
            return Err(CaptureError::Netns(NetnsError::NoAddressYet {
                dir: dir.to_owned(),
            }));
        }
        let entries = std::fs::read_dir(dir).map_err(|source| {
            CaptureError::Netns(NetnsError::Open {
                path: dir.to_owned(),
                source,
            })
        })?;
        for entry in entries.flatten() {
            let Ok(netns) = Netns::open(&entry.path()) else {
                continue;
            };
            if netns.is_agents_own() {
                continue;
            }
            let Ok(found) = netns.addresses() else {
                continue;
            };
            if pod.ips.iter().all(|ip| found.contains(ip)) {
                return Ok((Arc::new(netns), found));
            }
        }
        Err(CaptureError::Netns(NetnsError::NoneHolds {
            dir: dir.to_owned(),
            addrs: format!("{:?}", pod.ips),
        }))
    }

    /// The pod's cgroup under the root: its path, or where kubelet puts it.
    pub(super) fn pod_cgroup(&self, pod: &Pod) -> Result<CgroupDir, CgroupError> {
        match &pod.cgroup {
            CgroupRef::Path(path) => self.cgroup_root.open_child(path),
            CgroupRef::Kubelet { qos } => {
                let candidates = kubelet_pod_cgroups(pod.uid.as_str(), *qos);
                for candidate in &candidates {
                    match self.cgroup_root.open_child(candidate) {
                        Err(CgroupError::NotFound { .. }) => continue,
                        found => return found,
                    }
                }
                Err(CgroupError::NoPodCgroup {
                    uid: pod.uid.to_string(),
                    root: self.cgroup_root.path().to_owned(),
                    tried: candidates.len(),
                })
            }
        }
    }
}
