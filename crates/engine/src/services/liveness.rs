//! pid identities that die with their process.
//!
//! A service identity by pid names one process. When that process exits,
//! its pid is free, and the next process to get it (any user's) must not be
//! the service. The engine opens a pidfd for each registered pid (which
//! fails for a pid with no process) and a watcher thread polls them: the
//! moment a process exits, its `service_by_pid` entry is deleted.
//!
//! The kernel checks too: each entry holds its process's start time, and a
//! process whose start time differs is not the service, even with that pid.
//! That covers the moment between an exit and the deletion, and a pinned
//! layer whose `up` has stopped (no watcher runs then).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use connredir_abi::{connredir_pid_identity, CONNREDIR_CLOCK_TICKS_PER_SEC};
use tracing::{info, warn};

use crate::Error;

/// One watched pid: the service it is, and its process's pidfd (shared
/// with the watcher while it polls, so it is never closed under it).
struct Entry {
    service: u32,
    pidfd: Arc<OwnedFd>,
}

#[derive(Default)]
struct Watched {
    pids: HashMap<u32, Entry>,
    stop: bool,
}

/// What the watcher and the engine share.
struct Shared {
    watched: Mutex<Watched>,
    /// The `service_by_pid` map (a duplicate of the engine's descriptor).
    map: OwnedFd,
    /// An eventfd that wakes the watcher when the set changes or it must stop.
    wake: OwnedFd,
}

/// The registered pids, each removed from the kernel's `service_by_pid` map
/// when its process exits.
pub(crate) struct PidIdentities {
    shared: Arc<Shared>,
    watcher: Option<JoinHandle<()>>,
}

