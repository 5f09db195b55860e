//! The service registry: the services' entries in the maps (by id, by
//! identity, by address), the ids kept across a restart, and the marks on
//! their own listening sockets.

pub(crate) mod listeners;
pub(crate) mod liveness;
mod service;

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{Array, MapData, SkStorage};
use connredir_abi::{
    connredir_addr_key, connredir_listener, connredir_service, map_names, CONNREDIR_MAX_SERVICES,
    CONNREDIR_SERVICE_TRANSPARENT,
};
use connredir_host::cgroup::cgroup_id;
use tracing::{debug, info};

pub use service::{Identity, OnDown, Service, ServiceId};

use crate::{map_err, Engine, Error};

/// What the engine wrote to the maps for one service, to undo it exactly.
pub(crate) struct Registered {
    service: Service,
    cgroup_ids: Vec<u64>,
}

/// Registers a service and returns its id.
pub(crate) fn add_service(engine: &mut Engine, service: Service) -> Result<ServiceId, Error> {
    let value = service.to_kernel()?;
    if engine
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
    let previous = engine
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
                .find(|id| !engine.services.contains_key(id) && !engine.adopted.contains_key(id))
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
    check_identity_free(engine, &service, &cgroup_ids)?;

    let registered = Registered {
        service,
        cgroup_ids,
    };
    if let Err(e) = write_service(engine, id, &registered, &value) {
        erase_service(engine, id, &registered);
        return Err(e);
    }
    engine.adopted.remove(&id);
    mark_existing_listeners(engine, id, &registered.service);
    info!(%id, name = %registered.service.name, "service registered");
    engine.services.insert(id, registered);
    Ok(id)
}

/// Marks the service's own listeners that were opened before it was
/// registered (see `listeners`); later binds are marked by the kernel.
fn mark_existing_listeners(engine: &mut Engine, id: ServiceId, service: &Service) {
    let inodes: BTreeSet<u64> = service
        .listen
        .iter()
        .flat_map(listeners::listening_inodes)
        .collect();
    mark_listeners(
        engine,
        id,
        service,
        &inodes.iter().copied().collect::<Vec<_>>(),
    );
    engine.listener_inodes.insert(id, inodes);
}

/// Marks the services' own listeners that appeared since the last look
/// (a proxy outside the attached cgroups, whose bind the kernel did not
/// see, or one that bound before its service was registered and
/// listened after): `connredir up` calls it every second. Cheap when
/// nothing changed: it reads `/proc/net/tcp{,6}` and `udp{,6}` and looks
/// for the holders of a listening socket only when one is new.
pub(crate) fn mark_new_listeners(engine: &mut Engine) {
    let services: Vec<(ServiceId, Service)> = engine
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
        let seen = engine.listener_inodes.entry(id).or_default();
        let new: Vec<u64> = now.difference(seen).copied().collect();
        // Closed listeners are forgotten: an inode may come back.
        *seen = now;
        if !new.is_empty() {
            mark_listeners(engine, id, &service, &new);
        }
    }
}

/// Marks the listening sockets `inodes` held by `service`'s processes.
fn mark_listeners(engine: &mut Engine, id: ServiceId, service: &Service, inodes: &[u64]) {
    let name = map_names::LISTENERS;
    let Some(map) = engine.bpf.map_mut(name) else {
        return;
    };
    let Ok(mut storage) = SkStorage::<&mut MapData, connredir_listener>::try_from(map) else {
        return;
    };
    for (socket, pid) in listeners::own_listeners(inodes, &service.identity) {
        // The holder's start time, as the bind program notes the binder's
        // (low 32 bits of its clock ticks): a process given the pid later
        // is not it. Unreadable, the process is gone: no process matches 0.
        let start_ticks = connredir_host::procfs::start_ticks(pid).unwrap_or(0) as u32;
        let mark = connredir_listener {
            service_id: id.0,
            tgid: pid,
            start_ticks,
            ..Default::default()
        };
        if engine.previous.is_some() {
            // A takeover that is undone gives the listener its old mark.
            let before = storage.get(&socket, 0).ok();
            match socket.try_clone() {
                Ok(held) => engine.remarked.push((held, before)),
                Err(e) => debug!(%id, pid, "cannot keep a listener to restore: {e}"),
            }
        }
        match storage.insert(&socket, mark, 0) {
            Ok(()) => debug!(%id, pid, "marked a listener opened before registration"),
            Err(e) => debug!(%id, pid, "cannot mark a listener: {e}"),
        }
    }
}

/// Refuses a service whose listening address or identity (a live pid, a
/// uid, a cgroup) is already another registered service's.
fn check_identity_free(
    engine: &Engine,
    service: &Service,
    cgroup_ids: &[u64],
) -> Result<(), Error> {
    check_free_among(&engine.services, service, cgroup_ids, |pid| {
        engine.pids.is_live(pid)
    })
}

