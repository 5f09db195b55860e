//! An HTTP world for tests of third-party proxies as services: an origin
//! (a small Python HTTP server that prints one JSON line per request) and
//! curl clients, both run as the unprivileged user, the way to wait for a
//! process's JSON lines, and the round-by-round check of a third-party
//! proxy chained with connredir-proxy ([`ChainRounds`]). mitmproxy.rs,
//! squid.rs and v2ray.rs use it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use connredir_engine::ServiceId;
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

/// One round of [`ChainRounds`], as the third-party proxy's own check sees
/// it.
pub struct Round<'a> {
    /// The round's number, from 0.
    pub number: usize,
    /// The prefix of the round's paths (`/r<number>/`).
    pub prefix: &'a str,
    /// The round's requests, as curl reported them.
    pub fetched: &'a [Fetched],
}

impl Round<'_> {
    /// The clients' own addresses (curl's local addresses) this round.
    pub fn clients(&self) -> BTreeSet<&str> {
        self.fetched.iter().map(|f| f.local.as_str()).collect()
    }

    /// How many of `lines` name each of the round's paths (`path` reads a
    /// line's path).
    pub fn count_paths(
        &self,
        lines: &[Value],
        path: fn(&Value) -> &str,
    ) -> BTreeMap<String, usize> {
        let mut seen = BTreeMap::<String, usize>::new();
        for line in lines.iter().filter(|e| path(e).starts_with(self.prefix)) {
            *seen.entry(path(line).to_string()).or_default() += 1;
        }
        seen
    }
}

/// A third-party proxy as a service, alone or with connredir-proxy before
/// or after it, checked round by round: `at_once` curl processes started
/// together fetch one path each from the origin; each round, every request
/// is answered by the origin and reaches it once, connredir-proxy (when
/// there) sees each once with the chain so far, the original destination
/// and a client's flow (its own client when it comes first; some client of
/// the round when it comes after the third-party proxy, which may swap
/// records), and the layer counts one redirect per service and one
/// inherited record per request. What the third-party proxy itself logged
/// is its own check's.
pub struct ChainRounds<'a> {
    /// The lab.
    pub lab: &'a Lab,
    /// curl.
    pub curl: &'a Path,
    /// The origin ([`start_origin`]) and its index in `lab.procs`.
    pub origin: (SocketAddr, usize),
    /// The third-party proxy's service.
    pub third_party: ServiceId,
    /// connredir-proxy's service and index in `lab.procs`, when it takes
    /// part.
    pub ours: Option<(ServiceId, usize)>,
    /// Whether connredir-proxy comes before the third-party proxy.
    pub ours_first: bool,
    /// Rounds, and clients at once in each.
    pub rounds: usize,
    /// Clients at once in each round.
    pub at_once: usize,
}

