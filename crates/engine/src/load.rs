//! Loading the kernel object: its maps (pinned ones reused), its programs,
//! the record seal key, the home network namespace, the pid watcher and the
//! acceleration program.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapData, MapError};
use aya::programs::{CgroupSock, CgroupSockAddr, CgroupSockopt, ProgramError, SockOps};
use aya::{Ebpf, EbpfLoader};
use connredir_abi::{connredir_seal_key, map_names};
use connredir_kernel::programs;
use tracing::debug;

use crate::attach::attach_accel;
use crate::pin::check_pinned_layouts;
use crate::rules::CompiledRules;
use crate::services::liveness;
use crate::{map_err, program_err, Engine, Error};

pub(crate) fn load_with(pin_dir: Option<&Path>) -> Result<Engine, Error> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    let mut loader = EbpfLoader::new();
    let pins: Vec<(&str, PathBuf)> = pin_dir
        .map(|dir| map_names::ALL.iter().map(|n| (*n, dir.join(n))).collect())
        .unwrap_or_default();
    if let Some(dir) = pin_dir {
        check_pinned_layouts(dir)?;
    }
    for (name, path) in &pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut bpf = loader.load(connredir_kernel::object())?;
    for name in map_names::ALL {
        if bpf.map(name).is_none() {
            return Err(Error::Map {
                name,
                source: MapError::InvalidName { name: name.into() },
            });
        }
    }
    ensure_seal_key(&mut bpf)?;
    for name in [
        programs::CONNECT4,
        programs::CONNECT6,
        programs::BIND4,
        programs::BIND6,
        programs::SENDMSG4,
        programs::SENDMSG6,
        programs::RECVMSG4,
        programs::RECVMSG6,
        programs::GETPEERNAME4,
        programs::GETPEERNAME6,
        programs::GETSOCKNAME4,
        programs::GETSOCKNAME6,
    ] {
        let prog: &mut CgroupSockAddr = program_mut(&mut bpf, name)?;
        prog.load().map_err(program_err(name))?;
    }
    let prog: &mut SockOps = program_mut(&mut bpf, programs::SOCKOPS)?;
    prog.load().map_err(program_err(programs::SOCKOPS))?;
    for name in [programs::GETSOCKOPT, programs::SETSOCKOPT] {
        let prog: &mut CgroupSockopt = program_mut(&mut bpf, name)?;
        prog.load().map_err(program_err(name))?;
    }
    let prog: &mut CgroupSock = program_mut(&mut bpf, programs::SOCK_RELEASE)?;
    prog.load().map_err(program_err(programs::SOCK_RELEASE))?;
    // Before the sk_msg attachment, whose previous program a failure
    // would have to put back.
    let pids = pid_identities(&bpf)?;
    set_home_netns(&mut bpf)?;
    let accel_before = attach_accel(&mut bpf)?;
    debug!("kernel programs loaded");
    Ok(Engine {
        bpf,
        pin_dir: pin_dir.map(Path::to_owned),
        adopted: BTreeMap::new(),
        previous: None,
        accel_before: pin_dir.and(accel_before),
        remarked: Vec::new(),
        attachments: Vec::new(),
        services: BTreeMap::new(),
        rules: BTreeMap::new(),
        installed: [CompiledRules::new(), CompiledRules::new()],
        rule_exes: std::collections::BTreeSet::new(),
        rules_generation: 0,
        rules_flipped_at: None,
        next_rule: 1,
        pids,
        listener_inodes: BTreeMap::new(),
    })
}

/// Gives the layer its record seal key: 16 random bytes, written only while
/// the map holds none (all zero), so a takeover of pinned maps keeps the key
/// and every record already handed out stays valid. Nothing but the kernel
/// programs and root (BPF maps need CAP_BPF) can read it.
fn ensure_seal_key(bpf: &mut Ebpf) -> Result<(), Error> {
    let name = map_names::SEAL_KEY;
    let mut map = Array::<&mut MapData, connredir_seal_key>::try_from(
        bpf.map_mut(name).expect("checked at load"),
    )
    .map_err(map_err(name))?;
    let current = map.get(&0, 0).map_err(map_err(name))?;
    if current.k0 != 0 || current.k1 != 0 {
        debug!("record seal key kept from the pinned map");
        return Ok(());
    }
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        // SAFETY: the pointer and length describe the unfilled part of `bytes`.
        let n = unsafe {
            libc::getrandom(bytes[filled..].as_mut_ptr().cast(), bytes.len() - filled, 0)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::SealKey(e));
            }
            continue;
        }
        filled += n as usize;
    }
    let (k0, k1) = bytes.split_at(8);
    let key = connredir_seal_key {
        k0: u64::from_ne_bytes(k0.try_into().expect("8 bytes")),
        k1: u64::from_ne_bytes(k1.try_into().expect("8 bytes")),
    };
    if key.k0 == 0 && key.k1 == 0 {
        // Means "no key" to the programs; 2^-128, but never silently.
        return Err(Error::SealKey(std::io::Error::other(
            "getrandom gave 16 zero bytes",
        )));
    }
    map.set(0, key, 0).map_err(map_err(name))?;
    debug!("record seal key made");
    Ok(())
}

/// Tells the kernel programs which network namespace is the layer's own
/// (this process's, where its services listen): sockets of the others
/// share a bounded part of the hand-off map (maps.h,
/// CONNREDIR_MAX_FOREIGN_HANDOFFS).
fn set_home_netns(bpf: &mut Ebpf) -> Result<(), Error> {
    let name = map_names::HANDOFF_BUDGET;
    let io_err = |io_error: std::io::Error| Error::Map {
        name,
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "getsockopt(SO_NETNS_COOKIE)",
            io_error,
        }),
    };
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(io_err)?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for the kernel to write.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io_err(std::io::Error::last_os_error()));
    }
    let mut budget: Array<&mut MapData, u64> =
        Array::try_from(bpf.map_mut(name).expect("checked at load")).map_err(map_err(name))?;
    budget
        .set(connredir_abi::CONNREDIR_BUDGET_HOME_NETNS, cookie, 0)
        .map_err(map_err(name))
}

/// Starts watching the processes of pid identities, with a descriptor of
/// the `service_by_pid` map of its own.
fn pid_identities(bpf: &Ebpf) -> Result<liveness::PidIdentities, Error> {
    let name = map_names::SERVICE_BY_PID;
    let io_err = |call: &'static str| {
        move |io_error: std::io::Error| Error::Map {
            name,
            source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
        }
    };
    let aya::maps::Map::HashMap(data) = bpf.map(name).expect("checked at load") else {
        return Err(Error::Map {
            name,
            source: MapError::InvalidName { name: name.into() },
        });
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(io_err("dup"))?;
    liveness::PidIdentities::start(fd).map_err(io_err("start the pid watcher"))
}

pub(crate) fn program_mut<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = bpf.program_mut(name).ok_or(Error::Program {
        name,
        source: ProgramError::UnexpectedProgramType,
    })?;
    program.try_into().map_err(program_err(name))
}
