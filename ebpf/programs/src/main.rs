//! nodemesh's eBPF programs. Each program is a thin entry point over a
//! `try_*` function; all maps are declared together below.
//!
//! The data path (docs/datapath.md has the maps, pins and restarts):
//! 1. `connect4`/`connect6`, attached to each meshed pod's cgroup, remember
//!    where a TCP `connect()` was going (by socket cookie) and send it to
//!    the agent's listener inside the pod's own netns instead
//!    (`127.0.0.1:15001`, or `[::1]:15001` for IPv6; IPv4-mapped addresses
//!    count as IPv4). A pod whose listener is not up yet gets `EPERM`: its
//!    connections fail closed, never around the proxy.
//! 2. `sock_ops`, attached at a cgroup above both pods and agent, sees both
//!    ends of that loopback connection become established: it re-keys the
//!    original destination from the client's socket to the accepted one (the
//!    agent reads it by `SO_COOKIE`) and, with the fast path on, puts both
//!    sockets into a `SockHash` (IPv4 only).
//! 3. `getpeername4/6` answer with the original destination, and
//!    `getsockname4/6` with the pod's own address, for redirected sockets:
//!    the app sees what it would without the mesh.
//! 4. `sk_msg` moves each message straight to the peer socket's receive
//!    queue, skipping the loopback TCP/IP stack, and counts the bytes.
//! 5. `sk_lookup` (`nodemesh_inbound`), attached to each captured pod's
//!    netns, hands every new TCP connection to any of the pod's addresses
//!    (every one its netns has, link-local ones included) to the agent's
//!    inbound listener in that netns (bound to loopback; the accepted
//!    socket keeps the original destination as its local address) —
//!    unless it is the agent's own delivery (known by its ends, recorded by
//!    `sock_ops` right before its SYN) or its port is exempt. An address
//!    the agent has not listed, or one with no listener (no agent), drops
//!    the SYN: fail closed. `sock_ops` then gives the app's accepted socket
//!    the real client's address, which `getpeername` (and `accept`) answer.
//!
//! A meshed pod's connect to a link-local IPv6 address is refused: the
//! proxy could not dial it (the scope is not part of the destination), and
//! it would go around the mesh.
//!
//! The maps are `maps`', inbound capture (5) is `inbound`'s; helpers stay
//! `#[inline(always)]` wherever they live (the verifier takes no context
//! pointer through a call).
#![no_std]
#![no_main]

mod inbound;
mod maps;

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock_addr, sk_action::SK_PASS,
    },
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::{cgroup_sock_addr, sk_msg, sock_ops},
    maps::lpm_trie::Key,
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};
use nodemesh_common::{
    ClientKey, Config, FLAG_FAST_PATH, FastPathKey, InboundPeerKey, OrigDst, PodNet, SockKey,
    TO_APP, TO_PROXY, as_v4, v4_mapped,
};

use crate::{
    inbound::{inbound_delivered, inbound_dialled},
    maps::*,
};

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

/// The context's `user_ip6`, read a word at a time (the verifier allows
/// only 4-byte accesses to it).
#[inline(always)]
fn user_ip6(sa: *const bpf_sock_addr) -> [u32; 4] {
    let mut ip = [0u32; 4];
    for (i, word) in ip.iter_mut().enumerate() {
        // SAFETY: a valid context; each word read on its own.
        *word = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*sa).user_ip6[i])) };
    }
    ip
}

/// Writes the context's `user_ip6` a word at a time.
#[inline(always)]
fn set_user_ip6(sa: *mut bpf_sock_addr, ip: &[u32; 4]) {
    for (i, word) in ip.iter().enumerate() {
        // SAFETY: a valid, writable context; each word written on its own.
        unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*sa).user_ip6[i]), *word) };
    }
}

#[inline(always)]
fn set_user_port(sa: *mut bpf_sock_addr, port: u32) {
    // SAFETY: a valid, writable context. The port is network order in the
    // low 16 bits; the whole u32 is written.
    unsafe {
        core::ptr::write_volatile(
            core::ptr::addr_of_mut!((*sa).user_port),
            (port as u16).to_be() as u32,
        )
    };
}

