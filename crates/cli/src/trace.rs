//! `connredir trace`: the live stream of redirect decisions.
//!
//! The running `up` owns the kernel's ring buffer (one reader). A hub thread
//! turns the stream on while at least one `trace` is connected, reads it,
//! and hands each decision to every connected `trace` as one JSON line; the
//! `trace` command filters and prints them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use connredir_engine::{boot_time, Decision, TraceEvent, Tracer};
use serde::{Deserialize, Serialize};
use tracing::warn;

/// One decision as it travels to `trace`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceLine {
    /// Wall-clock time, RFC 3339.
    pub time: String,
    /// The connecting process.
    pub pid: u32,
    /// Its user id.
    pub uid: u32,
    /// Its command name.
    pub command: String,
    /// Its cgroup id.
    pub cgroup_id: u64,
    /// Where connect() was going.
    pub destination: SocketAddr,
    /// The deciding rule's id.
    pub rule: Option<u32>,
    /// That rule's service id.
    pub service_id: Option<u32>,
    /// That service's name, when known.
    pub service: Option<String>,
    /// Services in the record before this decision.
    pub hops: u16,
    /// The flow's redirect state for that service.
    pub state: String,
    /// `redirected`, `no-rule`, `loop-prevented`, `hop-limit`, `no-memory`.
    pub decision: String,
}

impl TraceLine {
    fn new(event: &TraceEvent, boot_offset: Duration) -> TraceLine {
        let wall = SystemTime::UNIX_EPOCH + boot_offset + event.time;
        TraceLine {
            time: humantime::format_rfc3339_millis(wall).to_string(),
            pid: event.pid,
            uid: event.uid,
            command: process_name(event.pid).unwrap_or_else(|| event.command.clone()),
            cgroup_id: event.cgroup_id,
            destination: event.destination,
            rule: event.rule,
            service_id: event.service.map(|s| s.0),
            service: None,
            hops: event.hops,
            state: format!("{:?}", event.state),
            decision: event.decision.name().into(),
        }
    }
}

/// The process's name (its main thread's), when it still runs: the kernel
/// reports the name of the thread that connected, such as a runtime's
/// worker thread.
pub fn process_name(pid: u32) -> Option<String> {
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(name.trim_end().to_owned())
}

/// The `up` side: a handle to ask the hub for a stream.
#[derive(Clone)]
pub struct Hub {
    subscribe: mpsc::Sender<mpsc::SyncSender<TraceLine>>,
}

/// Per-connection queue length: a `trace` that falls this far behind loses
/// decisions instead of holding up the others.
const BACKLOG: usize = 4096;

impl Hub {
    /// Starts the hub thread around the engine's tracer. `names` gives a
    /// service's name from its id, asked on the engine's thread.
    pub fn start(
        mut tracer: Tracer,
        names: impl Fn(u32) -> Option<String> + Send + 'static,
    ) -> Hub {
        let (subscribe, subscriptions) = mpsc::channel::<mpsc::SyncSender<TraceLine>>();
        std::thread::spawn(move || {
            let mut subscribers: Vec<mpsc::SyncSender<TraceLine>> = Vec::new();
            let mut names_cache = std::collections::BTreeMap::new();
            loop {
                if subscribers.is_empty() {
                    let _ = tracer.set_enabled(false);
                    match subscriptions.recv() {
                        Ok(s) => subscribers.push(s),
                        Err(_) => return,
                    }
                    if let Err(e) = tracer.set_enabled(true) {
                        warn!(error = %e, "cannot turn the trace on");
                    }
                }
                subscribers.extend(subscriptions.try_iter());
                let offset = wall_minus_boot();
                let events = tracer.poll(Duration::from_millis(200));
                for event in &events {
                    let mut line = TraceLine::new(event, offset);
                    if let Some(id) = line.service_id {
                        line.service = names_cache.entry(id).or_insert_with(|| names(id)).clone();
                    }
                    subscribers.retain(|s| {
                        !matches!(
                            s.try_send(line.clone()),
                            Err(mpsc::TrySendError::Disconnected(_))
                        )
                    });
                }
                if events.is_empty() {
                    // Let subscribers that went away notice, and forget names
                    // that may have changed.
                    names_cache.clear();
                    subscribers.retain(|s| {
                        !matches!(
                            s.try_send(heartbeat()),
                            Err(mpsc::TrySendError::Disconnected(_))
                        )
                    });
                }
            }
        });
        Hub { subscribe }
    }

