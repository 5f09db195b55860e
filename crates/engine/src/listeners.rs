//! Marks a service's listening sockets that were opened before the service
//! was registered (or before the layer was loaded).
//!
//! The kernel marks a listener when a process of the service's identity
//! binds the service's address (the bind programs); a proxy that was already
//! listening never passed through them. Here the engine finds such sockets
//! (`/proc/net/tcp{,6}` for the listening inode, `/proc/PID/fd` for the
//! processes holding it), keeps those whose process is the service's own by
//! its identity, takes a duplicate of the socket (`pidfd_getfd`) and writes
//! the mark into the socket's storage.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::service::Identity;

/// A listening socket held by a process: (pid, fd number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeldSocket {
    pub pid: u32,
    pub fd: i32,
}

/// The inodes of TCP sockets that listen where a connection to `addr` would
/// arrive: on `addr` itself or on a wildcard address with its port.
pub(crate) fn listening_inodes(addr: &SocketAddr) -> Vec<u64> {
    let port = format!("{:04X}", addr.port());
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            // Columns: sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                continue;
            }
            let Some((ip, p)) = cols[1].split_once(':') else {
                continue;
            };
            if p != port || !(ip.chars().all(|c| c == '0') || proc_ip_is(ip, addr)) {
                continue;
            }
            if let Ok(inode) = cols[9].parse() {
                inodes.push(inode);
            }
        }
    }
    inodes
}

/// Whether `/proc/net/tcp*`'s hex address (host-order 32-bit words) is the
/// address of `addr` (an IPv4 address also as IPv4-mapped IPv6).
fn proc_ip_is(hex: &str, addr: &SocketAddr) -> bool {
    let words: Vec<u32> = (0..hex.len() / 8)
        .filter_map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
        .collect();
    let bytes: Vec<u8> = words
        .iter()
        .flat_map(|w| w.swap_bytes().to_be_bytes())
        .collect();
    let v6 = match addr {
        SocketAddr::V4(a) => a.ip().to_ipv6_mapped().octets(),
        SocketAddr::V6(a) => a.ip().octets(),
    };
    match bytes.len() {
        4 => matches!(addr, SocketAddr::V4(a) if a.ip().octets()[..] == bytes[..]),
        16 => v6[..] == bytes[..],
        _ => false,
    }
}

/// Processes holding a socket with one of `inodes`, by scanning `/proc`.
fn holders(inodes: &[u64]) -> Vec<HeldSocket> {
    let mut found = Vec::new();
    if inodes.is_empty() {
        return found;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            if wanted.iter().any(|w| target.as_os_str() == w.as_str()) {
                if let Some(n) = fd.file_name().to_str().and_then(|s| s.parse().ok()) {
                    found.push(HeldSocket { pid, fd: n });
                }
            }
        }
    }
    found
}

/// The real uid of a process.
fn process_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The cgroup v2 directory of a process.
fn process_cgroup(pid: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let root = crate::cgroup::cgroup2_root()?;
    Some(root.join(path.trim_start_matches('/')))
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
    for held in holders(inodes) {
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

#[cfg(test)]
mod tests {
    use super::proc_ip_is;

    #[test]
    fn proc_addresses_are_host_order_words() {
        // 127.0.0.1 as /proc/net/tcp prints it.
        assert!(proc_ip_is("0100007F", &"127.0.0.1:80".parse().unwrap()));
        assert!(!proc_ip_is("0200007F", &"127.0.0.1:80".parse().unwrap()));
        // ::1 and ::ffff:127.0.0.1 in /proc/net/tcp6.
        assert!(proc_ip_is(
            "00000000000000000000000001000000",
            &"[::1]:80".parse().unwrap()
        ));
        assert!(proc_ip_is(
            "0000000000000000FFFF00000100007F",
            &"127.0.0.1:80".parse().unwrap()
        ));
    }
}
