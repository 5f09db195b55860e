//! The control socket of a running `connredir up`: one JSON request per
//! connection, one JSON answer. The socket is root-only (mode 0600).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use anyhow::{bail, Context, Result};
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

/// A request waiting for the engine, with where to send the answer.
pub type Pending = (Request, mpsc::Sender<Response>);

/// Path of the control socket in the state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Listens on the control socket and passes each request to `engine_queue`,
/// trace requests to `hub`.
pub fn serve(
    state_dir: &Path,
    engine_queue: mpsc::Sender<Pending>,
    hub: Option<crate::trace::Hub>,
) -> Result<()> {
    let path = socket_path(state_dir);
    // A socket file left by an earlier `up` (we hold the lock, so it is stale).
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let queue = engine_queue.clone();
            let hub = hub.clone();
            std::thread::spawn(move || {
                let _ = answer(stream, &queue, hub.as_ref());
            });
        }
    });
    Ok(())
}

fn answer(
    stream: UnixStream,
    queue: &mpsc::Sender<Pending>,
    hub: Option<&crate::trace::Hub>,
) -> Result<()> {
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

/// Connects to the control socket of the running `up`.
pub fn connect(state_dir: &Path) -> Result<UnixStream> {
    let path = socket_path(state_dir);
    UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach a running `connredir up` at {} (is it running, and are you root?)",
            path.display()
        )
    })
}

/// Sends one request to the running `up` and returns its data.
pub fn call(state_dir: &Path, request: &Request) -> Result<Value> {
    let mut stream = connect(state_dir)?;
    serde_json::to_writer(&mut stream, request)?;
    stream.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let response: Response = serde_json::from_str(&line).context("malformed answer")?;
    if let Some(error) = response.error {
        bail!("{error}");
    }
    Ok(response.data)
}
