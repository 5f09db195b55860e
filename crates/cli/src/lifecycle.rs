//! `connredir up` and `connredir down`: the engine as a long-running service.
//!
//! `up` pins its maps and links in bpffs, so stopping or restarting it does
//! not drop redirected connections, and a new `up` takes over without a
//! moment in which rules are missing. `down` removes what `up` pinned and
//! attached, and nothing else. A lock file keeps two `up`s from running.
//!
//! A scope cgroup that does not exist is created by `up`, which records it
//! (path and cgroup id) in the state directory; `down` removes the recorded
//! ones that are still the same cgroup and empty, and never any other.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use connredir_engine::{ensure_bpffs, Engine};
use serde::{Deserialize, Serialize};
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::info;

use crate::config::Config;
use crate::control;

/// What the engine loop of `up` reacts to.
enum Event {
    Request(control::Pending),
    Stop(i32),
    /// Once a second: look for services' listeners the kernel did not see
    /// bound (see `Engine::mark_new_listeners`).
    Tick,
}

/// Where `up` keeps its state.
#[derive(Debug, Clone, clap::Args)]
pub struct Places {
    /// bpffs directory for the pinned maps and links.
    #[arg(long, global = true, default_value = "/sys/fs/bpf/connredir")]
    pub pin_dir: PathBuf,
    /// Directory for the lock file and the control socket of `up`.
    #[arg(long, global = true, default_value = "/run/connredir")]
    pub state_dir: PathBuf,
}

/// The lock held by a running `up`.
struct Lock {
    file: File,
}

impl Lock {
    /// Takes the lock, or says which process holds it.
    fn take(state_dir: &Path) -> Result<Lock> {
        state_dir_ready(state_dir)?;
        let path = state_dir.join("lock");
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let pid = holder(&mut file).map_or("unknown".into(), |p| p.to_string());
            bail!(
                "connredir is already running (pid {pid}, lock {}): stop it first, or use `connredir down`",
                path.display()
            );
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())?;
        file.flush()?;
        Ok(Lock { file })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
    }
}

/// Makes the state directory (root's, mode 0755: the control socket's own
/// mode says who may use it), or checks that an existing one is root's and
/// writable by root only, since the lock and the control socket live there.
fn state_dir_ready(state_dir: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !state_dir.exists() {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        std::fs::set_permissions(state_dir, std::fs::Permissions::from_mode(0o755))?;
    }
    let meta = std::fs::metadata(state_dir)
        .with_context(|| format!("cannot read {}", state_dir.display()))?;
    if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        bail!(
            "{} must be a directory of root's that only root can write to (it holds the lock \
             and the control socket); it is owned by uid {} with mode {:o}",
            state_dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// The pid written in a lock file.
fn holder(file: &mut File) -> Option<i32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// The file in the state directory that lists the scope cgroups `up`
/// created.
const CREATED_FILE: &str = "created-cgroups.json";

/// A cgroup `up` created: its path, and its id (inode), so that a cgroup
/// someone made again at the same path is not taken for ours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CreatedCgroup {
    path: PathBuf,
    id: u64,
}

/// The cgroups recorded in `state_dir` (none when the file is absent).
fn created_cgroups(state_dir: &Path) -> Vec<CreatedCgroup> {
    std::fs::read(state_dir.join(CREATED_FILE))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// Writes the record (removes the file when it lists nothing), replacing
/// it in one step.
fn record_created(state_dir: &Path, cgroups: &[CreatedCgroup]) -> Result<()> {
    let path = state_dir.join(CREATED_FILE);
    if cgroups.is_empty() {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", path.display()))
            }
            _ => return Ok(()),
        }
    }
    let partial = path.with_extension("partial");
    std::fs::write(&partial, serde_json::to_vec_pretty(cgroups)?)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, &path).with_context(|| format!("cannot write {}", path.display()))
}

/// Whether `up` may create `cgroup`: a plain path strictly below the
/// cgroup v2 root `root` (no `.` or `..` to step out of it).
pub fn creatable_below(cgroup: &Path, root: &Path) -> bool {
    use std::path::Component;
    cgroup != root
        && cgroup.starts_with(root)
        && cgroup
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}

/// The scope cgroups this `up` created; unless [`ScopeCreated::keep`] is
/// called (the layer is up), dropping it removes them again and takes them
/// off the record, so a failed `up` leaves no cgroup behind either.
struct ScopeCreated {
    state_dir: PathBuf,
    made: Vec<CreatedCgroup>,
    keep: bool,
}

