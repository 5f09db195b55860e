//! The control socket of a running `connredir up`: one JSON request per
//! connection, one JSON answer. The socket accepts root, and the members of
//! a group when the operator names one (`[control] group`, `up
//! --control-group`): its file mode says so, and each connection's peer
//! credentials (SO_PEERCRED) are checked as well.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::{Context, Result};
use connredir_engine::{Engine, Rule, RuleId, ServiceId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::{RuleConfig, ServiceConfig};

/// What a client asks of the running engine.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Scopes, services, rules with hit counts, counters.
    Status,
    /// Register a service.
    ServiceAdd {
        /// As in a `[[service]]` table.
        service: ServiceConfig,
    },
    /// Unregister a service (its rules must be gone).
    ServiceDel {
        /// The service's name.
        name: String,
    },
    /// Add a rule.
    RuleAdd {
        /// As in a `[[rule]]` table.
        rule: RuleConfig,
    },
    /// Remove a rule.
    RuleDel {
        /// The rule's id, as `rule list` shows it.
        id: u32,
    },
    /// The live redirected connections.
    Conns,
    /// Stream redirect decisions (one JSON line each) until the client
    /// closes the connection.
    Trace,
}

/// The answer: `data` on success, `error` otherwise.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    /// What was asked for.
    #[serde(default)]
    pub data: Value,
    /// What went wrong.
    #[serde(default)]
    pub error: Option<String>,
}

impl Request {
    /// The command that sends this request, for messages.
    pub fn command(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::ServiceAdd { .. } => "service add",
            Request::ServiceDel { .. } => "service del",
            Request::RuleAdd { .. } => "rule add",
            Request::RuleDel { .. } => "rule del",
            Request::Conns => "conns",
            Request::Trace => "trace",
        }
    }
}

/// A request waiting for the engine, with where to send the answer.
pub type Pending = (Request, mpsc::Sender<Response>);

/// Path of the control socket in the state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

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

