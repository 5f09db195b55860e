//! What `/proc` says about this network namespace's TCP and UDP sockets and
//! about processes: listening TCP sockets, bound UDP sockets, the processes
//! holding a socket, and a process's uid, cgroup and start time.

use std::net::SocketAddr;
use std::path::PathBuf;

/// The TCP tables of this network namespace.
const TCP_TABLES: [&str; 2] = ["/proc/net/tcp", "/proc/net/tcp6"];

/// The `st` column of a listening socket in `/proc/net/tcp{,6}`.
const LISTEN: &str = "0A";

/// Is a TCP socket listening on `addr`'s port? Read from /proc/net/tcp and
/// tcp6 (of this network namespace), so no probe connection disturbs the
/// listener: how `status` tells whether a service is up.
pub fn is_listening(addr: &SocketAddr) -> bool {
    let port = format!(":{:04X}", addr.port());
    TCP_TABLES.iter().any(|table| {
        std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| {
                // Columns: sl local_address rem_address st ...; st 0A is LISTEN.
                let cols: Vec<&str> = line.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&port) && cols[3] == LISTEN
            })
    })
}

/// The inodes of TCP sockets that listen where a connection to `addr` would
/// arrive: on `addr` itself or on a wildcard address with its port.
pub fn listening_inodes(addr: &SocketAddr) -> Vec<u64> {
    TCP_TABLES
        .iter()
        .flat_map(|table| {
            inodes_in(
                &std::fs::read_to_string(table).unwrap_or_default(),
                LISTEN,
                addr,
            )
        })
        .collect()
}

/// The UDP tables of this network namespace.
const UDP_TABLES: [&str; 2] = ["/proc/net/udp", "/proc/net/udp6"];

/// The `st` column of a UDP socket that is not connected (`TCP_CLOSE`): a
/// socket receiving from anyone, as a UDP service's does.
const UNCONNECTED: &str = "07";

/// The inodes of unconnected UDP sockets bound where a datagram to `addr`
/// would arrive: on `addr` itself or on a wildcard address with its port.
/// A UDP service receives on such a socket (it has no `listen()`).
pub fn bound_udp_inodes(addr: &SocketAddr) -> Vec<u64> {
    UDP_TABLES
        .iter()
        .flat_map(|table| {
            inodes_in(
                &std::fs::read_to_string(table).unwrap_or_default(),
                UNCONNECTED,
                addr,
            )
        })
        .collect()
}

/// The inodes of a `/proc/net/{tcp,udp}{,6}` table's sockets in state
/// `state` whose local address is `addr`, or a wildcard address on its port.
fn inodes_in(table: &str, state: &str, addr: &SocketAddr) -> Vec<u64> {
    let port = format!("{:04X}", addr.port());
    let mut inodes = Vec::new();
    for line in table.lines().skip(1) {
        // Columns: sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 || cols[3] != state {
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

/// A socket held by a process: its pid and the descriptor number there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldSocket {
    /// The holding process.
    pub pid: u32,
    /// The descriptor number in that process.
    pub fd: i32,
}

/// Processes holding a socket with one of `inodes`, by scanning `/proc`.
pub fn socket_holders(inodes: &[u64]) -> Vec<HeldSocket> {
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
pub fn process_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The cgroup v2 directory of a process.
pub fn process_cgroup(pid: u32) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let root = crate::cgroup::cgroup2_root()?;
    Some(root.join(path.trim_start_matches('/')))
}

/// How many clock ticks a second this kernel counts (`sysconf(_SC_CLK_TCK)`),
/// the unit of process start times.
pub fn clock_ticks_per_second() -> libc::c_long {
    // SAFETY: sysconf has no memory arguments.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }
}

/// When process `pid` started, in clock ticks since boot (field 22 of
/// /proc/PID/stat).
pub fn start_ticks(pid: u32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    stat_start_ticks(&stat)
        .ok_or_else(|| std::io::Error::other(format!("unexpected /proc/{pid}/stat: {stat}")))
}

/// Field 22 of a /proc/PID/stat text.
fn stat_start_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may hold anything.
    stat.rfind(')')
        .and_then(|at| stat[at + 1..].split_whitespace().nth(19))
        .and_then(|field| field.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn udp_sockets_bound_to_an_address_or_its_wildcard_are_found_connected_ones_not() {
        // /proc/net/udp as the kernel prints it: 127.0.0.1:15053 unconnected,
        // 127.0.0.1:15053 connected to 127.0.0.1:40000, 0.0.0.0:15053, and
        // 127.0.0.1:53.
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  1: 0100007F:3ACD 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1001 2 0000000000000000 0
  2: 0100007F:3ACD 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 1002 2 0000000000000000 0
  3: 00000000:3ACD 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1003 2 0000000000000000 0
  4: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1004 2 0000000000000000 0
";
        let addr = "127.0.0.1:15053".parse().unwrap();
        assert_eq!(inodes_in(table, UNCONNECTED, &addr), [1001, 1003]);
        let other = "127.0.0.2:15053".parse().unwrap();
        assert_eq!(inodes_in(table, UNCONNECTED, &other), [1003]);
    }

    #[test]
    fn start_time_is_found_past_a_command_name_with_spaces_and_parentheses() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(stat_start_ticks(stat), Some(98765));
        assert_eq!(stat_start_ticks("42 (x) S 1"), None);
    }

    #[test]
    fn this_process_has_a_start_time_and_uid() {
        let me = std::process::id();
        assert!(start_ticks(me).is_ok());
        assert!(process_uid(me).is_some());
    }
}
