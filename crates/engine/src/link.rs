//! cgroup BPF links, made and pinned with the bpf(2) system call directly.
//!
//! aya 0.14 can pin links of some program types but not of cgroup sockopt
//! programs, and the engine needs one mechanism for all of them: create a link,
//! pin it in bpffs so it outlives the process, find it again after a restart,
//! and point it at a newly loaded program in one step (`BPF_LINK_UPDATE`), so
//! a restart never leaves a moment without programs.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use aya_obj::generated::{bpf_attach_type, bpf_cmd};

/// The attach point of each connredir program.
pub(crate) fn attach_type(program: &str) -> bpf_attach_type {
    use connredir_kernel::programs as p;
    match program {
        p::CONNECT4 => bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
        p::CONNECT6 => bpf_attach_type::BPF_CGROUP_INET6_CONNECT,
        p::BIND4 => bpf_attach_type::BPF_CGROUP_INET4_BIND,
        p::BIND6 => bpf_attach_type::BPF_CGROUP_INET6_BIND,
        p::SOCKOPS => bpf_attach_type::BPF_CGROUP_SOCK_OPS,
        p::GETSOCKOPT => bpf_attach_type::BPF_CGROUP_GETSOCKOPT,
        p::SETSOCKOPT => bpf_attach_type::BPF_CGROUP_SETSOCKOPT,
        p::SENDMSG4 => bpf_attach_type::BPF_CGROUP_UDP4_SENDMSG,
        p::SENDMSG6 => bpf_attach_type::BPF_CGROUP_UDP6_SENDMSG,
        p::RECVMSG4 => bpf_attach_type::BPF_CGROUP_UDP4_RECVMSG,
        p::RECVMSG6 => bpf_attach_type::BPF_CGROUP_UDP6_RECVMSG,
        p::GETPEERNAME4 => bpf_attach_type::BPF_CGROUP_INET4_GETPEERNAME,
        p::GETPEERNAME6 => bpf_attach_type::BPF_CGROUP_INET6_GETPEERNAME,
        p::SOCK_RELEASE => bpf_attach_type::BPF_CGROUP_INET_SOCK_RELEASE,
        p::GETSOCKNAME4 => bpf_attach_type::BPF_CGROUP_INET4_GETSOCKNAME,
        p::GETSOCKNAME6 => bpf_attach_type::BPF_CGROUP_INET6_GETSOCKNAME,
        other => unreachable!("{other} is not a connredir program"),
    }
}

/// The part of `union bpf_attr` each command uses, padded to the size the
/// kernel accepts for it (it checks that the unused tail is zero).
#[repr(C)]
#[derive(Default)]
struct Attr {
    words: [u32; 16],
}

fn bpf(cmd: bpf_cmd, attr: &Attr) -> io::Result<i64> {
    // SAFETY: attr is a valid, initialised bpf_attr prefix of the given size;
    // the kernel copies it in and does not keep the pointer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *const Attr,
            std::mem::size_of::<Attr>() as libc::c_long,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn take_fd(rc: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

/// Attaches `program` to the cgroup `cgroup` through a new link.
pub(crate) fn create(
    program: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    kind: bpf_attach_type,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::default();
    attr.words[0] = program.as_raw_fd() as u32; // link_create.prog_fd
    attr.words[1] = cgroup.as_raw_fd() as u32; // link_create.target_fd
    attr.words[2] = kind as u32; // link_create.attach_type
    bpf(bpf_cmd::BPF_LINK_CREATE, &attr).map(take_fd)
}

/// Points an existing link at another program, atomically.
pub(crate) fn update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.words[0] = link.as_raw_fd() as u32; // link_update.link_fd
    attr.words[1] = program.as_raw_fd() as u32; // link_update.new_prog_fd
    bpf(bpf_cmd::BPF_LINK_UPDATE, &attr).map(drop)
}

fn path_attr(path: &Path, fd: Option<BorrowedFd<'_>>) -> io::Result<(Attr, CString)> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut attr = Attr::default();
    let pointer = c_path.as_ptr() as u64;
    attr.words[0] = pointer as u32; // obj.pathname (low half)
    attr.words[1] = (pointer >> 32) as u32; // obj.pathname (high half)
    attr.words[2] = fd.map_or(0, |fd| fd.as_raw_fd() as u32); // obj.bpf_fd
    Ok((attr, c_path))
}

/// Pins a BPF object (here: a link) at `path` in bpffs.
pub(crate) fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let (attr, _path) = path_attr(path, Some(fd))?;
    bpf(bpf_cmd::BPF_OBJ_PIN, &attr).map(drop)
}

/// Opens a pinned BPF object.
pub(crate) fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let (attr, _path) = path_attr(path, None)?;
    bpf(bpf_cmd::BPF_OBJ_GET, &attr).map(take_fd)
}

/// The program a link runs now, opened, so that it stays loaded and the link
/// can be pointed back at it ([`update`]) if a takeover is undone.
pub(crate) fn program_of(link: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // struct bpf_link_info begins with type, id, prog_id.
    let mut info = [0u32; 16];
    let mut attr = Attr::default();
    let pointer = info.as_mut_ptr() as u64;
    attr.words[0] = link.as_raw_fd() as u32; // info.bpf_fd
    attr.words[1] = std::mem::size_of_val(&info) as u32; // info.info_len
    attr.words[2] = pointer as u32; // info.info (low half)
    attr.words[3] = (pointer >> 32) as u32; // info.info (high half)
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &attr)?;
    let mut attr = Attr::default();
    attr.words[0] = info[2]; // prog_id
    bpf(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &attr).map(take_fd)
}

/// The program attached to a map (a sockmap's verdict, `kind`), opened, or
/// `None` when there is none or the kernel cannot say.
pub(crate) fn map_program(map: BorrowedFd<'_>, kind: bpf_attach_type) -> Option<OwnedFd> {
    let mut ids = [0u32; 4];
    let pointer = ids.as_mut_ptr() as u64;
    let mut attr = Attr::default();
    attr.words[0] = map.as_raw_fd() as u32; // query.target_fd
    attr.words[1] = kind as u32; // query.attach_type
    attr.words[4] = pointer as u32; // query.prog_ids (low half)
    attr.words[5] = (pointer >> 32) as u32; // query.prog_ids (high half)
    attr.words[6] = ids.len() as u32; // query.prog_cnt, written back
                                      // SAFETY: as in `bpf`; the kernel writes prog_cnt back into `attr` and
                                      // at most `ids.len()` ids into `ids`, both valid and writable.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_PROG_QUERY as libc::c_long,
            &mut attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_long,
        )
    };
    if rc < 0 || attr.words[6] == 0 {
        return None;
    }
    let mut attr = Attr::default();
    attr.words[0] = ids[0]; // prog_id
    bpf(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &attr).map(take_fd).ok()
}

/// Attaches `program` to a map (a sockmap's verdict, `kind`), replacing
/// the one there.
pub(crate) fn attach_to_map(
    map: BorrowedFd<'_>,
    program: BorrowedFd<'_>,
    kind: bpf_attach_type,
) -> io::Result<()> {
    let mut attr = Attr::default();
    attr.words[0] = map.as_raw_fd() as u32; // target_fd
    attr.words[1] = program.as_raw_fd() as u32; // attach_bpf_fd
    attr.words[2] = kind as u32; // attach_type
    bpf(bpf_cmd::BPF_PROG_ATTACH, &attr).map(drop)
}
