//! Pinning in bpffs and takeover: a pinned engine reuses the maps and links
//! of an earlier run (after checking their layouts), keeps what it found to
//! put back if it fails, and removes what the earlier run had and it does
//! not once the takeover is finished.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use aya::maps::{MapData, MapError, SkStorage};
use aya::Pod;
use connredir_abi::{
    connredir_addr_key, connredir_listener, connredir_service, map_names, CONNREDIR_MAX_SERVICES,
};
use tracing::info;

use crate::attach::PROGRAMS;
use crate::rules::CompiledRules;
use crate::{map_err, Engine, Error};

/// What a pinned engine found when it started, to put back when it is
/// dropped before [`Engine::finish_takeover`]: a failed `up` leaves the
/// previous run's links, services and rules as they were, and nothing of
/// its own.
pub(crate) struct Previous {
    /// Whether the pin directory was there before.
    dir_existed: bool,
    /// The files in it then.
    files: BTreeSet<OsString>,
    services: Vec<connredir_service>,
    by_pid: Vec<(u32, connredir_abi::connredir_pid_identity)>,
    by_uid: Vec<(u32, u32)>,
    by_cgroup: Vec<(u64, u32)>,
    addrs: Vec<(connredir_addr_key, u32)>,
    rules_generation: u8,
    /// What the active generation of the rule trie held.
    rules: CompiledRules,
    /// Rule ids from here on were issued by this engine.
    next_rule: u32,
}

/// The files in a pin directory.
pub(crate) fn pin_files(dir: &Path) -> BTreeSet<OsString> {
    std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default()
}

/// Whether a file in a pin directory is one the engine makes.
fn is_ours(name: &OsStr) -> bool {
    let name = name.to_string_lossy();
    name.starts_with("link-") || map_names::ALL.contains(&name.as_ref())
}

/// Removes the engine's files in `dir` that are not in `keep`, and the
/// directory when it was not there before.
fn remove_new_pins(dir: &Path, keep: &BTreeSet<OsString>, dir_existed: bool) {
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

/// Removes pin files (missing ones are fine).
pub(crate) fn remove_pins(pins: &[PathBuf]) {
    for pin in pins {
        if let Err(e) = std::fs::remove_file(pin) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(pin = %pin.display(), error = %e, "cannot remove pin");
            }
        }
    }
}

