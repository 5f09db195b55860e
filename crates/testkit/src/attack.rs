//! `connredir-testkit attack CASE ...`: the ways an unprivileged client in
//! the scope may try to reach a selected destination without its service.
//! Each case prints one JSON object saying what each attempt did, with the
//! local address of every connection that got through, so the test can tell
//! from the destination's own list of peers whether the client reached it
//! directly.

use std::io::{Read, Write};
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use socket2::{Domain, SockAddr, Socket, Type};

/// Runs one attack case against `addr`; `millis` is the duration of the
/// cases that run for a while (`flows`), `elsewhere` the second address of
/// the cases that connect to two (`stale-hop`).
pub fn run(
    case: &str,
    addr: SocketAddr,
    millis: Option<u64>,
    elsewhere: Option<SocketAddr>,
) -> Result<Value> {
    match case {
        "reconnect-unspec" => reconnect_unspec(addr),
        "reconnect-refused" => reconnect_refused(addr),
        "reconnect-v6only" => reconnect_v6only(addr),
        "stale-hop" => stale_hop(addr, elsewhere.context("stale-hop needs --elsewhere")?),
        "fill-optmem" => fill_optmem(addr),
        "bind" => impostor(addr, false),
        "bind-reuseport" => impostor(addr, true),
        "udp-bind" => udp_impostor(addr),
        "flows" => flows(addr, millis.context("missing MILLISECONDS")?),
        "unspecified" => unspecified(addr),
        "mptcp" => mptcp(addr),
        "connect" => Ok(json!({ "attempts": { "connect": attempt(&stream_socket(addr)?, addr) } })),
        "fastopen-sendto" => fastopen_sendto(addr),
        "fastopen-connect" => fastopen_connect(addr),
        "io-uring" => io_uring_connects(addr),
        other => bail!("unknown attack case {other}"),
    }
}

/// What an attempt did: `ok` with the connection's local address, or the
/// error's raw OS number and text.
fn attempt(socket: &Socket, dst: SocketAddr) -> Value {
    match socket.connect(&dst.into()) {
        Ok(()) => exchanged(socket, 0),
        Err(e) => failed(&e),
    }
}

/// An attempt that failed before it connected.
fn failed(e: &std::io::Error) -> Value {
    json!({ "ok": false, "errno": e.raw_os_error(), "error": e.to_string() })
}

/// The echo round trip of a connected attempt (see [`exchange`]), reported
/// as [`attempt`] does.
fn exchanged(socket: &Socket, sent: usize) -> Value {
    match exchange(socket, sent) {
        Ok(()) => json!({ "ok": true, "local": local(socket) }),
        Err(e) => json!({ "ok": false, "local": local(socket), "error": e.to_string() }),
    }
}

fn local(socket: &Socket) -> Option<String> {
    socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.to_string())
}

/// One echo round trip, so a connection counts only once data went through;
/// the first `sent` bytes of it went with the connect (TCP Fast Open).
fn exchange(socket: &Socket, sent: usize) -> std::io::Result<()> {
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut stream: &Socket = socket;
    stream.write_all(&b"ping"[sent..])?;
    let mut back = [0u8; 4];
    stream.read_exact(&mut back)?;
    if &back != b"ping" {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

fn stream_socket(dst: SocketAddr) -> Result<Socket> {
    Ok(Socket::new(Domain::for_address(dst), Type::STREAM, None)?)
}

/// Connect, disconnect with `connect(AF_UNSPEC)`, connect the same socket
/// to the same destination again.
fn reconnect_unspec(dst: SocketAddr) -> Result<Value> {
    let socket = stream_socket(dst)?;
    let first = attempt(&socket, dst);
    // SAFETY: a zeroed sockaddr with family AF_UNSPEC is what the call takes.
    let unspec: libc::sockaddr = unsafe { zeroed() };
    let rc = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            &unspec,
            size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    let disconnect = if rc == 0 {
        "ok".to_string()
    } else {
        std::io::Error::last_os_error().to_string()
    };
    let second = attempt(&socket, dst);
    Ok(json!({ "first": first, "disconnect": disconnect, "second": second }))
}

/// Connect while the service is down, then again on the same socket.
fn reconnect_refused(dst: SocketAddr) -> Result<Value> {
    let socket = stream_socket(dst)?;
    let first = attempt(&socket, dst);
    let second = attempt(&socket, dst);
    Ok(json!({ "first": first, "second": second }))
}

/// An `IPV6_V6ONLY` TCP socket and the IPv4-mapped form of the IPv4
/// destination `dst` (which `case` needs): a connect the connect program
/// redirects and the kernel then fails, before any connection is opened.
fn v6only_socket_for_mapped(dst: SocketAddr, case: &str) -> Result<(Socket, SocketAddr)> {
    let SocketAddr::V4(v4) = dst else {
        bail!("{case} takes an IPv4 destination")
    };
    let mapped = SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0));
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
    socket.set_only_v6(true)?;
    Ok((socket, mapped))
}

