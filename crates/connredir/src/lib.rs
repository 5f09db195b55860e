//! The library proxy authors use with connredir.
//!
//! A redirect service (an inspection proxy) accepts a connection the
//! redirect layer sent it, then:
//!
//! ```no_run
//! use std::net::{TcpListener, TcpStream};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = TcpListener::bind("127.0.0.1:8000")?;
//! let (client, _) = listener.accept()?;
//! let records = connredir::query_records(&client)?;          // the opaque blob
//! let destination = connredir::original_destination(&client)?;
//! let onward = socket2::Socket::new(socket2::Domain::for_address(destination), socket2::Type::STREAM, None)?;
//! connredir::set_records(&onward, &records)?;                 // before connect
//! onward.connect(&destination.into())?;
//! // ... inspect and relay between `client` and `onward` ...
//! # Ok(()) }
//! ```
//!
//! A UDP service does the same on a socket of its own for each client
//! ([`UdpFlow`]).
//!
//! The records name the services that already handled the flow, so when the
//! onward connection meets the redirect layer again it goes to the next
//! service, or to the destination, and never back: independent proxies
//! inspect one flow in turn without loops.
//!
//! Every operation is a `getsockopt`/`setsockopt` on the private level
//! [`sockopt::LEVEL`], answered by the layer's BPF programs; the byte-buffer
//! functions follow the buffer protocol of the Windows control codes
//! `SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS`,
//! `SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT` and
//! `SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS`.

#![warn(missing_docs)]

mod cut_through;
mod records;
mod udp;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use socket2::SockRef;

pub use cut_through::{bytes_written_into, cut_through, cut_through_to, CutThroughError};
pub use records::{
    redirect_state, ClientIdentity, Hop, RedirectContext, RedirectRecords, RedirectState, ServiceId,
};
pub use udp::UdpFlow;

/// Socket option numbers, for code that calls getsockopt/setsockopt itself.
pub mod sockopt {
    /// The private option level.
    pub const LEVEL: i32 = connredir_abi::CONNREDIR_SOL as i32;
    /// get: the redirect records; set: hand records to a new socket.
    pub const RECORDS: i32 = connredir_abi::CONNREDIR_SO_RECORDS as i32;
    /// get: the redirect context (only for the service that redirected).
    pub const CONTEXT: i32 = connredir_abi::CONNREDIR_SO_CONTEXT as i32;
    /// get, on a listening socket: the id of the service registered for its
    /// address (see [`registered_service`](crate::registered_service)).
    pub const SERVICE: i32 = connredir_abi::CONNREDIR_SO_SERVICE as i32;
    /// get: whether the socket is accelerated (4-byte 0 or 1).
    pub const ACCELERATED: i32 = connredir_abi::CONNREDIR_SO_ACCELERATED as i32;
    /// set: hand a direction of an accelerated flow to the kernel (see
    /// [`cut_through`](crate::cut_through)).
    pub const CUT_THROUGH: i32 = connredir_abi::CONNREDIR_SO_CUT_THROUGH as i32;
    /// get: the bytes written into an accelerated socket, a 64-bit count
    /// (see [`bytes_written_into`](crate::bytes_written_into)).
    pub const BYTES_WRITTEN: i32 = connredir_abi::CONNREDIR_SO_BYTES_WRITTEN as i32;
    /// `SO_ORIGINAL_DST` at `SOL_IP`, answered from the records.
    pub const SO_ORIGINAL_DST: i32 = connredir_abi::CONNREDIR_SO_ORIGINAL_DST as i32;
    /// `IP6T_SO_ORIGINAL_DST` at `SOL_IPV6`, answered from the records.
    pub const IP6T_SO_ORIGINAL_DST: i32 = connredir_abi::CONNREDIR_IP6T_SO_ORIGINAL_DST as i32;
}

/// What can go wrong, in the terms of the WFP control codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The buffer is too small; `needed` bytes are.
    #[error("buffer too small: {needed} bytes are needed")]
    InsufficientBuffer {
        /// Size needed.
        needed: usize,
    },
    /// A malformed argument: buffer under 4 bytes, bad blob, connected socket.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The socket is not connected.
    #[error("the socket is not connected: query an accepted connection")]
    NotConnected,
    /// The descriptor is not a socket.
    #[error("the descriptor is not a socket")]
    NotASocket,
    /// The redirect layer does not cover this socket.
    #[error("not supported: the connredir layer is not loaded for this socket's cgroup (is `connredir up` running, and is this process in an attached cgroup?)")]
    NotSupported,
    /// The caller may not do this: setting records needs root or a
    /// registered service; the context is only for the redirecting service.
    #[error("access denied: only root or a registered service's process may set records, and only the service that redirected a connection may read its context")]
    AccessDenied,
    /// The connection was not redirected: it has no records.
    #[error("the connection was not redirected: it has no redirect records")]
    NotRedirected,
    /// Any other system error.
    #[error(transparent)]
    Io(std::io::Error),
}