/// Maps pinned by an earlier run are reused as they are, whatever their
/// layout: one pinned by a connredir whose ABI differs (a key without the
/// network namespace, say) would be read with the wrong sizes. Such a pin
/// directory is refused, saying what to do, before anything is reused.
pub(crate) fn check_pinned_layouts(dir: &Path) -> Result<(), Error> {
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

/// Makes sure bpffs is mounted at `path` (usually /sys/fs/bpf), mounting it
/// when it is not.
pub fn ensure_bpffs(path: &Path) -> Result<(), Error> {
    Ok(connredir_host::bpffs::ensure_bpffs(path)?)
}

/// Loads the kernel programs with their maps and links pinned in `dir`
/// (on bpffs), so they outlive this process: a later `load_pinned` of
/// the same directory takes over the maps and links without a moment
/// in which connections go unredirected. [`Engine::remove_pinned`]
/// removes it all.
pub(crate) fn load_pinned(dir: &Path) -> Result<Engine, Error> {
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
    let loaded = crate::load::load_with(Some(dir)).and_then(|mut engine| {
        crate::rules::sync::adopt_rules(&mut engine)?;
        crate::services::adopt_services(&mut engine)?;
        engine.previous = Some(snapshot(&mut engine, dir_existed, files.clone())?);
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
    engine: &mut Engine,
    dir_existed: bool,
    files: BTreeSet<OsString>,
) -> Result<Previous, Error> {
    let services = engine.services_map()?;
    let services = (0..CONNREDIR_MAX_SERVICES)
        .map(|id| services.get(&id, 0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err(map_names::SERVICES))?;
    Ok(Previous {
        dir_existed,
        files,
        services,
        by_pid: entries(engine, map_names::SERVICE_BY_PID)?,
        by_uid: entries(engine, map_names::SERVICE_BY_UID)?,
        by_cgroup: entries(engine, map_names::SERVICE_BY_CGROUP)?,
        addrs: entries(engine, map_names::SERVICE_ADDRS)?,
        rules_generation: engine.rules_generation,
        rules: engine.installed[usize::from(engine.rules_generation)].clone(),
        next_rule: engine.next_rule,
    })
}

/// Every entry of a hash map of service ids (or pid identities).
fn entries<K: Pod, V: Pod>(engine: &mut Engine, name: &'static str) -> Result<Vec<(K, V)>, Error> {
    engine
        .hash::<K, V>(name)?
        .iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err(name))
}

/// Makes a hash map of service ids (or pid identities) hold `entries`
/// and nothing else.
fn restore_entries<K: Pod + PartialEq, V: Pod>(
    engine: &mut Engine,
    name: &'static str,
    entries: &[(K, V)],
) -> Result<(), Error> {
    let mut map = engine.hash::<K, V>(name)?;
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
pub(crate) fn roll_back(engine: &mut Engine, previous: Previous) {
    for attachment in &mut engine.attachments {
        attachment.undo();
    }
    let restored = (|| -> Result<(), Error> {
        let entries: Vec<(u32, connredir_service)> =
            (0..).zip(previous.services.iter().copied()).collect();
        crate::services::set_services(engine, &entries)?;
        restore_entries(engine, map_names::SERVICE_BY_PID, &previous.by_pid)?;
        restore_entries(engine, map_names::SERVICE_BY_UID, &previous.by_uid)?;
        restore_entries(engine, map_names::SERVICE_BY_CGROUP, &previous.by_cgroup)?;
        restore_entries(engine, map_names::SERVICE_ADDRS, &previous.addrs)?;
        let generation = previous.rules_generation;
        let now = std::mem::take(&mut engine.installed[usize::from(generation)]);
        crate::rules::sync::write_generation(engine, generation, &now, &previous.rules)?;
        engine.installed[usize::from(generation)] = previous.rules.clone();
        crate::rules::sync::set_rules_generation(engine, generation)?;
        engine.rules_generation = generation;
        let name = map_names::RULE_HITS;
        let mut hits = aya::maps::PerCpuHashMap::<&mut MapData, u32, u64>::try_from(
            engine.bpf.map_mut(name).expect("checked at load"),
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
        let mut marks = SkStorage::<&mut MapData, connredir_listener>::try_from(
            engine.bpf.map_mut(name).expect("checked at load"),
        )
        .map_err(map_err(name))?;
        // Latest first, so a listener marked twice gets its first mark.
        for (socket, before) in engine.remarked.drain(..).rev() {
            let _ = match before {
                Some(mark) => marks.insert(&socket, mark, 0),
                None => marks.remove(&socket),
            };
        }
        Ok(())
    })();
    if let Err(e) = restored {
        tracing::warn!(error = %e, "cannot fully restore the previous run's maps");
    }
    if let Some(dir) = &engine.pin_dir {
        remove_new_pins(dir, &previous.files, previous.dir_existed);
    }
    info!("takeover undone: the previous run's layer is as it was");
}

/// Removes everything a pinned engine left in `dir`: its links (which
/// detaches the programs), its maps, and the directory. Files it did not
/// make are left alone.
pub(crate) fn remove_pinned(dir: &Path) -> Result<usize, Error> {
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

/// After a restart, once the configuration is registered again: removes
/// what the previous run registered and this one did not (services,
/// identities, addresses, hit counts of rules that are gone).
///
/// Until this succeeds, dropping a pinned engine undoes what it changed;
/// after it, the earlier run's links of cgroups this engine did not
/// attach are removed too.
pub(crate) fn finish_takeover(engine: &mut Engine) -> Result<(), Error> {
    for id in std::mem::take(&mut engine.adopted).into_keys() {
        crate::services::set_services(engine, &[(id.0, connredir_service::default())])?;
        info!(%id, "removed a service of the previous run");
    }
    purge_pids(engine)?;
    purge::<u32>(engine, map_names::SERVICE_BY_UID)?;
    purge::<u64>(engine, map_names::SERVICE_BY_CGROUP)?;
    purge::<connredir_addr_key>(engine, map_names::SERVICE_ADDRS)?;
    let live: Vec<u32> = engine.rules.keys().map(|id| id.0).collect();
    let name = map_names::RULE_HITS;
    let mut hits = aya::maps::PerCpuHashMap::<&mut MapData, u32, u64>::try_from(
        engine.bpf.map_mut(name).expect("checked at load"),
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
    engine.previous = None;
    engine.accel_before = None;
    engine.remarked.clear();
    let mut kept = BTreeSet::new();
    for attachment in &mut engine.attachments {
        attachment.replaced.clear();
        for name in PROGRAMS {
            kept.insert(OsString::from(format!("link-{}-{name}", attachment.id)));
        }
    }
    if let Some(dir) = &engine.pin_dir {
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
fn purge_pids(engine: &mut Engine) -> Result<(), Error> {
    let name = map_names::SERVICE_BY_PID;
    let stale: Vec<u32> = {
        let map = engine.hash::<u32, connredir_abi::connredir_pid_identity>(name)?;
        map.keys().filter_map(Result::ok).collect()
    };
    let stale: Vec<u32> = stale
        .into_iter()
        .filter(|p| !engine.pids.is_live(*p))
        .collect();
    let mut map = engine.hash::<u32, connredir_abi::connredir_pid_identity>(name)?;
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
fn purge<K: Pod>(engine: &mut Engine, name: &'static str) -> Result<(), Error> {
    let live: Vec<u32> = engine.services.keys().map(|id| id.0).collect();
    let mut map = engine.hash::<K, u32>(name)?;
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
