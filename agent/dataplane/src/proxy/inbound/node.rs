//! Who is the node, for the kubelet's probes: the one plaintext client every
//! policy lets through to a pod's probe ports. A connection counts as the
//! node's only if it was made in the node's own network namespace (the
//! agent's: a socket there has exactly the connection's ends), from any of
//! the node's addresses (a bridge CNI's gateway included), by a process
//! that is not in a host-network pod of this node (its cgroup is not one of
//! theirs), through a connect (an accepted socket of the node with the
//! same ends is a pod's connection to the node). A connection translated to a node address (NodePort or hostPort
//! traffic SNATed by kube-proxy) has no such socket: it is whoever sent it,
//! and the policy decides.
use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing::debug;

use crate::{
    cgroup::kubelet_pod_cgroups,
    sockdiag::{self, SockDiag},
    state::{CgroupRef, StateStore},
};

/// How long the node's addresses are taken as read.
const REFRESH: Duration = Duration::from_secs(2);

/// The node as its probes reach a pod.
#[derive(Debug)]
pub struct NodeOrigin {
    /// The cgroup root kubelet's pod cgroups are below (`None`: no process
    /// is taken for a pod's).
    cgroup_root: Option<PathBuf>,
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    read: Option<Instant>,
    addrs: Vec<IpAddr>,
    diag: Option<SockDiag>,
}

impl NodeOrigin {
    pub fn new(cgroup_root: Option<PathBuf>) -> Self {
        Self {
            cgroup_root,
            cache: Mutex::default(),
        }
    }

    /// Whether the connection from `client` to `dst` was made by the node
    /// itself (see the module's doc). Any doubt — no socket, no answer
    /// from the kernel — is "no".
    pub fn made_it(&self, client: SocketAddr, dst: SocketAddr, state: &StateStore) -> bool {
        let client = SocketAddr::new(client.ip().to_canonical(), client.port());
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        let found = {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.read.is_none_or(|at| at.elapsed() >= REFRESH) {
                cache.addrs = own_addresses();
                cache.read = Some(Instant::now());
            }
            if !cache.addrs.contains(&client.ip()) {
                return false;
            }
            if cache.diag.is_none() {
                // Made on this thread: in the agent's own netns.
                cache.diag = sockdiag::open()
                    .map_err(|e| debug!(error = %e, "cannot read the node's sockets"))
                    .ok();
            }
            // The node's end of it: local is the client, remote the pod —
            // and made by a connect, not accepted (an accepted socket's
            // local port is a listener's; a pod dialling a node port from
            // the port it now claims as the node's client must not pass).
            let found = match &cache.diag {
                Some(diag) => diag.find(client, dst).and_then(|s| match s {
                    Some(s) if diag.listening_on(client.port())? => {
                        debug!(local = %s.local, "the node's socket was accepted, not dialled");
                        Ok(None)
                    }
                    other => Ok(other),
                }),
                None => return false,
            };
            if found.is_err() {
                cache.diag = None;
            }
            found
        };
        match found {
            Ok(Some(s)) => s
                .cgroup
                .is_some_and(|id| !self.host_network_pods(state).contains(&id)),
            Ok(None) => false,
            Err(e) => {
                debug!(error = %e, "cannot look up the node's socket");
                false
            }
        }
    }

    /// The cgroup ids of this node's host-network pods, as they are now
    /// (read on each ask: a pod started a moment ago counts at once).
    fn host_network_pods(&self, state: &StateStore) -> Vec<u64> {
        let Some(root) = &self.cgroup_root else {
            return Vec::new();
        };
        state
            .local_pods_any()
            .into_iter()
            .filter(|p| p.on_host_network())
            .flat_map(|p| {
                let dirs = match &p.cgroup {
                    CgroupRef::Path(path) => vec![path.clone()],
                    CgroupRef::Kubelet { qos } => kubelet_pod_cgroups(p.uid.as_str(), *qos),
                };
                dirs.into_iter()
                    .flat_map(|d| cgroup_ids(&root.join(d)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// Every address of the agent's own netns (the node's).
fn own_addresses() -> Vec<IpAddr> {
    crate::netns::interface_addresses().unwrap_or_else(|e| {
        debug!(error = %e, "cannot list the node's addresses");
        Vec::new()
    })
}

/// The ids of `root` and every cgroup below it (none if it is absent).
fn cgroup_ids(root: &Path) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
        let Ok(meta) = std::fs::metadata(&dir) else {
            continue;
        };
        ids.push(meta.ino());
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(entry.path());
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection this process made from loopback is the node's; the
    /// same ends reversed (the accepted end, a listener's port), or a
    /// client port nobody holds, are not.
    #[test]
    fn only_a_socket_the_node_made_is_the_node() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let pod = listener.local_addr().unwrap();
        let kubelet = std::net::TcpStream::connect(pod).unwrap();
        let from = kubelet.local_addr().unwrap();
        let state = StateStore::new("node-a", "cluster.local");
        let node = NodeOrigin::new(None);
        assert!(node.made_it(from, pod, &state));
        assert!(
            !node.made_it(pod, from, &state),
            "the pod's end is not a client"
        );
        let nobody = SocketAddr::new(from.ip(), 1);
        assert!(
            !node.made_it(nobody, pod, &state),
            "no such socket: translated"
        );
    }
}
