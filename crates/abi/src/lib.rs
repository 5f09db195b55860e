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
    /// The rules LPM trie.
    pub const RULES: &str = name(super::CONNREDIR_MAP_RULES);
    /// Records in flight from a connecting socket to the accepted one.
    pub const HANDOFF: &str = name(super::CONNREDIR_MAP_HANDOFF);
    /// Per-CPU counters.
    pub const COUNTERS: &str = name(super::CONNREDIR_MAP_COUNTERS);

    /// Every map name, for checks that the object defines them all.
    pub const ALL: [&str; 9] = [
        SOCK_STATE,
        SERVICES,
        SERVICE_BY_PID,
        SERVICE_BY_CGROUP,
        SERVICE_BY_UID,
        SERVICE_ADDRS,
        RULES,
        HANDOFF,
        COUNTERS,
    ];
}
