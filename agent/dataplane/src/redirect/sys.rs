//! The three `bpf(2)` commands aya does not expose for pinned links: opening
//! a pin, replacing a link's program in place (no gap in the data path) and
//! asking which cgroup a link is attached to.
//!
//! The kernel accepts an attribute shorter than its full `union bpf_attr`
//! and zero-fills the rest, so each command gets its own small struct.
#![allow(unsafe_code)] // bpf(2) by hand
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya_obj::generated::bpf_cmd;

fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised #[repr(C)] struct of the
    // layout the kernel expects for `cmd`, and its size is passed along.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            (attr as *mut T).cast::<libc::c_void>(),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `BPF_OBJ_GET`: a new fd on the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `BPF_LINK_UPDATE`: atomically make `link` run `prog` instead.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` with its cgroup member.
#[repr(C)]
#[derive(Default)]
struct CgroupLinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

/// `BPF_LINK_TYPE_CGROUP`.
const LINK_TYPE_CGROUP: u32 = 3;

/// `BPF_LINK_TYPE_NETNS`.
const LINK_TYPE_NETNS: u32 = 5;

/// The inode of the netns a netns link (`sk_lookup`) is attached to (its
/// `netns_ino` sits where a cgroup link's id does).
pub fn link_netns_ino(link: BorrowedFd<'_>) -> io::Result<u32> {
    let mut info = CgroupLinkInfo::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<CgroupLinkInfo>() as u32,
        info: (&mut info as *mut CgroupLinkInfo) as u64,
    };
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.type_ != LINK_TYPE_NETNS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "pinned object is a link of type {}, not a netns link",
                info.type_
            ),
        ));
    }
    Ok(info.cgroup_id as u32)
}

/// The cgroup a cgroup link is attached to (0 once that cgroup is gone).
pub fn link_cgroup_id(link: BorrowedFd<'_>) -> io::Result<u64> {
    let mut info = CgroupLinkInfo::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: std::mem::size_of::<CgroupLinkInfo>() as u32,
        info: (&mut info as *mut CgroupLinkInfo) as u64,
    };
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.type_ != LINK_TYPE_CGROUP {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "pinned object is a link of type {}, not a cgroup link",
                info.type_
            ),
        ));
    }
    Ok(info.cgroup_id)
}
