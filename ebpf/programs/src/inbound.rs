//! Inbound capture: `sk_lookup` hands a pod's new connections to the
//! agent's listener in its netns, and its `sock_ops` halves recognise the
//! agent's own deliveries and give the app's side its real client.
use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_STATE_CB_FLAG,
        sk_action::{SK_DROP, SK_PASS},
    },
    helpers::bpf_get_socket_cookie,
    macros::sk_lookup,
    programs::{SkLookupContext, SockOpsContext},
};
use nodemesh_common::{InboundPeerKey, InboundPort, v4_mapped};

use crate::{is_loopback_endpoint, maps::*};

/// The agent's delivering socket is about to send its SYN (its port is
/// known now): key its client by the connection's ends, for `sk_lookup`
/// (the agent's own, let through to the app) and for the app's side
/// (whose `getpeername` answers that client).
#[inline(always)]
pub(crate) fn inbound_dialled(
    ctx: &SockOpsContext,
    ip: [u32; 4],
    from_port: u32,
    to_port: u32,
) -> Result<(), &'static str> {
    // SAFETY: the context is a valid bpf_sock_ops.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: copied out at once.
    let Some(mut client) = (unsafe { NM_INBOUND_PENDING.get(cookie) }).copied() else {
        return Ok(());
    };
    let _ = NM_INBOUND_PENDING.remove(cookie);
    if client.port == 0 {
        client.port = from_port;
    }
    let key = InboundPeerKey {
        ip,
        from_port,
        to_port,
    };
    NM_INBOUND_PEERS
        .insert(key, client, BPF_ANY as u64)
        .map_err(|_| "inbound peers map update failed")?;
    // Tell us if it closes before the app's side took the entry.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    Ok(())
}

/// An app accepted a connection from inside its own pod: if the agent
/// made it (delivering an inbound connection), the app's socket answers
/// `getpeername` with the real client.
#[inline(always)]
pub(crate) fn inbound_delivered(
    ctx: &SockOpsContext,
    ip: [u32; 4],
    from_port: u32,
    to_port: u32,
) -> Result<(), &'static str> {
    let key = InboundPeerKey {
        ip,
        from_port,
        to_port,
    };
    // SAFETY: copied out at once.
    let Some(client) = (unsafe { NM_INBOUND_PEERS.get(key) }).copied() else {
        return Ok(());
    };
    // SAFETY: the context is a valid bpf_sock_ops.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    NM_PEERS
        .insert(cookie, client, BPF_ANY as u64)
        .map_err(|_| "peers map update failed")?;
    let _ = NM_INBOUND_PEERS.remove(key);
    // Tell us when it closes, to forget its peer.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    Ok(())
}

// ---- sk_lookup ------------------------------------------------------------

#[sk_lookup]
pub fn nodemesh_inbound(ctx: SkLookupContext) -> u32 {
    try_inbound(&ctx)
}

#[inline(always)]
fn try_inbound(ctx: &SkLookupContext) -> u32 {
    // SAFETY: the context is a valid bpf_sk_lookup.
    let l = unsafe { &*ctx.lookup };
    // UDP (and SCTP) is outside the mesh, and its inbound policy, by
    // design: a datagram answering a pod's unconnected socket (a DNS reply)
    // cannot be told here from a new one (README, Limits).
    if l.protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let (local, remote) = if l.family == AF_INET {
        (v4_mapped(l.local_ip4), v4_mapped(l.remote_ip4))
    } else if l.family == AF_INET6 {
        let mut local = [0u32; 4];
        let mut remote = [0u32; 4];
        for i in 0..4 {
            // SAFETY: a valid context; each word read on its own.
            unsafe {
                local[i] =
                    core::ptr::read_volatile(core::ptr::addr_of!((*ctx.lookup).local_ip6[i]));
                remote[i] =
                    core::ptr::read_volatile(core::ptr::addr_of!((*ctx.lookup).remote_ip6[i]));
            }
        }
        (local, remote)
    } else {
        return SK_PASS;
    };
    // Loopback stays the pod's own (the agent's listeners are there too).
    if is_loopback_endpoint(&local) {
        return SK_PASS;
    }
    // The agent delivering a connection it decided on, from the pod's own
    // address (known by its ends since its SYN): to the app. Anything else
    // from the pod to itself is captured like any client.
    if local == remote {
        let key = InboundPeerKey {
            ip: local,
            from_port: u32::from(u16::from_be(l.remote_port)),
            to_port: l.local_port,
        };
        // SAFETY: a read-only presence check.
        if unsafe { NM_INBOUND_PEERS.get(key) }.is_some() {
            return SK_PASS;
        }
    }
    // Every address of a captured pod's netns is captured: one the agent
    // has not listed yet (just added, say) is closed until it has.
    // SAFETY: a read-only presence check.
    if unsafe { NM_INBOUND.get(local) }.is_none() {
        return SK_DROP;
    }
    let port = InboundPort {
        ip: local,
        port: l.local_port,
        _pad: 0,
    };
    // SAFETY: a read-only presence check.
    if unsafe { NM_INBOUND_SKIP.get(port) }.is_some() {
        return SK_PASS;
    }
    match NM_INBOUND_LISTENERS.redirect_sk_lookup(ctx, local, 0) {
        Ok(()) => SK_PASS,
        // Captured, and no agent to take it: closed, never around.
        Err(_) => SK_DROP,
    }
}