/// An IPv6-only socket connects to the IPv4-mapped destination (which
/// fails), then drops IPV6_V6ONLY and connects again.
fn reconnect_v6only(dst: SocketAddr) -> Result<Value> {
    let (socket, mapped) = v6only_socket_for_mapped(dst, "reconnect-v6only")?;
    let first = attempt(&socket, mapped);
    let cleared = socket.set_only_v6(false).map(|_| "ok".to_string());
    let second = attempt(&socket, mapped);
    Ok(json!({
        "first": first,
        "v6only_cleared": cleared.unwrap_or_else(|e| e.to_string()),
        "second": second,
    }))
}

/// A redirected connect that fails before any connection is opened (an
/// IPv4-mapped destination on an `IPV6_V6ONLY` socket) leaves the socket
/// holding the record of that redirect; the same socket then connects
/// straight to `elsewhere`, an address no rule names (another service's
/// IPv6 listener). If that connection carried the old record, the service
/// there would take the flow for one the first service had already
/// handled, and send it on past it.
fn stale_hop(dst: SocketAddr, elsewhere: SocketAddr) -> Result<Value> {
    let (socket, mapped) = v6only_socket_for_mapped(dst, "stale-hop")?;
    let first = attempt(&socket, mapped);
    let second = attempt(&socket, elsewhere);
    Ok(json!({ "first": first, "second": second }))
}

/// `struct tcp_md5sig` of <linux/tcp.h> (not in the libc crate).
#[repr(C)]
struct TcpMd5Sig {
    tcpm_addr: libc::sockaddr_storage,
    tcpm_flags: u8,
    tcpm_prefixlen: u8,
    tcpm_keylen: u16,
    tcpm_ifindex: i32,
    tcpm_key: [u8; 80],
}

/// Fills the socket's option memory with TCP MD5 keys (each one is charged
/// to it) until the kernel refuses, then connects.
fn fill_optmem(dst: SocketAddr) -> Result<Value> {
    let socket = stream_socket(dst)?;
    let mut keys = 0u32;
    let error = loop {
        // Keys for addresses no traffic goes to (benchmarking and
        // documentation ranges), only ever used as keys inside this socket.
        let peer: SocketAddr = match dst {
            SocketAddr::V4(_) => ([198, 18, (keys >> 8) as u8, keys as u8], 0).into(),
            SocketAddr::V6(_) => {
                let mut octets = [0u8; 16];
                octets[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
                octets[14] = (keys >> 8) as u8;
                octets[15] = keys as u8;
                (std::net::Ipv6Addr::from(octets), 0).into()
            }
        };
        let peer = SockAddr::from(peer);
        // SAFETY: TcpMd5Sig is plain old data; zero is a valid value.
        let mut sig: TcpMd5Sig = unsafe { zeroed() };
        // SAFETY: the destination is a sockaddr_storage, large enough for
        // any socket address; the source is `peer.len()` valid bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                peer.as_ptr().cast::<u8>(),
                (&mut sig.tcpm_addr as *mut libc::sockaddr_storage).cast::<u8>(),
                peer.len() as usize,
            );
        }
        sig.tcpm_keylen = 80;
        sig.tcpm_key = [0x5a; 80];
        // SAFETY: sig is a valid tcp_md5sig for the duration of the call.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_MD5SIG,
                (&sig as *const TcpMd5Sig).cast(),
                size_of::<TcpMd5Sig>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            break std::io::Error::last_os_error();
        }
        keys += 1;
        if keys > 65_535 {
            bail!("the kernel took 65,536 MD5 keys without running out of option memory");
        }
    };
    let connect = attempt(&socket, dst);
    Ok(json!({ "md5_keys": keys, "filled_with": error.to_string(), "connect": connect }))
}

