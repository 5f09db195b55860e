//! What can be checked without the layer: the header agrees with the
//! library, the answers that need no redirected connection, and the blob
//! readers. The answers on redirected connections are tested end to end,
//! from C, in `crates/testkit/tests/capi.rs`.

use super::*;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

const HEADER: &str = include_str!("../include/connredir.h");
const WFP_HEADER: &str = include_str!("../include/connredir/wfp.h");
const SOURCE: &str = include_str!("lib.rs");

/// The value of `#define NAME VALUE` in `header`.
fn define(header: &str, name: &str) -> String {
    header
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("#define") && words.next() == Some(name))
                .then(|| words.next().unwrap().to_string())
        })
        .unwrap_or_else(|| panic!("{name} is not defined"))
}

#[test]
fn the_header_declares_every_exported_function_and_no_other() {
    let mut declared: Vec<&str> = HEADER
        .lines()
        .filter_map(|l| l.strip_prefix("int "))
        .filter_map(|l| l.split('(').next())
        .collect();
    let mut exported: Vec<&str> = SOURCE
        .lines()
        .filter_map(|l| l.strip_prefix("pub unsafe extern \"C\" fn "))
        .filter_map(|l| l.split('(').next())
        .collect();
    declared.sort_unstable();
    exported.sort_unstable();
    assert!(!declared.is_empty());
    assert_eq!(declared, exported);
}

#[test]
fn the_control_codes_are_the_headers() {
    for (name, value) in [
        ("CONNREDIR_SIO_QUERY_RECORDS", SIO_QUERY_RECORDS),
        ("CONNREDIR_SIO_QUERY_CONTEXT", SIO_QUERY_CONTEXT),
        ("CONNREDIR_SIO_SET_RECORDS", SIO_SET_RECORDS),
    ] {
        let text = define(HEADER, name);
        let hex = text.trim_start_matches("0x").trim_end_matches('u');
        assert_eq!(u32::from_str_radix(hex, 16).unwrap(), value, "{name}");
    }
    // The Windows names are the same codes, not copies of the numbers.
    for (windows, ours) in [
        (
            "SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS",
            "CONNREDIR_SIO_QUERY_RECORDS",
        ),
        (
            "SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT",
            "CONNREDIR_SIO_QUERY_CONTEXT",
        ),
        (
            "SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS",
            "CONNREDIR_SIO_SET_RECORDS",
        ),
    ] {
        assert_eq!(define(WFP_HEADER, windows), ours);
    }
    // The layouts come from the one ABI header, included, never copied.
    assert!(HEADER.contains("#include <connredir/uapi.h>"));
    assert!(!HEADER.contains("struct connredir_record {"));
}

/// connredir_ioctl on `fd`: (return value, errno when it failed, bytes returned).
fn ioctl(fd: c_int, code: u32, input: &[u8], out: &mut [u8]) -> (c_int, c_int, u32) {
    let mut returned = 0xdead_beef;
    // SAFETY: the slices are valid for their lengths; returned is a local.
    let rc = unsafe {
        connredir_ioctl(
            fd,
            code,
            input.as_ptr().cast(),
            input.len() as u32,
            if out.is_empty() {
                std::ptr::null_mut()
            } else {
                out.as_mut_ptr().cast()
            },
            out.len() as u32,
            &mut returned,
        )
    };
    // SAFETY: this thread's errno.
    let errno = if rc == 0 {
        0
    } else {
        unsafe { *libc::__errno_location() }
    };
    assert!(
        rc == 0 || rc == -errno,
        "rc {rc} and errno {errno} disagree"
    );
    (rc, errno, returned)
}

