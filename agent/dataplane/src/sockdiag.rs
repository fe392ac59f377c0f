//! The kernel's socket table of one network namespace, over
//! `NETLINK_SOCK_DIAG` (what `ss` reads): the TCP sockets there, and
//! `SOCK_DESTROY` for the ones an inbound policy refuses that were made
//! before the pod was captured (they never passed the agent).
//!
//! The netlink socket belongs to the netns it was made in, so the caller
//! makes it inside the pod's ([`open`] under `Netns::enter`) and can use it
//! from any thread after. Only plain byte buffers and `nix`'s safe calls.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, OwnedFd},
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, sendto,
    socket,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// `TCP_LISTEN`.
pub const LISTEN: u8 = 10;
/// `TCP_TIME_WAIT` (a minisocket: nothing to destroy).
const TIME_WAIT: u8 = 6;
const HEADER: usize = 16;
/// `struct inet_diag_req_v2`.
const REQUEST: usize = 56;
/// `struct inet_diag_msg`, up to and including `idiag_inode`.
const MESSAGE: usize = 72;

/// `INET_DIAG_CGROUP_ID`: the cgroup v2 id of the socket's creator.
const INET_DIAG_CGROUP_ID: u16 = 21;

/// One TCP socket as the kernel lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub state: u8,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// Its inode (what `/proc/<pid>/fd` links name): whose it is.
    pub inode: u64,
    /// The cgroup (v2 id: the directory's inode) of the process that made
    /// it, where the kernel says.
    pub cgroup: Option<u64>,
    family: u8,
    /// `struct inet_diag_sockid` as the kernel sent it: what
    /// `SOCK_DESTROY` takes back (with the cookie) to find it.
    id: [u8; 48],
}

/// A `NETLINK_SOCK_DIAG` socket of one netns.
#[derive(Debug)]
pub struct SockDiag(OwnedFd);

/// Makes the socket in the calling thread's netns.
pub fn open() -> io::Result<SockDiag> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    Ok(SockDiag(fd))
}

impl SockDiag {
    /// Every TCP socket of the netns (both families) but those in
    /// `TIME_WAIT`.
    pub fn tcp(&self) -> io::Result<Vec<TcpSocket>> {
        let states = !(1u32 << TIME_WAIT);
        let mut all = self.dump(AF_INET, states)?;
        all.extend(self.dump(AF_INET6, states)?);
        Ok(all)
    }

