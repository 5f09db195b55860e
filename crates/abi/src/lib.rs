//! The connredir ABI, generated from `include/connredir/abi.h`.
//!
//! That header is the single definition of the redirect record, the map
//! layouts, the map names, the socket option numbers and the counters; the
//! kernel programs include it and this crate is generated from it at build
//! time, so the two sides cannot drift apart.

#![allow(non_camel_case_types, non_upper_case_globals, missing_docs)]
#![allow(clippy::all)]

include!(concat!(env!("OUT_DIR"), "/abi.rs"));

/// Path of the C header this crate is generated from, for build scripts that
/// compile the kernel programs against the same definition.
pub const HEADER_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/include");

/// Map names as `&str` (the header spells them as C string literals).
pub mod map_names {
    /// Strips the trailing NUL that bindgen keeps in C string constants.
    const fn name(bytes: &'static [u8]) -> &'static str {
        let (head, _nul) = bytes.split_at(bytes.len() - 1);
        match core::str::from_utf8(head) {
            Ok(s) => s,
            Err(_) => panic!("map name is not UTF-8"),
        }
    }
    /// Per-socket state (the record lives here).
    pub const SOCK_STATE: &str = name(super::CONNREDIR_MAP_SOCK_STATE);
    /// Registered services, by id.
    pub const SERVICES: &str = name(super::CONNREDIR_MAP_SERVICES);
    /// Service id by process id (tgid).
    pub const SERVICE_BY_PID: &str = name(super::CONNREDIR_MAP_SERVICE_BY_PID);
    /// Service id by cgroup id.
    pub const SERVICE_BY_CGROUP: &str = name(super::CONNREDIR_MAP_SERVICE_BY_CGROUP);
    /// Service id by uid.
    pub const SERVICE_BY_UID: &str = name(super::CONNREDIR_MAP_SERVICE_BY_UID);
    /// Service id by listening address.
    pub const SERVICE_ADDRS: &str = name(super::CONNREDIR_MAP_SERVICE_ADDRS);
    /// The rules LPM trie (two generations).
    pub const RULES: &str = name(super::CONNREDIR_MAP_RULES);
    /// Which rule generation connects read (0 or 1).
    pub const RULES_ACTIVE: &str = name(super::CONNREDIR_MAP_RULES_ACTIVE);
    /// Per-rule hit counts (per CPU), by rule id.
    pub const RULE_HITS: &str = name(super::CONNREDIR_MAP_RULE_HITS);
    /// Records in flight from a connecting socket to the accepted one.
    pub const HANDOFF: &str = name(super::CONNREDIR_MAP_HANDOFF);
    /// The layer's own network namespace, and how many hand-off entries
    /// other namespaces hold (see `CONNREDIR_MAX_FOREIGN_HANDOFFS`).
    pub const HANDOFF_BUDGET: &str = name(super::CONNREDIR_MAP_HANDOFF_BUDGET);
    /// Per-CPU counters.
    pub const COUNTERS: &str = name(super::CONNREDIR_MAP_COUNTERS);
    /// Records waiting for a records-less service's onward connection.
    pub const INHERIT: &str = name(super::CONNREDIR_MAP_INHERIT);
    /// Live redirected connections, by socket cookie.
    pub const CONNS: &str = name(super::CONNREDIR_MAP_CONNS);
    /// Ring buffer of redirect decisions.
    pub const TRACE: &str = name(super::CONNREDIR_MAP_TRACE);
    /// Whether decisions go to the trace (entry 0: 1 or 0).
    pub const TRACE_CONTROL: &str = name(super::CONNREDIR_MAP_TRACE_CONTROL);
    /// Accelerated sockets (sockhash), by their 4-tuple.
    pub const ACCEL_SOCKS: &str = name(super::CONNREDIR_MAP_ACCEL_SOCKS);
    /// Flags of accelerated sockets, by their 4-tuple.
    pub const ACCEL_STATE: &str = name(super::CONNREDIR_MAP_ACCEL_STATE);
    /// Listening sockets that are a service's own (socket storage).
    pub const LISTENERS: &str = name(super::CONNREDIR_MAP_LISTENERS);
    /// The secret key that seals records (root only, like every map).
    pub const SEAL_KEY: &str = name(super::CONNREDIR_MAP_SEAL_KEY);

    /// Every map name, for checks that the object defines them all.
    pub const ALL: [&str; 20] = [
        SOCK_STATE,
        SERVICES,
        SERVICE_BY_PID,
        SERVICE_BY_CGROUP,
        SERVICE_BY_UID,
        SERVICE_ADDRS,
        RULES,
        RULES_ACTIVE,
        RULE_HITS,
        HANDOFF,
        HANDOFF_BUDGET,
        COUNTERS,
        INHERIT,
        CONNS,
        TRACE,
        TRACE_CONTROL,
        ACCEL_SOCKS,
        ACCEL_STATE,
        LISTENERS,
        SEAL_KEY,
    ];
}

/// Conversions between endpoints and socket addresses, so the layout rule
/// (IPv4 in the first 4 bytes, port and address in network order) is written
/// once for every crate.
impl connredir_endpoint {
    /// The endpoint of a socket address.
    pub fn from_socket_addr(addr: &std::net::SocketAddr) -> connredir_endpoint {
        let mut ep = connredir_endpoint {
            port: addr.port().to_be(),
            ..Default::default()
        };
        match addr {
            std::net::SocketAddr::V4(a) => {
                ep.family = AF_INET;
                ep.addr[..4].copy_from_slice(&a.ip().octets());
            }
            std::net::SocketAddr::V6(a) => {
                ep.family = AF_INET6;
                ep.scope_id = a.scope_id();
                ep.addr = a.ip().octets();
            }
        }
        ep
    }

    /// The socket address of an endpoint; `None` for family 0 (unknown).
    pub fn to_socket_addr(&self) -> Option<std::net::SocketAddr> {
        use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
        let port = u16::from_be(self.port);
        match self.family {
            AF_INET => {
                let [a, b, c, d, ..] = self.addr;
                Some(SocketAddr::new(Ipv4Addr::new(a, b, c, d).into(), port))
            }
            AF_INET6 => Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(self.addr),
                port,
                0,
                self.scope_id,
            ))),
            _ => None,
        }
    }
}

/// `AF_INET` as endpoints store it.
pub const AF_INET: u16 = 2;
/// `AF_INET6` as endpoints store it.
pub const AF_INET6: u16 = 10;

#[cfg(test)]
mod tests {
    use super::connredir_endpoint;

    #[test]
    fn endpoints_round_trip() {
        for text in ["192.0.2.1:443", "[2001:db8::7]:8080"] {
            let addr: std::net::SocketAddr = text.parse().unwrap();
            let ep = connredir_endpoint::from_socket_addr(&addr);
            assert_eq!(ep.to_socket_addr(), Some(addr));
        }
        assert_eq!(connredir_endpoint::default().to_socket_addr(), None);
    }
}
