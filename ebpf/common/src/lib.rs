//! The contract between the eBPF programs and the agent: map names, the
//! `#[repr(C)]` keys and values stored in them, and the constants both sides
//! must agree on.
//!
//! Byte order: IPv4 addresses are kept exactly as the kernel hands them to BPF
//! programs (network order in a `u32`); ports are host order in a `u32`.
//! Every struct is padded explicitly, because BPF hashes keys byte by byte and
//! implicit padding would carry garbage.
#![no_std]

/// Bump when any map's key, value or type changes: pins live in a directory
/// named after it, so an agent never reuses a map with another layout.
pub const LAYOUT_VERSION: u32 = 1;

/// Original destinations of redirected connections, keyed by socket cookie
/// (first the client's, then the accepted socket's).
pub const MAP_ORIG_DST: &str = "NM_ORIG_DST";
/// Original destinations between the client's and the proxy's side of the
/// handshake, keyed by [`ClientKey`].
pub const MAP_PENDING: &str = "NM_PENDING";
/// Both ends of every app↔proxy loopback connection, for `sk_msg` redirects.
pub const MAP_SOCKS: &str = "NM_SOCKS";
/// The one [`Config`] entry.
pub const MAP_CONFIG: &str = "NM_CONFIG";
/// IPv4 destinations (CIDRs) that are never redirected.
pub const MAP_BYPASS_NETS: &str = "NM_BYPASS_NETS";
/// Destination ports that are never redirected.
pub const MAP_BYPASS_PORTS: &str = "NM_BYPASS_PORTS";
/// Bytes carried socket-to-socket by `sk_msg`, per pod netns and direction.
pub const MAP_FASTPATH: &str = "NM_FASTPATH";

/// Program (function) names in the object.
pub const PROG_CONNECT4: &str = "nodemesh_connect4";
pub const PROG_SOCK_OPS: &str = "nodemesh_sock_ops";
pub const PROG_SK_MSG: &str = "nodemesh_sk_msg";

/// Default sizes; the agent may override them at load time.
pub const ORIG_DST_ENTRIES: u32 = 65536;
pub const SOCKS_ENTRIES: u32 = 65536;
pub const BYPASS_ENTRIES: u32 = 1024;
pub const FASTPATH_ENTRIES: u32 = 8192;

/// `Config::flags`: move app↔proxy bytes socket-to-socket with `sk_msg`.
pub const FLAG_FAST_PATH: u32 = 1;

/// `FastPathKey::to`: who received the bytes.
pub const TO_PROXY: u32 = 0;
pub const TO_APP: u32 = 1;

/// Agent settings the programs read on every call.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The outbound listener's port inside each pod's netns (15001).
    pub outbound_port: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// The agent's own cgroup id: its sockets are never redirected.
    pub agent_cgroup: u64,
}

/// The destination an application asked for before redirection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv4 address, network order.
    pub ip4: u32,
    /// Port, host order.
    pub port: u32,
}

/// Identifies the client end of a loopback connection inside one netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// `bpf_get_netns_cookie`: tuples repeat across pod namespaces.
    pub netns: u64,
    pub ip4: u32,
    pub port: u32,
}

/// Identifies one end of a loopback connection for `sk_msg` lookups: the
/// peer's key is this with local and remote swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns: u64,
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_port: u32,
    pub remote_port: u32,
}

impl SockKey {
    /// The key of the other end of the same connection.
    #[inline(always)]
    pub const fn peer(&self) -> Self {
        Self {
            netns: self.netns,
            local_ip4: self.remote_ip4,
            remote_ip4: self.local_ip4,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Key of the fast-path byte counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FastPathKey {
    /// The pod's netns cookie.
    pub netns: u64,
    /// [`TO_PROXY`] or [`TO_APP`].
    pub to: u32,
    pub _pad: u32,
}

/// Key of [`MAP_BYPASS_PORTS`] entries is the port (host order, `u32`); the
/// value is ignored.
pub type BypassPort = u32;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, and padded explicitly.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ClientKey {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::FastPathKey {}
}