/// Whether a warning may go to the log now: one a second per CPU, so a pod
/// whose connects fail in a loop cannot flood the agent's log ring (the
/// failures are refused all the same).
#[inline(always)]
fn may_warn() -> bool {
    // SAFETY: a helper with no arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(last) = NM_WARNED.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's own slot of a one-entry array; programs on one CPU
    // do not preempt each other.
    unsafe {
        if *last != 0 && now.wrapping_sub(*last) < 1_000_000_000 {
            return false;
        }
        *last = now;
    }
    true
}

// ---- cgroup/connect4 and connect6 -----------------------------------------

#[cgroup_sock_addr(connect4)]
pub fn nodemesh_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            if may_warn() {
                warn!(&ctx, "connect4: not redirected: {}", reason);
            }
            DENY
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn nodemesh_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(verdict) => verdict,
        Err(reason) => {
            if may_warn() {
                warn!(&ctx, "connect6: not redirected: {}", reason);
            }
            DENY
        }
    }
}

/// What happens to a connect: left alone, refused (the pod is not ready),
/// or redirected to the agent.
enum Decision {
    Leave,
    Deny,
    Redirect,
}

/// The common checks: TCP, not the agent, not bypassed, the pod ready.
#[inline(always)]
fn decide(ctx: &SockAddrContext, cfg: &Config, ip4: Option<u32>, port: u32) -> Decision {
    // SAFETY: the kernel passes a valid context for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return Decision::Leave;
    }
    // The agent's sockets are never redirected, wherever they are made.
    // SAFETY: helper without arguments.
    if unsafe { bpf_get_current_cgroup_id() } == cfg.agent_cgroup {
        return Decision::Leave;
    }
    if let Some(ip4) = ip4
        && NM_BYPASS_NETS.get(Key::new(32, ip4)).is_some()
    {
        return Decision::Leave;
    }
    // SAFETY: a read-only lookup of a plain u8.
    if unsafe { NM_BYPASS_PORTS.get(port) }.is_some() {
        return Decision::Leave;
    }
    // SAFETY: the context is a valid bpf_sock_addr.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: a read-only presence check.
    if unsafe { NM_PODS.get(netns) }.is_none() {
        // Attached, but the pod's listener is not up (yet): fail closed.
        return Decision::Deny;
    }
    Decision::Redirect
}

/// Records `orig` for the socket being connected.
#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: &OrigDst) -> Result<u64, &'static str> {
    // SAFETY: the context is a valid bpf_sock_addr.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    NM_ORIG_DST
        .insert(cookie, *orig, BPF_ANY as u64)
        .map_err(|_| "orig-dst map update failed")?;
    NM_PEERS
        .insert(cookie, *orig, BPF_ANY as u64)
        .map_err(|_| "peers map update failed")?;
    Ok(cookie)
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, &'static str> {
    let Some(cfg) = config() else {
        return Err("no config");
    };
    // SAFETY: the kernel passes a valid context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip4 = sa.user_ip4;
    let port = u16::from_be(sa.user_port as u16) as u32;
    // Loopback stays inside the pod (the agent's own listener included);
    // any other address is redirected, whatever its port.
    if is_loopback(ip4) {
        return Ok(ALLOW);
    }
    match decide(ctx, cfg, Some(ip4), port) {
        Decision::Leave => return Ok(ALLOW),
        Decision::Deny => return Ok(DENY),
        Decision::Redirect => {}
    }
    let cookie = remember(
        ctx,
        &OrigDst {
            ip: v4_mapped(ip4),
            port,
            _pad: 0,
        },
    )?;
    sa.user_ip4 = LOCALHOST;
    set_user_port(ctx.sock_addr, cfg.outbound_port);
    debug!(
        ctx,
        "connect4: cookie {} redirected (port {})", cookie, port
    );
    Ok(ALLOW)
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, &'static str> {
    let Some(cfg) = config() else {
        return Err("no config");
    };
    let ip = user_ip6(ctx.sock_addr);
    // SAFETY: the kernel passes a valid context for the program's lifetime.
    let port = u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16) as u32;
    let ip4 = as_v4(&ip);
    let local = match ip4 {
        Some(ip4) => is_loopback(ip4),
        // ::1, and :: (the host itself).
        None => ip == LOCALHOST6 || ip == [0; 4],
    };
    if local {
        return Ok(ALLOW);
    }
    match decide(ctx, cfg, ip4, port) {
        Decision::Leave => return Ok(ALLOW),
        Decision::Deny => return Ok(DENY),
        Decision::Redirect => {}
    }
    // Link-local fe80::/10 (never IPv4-mapped): another pod's (or the
    // node's) address on the link, which the proxy cannot dial for it (the
    // scope, the interface, is not part of the original destination).
    // Refused rather than sent around the mesh in the clear; a bypassed
    // port goes as any other does.
    if (u32::from_be(ip[0]) & 0xffc0_0000) == 0xfe80_0000 {
        debug!(
            ctx,
            "connect6: link-local destination refused (port {})", port
        );
        return Ok(DENY);
    }
    let cookie = remember(ctx, &OrigDst { ip, port, _pad: 0 })?;
    // An IPv4-mapped destination goes to the IPv4 listener.
    let to = match ip4 {
        Some(_) => v4_mapped(LOCALHOST),
        None => LOCALHOST6,
    };
    set_user_ip6(ctx.sock_addr, &to);
    set_user_port(ctx.sock_addr, cfg.outbound_port);
    debug!(
        ctx,
        "connect6: cookie {} redirected (port {})", cookie, port
    );
    Ok(ALLOW)
}

