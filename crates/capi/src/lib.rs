//! libconnredir: the `connredir` library for C, and for any language with a
//! C foreign-function interface.
//!
//! Each function here is declared, and documented for its callers, in
//! `include/connredir.h`; `include/connredir/wfp.h` gives the Windows names
//! (`WSAIoctl`, `SIO_*`, `WSAE*`) on top. Every function returns 0 or a
//! negative errno value (and sets `errno` to the positive one), so C callers
//! need no error type of ours. The work is done by the Rust library
//! (`crates/connredir`); this crate only converts arguments and errors.

#![warn(missing_docs)]

use std::ffi::{c_int, c_void};
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;

use connredir::{CutThroughError, Error, RedirectContext, RedirectRecords, RedirectState};
use connredir::{ServiceError, ServiceId};
use connredir_abi::connredir_record;

/// `SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS` (`CONNREDIR_SIO_QUERY_RECORDS`).
const SIO_QUERY_RECORDS: u32 = 0x9800_00DC;
/// `SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT` (`CONNREDIR_SIO_QUERY_CONTEXT`).
const SIO_QUERY_CONTEXT: u32 = 0x9800_00DD;
/// `SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS` (`CONNREDIR_SIO_SET_RECORDS`).
const SIO_SET_RECORDS: u32 = 0x9800_00DE;

/// The size of a `ULONG` on Windows: the smallest output buffer the query
/// codes take, other than 0 (the size query).
const ULONG_SIZE: usize = 4;

/// Sets `errno` and returns the negative value, the convention of every
/// function of the header.
fn fail(errno: c_int) -> c_int {
    // SAFETY: __errno_location returns this thread's errno, always valid.
    unsafe { *libc::__errno_location() = errno };
    -errno
}

/// The errno value that means `err` (see the table in connredir.h).
fn errno_of(err: &Error) -> c_int {
    match err {
        Error::InsufficientBuffer { .. } => libc::ENOBUFS,
        Error::InvalidArgument(_) => libc::EINVAL,
        Error::NotConnected => libc::ENOTCONN,
        Error::NotASocket => libc::ENOTSOCK,
        Error::NotSupported => libc::EOPNOTSUPP,
        Error::AccessDenied => libc::EACCES,
        Error::NotRedirected => libc::ENOENT,
        Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// 0, or the failure of `result` as [`fail`] reports it.
fn status(result: Result<(), Error>) -> c_int {
    match result {
        Ok(()) => 0,
        Err(e) => fail(errno_of(&e)),
    }
}

/// A descriptor the caller owns, borrowed for one call. Negative
/// descriptors cannot be borrowed: `EBADF`, as the system call would say.
fn borrow_fd<'a>(fd: c_int) -> Result<BorrowedFd<'a>, Error> {
    if fd < 0 {
        return Err(Error::Io(std::io::Error::from_raw_os_error(libc::EBADF)));
    }
    // SAFETY: fd is not -1; the caller keeps it open for the call, and the
    // borrow does not outlive the call.
    Ok(unsafe { BorrowedFd::borrow_raw(fd) })
}

/// The `len` bytes at `ptr` (NULL only with length 0).
///
/// # Safety
///
/// `ptr` must be valid for reads of `len` bytes, or NULL.
unsafe fn input<'a>(ptr: *const c_void, len: usize) -> Result<&'a [u8], Error> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Error::Io(std::io::Error::from_raw_os_error(libc::EFAULT)));
    }
    // SAFETY: the caller promises len readable bytes at ptr.
    Ok(unsafe { std::slice::from_raw_parts(ptr.cast(), len) })
}

/// The `len` writable bytes at `ptr` (NULL only with length 0).
///
/// # Safety
///
/// `ptr` must be valid for writes of `len` bytes, or NULL.
unsafe fn output<'a>(ptr: *mut c_void, len: usize) -> Result<&'a mut [u8], Error> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(Error::Io(std::io::Error::from_raw_os_error(libc::EFAULT)));
    }
    // SAFETY: the caller promises len writable bytes at ptr.
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr.cast(), len) })
}