/// Binds (and listens on) a service's address as an impostor; if that
/// works, waits up to 3 s for a connection and reports what came.
fn impostor(addr: SocketAddr, reuseport: bool) -> Result<Value> {
    let socket = stream_socket(addr)?;
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    if let Err(e) = socket.bind(&addr.into()).and_then(|()| socket.listen(128)) {
        return Ok(json!({ "bind": e.to_string(), "errno": e.raw_os_error() }));
    }
    println!("{}", json!({ "bind": "ok" }));
    let _ = std::io::stdout().flush();
    let listener: TcpListener = socket.into();
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut accepted = Vec::new();
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, peer)) => {
                let records = connredir::query_records(&stream)
                    .map(|r| r.client().pid)
                    .ok();
                accepted.push(json!({ "peer": peer.to_string(), "client_pid": records }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(json!({ "bind": "ok", "accepted": accepted }))
}

/// Binds a UDP socket to `addr` with SO_REUSEADDR and SO_REUSEPORT (a
/// service's UDP address, or a wildcard on its port): the kernel alone
/// lets a process of the service's user join its group and take datagrams.
fn udp_impostor(addr: SocketAddr) -> Result<Value> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    Ok(match socket.bind(&addr.into()) {
        Ok(()) => json!({ "bind": "ok" }),
        Err(e) => json!({ "bind": e.to_string(), "errno": e.raw_os_error() }),
    })
}

/// New connections in a loop for `millis` ms, each an echo round trip:
/// counts the connects that failed and the round trips that broke, and lists
/// the local address of every connection that got through. IPv4 flows leave
/// from 127.0.0.3, an address nothing else uses, so the destination can tell
/// a direct connection of this client by its source address alone.
fn flows(dst: SocketAddr, millis: u64) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_millis(millis);
    let (mut refused, mut broken, mut locals) = (0u64, 0u64, Vec::new());
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    while Instant::now() < deadline {
        let socket = stream_socket(dst)?;
        if dst.is_ipv4() {
            socket.bind(&SocketAddr::from(([127, 0, 0, 3], 0)).into())?;
        }
        match socket.connect(&dst.into()) {
            Err(e) => {
                refused += 1;
                *errors.entry(e.to_string()).or_default() += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(()) => {
                if let Some(l) = local(&socket) {
                    locals.push(l);
                }
                if let Err(e) = exchange(&socket, 0) {
                    broken += 1;
                    *errors.entry(e.to_string()).or_default() += 1;
                }
            }
        }
    }
    Ok(
        json!({ "refused": refused, "broken": broken, "connected": locals.len(), "locals": locals, "errors": errors }),
    )
}

/// Connects to the unspecified address (0.0.0.0, :: or ::ffff:0.0.0.0) on
/// the destination's port. The kernel sends such a connection to the
/// socket's own bound address, or to the loopback address when it has none,
/// so each attempt reaches the destination: from an unbound socket when the
/// destination is 127.0.0.1 or ::1, and from a socket bound to the
/// destination's address always; for an IPv4 destination also from an IPv6
/// socket (::ffff:0.0.0.0, or :: from a socket bound to an IPv4-mapped
/// address). Reports each attempt by name under `attempts`.
fn unspecified(dst: SocketAddr) -> Result<Value> {
    let port = dst.port();
    let mut attempts = serde_json::Map::new();
    let mut try_one = |name: &str, domain: Domain, bind: Option<SocketAddr>, to: SocketAddr| {
        let result = Socket::new(domain, Type::STREAM, None).and_then(|socket| {
            if let Some(bind) = bind {
                socket.bind(&bind.into())?;
            }
            Ok(attempt(&socket, to))
        });
        let value = result.unwrap_or_else(|e| json!({ "ok": false, "error": e.to_string() }));
        attempts.insert(name.to_string(), value);
    };
    match dst {
        SocketAddr::V4(v4) => {
            let any = SocketAddr::from(([0, 0, 0, 0], port));
            let mapped_any = SocketAddr::from((Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), port));
            let mapped_own = SocketAddr::from((v4.ip().to_ipv6_mapped(), 0));
            if v4.ip() == &Ipv4Addr::LOCALHOST {
                try_one("any", Domain::IPV4, None, any);
                try_one("mapped any", Domain::IPV6, None, mapped_any);
                // `::` from a socket bound to an IPv4-mapped address goes
                // to 127.0.0.1.
                let v6_any = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
                try_one(
                    "v6 any, mapped bound",
                    Domain::IPV6,
                    Some(mapped_own),
                    v6_any,
                );
            }
            try_one("any, bound", Domain::IPV4, Some((*v4.ip(), 0).into()), any);
            try_one(
                "mapped any, bound",
                Domain::IPV6,
                Some(mapped_own),
                mapped_any,
            );
        }
        SocketAddr::V6(v6) => {
            let any = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
            if v6.ip() == &Ipv6Addr::LOCALHOST {
                try_one("any", Domain::IPV6, None, any);
            }
            try_one("any, bound", Domain::IPV6, Some((*v6.ip(), 0).into()), any);
        }
    }
    Ok(json!({ "attempts": attempts }))
}

