//! The connredir engine: loads the kernel programs, attaches them to cgroups,
//! and registers services and rules.
//!
//! ```no_run
//! use connredir_engine::{Engine, Identity, Rule, Service};
//! # fn main() -> Result<(), connredir_engine::Error> {
//! let mut engine = Engine::load()?;
//! engine.attach("/sys/fs/cgroup/unified/my-scope")?;
//! let scanner = engine.add_service(Service {
//!     name: "scanner".into(),
//!     listen: vec!["127.0.0.1:8000".parse().unwrap()],
//!     identity: Identity { uids: vec![990], ..Default::default() },
//!     context: None,
//!     own_connections_by_self: true,
//!     accelerate: false,
//!     on_down: Default::default(),
//! })?;
//! engine.add_rule(Rule { ports: vec![80..=80, 443..=443], ..Rule::tcp_to(scanner) })?;
//! // Programs stay attached until `engine` is dropped.
//! # Ok(()) }
//! ```
//!
//! Everything the engine attached is detached when it is dropped, also when a
//! later step fails: nothing is left half-attached.

mod link;
mod listeners;
mod liveness;
mod observe;
mod rules;
mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::maps::{
    lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, SkStorage,
};
use aya::programs::{CgroupSockAddr, CgroupSockopt, ProgramError, SockOps};
use aya::{Ebpf, EbpfLoader, Pod};
use connredir_abi::{
    connredir_addr_key, connredir_handoff_key, connredir_listener, connredir_record,
    connredir_rule_set, connredir_seal_key, connredir_service, map_names, CONNREDIR_MAX_SERVICES,
};
use connredir_kernel::programs;
use tracing::{debug, info};

pub use connredir_host::cgroup::{self, cgroup_id, CGROUP2_HYBRID_ROOT};
pub use connredir_host::procfs::is_listening;
pub use observe::{boot_time, Connection, Decision, TraceEvent, Tracer};
pub use rules::{Protocol, Rule, RuleId};
pub use service::{Identity, OnDown, Service, ServiceId};

use rules::{CompiledRules, TrieData};

/// Errors of the engine; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading BPF programs needs root.
    #[error("connredir must run as root to load BPF programs (it needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)")]
    NotRoot,
    /// The object could not be loaded.
    #[error("loading the BPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    /// The verifier rejected a program.
    #[error(
        "the kernel's verifier rejected program {name} ({errno}); its last words:\n{last_lines}\n\
         (this is a bug in connredir or a kernel it was not built for: please report it with `uname -r`)"
    )]
    Verifier {
        /// Program name.
        name: &'static str,
        /// The error the kernel returned.
        errno: std::io::Error,
        /// The end of the verifier's log.
        last_lines: String,
    },
    /// The kernel does not have a program type or hook the layer needs.
    #[error(
        "this kernel cannot load program {name} ({errno}): connredir needs Linux 5.18 or later \
         built with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and CONFIG_BPF_JIT"
    )]
    Unsupported {
        /// Program name.
        name: &'static str,
        /// The error the kernel returned.
        errno: std::io::Error,
    },
    /// A program could not be loaded or attached for another reason.
    #[error("program {name} could not be loaded or attached: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// What the kernel said.
        #[source]
        source: ProgramError,
    },
    /// A program could not be attached to a cgroup (or its link pinned).
    #[error("attaching {program} to {}: {source}", cgroup.display())]
    Attach {
        /// Program name.
        program: &'static str,
        /// The cgroup.
        cgroup: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// bpffs is missing or a pin cannot be made.
    #[error("pinning in {}: {why}", dir.display())]
    Pin {
        /// The pin directory.
        dir: PathBuf,
        /// What went wrong and what to do.
        why: String,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What the kernel said.
        #[source]
        source: MapError,
    },
    /// The kernel gave no random bytes for the key that seals records.
    #[error("cannot read random bytes for the record seal key (getrandom): {0}")]
    SealKey(#[source] std::io::Error),
    /// A cgroup path is unusable.
    #[error("cgroup {path}: {why}")]
    Cgroup {
        /// The path given.
        path: PathBuf,
        /// What is wrong and what to do.
        why: String,
    },
    /// A service definition is invalid.
    #[error("invalid service {0}")]
    InvalidService(String),
    /// A rule definition is invalid.
    #[error("invalid rule: {0}")]
    InvalidRule(String),
    /// No such service.
    #[error("no service with id {0}")]
    UnknownService(u32),
    /// No such rule.
    #[error("no rule with id {0}")]
    UnknownRule(u32),
    /// Another failure of the host's cgroups, bpffs or processes.
    #[error(transparent)]
    Host(connredir_host::Error),
}

impl From<connredir_host::Error> for Error {
    /// Keeps the engine's own variants (and so their messages) for the
    /// cgroup and bpffs failures it always reported as such.
    fn from(e: connredir_host::Error) -> Error {
        match e {
            connredir_host::Error::Cgroup { path, why } => Error::Cgroup { path, why },
            connredir_host::Error::Bpffs { path, why } => Error::Pin { dir: path, why },
            other => Error::Host(other),
        }
    }
}

/// The layer's counters, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Connections redirected to a service.
    pub redirects: u64,
    /// Times a matching rule was skipped because its service had already
    /// handled the flow or was the connecting process.
    pub loops_prevented: u64,
    /// Connections left alone because their chain was full.
    pub hop_limit: u64,
    /// Records carried to an accepted socket.
    pub handoffs: u64,
    /// Connections accepted on a service address without their record.
    pub handoff_misses: u64,
    /// Record sets refused (caller neither root nor a service).
    pub denied_sets: u64,
    /// Records set by services on their onward sockets.
    pub records_set: u64,
    /// `SO_ORIGINAL_DST` queries answered from a record.
    pub original_dst_answered: u64,
    /// Onward connections of services that set no records, which took the
    /// record of the connection they forward.
    pub records_inherited: u64,
    /// Redirected connections missing from `conns` (its map was full).
    pub conns_untracked: u64,
    /// Decisions lost because the trace ring buffer was full.
    pub trace_lost: u64,
    /// Sockets that joined the sockmap acceleration.
    pub accel_joined: u64,
    /// Joined sockets that wrote before their peer joined, so stayed on TCP.
    pub accel_passed: u64,
    /// Writes of joined sockets moved straight into their peer's receive
    /// queue, past TCP.
    pub accel_sends: u64,
    /// Directions of accelerated flows a service handed to the kernel
    /// after inspecting them (cut-through).
    pub cut_throughs: u64,
    /// Writes moved straight to the far end of a flow, past its service.
    pub cut_through_sends: u64,
    /// Selected connects refused because the layer could not write their
    /// record (the socket's option memory was full): never let through.
    pub failed_closed: u64,
    /// Selected connects refused while their service's own listener was
    /// absent (`on_down = "block"`).
    pub service_down_blocked: u64,
    /// Services skipped while their own listener was absent
    /// (`on_down = "bypass"`).
    pub service_down_bypassed: u64,
    /// Binds of a service's address refused to processes that are not the
    /// service.
    pub binds_refused: u64,
    /// Connects of a service's listening process that its own rule would
    /// have sent back to itself, kept from looping.
    pub self_loops: u64,
    /// Record sets refused to a service's process because the record was
    /// not one the layer issued to that service (forged, changed, or the
    /// last hop another service's).
    pub forged_records: u64,
}

