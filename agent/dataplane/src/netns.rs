//! Network namespaces: opening a pod's netns and running a short, blocking
//! piece of work (making a socket) inside it. One of the few modules that
//! make syscalls by hand (`unsafe` is allowed here and in `redirect::sys`).
//!
//! A socket belongs to the netns it was created in, whatever thread uses it
//! later; so the agent enters a pod's netns only for the `socket()`/`bind()`
//! calls and returns at once. One process, listeners and upstream sockets in
//! many namespaces.
#![allow(unsafe_code)]

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Socket, Type};

/// `SO_NETNS_COOKIE` (Linux 5.14), not in every libc yet.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not a network namespace: {source}")]
    NotNetns { path: PathBuf, source: nix::Error },
    #[error("cannot read the cookie of network namespace {path}: {source}")]
    Cookie { path: PathBuf, source: io::Error },
    #[error(
        "{path} is the agent's own network namespace: the pod's process has not joined the pod's yet"
    )]
    AgentsOwn { path: PathBuf },
    #[error(
        "the pod has no address in the API yet: its network namespace among {dir} is found by it"
    )]
    NoAddressYet { dir: PathBuf },
    #[error("no network namespace in {dir} holds the pod's addresses {addrs} (yet)")]
    NoneHolds { dir: PathBuf, addrs: String },
}

/// The agent's own netns, where threads return after visiting a pod's.
fn home() -> &'static io::Result<File> {
    static HOME: OnceLock<io::Result<File>> = OnceLock::new();
    HOME.get_or_init(|| File::open("/proc/self/ns/net"))
}

/// Remember the agent's own netns. Call once at start-up, before any thread
/// has entered another namespace.
pub fn init() -> io::Result<()> {
    home()
        .as_ref()
        .map(|_| ())
        .map_err(|e| io::Error::new(e.kind(), e.to_string()))
}

/// An open handle on a network namespace (keeps it alive while held).
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    cookie: u64,
}