impl Error {
    /// Maps the errno of an operation to the error it means here.
    fn from_errno(err: std::io::Error) -> Error {
        match err.raw_os_error() {
            Some(libc::ENOTCONN) => Error::NotConnected,
            Some(libc::ENOTSOCK) => Error::NotASocket,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOPROTOOPT) => Error::NotSupported,
            Some(libc::EACCES) | Some(libc::EPERM) => Error::AccessDenied,
            Some(libc::ENOENT) => Error::NotRedirected,
            Some(libc::EINVAL) => Error::InvalidArgument(
                "the redirect layer rejected the request: a records blob that is malformed, \
                 truncated or of an unsupported version, or a buffer under 4 bytes"
                    .into(),
            ),
            Some(libc::EISCONN) => Error::InvalidArgument(
                "the socket is already connected: set records before connect".into(),
            ),
            _ => Error::Io(err),
        }
    }
}

/// Why [`registered_service`] found no service for a listener.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The layer is active here, but no service is registered for this
    /// listening address: no connection will be redirected to it, and the
    /// process's own connections count as anybody's.
    #[error(
        "no connredir service is registered for {0}: register one that listens there \
         (`connredir service add --name NAME --listen {0} --cgroup DIR|--uid UID|--pid PID`, \
         or a [[service]] with listen = [\"{0}\"] in the configuration)"
    )]
    NotRegistered(SocketAddr),
    /// The redirect layer does not cover the socket: no `connredir up`, or
    /// the process is not in a cgroup it is attached to (or the running
    /// layer is too old to answer this query).
    #[error(
        "the connredir layer is not active for this process (checked on {0}): \
         is `connredir up` running, and is this process in a cgroup of its scope?"
    )]
    LayerNotActive(SocketAddr),
    /// The socket is not listening: ask after `listen()`.
    #[error("the socket is not listening: ask which service it is after listen()")]
    NotListening,
    /// Any other failure (not a socket, a system error).
    #[error(transparent)]
    Other(#[from] Error),
}

/// The id of the service registered for a listening socket's local address
/// (a TCP listener, or a bound UDP socket), so a proxy can tell at startup
/// that the layer will send it connections or flows (and treat its own
/// onward connections as the service's).
///
/// Fails with [`ServiceError::NotRegistered`] when no service listens at that
/// address, [`ServiceError::LayerNotActive`] when the layer does not cover
/// the caller's cgroup, and [`ServiceError::NotListening`] before `listen()`
/// (before `bind()` for UDP; a layer from before UDP services says it for
/// every UDP socket).
/// The syscall is `getsockopt(fd, LEVEL, SERVICE, &u32, &len)`.
pub fn registered_service(listener: &impl AsFd) -> Result<ServiceId, ServiceError> {
    let fd = listener.as_fd();
    let mut id = [0u8; std::mem::size_of::<u32>()];
    match getsockopt(fd, sockopt::LEVEL, sockopt::SERVICE, &mut id) {
        Ok(n) if n == id.len() => Ok(ServiceId(u32::from_ne_bytes(id))),
        Ok(n) => Err(ServiceError::Other(Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the service id answer is {n} bytes, not 4"),
        )))),
        Err(e) => Err(match e.raw_os_error() {
            Some(libc::ENOENT) => ServiceError::NotRegistered(local_address(fd)?),
            Some(libc::EOPNOTSUPP) | Some(libc::ENOPROTOOPT) => {
                ServiceError::LayerNotActive(local_address(fd)?)
            }
            Some(libc::EINVAL) => ServiceError::NotListening,
            _ => ServiceError::Other(Error::from_errno(e)),
        }),
    }
}

/// The local address of a socket (getsockname).
fn local_address(fd: BorrowedFd<'_>) -> Result<SocketAddr, Error> {
    let addr = SockRef::from(&fd).local_addr().map_err(Error::from_errno)?;
    inet_address(&addr).ok_or_else(|| {
        Error::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the socket's address is not an IPv4 or IPv6 socket address",
        ))
    })
}

