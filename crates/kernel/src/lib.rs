//! The connredir kernel programs, as one BPF object embedded at build time.
//!
//! The C sources are in `bpf/`. One entry file per hook family holds that
//! family's programs; each is compiled on its own and `build.rs` links the
//! objects into one (`bpftool gen object`), so all programs share the maps:
//! - `connect.c`: `cgroup/connect4` and `cgroup/connect6`, where a connect is
//!   read, decided and rewritten to the service, and `cgroup/sendmsg4|6`,
//!   the same for each datagram an unconnected UDP socket sends;
//! - `bind.c`: `cgroup/bind4` and `cgroup/bind6`, which keep a service's
//!   address for the service's own processes;
//! - `sockops.c`: `sockops`, the TCP events: record hand-off, inheritance
//!   clean-up, acceleration of established connections;
//! - `sockopt.c`: `cgroup/getsockopt` and `cgroup/setsockopt`, the redirect
//!   operations at the syscall level and `SO_ORIGINAL_DST`;
//! - `sk_msg.c`: `sk_msg`, the sockmap acceleration of local legs;
//! - `peer.c`: `cgroup/recvmsg4|6` and `cgroup/getpeername4|6`, which show a
//!   redirected client (TCP or UDP) its original destination as its peer;
//! - `release.c`: `cgroup/sock_release`, where a redirected UDP socket
//!   leaves the live-connection list;
//! - `sockname.c`: `cgroup/getsockname4|6`, where a socket a transparent
//!   service accepted names the flow's original destination.
//!
//! What they do is in `bpf/lib/`, one header per job:
//! - `abi.h`: the one include of the shared ABI header (`connredir-abi`);
//! - `common.h`: kernel and libbpf headers, constants, `ctx_read`, license;
//! - `maps.h`: every map (weak definitions, merged by the linker);
//! - `addr.h`: endpoints, IPv4-mapped addresses, a socket's 4-tuple;
//! - `trace.h`: counters and the decision trace;
//! - `service.h`: the caller's services by identity, the service at an address;
//! - `record.h`: the redirect record and its chain of services;
//! - `decide.h`: where a redirect is decided (`decide`, `judge_rule`);
//! - `exe.h`: the connecting process's executable file name (CO-RE reads);
//! - `listener.h`: whether a service's listener is its own;
//! - `handoff.h`: the record's way to the accepted socket;
//! - `conns.h`: the live-connection list (`conns`), for TCP and UDP legs;
//! - `inherit.h`: records inherited by services that set none, queued
//!   when a service asks for a connection's original destination;
//! - `inherit_take.h`: a records-less onward connect taking one;
//! - `seal.h`: the record seal (SipHash-2-4) and its check;
//! - `accel.h`: acceleration and cut-through, every part of it.

#![warn(missing_docs)]

/// Wrapper that gives the embedded object the alignment the ELF parser needs.
#[repr(C, align(8))]
struct Aligned<T: ?Sized>(T);

static OBJECT_ALIGNED: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(
    env!("OUT_DIR"),
    "/connredir.bpf.o"
)));

/// The compiled BPF object (ELF), ready for `aya::EbpfLoader::load`.
pub fn object() -> &'static [u8] {
    &OBJECT_ALIGNED.0
}

/// Program names (the C function names) inside [`object`].
pub mod programs {
    /// `cgroup/connect4`.
    pub const CONNECT4: &str = "connredir_connect4";
    /// `cgroup/connect6`.
    pub const CONNECT6: &str = "connredir_connect6";
    /// `cgroup/bind4`: a service's IPv4 address is the service's.
    pub const BIND4: &str = "connredir_bind4";
    /// `cgroup/bind6`: a service's IPv6 address is the service's.
    pub const BIND6: &str = "connredir_bind6";
    /// `sockops`: record hand-off.
    pub const SOCKOPS: &str = "connredir_sockops";
    /// `cgroup/getsockopt`.
    pub const GETSOCKOPT: &str = "connredir_getsockopt";
    /// `cgroup/setsockopt`.
    pub const SETSOCKOPT: &str = "connredir_setsockopt";
    /// `sk_msg`: sockmap acceleration of local legs.
    pub const ACCEL: &str = "connredir_accel";
    /// `cgroup/sendmsg4`: each UDP datagram sent with an address is decided.
    pub const SENDMSG4: &str = "connredir_sendmsg4";
    /// `cgroup/sendmsg6`: as `SENDMSG4`, for IPv6 sockets.
    pub const SENDMSG6: &str = "connredir_sendmsg6";
    /// `cgroup/recvmsg4`: a redirected UDP client's datagrams come from
    /// the original destination.
    pub const RECVMSG4: &str = "connredir_recvmsg4";
    /// `cgroup/recvmsg6`: as `RECVMSG4`, for IPv6 sockets.
    pub const RECVMSG6: &str = "connredir_recvmsg6";
    /// `cgroup/getpeername4`: a redirected client's connected socket (TCP
    /// or UDP) names the original destination as its peer.
    pub const GETPEERNAME4: &str = "connredir_getpeername4";
    /// `cgroup/getpeername6`: as `GETPEERNAME4`, for IPv6 sockets.
    pub const GETPEERNAME6: &str = "connredir_getpeername6";
    /// `cgroup/sock_release`: a redirected UDP socket leaves the
    /// live-connection list when it is closed.
    pub const SOCK_RELEASE: &str = "connredir_sock_release";
    /// `cgroup/getsockname4`: a socket a transparent service accepted names
    /// the flow's original destination as its local address.
    pub const GETSOCKNAME4: &str = "connredir_getsockname4";
    /// `cgroup/getsockname6`: as `GETSOCKNAME4`, for IPv6 sockets.
    pub const GETSOCKNAME6: &str = "connredir_getsockname6";
}

#[cfg(test)]
mod tests {
    #[test]
    fn object_is_a_bpf_elf() {
        let obj = super::object();
        assert_eq!(&obj[..4], b"\x7fELF");
        // e_machine 247 = EM_BPF
        assert_eq!(u16::from_le_bytes([obj[18], obj[19]]), 247);
    }

    #[test]
    fn object_defines_every_program_and_map_name() {
        let obj = super::object();
        let contains = |name: &str| obj.windows(name.len()).any(|w| w == name.as_bytes());
        for name in connredir_abi::map_names::ALL {
            assert!(contains(name), "map {name} missing from the object");
        }
        for name in [
            super::programs::CONNECT4,
            super::programs::CONNECT6,
            super::programs::BIND4,
            super::programs::BIND6,
            super::programs::SOCKOPS,
            super::programs::GETSOCKOPT,
            super::programs::SETSOCKOPT,
            super::programs::ACCEL,
            super::programs::SENDMSG4,
            super::programs::SENDMSG6,
            super::programs::RECVMSG4,
            super::programs::RECVMSG6,
            super::programs::GETPEERNAME4,
            super::programs::GETPEERNAME6,
            super::programs::SOCK_RELEASE,
            super::programs::GETSOCKNAME4,
            super::programs::GETSOCKNAME6,
        ] {
            assert!(contains(name), "program {name} missing from the object");
        }
    }
}
