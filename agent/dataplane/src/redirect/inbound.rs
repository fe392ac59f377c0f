//! The inbound half: `sk_lookup` on each captured pod's netns hands new
//! connections to the pod's addresses to the agent's listener there; the
//! agent's own deliveries to the app carry the real client's address.
//!
//! ```text
//! <pin dir>/v<layout>/links/pods/<uid>/nodemesh_inbound   sk_lookup at the pod's netns
//! ```
use std::{
    fs, io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, RawFd},
    path::Path,
};

use aya::{
    maps::{HashMap, MapData, SockHash},
    programs::{SkLookup, links::FdLink},
};
use nodemesh_common::{self as common, InboundPort, OrigDst};
use nodemesh_core::names::PodUid;
use tracing::{debug, warn};

use super::{Redirect, RedirectError, io_err, map_err, prog_err, program, sys, take_map};
use crate::netns::Netns;

/// The inbound maps the agent writes.
pub(super) struct InboundMaps {
    captured: HashMap<MapData, [u32; 4], u32>,
    listeners: SockHash<MapData, [u32; 4]>,
    skip: HashMap<MapData, InboundPort, u8>,
    pending: HashMap<MapData, u64, OrigDst>,
}

impl InboundMaps {
    pub(super) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, RedirectError> {
        Ok(Self {
            captured: take_map(ebpf, common::MAP_INBOUND)?,
            listeners: take_map(ebpf, common::MAP_INBOUND_LISTENERS)?,
            skip: take_map(ebpf, common::MAP_INBOUND_SKIP)?,
            pending: take_map(ebpf, common::MAP_INBOUND_PENDING)?,
        })
    }
}

/// An address as the programs key it.
pub fn key(ip: IpAddr) -> [u32; 4] {
    match ip.to_canonical() {
        IpAddr::V4(v4) => common::v4_mapped(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut w = [0u32; 4];
            for (i, word) in w.iter_mut().enumerate() {
                *word = u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
            }
            w
        }
    }
}

/// What a pod's inbound capture is made of.
pub struct PodInbound<'a> {
    pub uid: &'a PodUid,
    pub netns: &'a Netns,
    /// The pod's addresses, each with the listener (its family's) that
    /// takes their connections.
    pub listeners: Vec<(IpAddr, RawFd)>,
    /// Ports left alone (`config.nodemesh.io/skip-inbound-ports`).
    pub skip_ports: &'a [u16],
}

