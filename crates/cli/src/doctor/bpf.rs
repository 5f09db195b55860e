//! The BPF programs attached to a cgroup, read with the `bpf(2)` commands
//! bpftool uses (`BPF_PROG_QUERY`, `BPF_PROG_GET_FD_BY_ID`,
//! `BPF_OBJ_GET_INFO_BY_FD`), and the programs of the pinned links of a
//! connredir pin directory (`BPF_OBJ_GET`), to tell ours from others.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use serde::Serialize;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;

const BPF_F_ALLOW_OVERRIDE: u32 = 1;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// A cgroup attach type: its number in the kernel's `enum bpf_attach_type`,
/// the name bpftool gives it, and whether the layer attaches there.
pub struct Hook {
    /// `enum bpf_attach_type` value.
    pub attach_type: u32,
    /// bpftool's name for it.
    pub name: &'static str,
    /// One of the hooks connredir attaches its programs to.
    pub layers: bool,
}

/// The cgroup hooks looked at: every one that sees sockets or their
/// addresses (device and sysctl hooks cannot touch connections).
pub const HOOKS: &[Hook] = &[
    Hook {
        attach_type: 0,
        name: "cgroup_inet_ingress",
        layers: false,
    },
    Hook {
        attach_type: 1,
        name: "cgroup_inet_egress",
        layers: false,
    },
    Hook {
        attach_type: 2,
        name: "cgroup_inet_sock_create",
        layers: false,
    },
    Hook {
        attach_type: 3,
        name: "sock_ops",
        layers: true,
    },
    Hook {
        attach_type: 8,
        name: "cgroup_inet4_bind",
        layers: true,
    },
    Hook {
        attach_type: 9,
        name: "cgroup_inet6_bind",
        layers: true,
    },
    Hook {
        attach_type: 10,
        name: "cgroup_inet4_connect",
        layers: true,
    },
    Hook {
        attach_type: 11,
        name: "cgroup_inet6_connect",
        layers: true,
    },
    Hook {
        attach_type: 12,
        name: "cgroup_inet4_post_bind",
        layers: false,
    },
    Hook {
        attach_type: 13,
        name: "cgroup_inet6_post_bind",
        layers: false,
    },
    Hook {
        attach_type: 14,
        name: "cgroup_udp4_sendmsg",
        layers: true,
    },
    Hook {
        attach_type: 15,
        name: "cgroup_udp6_sendmsg",
        layers: true,
    },
    Hook {
        attach_type: 19,
        name: "cgroup_udp4_recvmsg",
        layers: true,
    },
    Hook {
        attach_type: 20,
        name: "cgroup_udp6_recvmsg",
        layers: true,
    },
    Hook {
        attach_type: 21,
        name: "cgroup_getsockopt",
        layers: true,
    },
    Hook {
        attach_type: 22,
        name: "cgroup_setsockopt",
        layers: true,
    },
    Hook {
        attach_type: 29,
        name: "cgroup_inet4_getpeername",
        layers: true,
    },
    Hook {
        attach_type: 30,
        name: "cgroup_inet6_getpeername",
        layers: true,
    },
    Hook {
        attach_type: 31,
        name: "cgroup_inet4_getsockname",
        layers: true,
    },
    Hook {
        attach_type: 32,
        name: "cgroup_inet6_getsockname",
        layers: true,
    },
    Hook {
        attach_type: 34,
        name: "cgroup_inet_sock_release",
        layers: true,
    },
];

/// How the programs of one hook of one cgroup were attached, which decides
/// whether programs can be attached below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// `BPF_F_ALLOW_MULTI` (and every BPF link): others may attach beside
    /// and below; all run.
    Multi,
    /// `BPF_F_ALLOW_OVERRIDE`: a program attached below replaces it there.
    Override,
    /// No flag: nothing may be attached below it, nor beside it.
    Exclusive,
}

/// One program attached to one hook of one cgroup.
#[derive(Debug, Clone, Serialize)]
pub struct Attached {
    /// The program's id (`bpftool prog show id ID`).
    pub id: u32,
    /// Its name (the kernel keeps 15 characters).
    pub name: String,
    /// The hook, as bpftool names it.
    pub hook: &'static str,
    /// Whether the layer attaches to this hook too.
    pub layer_hook: bool,
    /// How the hook's programs were attached in this cgroup.
    pub mode: AttachMode,
    /// A program of this machine's connredir (a link pinned in its pin
    /// directory).
    pub ours: bool,
}

fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zeroed-then-filled 128-byte `union bpf_attr`
    // whose pointers (if any) point at live buffers of the sizes given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The ids of the programs attached to `hook` of the cgroup open at `fd`,
