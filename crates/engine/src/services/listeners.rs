//! Marks a service's listening sockets (TCP) and bound sockets (UDP) that
//! were opened before the service was registered (or before the layer was
//! loaded).
//!
//! The kernel marks a listener when a process of the service's identity
//! binds the service's address (the bind programs); a proxy that was already
//! listening never passed through them. Here the engine finds such sockets
//! (`/proc/net/tcp{,6}` for the listening inode, `/proc/net/udp{,6}` for an
//! unconnected UDP socket's, `/proc/PID/fd` for the processes holding it),
//! keeps those whose process is the service's own by its identity, takes a
//! duplicate of the socket (`pidfd_getfd`) and writes the mark into the
//! socket's storage.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use std::net::SocketAddr;

use connredir_host::procfs::{
    bound_udp_inodes, process_cgroup, process_uid, socket_holders, HeldSocket,
};

use super::Identity;

/// The inodes of the sockets a service at `addr` receives on: TCP sockets
/// listening there and UDP sockets bound there (unconnected), each on `addr`
/// itself or on a wildcard address with its port.
pub(crate) fn listening_inodes(addr: &SocketAddr) -> Vec<u64> {
    let mut inodes = connredir_host::procfs::listening_inodes(addr);
    inodes.extend(bound_udp_inodes(addr));
    inodes
}

/// Whether the process `pid` is one of `identity`'s.
fn is_identity(pid: u32, identity: &Identity, cgroups: &[PathBuf]) -> bool {
    if identity.pids.contains(&pid) {
        return true;
    }
    if process_uid(pid).is_some_and(|uid| identity.uids.contains(&uid)) {
        return true;
    }
    process_cgroup(pid)
        .and_then(|p| p.canonicalize().ok())
        .is_some_and(|p| cgroups.contains(&p))
}

/// The listening sockets with one of `inodes` held by processes of
/// `identity`, each with a duplicate descriptor of the socket and the
/// holding process.
pub(crate) fn own_listeners(inodes: &[u64], identity: &Identity) -> Vec<(OwnedFd, u32)> {
    let cgroups: Vec<PathBuf> = identity
        .cgroups
        .iter()
        .filter_map(|p| Path::new(p).canonicalize().ok())
        .collect();
    let mut out = Vec::new();
    for held in socket_holders(inodes) {
        if !is_identity(held.pid, identity, &cgroups) {
            continue;
        }
        match duplicate(held) {
            Ok(fd) => out.push((fd, held.pid)),
            Err(e) => tracing::debug!(
                pid = held.pid,
                fd = held.fd,
                "cannot take the listener: {e}"
            ),
        }
    }
    out
}

/// A duplicate of another process's descriptor (pidfd_open + pidfd_getfd).
fn duplicate(held: HeldSocket) -> std::io::Result<OwnedFd> {
    // SAFETY: plain system calls on integers; each returned descriptor is
    // owned here from the moment it is returned.
    unsafe {
        let pidfd = libc::syscall(
            libc::SYS_pidfd_open,
            held.pid as libc::c_long,
            0 as libc::c_long,
        );
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let fd = libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd) as libc::c_long,
            held.fd as libc::c_long,
            0 as libc::c_long,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd as i32))
    }
}
