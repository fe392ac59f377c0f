//! The contract between the eBPF programs and the agent: map names, the
//! `#[repr(C)]` keys and values stored in them, and the constants both sides
//! must agree on.
//!
//! Byte order: addresses are kept exactly as the kernel hands them to BPF
//! programs (network order in `u32` words); an IPv4 address in an IPv6
//! field is the v4-mapped form `::ffff:a.b.c.d`, so one key type serves
//! both families. Ports are host order in a `u32`. Every struct is padded
//! explicitly, because BPF hashes keys byte by byte and implicit padding
//! would carry garbage.
#![no_std]

/// Bump when any map's key, value or type changes, or the pin layout does:
/// pins live in a directory named after it, so an agent never reuses a map
/// with another layout.
pub const LAYOUT_VERSION: u32 = 3;

/// Original destinations of redirected connections, keyed by socket cookie
/// (first the client's, then the accepted socket's).
pub const MAP_ORIG_DST: &str = "NM_ORIG_DST";
/// Original destinations between the client's and the proxy's side of the
/// handshake, keyed by [`ClientKey`].
pub const MAP_PENDING: &str = "NM_PENDING";
/// The original destination of each redirected app socket, for as long as
/// it lives: what `getpeername()` answers.
pub const MAP_PEERS: &str = "NM_PEERS";
/// Captured pods whose listener is up, by netns cookie ([`PodNet`]): only
/// these are redirected; a pod whose programs are attached but which is not
/// in here gets `EPERM` on connect (fail closed, never around the proxy).
pub const MAP_PODS: &str = "NM_PODS";
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
/// Pod addresses whose inbound is captured (value: unused); an address in
/// here with no listener in [`MAP_INBOUND_LISTENERS`] refuses connections
/// (fail closed).
pub const MAP_INBOUND: &str = "NM_INBOUND";
/// The agent's inbound listener inside each captured pod's netns, by pod
/// address: `sk_lookup` hands new connections to it.
pub const MAP_INBOUND_LISTENERS: &str = "NM_INBOUND_LISTENERS";
/// Pod ports whose inbound is not captured ([`InboundPort`]).
pub const MAP_INBOUND_SKIP: &str = "NM_INBOUND_SKIP";
/// The real client of each connection the agent is making to an app, by
/// the agent socket's cookie (its port is not chosen until it connects);
/// a client port 0 means "the agent socket's". `sock_ops` moves it to
/// [`MAP_INBOUND_PEERS`] once that socket is established.
pub const MAP_INBOUND_PENDING: &str = "NM_INBOUND_PENDING";
/// The same by the connection's ends ([`InboundPeerKey`]), until
/// `sock_ops` moves it to [`MAP_PEERS`] under the app's socket.
pub const MAP_INBOUND_PEERS: &str = "NM_INBOUND_PEERS";

/// Program (function) names in the object.
pub const PROG_CONNECT4: &str = "nodemesh_connect4";
pub const PROG_CONNECT6: &str = "nodemesh_connect6";
pub const PROG_GETPEERNAME4: &str = "nodemesh_getpeername4";
pub const PROG_GETPEERNAME6: &str = "nodemesh_getpeername6";
pub const PROG_GETSOCKNAME4: &str = "nodemesh_getsockname4";
pub const PROG_GETSOCKNAME6: &str = "nodemesh_getsockname6";
pub const PROG_SOCK_OPS: &str = "nodemesh_sock_ops";
pub const PROG_SK_MSG: &str = "nodemesh_sk_msg";
/// `sk_lookup`, attached to each captured pod's netns.
pub const PROG_INBOUND: &str = "nodemesh_inbound";

/// The programs attached to each captured pod's cgroup, in attach order:
/// the address hooks first, the redirecting `connect` hooks last, so no
/// connection is redirected before `getpeername()` can answer for it.
pub const POD_PROGRAMS: [&str; 6] = [
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
    PROG_GETSOCKNAME4,
    PROG_GETSOCKNAME6,
    PROG_CONNECT4,
    PROG_CONNECT6,
];

/// Default sizes; the agent may override them at load time.
pub const ORIG_DST_ENTRIES: u32 = 65536;
pub const PEERS_ENTRIES: u32 = 262144;
pub const PODS_ENTRIES: u32 = 4096;
pub const SOCKS_ENTRIES: u32 = 65536;
pub const BYPASS_ENTRIES: u32 = 1024;
pub const FASTPATH_ENTRIES: u32 = 8192;
pub const INBOUND_ENTRIES: u32 = 8192;
pub const INBOUND_PEERS_ENTRIES: u32 = 65536;

/// `Config::flags`: move app↔proxy bytes socket-to-socket with `sk_msg`.
pub const FLAG_FAST_PATH: u32 = 1;

/// `FastPathKey::to`: who received the bytes.
pub const TO_PROXY: u32 = 0;
pub const TO_APP: u32 = 1;

/// The third word of a v4-mapped address (`::ffff:0:0`), network order.
pub const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// An IPv4 address (network order) as a v4-mapped IPv6 one.
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED, ip4]
}

/// The IPv4 address of a v4-mapped IPv6 one.
#[inline(always)]
pub const fn as_v4(ip: &[u32; 4]) -> Option<u32> {
    if ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED {
        Some(ip[3])
    } else {
        None
    }
}

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
    /// IPv6, or v4-mapped IPv4; network order words.
    pub ip: [u32; 4],
    /// Port, host order.
    pub port: u32,
    pub _pad: u32,
}

/// Identifies the client end of a loopback connection inside one netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// `bpf_get_netns_cookie`: tuples repeat across pod namespaces.
    pub netns: u64,
    /// `127.0.0.1` (v4-mapped) or `::1`.
    pub ip: [u32; 4],
    pub port: u32,
    pub _pad: u32,
}

/// A captured pod's own addresses (what `getsockname()` answers for its
/// redirected sockets); zero where it has none of that family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodNet {
    pub ip6: [u32; 4],
    pub ip4: u32,
    pub _pad: u32,
}

/// Identifies one end of an IPv4 loopback connection for `sk_msg` lookups
/// (the fast path is IPv4 only): the peer's key is this with local and
/// remote swapped.
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

/// A port of a pod address ([`MAP_INBOUND_SKIP`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundPort {
    pub ip: [u32; 4],
    pub port: u32,
    pub _pad: u32,
}

/// The agent's end of a connection it makes to an app inside the app's pod
/// (from the pod's own address): the address, the agent's port, the app's
/// port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct InboundPeerKey {
    pub ip: [u32; 4],
    pub from_port: u32,
    pub to_port: u32,
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
    unsafe impl aya::Pod for super::PodNet {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::FastPathKey {}
    unsafe impl aya::Pod for super::InboundPort {}
    unsafe impl aya::Pod for super::InboundPeerKey {}
}