/// [`check_identity_free`] against `registered`, with `is_live` telling
/// whether a pid's process still runs.
fn check_free_among(
    registered: &BTreeMap<ServiceId, Registered>,
    service: &Service,
    cgroup_ids: &[u64],
    is_live: impl Fn(u32) -> bool,
) -> Result<(), Error> {
    for (other_id, other) in registered {
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
            .find(|p| other.service.identity.pids.contains(p) && is_live(**p))
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
    Ok(())
}

fn write_service(
    engine: &mut Engine,
    id: ServiceId,
    r: &Registered,
    value: &connredir_service,
) -> Result<(), Error> {
    // Each pid for as long as its process lives (none: an error).
    for pid in &r.service.identity.pids {
        engine.pids.register(*pid, id.0)?;
    }
    let mut by_uid = engine.hash::<u32, u32>(map_names::SERVICE_BY_UID)?;
    for uid in &r.service.identity.uids {
        by_uid
            .insert(uid, id.0, 0)
            .map_err(map_err(map_names::SERVICE_BY_UID))?;
    }
    let mut by_cgroup = engine.hash::<u64, u32>(map_names::SERVICE_BY_CGROUP)?;
    for cg in &r.cgroup_ids {
        by_cgroup
            .insert(cg, id.0, 0)
            .map_err(map_err(map_names::SERVICE_BY_CGROUP))?;
    }
    let mut addrs = engine.hash::<connredir_addr_key, u32>(map_names::SERVICE_ADDRS)?;
    for addr in &r.service.listen {
        let key = connredir_addr_key::from_socket_addr(addr);
        addrs
            .insert(key, id.0, 0)
            .map_err(map_err(map_names::SERVICE_ADDRS))?;
    }
    set_services(engine, &[(id.0, *value)])
}

/// Whether a `services` entry makes the getsockname programs work.
fn is_transparent(value: &connredir_service) -> bool {
    value.flags & CONNREDIR_SERVICE_TRANSPARENT != 0
}

/// The ids of the `services` entries that are transparent now.
fn transparent_ids(engine: &mut Engine) -> Result<BTreeSet<u32>, Error> {
    let services = engine.services_map()?;
    let mut ids = BTreeSet::new();
    for id in 0..CONNREDIR_MAX_SERVICES {
        let value = services.get(&id, 0).map_err(map_err(map_names::SERVICES))?;
        if is_transparent(&value) {
            ids.insert(id);
        }
    }
    Ok(ids)
}

/// Writes the transparent count (maps.h: the getsockname programs return
/// at once while it is 0).
fn write_transparent_count(engine: &mut Engine, count: usize) -> Result<(), Error> {
    let name = map_names::TRANSPARENT_COUNT;
    let mut map =
        Array::<&mut MapData, u32>::try_from(engine.bpf.map_mut(name).expect("checked at load"))
            .map_err(map_err(name))?;
    let count = u32::try_from(count).unwrap_or(u32::MAX);
    map.set(0, count, 0).map_err(map_err(name))
}

/// Sets the transparent count to what the `services` array holds: after a
/// takeover of pinned maps (an earlier layer may have kept no count, or
/// another), before the programs that read it are attached.
pub(crate) fn count_transparent(engine: &mut Engine) -> Result<(), Error> {
    let count = transparent_ids(engine)?.len();
    write_transparent_count(engine, count)
}

/// Writes entries of the `services` array, the only way the engine does:
/// the transparent count that gates the getsockname programs must never
/// be below the number of transparent entries, or a transparent service's
/// accepted socket would name the service's own address. So the count
/// first covers both what the array holds and what it is about to hold,
/// and only once the entries are written is it set to what it holds.
pub(crate) fn set_services(
    engine: &mut Engine,
    entries: &[(u32, connredir_service)],
) -> Result<(), Error> {
    let mut during = transparent_ids(engine)?;
    during.extend(
        entries
            .iter()
            .filter(|(_, value)| is_transparent(value))
            .map(|(id, _)| *id),
    );
    write_transparent_count(engine, during.len())?;
    let written = (|| {
        let mut services = engine.services_map()?;
        for (id, value) in entries {
            services
                .set(*id, *value, 0)
                .map_err(map_err(map_names::SERVICES))?;
        }
        Ok(())
    })();
    // After a failed write too: the count stays at or above the truth
    // whichever entries were written.
    let counted = count_transparent(engine);
    written.and(counted)
}

/// Removes every map entry of a service (missing entries are fine).
fn erase_service(engine: &mut Engine, id: ServiceId, r: &Registered) {
    let _ = set_services(engine, &[(id.0, connredir_service::default())]);
    for pid in &r.service.identity.pids {
        engine.pids.unregister(*pid, id.0);
    }
    if let Ok(mut m) = engine.hash::<u32, u32>(map_names::SERVICE_BY_UID) {
        r.service
            .identity
            .uids
            .iter()
            .for_each(|k| drop(m.remove(k)));
    }
    if let Ok(mut m) = engine.hash::<u64, u32>(map_names::SERVICE_BY_CGROUP) {
        r.cgroup_ids.iter().for_each(|k| drop(m.remove(k)));
    }
    if let Ok(mut m) = engine.hash::<connredir_addr_key, u32>(map_names::SERVICE_ADDRS) {
        for addr in &r.service.listen {
            let key = connredir_addr_key::from_socket_addr(addr);
            let _ = m.remove(&(key));
        }
    }
}

/// Unregisters a service. Its rules must be removed first.
pub(crate) fn remove_service(engine: &mut Engine, id: ServiceId) -> Result<Service, Error> {
    engine.listener_inodes.remove(&id);
    if !engine.services.contains_key(&id) {
        return Err(Error::UnknownService(id.0));
    }
    let rules: Vec<String> = engine
        .rules
        .iter()
        .filter(|(_, r)| r.services().any(|s| s == id))
        .map(|(rid, _)| rid.0.to_string())
        .collect();
    if !rules.is_empty() {
        return Err(Error::InvalidService(format!(
            "{id} still has rules {}: remove them first",
            rules.join(", ")
        )));
    }
    let registered = engine.services.remove(&id).expect("checked above");
    erase_service(engine, id, &registered);
    info!(%id, name = %registered.service.name, "service removed");
    Ok(registered.service)
}

/// The registered services.
pub(crate) fn services(engine: &Engine) -> impl Iterator<Item = (ServiceId, &Service)> {
    engine.services.iter().map(|(id, r)| (*id, &r.service))
}

/// Finds a service by name.
pub(crate) fn service_by_name(engine: &Engine, name: &str) -> Option<ServiceId> {
    engine
        .services()
        .find(|(_, s)| s.name == name)
        .map(|(id, _)| id)
}

/// Reads the services a previous run registered in pinned maps.
pub(crate) fn adopt_services(engine: &mut Engine) -> Result<(), Error> {
    let services = engine.services_map()?;
    let mut found = BTreeMap::new();
    for id in 1..CONNREDIR_MAX_SERVICES {
        let value = services.get(&id, 0).map_err(map_err(map_names::SERVICES))?;
        if value.flags & connredir_abi::CONNREDIR_SERVICE_ACTIVE != 0 {
            found.insert(ServiceId(id), value);
        }
    }
    engine.adopted = found;
    // The count an earlier layer kept (if any) is not trusted: these
    // programs are attached after this, and read it from the start.
    count_transparent(engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, listen: &[&str], uids: &[u32]) -> Service {
        Service {
            name: name.into(),
            listen: listen.iter().map(|a| a.parse().unwrap()).collect(),
            identity: Identity {
                uids: uids.to_vec(),
                ..Default::default()
            },
            context: None,
            own_connections_by_self: true,
            accelerate: false,
            transparent: false,
            on_down: OnDown::Block,
        }
    }

    fn registered(services: &[Service]) -> BTreeMap<ServiceId, Registered> {
        services
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let r = Registered {
                    service: s.clone(),
                    cgroup_ids: Vec::new(),
                };
                (ServiceId(i as u32 + 1), r)
            })
            .collect()
    }

    fn check(existing: &[Service], new: &Service) -> Result<(), Error> {
        check_free_among(&registered(existing), new, &[], |_| true)
    }

    #[test]
    fn an_address_another_service_listens_on_is_refused_once_with_what_to_do() {
        let a = service("a", &["127.0.0.1:8000", "[::1]:8000"], &[990]);
        let b = service("b", &["127.0.0.1:9000"], &[991]);
        let err = check(&[a, b], &service("c", &["[::1]:8000"], &[992]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid service c: address [::1]:8000 is already where a (service 1) listens; \
             give each service its own address"
        );
    }

    #[test]
    fn the_address_is_named_before_a_shared_identity() {
        let a = service("a", &["127.0.0.1:8000"], &[990]);
        let err = check(&[a], &service("c", &["127.0.0.1:8000"], &[990]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is already where a"), "{err}");
    }

    #[test]
    fn a_shared_uid_is_refused_and_distinct_services_pass() {
        let a = service("a", &["127.0.0.1:8000"], &[990]);
        let err = check(
            std::slice::from_ref(&a),
            &service("c", &["127.0.0.1:8001"], &[990]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("uid 990 is already the identity of a (service 1)"),
            "{err}"
        );
        check(&[a], &service("c", &["127.0.0.1:8001"], &[991])).unwrap();
    }
}
