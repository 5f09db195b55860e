//! The side of `up`: the control socket, who may use it, and the engine's
//! answers to requests.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, RwLock};

use anyhow::{Context, Result};
use connredir_engine::{Action, Engine, OnDown, Protocol, Rule, RuleId, ServiceId};

use super::protocol::{
    Conn, Created, Pending, Reply, Request, Response, RuleStatus, ServiceStatus, Status, Streaming,
    TraceMessage,
};
use super::{refusal, socket_path};
use crate::config::OnDownConfig;

/// Opens a stream of decisions for one `trace` client (the trace hub's
/// subscription); `up` has none when the engine gave it no trace reader.
pub type TraceFeed = Arc<dyn Fn() -> Result<mpsc::Receiver<TraceMessage>> + Send + Sync>;

/// Who may use the control socket: root, and the members of one group when
/// the operator names one.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// The group's name and id.
    group: Option<(String, u32)>,
}

impl Access {
    /// Root, and members of `group` (looked up in the system's group
    /// database) when given.
    pub fn new(group: Option<&str>) -> Result<Access> {
        let group = match group {
            None => None,
            Some(name) => {
                let gid = gid_of(name).with_context(|| {
                    format!(
                        "control group {name:?} does not exist: create it (groupadd {name}) or name another"
                    )
                })?;
                Some((name.to_string(), gid))
            }
        };
        Ok(Access { group })
    }

    /// Is the peer with these credentials allowed?
    fn allows(&self, peer: &Peer) -> bool {
        peer.uid == 0
            || self
                .group
                .as_ref()
                .is_some_and(|(_, gid)| peer.gid == *gid || peer.groups.contains(gid))
    }

    /// What a refused client is told.
    fn refusal(&self) -> String {
        refusal(self.group.as_ref().map(|(name, _)| name.as_str()))
    }
}