    /// Streams decisions to `stream` (a control connection) until it closes.
    pub fn serve(&self, mut stream: UnixStream) -> Result<()> {
        let (tx, rx) = mpsc::sync_channel(BACKLOG);
        self.subscribe.send(tx).context("the trace hub stopped")?;
        stream.write_all(b"{\"data\":\"trace\"}\n")?;
        stream.set_nonblocking(true)?;
        for line in rx {
            if line.pid == 0 && line.command.is_empty() {
                // Heartbeat: has the reader gone?
                let mut byte = [0u8; 1];
                match stream.read(&mut byte) {
                    Ok(0) => return Ok(()),
                    Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return Ok(()),
                    _ => continue,
                }
            }
            let mut text = serde_json::to_string(&line)?;
            text.push('\n');
            stream.set_nonblocking(false)?;
            if stream.write_all(text.as_bytes()).is_err() {
                return Ok(());
            }
            stream.set_nonblocking(true)?;
        }
        Ok(())
    }
}

fn heartbeat() -> TraceLine {
    TraceLine {
        time: String::new(),
        pid: 0,
        uid: 0,
        command: String::new(),
        cgroup_id: 0,
        destination: SocketAddr::from(([0, 0, 0, 0], 0)),
        rule: None,
        service_id: None,
        service: None,
        hops: 0,
        state: String::new(),
        decision: String::new(),
    }
}

/// Wall-clock time minus boot time: turns the kernel's timestamps into
/// dates.
fn wall_minus_boot() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(boot_time())
}

/// Which decisions `connredir trace` prints.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filter {
    /// Only this process id.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only this command name (as in /proc/PID/comm, at most 15 characters).
    #[arg(long)]
    pub command: Option<String>,
    /// Only destinations in this prefix (for example 10.0.0.0/8).
    #[arg(long)]
    pub dst: Option<ipnet::IpNet>,
    /// Only this destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only decisions about this service (by name).
    #[arg(long)]
    pub service: Option<String>,
    /// Only this decision: redirected, no-rule, loop-prevented, hop-limit,
    /// no-memory.
    #[arg(long, value_parser = parse_decision)]
    pub decision: Option<String>,
}

fn parse_decision(text: &str) -> Result<String, String> {
    let all = [
        Decision::Redirected,
        Decision::NoRule,
        Decision::LoopPrevented,
        Decision::HopLimit,
        Decision::NoMemory,
    ];
    all.iter()
        .map(|d| d.name())
        .find(|name| *name == text)
        .map(str::to_owned)
        .ok_or_else(|| {
            format!(
                "unknown decision; use one of: {}",
                all.map(|d| d.name()).join(", ")
            )
        })
}

impl Filter {
    /// Does `line` pass?
    pub fn accepts(&self, line: &TraceLine) -> bool {
        let ip: IpAddr = line.destination.ip();
        self.pid.is_none_or(|p| p == line.pid)
            && self.command.as_ref().is_none_or(|c| *c == line.command)
            && self.dst.is_none_or(|net| net.contains(&ip))
            && self.port.is_none_or(|p| p == line.destination.port())
            && self
                .service
                .as_ref()
                .is_none_or(|s| line.service.as_ref() == Some(s))
            && self.decision.as_ref().is_none_or(|d| *d == line.decision)
    }
}

/// `connredir trace`: prints decisions until interrupted (or `limit` lines).
pub fn run(state_dir: &Path, filter: &Filter, json: bool, limit: Option<usize>) -> Result<()> {
    let request = crate::control::Request::Trace;
    let mut stream = crate::control::connect(state_dir, &request)?;
    serde_json::to_writer(&mut stream, &request)?;
    stream.write_all(b"\n")?;
    let mut lines = BufReader::new(stream).lines();
    let first = lines.next().context("the engine closed the connection")??;
    let answer: crate::control::Response =
        serde_json::from_str(&first).context("malformed answer")?;
    if let Some(error) = answer.error {
        return Err(crate::control::refused(&request, error));
    }
    if !json {
        println!(
            "{:<24} {:>7} {:<15} {:<28} {:<15} {:<5} {:<28} DECISION",
            "TIME", "PID", "COMMAND", "DESTINATION", "SERVICE", "RULE", "STATE"
        );
    }
    let mut shown = 0;
    for line in lines {
        let line: TraceLine = serde_json::from_str(&line?).context("malformed trace line")?;
        if !filter.accepts(&line) {
            continue;
        }
        if json {
            println!("{}", serde_json::to_string(&line)?);
        } else {
            println!(
                "{:<24} {:>7} {:<15} {:<28} {:<15} {:<5} {:<28} {}",
                line.time,
                line.pid,
                line.command,
                line.destination,
                line.service
                    .clone()
                    .or(line.service_id.map(|id| format!("#{id}")))
                    .unwrap_or_else(|| "-".into()),
                line.rule.map_or("-".into(), |r| r.to_string()),
                line.state,
                line.decision
            );
        }
        std::io::stdout().flush()?;
        shown += 1;
        if limit.is_some_and(|n| shown >= n) {
            break;
        }
    }
    Ok(())
}