/// Plain-data wrapper so the generated ABI structs can live in aya maps.
#[derive(Clone, Copy, PartialEq)]
#[repr(transparent)]
struct Plain<T>(T);
// SAFETY: only instantiated with bindgen-generated #[repr(C)] structs of
// integers and arrays of integers, for which every bit pattern is valid.
unsafe impl<T: Copy + 'static> Pod for Plain<T> {}

/// How many programs the engine attaches to each cgroup (one link each).
pub const CGROUP_PROGRAMS: usize = PROGRAMS.len();

/// The programs, in the order they are attached.
const PROGRAMS: [&str; 7] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::BIND4,
    programs::BIND6,
    programs::SOCKOPS,
    programs::GETSOCKOPT,
    programs::SETSOCKOPT,
];

/// One cgroup with every program attached to it, through links the
/// engine holds (and, when pinning, also pinned in bpffs).
struct Attachment {
    path: PathBuf,
    /// The cgroup's id (its links are pinned under it).
    id: u64,
    links: Vec<OwnedFd>,
    /// Pins this engine created (removed on detach or failure).
    pins: Vec<PathBuf>,
    /// Links of an earlier run this engine pointed at its own programs,
    /// each with the program it ran before, until the takeover is finished.
    replaced: Vec<(OwnedFd, OwnedFd)>,
}

impl Attachment {
    /// Puts back what attaching changed: the earlier run's links run their
    /// earlier programs again, and the pins this engine made are removed
    /// (its own links detach when their descriptors close).
    fn undo(&mut self) {
        for (link, program) in self.replaced.drain(..) {
            if let Err(e) = link::update(link.as_fd(), program.as_fd()) {
                tracing::warn!(cgroup = %self.path.display(), error = %e, "cannot restore a link's program");
            }
        }
        remove_pins(&self.pins);
        self.pins.clear();
    }
}

/// What a pinned engine found when it started, to put back when it is
/// dropped before [`Engine::finish_takeover`]: a failed `up` leaves the
/// previous run's links, services and rules as they were, and nothing of
/// its own.
struct Previous {
    /// Whether the pin directory was there before.
    dir_existed: bool,
    /// The files in it then.
    files: std::collections::BTreeSet<std::ffi::OsString>,
    services: Vec<connredir_service>,
    by_pid: Vec<(u32, Plain<connredir_abi::connredir_pid_identity>)>,
    by_uid: Vec<(u32, u32)>,
    by_cgroup: Vec<(u64, u32)>,
    addrs: Vec<(Plain<connredir_addr_key>, u32)>,
    rules_generation: u8,
    /// What the active generation of the rule trie held.
    rules: CompiledRules,
    /// Rule ids from here on were issued by this engine.
    next_rule: u32,
}

/// The files in a pin directory.
fn pin_files(dir: &Path) -> std::collections::BTreeSet<std::ffi::OsString> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

/// Whether a file in a pin directory is one the engine makes.
fn is_ours(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    name.starts_with("link-") || map_names::ALL.contains(&name.as_ref())
}

/// Removes the engine's files in `dir` that are not in `keep`, and the
/// directory when it was not there before.
fn remove_new_pins(
    dir: &Path,
    keep: &std::collections::BTreeSet<std::ffi::OsString>,
    dir_existed: bool,
) {
    let new: Vec<PathBuf> = pin_files(dir)
        .into_iter()
        .filter(|name| is_ours(name) && !keep.contains(name))
        .map(|name| dir.join(name))
        .collect();
    remove_pins(&new);
    if !dir_existed {
        let _ = std::fs::remove_dir(dir);
    }
}

/// What the engine wrote to the maps for one service, to undo it exactly.
struct Registered {
    service: Service,
    cgroup_ids: Vec<u64>,
}

/// The loaded redirect layer.
pub struct Engine {
    bpf: Ebpf,
    /// Where maps and links are pinned; `None`: they live as long as we do.
    pin_dir: Option<PathBuf>,
    /// Services found in pinned maps, not registered again yet.
    adopted: BTreeMap<ServiceId, connredir_service>,
    /// The state a pinned engine took over, until the takeover is finished.
    previous: Option<Previous>,
    /// The acceleration program the pinned socket map had before this
    /// engine attached its own, until the takeover is finished.
    accel_before: Option<OwnedFd>,
    /// Listeners this engine marked during a takeover, with the mark each
    /// had before, until the takeover is finished.
    remarked: Vec<(OwnedFd, Option<connredir_listener>)>,
    attachments: Vec<Attachment>,
    services: BTreeMap<ServiceId, Registered>,
    rules: BTreeMap<RuleId, Rule>,
    /// What each generation of the rule trie holds.
    installed: [CompiledRules; 2],
    /// The generation connects read.
    rules_generation: u8,
    rules_flipped_at: Option<std::time::Instant>,
    next_rule: u32,
    /// The registered pids, removed from the kernel when their process exits.
    pids: liveness::PidIdentities,
    /// Per service, the listening sockets (inodes) on its addresses seen
    /// at the last look, so only new ones are searched for their holders.
    listener_inodes: BTreeMap<ServiceId, BTreeSet<u64>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("attached", &self.attached().collect::<Vec<_>>())
            .field("services", &self.services.len())
            .field("rules", &self.rules.len())
            .finish()
    }
}

