//! nodemesh's eBPF programs. Each program is a thin entry point over a
//! `try_*` function; all maps are declared together below.
//!
//! The data path (docs/datapath.md has the maps, pins and restarts):
//! 1. `connect4`, attached to each meshed pod's cgroup, remembers where a TCP
//!    `connect()` was going (by socket cookie) and sends it to the agent's
//!    listener inside the pod's own netns instead.
//! 2. `sock_ops`, attached at a cgroup above both pods and agent, sees both
//!    ends of that loopback connection become established: it re-keys the
//!    original destination from the client's socket to the accepted one (the
//!    agent reads it by `SO_COOKIE`) and, with the fast path on, puts both
//!    sockets into a `SockHash`.
//! 3. `sk_msg` moves each message straight to the peer socket's receive
//!    queue, skipping the loopback TCP/IP stack, and counts the bytes.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action::SK_PASS,
    },
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_msg, sock_ops},
    maps::{
        Array, HashMap, LruHashMap, LruPerCpuHashMap, SockHash,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use nodemesh_common::{
    BYPASS_ENTRIES, BypassPort, ClientKey, Config, FASTPATH_ENTRIES, FLAG_FAST_PATH, FastPathKey,
    ORIG_DST_ENTRIES, OrigDst, SOCKS_ENTRIES, SockKey, TO_APP, TO_PROXY,
};

// ---- maps -----------------------------------------------------------------
// All pinned by name (the agent chooses the directory), so a restarted agent
// keeps in-flight state and the sockets already in the SockHash.

#[map]
static NM_CONFIG: Array<Config> = Array::pinned(1, 0);

#[map]
static NM_ORIG_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

#[map]
static NM_PENDING: LruHashMap<ClientKey, OrigDst> = LruHashMap::pinned(ORIG_DST_ENTRIES, 0);

#[map]
static NM_SOCKS: SockHash<SockKey> = SockHash::pinned(SOCKS_ENTRIES, 0);

#[map]
static NM_BYPASS_NETS: LpmTrie<u32, u8> = LpmTrie::pinned(BYPASS_ENTRIES, 0);

#[map]
static NM_BYPASS_PORTS: HashMap<BypassPort, u8> = HashMap::pinned(BYPASS_ENTRIES, 0);

#[map]
static NM_FASTPATH: LruPerCpuHashMap<FastPathKey, u64> =
    LruPerCpuHashMap::pinned(FASTPATH_ENTRIES, 0);

// ---- constants --------------------------------------------------------------

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// 127.0.0.1 as the kernel stores it (network order in a u32).
const LOCALHOST: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// Allow the syscall to continue (cgroup/connect4 return value).
const ALLOW: i32 = 1;

#[inline(always)]
fn config() -> Option<&'static Config> {
    NM_CONFIG.get(0)
}

/// `remote_port` in `bpf_sock_ops` and `sk_msg_md` is the network-order port
/// in the upper 16 bits (little-endian hosts).
#[inline(always)]
fn remote_port(raw: u32) -> u32 {
    u16::from_be((raw >> 16) as u16) as u32
}

#[inline(always)]
fn is_loopback(ip4: u32) -> bool {
    // First octet 127 (network order: the lowest byte in memory).
    ip4.to_ne_bytes()[0] == 127
}

// ---- cgroup/connect4 ------------------------------------------------------

#[cgroup_sock_addr(connect4)]
pub fn nodemesh_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(()) => ALLOW,
        Err(reason) => {
            warn!(&ctx, "connect4: not redirected: {}", reason);
            ALLOW
        }
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<(), &'static str> {
    // SAFETY: the kernel passes a valid context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return Ok(());
    }
    let Some(cfg) = config() else {
        return Err("no config");
    };
    let ip4 = sa.user_ip4;
    let port = u16::from_be(sa.user_port as u16) as u32;
    // Loopback stays inside the pod (the agent's own listener included);
    // any other address is redirected, whatever its port.
    if is_loopback(ip4) {
        return Ok(());
    }
    // The agent's sockets are never redirected, wherever they are made.
    // SAFETY: helper without arguments.
    if unsafe { bpf_get_current_cgroup_id() } == cfg.agent_cgroup {
        return Ok(());
    }
    if NM_BYPASS_NETS.get(Key::new(32, ip4)).is_some() {
        return Ok(());
    }
    // SAFETY: a read-only lookup of a plain u8.
    if unsafe { NM_BYPASS_PORTS.get(port) }.is_some() {
        return Ok(());
    }
    // SAFETY: the context is a valid bpf_sock_addr.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    NM_ORIG_DST
        .insert(cookie, OrigDst { ip4, port }, BPF_ANY as u64)
        .map_err(|_| "orig-dst map update failed")?;
    sa.user_ip4 = LOCALHOST;
    sa.user_port = ((cfg.outbound_port as u16).to_be()) as u32;
    debug!(
        ctx,
        "connect4: cookie {} redirected (port {})", cookie, port
    );
    Ok(())
}

