//! `aya::Pod` for the map key and value types, one impl per type, so aya's
//! typed maps can hold them without a generic wrapper.

use crate::maps::*;
use crate::uapi::*;

/// Implements `aya::Pod` for each named ABI type.
macro_rules! pod {
    ($($ty:ident),+ $(,)?) => {
        $(
            // SAFETY: bindgen generated this type from the C header as a
            // #[repr(C)] struct whose fields are fixed-width integers, arrays
            // of them, and other such structs: it is Copy, 'static, and every
            // bit pattern (padding included) is a valid value, which is what
            // Pod requires of bytes read back from a map.
            unsafe impl aya::Pod for $ty {}
        )+
    };
}

pod!(
    // services: value.
    connredir_service,
    // service_by_pid: value.
    connredir_pid_identity,
    // service_addrs: key.
    connredir_addr_key,
    // rules: key (aya's LpmTrie takes the parts, see `to_trie_parts`), value.
    connredir_rule_key,
    connredir_rule_set,
    // handoff: key, value.
    connredir_handoff_key,
    connredir_record,
    // inherit: key, value.
    connredir_inherit_key,
    connredir_inherit,
    // inherit_queue: value (its key is connredir_inherit_key).
    connredir_inherit_queue,
    // sock_state, sock_hop and listeners (socket storage): values.
    connredir_sock_state,
    connredir_sock_hop,
    connredir_listener,
    // accel_socks and accel_state: key; accel_state: value.
    connredir_pair_key,
    connredir_accel_state,
    // conns: value.
    connredir_conn,
    // seal_key: value.
    connredir_seal_key,
    // rule_exes: value.
    connredir_exe_name,
    // trace (ring buffer): item.
    connredir_trace_event,
);
