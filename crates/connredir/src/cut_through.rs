//! Cut-through: once a service has inspected a direction of an accelerated
//! flow, it asks the layer to move the rest of that direction's bytes from
//! one of its peers to the other, without passing through the service.
//!
//! Only for flows accelerated on both legs (the client's connection to the
//! service and the service's onward one, both local): the data already
//! moves socket to socket, and the layer redirects the writer from the
//! service's socket to the far end's. See `CONNREDIR_SO_CUT_THROUGH` in the
//! ABI header (`uapi.h`) for the ordering rule.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use connredir_abi::{connredir_cut_through, connredir_sock_tuple};
use socket2::SockRef;

use crate::{getsockopt, inet_address, sockopt, Error};

/// Why a cut-through did not happen.
#[derive(Debug, thiserror::Error)]
pub enum CutThroughError {
    /// The peer has written more than the caller has read: read and forward
    /// the rest, then ask again.
    #[error("bytes are still in flight: read and forward them, then ask again")]
    InFlight,
    /// One of the four sockets is not accelerated (or stayed on TCP), or
    /// the layer is not active here.
    #[error("not accelerated on both legs: the layer cannot move this direction by itself")]
    NotAccelerated,
    /// The two sockets are not both the calling service's.
    #[error("access denied: both sockets must be the calling service's (accepted on its address, or onward sockets it set records on)")]
    AccessDenied,
    /// This direction is cut through already.
    #[error("this direction is cut through already")]
    Already,
    /// Any other system error.
    #[error(transparent)]
    Io(std::io::Error),
}

/// Asks the layer to send what `from`'s peer writes from now on straight to
/// `to`'s peer. `received` is every byte read from `from` so far, all of
/// them already written to `to`.
///
/// On [`CutThroughError::InFlight`], read what arrived, write it to `to`,
/// and call again with the new count. After success, `from` reads only EOF
/// (or an error) when its peer closes; forward that as usual.
pub fn cut_through(from: &impl AsFd, to: &impl AsFd, received: u64) -> Result<(), CutThroughError> {
    let to = SockRef::from(to);
    let io = CutThroughError::Io;
    let local = to.local_addr().and_then(inet).map_err(io)?;
    let peer = to.peer_addr().and_then(inet).map_err(io)?;
    cut_through_to(from, local, peer, received)
}

/// [`cut_through`] for a `to` socket named by its own address and its
/// peer's, for a caller that knows them (it saves two system calls).
pub fn cut_through_to(
    from: &impl AsFd,
    to_local: SocketAddr,
    to_peer: SocketAddr,
    received: u64,
) -> Result<(), CutThroughError> {
    let request = connredir_cut_through {
        received,
        to: connredir_sock_tuple::from_socket_addrs(&to_local, &to_peer),
        reserved: 0,
    };
    // SAFETY: request is valid for its size.
    let rc = unsafe {
        libc::setsockopt(
            from.as_fd().as_raw_fd(),
            sockopt::LEVEL,
            sockopt::CUT_THROUGH,
            (&request as *const connredir_cut_through).cast(),
            std::mem::size_of_val(&request) as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    Err(match err.raw_os_error() {
        Some(libc::EAGAIN) => CutThroughError::InFlight,
        Some(libc::EOPNOTSUPP) | Some(libc::ENOPROTOOPT) => CutThroughError::NotAccelerated,
        Some(libc::EACCES) | Some(libc::EPERM) => CutThroughError::AccessDenied,
        Some(libc::EALREADY) => CutThroughError::Already,
        _ => CutThroughError::Io(err),
    })
}

/// All bytes `from`'s peer has written into it socket to socket: those the
/// caller read and, after a cut-through, those the layer moved past it. It
/// grows while a cut-through direction is busy, which the caller cannot see
/// otherwise, and stays readable after the peer closed (the count is kept
/// with `from`). `Err(NotRedirected)` when the socket is not accelerated.
pub fn bytes_written_into(from: &impl AsFd) -> Result<u64, Error> {
    let mut buf = [0u8; 8];
    let n = getsockopt(
        from.as_fd(),
        sockopt::LEVEL,
        sockopt::BYTES_WRITTEN,
        &mut buf,
    )
    .map_err(Error::from_errno)?;
    if n != buf.len() {
        return Err(Error::InvalidArgument(format!(
            "the layer answered {n} bytes for a 64-bit count"
        )));
    }
    Ok(u64::from_ne_bytes(buf))
}

/// The IPv4 or IPv6 address of a `getsockname`/`getpeername` answer.
fn inet(addr: socket2::SockAddr) -> std::io::Result<SocketAddr> {
    inet_address(&addr).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not an IPv4 or IPv6 socket",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_layer_nothing_is_cut_through() {
        // This test process is in no cgroup the layer is attached to.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        let err = cut_through(&a, &b, 0).unwrap_err();
        assert!(matches!(err, CutThroughError::NotAccelerated), "{err:?}");
        assert!(matches!(bytes_written_into(&a), Err(Error::NotSupported)));
    }
}
