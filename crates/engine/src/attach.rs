//! Attaching the programs to cgroups through links (pinned ones of an
//! earlier run are pointed at this run's programs in one step), detaching
//! them, and the acceleration program on its socket map.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapError};
use aya::Ebpf;
use connredir_abi::map_names;
use connredir_host::cgroup::{cgroup_id, CGROUP2_HYBRID_ROOT};
use connredir_kernel::programs;
use tracing::info;

use crate::link;
use crate::load::program_mut;
use crate::pin::remove_pins;
use crate::{map_err, program_err, Engine, Error};

/// How many programs the engine attaches to each cgroup (one link each).
pub const CGROUP_PROGRAMS: usize = PROGRAMS.len();

/// The programs, in the order they are attached.
pub(crate) const PROGRAMS: [&str; 16] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::BIND4,
    programs::BIND6,
    programs::SOCKOPS,
    programs::GETSOCKOPT,
    programs::SETSOCKOPT,
    programs::SENDMSG4,
    programs::SENDMSG6,
    programs::RECVMSG4,
    programs::RECVMSG6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
    programs::SOCK_RELEASE,
    programs::GETSOCKNAME4,
    programs::GETSOCKNAME6,
];

/// One cgroup with every program attached to it, through links the
/// engine holds (and, when pinning, also pinned in bpffs).
pub(crate) struct Attachment {
    pub(crate) path: PathBuf,
    /// The cgroup's id (its links are pinned under it).
    pub(crate) id: u64,
    links: Vec<OwnedFd>,
    /// Pins this engine created (removed on detach or failure).
    pins: Vec<PathBuf>,
    /// Links of an earlier run this engine pointed at its own programs,
    /// each with the program it ran before, until the takeover is finished.
    pub(crate) replaced: Vec<(OwnedFd, OwnedFd)>,
}

impl Attachment {
    /// Puts back what attaching changed: the earlier run's links run their
    /// earlier programs again, and the pins this engine made are removed
    /// (its own links detach when their descriptors close).
    pub(crate) fn undo(&mut self) {
        for (link, program) in self.replaced.drain(..) {
            if let Err(e) = link::update(link.as_fd(), program.as_fd()) {
                tracing::warn!(cgroup = %self.path.display(), error = %e, "cannot restore a link's program");
            }
        }
        remove_pins(&self.pins);
        self.pins.clear();
    }
}

/// Loads the sk_msg program and attaches it to the accelerated-socket map.
/// The attachment lives as long as the map (pinned maps outlive us), so it
/// is left in place on purpose rather than detached when the engine drops.
///
/// Returns the program the map had before (of an earlier run, when the map
/// is pinned), so that an unfinished takeover can put it back.
pub(crate) fn attach_accel(bpf: &mut Ebpf) -> Result<Option<OwnedFd>, Error> {
    let name = map_names::ACCEL_SOCKS;
    let map = bpf.map(name).expect("checked at load");
    let socks = aya::maps::SockHash::<&MapData, connredir_abi::connredir_pair_key>::try_from(map)
        .map_err(map_err(name))?;
    let fd = socks.fd().try_clone().map_err(|e| Error::Map {
        name,
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "dup",
            io_error: e,
        }),
    })?;
    let before = link::map_program(
        fd.as_fd(),
        aya_obj::generated::bpf_attach_type::BPF_SK_MSG_VERDICT,
    );
    let prog: &mut aya::programs::SkMsg = program_mut(bpf, programs::ACCEL)?;
    prog.load().map_err(program_err(programs::ACCEL))?;
    let link = prog.attach(&fd).map_err(program_err(programs::ACCEL))?;
    let link = prog.take_link(link).map_err(program_err(programs::ACCEL))?;
    std::mem::forget(link);
    Ok(before)
}

/// The cgroups the programs are attached to.
pub(crate) fn attached(engine: &Engine) -> impl Iterator<Item = &Path> {
    engine.attachments.iter().map(|a| a.path.as_path())
}