    /// Aborts `s` (the app's end gets `ECONNABORTED`, the peer a reset).
    pub fn destroy(&self, s: &TcpSocket) -> io::Result<()> {
        let msg = request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            s.family,
            0xffff_ffff,
            &s.id,
        );
        self.ask(&msg, |answer| match answer {
            Some((NLMSG_ERROR, body)) => match error_code(body) {
                0 => Ok(()),
                code => Err(io::Error::from_raw_os_error(code)),
            },
            _ => Err(io::Error::other("no answer to SOCK_DESTROY")),
        })
    }

    /// The socket of this netns whose ends are exactly `local` and
    /// `remote` (one that made a connection from here), if any.
    pub fn find(&self, local: SocketAddr, remote: SocketAddr) -> io::Result<Option<TcpSocket>> {
        let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
        let mut id = [0u8; 48];
        id[0..2].copy_from_slice(&local.port().to_be_bytes());
        id[2..4].copy_from_slice(&remote.port().to_be_bytes());
        let put = |id: &mut [u8; 48], at: usize, ip: IpAddr| match ip {
            IpAddr::V4(v4) => id[at..at + 4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => id[at..at + 16].copy_from_slice(&v6.octets()),
        };
        put(&mut id, 4, local.ip());
        put(&mut id, 20, remote.ip());
        // No cookie to match: INET_DIAG_NOCOOKIE.
        id[40..48].copy_from_slice(&[0xff; 8]);
        let msg = request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, family, 0xffff_ffff, &id);
        self.ask(&msg, |answer| match answer {
            Some((SOCK_DIAG_BY_FAMILY, body)) => Ok(parse(body)),
            Some((NLMSG_ERROR, body)) => match error_code(body) {
                0 | libc::ENOENT => Ok(None),
                code => Err(io::Error::from_raw_os_error(code)),
            },
            _ => Ok(None),
        })
    }

    /// Whether a socket of this netns listens on `port` (either family):
    /// a connected socket with that local port is then an accepted one —
    /// connect's automatic ports skip every port a bind holds.
    pub fn listening_on(&self, port: u16) -> io::Result<bool> {
        for family in [AF_INET, AF_INET6] {
            if self
                .dump(family, 1u32 << LISTEN)?
                .iter()
                .any(|s| s.local.port() == port)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Sends one request and reads what `read` makes of the first
    /// message of its answer.
    fn ask<T>(
        &self,
        msg: &[u8],
        read: impl FnOnce(Option<(u16, &[u8])>) -> io::Result<T>,
    ) -> io::Result<T> {
        self.send(msg)?;
        let mut buf = vec![0u8; 8192];
        let n = recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        read(messages(&buf[..n]).next())
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        sendto(
            self.0.as_raw_fd(),
            msg,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )?;
        Ok(())
    }

    fn dump(&self, family: u8, states: u32) -> io::Result<Vec<TcpSocket>> {
        self.send(&request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            states,
            &[0; 48],
        ))?;
        let mut found = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = recv(self.0.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            if n == 0 {
                return Ok(found);
            }
            for (kind, body) in messages(&buf[..n]) {
                match kind {
                    NLMSG_DONE => return Ok(found),
                    NLMSG_ERROR => match error_code(body) {
                        0 => {}
                        code => return Err(io::Error::from_raw_os_error(code)),
                    },
                    SOCK_DIAG_BY_FAMILY => found.extend(parse(body)),
                    _ => {}
                }
            }
        }
    }
}