// ---- getpeername and getsockname ------------------------------------------

#[cgroup_sock_addr(getpeername4)]
pub fn nodemesh_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context is a valid bpf_sock_addr.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { NM_PEERS.get(cookie) }.copied()
        && let Some(ip4) = as_v4(&orig.ip)
    {
        // SAFETY: a valid, writable context.
        unsafe { (*ctx.sock_addr).user_ip4 = ip4 };
        set_user_port(ctx.sock_addr, orig.port);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn nodemesh_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the context is a valid bpf_sock_addr.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { NM_PEERS.get(cookie) }.copied() {
        set_user_ip6(ctx.sock_addr, &orig.ip);
        set_user_port(ctx.sock_addr, orig.port);
    }
    ALLOW
}

/// The pod's own addresses, for a socket that was redirected.
#[inline(always)]
fn redirected_pod(ctx: &SockAddrContext) -> Option<PodNet> {
    // SAFETY: the context is a valid bpf_sock_addr.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: a read-only presence check.
    unsafe { NM_PEERS.get(cookie) }?;
    // SAFETY: the context is a valid bpf_sock_addr.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: copied out at once.
    unsafe { NM_PODS.get(netns) }.copied()
}

#[cgroup_sock_addr(getsockname4)]
pub fn nodemesh_getsockname4(ctx: SockAddrContext) -> i32 {
    if let Some(pod) = redirected_pod(&ctx)
        && pod.ip4 != 0
    {
        // SAFETY: a valid, writable context.
        unsafe { (*ctx.sock_addr).user_ip4 = pod.ip4 };
    }
    ALLOW
}

#[cgroup_sock_addr(getsockname6)]
pub fn nodemesh_getsockname6(ctx: SockAddrContext) -> i32 {
    if let Some(pod) = redirected_pod(&ctx) {
        // SAFETY: the context is a valid bpf_sock_addr.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
        // SAFETY: copied out at once.
        let v4 = unsafe { NM_PEERS.get(cookie) }.is_some_and(|o| as_v4(&o.ip).is_some());
        let ip = if v4 { v4_mapped(pod.ip4) } else { pod.ip6 };
        if ip != [0; 4] && ip != v4_mapped(0) {
            set_user_ip6(ctx.sock_addr, &ip);
        }
    }
    ALLOW
}

// ---- sock_ops -------------------------------------------------------------

#[sock_ops]
pub fn nodemesh_sock_ops(ctx: SockOpsContext) -> u32 {
    if let Err(reason) = try_sock_ops(&ctx)
        && may_warn()
    {
        warn!(&ctx, "sock_ops: {}", reason);
    }
    // The return value is ignored for these callbacks.
    0
}