// ---- sock_ops -------------------------------------------------------------

#[sock_ops]
pub fn nodemesh_sock_ops(ctx: SockOpsContext) -> u32 {
    if let Err(reason) = try_sock_ops(&ctx) {
        warn!(&ctx, "sock_ops: {}", reason);
    }
    // The return value is ignored for these callbacks.
    0
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), &'static str> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return Ok(());
    }
    // AF_INET only (connect4 redirects only IPv4).
    if ctx.family() != 2 {
        return Ok(());
    }
    let Some(cfg) = config() else {
        return Err("no config");
    };
    let local_ip4 = ctx.local_ip4();
    let remote_ip4 = ctx.remote_ip4();
    let local_port = ctx.local_port();
    let remote_port = remote_port(ctx.remote_port());
    if local_ip4 != LOCALHOST || remote_ip4 != LOCALHOST {
        return Ok(());
    }
    // SAFETY: the context is a valid bpf_sock_ops.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // The application's end: was its connect() redirected?
        if remote_port != cfg.outbound_port {
            return Ok(());
        }
        // SAFETY: the context is a valid bpf_sock_ops.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        // SAFETY: copied out at once.
        let Some(orig) = (unsafe { NM_ORIG_DST.get(cookie) }).copied() else {
            return Ok(());
        };
        let client = ClientKey {
            netns,
            ip4: local_ip4,
            port: local_port,
        };
        NM_PENDING
            .insert(client, orig, BPF_ANY as u64)
            .map_err(|_| "pending map update failed")?;
        let _ = NM_ORIG_DST.remove(cookie);
    } else {
        // The proxy's accepted end.
        if local_port != cfg.outbound_port {
            return Ok(());
        }
        let client = ClientKey {
            netns,
            ip4: remote_ip4,
            port: remote_port,
        };
        // SAFETY: copied out at once.
        let Some(orig) = (unsafe { NM_PENDING.get(client) }).copied() else {
            return Ok(());
        };
        // SAFETY: the context is a valid bpf_sock_ops.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        NM_ORIG_DST
            .insert(cookie, orig, BPF_ANY as u64)
            .map_err(|_| "orig-dst map update failed")?;
        let _ = NM_PENDING.remove(client);
    }
    if cfg.flags & FLAG_FAST_PATH != 0 {
        let mut key = SockKey {
            netns,
            local_ip4,
            remote_ip4,
            local_port,
            remote_port,
        };
        // SAFETY: the context is a valid bpf_sock_ops.
        NM_SOCKS
            .update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64)
            .map_err(|_| "sockhash update failed")?;
    }
    Ok(())
}

// ---- sk_msg ---------------------------------------------------------------

#[sk_msg]
pub fn nodemesh_sk_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx);
    // Always pass: when the peer is not in the map the helper returns
    // SK_DROP, and returning that would drop the data instead of sending it
    // the normal way.
    SK_PASS
}

fn try_sk_msg(ctx: &SkMsgContext) {
    // SAFETY: the context is a valid sk_msg_md.
    let md = unsafe { &*ctx.msg };
    if md.family != 2 {
        return;
    }
    // SAFETY: the context is a valid sk_msg_md.
    let netns = unsafe { bpf_get_netns_cookie(ctx.msg.cast()) };
    let own = SockKey {
        netns,
        local_ip4: md.local_ip4,
        remote_ip4: md.remote_ip4,
        local_port: md.local_port,
        remote_port: remote_port(md.remote_port),
    };
    let mut peer = own.peer();
    let size = md.size;
    if NM_SOCKS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) != SK_PASS as i64 {
        return;
    }
    let Some(cfg) = config() else {
        return;
    };
    let key = FastPathKey {
        netns,
        to: if own.local_port == cfg.outbound_port {
            TO_APP
        } else {
            TO_PROXY
        },
        _pad: 0,
    };
    match NM_FASTPATH.get_ptr_mut(key) {
        // SAFETY: a per-CPU slot: no other writer runs on this CPU now.
        Some(bytes) => unsafe { *bytes += size as u64 },
        None => {
            let _ = NM_FASTPATH.insert(key, size as u64, BPF_ANY as u64);
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