/// Attaches the programs to a cgroup v2 directory: connections opened
/// there (and in its descendants) meet the rules, and services running
/// there get records and the syscall interface. Services must run in an
/// attached cgroup too: their onward connections meet the other services.
///
/// A cgroup nested inside (or containing) an attached one is refused: the
/// programs would run twice for its sockets.
pub(crate) fn attach(engine: &mut Engine, cgroup: impl AsRef<Path>) -> Result<(), Error> {
    let given = cgroup.as_ref();
    let path = given.canonicalize().map_err(|e| Error::Cgroup {
        path: given.to_owned(),
        why: format!("{e} (give an existing cgroup v2 directory)"),
    })?;
    if !path.join("cgroup.procs").exists() || path.join("tasks").exists() {
        return Err(Error::Cgroup {
            path,
            why: format!("not a cgroup v2 directory (cgroup v2 is usually under /sys/fs/cgroup or {CGROUP2_HYBRID_ROOT})"),
        });
    }
    if let Some(other) = engine
        .attachments
        .iter()
        .find(|a| a.path.starts_with(&path) || path.starts_with(&a.path))
    {
        return Err(Error::Cgroup {
            path,
            why: format!(
                "overlaps {}, which is already attached; attach cgroups that do not contain each other",
                other.path.display()
            ),
        });
    }
    let mut attachment = Attachment {
        id: cgroup_id(&path)?,
        path: path.clone(),
        links: Vec::new(),
        pins: Vec::new(),
        replaced: Vec::new(),
    };
    match attach_all(engine, &mut attachment) {
        Ok(()) => {
            info!(cgroup = %path.display(), "programs attached");
            engine.attachments.push(attachment);
            Ok(())
        }
        Err(e) => {
            attachment.undo();
            Err(e)
        }
    }
}

/// Attaches (or, when pinning, adopts) the links of one cgroup.
fn attach_all(engine: &mut Engine, a: &mut Attachment) -> Result<(), Error> {
    let cgroup = File::open(&a.path).map_err(|e| Error::Cgroup {
        path: a.path.clone(),
        why: e.to_string(),
    })?;
    let cgroup_id = cgroup_id(&a.path)?;
    for name in PROGRAMS {
        let program = engine
            .bpf
            .program(name)
            .expect("checked at load")
            .fd()
            .map_err(program_err(name))?
            .as_fd();
        let path = &a.path;
        let attach_err = |e: std::io::Error| Error::Attach {
            program: name,
            cgroup: path.clone(),
            source: e,
        };
        let pin = engine
            .pin_dir
            .as_ref()
            .map(|dir| dir.join(format!("link-{cgroup_id}-{name}")));
        let link = match &pin {
            // Pinned by an earlier run: keep the link, swap in this
            // run's program in one step.
            Some(pin) if pin.exists() => {
                let link = link::open_pinned(pin).map_err(attach_err)?;
                let before = link::program_of(link.as_fd()).map_err(attach_err)?;
                link::update(link.as_fd(), program).map_err(attach_err)?;
                a.replaced
                    .push((link.try_clone().map_err(attach_err)?, before));
                link
            }
            _ => {
                let link = link::create(program, cgroup.as_fd(), link::attach_type(name))
                    .map_err(attach_err)?;
                if let Some(pin) = pin {
                    link::pin(link.as_fd(), &pin).map_err(attach_err)?;
                    a.pins.push(pin);
                }
                link
            }
        };
        a.links.push(link);
    }
    Ok(())
}

/// Detaches the programs from one cgroup (and removes its pins).
pub(crate) fn detach(engine: &mut Engine, cgroup: impl AsRef<Path>) -> Result<(), Error> {
    let path = cgroup
        .as_ref()
        .canonicalize()
        .unwrap_or(cgroup.as_ref().to_owned());
    let index = engine
        .attachments
        .iter()
        .position(|a| a.path == path)
        .ok_or_else(|| Error::Cgroup {
            path: path.clone(),
            why: "is not attached".into(),
        })?;
    let attachment = engine.attachments.remove(index);
    if let Some(dir) = &engine.pin_dir {
        let id = cgroup_id(&path)?;
        let pins: Vec<PathBuf> = PROGRAMS
            .iter()
            .map(|name| dir.join(format!("link-{id}-{name}")))
            .collect();
        remove_pins(&pins);
    }
    drop(attachment);
    info!(cgroup = %path.display(), "programs detached");
    Ok(())
}

/// Puts the earlier run's acceleration program back on its map, when a
/// pinned engine goes before finishing its takeover.
pub(crate) fn restore_accel(engine: &mut Engine) {
    let Some(program) = engine.accel_before.take() else {
        return;
    };
    let name = map_names::ACCEL_SOCKS;
    if let Some(map) = engine.bpf.map(name) {
        if let Ok(socks) =
            aya::maps::SockHash::<&MapData, connredir_abi::connredir_pair_key>::try_from(map)
        {
            if let Err(e) = link::attach_to_map(
                socks.fd().as_fd(),
                program.as_fd(),
                aya_obj::generated::bpf_attach_type::BPF_SK_MSG_VERDICT,
            ) {
                tracing::warn!(error = %e, "cannot restore the acceleration program");
            }
        }
    }
}

/// Lets go of every attachment. Closing our link descriptors detaches
/// unpinned links; pinned ones stay until `Engine::remove_pinned`.
pub(crate) fn release_all(engine: &mut Engine) {
    for attachment in std::mem::take(&mut engine.attachments) {
        if engine.pin_dir.is_none() {
            info!(cgroup = %attachment.path.display(), "programs detached");
        }
    }
}