impl Netns {
    /// Opens the netns at `path` (`/run/netns/<name>`, `/proc/<pid>/ns/net`).
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_owned(),
            source,
        })?;
        let mut ns = Self {
            file,
            path: path.to_owned(),
            cookie: 0,
        };
        // Entering it once proves it is a netns, and gives us its cookie.
        let cookie = ns
            .enter(|| Socket::new(Domain::IPV4, Type::DGRAM, None).and_then(|s| netns_cookie(&s)))
            .map_err(|source| NetnsError::NotNetns {
                path: path.to_owned(),
                source,
            })?
            .map_err(|source| NetnsError::Cookie {
                path: path.to_owned(),
                source,
            })?;
        ns.cookie = cookie;
        Ok(ns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open namespace file (what `sk_lookup` attaches to).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// It is the agent's own netns (the node's): a process of a starting
    /// container (`runc init`) sits in the pod's cgroup a moment before it
    /// joins the pod's netns.
    pub fn is_agents_own(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Ok(home), Ok(this)) = (home(), self.file.metadata()) else {
            return false;
        };
        home.metadata()
            .is_ok_and(|h| h.ino() == this.ino() && h.dev() == this.dev())
    }

    /// Its inode: names the namespace (what a netns link reports).
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map(|m| m.ino()).unwrap_or(0)
    }

    /// The kernel's id for this netns (what eBPF's `bpf_get_netns_cookie` sees).
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` on the current thread inside this netns, then returns to the
    /// agent's own. Keep `f` short and non-blocking: nothing else runs on this
    /// thread meanwhile.
    pub fn enter<R>(&self, f: impl FnOnce() -> R) -> Result<R, nix::Error> {
        let home = match home() {
            Ok(home) => home,
            Err(e) => {
                return Err(nix::Error::from_raw(
                    e.raw_os_error().unwrap_or(libc::EBADF),
                ));
            }
        };
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET)?;
        let _back = Return(home);
        Ok(f())
    }

    /// The address this netns would send from to `dst` (a connected UDP
    /// socket: a route lookup, no packet).
    pub fn source_ip(&self, dst: std::net::SocketAddr) -> io::Result<std::net::IpAddr> {
        let socket = self
            .enter(|| Socket::new(Domain::for_address(dst), Type::DGRAM.cloexec(), None))
            .map_err(io::Error::from)??;
        socket.connect(&dst.into())?;
        socket
            .local_addr()?
            .as_socket()
            .map(|a| a.ip().to_canonical())
            .ok_or_else(|| io::Error::from(io::ErrorKind::AddrNotAvailable))
    }

    /// Every address of this netns's interfaces but loopback ones,
    /// link-local and tentative ones included, sorted: what inbound capture
    /// takes (whatever the API server says the pod has).
    pub fn addresses(&self) -> io::Result<Vec<std::net::IpAddr>> {
        use std::net::IpAddr;
        let found: Vec<IpAddr> = self.enter(interface_addresses).map_err(io::Error::from)??;
        let mut ips: Vec<IpAddr> = found
            .into_iter()
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified() && !ip.is_multicast())
            .collect();
        ips.sort();
        ips.dedup();
        Ok(ips)
    }

    /// A new TCP socket that lives in this netns, of `dst`'s address
    /// family.
    pub fn tcp_socket(&self, dst: std::net::SocketAddr) -> io::Result<Socket> {
        self.enter(|| Socket::new(Domain::for_address(dst), Type::STREAM.cloexec(), None))
            .map_err(io::Error::from)?
    }
}

/// Every address of the interfaces of the calling thread's netns,
/// loopback ones included (IPv4-mapped ones as IPv4), unsorted.
pub fn interface_addresses() -> io::Result<Vec<std::net::IpAddr>> {
    use std::net::IpAddr;
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|a| {
            let sa = a.address?;
            sa.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .map(|ip| ip.to_canonical())
        .collect())
}

/// Puts the thread back into the agent's netns, even if `f` panicked.
struct Return<'a>(&'a File);

impl Drop for Return<'_> {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET) {
            // A worker stuck in a pod's netns would make every later socket
            // on this thread in the wrong place: better to stop here.
            tracing::error!(error = %e, "cannot return to the agent's network namespace; aborting");
            std::process::abort();
        }
    }
}

/// `SO_NETNS_COOKIE` of a socket: the cookie of the netns it lives in.
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    getsockopt_u64(socket, libc::SOL_SOCKET, SO_NETNS_COOKIE)
}

/// `IP_BIND_ADDRESS_NO_PORT`: a `bind` to an address and port 0 leaves
/// the port to `connect`, which picks it by the whole 4-tuple.
pub fn set_bind_address_no_port(socket: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `one` is a valid c_int for the option's size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `SO_COOKIE` of a socket: what eBPF's `bpf_get_socket_cookie` sees.
pub fn socket_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    getsockopt_u64(socket, libc::SOL_SOCKET, libc::SO_COOKIE)
}

fn getsockopt_u64(socket: &impl AsRawFd, level: libc::c_int, name: libc::c_int) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: value and len point to valid, correctly sized storage.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&mut value as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_netns_has_a_cookie_and_sockets_report_it() {
        init().expect("own netns");
        let ns = Netns::open(Path::new("/proc/self/ns/net")).expect("open own netns");
        assert_ne!(ns.cookie(), 0);
        let s = ns
            .tcp_socket("127.0.0.1:80".parse().unwrap())
            .expect("socket");
        assert_eq!(netns_cookie(&s).expect("cookie"), ns.cookie());
        // What a starting container's process may still be in: not a pod's.
        assert!(ns.is_agents_own());
    }

    #[test]
    fn a_missing_netns_is_a_clear_error() {
        let err = Netns::open(Path::new("/run/netns/nodemesh-does-not-exist")).unwrap_err();
        assert!(
            err.to_string().contains("cannot open network namespace"),
            "{err}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_netns_is_refused() {
        init().expect("own netns");
        let err = Netns::open(Path::new("/proc/self/status")).unwrap_err();
        assert!(matches!(err, NetnsError::NotNetns { .. }), "{err}");
    }
}
