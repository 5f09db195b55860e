//! cgroup BPF links, made and pinned with the bpf(2) system call directly.
//!
//! aya 0.14 can pin links of some program types but not of cgroup sockopt
//! programs, and the engine needs one mechanism for all five: create a link,
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