/// A request: `nlmsghdr` then `inet_diag_req_v2`.
fn request(kind: u16, flags: u16, family: u8, states: u32, id: &[u8; 48]) -> Vec<u8> {
    let len = (HEADER + REQUEST) as u32;
    let mut m = Vec::with_capacity(len as usize);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    m.extend_from_slice(&[family, IPPROTO_TCP, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

/// The messages in one datagram: (type, body).
fn messages(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < HEADER {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        if len < HEADER || len > buf.len() {
            return None;
        }
        let kind = u16::from_ne_bytes(buf[4..6].try_into().ok()?);
        let body = &buf[HEADER..len];
        // Messages are 4-byte aligned.
        let next = len.div_ceil(4) * 4;
        buf = &buf[next.min(buf.len())..];
        Some((kind, body))
    })
}

/// The (negative) errno of an `NLMSG_ERROR`, as a positive one.
fn error_code(body: &[u8]) -> i32 {
    body.get(0..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .map_or(libc::EIO, |e| -e)
}

/// One `inet_diag_msg`.
fn parse(body: &[u8]) -> Option<TcpSocket> {
    if body.len() < MESSAGE {
        return None;
    }
    let family = body[0];
    let state = body[1];
    let id: [u8; 48] = body[4..52].try_into().ok()?;
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let addr = |raw: &[u8]| -> Option<IpAddr> {
        match family {
            AF_INET => Some(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
            AF_INET6 => {
                let octets: [u8; 16] = raw.try_into().ok()?;
                Some(IpAddr::V6(Ipv6Addr::from(octets)).to_canonical())
            }
            _ => None,
        }
    };
    let local = addr(&id[4..20])?;
    let remote = addr(&id[20..36])?;
    let inode = u32::from_ne_bytes(body[68..72].try_into().ok()?);
    Some(TcpSocket {
        state,
        local: SocketAddr::new(local, sport),
        remote: SocketAddr::new(remote, dport),
        inode: u64::from(inode),
        cgroup: attribute(&body[MESSAGE..], INET_DIAG_CGROUP_ID)
            .and_then(|v| v.try_into().ok())
            .map(u64::from_ne_bytes),
        family,
        id,
    })
}

/// The value of attribute `kind` among netlink attributes.
fn attribute(mut attrs: &[u8], kind: u16) -> Option<&[u8]> {
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let t = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if t == kind {
            return Some(&attrs[4..len]);
        }
        let next = (len.div_ceil(4) * 4).min(attrs.len());
        attrs = &attrs[next..];
    }
    None
}

/// The inodes of this process's own sockets (`/proc/self/fd`).
pub fn own_socket_inodes() -> io::Result<std::collections::HashSet<u64>> {
    let mut inodes = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(link) = std::fs::read_link(entry?.path()) else {
            continue;
        };
        if let Some(n) = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:["))
            .and_then(|l| l.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        {
            inodes.insert(n);
        }
    }
    Ok(inodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(
        family: u8,
        state: u8,
        local: [u8; 4],
        sport: u16,
        remote: [u8; 4],
        dport: u16,
    ) -> Vec<u8> {
        let mut body = vec![family, state, 0, 0];
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&dport.to_be_bytes());
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&local);
        let mut dst = [0u8; 16];
        dst[..4].copy_from_slice(&remote);
        body.extend_from_slice(&src);
        body.extend_from_slice(&dst);
        body.extend_from_slice(&[0u8; 12]); // if, cookie
        body.extend_from_slice(&[0u8; 16]); // expires, queues, uid
        body.extend_from_slice(&77u32.to_ne_bytes());
        // INET_DIAG_CGROUP_ID, a u64.
        body.extend_from_slice(&12u16.to_ne_bytes());
        body.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        body.extend_from_slice(&4242u64.to_ne_bytes());
        let mut m = ((HEADER + body.len()) as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend_from_slice(&body);
        m
    }

    /// The kernel's own answer, on loopback (no root needed): the exact
    /// socket found by its ends, with its maker's cgroup; none for ends
    /// that no socket here has.
    #[test]
    fn a_connection_made_here_is_found_by_its_ends() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let local = client.local_addr().unwrap();
        let diag = open().unwrap();
        let found = diag
            .find(local, server)
            .unwrap()
            .expect("the client's socket");
        assert_eq!((found.local, found.remote), (local, server));
        assert_eq!(found.state, 1, "established");
        assert!(found.cgroup.is_some(), "{found:?}");
        let elsewhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(diag.find(local, elsewhere).unwrap(), None);
        let all = diag.tcp().unwrap();
        assert!(all.iter().any(|s| s.local == local && s.remote == server));
        assert!(all.iter().any(|s| s.state == LISTEN && s.local == server));
    }

    #[test]
    fn a_dump_reads_back_each_socket_and_stops_at_garbage() {
        let mut buf = message(AF_INET, 1, [10, 1, 0, 2], 8080, [10, 2, 0, 3], 41000);
        buf.extend(message(
            AF_INET,
            LISTEN,
            [0, 0, 0, 0],
            8080,
            [0, 0, 0, 0],
            0,
        ));
        // A header claiming more than there is ends the walk.
        buf.extend_from_slice(&999u32.to_ne_bytes());
        buf.extend_from_slice(&[0u8; 12]);
        let found: Vec<TcpSocket> = messages(&buf).filter_map(|(_, b)| parse(b)).collect();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].local, "10.1.0.2:8080".parse().unwrap());
        assert_eq!(found[0].remote, "10.2.0.3:41000".parse().unwrap());
        assert_eq!(found[0].inode, 77);
        assert_eq!(found[0].cgroup, Some(4242));
        assert_eq!(found[1].state, LISTEN);
        // Too short a body is no socket.
        assert_eq!(parse(&[AF_INET, 1, 0]), None);
    }
}