/// with the hook's attach flags.
fn query(cgroup: &OwnedFd, attach_type: u32) -> std::io::Result<(Vec<u32>, u32)> {
    let mut ids = vec![0u32; 64];
    loop {
        let mut attr = [0u64; 16];
        // target_fd @0, attach_type @4, query_flags @8 (0: this cgroup's
        // own programs, not the effective ones), attach_flags @12 (out),
        // prog_ids @16, prog_cnt @24 (in/out).
        attr[0] = cgroup.as_raw_fd() as u32 as u64 | (u64::from(attach_type) << 32);
        attr[2] = ids.as_mut_ptr() as u64;
        attr[3] = ids.len() as u64;
        match bpf(BPF_PROG_QUERY, &mut attr) {
            Ok(_) => {
                let flags = (attr[1] >> 32) as u32;
                ids.truncate(attr[3] as u32 as usize);
                return Ok((ids, flags));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                ids = vec![0; attr[3] as u32 as usize];
            }
            Err(e) => return Err(e),
        }
    }
}

/// `struct bpf_prog_info` as far as the name (the kernel copies only as
/// much as it is given).
#[repr(C)]
#[derive(Default)]
struct ProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; 16],
}

/// The name of the program with this id.
fn program_name(id: u32) -> std::io::Result<String> {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(id);
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel gave us this descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = ProgInfo::default();
    info_of(&fd, &mut info)?;
    let len = info.name.iter().position(|b| *b == 0).unwrap_or(16);
    Ok(String::from_utf8_lossy(&info.name[..len]).into_owned())
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info`.
fn info_of<T>(fd: &OwnedFd, info: &mut T) -> std::io::Result<()> {
    let mut attr = [0u64; 16];
    // bpf_fd @0, info_len @4, info @8.
    attr[0] = fd.as_raw_fd() as u32 as u64 | ((std::mem::size_of::<T>() as u64) << 32);
    attr[1] = (info as *mut T) as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
}

/// The programs attached to a cgroup, hook by hook; `ours`: the ids of
/// this machine's connredir programs.
pub fn attached(cgroup: &Path, ours: &BTreeSet<u32>) -> std::io::Result<Vec<Attached>> {
    let dir = std::fs::File::open(cgroup)?;
    let fd = OwnedFd::from(dir);
    let mut out = Vec::new();
    for hook in HOOKS {
        let (ids, flags) = match query(&fd, hook.attach_type) {
            Ok(found) => found,
            // A hook this kernel does not have.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => return Err(e),
        };
        let mode = if flags & BPF_F_ALLOW_MULTI != 0 {
            AttachMode::Multi
        } else if flags & BPF_F_ALLOW_OVERRIDE != 0 {
            AttachMode::Override
        } else {
            AttachMode::Exclusive
        };
        for id in ids {
            out.push(Attached {
                id,
                name: program_name(id).unwrap_or_default(),
                hook: hook.name,
                layer_hook: hook.layers,
                mode,
                ours: ours.contains(&id),
            });
        }
    }
    Ok(out)
}

/// `struct bpf_link_info` as far as the program id.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    link_type: u32,
    id: u32,
    prog_id: u32,
    pad: u32,
    rest: [u64; 4],
}

/// The ids of the programs of the links pinned in `pin_dir` (connredir's
/// pin directory): the layer's own programs.
pub fn pinned_programs(pin_dir: &Path) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(pin_dir).into_iter().flatten().flatten() {
        if !entry.file_name().to_string_lossy().starts_with("link-") {
            continue;
        }
        let Ok(path) = CString::new(entry.path().as_os_str().as_bytes()) else {
            continue;
        };
        let mut attr = [0u64; 16];
        // pathname @0, bpf_fd @8, file_flags @12 (none).
        attr[0] = path.as_ptr() as u64;
        attr[1] = 0;
        let Ok(fd) = bpf(BPF_OBJ_GET, &mut attr) else {
            continue;
        };
        // SAFETY: the kernel gave us this descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut info = LinkInfo::default();
        if info_of(&fd, &mut info).is_ok() {
            ids.insert(info.prog_id);
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::HOOKS;

    #[test]
    fn the_layers_hooks_are_one_per_program_the_engine_attaches() {
        // Each of the engine's cgroup programs has a hook of its own: a
        // foreign program on any of them shares the layer's events.
        let layers: Vec<&str> = HOOKS.iter().filter(|h| h.layers).map(|h| h.name).collect();
        assert_eq!(
            layers.len(),
            connredir_engine::CGROUP_PROGRAMS,
            "hooks marked as the layer's: {layers:?}"
        );
        for name in [
            "cgroup_udp4_sendmsg",
            "cgroup_udp6_recvmsg",
            "cgroup_inet4_getpeername",
            "cgroup_inet_sock_release",
            "cgroup_inet6_getsockname",
        ] {
            assert!(layers.contains(&name), "{name} is one of the layer's hooks");
        }
    }
}