impl PidIdentities {
    /// Starts the watcher for the `service_by_pid` map behind `map`.
    pub(crate) fn start(map: OwnedFd) -> std::io::Result<PidIdentities> {
        // SAFETY: eventfd has no memory arguments.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let shared = Arc::new(Shared {
            watched: Mutex::new(Watched::default()),
            map,
            // SAFETY: wake is a new descriptor that nothing else owns.
            wake: unsafe { OwnedFd::from_raw_fd(wake) },
        });
        let watcher = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("connredir-pids".into())
                .spawn(move || watch(&shared))?
        };
        Ok(PidIdentities {
            shared,
            watcher: Some(watcher),
        })
    }

    /// Makes `pid` an identity of `service`, in the kernel too, for as long
    /// as its process lives. A pid with no process is an error.
    pub(crate) fn register(&self, pid: u32, service: u32) -> Result<(), Error> {
        let invalid =
            |why: String| Error::InvalidService(format!("pid {pid} cannot be an identity: {why}"));
        let gone = || invalid("no process has it".into());
        let pidfd = pidfd_open(pid).map_err(|e| {
            if e.raw_os_error() == Some(libc::ESRCH) {
                gone()
            } else {
                invalid(e.to_string())
            }
        })?;
        // Read while the pidfd holds the process: if it is still running
        // afterwards, the start time is its own, not a later process's.
        let start_ticks = start_ticks(pid).map_err(|_| gone())?;
        if exited(&pidfd) {
            return Err(gone());
        }
        let value = connredir_pid_identity {
            service_id: service,
            reserved: 0,
            start_ticks,
        };
        let mut watched = self.shared.watched.lock().unwrap();
        map_update(&self.shared.map, pid, &value)
            .map_err(|e| invalid(format!("the kernel's identity map refused it: {e}")))?;
        watched.pids.insert(
            pid,
            Entry {
                service,
                pidfd: Arc::new(pidfd),
            },
        );
        drop(watched);
        self.wake();
        Ok(())
    }

    /// Removes `pid` as an identity of `service`, if it still is one (a
    /// process that exited was removed already; its pid may be another
    /// service's by now, which stays).
    pub(crate) fn unregister(&self, pid: u32, service: u32) {
        let mut watched = self.shared.watched.lock().unwrap();
        if watched.pids.get(&pid).is_some_and(|e| e.service == service) {
            watched.pids.remove(&pid);
            remove_if(&self.shared.map, pid, service);
        }
        drop(watched);
        self.wake();
    }

    /// Is `pid` a live identity (of any service)?
    pub(crate) fn is_live(&self, pid: u32) -> bool {
        self.shared.watched.lock().unwrap().pids.contains_key(&pid)
    }

    fn wake(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe {
            libc::write(self.shared.wake.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }
}

impl Drop for PidIdentities {
    fn drop(&mut self) {
        self.shared.watched.lock().unwrap().stop = true;
        self.wake();
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
    }
}

/// The watcher: polls every pidfd (readable once its process has exited)
/// and the wake-up eventfd, and removes the identities of exited processes.
fn watch(shared: &Shared) {
    loop {
        let polled: Vec<(u32, Arc<OwnedFd>)> = {
            let watched = shared.watched.lock().unwrap();
            if watched.stop {
                return;
            }
            watched
                .pids
                .iter()
                .map(|(pid, e)| (*pid, Arc::clone(&e.pidfd)))
                .collect()
        };
        let mut fds: Vec<libc::pollfd> = std::iter::once(shared.wake.as_raw_fd())
            .chain(polled.iter().map(|(_, fd)| fd.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of pollfd of that length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                warn!(error = %err, "polling the service processes failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            continue;
        }
        if fds[0].revents != 0 {
            let mut count = 0u64;
            // SAFETY: reads 8 bytes into a valid u64 from our eventfd.
            unsafe {
                libc::read(shared.wake.as_raw_fd(), (&mut count as *mut u64).cast(), 8);
            }
        }
        let mut watched = shared.watched.lock().unwrap();
        for (pollfd, (pid, fd)) in fds[1..].iter().zip(&polled) {
            if pollfd.revents == 0 {
                continue;
            }
            // Still the same registration (not replaced meanwhile)?
            let Some(entry) = watched.pids.get(pid).filter(|e| Arc::ptr_eq(&e.pidfd, fd)) else {
                continue;
            };
            let service = entry.service;
            watched.pids.remove(pid);
            remove_if(&shared.map, *pid, service);
            info!(
                pid,
                service, "a service's process exited: its pid is no longer an identity"
            );
        }
    }
}

/// When process `pid` started, in clock ticks since boot, the unit the
/// kernel programs compare in (so only on a kernel that counts the ticks
/// the layer was built for).
fn start_ticks(pid: u32) -> std::io::Result<u64> {
    let hz = connredir_host::procfs::clock_ticks_per_second();
    if hz != CONNREDIR_CLOCK_TICKS_PER_SEC as libc::c_long {
        return Err(std::io::Error::other(format!(
            "this kernel counts {hz} clock ticks a second, the layer {CONNREDIR_CLOCK_TICKS_PER_SEC}"
        )));
    }
    connredir_host::procfs::start_ticks(pid)
}

/// Has the process behind `pidfd` exited (its pidfd is readable then)?
fn exited(pidfd: &OwnedFd) -> bool {
    let mut fd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no waiting.
    unsafe { libc::poll(&mut fd, 1, 0) != 0 }
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `union bpf_attr` as the map element commands read it.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

fn map_elem(
    cmd: libc::c_long,
    map: &OwnedFd,
    key: &u32,
    value: Option<&mut connredir_pid_identity>,
) -> std::io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: map.as_raw_fd() as u32,
        pad: 0,
        key: key as *const u32 as u64,
        value: value.map_or(0, |v| v as *mut connredir_pid_identity as u64),
        flags: 0,
    };
    // SAFETY: attr is a valid bpf_attr prefix whose pointers outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &mut attr as *mut ElemAttr,
            std::mem::size_of::<ElemAttr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn map_update(map: &OwnedFd, pid: u32, value: &connredir_pid_identity) -> std::io::Result<()> {
    let mut value = *value;
    map_elem(BPF_MAP_UPDATE_ELEM, map, &pid, Some(&mut value))
}

/// Deletes `pid`'s entry if it names `service` (the caller holds the lock,
/// so nothing of ours writes it in between).
fn remove_if(map: &OwnedFd, pid: u32, service: u32) {
    let mut current = connredir_pid_identity::default();
    if map_elem(BPF_MAP_LOOKUP_ELEM, map, &pid, Some(&mut current)).is_ok()
        && current.service_id == service
    {
        let _ = map_elem(BPF_MAP_DELETE_ELEM, map, &pid, None);
    }
}
