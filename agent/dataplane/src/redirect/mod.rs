//! Redirect: the eBPF half of the data path. Loads the programs embedded in
//! the binary, pins their maps and links under one directory on bpffs,
//! attaches them, and gives the rest of the agent what it needs: capturing a
//! pod (its cgroup gets the pod programs: `connect4/6`, `getpeername4/6`,
//! `getsockname4/6`), marking it ready once its listener is up, releasing
//! it, and reading the original destination of an accepted connection.
//!
//! Restarts: maps and links are pinned, so they outlive the agent. A new
//! agent loads the programs again, reuses the pinned maps (in-flight entries
//! and sockets stay), and swaps its programs into the pinned links with
//! `BPF_LINK_UPDATE`: there is no moment where a meshed pod's connections
//! bypass the mesh. Maps of another layout version live in a sibling
//! directory and are removed once this agent has captured the pods again.
//!
//! ```text
//! <pin dir>/v<layout>/maps/NM_*                  pinned maps
//! <pin dir>/v<layout>/links/sock_ops             sock_ops at the cgroup root
//! <pin dir>/v<layout>/links/pods/<uid>/<program> each pod program at a captured pod's cgroup
//! ```
mod inbound;
pub mod logs;
mod pins;
mod sys;

pub use self::inbound::{PodInbound, key as inbound_key};

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuHashMap, SockHash,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps, links::FdLink},
};
use nix::fcntl::{Flock, FlockArg};
use nodemesh_common::{
    self as common, Config, FLAG_FAST_PATH, FastPathKey, OrigDst, PodNet, SockKey, TO_APP, TO_PROXY,
};
use tracing::{debug, info, warn};

use nodemesh_core::names::PodUid;

use crate::cgroup::CgroupDir;

pub use nodemesh_common::LAYOUT_VERSION;

/// The compiled eBPF object (agent/build.rs).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodemesh-ebpf"));

use self::pins::{
    BPFFS, Layout, adopted, ensure_bpffs, lock, remove_other_layouts, remove_pins,
    update_pinned_link,
};
pub use self::pins::{CleanupReport, cleanup};

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(
        "{path} is not on a bpf file system: mount one (mount -t bpf bpf {BPFFS}) or choose another --bpffs"
    )]
    NotBpffs { path: PathBuf },
    #[error("cannot mount bpffs at {BPFFS}: {source}")]
    Mount { source: nix::Error },
    #[error("{path} is held by a running agent: stop it first")]
    Busy { path: PathBuf },
    #[error(
        "this agent was built without its eBPF programs (bpf-linker was missing): run `cargo xtask setup` and build it again"
    )]
    NoObject,
    #[error(
        "cannot load the eBPF object: {0}; does this kernel have BTF and allow BPF (CAP_BPF, CAP_NET_ADMIN)?"
    )]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF link of {name}: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot attach {program} to cgroup {cgroup}: {source}; is cgroup v2 mounted there?")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        source: aya::programs::ProgramError,
    },
    #[error("cannot pin {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RedirectError + use<> {
    let path = path.to_owned();
    move |source| RedirectError::Io { what, path, source }
}

/// What `install` needs to know.
#[derive(Clone, Debug)]
pub struct RedirectConfig {
    /// Base directory on bpffs for everything pinned.
    pub pin_dir: PathBuf,
    /// The cgroup `sock_ops` attaches to: above every pod and the agent.
    pub cgroup_root: PathBuf,
    /// The outbound listener's port inside each pod's netns.
    pub outbound_port: u16,
    /// Move app↔proxy bytes socket-to-socket.
    pub fast_path: bool,
    /// IPv4 destinations never redirected (address, prefix length).
    pub bypass_nets: Vec<(Ipv4Addr, u8)>,
    /// Destination ports never redirected.
    pub bypass_ports: Vec<u16>,
    /// The agent's own cgroup id.
    pub agent_cgroup: u64,
    /// aya-log level for the programs (0 off … 5 trace).
    pub log_level: u8,
}