/// The IPv4 or IPv6 address a `getsockname`/`getpeername` answer holds; an
/// IPv4-mapped IPv6 address as IPv4, as [`decode_sockaddr`] gives it.
fn inet_address(addr: &socket2::SockAddr) -> Option<SocketAddr> {
    Some(match addr.as_socket()? {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => SocketAddr::V6(a),
        },
        v4 => v4,
    })
}

/// getsockopt into `buf` (NULL with length 0 for a size query); returns the length.
fn getsockopt(fd: BorrowedFd<'_>, level: i32, name: i32, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    let ptr = if buf.is_empty() {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: ptr is NULL or valid for len bytes; len is a valid socklen_t.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, ptr, &mut len) };
    if rc == 0 {
        Ok(len as usize)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A query with the buffer protocol of the WFP control codes.
fn query_into(fd: BorrowedFd<'_>, name: i32, buf: &mut [u8]) -> Result<usize, Error> {
    if !buf.is_empty() && buf.len() < std::mem::size_of::<u32>() {
        return Err(Error::InvalidArgument(format!(
            "a {}-byte buffer is smaller than a u32; pass 0 bytes to ask for the size",
            buf.len()
        )));
    }
    match getsockopt(fd, sockopt::LEVEL, name, buf) {
        Ok(n) => Ok(n),
        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
            // The kernel cannot return the size with an error: ask for it.
            let needed =
                getsockopt(fd, sockopt::LEVEL, name, &mut []).map_err(Error::from_errno)?;
            Err(Error::InsufficientBuffer { needed })
        }
        Err(e) => Err(Error::from_errno(e)),
    }
}

/// Queries the redirect records into `buf`. With an empty `buf`, returns the
/// size needed; a buffer too small gives `InsufficientBuffer { needed }`.
pub fn query_records_into(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Error> {
    query_into(fd, sockopt::RECORDS, buf)
}

/// Queries the redirect context into `buf`, with the same buffer protocol.
/// Only the service that redirected the connection (now or earlier) may.
pub fn query_context_into(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize, Error> {
    query_into(fd, sockopt::CONTEXT, buf)
}

/// Sets the records blob on a new socket, before it connects. Only root and
/// registered services' processes may; a service's process only a blob the
/// layer issued whose last hop is its own service, as it was read (the
/// layer seals what it hands out): anything else is `AccessDenied`.
pub fn set_records_from(fd: &impl AsFd, blob: &[u8]) -> Result<(), Error> {
    let fd = fd.as_fd();
    // SAFETY: blob is valid for blob.len() bytes.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            sockopt::LEVEL,
            sockopt::RECORDS,
            blob.as_ptr().cast(),
            blob.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Error::from_errno(std::io::Error::last_os_error()))
    }
}

/// Reads a blob whose size is asked first.
fn query_vec(fd: BorrowedFd<'_>, name: i32) -> Result<Vec<u8>, Error> {
    // The blob only changes when another hop is added, which cannot happen
    // to an accepted connection; a few attempts are plenty.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let needed = query_into(fd, name, &mut [])?;
        let mut buf = vec![0u8; needed.max(std::mem::size_of::<u32>())];
        match query_into(fd, name, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            // The blob grew between the two calls: ask again.
            Err(Error::InsufficientBuffer { .. }) if attempts < 4 => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads a blob with one getsockopt into a buffer of `N` bytes, the most
/// this layer answers, and hands the bytes to `parse`. Only a larger answer
/// (a newer layer) costs the size query and a second read.
fn query_once<const N: usize, T>(
    fd: BorrowedFd<'_>,
    name: i32,
    parse: impl FnOnce(&[u8]) -> Result<T, Error>,
) -> Result<T, Error> {
    let mut buf = [0u8; N];
    match query_into(fd, name, &mut buf) {
        Ok(n) => parse(&buf[..n.min(N)]),
        Err(Error::InsufficientBuffer { .. }) => parse(&query_vec(fd, name)?),
        Err(e) => Err(e),
    }
}

/// The most bytes of records this layer answers.
const RECORDS_MAX: usize = std::mem::size_of::<connredir_abi::connredir_record>();

/// The most bytes of context this layer answers: a service's own context,
/// or the default one.
const CONTEXT_MAX: usize = {
    let own = connredir_abi::CONNREDIR_MAX_CONTEXT as usize;
    let default = std::mem::size_of::<connredir_abi::connredir_default_context>();
    if own > default {
        own
    } else {
        default
    }
};

/// The redirect records of an accepted connection (one getsockopt).
pub fn query_records(fd: &impl AsFd) -> Result<RedirectRecords, Error> {
    query_once::<RECORDS_MAX, _>(fd.as_fd(), sockopt::RECORDS, RedirectRecords::from_bytes)
}

/// The redirect context of an accepted connection, for the service that
/// redirected it (state redirected-by-self or previously-redirected-by-self).
/// One getsockopt.
pub fn query_context(fd: &impl AsFd) -> Result<RedirectContext, Error> {
    query_once::<CONTEXT_MAX, _>(fd.as_fd(), sockopt::CONTEXT, |bytes| {
        Ok(RedirectContext(bytes.to_vec()))
    })
}

/// Whether the socket's data bypasses the TCP stack (sockmap acceleration,
/// for services registered with `accelerate`). Such a socket must be read
/// with read()/recv(): splice() does not see its data, and a read may fail
/// with a spurious `EAGAIN` (wait for readiness, or a moment, and retry).
/// `Err(NotSupported)` where the layer is not active.
pub fn is_accelerated(fd: &impl AsFd) -> Result<bool, Error> {
    let fd = fd.as_fd();
    let mut value: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: value is valid for len bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            sockopt::LEVEL,
            sockopt::ACCELERATED,
            (&mut value as *mut u32).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value != 0)
    } else {
        Err(Error::from_errno(std::io::Error::last_os_error()))
    }
}

/// Hands `records` to a new, not yet connected socket.
pub fn set_records(fd: &impl AsFd, records: &RedirectRecords) -> Result<(), Error> {
    set_records_from(fd, &records.to_bytes())
}

/// The original destination of an accepted connection, the way transparent
/// proxies ask for it (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`).
pub fn original_destination(fd: &impl AsFd) -> Result<SocketAddr, Error> {
    let fd = fd.as_fd();
    let family = SockRef::from(&fd)
        .local_addr()
        .map_err(Error::from_errno)?
        .family();
    let levels: &[(i32, i32)] = if i32::from(family) == libc::AF_INET6 {
        &[
            (libc::SOL_IPV6, sockopt::IP6T_SO_ORIGINAL_DST),
            (libc::SOL_IP, sockopt::SO_ORIGINAL_DST),
        ]
    } else {
        &[(libc::SOL_IP, sockopt::SO_ORIGINAL_DST)]
    };
    // Report the first telling failure; "not supported" only when every
    // level said so.
    let mut failure = Error::NotSupported;
    for &(level, name) in levels {
        let mut buf = [0u8; std::mem::size_of::<libc::sockaddr_in6>()];
        let attempt = match getsockopt(fd, level, name, &mut buf) {
            Ok(n) => decode_sockaddr(&buf[..n]).ok_or_else(|| {
                Error::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("the original destination answer ({n} bytes) is not an IPv4 or IPv6 socket address"),
                ))
            }),
            Err(e) => Err(Error::from_errno(e)),
        };
        match attempt {
            Ok(addr) => return Ok(addr),
            Err(e) if matches!(failure, Error::NotSupported) => failure = e,
            Err(_) => {}
        }
    }
    Err(failure)
}