impl ScopeCreated {
    /// Creates the configuration's scope cgroups that do not exist (and
    /// their missing parents, below the cgroup v2 root), records each in
    /// the state directory before going on, and says so in the log.
    fn create(config: &Config, state_dir: &Path) -> Result<ScopeCreated> {
        let mut created = ScopeCreated {
            state_dir: state_dir.to_owned(),
            made: Vec::new(),
            keep: false,
        };
        let missing: Vec<&PathBuf> = config
            .scope
            .cgroups
            .iter()
            .filter(|c| !c.exists())
            .collect();
        if missing.is_empty() {
            return Ok(created);
        }
        let root = connredir_host::cgroup::cgroup2_root().context(
            "cgroup v2 is not mounted (connredir needs the unified hierarchy, usually at /sys/fs/cgroup)",
        )?;
        let mut record = created_cgroups(state_dir);
        for cgroup in missing {
            if !creatable_below(cgroup, &root) {
                bail!(
                    "scope cgroup {} does not exist, and connredir creates scope cgroups only \
                     below the cgroup v2 root {}: create it, or name one below {}",
                    cgroup.display(),
                    root.display(),
                    root.display()
                );
            }
            // Parents first, so each missing level is recorded and removed.
            let mut levels: Vec<&Path> = cgroup
                .ancestors()
                .take_while(|p| *p != root.as_path())
                .filter(|p| !p.exists())
                .collect();
            levels.reverse();
            for level in levels {
                std::fs::create_dir(level).with_context(|| {
                    format!("cannot create the scope cgroup {}", level.display())
                })?;
                let id = connredir_host::cgroup::cgroup_id(level)?;
                let made = CreatedCgroup {
                    path: level.to_owned(),
                    id,
                };
                created.made.push(made.clone());
                record.push(made);
                record_created(state_dir, &record)?;
                info!(
                    cgroup = %level.display(),
                    "created the scope cgroup, which did not exist; `connredir down` removes it while empty"
                );
            }
        }
        Ok(created)
    }