/// Fast-path byte counts of one pod netns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastPathBytes {
    pub to_proxy: u64,
    pub to_app: u64,
}

/// The loaded programs and the maps the agent uses while running.
pub struct Redirect {
    layout: Layout,
    ebpf: Mutex<Ebpf>,
    orig_dst: Mutex<HashMap<MapData, u64, OrigDst>>,
    /// Ready pods by netns cookie.
    pods: Mutex<HashMap<MapData, u64, PodNet>>,
    fastpath: Mutex<PerCpuHashMap<MapData, FastPathKey, u64>>,
    inbound: Mutex<inbound::InboundMaps>,
    /// Shared lock on the pin directory: `cleanup` refuses while it is held.
    lock: Flock<File>,
}

impl std::fmt::Debug for Redirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirect")
            .field("pins", &self.layout.root)
            .finish_non_exhaustive()
    }
}

/// Forwards the programs' aya-log records into the agent's log.
pub type EbpfLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

impl Redirect {
    /// Loads, pins and attaches everything; reuses what an earlier agent
    /// pinned. Returns the logger whose records must be flushed from a task.
    pub fn install(cfg: &RedirectConfig) -> Result<(Self, EbpfLogger), RedirectError> {
        let layout = Layout::new(&cfg.pin_dir);
        ensure_bpffs(&cfg.pin_dir)?;
        for dir in [layout.maps(), layout.pods()] {
            fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        }
        let lock =
            lock(&layout.base, FlockArg::LockSharedNonblock).map_err(|_| RedirectError::Busy {
                path: layout.base.clone(),
            })?;

        if OBJECT.is_empty() {
            return Err(RedirectError::NoObject);
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(layout.maps())
            .override_global("AYA_LOG_LEVEL", &cfg.log_level, false)
            .load(OBJECT)?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf).map_err(|e| RedirectError::Io {
            what: "cannot read the eBPF log buffer of",
            path: layout.root.clone(),
            source: io::Error::other(e.to_string()),
        })?;

        write_config(&mut ebpf, cfg)?;
        sync_bypass(&mut ebpf, cfg)?;

        // sk_msg first: sockets that sock_ops adds meet the new program.
        let socks: SockHash<MapData, SockKey> = take_map(&mut ebpf, common::MAP_SOCKS)?;
        {
            let prog: &mut SkMsg = program(&mut ebpf, common::PROG_SK_MSG)?;
            prog.load().map_err(prog_err(common::PROG_SK_MSG))?;
            let id = prog
                .attach(socks.fd())
                .map_err(prog_err(common::PROG_SK_MSG))?;
            // The attachment lives as long as the pinned map, not this
            // process: keep it when the agent exits.
            let link = prog.take_link(id).map_err(prog_err(common::PROG_SK_MSG))?;
            std::mem::forget(link);
        }

        let root = CgroupDir::open(&cfg.cgroup_root).map_err(|e| RedirectError::Io {
            what: "cannot open the cgroup root",
            path: cfg.cgroup_root.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        {
            let prog: &mut SockOps = program(&mut ebpf, common::PROG_SOCK_OPS)?;
            prog.load().map_err(prog_err(common::PROG_SOCK_OPS))?;
            let path = layout.sock_ops_link();
            let prog_fd = prog.fd().map_err(prog_err(common::PROG_SOCK_OPS))?;
            if !update_pinned_link(&path, prog_fd.as_fd(), root.id())? {
                // Links take no attach flags (the kernel wants 0) and always
                // coexist with other programs on the cgroup.
                let id = prog
                    .attach(root.file(), CgroupAttachMode::Single)
                    .map_err(|source| RedirectError::Attach {
                        program: common::PROG_SOCK_OPS,
                        cgroup: root.path().to_owned(),
                        source,
                    })?;
                let link = prog
                    .take_link(id)
                    .map_err(prog_err(common::PROG_SOCK_OPS))?;
                let link = FdLink::try_from(link).map_err(link_err(common::PROG_SOCK_OPS))?;
                link.pin(&path).map_err(|source| RedirectError::Pin {
                    path: path.clone(),
                    source,
                })?;
                info!(cgroup = %root.path().display(), "sock_ops attached");
            }
        }

        // Pods captured by an earlier agent run the new programs from now
        // on, each link swapped in place.
        for name in common::POD_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
        }
        adopt_pod_links(&mut ebpf, &layout)?;
        Self::load_inbound(&mut ebpf, &layout.pods())?;
        let inbound = inbound::InboundMaps::take(&mut ebpf)?;

        let orig_dst = take_map(&mut ebpf, common::MAP_ORIG_DST)?;
        let pods = take_map(&mut ebpf, common::MAP_PODS)?;
        let fastpath = take_map(&mut ebpf, common::MAP_FASTPATH)?;
        drop(socks);
        info!(
            pins = %layout.root.display(),
            fast_path = cfg.fast_path,
            adopted_pods = adopted(&layout).len(),
            "eBPF programs loaded and attached"
        );
        Ok((
            Self {
                layout,
                ebpf: Mutex::new(ebpf),
                orig_dst: Mutex::new(orig_dst),
                pods: Mutex::new(pods),
                fastpath: Mutex::new(fastpath),
                inbound: Mutex::new(inbound),
                lock,
            },
            logger,
        ))
    }

    /// Pods whose links are pinned (captured by this or an earlier agent).
    pub fn captured(&self) -> BTreeSet<PodUid> {
        adopted(&self.layout)
    }

    /// Attaches the pod programs to the pod's cgroup (keeping links already
    /// pinned there). From now on the pod's connections are redirected once
    /// it is [ready](Self::ready), and refused until then. Nothing stays
    /// half-attached: on an error every link of the pod is removed.
    pub fn capture(&self, uid: &PodUid, cgroup: &CgroupDir) -> Result<(), RedirectError> {
        let dir = self.layout.pod_dir(uid);
        fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        let attached = common::POD_PROGRAMS
            .iter()
            .try_for_each(|name| self.attach_pod_program(name, &dir, cgroup));
        if attached.is_err() {
            let _ = self.release(uid);
        }
        attached
    }

    fn attach_pod_program(
        &self,
        name: &'static str,
        dir: &Path,
        cgroup: &CgroupDir,
    ) -> Result<(), RedirectError> {
        let path = dir.join(name);
        if let Ok(link) = sys::obj_get(&path) {
            match sys::link_cgroup_id(link.as_fd()) {
                Ok(id) if id == cgroup.id() => return Ok(()),
                _ => {
                    // Pinned for a cgroup that is gone or different.
                    fs::remove_file(&path).map_err(io_err("cannot unpin", &path))?;
                }
            }
        }
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        let id = prog
            .attach(cgroup.file(), CgroupAttachMode::Single)
            .map_err(|source| RedirectError::Attach {
                program: name,
                cgroup: cgroup.path().to_owned(),
                source,
            })?;
        let link = prog.take_link(id).map_err(prog_err(name))?;
        let link = FdLink::try_from(link).map_err(link_err(name))?;
        // If pinning fails the link is dropped here, which detaches it.
        link.pin(&path)
            .map_err(|source| RedirectError::Pin { path, source })?;
        Ok(())
    }

    /// Detaches the pod programs from the pod's cgroup: the redirecting
    /// ones first. Connections already made are not affected.
    pub fn release(&self, uid: &PodUid) -> Result<(), RedirectError> {
        let dir = self.layout.pod_dir(uid);
        for name in common::POD_PROGRAMS.iter().rev() {
            let path = dir.join(name);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("cannot unpin", &path)(e)),
            }
        }
        remove_pins(&dir)
    }

    /// Lets the pod whose netns has `netns_cookie` be redirected (its
    /// listener is up); `pod` holds its own addresses.
    pub fn ready(&self, netns_cookie: u64, pod: PodNet) -> Result<(), RedirectError> {
        let mut map = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(netns_cookie, pod, 0)
            .map_err(map_err(common::MAP_PODS))
    }

    /// The pod's connections are refused again (its listener is going).
    pub fn unready(&self, netns_cookie: u64) {
        let mut map = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let _ = map.remove(&netns_cookie);
    }

    /// The netns cookies marked ready (by this or an earlier agent).
    pub fn ready_netns(&self) -> Vec<u64> {
        let map = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        map.keys().filter_map(Result::ok).collect()
    }

    /// Removes what older layout versions pinned: called once the pods are
    /// captured in this layout, so no pod is ever left without programs.
    pub fn forget_other_layouts(&self) {
        remove_other_layouts(&self.layout);
    }

    /// The original destination of the accepted connection whose socket has
    /// `cookie`; the entry is consumed.
    pub fn take_orig_dst(&self, cookie: u64) -> Option<SocketAddr> {
        let mut map = self.orig_dst.lock().unwrap_or_else(|p| p.into_inner());
        let orig = map.get(&cookie, 0).ok()?;
        let _ = map.remove(&cookie);
        Some(SocketAddr::new(ip_of(&orig.ip), orig.port as u16))
    }

    /// Bytes `sk_msg` carried for the pod whose netns has `netns_cookie`.
    pub fn fastpath_bytes(&self, netns_cookie: u64) -> FastPathBytes {
        let map = self.fastpath.lock().unwrap_or_else(|p| p.into_inner());
        let sum = |to| {
            map.get(
                &FastPathKey {
                    netns: netns_cookie,
                    to,
                    _pad: 0,
                },
                0,
            )
            .map(|per_cpu| per_cpu.iter().sum::<u64>())
            .unwrap_or(0)
        };
        FastPathBytes {
            to_proxy: sum(TO_PROXY),
            to_app: sum(TO_APP),
        }
    }

    /// Drops the fast-path counters of a netns that is no longer captured.
    pub fn forget_fastpath(&self, netns_cookie: u64) {
        let mut map = self.fastpath.lock().unwrap_or_else(|p| p.into_inner());
        for to in [TO_PROXY, TO_APP] {
            let _ = map.remove(&FastPathKey {
                netns: netns_cookie,
                to,
                _pad: 0,
            });
        }
    }
}

