//! An HTTP world for tests of third-party proxies as services: an origin
//! (a small Python HTTP server that prints one JSON line per request) and
//! curl clients, both run as the unprivileged user, and the way to wait for
//! a process's JSON lines. mitmproxy.rs, squid.rs and v2ray.rs use it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{unmapped, Lab, Proc, TestDir};

/// The unprivileged user the origin and the clients run as.
pub const NOBODY: u32 = 65534;

/// The origin: an HTTP/1.0 server on `argv[1]` (port 0) that answers every
/// GET with its path (as the body and in `X-Origin-Path`) and prints one
/// JSON line per request: the path and the peer it came from.
pub const ORIGIN: &str = r#"
import http.server, json, socket, sys, threading

host = sys.argv[1]
v6 = ":" in host
# Requests are served on threads of their own: one line at a time.
printing = threading.Lock()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        peer = self.client_address
        peer = f"[{peer[0]}]:{peer[1]}" if v6 else f"{peer[0]}:{peer[1]}"
        with printing:
            sys.stdout.write(json.dumps({"path": self.path, "peer": peer}) + "\n")
            sys.stdout.flush()
        body = f"origin saw {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Origin-Path", self.path)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if v6 else socket.AF_INET
    request_queue_size = 128

server = Server((host, 0), Handler)
print(f"ready {server.server_address[1]}", flush=True)
server.serve_forever()
"#;

/// Starts the [`ORIGIN`] on `host` (as [`NOBODY`], in the lab's `outside`
/// cgroup, which nothing is attached to). Returns its address and its
/// index in `lab.procs`.
pub fn start_origin(
    lab: &mut Lab,
    python: &Path,
    dir: &TestDir,
    host: &str,
) -> (SocketAddr, usize) {
    let script = dir.write("origin.py", ORIGIN);
    let proc = Proc::spawn_program(
        &lab.cgroup("outside"),
        Some(NOBODY),
        python,
        &[&script, host],
    )
    .expect("start the origin");
    let ready = proc
        .wait_line("the origin listens", |l| l.starts_with("ready "))
        .unwrap();
    let port: u16 = ready["ready ".len()..].parse().expect("the origin's port");
    let addr = SocketAddr::new(host.parse().unwrap(), port);
    lab.procs.push(proc);
    (addr, lab.procs.len() - 1)
}

/// One request as curl reported it.
#[derive(Debug)]
pub struct Fetched {
    /// The path asked for.
    pub path: String,
    /// The HTTP status, 0 when there was no answer.
    pub code: u64,
    /// The origin's `X-Origin-Path`: the path the origin answered.
    pub answered: String,
    /// curl's own address as the proxies print it (an IPv4-mapped address
    /// as plain IPv4): the flow's id in the reference proxy's log.
    pub local: String,
    /// curl's error, if any.
    pub error: String,
}