    /// The layer is up: the cgroups stay (until `down`).
    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for ScopeCreated {
    fn drop(&mut self) {
        if self.keep || self.made.is_empty() {
            return;
        }
        let removed: Vec<&CreatedCgroup> = self
            .made
            .iter()
            .rev()
            .filter(|c| std::fs::remove_dir(&c.path).is_ok())
            .collect();
        let record: Vec<CreatedCgroup> = created_cgroups(&self.state_dir)
            .into_iter()
            .filter(|c| !removed.contains(&c))
            .collect();
        let _ = record_created(&self.state_dir, &record);
    }
}

/// After the layer is down: removes the scope cgroups `up` created that are
/// still the cgroup it created (same id) and empty, deepest first; keeps
/// the others on the record. Returns the removed paths.
fn remove_created(state_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut record = created_cgroups(state_dir);
    // Deepest first: a child's removal lets its parent go.
    record.sort_by_key(|c| std::cmp::Reverse(c.path.components().count()));
    let mut kept = Vec::new();
    let mut removed = Vec::new();
    for cgroup in record {
        match connredir_host::cgroup::cgroup_id(&cgroup.path) {
            // Gone, or someone else's cgroup now: not ours to keep or remove.
            Err(_) => continue,
            Ok(id) if id != cgroup.id => continue,
            Ok(_) => {}
        }
        match std::fs::remove_dir(&cgroup.path) {
            Ok(()) => {
                info!(cgroup = %cgroup.path.display(), "removed the scope cgroup `connredir up` created");
                removed.push(cgroup.path);
            }
            Err(e) => {
                // Processes or child cgroups inside: someone uses it now.
                tracing::warn!(
                    cgroup = %cgroup.path.display(),
                    error = %e,
                    "kept the scope cgroup `connredir up` created: it is not empty"
                );
                kept.push(cgroup);
            }
        }
    }
    record_created(state_dir, &kept)?;
    Ok(removed)
}

/// Applies the configuration to an engine (fresh or taking over).
fn apply(engine: &mut Engine, config: &Config) -> Result<()> {
    for cgroup in config.scope.resolve()? {
        engine.attach(cgroup)?;
    }
    for service in config.services() {
        engine.add_service(service)?;
    }
    // All rules in one step: connects see the old set or the new one.
    let rules = config.rules(|name| engine.service_by_name(name))?;
    engine.replace_rules(rules)?;
    engine.finish_takeover()?;
    Ok(())
}

/// `connredir up`; `metrics`: where to serve the Prometheus endpoint;
/// `control_group`: who besides root may use the control socket (overrides
/// the configuration's `[control] group`).
///
/// A failed `up` leaves nothing behind: what can fail without touching the
/// layer (the group, the lock, the control socket, the metrics address) is
/// done first, and a failure while attaching or registering rolls the
/// engine back to what the previous run left, or to nothing.
pub fn up(
    config: &Config,
    places: &Places,
    metrics: Option<std::net::SocketAddr>,
    control_group: Option<&str>,
) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(connredir_engine::Error::NotRoot.into());
    }
    let access = control::Access::new(control_group.or(config.control.group.as_deref()))?;
    let _lock = Lock::take(&places.state_dir)?;
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot install signal handlers")?;
    let control = control::ControlSocket::bind(&places.state_dir, access)?;
    let metrics = metrics.map(crate::metrics::Endpoint::bind).transpose()?;
    if let Some(bpffs) = places.pin_dir.parent() {
        ensure_bpffs(bpffs)?;
    }
    let scope_created = ScopeCreated::create(config, &places.state_dir)?;
    let fresh = !places.pin_dir.exists();
    // Both undo themselves on failure: load_pinned removes what it pinned,
    // and an engine dropped before its takeover is finished restores the
    // previous run's links, services and rules and removes its own.
    let loaded = Engine::load_pinned(&places.pin_dir).map_err(anyhow::Error::from);
    let mut engine = match loaded.and_then(|mut engine| apply(&mut engine, config).map(|()| engine))
    {
        Ok(engine) => engine,
        Err(e) => {
            if fresh {
                // Nothing of an earlier run to keep: leave nothing behind.
                Engine::remove_pinned(&places.pin_dir)?;
            }
            return Err(e);
        }
    };
    scope_created.keep();
    info!(
        services = engine.services().count(),
        rules = engine.rules().count(),
        pins = %places.pin_dir.display(),
        "redirect layer up{}",
        if fresh { "" } else { " (took over the previous run)" }
    );
    // One queue for the engine: requests from the control socket, and the
    // signal that ends the run. The engine is only touched here.
    let (queue, events) = mpsc::channel::<Event>();
    let (requests, pending) = mpsc::channel::<control::Pending>();
    let names = control::ServiceNames::default();
    names.refresh(&engine);
    let trace = trace_feed(&mut engine, names.clone());
    control.serve(requests.clone(), trace);
    if let Some(metrics) = metrics {
        metrics.serve(requests);
    }
    let forward = queue.clone();
    std::thread::spawn(move || {
        for pending in pending {
            if forward.send(Event::Request(pending)).is_err() {
                break;
            }
        }
    });
    let ticks = queue.clone();
    std::thread::spawn(move || {
        while ticks.send(Event::Tick).is_ok() {
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let _ = queue.send(Event::Stop(signal));
        }
    });
    for event in events {
        match event {
            Event::Request((request, reply)) => {
                match request {
                    // Reads (status, scrapes) are frequent: keep them out of the log.
                    control::Request::Status | control::Request::Conns => {
                        tracing::debug!(?request, "control request")
                    }
                    _ => info!(?request, "control request"),
                }
                let _ = reply.send(control::handle(&mut engine, request));
                names.refresh(&engine);
            }
            Event::Tick => engine.mark_new_listeners(),
            Event::Stop(signal) => {
                info!(
                    signal,
                    "stopping; the redirect layer stays attached (`connredir down` removes it)"
                );
                break;
            }
        }
    }
    let _ = std::fs::remove_file(control::socket_path(&places.state_dir));
    Ok(())
}

/// The trace hub around the engine's ring buffer, as the control socket
/// subscribes to it; service names are read from `names`, which the engine
/// thread keeps current.
fn trace_feed(engine: &mut Engine, names: control::ServiceNames) -> Option<control::TraceFeed> {
    let tracer = match engine.tracer() {
        Ok(tracer) => tracer,
        Err(e) => {
            tracing::warn!(error = %e, "no trace: `connredir trace` will not work");
            return None;
        }
    };
    let rules = names.clone();
    let hub = crate::trace::Hub::start(tracer, move |id| names.get(id), move |id| rules.rule(id));
    Some(std::sync::Arc::new(move || hub.subscribe()))
}

/// `connredir down`: stops a running `up`, then removes the pins, which
/// detaches the programs.
pub fn down(places: &Places) -> Result<()> {
    let lock = places.state_dir.join("lock");
    if let Ok(mut file) = File::open(&lock) {
        // SAFETY: flock on a descriptor we own.
        let held = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
        if held {
            if let Some(pid) = holder(&mut file) {
                info!(pid, "stopping the running `connredir up`");
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            // Its link descriptors keep the programs attached until it exits.
            let deadline = Instant::now() + Duration::from_secs(10);
            // SAFETY: as above.
            while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                if Instant::now() > deadline {
                    bail!("the running `connredir up` did not stop within 10 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    let removed = Engine::remove_pinned(&places.pin_dir)?;
    println!(
        "connredir is down: removed {removed} pinned maps and links from {}",
        places.pin_dir.display()
    );
    for cgroup in remove_created(&places.state_dir)? {
        println!(
            "removed the scope cgroup {} (created by `connredir up`)",
            cgroup.display()
        );
    }
    Ok(())
}