/// A query with the buffer protocol of the WFP control codes: returns the
/// size needed (for an empty buffer) or written, and on
/// `InsufficientBuffer` the size needed with the error.
type Query = fn(BorrowedFd<'_>, &mut [u8]) -> Result<usize, Error>;

/// Runs `query` on `fd` into `buf`/`len`; the size goes to `*size` in every
/// case the protocol gives one, else 0.
///
/// # Safety
///
/// `buf` valid for writes of `len` bytes (or NULL); `size` writable (or NULL).
unsafe fn query_buffer(
    query: Query,
    fd: c_int,
    buf: *mut c_void,
    len: usize,
    size: *mut usize,
) -> c_int {
    if size.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: size is not NULL and, as the caller promises, writable.
    unsafe { *size = 0 };
    // Checked before the buffer and the descriptor: the pages name no
    // other condition for it.
    if len > 0 && len < ULONG_SIZE {
        return fail(libc::EINVAL);
    }
    // SAFETY: forwarded from the caller.
    let result = unsafe { output(buf, len) }.and_then(|buf| query(borrow_fd(fd)?, buf));
    match result {
        Ok(n) => {
            // SAFETY: as above.
            unsafe { *size = n };
            0
        }
        Err(Error::InsufficientBuffer { needed }) => {
            // SAFETY: as above.
            unsafe { *size = needed };
            fail(libc::ENOBUFS)
        }
        Err(e) => fail(errno_of(&e)),
    }
}

/// WSAIoctl for the three WFP connection-redirect control codes (see
/// connredir.h for the buffer protocol and the errors).
///
/// # Safety
///
/// `in_` valid for reads of `in_len` bytes (or NULL), `out` for writes of
/// `out_len` bytes (or NULL), `bytes_returned` writable (or NULL).
#[no_mangle]
pub unsafe extern "C" fn connredir_ioctl(
    fd: c_int,
    code: u32,
    in_: *const c_void,
    in_len: u32,
    out: *mut c_void,
    out_len: u32,
    bytes_returned: *mut u32,
) -> c_int {
    if bytes_returned.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: not NULL, and writable as the caller promises.
    unsafe { *bytes_returned = 0 };
    // WSAENOTSOCK is "the descriptor is not a socket": a descriptor that
    // is not open is not one either.
    let not_a_socket = |rc: c_int| {
        if rc == -libc::EBADF {
            fail(libc::ENOTSOCK)
        } else {
            rc
        }
    };
    let query: Query = match code {
        SIO_QUERY_RECORDS => connredir::query_records_into,
        SIO_QUERY_CONTEXT => connredir::query_context_into,
        SIO_SET_RECORDS => {
            // "This parameter must be set to zero."
            if out_len != 0 {
                return fail(libc::EINVAL);
            }
            // SAFETY: forwarded from the caller.
            return not_a_socket(unsafe { connredir_set_records(fd, in_, in_len as usize) });
        }
        // "The dwIoControlCode parameter is not a valid command."
        _ => return fail(libc::EINVAL),
    };
    let mut size = 0usize;
    // SAFETY: forwarded from the caller; size is a local.
    let rc = unsafe { query_buffer(query, fd, out, out_len as usize, &mut size) };
    // SAFETY: as above. The blobs are at most a few KiB: they fit a DWORD.
    unsafe { *bytes_returned = u32::try_from(size).unwrap_or(u32::MAX) };
    not_a_socket(rc)
}

/// The records blob of an accepted connection, with the buffer protocol.
///
/// # Safety
///
/// `buf` valid for writes of `len` bytes (or NULL), `size` writable.
#[no_mangle]
pub unsafe extern "C" fn connredir_query_records(
    fd: c_int,
    buf: *mut c_void,
    len: usize,
    size: *mut usize,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { query_buffer(connredir::query_records_into, fd, buf, len, size) }
}

/// The redirect context of an accepted connection, with the buffer protocol.
///
/// # Safety
///
/// `buf` valid for writes of `len` bytes (or NULL), `size` writable.
#[no_mangle]
pub unsafe extern "C" fn connredir_query_context(
    fd: c_int,
    buf: *mut c_void,
    len: usize,
    size: *mut usize,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe { query_buffer(connredir::query_context_into, fd, buf, len, size) }
}

/// Sets a records blob on a new socket, before connect.
///
/// # Safety
///
/// `blob` valid for reads of `len` bytes (or NULL with length 0).
#[no_mangle]
pub unsafe extern "C" fn connredir_set_records(
    fd: c_int,
    blob: *const c_void,
    len: usize,
) -> c_int {
    // SAFETY: forwarded from the caller.
    let blob = unsafe { input(blob, len) };
    status(blob.and_then(|blob| connredir::set_records_from(&borrow_fd(fd)?, blob)))
}

/// Writes `addr` as a sockaddr_in or sockaddr_in6 into `out`, cut to
/// `*out_len`, and its full size into `*out_len`.
///
/// # Safety
///
/// `out` valid for writes of `*out_len` bytes; `out_len` readable and
/// writable (either may be NULL: EFAULT).
unsafe fn put_sockaddr(
    addr: SocketAddr,
    out: *mut libc::sockaddr,
    out_len: *mut libc::socklen_t,
) -> Result<(), Error> {
    let efault = || Error::Io(std::io::Error::from_raw_os_error(libc::EFAULT));
    if out_len.is_null() {
        return Err(efault());
    }
    let addr = socket2::SockAddr::from(addr);
    // SAFETY: out_len is not NULL and readable.
    let room = unsafe { *out_len } as usize;
    let n = room.min(addr.len() as usize);
    if n > 0 {
        if out.is_null() {
            return Err(efault());
        }
        // SAFETY: addr holds addr.len() bytes; out has room for `room`.
        unsafe { std::ptr::copy_nonoverlapping(addr.as_ptr().cast::<u8>(), out.cast(), n) };
    }
    // SAFETY: as above.
    unsafe { *out_len = addr.len() };
    Ok(())
}

/// Where an accepted connection was going (SO_ORIGINAL_DST).
///
/// # Safety
///
/// `addr` valid for writes of `*addr_len` bytes; `addr_len` readable and
/// writable.
#[no_mangle]
pub unsafe extern "C" fn connredir_original_destination(
    fd: c_int,
    addr: *mut libc::sockaddr,
    addr_len: *mut libc::socklen_t,
) -> c_int {
    let result = borrow_fd(fd)
        .and_then(|fd| connredir::original_destination(&fd))
        // SAFETY: forwarded from the caller.
        .and_then(|dst| unsafe { put_sockaddr(dst, addr, addr_len) });
    status(result)
}

/// Parses a blob (NULL with length 0 is an empty, hence invalid, blob).
///
/// # Safety
///
/// `blob` valid for reads of `len` bytes (or NULL).
unsafe fn parse(blob: *const c_void, len: usize) -> Result<RedirectRecords, Error> {
    // SAFETY: forwarded from the caller.
    RedirectRecords::from_bytes(unsafe { input(blob, len) }?)
}

/// Checks a records blob and copies it, in the current layout, to `*out`.
///
/// # Safety
///
/// `blob` valid for reads of `len` bytes; `out` writable (or NULL: EFAULT).
#[no_mangle]
pub unsafe extern "C" fn connredir_records_parse(
    blob: *const c_void,
    len: usize,
    out: *mut connredir_record,
) -> c_int {
    if out.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: forwarded from the caller.
    let result = unsafe { parse(blob, len) }.map(|records| {
        let bytes = records.to_bytes();
        debug_assert_eq!(bytes.len(), std::mem::size_of::<connredir_record>());
        // SAFETY: out is writable for one record; to_bytes gives exactly one.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.cast::<u8>(), bytes.len()) };
    });
    status(result)
}

/// The values of `enum connredir_redirect_state`.
fn state_value(state: RedirectState) -> c_int {
    match state {
        RedirectState::NotRedirected => 0,
        RedirectState::RedirectedBySelf => 1,
        RedirectState::RedirectedByOther => 2,
        RedirectState::PreviouslyRedirectedBySelf => 3,
    }
}

/// The redirect state of a records blob for a service.
///
/// # Safety
///
/// `blob` valid for reads of `len` bytes (or NULL with 0); `state` writable.
#[no_mangle]
pub unsafe extern "C" fn connredir_redirect_state(
    blob: *const c_void,
    len: usize,
    service_id: u32,
    state: *mut c_int,
) -> c_int {
    if state.is_null() {
        return fail(libc::EFAULT);
    }
    let records = if len == 0 {
        Ok(None)
    } else {
        // SAFETY: forwarded from the caller.
        unsafe { parse(blob, len) }.map(Some)
    };
    status(records.map(|records| {
        let value = state_value(connredir::redirect_state(
            records.as_ref(),
            ServiceId(service_id),
        ));
        // SAFETY: state is not NULL and writable.
        unsafe { *state = value };
    }))
}

/// A destination of a records blob, chosen by `pick`.
///
/// # Safety
///
/// As for [`connredir_records_original_destination`].
unsafe fn records_destination(
    blob: *const c_void,
    len: usize,
    addr: *mut libc::sockaddr,
    addr_len: *mut libc::socklen_t,
    pick: fn(&RedirectRecords) -> Option<SocketAddr>,
) -> c_int {
    // SAFETY: forwarded from the caller.
    let result = unsafe { parse(blob, len) }.and_then(|records| {
        let dst = pick(&records).ok_or(Error::NotRedirected)?;
        // SAFETY: forwarded from the caller.
        unsafe { put_sockaddr(dst, addr, addr_len) }
    });
    status(result)
}

/// The last hop's destination of a records blob.
///
/// # Safety
///
/// `blob` valid for reads of `len` bytes; `addr` for writes of `*addr_len`
/// bytes; `addr_len` readable and writable.
#[no_mangle]
pub unsafe extern "C" fn connredir_records_original_destination(
    blob: *const c_void,
    len: usize,
    addr: *mut libc::sockaddr,
    addr_len: *mut libc::socklen_t,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe {
        records_destination(
            blob,
            len,
            addr,
            addr_len,
            RedirectRecords::original_destination,
        )
    }
}

/// The first hop's destination of a records blob.
///
/// # Safety
///
/// As for [`connredir_records_original_destination`].
#[no_mangle]
pub unsafe extern "C" fn connredir_records_first_destination(
    blob: *const c_void,
    len: usize,
    addr: *mut libc::sockaddr,
    addr_len: *mut libc::socklen_t,
) -> c_int {
    // SAFETY: forwarded from the caller.
    unsafe {
        records_destination(
            blob,
            len,
            addr,
            addr_len,
            RedirectRecords::first_destination,
        )
    }
}

/// Decodes a default redirect context.
///
/// # Safety
///
/// `context` valid for reads of `len` bytes; `remote`/`local` for writes of
/// `*remote_len`/`*local_len` bytes; the lengths readable and writable.
#[no_mangle]
pub unsafe extern "C" fn connredir_context_addresses(
    context: *const c_void,
    len: usize,
    remote: *mut libc::sockaddr,
    remote_len: *mut libc::socklen_t,
    local: *mut libc::sockaddr,
    local_len: *mut libc::socklen_t,
) -> c_int {
    // SAFETY: forwarded from the caller.
    let result = unsafe { input(context, len) }.and_then(|bytes| {
        let context = RedirectContext(bytes.to_vec());
        let (dst, src) = context
            .original_addresses()
            .ok_or_else(|| Error::InvalidArgument("not a default redirect context".into()))?;
        // SAFETY: forwarded from the caller.
        unsafe { put_sockaddr(dst, remote, remote_len) }?;
        match src {
            // SAFETY: forwarded from the caller.
            Some(src) => unsafe { put_sockaddr(src, local, local_len) },
            None if local_len.is_null() => {
                Err(Error::Io(std::io::Error::from_raw_os_error(libc::EFAULT)))
            }
            None => {
                // SAFETY: not NULL, writable as the caller promises.
                unsafe { *local_len = 0 };
                Ok(())
            }
        }
    });
    status(result)
}

/// The id of the service registered for a listening socket's address.
///
/// # Safety
///
/// `service_id` writable (or NULL: EFAULT).
#[no_mangle]
pub unsafe extern "C" fn connredir_registered_service(
    listen_fd: c_int,
    service_id: *mut u32,
) -> c_int {
    if service_id.is_null() {
        return fail(libc::EFAULT);
    }
    let fd = match borrow_fd(listen_fd) {
        Ok(fd) => fd,
        Err(e) => return fail(errno_of(&e)),
    };
    match connredir::registered_service(&fd) {
        Ok(id) => {
            // SAFETY: not NULL, writable as the caller promises.
            unsafe { *service_id = id.0 };
            0
        }
        Err(ServiceError::NotRegistered(_)) => fail(libc::ENOENT),
        Err(ServiceError::LayerNotActive(_)) => fail(libc::EOPNOTSUPP),
        Err(ServiceError::NotListening) => fail(libc::EINVAL),
        Err(ServiceError::Other(e)) => fail(errno_of(&e)),
    }
}

/// Whether a socket's data bypasses TCP.
///
/// # Safety
///
/// `accelerated` writable (or NULL: EFAULT).
#[no_mangle]
pub unsafe extern "C" fn connredir_is_accelerated(fd: c_int, accelerated: *mut c_int) -> c_int {
    if accelerated.is_null() {
        return fail(libc::EFAULT);
    }
    status(
        borrow_fd(fd)
            .and_then(|fd| connredir::is_accelerated(&fd))
            .map(|yes| {
                // SAFETY: not NULL, writable as the caller promises.
                unsafe { *accelerated = c_int::from(yes) };
            }),
    )
}

/// Cuts a direction of an accelerated flow through.
///
/// # Safety
///
/// None beyond passing open descriptors; unsafe for symmetry with the rest.
#[no_mangle]
pub unsafe extern "C" fn connredir_cut_through(
    from_fd: c_int,
    to_fd: c_int,
    received: u64,
) -> c_int {
    let (from, to) = match (borrow_fd(from_fd), borrow_fd(to_fd)) {
        (Ok(from), Ok(to)) => (from, to),
        (Err(e), _) | (_, Err(e)) => return fail(errno_of(&e)),
    };
    match connredir::cut_through(&from, &to, received) {
        Ok(()) => 0,
        Err(CutThroughError::InFlight) => fail(libc::EAGAIN),
        Err(CutThroughError::NotAccelerated) => fail(libc::EOPNOTSUPP),
        Err(CutThroughError::AccessDenied) => fail(libc::EACCES),
        Err(CutThroughError::Already) => fail(libc::EALREADY),
        Err(CutThroughError::Io(e)) => fail(e.raw_os_error().unwrap_or(libc::EIO)),
    }
}

/// All bytes the peer wrote into an accelerated socket.
///
/// # Safety
///
/// `bytes` writable (or NULL: EFAULT).
#[no_mangle]
pub unsafe extern "C" fn connredir_bytes_written_into(fd: c_int, bytes: *mut u64) -> c_int {
    if bytes.is_null() {
        return fail(libc::EFAULT);
    }
    status(
        borrow_fd(fd)
            .and_then(|fd| connredir::bytes_written_into(&fd))
            .map(|n| {
                // SAFETY: not NULL, writable as the caller promises.
                unsafe { *bytes = n };
            }),
    )
}

/// The IPv4 or IPv6 address of the `len` bytes at `addr` (a sockaddr_in or
/// sockaddr_in6; an IPv4-mapped IPv6 address stays IPv6, as the kernel
/// takes it).
///
/// # Safety
///
/// `addr` valid for reads of `len` bytes (or NULL: EFAULT).
unsafe fn get_sockaddr(
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
) -> Result<SocketAddr, Error> {
    if addr.is_null() {
        return Err(Error::Io(std::io::Error::from_raw_os_error(libc::EFAULT)));
    }
    let len = len as usize;
    let invalid = || Error::InvalidArgument("not an IPv4 or IPv6 socket address".into());
    if len < std::mem::size_of::<libc::sa_family_t>() {
        return Err(invalid());
    }
    // SAFETY: all zeroes is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let n = len.min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: addr holds len >= n readable bytes; storage has room for n.
    unsafe {
        std::ptr::copy_nonoverlapping(
            addr.cast::<u8>(),
            std::ptr::addr_of_mut!(storage).cast::<u8>(),
            n,
        )
    };
    let needed = match c_int::from(storage.ss_family) {
        libc::AF_INET => std::mem::size_of::<libc::sockaddr_in>(),
        libc::AF_INET6 => std::mem::size_of::<libc::sockaddr_in6>(),
        _ => return Err(invalid()),
    };
    if n < needed {
        return Err(invalid());
    }
    // SAFETY: storage is a sockaddr_storage holding n valid bytes.
    let addr = unsafe { socket2::SockAddr::new(storage, n as libc::socklen_t) };
    addr.as_socket().ok_or_else(invalid)
}

/// Hands a socket to the caller: its descriptor into `*fd_out`.
///
/// # Safety
///
/// `fd_out` writable (checked for NULL by the caller).
unsafe fn give_fd(socket: std::net::UdpSocket, fd_out: *mut c_int) {
    use std::os::fd::IntoRawFd;
    // SAFETY: not NULL (checked by the caller), writable as promised.
    unsafe { *fd_out = socket.into_raw_fd() };
}

/// The service's socket for one client's UDP flow (connredir::UdpFlow::open).
///
/// # Safety
///
/// `service`/`client` valid for reads of their lengths; `fd_out` writable
/// (any may be NULL: EFAULT).
#[no_mangle]
pub unsafe extern "C" fn connredir_udp_flow_open(
    service: *const libc::sockaddr,
    service_len: libc::socklen_t,
    client: *const libc::sockaddr,
    client_len: libc::socklen_t,
    fd_out: *mut c_int,
) -> c_int {
    if fd_out.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: not NULL, writable as the caller promises.
    unsafe { *fd_out = -1 };
    let open = || -> Result<connredir::UdpFlow, Error> {
        // SAFETY: forwarded from the caller.
        let service = unsafe { get_sockaddr(service, service_len) }?;
        // SAFETY: forwarded from the caller.
        let client = unsafe { get_sockaddr(client, client_len) }?;
        connredir::UdpFlow::open(service, client)
    };
    // SAFETY: fd_out checked above.
    status(open().map(|flow| unsafe { give_fd(flow.into_socket(), fd_out) }))
}

/// A UDP socket to `destination` carrying the records of the flow on
/// `flow_fd`, connected (connredir::UdpFlow::connect_onward).
///
/// # Safety
///
/// `destination` valid for reads of `destination_len` bytes; `fd_out`
/// writable (either may be NULL: EFAULT).
#[no_mangle]
pub unsafe extern "C" fn connredir_udp_connect_onward(
    flow_fd: c_int,
    destination: *const libc::sockaddr,
    destination_len: libc::socklen_t,
    fd_out: *mut c_int,
) -> c_int {
    if fd_out.is_null() {
        return fail(libc::EFAULT);
    }
    // SAFETY: not NULL, writable as the caller promises.
    unsafe { *fd_out = -1 };
    let onward = || -> Result<std::net::UdpSocket, Error> {
        let flow = borrow_fd(flow_fd)?;
        // SAFETY: forwarded from the caller.
        let destination = unsafe { get_sockaddr(destination, destination_len) }?;
        // Read first: a flow that cannot be asked makes no socket.
        let records = match connredir::query_records(&flow) {
            Ok(records) => Some(records),
            Err(Error::NotRedirected) => None,
            Err(e) => return Err(e),
        };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(destination),
            socket2::Type::DGRAM,
            None,
        )
        .map_err(Error::Io)?;
        if let Some(records) = &records {
            connredir::set_records(&socket, records)?;
        }
        socket.connect(&destination.into()).map_err(Error::Io)?;
        Ok(socket.into())
    };
    // SAFETY: fd_out checked above.
    status(onward().map(|socket| unsafe { give_fd(socket, fd_out) }))
}

#[cfg(test)]
mod tests;