/// curl's arguments for `paths` from `target`: each request's answer as
/// one JSON line (`--write-out`), `Connection: close`; with `parallel`, all
/// at once (`--parallel-immediate`: every connection opened before any is
/// reused, and none is).
fn curl_args(target: SocketAddr, paths: &[String], parallel: bool) -> Vec<String> {
    // curl prints an IPv6 local_ip without brackets.
    let local = match target {
        SocketAddr::V4(_) => "%{local_ip}:%{local_port}",
        SocketAddr::V6(_) => "[%{local_ip}]:%{local_port}",
    };
    let write_out = format!(
        "{{\"url\":\"%{{url}}\",\"code\":%{{http_code}},\"answered\":\"%header{{x-origin-path}}\",\
         \"local\":\"{local}\",\"error\":\"%{{errormsg}}\"}}\\n"
    );
    let mut args: Vec<String> = [
        "--silent",
        "--no-progress-meter",
        "--noproxy",
        "*",
        "--max-time",
        "15",
        "--header",
        "Connection: close",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if parallel {
        args.extend(["--parallel".into(), "--parallel-immediate".into()]);
        args.extend(["--parallel-max".into(), paths.len().max(1).to_string()]);
    }
    args.push("--write-out".into());
    args.push(write_out);
    for path in paths {
        args.extend(["--output".into(), "/dev/null".into()]);
        args.push(format!("http://{target}{path}"));
    }
    args
}

/// The requests curl reported in its JSON lines.
fn fetched_from(target: SocketAddr, lines: &[String]) -> Vec<Fetched> {
    lines
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("curl's JSON line");
            let url = v["url"].as_str().unwrap_or_default();
            let path = url
                .strip_prefix(&format!("http://{target}"))
                .unwrap_or(url)
                .to_string();
            Fetched {
                path,
                code: v["code"].as_u64().unwrap_or(0),
                answered: v["answered"].as_str().unwrap_or_default().to_string(),
                local: v["local"]
                    .as_str()
                    .and_then(|l| l.parse().ok())
                    .map(|l| unmapped(l).to_string())
                    .unwrap_or_default(),
                error: v["error"].as_str().unwrap_or_default().to_string(),
            }
        })
        .collect()
}

/// Starts curl as [`NOBODY`] in `scope/client` with `args`.
fn start_curl(lab: &Lab, curl: &Path, args: &[String]) -> Proc {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::spawn_program(&lab.cgroup("scope/client"), Some(NOBODY), curl, &args).expect("start curl")
}

/// Fetches `paths` from `target` with one curl run as [`NOBODY`] in
/// `scope/client`, all at once (`--parallel-immediate`: every connection
/// opened before any is reused, and none is; `Connection: close`).
pub fn fetch(lab: &Lab, curl: &Path, target: SocketAddr, paths: &[String]) -> Vec<Fetched> {
    let proc = start_curl(lab, curl, &curl_args(target, paths, true));
    let (status, lines) = proc.finish().expect("curl ends");
    let fetched = fetched_from(target, &lines);
    assert_eq!(
        fetched.len(),
        paths.len(),
        "curl ({status}) reported every request: {lines:?}"
    );
    fetched
}

/// Fetches `paths` from `target` with one curl process per path, all
/// started at once, as [`NOBODY`] in `scope/client`: separate clients whose
/// requests arrive in whatever order their processes get going.
pub fn fetch_each(lab: &Lab, curl: &Path, target: SocketAddr, paths: &[String]) -> Vec<Fetched> {
    let procs: Vec<Proc> = paths
        .iter()
        .map(|path| {
            start_curl(
                lab,
                curl,
                &curl_args(target, std::slice::from_ref(path), false),
            )
        })
        .collect();
    let mut fetched = Vec::new();
    for (path, proc) in paths.iter().zip(procs) {
        let (status, lines) = proc.finish().expect("curl ends");
        let mut one = fetched_from(target, &lines);
        assert_eq!(
            one.len(),
            1,
            "curl ({status}) for {path} reported it: {lines:?}"
        );
        fetched.append(&mut one);
    }
    fetched
}

/// Waits (at most 10 s) until `count` of process `index`'s JSON lines
/// reaches `want`.
pub fn wait_for(lab: &Lab, index: usize, want: usize, count: impl Fn(&[Value]) -> usize) {
    wait_for_lines(|| lab.proxy_log(index), want, count);
}

/// As [`wait_for`], for the JSON lines `read` gives (a log file, say).
pub fn wait_for_lines(
    read: impl Fn() -> Vec<Value>,
    want: usize,
    count: impl Fn(&[Value]) -> usize,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&read()) < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The path of a line of the origin's (or of a proxy's that prints `path`).
pub fn path_of(entry: &Value) -> &str {
    entry["path"].as_str().unwrap_or_default()
}

/// The path of a connredir-proxy log line (its first HTTP request).
pub fn ours_path(entry: &Value) -> &str {
    entry["http"]["path"].as_str().unwrap_or_default()
}