impl ChainRounds<'_> {
    /// Runs the rounds. `third_party` waits for the third-party proxy's
    /// lines of a round and says what is wrong with them. Fails with every
    /// round's problems, `what` naming the case.
    pub fn run(&self, what: &str, mut third_party: impl FnMut(&Round) -> Vec<String>) {
        let (origin, origin_log) = self.origin;
        let services = if self.ours.is_some() { 2 } else { 1 };
        let mut failures = Vec::new();
        for number in 0..self.rounds {
            let before = round_counters(self.lab);
            let prefix = format!("/r{number}/");
            let paths: Vec<String> = (0..self.at_once).map(|i| format!("{prefix}c{i}")).collect();
            let fetched = fetch_each(self.lab, self.curl, origin, &paths);
            let round = Round {
                number,
                prefix: &prefix,
                fetched: &fetched,
            };
            let of_round = |log: &[Value], path: fn(&Value) -> &str| {
                log.iter().filter(|e| path(e).starts_with(&prefix)).count()
            };
            wait_for(self.lab, origin_log, self.at_once, |l| of_round(l, path_of));
            if let Some((_, ours)) = self.ours {
                wait_for(self.lab, ours, self.at_once, |l| of_round(l, ours_path));
            }
            // A little longer, for lines that should not come (a second
            // pass).
            std::thread::sleep(Duration::from_millis(300));

            let mut problems = third_party(&round);
            for f in &fetched {
                if f.code != 200 || f.answered != f.path {
                    problems.push(format!(
                        "{}: status {}, origin's path {:?}, curl: {}",
                        f.path, f.code, f.answered, f.error
                    ));
                }
            }
            let at_origin = round.count_paths(&self.lab.proxy_log(origin_log), path_of);
            for path in &paths {
                if at_origin.get(path) != Some(&1) {
                    problems.push(format!(
                        "{path}: origin saw it {:?} times",
                        at_origin.get(path)
                    ));
                }
            }
            if let Some(ours) = self.ours {
                problems.extend(self.check_ours(&round, ours, &paths));
            }
            let after = round_counters(self.lab);
            let (redirects, inherited) = (after[0] - before[0], after[1] - before[1]);
            let want_redirects = (services * self.at_once) as u64;
            if redirects != want_redirects || inherited != self.at_once as u64 {
                problems.push(format!(
                    "redirects {redirects} (want {want_redirects}), records inherited \
                     {inherited} (want {})",
                    self.at_once
                ));
            }
            if !problems.is_empty() {
                failures.push(format!("round {number}:\n  {}", problems.join("\n  ")));
            }
        }
        assert!(
            failures.is_empty(),
            "{what}: every request must be answered by the origin, reach it once and pass \
             each proxy once, with a record:\n{}",
            failures.join("\n")
        );
    }

    /// connredir-proxy's lines of `round`: each path once, with the chain
    /// so far, the original destination, and each flow once.
    fn check_ours(
        &self,
        round: &Round,
        (ours_id, ours): (ServiceId, usize),
        paths: &[String],
    ) -> Vec<String> {
        let mut problems = Vec::new();
        let origin = self.origin.0.to_string();
        let lines: Vec<Value> = self
            .lab
            .proxy_log(ours)
            .into_iter()
            .filter(|e| ours_path(e).starts_with(round.prefix))
            .collect();
        let at_ours = round.count_paths(&lines, ours_path);
        let expected_chain: Vec<u64> = if self.ours_first {
            vec![ours_id.0.into()]
        } else {
            vec![self.third_party.0.into(), ours_id.0.into()]
        };
        let own_client: BTreeMap<&str, &str> = round
            .fetched
            .iter()
            .map(|f| (f.path.as_str(), f.local.as_str()))
            .collect();
        let clients = round.clients();
        let mut flows = BTreeSet::new();
        for line in &lines {
            let chain: Vec<u64> = line["chain"]
                .as_array()
                .map(|c| c.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default();
            let flow = line["flow"].as_str().unwrap_or_default();
            // After the third-party proxy, a flow carries some client's
            // record of the round (such a proxy may connect in its own
            // order); first on the flow, connredir-proxy sees each
            // client's own.
            let flow_ok = if self.ours_first {
                own_client.get(ours_path(line)).copied() == Some(flow)
            } else {
                clients.contains(flow)
            };
            if chain != expected_chain
                || line["original_dst"] != origin.as_str()
                || line["verdict"] != "allow"
                || !flow_ok
                || !flows.insert(flow.to_string())
            {
                problems.push(format!("connredir-proxy: {line}"));
            }
        }
        for path in paths {
            if at_ours.get(path) != Some(&1) {
                problems.push(format!(
                    "{path}: connredir-proxy saw it {:?} times",
                    at_ours.get(path)
                ));
            }
        }
        problems
    }
}

/// The counters a round follows: redirects and records inherited.
fn round_counters(lab: &Lab) -> [u64; 2] {
    let c = lab.engine.counters().expect("the layer's counters");
    [c.redirects, c.records_inherited]
}