/// Connects with a Multipath TCP socket (IPPROTO_MPTCP): the kernel opens
/// the connection on a subflow socket of its own. This case and the Fast
/// Open ones report their one attempt as `attempts.connect`.
fn mptcp(dst: SocketAddr) -> Result<Value> {
    let socket = Socket::new(
        Domain::for_address(dst),
        Type::STREAM,
        Some(socket2::Protocol::MPTCP),
    )?;
    Ok(json!({ "attempts": { "connect": attempt(&socket, dst) } }))
}

/// Connects through io_uring instead of the system calls: a socket made
/// by `socket()` and connected by `IORING_OP_CONNECT`, and one both made
/// (`IORING_OP_SOCKET`) and connected by the ring. The kernel does the
/// work in the ring's context or on its io-wq worker threads, which belong
/// to the submitting process's cgroup.
fn io_uring_connects(dst: SocketAddr) -> Result<Value> {
    use io_uring::{opcode, types, IoUring};
    use std::os::fd::FromRawFd;

    let mut ring = IoUring::new(4).context("io_uring_setup")?;
    // Submits one entry and waits for its result: >= 0, or -errno.
    let mut run = |entry: io_uring::squeue::Entry| -> Result<i32> {
        // SAFETY: whatever the entry points at outlives the wait below.
        unsafe { ring.submission().push(&entry) }.context("the ring is full")?;
        ring.submit_and_wait(1)?;
        let cqe = ring.completion().next().context("no completion")?;
        Ok(cqe.result())
    };
    let to = SockAddr::from(dst);
    let connect = |run: &mut dyn FnMut(io_uring::squeue::Entry) -> Result<i32>,
                   socket: &Socket|
     -> Result<Value> {
        let entry =
            opcode::Connect::new(types::Fd(socket.as_raw_fd()), to.as_ptr(), to.len()).build();
        let rc = run(entry)?;
        Ok(if rc < 0 {
            failed(&std::io::Error::from_raw_os_error(-rc))
        } else {
            exchanged(socket, 0)
        })
    };
    let plain = stream_socket(dst)?;
    let by_ring_connect = connect(&mut run, &plain)?;
    let family = match dst {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    let fd = run(opcode::Socket::new(family, libc::SOCK_STREAM, 0).build())?;
    let made_by_ring = if fd < 0 {
        failed(&std::io::Error::from_raw_os_error(-fd))
    } else {
        // SAFETY: the ring made this descriptor for us and nothing else owns it.
        let socket = unsafe { Socket::from_raw_fd(fd) };
        connect(&mut run, &socket)?
    };
    Ok(json!({ "attempts": { "connect": by_ring_connect, "socket_and_connect": made_by_ring } }))
}

/// TCP Fast Open through `sendto(MSG_FASTOPEN)`: the connect is made by the
/// send, with the first bytes in the SYN.
fn fastopen_sendto(dst: SocketAddr) -> Result<Value> {
    let socket = stream_socket(dst)?;
    let to = SockAddr::from(dst);
    // SAFETY: the buffer and the address are valid for the call.
    let rc = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            b"ping".as_ptr().cast(),
            4,
            libc::MSG_FASTOPEN,
            to.as_ptr(),
            to.len(),
        )
    };
    let connect = if rc < 0 {
        failed(&std::io::Error::last_os_error())
    } else {
        exchanged(&socket, rc as usize)
    };
    Ok(json!({ "attempts": { "connect": connect } }))
}

/// TCP Fast Open through `TCP_FASTOPEN_CONNECT`: `connect()` returns at
/// once and the first write sends the SYN.
fn fastopen_connect(dst: SocketAddr) -> Result<Value> {
    let socket = stream_socket(dst)?;
    let on: libc::c_int = 1;
    // SAFETY: an int option, valid for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_FASTOPEN_CONNECT,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("TCP_FASTOPEN_CONNECT: {}", std::io::Error::last_os_error());
    }
    Ok(json!({ "attempts": { "connect": attempt(&socket, dst) } }))
}