impl Redirect {
    /// Detaches and unpins everything, unless another agent also holds the
    /// pin directory (then nothing is touched and `false` returned).
    pub fn uninstall(&self) -> Result<bool, RedirectError> {
        if self.lock.relock(FlockArg::LockExclusiveNonblock).is_err() {
            return Ok(false);
        }
        remove_pins(&self.layout.base)?;
        Ok(true)
    }
}

/// An address as the programs store it (v4-mapped for IPv4).
fn ip_of(words: &[u32; 4]) -> IpAddr {
    match common::as_v4(words) {
        Some(ip4) => IpAddr::V4(Ipv4Addr::from(ip4.to_ne_bytes())),
        None => {
            let mut bytes = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
    }
}

/// A pod's addresses as the programs read them.
pub fn pod_net(ips: &[IpAddr]) -> PodNet {
    let mut net = PodNet::default();
    for ip in ips {
        match ip {
            IpAddr::V4(v4) if net.ip4 == 0 => net.ip4 = u32::from_ne_bytes(v4.octets()),
            IpAddr::V6(v6) if net.ip6 == [0; 4] => {
                let o = v6.octets();
                for (i, w) in net.ip6.iter_mut().enumerate() {
                    *w = u32::from_ne_bytes([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]);
                }
            }
            _ => {}
        }
    }
    net
}

/// Swaps the loaded pod programs into every pinned pod link; removes pins
/// that are not links of ours any more.
fn adopt_pod_links(ebpf: &mut Ebpf, layout: &Layout) -> Result<(), RedirectError> {
    let pods = layout.pods();
    for entry in fs::read_dir(&pods).map_err(io_err("cannot list", &pods))? {
        let dir = entry.map_err(io_err("cannot list", &pods))?.path();
        if !dir.is_dir() {
            warn!(pin = %dir.display(), "stray pin removed");
            let _ = fs::remove_file(&dir);
            continue;
        }
        for name in common::POD_PROGRAMS {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }

            let prog: &mut CgroupSockAddr = program(ebpf, name)?;
            let prog_fd = prog.fd().map_err(prog_err(name))?;
            match sys::obj_get(&path)
                .and_then(|link| sys::link_update(link.as_fd(), prog_fd.as_fd()))
            {
                Ok(()) => debug!(pin = %path.display(), "pod link adopted"),
                Err(e) => {
                    warn!(pin = %path.display(), error = %e, "stale pod link removed");
                    let _ = fs::remove_file(&path);
                }
            }
        }
    }
    Ok(())
}