#[test]
fn answers_that_need_no_redirected_connection() {
    let (read, _write) = std::io::pipe().unwrap();
    let pipe = read.as_raw_fd();
    let mut big = [0u8; 512];
    for code in [SIO_QUERY_RECORDS, SIO_QUERY_CONTEXT] {
        assert_eq!(
            ioctl(pipe, code, &[], &mut big),
            (-libc::ENOTSOCK, libc::ENOTSOCK, 0)
        );
        assert_eq!(ioctl(pipe, code, &[], &mut []).1, libc::ENOTSOCK);
        assert_eq!(ioctl(-1, code, &[], &mut big).1, libc::ENOTSOCK, "not open");
        for len in 1..4 {
            // Smaller than a ULONG: invalid before anything else is looked at.
            assert_eq!(
                ioctl(pipe, code, &[], &mut big[..len]),
                (-libc::EINVAL, libc::EINVAL, 0)
            );
        }
    }
    let blob = RedirectRecords::new().to_bytes();
    assert_eq!(
        ioctl(pipe, SIO_SET_RECORDS, &blob, &mut []).1,
        libc::ENOTSOCK
    );
    assert_eq!(
        ioctl(pipe, SIO_SET_RECORDS, &blob, &mut big[..4]).1,
        libc::EINVAL
    );
    assert_eq!(
        ioctl(pipe, 0x9800_00DF, &[], &mut big).1,
        libc::EINVAL,
        "unknown code"
    );

    // Where the layer does not cover the socket (this test process is in no
    // attached cgroup), the kernel itself answers the private level.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let fd = stream.as_raw_fd();
    assert_eq!(
        ioctl(fd, SIO_QUERY_RECORDS, &[], &mut big).1,
        libc::EOPNOTSUPP
    );
    assert_eq!(
        ioctl(fd, SIO_QUERY_CONTEXT, &[], &mut []).1,
        libc::EOPNOTSUPP
    );

    // NULL where a result goes.
    // SAFETY: NULL pointers are what is tested; the call checks them.
    let rc = unsafe {
        connredir_ioctl(
            fd,
            SIO_QUERY_RECORDS,
            std::ptr::null(),
            0,
            big.as_mut_ptr().cast(),
            64,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, -libc::EFAULT);
    let mut returned = 0;
    // SAFETY: as above.
    let rc = unsafe {
        connredir_ioctl(
            fd,
            SIO_QUERY_RECORDS,
            std::ptr::null(),
            0,
            std::ptr::null_mut(),
            64,
            &mut returned,
        )
    };
    assert_eq!((rc, returned), (-libc::EFAULT, 0));
    let mut id = 0;
    // SAFETY: id is a local.
    assert_eq!(
        unsafe { connredir_registered_service(listener.as_raw_fd(), &mut id) },
        -libc::EOPNOTSUPP
    );
    assert_eq!(
        unsafe { connredir_registered_service(pipe, &mut id) },
        -libc::ENOTSOCK
    );
}

/// A sockaddr written by the library, read back.
fn read_sockaddr(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> SocketAddr {
    // SAFETY: storage holds len bytes of a sockaddr the library wrote.
    let addr = unsafe { socket2::SockAddr::new(*storage, len) };
    addr.as_socket().expect("an IP socket address")
}

#[test]
fn records_blobs_are_read_in_c_terms() {
    let mut records = RedirectRecords::new();
    records
        .push_hop(ServiceId(4), "192.0.2.1:443".parse().unwrap())
        .unwrap();
    records
        .push_hop(ServiceId(9), "[2001:db8::7]:8443".parse().unwrap())
        .unwrap();
    let blob = records.to_bytes();

    let mut parsed = connredir_record::default();
    // SAFETY: blob and parsed are valid for their sizes.
    assert_eq!(
        unsafe { connredir_records_parse(blob.as_ptr().cast(), blob.len(), &mut parsed) },
        0
    );
    assert_eq!(
        (
            parsed.hop_count,
            parsed.hops[0].service_id,
            parsed.hops[1].service_id
        ),
        (2, 4, 9)
    );
    // SAFETY: as above.
    let bad = unsafe { connredir_records_parse(blob.as_ptr().cast(), 10, &mut parsed) };
    assert_eq!(bad, -libc::EINVAL, "truncated");

    let state = |len: usize, service: u32| {
        let mut state = -1;
        // SAFETY: blob is valid for len bytes (or unused with 0).
        let rc =
            unsafe { connredir_redirect_state(blob.as_ptr().cast(), len, service, &mut state) };
        assert_eq!(rc, 0);
        state
    };
    assert_eq!(state(blob.len(), 9), 1, "redirected by self");
    assert_eq!(state(blob.len(), 5), 2, "redirected by other");
    assert_eq!(state(blob.len(), 4), 3, "previously redirected by self");
    assert_eq!(state(0, 4), 0, "no records: not redirected");

    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let room = std::mem::size_of_val(&storage) as libc::socklen_t;
    for (pick, expected) in [
        (
            connredir_records_original_destination as unsafe extern "C" fn(_, _, _, _) -> _,
            "[2001:db8::7]:8443",
        ),
        (connredir_records_first_destination, "192.0.2.1:443"),
    ] {
        let mut len = room;
        // SAFETY: storage has room for len bytes.
        let rc = unsafe {
            pick(
                blob.as_ptr().cast(),
                blob.len(),
                (&mut storage as *mut libc::sockaddr_storage).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(read_sockaddr(&storage, len), expected.parse().unwrap());
    }
    let empty = RedirectRecords::new().to_bytes();
    let mut len = room;
    // SAFETY: as above.
    let rc = unsafe {
        connredir_records_original_destination(
            empty.as_ptr().cast(),
            empty.len(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, -libc::ENOENT, "no hops, no destination");
}

#[test]
fn a_default_context_decodes_to_its_addresses() {
    let context = connredir_abi::connredir_default_context {
        remote: connredir_abi::connredir_endpoint::from_socket_addr(
            &"198.51.100.3:80".parse().unwrap(),
        ),
        ..Default::default()
    };
    // SAFETY: the context is plain data of integers, 48 bytes without gaps.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&context as *const connredir_abi::connredir_default_context).cast::<u8>(),
            std::mem::size_of_val(&context),
        )
    };
    let mut remote: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut local = remote;
    let room = std::mem::size_of_val(&remote) as libc::socklen_t;
    let (mut remote_len, mut local_len) = (room, room);
    let decode = |bytes: &[u8],
                  remote: &mut libc::sockaddr_storage,
                  remote_len: &mut libc::socklen_t,
                  local: &mut libc::sockaddr_storage,
                  local_len: &mut libc::socklen_t| {
        // SAFETY: every buffer is valid for the length given with it.
        unsafe {
            connredir_context_addresses(
                bytes.as_ptr().cast(),
                bytes.len(),
                (remote as *mut libc::sockaddr_storage).cast(),
                remote_len,
                (local as *mut libc::sockaddr_storage).cast(),
                local_len,
            )
        }
    };
    assert_eq!(
        decode(
            bytes,
            &mut remote,
            &mut remote_len,
            &mut local,
            &mut local_len
        ),
        0
    );
    assert_eq!(
        read_sockaddr(&remote, remote_len),
        "198.51.100.3:80".parse().unwrap()
    );
    assert_eq!(local_len, 0, "the local address is unknown");
    let own = b"policy=strict";
    assert_eq!(
        decode(
            own,
            &mut remote,
            &mut remote_len,
            &mut local,
            &mut local_len
        ),
        -libc::EINVAL,
        "a service's own context"
    );
}

/// `addr` as the C caller passes it.
fn c_sockaddr(addr: SocketAddr) -> socket2::SockAddr {
    socket2::SockAddr::from(addr)
}

/// A UDP flow socket is bound to the service address and connected to the
/// client; the client's datagrams reach it. Outside the layer the queries
/// on it are not supported, and the onward socket is not made.
#[test]
fn a_udp_flow_socket_is_bound_to_the_service_and_connected_to_the_client() {
    use std::net::UdpSocket;
    use std::os::fd::{FromRawFd, OwnedFd};

    // The service's shared socket, bound with both options as the call
    // requires; its port is the service address.
    let shared = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    shared.set_reuse_address(true).unwrap();
    shared.set_reuse_port(true).unwrap();
    shared
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let service = shared.local_addr().unwrap().as_socket().unwrap();
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let client_addr = client.local_addr().unwrap();

    let (s, c) = (c_sockaddr(service), c_sockaddr(client_addr));
    let mut fd = -2;
    // SAFETY: the addresses are valid for their lengths; fd is a local.
    let rc = unsafe { connredir_udp_flow_open(s.as_ptr(), s.len(), c.as_ptr(), c.len(), &mut fd) };
    assert_eq!(rc, 0);
    assert!(fd >= 0);
    // SAFETY: the call gave us this descriptor to own.
    let flow = UdpSocket::from(unsafe { OwnedFd::from_raw_fd(fd) });
    assert_eq!(flow.local_addr().unwrap(), service);
    assert_eq!(flow.peer_addr().unwrap(), client_addr);
    // The connected socket gets the client's datagrams (the more specific
    // match of the two bound to the service address).
    client.send_to(b"hello", service).unwrap();
    flow.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 16];
    let n = flow.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello");

    // The query calls take it as they take an accepted connection; this
    // test process is in no attached cgroup, so the kernel answers.
    let mut size = 0usize;
    // SAFETY: size is a local; a NULL buffer with length 0 is allowed.
    let rc = unsafe { connredir_query_records(fd, std::ptr::null_mut(), 0, &mut size) };
    assert_eq!(rc, -libc::EOPNOTSUPP);
    let mut onward = -2;
    // SAFETY: c is valid for its length; onward is a local.
    let rc = unsafe { connredir_udp_connect_onward(fd, c.as_ptr(), c.len(), &mut onward) };
    assert_eq!((rc, onward), (-libc::EOPNOTSUPP, -1));

    // Bad arguments: NULL pointers, a family that is not IP, a length too
    // short for the family.
    let mut out = -2;
    // SAFETY: NULL pointers are what is tested; the call checks them.
    unsafe {
        assert_eq!(
            connredir_udp_flow_open(
                s.as_ptr(),
                s.len(),
                c.as_ptr(),
                c.len(),
                std::ptr::null_mut()
            ),
            -libc::EFAULT
        );
        assert_eq!(
            connredir_udp_flow_open(std::ptr::null(), s.len(), c.as_ptr(), c.len(), &mut out),
            -libc::EFAULT
        );
        assert_eq!(out, -1);
        assert_eq!(
            connredir_udp_flow_open(s.as_ptr(), 4, c.as_ptr(), c.len(), &mut out),
            -libc::EINVAL
        );
        let unix = libc::sockaddr {
            sa_family: libc::AF_UNIX as libc::sa_family_t,
            sa_data: [0; 14],
        };
        let unix_len = std::mem::size_of_val(&unix) as libc::socklen_t;
        assert_eq!(
            connredir_udp_flow_open(&unix, unix_len, c.as_ptr(), c.len(), &mut out),
            -libc::EINVAL
        );
        assert_eq!(
            connredir_udp_connect_onward(fd, std::ptr::null(), 0, &mut out),
            -libc::EFAULT
        );
        assert_eq!(
            connredir_udp_connect_onward(-1, c.as_ptr(), c.len(), &mut out),
            -libc::EBADF
        );
        assert_eq!(out, -1);
    }
}