/// "permission denied: the control socket accepts ...", the same words from
/// the daemon and from a client that the socket's mode keeps out.
fn refusal(group: Option<&str>) -> String {
    match group {
        Some(group) => format!(
            "permission denied: the control socket accepts root and members of group {group}"
        ),
        None => "permission denied: the control socket accepts root only \
                 (`connredir up --control-group GROUP` or [control] group lets a group in)"
            .into(),
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

/// The name of a group, by id.
fn group_name(gid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: as in gid_of.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the sizes given.
    let rc = unsafe { libc::getgrgid_r(gid, &mut group, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: getgrgid_r succeeded, so gr_name points at a NUL-terminated
    // string in `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(group.gr_name) };
    Some(name.to_string_lossy().into_owned())
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
    /// request to `engine_queue`, trace requests to `hub`. Anyone else is
    /// told no, and logged.
    pub fn serve(mut self, engine_queue: mpsc::Sender<Pending>, hub: Option<crate::trace::Hub>) {
        let listener = self.listener.take().expect("served once");
        let access = self.access.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let queue = engine_queue.clone();
                let hub = hub.clone();
                let access = access.clone();
                std::thread::spawn(move || {
                    let _ = answer(stream, &access, &queue, hub.as_ref());
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
    let response = Response {
        data: Value::Null,
        error: Some(access.refusal()),
    };
    let mut stream = stream;
    serde_json::to_writer(&mut stream, &response)?;
    stream.write_all(b"\n")?;
    Ok(())
}

fn answer(
    stream: UnixStream,
    access: &Access,
    queue: &mpsc::Sender<Pending>,
    hub: Option<&crate::trace::Hub>,
) -> Result<()> {
    match Peer::of(&stream) {
        Ok(peer) if access.allows(&peer) => {}
        Ok(peer) => return refuse(stream, access, Some(&peer)),
        Err(_) => return refuse(stream, access, None),
    }
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let response = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Trace) => match hub {
            Some(hub) => return hub.serve(stream),
            None => Response {
                data: Value::Null,
                error: Some("this engine has no trace reader".into()),
            },
        },
        Ok(request) => {
            let (reply, answer) = mpsc::channel();
            queue.send((request, reply))?;
            answer.recv()?
        }
        Err(e) => Response {
            data: Value::Null,
            error: Some(format!("malformed request: {e}")),
        },
    };
    let mut stream = stream;
    serde_json::to_writer(&mut stream, &response)?;
    stream.write_all(b"\n")?;
    Ok(())
}

/// Carries out one request on the engine.
pub fn handle(engine: &mut Engine, request: Request) -> Response {
    let result = match request {
        Request::Status => status(engine),
        Request::ServiceAdd { service } => engine
            .add_service(service.to_service())
            .map(|id| json!({ "id": id.0 }))
            .map_err(anyhow::Error::from),
        Request::ServiceDel { name } => match engine.service_by_name(&name) {
            Some(id) => engine
                .remove_service(id)
                .map(|_| Value::Null)
                .map_err(anyhow::Error::from),
            None => Err(anyhow::anyhow!("no service named {name:?}")),
        },
        Request::RuleAdd { rule } => rule
            .to_rule(|name| engine.service_by_name(name))
            .and_then(|rule| Ok(engine.add_rule(rule)?))
            .map(|id| json!({ "id": id.0 })),
        Request::RuleDel { id } => engine
            .remove_rule(RuleId(id))
            .map(|_| Value::Null)
            .map_err(anyhow::Error::from),
        Request::Conns => conns(engine),
        Request::Trace => Err(anyhow::anyhow!("trace requests go to the trace hub")),
    };
    match result {
        Ok(data) => Response { data, error: None },
        Err(e) => Response {
            data: Value::Null,
            error: Some(format!("{e:#}")),
        },
    }
}

fn rule_json(id: RuleId, rule: &Rule, engine: &Engine, hits: u64) -> Value {
    let service = engine
        .services()
        .find(|(sid, _)| *sid == rule.service)
        .map(|(_, s)| s.name.clone());
    json!({
        "id": id.0,
        "service": service,
        "destinations": rule.destinations.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ports": rule.ports.iter().map(|r| if r.start() == r.end() {
            r.start().to_string()
        } else {
            format!("{}-{}", r.start(), r.end())
        }).collect::<Vec<_>>(),
        "uid": rule.uid,
        "priority": rule.priority,
        "hits": hits,
    })
}

fn status(engine: &Engine) -> Result<Value> {
    let hits = engine.rule_hits()?;
    let services: Vec<Value> = engine
        .services()
        .map(|(id, s)| {
            json!({
                "id": id.0,
                "name": s.name,
                "listen": s.listen.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "up": s.listen.iter().all(connredir_engine::is_listening),
                "on_down": s.on_down.as_str(),
            })
        })
        .collect();
    let rules: Vec<Value> = engine
        .rules()
        .map(|(id, r)| rule_json(id, r, engine, hits.get(&id).copied().unwrap_or(0)))
        .collect();
    Ok(json!({
        "scopes": engine.attached().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "services": services,
        "rules": rules,
        "counters": engine.counters()?,
        "live_connections": engine.connections()?.len(),
    }))
}

fn service_name(engine: &Engine, id: ServiceId) -> Value {
    engine.services().find(|(sid, _)| *sid == id).map_or_else(
        || format!("#{}", id.0).into(),
        |(_, s)| s.name.clone().into(),
    )
}

/// One JSON object per redirected socket (a leg of a flow).
fn conns(engine: &Engine) -> Result<Value> {
    let text = |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string());
    Ok(engine
        .connections()?
        .iter()
        .map(|c| {
            json!({
                "client": text(c.client),
                "local": text(c.local),
                "original_dst": text(c.original_destination),
                "pid": c.pid,
                "uid": c.uid,
                "command": crate::trace::process_name(c.pid).unwrap_or_else(|| c.command.clone()),
                "cgroup_id": c.cgroup_id,
                "client_pid": c.client_pid,
                "client_uid": c.client_uid,
                "chain": c.chain.iter().map(|id| service_name(engine, *id)).collect::<Vec<_>>(),
                "age_ms": c.age.as_millis() as u64,
            })
        })
        .collect())
}

/// Connects to the control socket of the running `up` to ask `request`.
pub fn connect(state_dir: &Path, request: &Request) -> Result<UnixStream> {
    let path = socket_path(state_dir);
    UnixStream::connect(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            // The socket's mode keeps us out: say who it lets in.
            let group = std::fs::metadata(&path)
                .ok()
                .filter(|m| m.mode() & 0o060 != 0 && m.gid() != 0)
                .map(|m| group_name(m.gid()).unwrap_or_else(|| m.gid().to_string()));
            anyhow::anyhow!(
                "connredir {}: {}",
                request.command(),
                refusal(group.as_deref())
            )
        } else {
            anyhow::Error::new(e).context(format!(
                "cannot reach a running `connredir up` at {} (is it running, and are you root?)",
                path.display()
            ))
        }
    })
}

/// The error a refused request gets, named after the command that asked.
pub fn refused(request: &Request, error: String) -> anyhow::Error {
    if error.starts_with("permission denied") {
        anyhow::anyhow!("connredir {}: {error}", request.command())
    } else {
        anyhow::anyhow!(error)
    }
}

/// Sends one request to the running `up` and returns its data.
pub fn call(state_dir: &Path, request: &Request) -> Result<Value> {
    let mut stream = connect(state_dir, request)?;
    // A refused request may find the socket closed for writing; its answer
    // says why, so read it in any case.
    let sent = serde_json::to_writer(&mut stream, request)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(stream.write_all(b"\n")?));
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.is_empty() {
        sent?;
    }
    let response: Response = serde_json::from_str(&line).context("malformed answer")?;
    if let Some(error) = response.error {
        return Err(refused(request, error));
    }
    Ok(response.data)
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
        assert_eq!(group_name(0).as_deref(), Some("root"));
    }
}