/// The id of a group, by name.
fn gid_of(name: &str) -> Option<u32> {
    let c_name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: an all-zero group is valid; getgrnam_r fills it with pointers
    // into `buf`, which outlives every use of `group`.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the sizes given.
    let rc = unsafe {
        libc::getgrnam_r(
            c_name.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then_some(group.gr_gid)
}

/// The credentials of the process at the other end of a control connection,
/// as the kernel recorded them when it connected.
#[derive(Debug)]
struct Peer {
    pid: i32,
    uid: u32,
    gid: u32,
    /// Supplementary groups.
    groups: Vec<u32>,
}

impl Peer {
    fn of(stream: &UnixStream) -> std::io::Result<Peer> {
        let fd = stream.as_raw_fd();
        let mut cred = libc::ucred {
            pid: 0,
            uid: u32::MAX,
            gid: u32::MAX,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: cred is a valid out-buffer of `len` bytes.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut groups = vec![0u32; 64];
        loop {
            let mut len = (groups.len() * std::mem::size_of::<u32>()) as libc::socklen_t;
            // SAFETY: groups is a valid out-buffer of `len` bytes.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_PEERGROUPS,
                    groups.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            let error = std::io::Error::last_os_error();
            if rc == 0 {
                groups.truncate(len as usize / std::mem::size_of::<u32>());
                break;
            }
            // ERANGE: `len` now says how much is needed.
            if error.raw_os_error() == Some(libc::ERANGE) && len as usize > groups.len() * 4 {
                groups.resize(len as usize / 4, 0);
                continue;
            }
            return Err(error);
        }
        Ok(Peer {
            pid: cred.pid,
            uid: cred.uid,
            gid: cred.gid,
            groups,
        })
    }
}

/// The control socket, bound and with its final mode and group, not yet
/// answering. Dropped before [`ControlSocket::serve`], it removes its file.
pub struct ControlSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
    access: Access,
}

impl ControlSocket {
    /// Binds the control socket in `state_dir`. It is never reachable by
    /// anyone `access` does not name, not even for a moment: it is bound in
    /// a directory only root can enter, given its mode (0600, or 0660 with
    /// the group) there, then moved into place.
    pub fn bind(state_dir: &Path, access: Access) -> Result<ControlSocket> {
        let path = socket_path(state_dir);
        // Directories left by runs that died while binding (we hold the
        // lock, so no other `up` is binding now).
        for entry in std::fs::read_dir(state_dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(".bind-") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let private = state_dir.join(format!(".bind-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .with_context(|| format!("cannot create {}", private.display()))?;
        let bound = private.join("control.sock");
        let placed = (|| -> Result<UnixListener> {
            let listener = UnixListener::bind(&bound)
                .with_context(|| format!("cannot listen on {}", path.display()))?;
            let mode = match &access.group {
                Some((name, gid)) => {
                    std::os::unix::fs::chown(&bound, Some(0), Some(*gid)).with_context(|| {
                        format!("cannot give the control socket to group {name}")
                    })?;
                    0o660
                }
                None => 0o600,
            };
            std::fs::set_permissions(&bound, std::fs::Permissions::from_mode(mode))?;
            // Replaces a socket file left by an earlier `up` (we hold the
            // lock, so it is stale) in one step.
            std::fs::rename(&bound, &path).with_context(|| {
                format!("cannot place the control socket at {}", path.display())
            })?;
            Ok(listener)
        })();
        let _ = std::fs::remove_file(&bound);
        let _ = std::fs::remove_dir(&private);
        Ok(ControlSocket {
            listener: Some(placed?),
            path,
            access,
        })
    }

    /// Answers each connection from root or the named group: passes its
    /// request to `engine_queue`, trace requests to `trace`. Anyone else is
    /// told no, and logged.
    pub fn serve(mut self, engine_queue: mpsc::Sender<Pending>, trace: Option<TraceFeed>) {
        let listener = self.listener.take().expect("served once");
        let access = self.access.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let queue = engine_queue.clone();
                let trace = trace.clone();
                let access = access.clone();
                std::thread::spawn(move || {
                    let _ = answer(stream, &access, &queue, trace.as_ref());
                });
            }
        });
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Tells a refused peer why, after reading (at most a little of) its
/// request, so that its write does not fail before it can read the answer.
fn refuse(stream: UnixStream, access: &Access, peer: Option<&Peer>) -> Result<()> {
    match peer {
        Some(peer) => tracing::warn!(
            pid = peer.pid,
            uid = peer.uid,
            gid = peer.gid,
            "control connection refused: the control socket accepts root{}",
            access
                .group
                .as_ref()
                .map_or(String::new(), |(name, _)| format!(
                    " and members of group {name}"
                ))
        ),
        None => tracing::warn!("control connection refused: its credentials cannot be read"),
    }
    stream.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
    let mut line = String::new();
    let _ = BufReader::new((&stream).take(64 * 1024)).read_line(&mut line);
    let response = Response::<Reply>::error(access.refusal());
    let mut stream = stream;
    serde_json::to_writer(&mut stream, &response)?;
    stream.write_all(b"\n")?;
    Ok(())
}

fn answer(
    stream: UnixStream,
    access: &Access,
    queue: &mpsc::Sender<Pending>,
    trace: Option<&TraceFeed>,
) -> Result<()> {
    match Peer::of(&stream) {
        Ok(peer) if access.allows(&peer) => {}
        Ok(peer) => return refuse(stream, access, Some(&peer)),
        Err(_) => return refuse(stream, access, None),
    }
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Trace) => match trace {
            Some(subscribe) => return stream_trace(stream, subscribe()?),
            None => Response::error("this engine has no trace reader"),
        },
        Ok(request) => {
            let (reply, answer) = mpsc::channel();
            queue.send((request, reply))?;
            answer.recv()?
        }
        Err(e) => Response::error(format!("malformed request: {e}")),
    };
    let mut stream = stream;
    serde_json::to_writer(&mut stream, &response)?;
    stream.write_all(b"\n")?;
    Ok(())
}

/// Streams decisions to `stream` (a control connection) until it closes.
fn stream_trace(mut stream: UnixStream, feed: mpsc::Receiver<TraceMessage>) -> Result<()> {
    let mut ack = serde_json::to_string(&Response::ok(Streaming::Trace))?;
    ack.push('\n');
    stream.write_all(ack.as_bytes())?;
    stream.set_nonblocking(true)?;
    for message in feed {
        if let TraceMessage::Heartbeat = message {
            // Has the reader gone?
            let mut byte = [0u8; 1];
            match stream.read(&mut byte) {
                Ok(0) => return Ok(()),
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return Ok(()),
                _ => continue,
            }
        }
        let mut text = serde_json::to_string(&message)?;
        text.push('\n');
        stream.set_nonblocking(false)?;
        if stream.write_all(text.as_bytes()).is_err() {
            return Ok(());
        }
        stream.set_nonblocking(true)?;
    }
    Ok(())
}

/// Carries out one request on the engine.
pub fn handle(engine: &mut Engine, request: Request) -> Response {
    let result = match request {
        Request::Status => status(engine).map(Reply::Status),
        Request::ServiceAdd { service } => engine
            .add_service(service.to_service())
            .map(|id| Reply::Created(Created { id: id.0 }))
            .map_err(anyhow::Error::from),
        Request::ServiceDel { name } => match engine.service_by_name(&name) {
            Some(id) => engine
                .remove_service(id)
                .map(|_| Reply::Done)
                .map_err(anyhow::Error::from),
            None => Err(anyhow::anyhow!("no service named {name:?}")),
        },
        Request::RuleAdd { rule } => rule
            .to_rule(|name| engine.service_by_name(name))
            .and_then(|rule| Ok(engine.add_rule(rule)?))
            .map(|id| Reply::Created(Created { id: id.0 })),
        Request::RuleDel { id } => engine
            .remove_rule(RuleId(id))
            .map(|_| Reply::Done)
            .map_err(anyhow::Error::from),
        Request::Conns => conns(engine).map(Reply::Conns),
        Request::Trace => Err(anyhow::anyhow!("trace requests go to the trace hub")),
    };
    match result {
        Ok(data) => Response::ok(data),
        Err(e) => Response::error(format!("{e:#}")),
    }
}

/// The name of a registered service.
fn name_of(engine: &Engine, id: ServiceId) -> Option<String> {
    engine
        .services()
        .find(|(sid, _)| *sid == id)
        .map(|(_, s)| s.name.clone())
}

/// A rule's conditions beyond destination, port, protocol and uid, as
/// `rule list` and `trace` show them.
fn conditions(engine: &Engine, rule: &Rule) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(gid) = rule.gid {
        out.push(format!("gid {gid}"));
    }
    if let Some(cgroup) = &rule.cgroup {
        out.push(format!("cgroup {}", cgroup.path.display()));
    }
    if let Some(command) = &rule.command {
        out.push(format!("command {command}"));
    }
    if let Some(executable) = &rule.executable {
        out.push(format!("executable {executable}"));
    }
    if let Some(range) = &rule.local_ports {
        out.push(format!("local-port {}-{}", range.start(), range.end()));
    }
    if let Some(after) = rule.after {
        out.push(format!(
            "after {}",
            name_of(engine, after).unwrap_or_else(|| format!("#{}", after.0))
        ));
    }
    out
}

/// "rule 3: block uid 65534, command curl": the deciding rule in `trace`.
fn rule_text(engine: &Engine, rule: &Rule) -> String {
    let mut named = Vec::new();
    if rule.action == Action::Redirect {
        named.push(format!(
            "to {}",
            name_of(engine, rule.service).unwrap_or_else(|| format!("#{}", rule.service.0))
        ));
    }
    if !rule.destinations.is_empty() {
        let dst: Vec<String> = rule.destinations.iter().map(ToString::to_string).collect();
        named.push(format!("dst {}", dst.join(",")));
    }
    if !rule.ports.is_empty() {
        let ports: Vec<String> = rule
            .ports
            .iter()
            .map(|r| format!("{}-{}", r.start(), r.end()))
            .collect();
        named.push(format!("port {}", ports.join(",")));
    }
    if let Some(uid) = rule.uid {
        named.push(format!("uid {uid}"));
    }
    named.extend(conditions(engine, rule));
    format!("{} {}", rule.action.name(), named.join(", "))
}

fn rule_status(id: RuleId, rule: &Rule, engine: &Engine, hits: u64) -> RuleStatus {
    RuleStatus {
        destinations: rule.destinations.iter().map(ToString::to_string).collect(),
        hits,
        id: id.0,
        ports: rule
            .ports
            .iter()
            .map(|r| {
                if r.start() == r.end() {
                    r.start().to_string()
                } else {
                    format!("{}-{}", r.start(), r.end())
                }
            })
            .collect(),
        priority: rule.priority,
        service: (rule.action == Action::Redirect)
            .then(|| name_of(engine, rule.service))
            .flatten(),
        uid: rule.uid,
        protocol: rule
            .protocol
            .names()
            .iter()
            .map(|p| p.to_string())
            .collect(),
        action: rule.action.name().to_string(),
        conditions: conditions(engine, rule),
    }
}

fn on_down(policy: OnDown) -> OnDownConfig {
    match policy {
        OnDown::Block => OnDownConfig::Block,
        OnDown::Bypass => OnDownConfig::Bypass,
    }
}

/// The engine's counters by name.
fn counters(engine: &Engine) -> Result<BTreeMap<String, u64>> {
    // The engine's counters are a serde struct of u64 fields; read back as
    // a map, they are a table by name whatever fields it gains.
    let counters = serde_json::to_vec(&engine.counters()?)?;
    Ok(serde_json::from_slice(&counters)?)
}

/// Whether a service is up: on each of its addresses, its socket for each
/// protocol its redirect rules send there (TCP: a listener; UDP: a bound unconnected
/// socket, where a UDP service receives); with no rule yet, either one.
/// Read from `/proc/net/{tcp,udp}{,6}`, so nothing probes the service.
fn service_up(engine: &Engine, id: ServiceId, listen: &[std::net::SocketAddr]) -> bool {
    let (mut tcp, mut udp) = (false, false);
    let redirects_here = |r: &Rule| r.service == id && r.action == Action::Redirect;
    for (_, rule) in engine.rules().filter(|(_, r)| redirects_here(r)) {
        match rule.protocol {
            Protocol::Tcp => tcp = true,
            Protocol::Udp => udp = true,
            Protocol::TcpAndUdp => (tcp, udp) = (true, true),
        }
    }
    listen.iter().all(|addr| {
        let listening = || connredir_host::procfs::is_listening(addr);
        let bound = || !connredir_host::procfs::bound_udp_inodes(addr).is_empty();
        match (tcp, udp) {
            (false, false) => listening() || bound(),
            _ => (!tcp || listening()) && (!udp || bound()),
        }
    })
}

fn status(engine: &Engine) -> Result<Status> {
    let hits = engine.rule_hits()?;
    let services = engine
        .services()
        .map(|(id, s)| ServiceStatus {
            id: id.0,
            listen: s.listen.clone(),
            name: s.name.clone(),
            up: service_up(engine, id, &s.listen),
            on_down: on_down(s.on_down),
        })
        .collect();
    let rules = engine
        .rules()
        .map(|(id, r)| rule_status(id, r, engine, hits.get(&id).copied().unwrap_or(0)))
        .collect();
    Ok(Status {
        scopes: engine.attached().map(|p| p.display().to_string()).collect(),
        services,
        rules,
        counters: counters(engine)?,
        live_connections: engine.connections()?.len() as u64,
    })
}

/// One entry per redirected socket (a leg of a flow).
fn conns(engine: &Engine) -> Result<Vec<Conn>> {
    Ok(engine
        .connections()?
        .iter()
        .map(|c| Conn {
            client: c.client,
            local: c.local,
            original_dst: c.original_destination,
            pid: c.pid,
            uid: c.uid,
            command: crate::process::process_name(c.pid).unwrap_or_else(|| c.command.clone()),
            cgroup_id: c.cgroup_id,
            client_pid: c.client_pid,
            client_uid: c.client_uid,
            chain: c
                .chain
                .iter()
                .map(|id| name_of(engine, *id).unwrap_or_else(|| format!("#{}", id.0)))
                .collect(),
            age_ms: c.age.as_millis() as u64,
            protocol: c.protocol.names()[0].to_string(),
        })
        .collect())
}

/// The registered services' names by id, and the rules' descriptions by
/// id, as the engine thread last saw them: lets the trace hub name services
/// and deciding rules without asking the engine.
#[derive(Debug, Clone, Default)]
pub struct ServiceNames(
    Arc<RwLock<BTreeMap<u32, String>>>,
    Arc<RwLock<BTreeMap<u32, String>>>,
);

impl ServiceNames {
    /// Takes the names from the engine; called on the engine thread after
    /// each change.
    pub fn refresh(&self, engine: &Engine) {
        let names = engine
            .services()
            .map(|(id, s)| (id.0, s.name.clone()))
            .collect();
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = names;
        let rules = engine
            .rules()
            .map(|(id, rule)| (id.0, rule_text(engine, rule)))
            .collect();
        *self.1.write().unwrap_or_else(|e| e.into_inner()) = rules;
    }

    /// The action and conditions of the rule with this id.
    pub fn rule(&self, id: u32) -> Option<String> {
        self.1
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// The name of the service with this id.
    pub fn get(&self, id: u32) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            pid: 1,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_always_and_a_named_group_by_primary_or_supplementary_id() {
        let root_only = Access::default();
        assert!(root_only.allows(&peer(0, 0, &[])));
        assert!(
            !root_only.allows(&peer(1000, 0, &[0])),
            "group root is not root"
        );
        let group = Access {
            group: Some(("connredir".into(), 990)),
        };
        assert!(group.allows(&peer(0, 0, &[])));
        assert!(group.allows(&peer(1000, 990, &[])));
        assert!(group.allows(&peer(1000, 1000, &[27, 990])));
        assert!(!group.allows(&peer(1000, 1000, &[27])));
        assert_eq!(
            group.refusal(),
            "permission denied: the control socket accepts root and members of group connredir"
        );
    }

    #[test]
    fn an_unknown_group_is_named() {
        let err = Access::new(Some("connredir-no-such-group")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "control group \"connredir-no-such-group\" does not exist: create it \
             (groupadd connredir-no-such-group) or name another"
        );
        assert_eq!(gid_of("root"), Some(0));
    }
}