impl Redirect {
    /// Loads the inbound program and swaps it into every pinned inbound
    /// link (pods captured by an earlier agent).
    pub(super) fn load_inbound(ebpf: &mut aya::Ebpf, pods: &Path) -> Result<(), RedirectError> {
        let prog: &mut SkLookup = program(ebpf, common::PROG_INBOUND)?;
        prog.load().map_err(prog_err(common::PROG_INBOUND))?;
        let prog_fd = prog.fd().map_err(prog_err(common::PROG_INBOUND))?;
        for entry in fs::read_dir(pods).map_err(io_err("cannot list", pods))? {
            let path = entry
                .map_err(io_err("cannot list", pods))?
                .path()
                .join(common::PROG_INBOUND);
            if !path.exists() {
                continue;
            }
            match sys::obj_get(&path)
                .and_then(|link| sys::link_update(link.as_fd(), prog_fd.as_fd()))
            {
                Ok(()) => debug!(pin = %path.display(), "inbound link adopted"),
                Err(e) => {
                    warn!(pin = %path.display(), error = %e, "stale inbound link removed");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(())
    }

    /// Captures the pod's inbound: `sk_lookup` on its netns (kept if
    /// already pinned there), its listeners, exempt ports, then its
    /// addresses (from which moment connections to them reach the agent).
    pub fn capture_inbound(&self, pod: &PodInbound<'_>) -> Result<(), RedirectError> {
        let dir = self.layout.pod_dir(pod.uid);
        fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        let path = dir.join(common::PROG_INBOUND);
        let ours = sys::obj_get(&path)
            .and_then(|link| sys::link_netns_ino(link.as_fd()))
            .is_ok_and(|ino| u64::from(ino) == pod.netns.inode());
        if !ours {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("cannot unpin", &path)(e)),
            }
            let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
            let prog: &mut SkLookup = program(&mut ebpf, common::PROG_INBOUND)?;
            let id = prog
                .attach(pod.netns.file())
                .map_err(prog_err(common::PROG_INBOUND))?;
            let link = prog.take_link(id).map_err(prog_err(common::PROG_INBOUND))?;
            let link: FdLink = link.into();
            link.pin(&path)
                .map_err(|source| RedirectError::Pin { path, source })?;
        }
        let mut maps = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        for (ip, fd) in &pod.listeners {
            let k = key(*ip);
            maps.listeners
                .insert(k, *fd, 0)
                .map_err(map_err(common::MAP_INBOUND_LISTENERS))?;
            for port in pod.skip_ports {
                maps.skip
                    .insert(
                        InboundPort {
                            ip: k,
                            port: u32::from(*port),
                            _pad: 0,
                        },
                        1,
                        0,
                    )
                    .map_err(map_err(common::MAP_INBOUND_SKIP))?;
            }
        }
        for (ip, _) in &pod.listeners {
            maps.captured
                .insert(key(*ip), 1, 0)
                .map_err(map_err(common::MAP_INBOUND))?;
        }
        Ok(())
    }

    /// Lets the pod's inbound go: the program first (connections reach
    /// the app directly again; with it still on, an address no longer
    /// listed would be closed), then its addresses, listeners and exempt
    /// ports.
    pub fn release_inbound(&self, uid: &PodUid, addrs: &[IpAddr], skip_ports: &[u16]) {
        let path = self.layout.pod_dir(uid).join(common::PROG_INBOUND);
        let _ = fs::remove_file(path);
        self.release_inbound_addrs(addrs, skip_ports);
    }

    /// Stops capturing inbound for these addresses (a pod lost them).
    pub fn release_inbound_addrs(&self, addrs: &[IpAddr], skip_ports: &[u16]) {
        let mut maps = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        for ip in addrs {
            let k = key(*ip);
            let _ = maps.captured.remove(&k);
            let _ = maps.listeners.remove(&k);
        }
        drop(maps);
        self.forget_skip_ports(addrs, skip_ports);
    }

    /// Captures these exempt ports again (the pod's annotation changed;
    /// [`capture_inbound`](Self::capture_inbound) adds the new ones).
    pub fn forget_skip_ports(&self, addrs: &[IpAddr], skip_ports: &[u16]) {
        let mut maps = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        for ip in addrs {
            for port in skip_ports {
                let _ = maps.skip.remove(&InboundPort {
                    ip: key(*ip),
                    port: u32::from(*port),
                    _pad: 0,
                });
            }
        }
    }

    /// Forgets inbound capture of every address but `keep` (what an
    /// earlier agent captured for pods no longer meshed).
    pub fn prune_inbound(&self, keep: &[IpAddr]) {
        let keep: Vec<[u32; 4]> = keep.iter().map(|ip| key(*ip)).collect();
        let mut maps = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        let stale: Vec<[u32; 4]> = maps
            .captured
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for k in stale {
            let _ = maps.captured.remove(&k);
            let _ = maps.listeners.remove(&k);
        }
        let stale: Vec<InboundPort> = maps
            .skip
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !keep.contains(&p.ip))
            .collect();
        for p in stale {
            let _ = maps.skip.remove(&p);
        }
    }

    /// Records that the agent's socket `cookie`, about to connect to an
    /// app from inside its pod, carries `client`'s connection: the app's
    /// socket will answer `getpeername` with `client` (port 0: the agent
    /// socket's port).
    pub fn inbound_peer(&self, cookie: u64, client: SocketAddr) -> Result<(), RedirectError> {
        let mut maps = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        maps.pending
            .insert(
                cookie,
                OrigDst {
                    ip: key(client.ip()),
                    port: u32::from(client.port()),
                    _pad: 0,
                },
                0,
            )
            .map_err(map_err(common::MAP_INBOUND_PENDING))
    }

    /// Forgets an [`inbound_peer`](Self::inbound_peer) entry (the
    /// connection failed before it was established).
    pub fn forget_inbound_peer(&self, cookie: u64) {
        let mut maps = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        let _ = maps.pending.remove(&cookie);
    }
}