/// Loads the sk_msg program and attaches it to the accelerated-socket map.
/// The attachment lives as long as the map (pinned maps outlive us), so it
/// is left in place on purpose rather than detached when the engine drops.
///
/// Returns the program the map had before (of an earlier run, when the map
/// is pinned), so that an unfinished takeover can put it back.
fn attach_accel(bpf: &mut Ebpf) -> Result<Option<OwnedFd>, Error> {
    let name = map_names::ACCEL_SOCKS;
    let map = bpf.map(name).expect("checked at load");
    let socks =
        aya::maps::SockHash::<&MapData, Plain<connredir_abi::connredir_pair_key>>::try_from(map)
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

/// Gives the layer its record seal key: 16 random bytes, written only while
/// the map holds none (all zero), so a takeover of pinned maps keeps the key
/// and every record already handed out stays valid. Nothing but the kernel
/// programs and root (BPF maps need CAP_BPF) can read it.
fn ensure_seal_key(bpf: &mut Ebpf) -> Result<(), Error> {
    let name = map_names::SEAL_KEY;
    let mut map = Array::<&mut MapData, Plain<connredir_seal_key>>::try_from(
        bpf.map_mut(name).expect("checked at load"),
    )
    .map_err(map_err(name))?;
    let Plain(current) = map.get(&0, 0).map_err(map_err(name))?;
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
    map.set(0, Plain(key), 0).map_err(map_err(name))?;
    debug!("record seal key made");
    Ok(())
}

/// Maps pinned by an earlier run are reused as they are, whatever their
/// layout: one pinned by a connredir whose ABI differs (a key without the
/// network namespace, say) would be read with the wrong sizes. Such a pin
/// directory is refused, saying what to do, before anything is reused.
fn check_pinned_layouts(dir: &Path) -> Result<(), Error> {
    let pin_err = |why: String| Error::Pin {
        dir: dir.to_owned(),
        why,
    };
    let object = aya_obj::Object::parse(connredir_kernel::object())
        .map_err(|e| pin_err(format!("cannot read the kernel object: {e}")))?;
    for name in map_names::ALL {
        let path = dir.join(name);
        let Some(wanted) = object.maps.get(name) else {
            continue;
        };
        if !path.exists() {
            continue;
        }
        let pinned = aya::maps::MapData::from_pin(&path)
            .and_then(|map| map.info())
            .map_err(|e| pin_err(format!("cannot read the pinned map {name}: {e}")))?;
        let have = (pinned.key_size(), pinned.value_size(), pinned.max_entries());
        let want = (wanted.key_size(), wanted.value_size(), wanted.max_entries());
        if have != want {
            return Err(pin_err(format!(
                "map {name} was pinned by another version of connredir (key {} bytes, value {}, \
                 {} entries; this version needs {}, {}, {}): remove that layer first with its \
                 own `connredir down` (or remove {}), then start this one",
                have.0,
                have.1,
                have.2,
                want.0,
                want.1,
                want.2,
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Tells the kernel programs which network namespace is the layer's own
/// (this process's, where its services listen): sockets of the others
/// share a bounded part of the hand-off map (abi.h,
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

/// Lines of the verifier's log worth showing: its end, where it says why.
const VERIFIER_LINES: usize = 12;

fn program_err(name: &'static str) -> impl FnOnce(ProgramError) -> Error {
    move |source| match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            // 524 is the kernel's ENOTSUPP, which some BPF paths return.
            let unsupported = matches!(
                io_error.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
            );
            if lines.is_empty() && unsupported {
                Error::Unsupported {
                    name,
                    errno: io_error,
                }
            } else {
                let tail = lines[lines.len().saturating_sub(VERIFIER_LINES)..]
                    .iter()
                    .map(|l| format!("  {l}"))
                    .collect::<Vec<_>>()
                    .join("\n");
                Error::Verifier {
                    name,
                    errno: io_error,
                    last_lines: tail,
                }
            }
        }
        source => Error::Program { name, source },
    }
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { name, source }
}

/// The service-address map key of a listening address (IPv4 as IPv4-mapped
/// IPv6, as the sockops program sees it).
fn addr_key(addr: &std::net::SocketAddr) -> connredir_addr_key {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(ip) => ip.octets(),
    };
    connredir_addr_key {
        addr: ip,
        port: addr.port(),
        reserved: 0,
    }
}

impl Engine {
    /// Loads the kernel programs (not attached anywhere yet).
    pub fn load() -> Result<Engine, Error> {
        Engine::load_with(None)
    }

    /// Loads the kernel programs with their maps and links pinned in `dir`
    /// (on bpffs), so they outlive this process: a later `load_pinned` of
    /// the same directory takes over the maps and links without a moment
    /// in which connections go unredirected. [`Engine::remove_pinned`]
    /// removes it all.
    pub fn load_pinned(dir: &Path) -> Result<Engine, Error> {
        let pin_err = |why: String| Error::Pin {
            dir: dir.to_owned(),
            why,
        };
        let parent = dir.parent().unwrap_or(Path::new("/"));
        if !connredir_host::bpffs::is_bpffs(parent) {
            return Err(pin_err(format!(
                "{} is not a bpffs mount (mount it: mount -t bpf bpf {})",
                parent.display(),
                parent.display()
            )));
        }
        let dir_existed = dir.exists();
        let files = pin_files(dir);
        std::fs::create_dir_all(dir).map_err(|e| pin_err(format!("cannot create it: {e}")))?;
        let loaded = Engine::load_with(Some(dir)).and_then(|mut engine| {
            engine.adopt_rules()?;
            engine.adopt_services()?;
            engine.previous = Some(engine.snapshot(dir_existed, files.clone())?);
            Ok(engine)
        });
        if loaded.is_err() {
            // Maps this load pinned go; an earlier run's stay.
            remove_new_pins(dir, &files, dir_existed);
        }
        loaded
    }

    /// Reads what a takeover may change, to put it back if it fails.
    fn snapshot(
        &mut self,
        dir_existed: bool,
        files: std::collections::BTreeSet<std::ffi::OsString>,
    ) -> Result<Previous, Error> {
        let services = self.services_map()?;
        let services = (0..CONNREDIR_MAX_SERVICES)
            .map(|id| services.get(&id, 0).map(|Plain(s)| s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map_names::SERVICES))?;
        Ok(Previous {
            dir_existed,
            files,
            services,
            by_pid: self.entries(map_names::SERVICE_BY_PID)?,
            by_uid: self.entries(map_names::SERVICE_BY_UID)?,
            by_cgroup: self.entries(map_names::SERVICE_BY_CGROUP)?,
            addrs: self.entries(map_names::SERVICE_ADDRS)?,
            rules_generation: self.rules_generation,
            rules: self.installed[usize::from(self.rules_generation)].clone(),
            next_rule: self.next_rule,
        })
    }

    /// Every entry of a hash map of service ids (or pid identities).
    fn entries<K: Pod, V: Pod>(&mut self, name: &'static str) -> Result<Vec<(K, V)>, Error> {
        self.hash::<K, V>(name)?
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(name))
    }

    /// Makes a hash map of service ids (or pid identities) hold `entries`
    /// and nothing else.
    fn restore_entries<K: Pod + PartialEq, V: Pod>(
        &mut self,
        name: &'static str,
        entries: &[(K, V)],
    ) -> Result<(), Error> {
        let mut map = self.hash::<K, V>(name)?;
        let extra: Vec<K> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !entries.iter().any(|(old, _)| old == k))
            .collect();
        for key in extra {
            map.remove(&key).map_err(map_err(name))?;
        }
        for (key, id) in entries {
            map.insert(key, id, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Undoes an unfinished takeover: the links, services, identities,
    /// addresses and rules of the previous run are as they were, and what
    /// this engine added (links, pins, entries, hit counts) is gone.
    fn roll_back(&mut self, previous: Previous) {
        for attachment in &mut self.attachments {
            attachment.undo();
        }
        let restored = (|| -> Result<(), Error> {
            let mut services = self.services_map()?;
            for (id, value) in previous.services.iter().enumerate() {
                services
                    .set(id as u32, Plain(*value), 0)
                    .map_err(map_err(map_names::SERVICES))?;
            }
            self.restore_entries(map_names::SERVICE_BY_PID, &previous.by_pid)?;
            self.restore_entries(map_names::SERVICE_BY_UID, &previous.by_uid)?;
            self.restore_entries(map_names::SERVICE_BY_CGROUP, &previous.by_cgroup)?;
            self.restore_entries(map_names::SERVICE_ADDRS, &previous.addrs)?;
            let generation = previous.rules_generation;
            let now = std::mem::take(&mut self.installed[usize::from(generation)]);
            self.write_generation(generation, &now, &previous.rules)?;
            self.installed[usize::from(generation)] = previous.rules.clone();
            self.set_rules_generation(generation)?;
            self.rules_generation = generation;
            let name = map_names::RULE_HITS;
            let mut hits = aya::maps::PerCpuHashMap::<&mut MapData, u32, u64>::try_from(
                self.bpf.map_mut(name).expect("checked at load"),
            )
            .map_err(map_err(name))?;
            let ours: Vec<u32> = hits
                .keys()
                .filter_map(Result::ok)
                .filter(|id| *id >= previous.next_rule)
                .collect();
            for id in ours {
                let _ = hits.remove(&id);
            }
            let name = map_names::LISTENERS;
            let mut marks = SkStorage::<&mut MapData, Plain<connredir_listener>>::try_from(
                self.bpf.map_mut(name).expect("checked at load"),
            )
            .map_err(map_err(name))?;
            // Latest first, so a listener marked twice gets its first mark.
            for (socket, before) in self.remarked.drain(..).rev() {
                let _ = match before {
                    Some(mark) => marks.insert(&socket, Plain(mark), 0),
                    None => marks.remove(&socket),
                };
            }
            Ok(())
        })();
        if let Err(e) = restored {
            tracing::warn!(error = %e, "cannot fully restore the previous run's maps");
        }
        if let Some(dir) = &self.pin_dir {
            remove_new_pins(dir, &previous.files, previous.dir_existed);
        }
        info!("takeover undone: the previous run's layer is as it was");
    }

    /// Removes everything a pinned engine left in `dir`: its links (which
    /// detaches the programs), its maps, and the directory. Files it did not
    /// make are left alone.
    pub fn remove_pinned(dir: &Path) -> Result<usize, Error> {
        let mut removed = 0;
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => {
                return Err(Error::Pin {
                    dir: dir.to_owned(),
                    why: e.to_string(),
                })
            }
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with("link-") || map_names::ALL.contains(&name.as_str());
            if ours && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        let _ = std::fs::remove_dir(dir);
        Ok(removed)
    }

    fn load_with(pin_dir: Option<&Path>) -> Result<Engine, Error> {
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
            rules_generation: 0,
            rules_flipped_at: None,
            next_rule: 1,
            pids,
            listener_inodes: BTreeMap::new(),
        })
    }

    /// The cgroups the programs are attached to.
    pub fn attached(&self) -> impl Iterator<Item = &Path> {
        self.attachments.iter().map(|a| a.path.as_path())
    }

    /// Attaches the programs to a cgroup v2 directory: connections opened
    /// there (and in its descendants) meet the rules, and services running
    /// there get records and the syscall interface. Services must run in an
    /// attached cgroup too: their onward connections meet the other services.
    ///
    /// A cgroup nested inside (or containing) an attached one is refused: the
    /// programs would run twice for its sockets.
    pub fn attach(&mut self, cgroup: impl AsRef<Path>) -> Result<(), Error> {
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
        if let Some(other) = self
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
        match self.attach_all(&mut attachment) {
            Ok(()) => {
                info!(cgroup = %path.display(), "programs attached");
                self.attachments.push(attachment);
                Ok(())
            }
            Err(e) => {
                attachment.undo();
                Err(e)
            }
        }
    }

    /// Attaches (or, when pinning, adopts) the links of one cgroup.
    fn attach_all(&mut self, a: &mut Attachment) -> Result<(), Error> {
        let cgroup = File::open(&a.path).map_err(|e| Error::Cgroup {
            path: a.path.clone(),
            why: e.to_string(),
        })?;
        let cgroup_id = cgroup_id(&a.path)?;
        for name in PROGRAMS {
            let program = self
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
            let pin = self
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
    pub fn detach(&mut self, cgroup: impl AsRef<Path>) -> Result<(), Error> {
        let path = cgroup
            .as_ref()
            .canonicalize()
            .unwrap_or(cgroup.as_ref().to_owned());
        let index = self
            .attachments
            .iter()
            .position(|a| a.path == path)
            .ok_or_else(|| Error::Cgroup {
                path: path.clone(),
                why: "is not attached".into(),
            })?;
        let attachment = self.attachments.remove(index);
        if let Some(dir) = &self.pin_dir {
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

    /// Registers a service and returns its id.
    pub fn add_service(&mut self, service: Service) -> Result<ServiceId, Error> {
        let value = service.to_kernel()?;
        if self
            .services
            .values()
            .any(|r| r.service.name == service.name)
        {
            return Err(Error::InvalidService(format!(
                "{}: a service with this name is already registered",
                service.name
            )));
        }
        // After a restart, a service keeps the id it had (found by its
        // listening addresses), so records in flight keep their meaning.
        let previous = self
            .adopted
            .iter()
            .find(|(_, old)| {
                (old.listen4, old.listen6, old.flags) == (value.listen4, value.listen6, value.flags)
            })
            .map(|(id, _)| *id);
        let id = previous
            .or_else(|| {
                (1..CONNREDIR_MAX_SERVICES)
                    .map(ServiceId)
                    .find(|id| !self.services.contains_key(id) && !self.adopted.contains_key(id))
            })
            .ok_or_else(|| {
                Error::InvalidService(format!(
                    "{}: at most {} services can be registered",
                    service.name,
                    CONNREDIR_MAX_SERVICES - 1
                ))
            })?;
        let cgroup_ids = service
            .identity
            .cgroups
            .iter()
            .map(|p| cgroup_id(p))
            .collect::<Result<Vec<_>, _>>()?;
        self.check_identity_free(&service, &cgroup_ids)?;

        let registered = Registered {
            service,
            cgroup_ids,
        };
        if let Err(e) = self.write_service(id, &registered, &value) {
            self.erase_service(id, &registered);
            return Err(e);
        }
        self.adopted.remove(&id);
        self.mark_existing_listeners(id, &registered.service);
        info!(%id, name = %registered.service.name, "service registered");
        self.services.insert(id, registered);
        Ok(id)
    }

    /// Marks the service's own listeners that were opened before it was
    /// registered (see `listeners`); later binds are marked by the kernel.
    fn mark_existing_listeners(&mut self, id: ServiceId, service: &Service) {
        let inodes: BTreeSet<u64> = service
            .listen
            .iter()
            .flat_map(listeners::listening_inodes)
            .collect();
        self.mark_listeners(id, service, &inodes.iter().copied().collect::<Vec<_>>());
        self.listener_inodes.insert(id, inodes);
    }

    /// Marks the services' own listeners that appeared since the last look
    /// (a proxy outside the attached cgroups, whose bind the kernel did not
    /// see, or one that bound before its service was registered and
    /// listened after): `connredir up` calls it every second. Cheap when
    /// nothing changed: it reads `/proc/net/tcp{,6}` and looks for the
    /// holders of a listening socket only when one is new.
    pub fn mark_new_listeners(&mut self) {
        let services: Vec<(ServiceId, Service)> = self
            .services
            .iter()
            .map(|(id, r)| (*id, r.service.clone()))
            .collect();
        for (id, service) in services {
            let now: BTreeSet<u64> = service
                .listen
                .iter()
                .flat_map(listeners::listening_inodes)
                .collect();
            let seen = self.listener_inodes.entry(id).or_default();
            let new: Vec<u64> = now.difference(seen).copied().collect();
            // Closed listeners are forgotten: an inode may come back.
            *seen = now;
            if !new.is_empty() {
                self.mark_listeners(id, &service, &new);
            }
        }
    }

    /// Marks the listening sockets `inodes` held by `service`'s processes.
    fn mark_listeners(&mut self, id: ServiceId, service: &Service, inodes: &[u64]) {
        let name = map_names::LISTENERS;
        let Some(map) = self.bpf.map_mut(name) else {
            return;
        };
        let Ok(mut storage) = SkStorage::<&mut MapData, Plain<connredir_listener>>::try_from(map)
        else {
            return;
        };
        for (socket, pid) in listeners::own_listeners(inodes, &service.identity) {
            let mark = connredir_listener {
                service_id: id.0,
                tgid: pid,
                ..Default::default()
            };
            if self.previous.is_some() {
                // A takeover that is undone gives the listener its old mark.
                let before = storage.get(&socket, 0).ok().map(|Plain(m)| m);
                match socket.try_clone() {
                    Ok(held) => self.remarked.push((held, before)),
                    Err(e) => debug!(%id, pid, "cannot keep a listener to restore: {e}"),
                }
            }
            match storage.insert(&socket, Plain(mark), 0) {
                Ok(()) => debug!(%id, pid, "marked a listener opened before registration"),
                Err(e) => debug!(%id, pid, "cannot mark a listener: {e}"),
            }
        }
    }

    fn check_identity_free(&self, service: &Service, cgroup_ids: &[u64]) -> Result<(), Error> {
        for (other_id, other) in &self.services {
            if let Some(addr) = service
                .listen
                .iter()
                .find(|a| other.service.listen.contains(a))
            {
                return Err(Error::InvalidService(format!(
                    "{}: address {addr} is already where {} ({other_id}) listens; give each service its own address",
                    service.name, other.service.name
                )));
            }
            let clash = service
                .identity
                .pids
                .iter()
                // A pid whose process exited is nobody's any more.
                .find(|p| other.service.identity.pids.contains(p) && self.pids.is_live(**p))
                .map(|p| format!("pid {p}"))
                .or_else(|| {
                    service
                        .identity
                        .uids
                        .iter()
                        .find(|u| other.service.identity.uids.contains(u))
                        .map(|u| format!("uid {u}"))
                })
                .or_else(|| {
                    cgroup_ids
                        .iter()
                        .position(|c| other.cgroup_ids.contains(c))
                        .map(|i| format!("cgroup {}", service.identity.cgroups[i].display()))
                });
            if let Some(what) = clash {
                return Err(Error::InvalidService(format!(
                    "{}: {what} is already the identity of {} ({other_id}); a process can be one service only",
                    service.name, other.service.name
                )));
            }
        }
        for addr in &service.listen {
            if let Some((other_id, other)) = self
                .services
                .iter()
                .find(|(_, o)| o.service.listen.contains(addr))
            {
                return Err(Error::InvalidService(format!(
                    "{}: {addr} is already the address of {} ({other_id})",
                    service.name, other.service.name
                )));
            }
        }
        Ok(())
    }

    fn write_service(
        &mut self,
        id: ServiceId,
        r: &Registered,
        value: &connredir_service,
    ) -> Result<(), Error> {
        // Each pid for as long as its process lives (none: an error).
        for pid in &r.service.identity.pids {
            self.pids.register(*pid, id.0)?;
        }
        let mut by_uid = self.hash::<u32, u32>(map_names::SERVICE_BY_UID)?;
        for uid in &r.service.identity.uids {
            by_uid
                .insert(uid, id.0, 0)
                .map_err(map_err(map_names::SERVICE_BY_UID))?;
        }
        let mut by_cgroup = self.hash::<u64, u32>(map_names::SERVICE_BY_CGROUP)?;
        for cg in &r.cgroup_ids {
            by_cgroup
                .insert(cg, id.0, 0)
                .map_err(map_err(map_names::SERVICE_BY_CGROUP))?;
        }
        let mut addrs = self.hash::<Plain<connredir_addr_key>, u32>(map_names::SERVICE_ADDRS)?;
        for addr in &r.service.listen {
            let key = addr_key(addr);
            addrs
                .insert(Plain(key), id.0, 0)
                .map_err(map_err(map_names::SERVICE_ADDRS))?;
        }
        let mut services = self.services_map()?;
        services
            .set(id.0, Plain(*value), 0)
            .map_err(map_err(map_names::SERVICES))
    }

    /// Removes every map entry of a service (missing entries are fine).
    fn erase_service(&mut self, id: ServiceId, r: &Registered) {
        if let Ok(mut services) = self.services_map() {
            let _ = services.set(id.0, Plain(connredir_service::default()), 0);
        }
        for pid in &r.service.identity.pids {
            self.pids.unregister(*pid, id.0);
        }
        if let Ok(mut m) = self.hash::<u32, u32>(map_names::SERVICE_BY_UID) {
            r.service
                .identity
                .uids
                .iter()
                .for_each(|k| drop(m.remove(k)));
        }
        if let Ok(mut m) = self.hash::<u64, u32>(map_names::SERVICE_BY_CGROUP) {
            r.cgroup_ids.iter().for_each(|k| drop(m.remove(k)));
        }
        if let Ok(mut m) = self.hash::<Plain<connredir_addr_key>, u32>(map_names::SERVICE_ADDRS) {
            for addr in &r.service.listen {
                let key = addr_key(addr);
                let _ = m.remove(&Plain(key));
            }
        }
    }

    /// Unregisters a service. Its rules must be removed first.
    pub fn remove_service(&mut self, id: ServiceId) -> Result<Service, Error> {
        self.listener_inodes.remove(&id);
        if !self.services.contains_key(&id) {
            return Err(Error::UnknownService(id.0));
        }
        let rules: Vec<String> = self
            .rules
            .iter()
            .filter(|(_, r)| r.service == id)
            .map(|(rid, _)| rid.0.to_string())
            .collect();
        if !rules.is_empty() {
            return Err(Error::InvalidService(format!(
                "{id} still has rules {}: remove them first",
                rules.join(", ")
            )));
        }
        let registered = self.services.remove(&id).expect("checked above");
        self.erase_service(id, &registered);
        info!(%id, name = %registered.service.name, "service removed");
        Ok(registered.service)
    }

    /// The registered services.
    pub fn services(&self) -> impl Iterator<Item = (ServiceId, &Service)> {
        self.services.iter().map(|(id, r)| (*id, &r.service))
    }

    /// Finds a service by name.
    pub fn service_by_name(&self, name: &str) -> Option<ServiceId> {
        self.services()
            .find(|(_, s)| s.name == name)
            .map(|(id, _)| id)
    }

    /// Adds a rule; it applies to the next connect.
    pub fn add_rule(&mut self, rule: Rule) -> Result<RuleId, Error> {
        rule.validate()?;
        if !self.services.contains_key(&rule.service) {
            return Err(Error::InvalidRule(format!(
                "it names {}, which is not registered",
                rule.service
            )));
        }
        let id = RuleId(self.next_rule);
        self.rules.insert(id, rule);
        if let Err(e) = self.sync_rules() {
            self.rules.remove(&id);
            return Err(e);
        }
        self.next_rule += 1;
        Ok(id)
    }

    /// Reads what pinned maps hold from an earlier run: the active rule
    /// generation and both generations' contents, so the next change is
    /// written as a difference and nothing is missing meanwhile.
    fn adopt_rules(&mut self) -> Result<(), Error> {
        let name = map_names::RULES_ACTIVE;
        let active: Array<&MapData, u32> =
            Array::try_from(self.bpf.map(name).expect("checked at load")).map_err(map_err(name))?;
        self.rules_generation = u8::from(active.get(&0, 0).map_err(map_err(name))? != 0);
        let name = map_names::RULES;
        let trie: LpmTrie<&MapData, TrieData, Plain<connredir_rule_set>> =
            LpmTrie::try_from(self.bpf.map(name).expect("checked at load"))
                .map_err(map_err(name))?;
        for entry in trie.iter() {
            let (key, Plain(set)) = entry.map_err(map_err(name))?;
            let data = key.data();
            let mut tagged = [0u8; 17];
            tagged.copy_from_slice(&data[1..18]);
            let generation = usize::from(data[0] & 1);
            for rule in &set.rules[..(set.count as usize).min(set.rules.len())] {
                self.next_rule = self.next_rule.max(rule.rule_id + 1);
            }
            self.installed[generation].insert((key.prefix_len() - 8, tagged), set);
        }
        if self.installed.iter().any(|g| !g.is_empty()) {
            info!(
                generation = self.rules_generation,
                prefixes = self.installed[usize::from(self.rules_generation)].len(),
                "took over the rules of the previous run"
            );
        }
        Ok(())
    }

    /// Reads the services a previous run registered in pinned maps.
    fn adopt_services(&mut self) -> Result<(), Error> {
        let services = self.services_map()?;
        let mut found = BTreeMap::new();
        for id in 1..CONNREDIR_MAX_SERVICES {
            let Plain(value) = services.get(&id, 0).map_err(map_err(map_names::SERVICES))?;
            if value.flags & connredir_abi::CONNREDIR_SERVICE_ACTIVE != 0 {
                found.insert(ServiceId(id), value);
            }
        }
        self.adopted = found;
        Ok(())
    }

    /// After a restart, once the configuration is registered again: removes
    /// what the previous run registered and this one did not (services,
    /// identities, addresses, hit counts of rules that are gone).
    ///
    /// Until this succeeds, dropping a pinned engine undoes what it changed;
    /// after it, the earlier run's links of cgroups this engine did not
    /// attach are removed too.
    pub fn finish_takeover(&mut self) -> Result<(), Error> {
        for id in std::mem::take(&mut self.adopted).into_keys() {
            let mut services = self.services_map()?;
            services
                .set(id.0, Plain(connredir_service::default()), 0)
                .map_err(map_err(map_names::SERVICES))?;
            info!(%id, "removed a service of the previous run");
        }
        self.purge_pids()?;
        self.purge::<u32>(map_names::SERVICE_BY_UID)?;
        self.purge::<u64>(map_names::SERVICE_BY_CGROUP)?;
        self.purge::<Plain<connredir_addr_key>>(map_names::SERVICE_ADDRS)?;
        let live: Vec<u32> = self.rules.keys().map(|id| id.0).collect();
        let name = map_names::RULE_HITS;
        let mut hits = aya::maps::PerCpuHashMap::<&mut MapData, u32, u64>::try_from(
            self.bpf.map_mut(name).expect("checked at load"),
        )
        .map_err(map_err(name))?;
        let stale: Vec<u32> = hits
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !live.contains(k))
            .collect();
        for key in stale {
            let _ = hits.remove(&key);
        }
        // Committed: the earlier run's programs may go, and so may its links
        // to cgroups that are no longer in scope.
        self.previous = None;
        self.accel_before = None;
        self.remarked.clear();
        let mut kept = std::collections::BTreeSet::new();
        for attachment in &mut self.attachments {
            attachment.replaced.clear();
            for name in PROGRAMS {
                kept.insert(std::ffi::OsString::from(format!(
                    "link-{}-{name}",
                    attachment.id
                )));
            }
        }
        if let Some(dir) = &self.pin_dir {
            let stale: Vec<PathBuf> = pin_files(dir)
                .into_iter()
                .filter(|name| name.to_string_lossy().starts_with("link-") && !kept.contains(name))
                .map(|name| dir.join(name))
                .collect();
            if !stale.is_empty() {
                info!(
                    links = stale.len(),
                    "removed the links of cgroups no longer in scope"
                );
            }
            remove_pins(&stale);
        }
        Ok(())
    }

    /// Removes the pid identities that this engine does not watch: those of
    /// the previous run that were not registered again (their processes may
    /// be gone, and their pids someone else's).
    fn purge_pids(&mut self) -> Result<(), Error> {
        let name = map_names::SERVICE_BY_PID;
        let stale: Vec<u32> = {
            let map = self.hash::<u32, Plain<connredir_abi::connredir_pid_identity>>(name)?;
            map.keys().filter_map(Result::ok).collect()
        };
        let stale: Vec<u32> = stale
            .into_iter()
            .filter(|p| !self.pids.is_live(*p))
            .collect();
        let mut map = self.hash::<u32, Plain<connredir_abi::connredir_pid_identity>>(name)?;
        for pid in stale {
            match map.remove(&pid) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(name)(e)),
            }
        }
        Ok(())
    }

    /// Removes entries of an identity or address map that point at a
    /// service this engine has not registered.
    fn purge<K: Pod>(&mut self, name: &'static str) -> Result<(), Error> {
        let live: Vec<u32> = self.services.keys().map(|id| id.0).collect();
        let mut map = self.hash::<K, u32>(name)?;
        let stale: Vec<K> = map
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, id)| !live.contains(id))
            .map(|(k, _)| k)
            .collect();
        for key in stale {
            map.remove(&key).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Replaces every rule with `rules`, in one step: each connect sees
    /// either the whole old rule set or the whole new one.
    pub fn replace_rules(&mut self, rules: Vec<Rule>) -> Result<Vec<RuleId>, Error> {
        for rule in &rules {
            rule.validate()?;
            if !self.services.contains_key(&rule.service) {
                return Err(Error::InvalidRule(format!(
                    "it names {}, which is not registered",
                    rule.service
                )));
            }
        }
        let ids: Vec<RuleId> = (0..rules.len() as u32)
            .map(|i| RuleId(self.next_rule + i))
            .collect();
        let old = std::mem::replace(&mut self.rules, ids.iter().copied().zip(rules).collect());
        if let Err(e) = self.sync_rules() {
            self.rules = old;
            return Err(e);
        }
        self.next_rule += ids.len() as u32;
        Ok(ids)
    }

    /// Removes a rule.
    pub fn remove_rule(&mut self, id: RuleId) -> Result<Rule, Error> {
        let rule = self.rules.remove(&id).ok_or(Error::UnknownRule(id.0))?;
        if let Err(e) = self.sync_rules() {
            self.rules.insert(id, rule);
            return Err(e);
        }
        // Its hit count goes with it (ids are not reused within an engine).
        if let Ok(mut hits) = aya::maps::PerCpuHashMap::<&mut MapData, u32, u64>::try_from(
            self.bpf
                .map_mut(map_names::RULE_HITS)
                .expect("checked at load"),
        ) {
            let _ = hits.remove(&id.0);
        }
        Ok(rule)
    }

    /// The rules, by id.
    pub fn rules(&self) -> impl Iterator<Item = (RuleId, &Rule)> {
        self.rules.iter().map(|(id, r)| (*id, r))
    }

    /// Compiles the rules and applies them all at once: the new set is
    /// written under the inactive generation of the trie (only the prefixes
    /// that differ from what that generation held), then `rules_active` is
    /// flipped. A connect sees the old rule set or the new one, never a mix.
    fn sync_rules(&mut self) -> Result<(), Error> {
        let compiled = rules::compile(self.rules.iter().map(|(id, r)| (*id, r)))?;
        let target = 1 - self.rules_generation;
        // A connect that read the flag just before the last flip may still be
        // reading `target`; connect programs run for microseconds.
        if let Some(flipped) = self.rules_flipped_at {
            let grace = std::time::Duration::from_millis(20);
            if let Some(left) = grace.checked_sub(flipped.elapsed()) {
                std::thread::sleep(left);
            }
        }
        let previous = std::mem::take(&mut self.installed[target as usize]);
        let written = self
            .write_generation(target, &previous, &compiled)
            .and_then(|()| self.set_rules_generation(target));
        if let Err(e) = written {
            // `target` is inactive and half written: empty it so that what it
            // holds is known again.
            let _ = self.write_generation(target, &previous, &CompiledRules::new());
            return Err(e);
        }
        debug!(
            generation = target,
            prefixes = compiled.len(),
            rules = self.rules.len(),
            "rules applied"
        );
        self.installed[target as usize] = compiled;
        self.rules_generation = target;
        self.rules_flipped_at = Some(std::time::Instant::now());
        Ok(())
    }

    /// Turns generation `generation` of the trie from `from` into `to`.
    fn write_generation(
        &mut self,
        generation: u8,
        from: &CompiledRules,
        to: &CompiledRules,
    ) -> Result<(), Error> {
        let mut trie = self.trie()?;
        let key = |prefix| {
            let (len, data) = rules::trie_key(generation, prefix);
            Key::new(len, data)
        };
        for (prefix, set) in to {
            if from.get(prefix) != Some(set) {
                trie.insert(&key(prefix), Plain(*set), 0)
                    .map_err(map_err(map_names::RULES))?;
            }
        }
        for prefix in from.keys().filter(|p| !to.contains_key(*p)) {
            trie.remove(&key(prefix))
                .map_err(map_err(map_names::RULES))?;
        }
        Ok(())
    }

    fn set_rules_generation(&mut self, generation: u8) -> Result<(), Error> {
        let name = map_names::RULES_ACTIVE;
        let mut active: Array<&mut MapData, u32> =
            Array::try_from(self.bpf.map_mut(name).expect("checked at load"))
                .map_err(map_err(name))?;
        active
            .set(0, u32::from(generation), 0)
            .map_err(map_err(name))
    }

    /// Redirects per rule since the rule was added.
    pub fn rule_hits(&self) -> Result<BTreeMap<RuleId, u64>, Error> {
        let name = map_names::RULE_HITS;
        let map = self.bpf.map(name).expect("checked at load");
        let hits =
            aya::maps::PerCpuHashMap::<&MapData, u32, u64>::try_from(map).map_err(map_err(name))?;
        let mut out: BTreeMap<RuleId, u64> = self.rules.keys().map(|id| (*id, 0)).collect();
        for entry in hits.iter() {
            let (id, values) = entry.map_err(map_err(name))?;
            if let Some(count) = out.get_mut(&RuleId(id)) {
                *count = values.iter().sum();
            }
        }
        Ok(out)
    }

    /// Reads the counters.
    pub fn counters(&self) -> Result<Counters, Error> {
        let name = map_names::COUNTERS;
        let map = self.bpf.map(name).expect("checked at load");
        let array = PerCpuArray::<&MapData, u64>::try_from(map).map_err(map_err(name))?;
        let read = |index: u32| -> Result<u64, Error> {
            Ok(array.get(&index, 0).map_err(map_err(name))?.iter().sum())
        };
        use connredir_abi::*;
        Ok(Counters {
            redirects: read(CONNREDIR_CNT_REDIRECTS)?,
            loops_prevented: read(CONNREDIR_CNT_LOOPS_PREVENTED)?,
            hop_limit: read(CONNREDIR_CNT_HOP_LIMIT)?,
            handoffs: read(CONNREDIR_CNT_HANDOFFS)?,
            handoff_misses: read(CONNREDIR_CNT_HANDOFF_MISSES)?,
            denied_sets: read(CONNREDIR_CNT_DENIED_SETS)?,
            records_set: read(CONNREDIR_CNT_RECORDS_SET)?,
            original_dst_answered: read(CONNREDIR_CNT_ORIGINAL_DST_ANSWERED)?,
            records_inherited: read(CONNREDIR_CNT_RECORDS_INHERITED)?,
            conns_untracked: read(CONNREDIR_CNT_CONNS_UNTRACKED)?,
            trace_lost: read(CONNREDIR_CNT_TRACE_LOST)?,
            accel_joined: read(CONNREDIR_CNT_ACCEL_JOINED)?,
            accel_passed: read(CONNREDIR_CNT_ACCEL_PASSED)?,
            accel_sends: read(CONNREDIR_CNT_ACCEL_SENDS)?,
            cut_throughs: read(CONNREDIR_CNT_CUT_THROUGHS)?,
            cut_through_sends: read(CONNREDIR_CNT_CUT_THROUGH_SENDS)?,
            failed_closed: read(CONNREDIR_CNT_FAILED_CLOSED)?,
            service_down_blocked: read(CONNREDIR_CNT_SERVICE_DOWN_BLOCKED)?,
            service_down_bypassed: read(CONNREDIR_CNT_SERVICE_DOWN_BYPASSED)?,
            binds_refused: read(CONNREDIR_CNT_BINDS_REFUSED)?,
            self_loops: read(CONNREDIR_CNT_SELF_LOOPS)?,
            forged_records: read(CONNREDIR_CNT_FORGED_RECORDS)?,
        })
    }

    /// Number of records waiting in the hand-off map (connections redirected
    /// whose service has not accepted them yet).
    pub fn pending_handoffs(&self) -> Result<usize, Error> {
        let name = map_names::HANDOFF;
        let map = self.bpf.map(name).expect("checked at load");
        let handoff =
            HashMap::<&MapData, Plain<connredir_handoff_key>, Plain<connredir_record>>::try_from(
                map,
            )
            .map_err(map_err(name))?;
        Ok(handoff.keys().count())
    }

    fn hash<K: Pod, V: Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, K, V>, Error> {
        let map = self.bpf.map_mut(name).expect("checked at load");
        HashMap::try_from(map).map_err(map_err(name))
    }

    fn services_map(&mut self) -> Result<Array<&mut MapData, Plain<connredir_service>>, Error> {
        let name = map_names::SERVICES;
        Array::try_from(self.bpf.map_mut(name).expect("checked at load")).map_err(map_err(name))
    }

    fn trie(
        &mut self,
    ) -> Result<LpmTrie<&mut MapData, TrieData, Plain<connredir_rule_set>>, Error> {
        let name = map_names::RULES;
        LpmTrie::try_from(self.bpf.map_mut(name).expect("checked at load")).map_err(map_err(name))
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(previous) = self.previous.take() {
            self.roll_back(previous);
        }
        if let Some(program) = self.accel_before.take() {
            // The earlier run's acceleration program, back on its map.
            let name = map_names::ACCEL_SOCKS;
            if let Some(map) = self.bpf.map(name) {
                if let Ok(socks) = aya::maps::SockHash::<
                    &MapData,
                    Plain<connredir_abi::connredir_pair_key>,
                >::try_from(map)
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
        // Closing our link descriptors detaches unpinned links; pinned ones
        // stay until `Engine::remove_pinned`.
        for attachment in std::mem::take(&mut self.attachments) {
            if self.pin_dir.is_none() {
                info!(cgroup = %attachment.path.display(), "programs detached");
            }
        }
    }
}

/// Makes sure bpffs is mounted at `path` (usually /sys/fs/bpf), mounting it
/// when it is not.
pub fn ensure_bpffs(path: &Path) -> Result<(), Error> {
    Ok(connredir_host::bpffs::ensure_bpffs(path)?)
}

/// Removes pin files (missing ones are fine).
fn remove_pins(pins: &[PathBuf]) {
    for pin in pins {
        if let Err(e) = std::fs::remove_file(pin) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(pin = %pin.display(), error = %e, "cannot remove pin");
            }
        }
    }
}

fn program_mut<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = bpf.program_mut(name).ok_or(Error::Program {
        name,
        source: ProgramError::UnexpectedProgramType,
    })?;
    program.try_into().map_err(program_err(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_error(errno: i32, log: &str) -> Error {
        program_err("connredir_connect4")(ProgramError::LoadError {
            io_error: std::io::Error::from_raw_os_error(errno),
            verifier_log: aya_obj::VerifierLog::new(log.into()),
        })
    }

    #[test]
    fn a_verifier_rejection_shows_the_end_of_its_log() {
        let log: String = (1..=40).map(|i| format!("{i}: insn\n")).collect::<String>()
            + "R1 invalid mem access 'scalar'\nprocessed 9 insns\n";
        let text = load_error(libc::EACCES, &log).to_string();
        assert!(text.starts_with(
            "the kernel's verifier rejected program connredir_connect4 (Permission denied (os error 13)); its last words:\n  31: insn\n"
        ), "{text}");
        assert!(text.contains("  R1 invalid mem access 'scalar'\n  processed 9 insns\n"));
        assert!(!text.contains("30: insn"), "{text}");
    }

    #[test]
    fn a_kernel_without_the_hook_is_named_as_such() {
        let text = load_error(libc::EINVAL, "").to_string();
        assert!(
            text.contains("connredir needs Linux 5.18 or later"),
            "{text}"
        );
    }
}
