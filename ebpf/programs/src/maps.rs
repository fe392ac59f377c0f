//! Every map the programs share, pinned by name, and the constants of the
//! kernel's ABI they use.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, LruPerCpuHashMap, PerCpuArray, SockHash},
};
use nodemesh_common::{
    BYPASS_ENTRIES, BypassPort, ClientKey, Config, FASTPATH_ENTRIES, FastPathKey, INBOUND_ENTRIES,
    INBOUND_PEERS_ENTRIES, InboundPeerKey, InboundPort, ORIG_DST_ENTRIES, OrigDst, PEERS_ENTRIES,
    PODS_ENTRIES, PodNet, SOCKS_ENTRIES, SockKey,
};

// ---- maps -----------------------------------------------------------------
// All pinned by name (the agent chooses the directory), so a restarted agent
// keeps in-flight state and the sockets already in the SockHash.

#[map]
pub(crate) static NM_CONFIG: Array<Config> = Array::pinned(1, 0);

#[map]
pub(crate) static NM_ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

#[map]
pub(crate) static NM_PENDING: LruHashMap<ClientKey, OrigDst> =
    LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

#[map]
pub(crate) static NM_PEERS: LruHashMap<u64, OrigDst> = LruHashMap::pinned(PEERS_ENTRIES, 0);

#[map]
pub(crate) static NM_PODS: HashMap<u64, PodNet> = HashMap::pinned(PODS_ENTRIES, 0);

#[map]
pub(crate) static NM_SOCKS: SockHash<SockKey> = SockHash::pinned(SOCKS_ENTRIES, 0);

#[map]
pub(crate) static NM_BYPASS_NETS: LpmTrie<u32, u8> = LpmTrie::pinned(BYPASS_ENTRIES, 0);

#[map]
pub(crate) static NM_BYPASS_PORTS: HashMap<BypassPort, u8> = HashMap::pinned(BYPASS_ENTRIES, 0);

#[map]
pub(crate) static NM_FASTPATH: LruPerCpuHashMap<FastPathKey, u64> =
    LruPerCpuHashMap::pinned(FASTPATH_ENTRIES, 0);

#[map]
pub(crate) static NM_INBOUND: HashMap<[u32; 4], u32> = HashMap::pinned(INBOUND_ENTRIES, 0);

#[map]
pub(crate) static NM_INBOUND_LISTENERS: SockHash<[u32; 4]> = SockHash::pinned(INBOUND_ENTRIES, 0);

#[map]
pub(crate) static NM_INBOUND_SKIP: HashMap<InboundPort, u8> = HashMap::pinned(INBOUND_ENTRIES, 0);

#[map]
pub(crate) static NM_INBOUND_PENDING: LruHashMap<u64, OrigDst> =
    LruHashMap::pinned(INBOUND_PEERS_ENTRIES, 0);

#[map]
pub(crate) static NM_INBOUND_PEERS: LruHashMap<InboundPeerKey, OrigDst> =
    LruHashMap::pinned(INBOUND_PEERS_ENTRIES, 0);

/// When each CPU last let a warning through (not pinned: a rate, not
/// state a restarted agent needs).
#[map]
pub(crate) static NM_WARNED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

// ---- constants --------------------------------------------------------------

pub(crate) const SOCK_STREAM: u32 = 1;
pub(crate) const IPPROTO_TCP: u32 = 6;
pub(crate) const AF_INET: u32 = 2;
pub(crate) const AF_INET6: u32 = 10;
/// 127.0.0.1 as the kernel stores it (network order in a u32).
pub(crate) const LOCALHOST: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1, network order words.
pub(crate) const LOCALHOST6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// Allow the syscall to continue (cgroup sock_addr return value).
pub(crate) const ALLOW: i32 = 1;
/// Fail it with EPERM.
pub(crate) const DENY: i32 = 0;
/// `TCP_CLOSE`, the state a socket ends in.
pub(crate) const TCP_CLOSE: u32 = 7;

#[inline(always)]
pub(crate) fn config() -> Option<&'static Config> {
    NM_CONFIG.get(0)
}
