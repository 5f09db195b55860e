//! `connredir demo`: the whole facility on one machine, on loopback only.
//!
//! It makes a cgroup tree, attaches the layer, starts a small origin web
//! server, registers two independent inspection proxies whose rules both
//! match that server, and runs curl inside the tree. The request passes the
//! scanner, then the recorder, then reaches the origin; each proxy reports
//! what it saw and the chain of services in the records. Then everything is
//! torn down.
//!
//! It prints its report alone: the engine's log lines go where `main` sends
//! them (nowhere below `warn`, or the `--log` file), and the proxies'
//! stderr to the same file, or nowhere unless RUST_LOG asks for logs.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use connredir_engine::{Engine, Identity, Rule, Service, ServiceId};
use connredir_host::cgroup::{run_in_cgroup, CgroupTree};
use connredir_host::child::ChildProcess;
use serde::Deserialize;

/// The two demo services: name and priority (lower inspects first).
const PROXIES: [(&str, u32); 2] = [("scanner", 10), ("recorder", 20)];

/// A proxy process (killed on drop) and the lines it printed.
struct RunningProxy {
    name: &'static str,
    id: ServiceId,
    listen: SocketAddr,
    child: ChildProcess,
}

fn free_port(ip: &str) -> Result<SocketAddr> {
    Ok(TcpListener::bind((ip, 0))?.local_addr()?)
}

/// The reference proxy binary, built beside this one.
fn proxy_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name("connredir-proxy");
    if !path.exists() {
        bail!(
            "{} not found: build the whole workspace first (cargo build --release --workspace)",
            path.display()
        );
    }
    Ok(path)
}

/// A tiny origin web server on a thread: answers every request with a
/// greeting and closes.
fn start_origin() -> Result<SocketAddr> {
    let listener =
        TcpListener::bind("127.0.0.2:0").context("start the origin server on 127.0.0.2")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let body = "hello from the origin server\n";
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    Ok(addr)
}

/// Where the proxies' log lines (their stderr) go: the `--log` file, the
/// demo's stderr when RUST_LOG asks for logs, else nowhere.
fn proxy_log(log: Option<&Path>) -> Result<Stdio> {
    match log {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open the log file {}", path.display()))?;
            Ok(file.into())
        }
        None if std::env::var_os("RUST_LOG").is_some() => Ok(Stdio::inherit()),
        None => Ok(Stdio::null()),
    }
}