fn write_config(ebpf: &mut Ebpf, cfg: &RedirectConfig) -> Result<(), RedirectError> {
    let map = ebpf
        .map_mut(common::MAP_CONFIG)
        .ok_or(RedirectError::MissingMap(common::MAP_CONFIG))?;
    let mut config: Array<&mut MapData, Config> =
        Array::try_from(map).map_err(map_err(common::MAP_CONFIG))?;
    let value = Config {
        outbound_port: cfg.outbound_port.into(),
        flags: if cfg.fast_path { FLAG_FAST_PATH } else { 0 },
        agent_cgroup: cfg.agent_cgroup,
    };
    config.set(0, value, 0).map_err(map_err(common::MAP_CONFIG))
}

/// Makes the bypass maps hold exactly what the configuration says.
fn sync_bypass(ebpf: &mut Ebpf, cfg: &RedirectConfig) -> Result<(), RedirectError> {
    {
        let map = ebpf
            .map_mut(common::MAP_BYPASS_NETS)
            .ok_or(RedirectError::MissingMap(common::MAP_BYPASS_NETS))?;
        let mut nets: LpmTrie<&mut MapData, u32, u8> =
            LpmTrie::try_from(map).map_err(map_err(common::MAP_BYPASS_NETS))?;
        let want: Vec<(u32, u32)> = cfg
            .bypass_nets
            .iter()
            .map(|(ip, len)| (u32::from(*len), u32::from_ne_bytes(ip.octets())))
            .collect();
        let stale: Vec<Key<u32>> = nets
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.contains(&(k.prefix_len(), k.data())))
            .collect();
        for key in stale {
            let _ = nets.remove(&key);
        }
        for (len, data) in want {
            nets.insert(&Key::new(len, data), 1, 0)
                .map_err(map_err(common::MAP_BYPASS_NETS))?;
        }
    }
    let map = ebpf
        .map_mut(common::MAP_BYPASS_PORTS)
        .ok_or(RedirectError::MissingMap(common::MAP_BYPASS_PORTS))?;
    let mut ports: HashMap<&mut MapData, u32, u8> =
        HashMap::try_from(map).map_err(map_err(common::MAP_BYPASS_PORTS))?;
    let want: Vec<u32> = cfg.bypass_ports.iter().map(|p| u32::from(*p)).collect();
    let stale: Vec<u32> = ports
        .keys()
        .filter_map(Result::ok)
        .filter(|p| !want.contains(p))
        .collect();
    for port in stale {
        let _ = ports.remove(&port);
    }
    for port in want {
        ports
            .insert(port, 1, 0)
            .map_err(map_err(common::MAP_BYPASS_PORTS))?;
    }
    Ok(())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, RedirectError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(RedirectError::MissingProgram(name))?
        .try_into()
        .map_err(prog_err(name))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RedirectError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    ebpf.take_map(name)
        .ok_or(RedirectError::MissingMap(name))?
        .try_into()
        .map_err(map_err(name))
}

fn prog_err(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> RedirectError {
    move |source| RedirectError::Program { name, source }
}

fn link_err(name: &'static str) -> impl Fn(aya::programs::links::LinkError) -> RedirectError {
    move |source| RedirectError::Link { name, source }
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> RedirectError {
    move |source| RedirectError::Map { name, source }
}