/// Decodes a `sockaddr_in` or `sockaddr_in6` as the kernel returns it.
fn decode_sockaddr(buf: &[u8]) -> Option<SocketAddr> {
    let family = i32::from(u16::from_ne_bytes([*buf.first()?, *buf.get(1)?]));
    let port = u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]);
    match family {
        libc::AF_INET if buf.len() >= 8 => Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7])),
            port,
        )),
        libc::AF_INET6 if buf.len() >= 28 => {
            let ip: [u8; 16] = buf[8..24].try_into().ok()?;
            let scope = u32::from_ne_bytes(buf[24..28].try_into().ok()?);
            let ip = Ipv6Addr::from(ip);
            // A v4-mapped answer is an IPv4 destination.
            Some(match ip.to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
                None => SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope)),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// A connected loopback pair; this test process is in no cgroup the
    /// layer is attached to, so the kernel itself answers the private level.
    fn connected(at: &str) -> (TcpListener, TcpStream) {
        let listener = TcpListener::bind(at).unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (listener, stream)
    }

    #[test]
    fn a_pipe_is_not_a_socket() {
        let (read, _write) = std::io::pipe().unwrap();
        assert!(matches!(query_records(&read), Err(Error::NotASocket)));
        assert!(matches!(query_context(&read), Err(Error::NotASocket)));
        assert!(matches!(
            set_records(&read, &RedirectRecords::new()),
            Err(Error::NotASocket)
        ));
        assert!(matches!(
            original_destination(&read),
            Err(Error::NotASocket)
        ));
    }

    #[test]
    fn without_the_layer_the_level_is_not_supported() {
        let (_listener, stream) = connected("127.0.0.1:0");
        for result in [
            query_records(&stream).map(drop),
            query_context(&stream).map(drop),
            query_records_into(stream.as_fd(), &mut []).map(drop),
            query_context_into(stream.as_fd(), &mut [0; 64]).map(drop),
        ] {
            assert!(matches!(result, Err(Error::NotSupported)), "{result:?}");
        }
        let onward =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let result = set_records(&onward, &RedirectRecords::new());
        assert!(matches!(result, Err(Error::NotSupported)), "{result:?}");
        assert!(Error::NotSupported.to_string().contains("not loaded"));
    }

    #[test]
    fn original_destination_falls_back_to_the_kernel() {
        // Without the layer the kernel answers: ENOPROTOOPT without
        // conntrack, ENOENT or the real destination with it.
        for at in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = TcpListener::bind(at) else {
                continue; // no IPv6 here
            };
            let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            match original_destination(&stream) {
                Ok(dst) => assert_eq!(dst, listener.local_addr().unwrap()),
                Err(Error::NotSupported | Error::NotRedirected) => {}
                Err(e) => panic!("{at}: {e:?}"),
            }
        }
    }

    #[test]
    fn without_the_layer_no_service_is_registered_anywhere() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        match registered_service(&listener) {
            Err(e @ ServiceError::LayerNotActive(at)) => {
                assert_eq!(at, addr);
                assert!(e.to_string().contains(&addr.to_string()), "{e}");
            }
            other => panic!("{other:?}"),
        }
        let (read, _write) = std::io::pipe().unwrap();
        assert!(matches!(
            registered_service(&read),
            Err(ServiceError::Other(Error::NotASocket))
        ));
        let not_registered = ServiceError::NotRegistered(addr).to_string();
        assert!(
            not_registered.contains(&format!("--listen {addr}")),
            "{not_registered}"
        );
    }

    #[test]
    fn buffers_under_a_u32_are_invalid_without_a_syscall() {
        // A pipe would give NotASocket if the library made the syscall.
        let (read, _write) = std::io::pipe().unwrap();
        for len in 1..4 {
            let mut buf = vec![0u8; len];
            let err = query_records_into(read.as_fd(), &mut buf).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
            let err = query_context_into(read.as_fd(), &mut buf).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        }
    }

    #[test]
    fn errnos_map_to_errors() {
        let map = |errno| Error::from_errno(std::io::Error::from_raw_os_error(errno));
        assert!(matches!(map(libc::ENOTCONN), Error::NotConnected));
        assert!(matches!(map(libc::ENOTSOCK), Error::NotASocket));
        assert!(matches!(map(libc::EOPNOTSUPP), Error::NotSupported));
        assert!(matches!(map(libc::ENOPROTOOPT), Error::NotSupported));
        assert!(matches!(map(libc::EACCES), Error::AccessDenied));
        assert!(matches!(map(libc::ENOENT), Error::NotRedirected));
        assert!(matches!(map(libc::EINVAL), Error::InvalidArgument(_)));
        match map(libc::EISCONN) {
            Error::InvalidArgument(why) => assert!(why.contains("before connect"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(map(libc::EIO), Error::Io(_)));
    }

    #[test]
    fn sockaddrs_decode() {
        let v4 = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 8080u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([127, 0, 0, 2]),
            },
            sin_zero: [0; 8],
        };
        assert_eq!(
            decode_sockaddr(records::plain_bytes(&v4)),
            Some("127.0.0.2:8080".parse().unwrap())
        );
        let mut v6 = libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as u16,
            sin6_port: 443u16.to_be(),
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr {
                s6_addr: "2001:db8::5".parse::<Ipv6Addr>().unwrap().octets(),
            },
            sin6_scope_id: 3,
        };
        assert_eq!(
            decode_sockaddr(records::plain_bytes(&v6)),
            Some("[2001:db8::5%3]:443".parse().unwrap())
        );
        v6.sin6_addr.s6_addr = "::ffff:192.0.2.9".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(
            decode_sockaddr(records::plain_bytes(&v6)),
            Some("192.0.2.9:443".parse().unwrap()),
            "a v4-mapped destination is an IPv4 one"
        );
        assert_eq!(decode_sockaddr(&records::plain_bytes(&v6)[..20]), None);
        assert_eq!(decode_sockaddr(&[]), None);
    }
}