fn start_proxy(
    engine: &mut Engine,
    tree: &CgroupTree,
    origin: SocketAddr,
    (name, priority): (&'static str, u32),
    log: Option<&Path>,
) -> Result<RunningProxy> {
    let cgroup = tree.cgroup(&format!("services/{name}"))?;
    let listen = free_port("127.0.0.1")?;
    let id = engine.add_service(Service {
        name: name.into(),
        listen: vec![listen],
        identity: Identity {
            cgroups: vec![cgroup.clone()],
            ..Default::default()
        },
        context: None,
        own_connections_by_self: true,
        accelerate: false,
        transparent: false,
        on_down: Default::default(),
    })?;
    engine.add_rule(Rule {
        destinations: vec![format!("{}/32", origin.ip()).parse()?],
        ports: vec![origin.port()..=origin.port()],
        priority,
        ..Rule::tcp_to(id)
    })?;
    let mut command = Command::new(proxy_binary()?);
    command
        .args(["--name", name, "--listen", &listen.to_string()])
        .stdin(Stdio::null())
        .stderr(proxy_log(log)?);
    let child =
        ChildProcess::spawn(&mut command, &cgroup, None).context("start connredir-proxy")?;
    let proxy = RunningProxy {
        name,
        id,
        listen,
        child,
    };
    // Its first line says whether it started.
    match proxy.child.wait_line(Duration::from_secs(10), |_| true) {
        Ok(line) if line == "ready" => Ok(proxy),
        other => bail!("proxy {name} did not start (said {other:?})"),
    }
}

fn run_curl(tree: &CgroupTree, url: &str) -> Result<String> {
    let cgroup = tree.cgroup("apps/curl")?;
    let mut command = Command::new("curl");
    command
        .args([
            "--silent",
            "--show-error",
            "--max-time",
            "10",
            "--include",
            url,
        ])
        .stdin(Stdio::null());
    run_in_cgroup(&mut command, &cgroup, None)?;
    let output = command
        .output()
        .context("run curl (install it: apt-get install curl, or run scripts/setup)")?;
    if !output.status.success() {
        bail!(
            "curl failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The fields of a `connredir-proxy` connection log line (its `log.rs`)
/// that the demo reports.
#[derive(Debug, Deserialize)]
struct LogEntry {
    /// Service ids from the records, oldest first.
    #[serde(default)]
    chain: Vec<u32>,
    /// The HTTP request, when the connection carried one.
    #[serde(default)]
    http: Option<LogHttp>,
    /// Where the flow was going.
    #[serde(default)]
    original_dst: Option<String>,
    /// Who opened the flow; null without records.
    #[serde(default)]
    client: Option<LogClient>,
    /// Bytes client → server.
    bytes_up: u64,
    /// Bytes to the client.
    bytes_down: u64,
    /// allow, deny or error.
    verdict: String,
}

/// The `http` of a log line.
#[derive(Debug, Deserialize)]
struct LogHttp {
    method: String,
    host: Option<String>,
    path: String,
}

/// The `client` of a log line.
#[derive(Debug, Deserialize)]
struct LogClient {
    pid: u32,
    command: Option<String>,
}

/// The connection report of one proxy (waits up to 10 s for it).
fn report(proxy: &RunningProxy) -> Result<LogEntry> {
    let is_report = |line: &str| serde_json::from_str::<LogEntry>(line).is_ok();
    match proxy.child.wait_line(Duration::from_secs(10), is_report) {
        Ok(line) => Ok(serde_json::from_str(&line)?),
        Err(_) => bail!("proxy {} reported no connection", proxy.name),
    }
}

fn describe(entry: &LogEntry, names: &[(ServiceId, &str)]) -> String {
    let chain: Vec<&str> = entry
        .chain
        .iter()
        .filter_map(|id| {
            names
                .iter()
                .find(|(n, _)| *n == ServiceId(*id))
                .map(|(_, name)| *name)
        })
        .collect();
    let request = match &entry.http {
        Some(http) => format!(
            "{} {}{}",
            http.method,
            http.host.as_deref().unwrap_or("?"),
            http.path
        ),
        None => "(not HTTP)".into(),
    };
    let client = entry.client.as_ref();
    format!(
        "{request}, to {}, from {} (pid {}), {} bytes up, {} down, chain [{}], verdict {}",
        entry.original_dst.as_deref().unwrap_or("?"),
        client.and_then(|c| c.command.as_deref()).unwrap_or("?"),
        // Printed as the log has it: null without records.
        client.map_or("null".to_string(), |c| c.pid.to_string()),
        entry.bytes_up,
        entry.bytes_down,
        chain.join(" → "),
        entry.verdict,
    )
}

/// Runs the demo and tears everything down, also on failure; `log`: the
/// file the engine's log already goes to, for the proxies' logs too.
pub fn run(log: Option<&Path>) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the demo attaches BPF programs and makes cgroups: run it as root (sudo scripts/demo)"
        );
    }
    let tree = CgroupTree::create(&format!("connredir-demo-{}", std::process::id()))?;
    let apps = tree.cgroup("apps")?;
    let services = tree.cgroup("services")?;
    let mut engine = Engine::load()?;
    engine.attach(&apps)?;
    engine.attach(&services)?;
    let origin = start_origin()?;

    let mut proxies = Vec::new();
    for spec in PROXIES {
        proxies.push(start_proxy(&mut engine, &tree, origin, spec, log)?);
    }
    println!("connredir demo: two independent inspection proxies, one flow, no loop\n");
    println!("  origin    http://{origin}/ (a local web server)");
    for (p, (_, priority)) in proxies.iter().zip(PROXIES) {
        println!(
            "  {:<9} listens on {}, rule: {origin} → {}, priority {priority}",
            p.name, p.listen, p.name
        );
    }
    println!("  client    curl, in cgroup {}\n", apps.display());

    let url = format!("http://{origin}/hello");
    let response = run_curl(&tree, &url)?;
    let status = response.lines().next().unwrap_or("").trim();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    println!("curl {url}\n  → {status}: {body:?}\n");

    let names: Vec<(ServiceId, &str)> = proxies.iter().map(|p| (p.id, p.name)).collect();
    for proxy in &proxies {
        println!("{} saw: {}", proxy.name, describe(&report(proxy)?, &names));
    }
    let c = engine.counters()?;
    println!(
        "\nlayer: {} redirects, {} loops prevented, {} records handed to proxies",
        c.redirects, c.loops_prevented, c.handoffs
    );
    drop(proxies);
    drop(engine);
    drop(tree);
    println!("torn down: programs detached, proxies stopped, cgroups removed");
    Ok(())
}