/// An endpoint's address as stored in keys: v4-mapped for IPv4.
#[inline(always)]
fn endpoint(ctx: &SockOpsContext, family: u32, local: bool) -> [u32; 4] {
    if family == AF_INET {
        v4_mapped(if local {
            ctx.local_ip4()
        } else {
            ctx.remote_ip4()
        })
    } else {
        let mut ip = [0u32; 4];
        for (i, word) in ip.iter_mut().enumerate() {
            // SAFETY: a valid context; each word read on its own.
            *word = unsafe {
                if local {
                    core::ptr::read_volatile(core::ptr::addr_of!((*ctx.ops).local_ip6[i]))
                } else {
                    core::ptr::read_volatile(core::ptr::addr_of!((*ctx.ops).remote_ip6[i]))
                }
            };
        }
        ip
    }
}

#[inline(always)]
pub(crate) fn is_loopback_endpoint(ip: &[u32; 4]) -> bool {
    *ip == LOCALHOST6 || as_v4(ip).is_some_and(is_loopback)
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), &'static str> {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return Ok(());
    }
    // Of the state changes, only the end matters (and comes often enough
    // not to read both ends first for every one).
    if op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) != TCP_CLOSE {
        return Ok(());
    }
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return Ok(());
    }
    let local_ip = endpoint(ctx, family, true);
    let remote_ip = endpoint(ctx, family, false);
    let local_port = ctx.local_port();
    let remote_port = remote_port(ctx.remote_port());
    // A connection inside a pod from its own address to itself: the agent
    // delivering an inbound connection (or the app calling itself).
    let in_pod = local_ip == remote_ip && !is_loopback_endpoint(&local_ip);
    if op == BPF_SOCK_OPS_STATE_CB {
        // A redirected app socket ends: forget what getpeername answers.
        // SAFETY: the context is a valid bpf_sock_ops.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
        if NM_PEERS.remove(cookie).is_ok() {
            return Ok(());
        }
        // An agent's delivery that never reached the app (refused, no
        // listener): its ends are no longer the agent's.
        if in_pod {
            let _ = NM_INBOUND_PEERS.remove(InboundPeerKey {
                ip: local_ip,
                from_port: local_port,
                to_port: remote_port,
            });
        }
        return Ok(());
    }
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // Right before the SYN: the agent's delivering socket has its
        // port now, so `sk_lookup` can tell the agent's own connections
        // from anyone else's to the pod (the app sees those only through
        // the agent).
        return if in_pod {
            inbound_dialled(ctx, local_ip, local_port, remote_port)
        } else {
            Ok(())
        };
    }
    if in_pod {
        return if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            Ok(())
        } else {
            inbound_delivered(ctx, local_ip, remote_port, local_port)
        };
    }
    let Some(cfg) = config() else {
        return Err("no config");
    };
    if !is_loopback_endpoint(&local_ip) || !is_loopback_endpoint(&remote_ip) {
        return Ok(());
    }
    // SAFETY: the context is a valid bpf_sock_ops.
    let netns = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    // SAFETY: the context is a valid bpf_sock_ops.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // The application's end: was its connect() redirected?
        if remote_port != cfg.outbound_port {
            return Ok(());
        }
        // SAFETY: copied out at once.
        let Some(orig) = (unsafe { NM_ORIG_DST.get(cookie) }).copied() else {
            return Ok(());
        };
        let client = ClientKey {
            netns,
            ip: local_ip,
            port: local_port,
            _pad: 0,
        };
        NM_PENDING
            .insert(client, orig, BPF_ANY as u64)
            .map_err(|_| "pending map update failed")?;
        let _ = NM_ORIG_DST.remove(cookie);
        // Tell us when it closes, to forget its peer.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    } else {
        // The proxy's accepted end.
        if local_port != cfg.outbound_port {
            return Ok(());
        }
        let client = ClientKey {
            netns,
            ip: remote_ip,
            port: remote_port,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        let Some(orig) = (unsafe { NM_PENDING.get(client) }).copied() else {
            return Ok(());
        };
        NM_ORIG_DST
            .insert(cookie, orig, BPF_ANY as u64)
            .map_err(|_| "orig-dst map update failed")?;
        let _ = NM_PENDING.remove(client);
    }
    if cfg.flags & FLAG_FAST_PATH != 0 && family == AF_INET {
        let mut key = SockKey {
            netns,
            local_ip4: ctx.local_ip4(),
            remote_ip4: ctx.remote_ip4(),
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
    if md.family != AF_INET {
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
