//! End-to-end tests that a client cannot step around the reference proxy's
//! rules: each client runs as an unprivileged user (uid 65534) in the
//! scope, the real layer redirects it to the real `connredir-proxy`, and a
//! loopback origin server records every byte that reaches it.
//!
//! The ways around a `host` rule: a TLS ClientHello sent late, or padded
//! past what the proxy reads; an absolute-form request target naming a
//! denied host under an allowed Host header; a second request on a
//! keep-alive connection (sent after the first, or pipelined with it).
//! And the limits: a cap on concurrent connections, and on the time a
//! client may take before sending anything.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use connredir_testkit::{free_addr, require_program, workspace_bin, Lab, Proc};
use serde_json::Value;

/// The unprivileged user every client runs as.
const NOBODY: u32 = 65534;

/// A denied name, and one that no rule names.
const DENIED: &str = "denied.example";
const ALLOWED: &str = "allowed.test";

/// The bytes one connection brought, shared with its thread.
type Received = Arc<Mutex<Vec<u8>>>;

/// The origin server: records, per connection, every byte it receives, and
/// answers each HTTP request head it sees with a small keep-alive 200.
struct Origin {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<Received>>>,
}

impl Origin {
    fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.2:0").expect("origin listens");
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<Received>>> = Arc::default();
        let all = Arc::clone(&connections);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let received = Arc::new(Mutex::new(Vec::new()));
                all.lock().unwrap().push(Arc::clone(&received));
                std::thread::spawn(move || serve(stream, &received));
            }
        });
        Origin { addr, connections }
    }

    /// What each connection brought so far.
    fn received(&self) -> Vec<Vec<u8>> {
        let connections = self.connections.lock().unwrap();
        connections
            .iter()
            .map(|c| c.lock().unwrap().clone())
            .collect()
    }

    /// Whether any byte sequence `needle` reached the origin.
    fn saw(&self, needle: &str) -> bool {
        self.received()
            .iter()
            .any(|bytes| contains(bytes, needle.as_bytes()))
    }
}

fn serve(mut stream: TcpStream, received: &Mutex<Vec<u8>>) {
    let mut unanswered = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        received.lock().unwrap().extend_from_slice(&buf[..n]);
        unanswered.extend_from_slice(&buf[..n]);
        while let Some(end) = find(&unanswered, b"\r\n\r\n") {
            unanswered.drain(..end + 4);
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
            if stream.write_all(answer).is_err() {
                return;
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// A lab with an origin on 127.0.0.2 and `connredir-proxy` (with `args`)
/// as the service its connections are redirected to. Returns the lab, the
/// origin and the proxy's index in `lab.procs`.
fn filtered(name: &str, args: &[&str]) -> Option<(Lab, Origin, usize)> {
    let mut lab = Lab::new(name)?;
    let origin = Origin::start();
    let listen = free_addr("127.0.0.1");
    let port = Some(origin.addr.port());
    let (_, cgroup) = lab.own_service("filter", &[listen], "127.0.0.2/32", port, 1);
    let listen = listen.to_string();
    let mut all = vec!["--name", "filter", "--listen", &listen];
    all.extend_from_slice(args);
    let proxy = Proc::spawn_program(&cgroup, None, &workspace_bin("connredir-proxy"), &all)
        .expect("start connredir-proxy");
    proxy
        .wait_line("proxy ready", |l| l == "ready")
        .expect("connredir-proxy starts with these options");
    lab.procs.push(proxy);
    let index = lab.procs.len() - 1;
    Some((lab, origin, index))
}

/// A Python 3 the unprivileged user can run (a version manager's shim
/// under root's home directory is out of its reach).
fn python(test: &str) -> Option<PathBuf> {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| require_program(test, "python3"))
}

/// The Python client: `MODE HOST PORT [ARG...]`, one JSON line on stdout.
///
/// - `hello NAME DELAY PAD`: a real ClientHello (OpenSSL's, through the
///   ssl module) for NAME, sent DELAY seconds after connecting, with a
///   padding extension of PAD bytes placed before the server name (in
///   records of 16 KiB);
/// - `raw HEX`: these bytes at once;
/// - `hold N`: N connections that send nothing; reports after how many
///   seconds each was closed (null: still open after 6 s);
/// - `get N NAME`: N connections open at once, each sending an HTTP
///   request for host NAME once all are open; reports how many were
///   answered with a 200.
///
/// Each sending mode then reads until the connection ends (at most 5 s)
/// and reports what came back.
const CLIENT: &str = r#"
import json, select, socket, ssl, sys, time

def client_hello(name, pad):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=name)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    record = outgoing.read()
    assert record[0] == 0x16, record[:5]
    handshake = record[5:5 + int.from_bytes(record[3:5], "big")]
    body = handshake[4:]
    at = 2 + 32
    at += 1 + body[at]
    at += 2 + int.from_bytes(body[at:at + 2], "big")
    at += 1 + body[at]
    extensions = body[at + 2:]
    if pad:
        extensions = (21).to_bytes(2, "big") + pad.to_bytes(2, "big") + bytes(pad) + extensions
    body = body[:at] + len(extensions).to_bytes(2, "big") + extensions
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    out = b""
    for i in range(0, len(handshake), 16384):
        chunk = handshake[i:i + 16384]
        out += b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
    return out

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
report = {}
if mode == "hold":
    n = int(sys.argv[4])
    socks, closed = [], []
    for _ in range(n):
        try:
            socks.append(socket.create_connection((host, port), timeout=5))
            closed.append(None)
        except ConnectionResetError:
            # Accepted and reset before connect() returned: closed at once.
            socks.append(None)
            closed.append(0.0)
    start = time.monotonic()
    while time.monotonic() - start < 6 and None in closed:
        open_ = [s for s, c in zip(socks, closed) if c is None]
        ready, _, _ = select.select(open_, [], [], 0.05)
        for s in ready:
            try:
                data = s.recv(1)
            except OSError:
                data = b""
            if not data:
                closed[socks.index(s)] = round(time.monotonic() - start, 2)
    report["closed"] = closed
elif mode == "get":
    n, name = int(sys.argv[4]), sys.argv[5]
    socks = [socket.create_connection((host, port), timeout=5) for _ in range(n)]
    request = ("GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % name).encode()
    for s in socks:
        s.sendall(request)
    answered = 0
    for s in socks:
        received = b""
        try:
            while not received.endswith(b"ok\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                received += chunk
        except OSError:
            pass
        answered += received.startswith(b"HTTP/1.1 200 OK")
        s.close()
    report["answered"] = answered
else:
    if mode == "hello":
        data = client_hello(sys.argv[4], int(sys.argv[6]))
        delay = float(sys.argv[5])
    else:
        data = bytes.fromhex(sys.argv[4])
        delay = 0
    s = socket.create_connection((host, port), timeout=5)
    time.sleep(delay)
    report["sent"] = len(data)
    try:
        s.sendall(data)
    except OSError as e:
        report["send_error"] = str(e)
    received = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
    except OSError as e:
        report["recv_error"] = str(e)
    report["received"] = received.decode("latin-1")
print(json.dumps(report), flush=True)
"#;

/// Runs the Python client as the unprivileged user in the scope and returns
/// its report.
fn python_client(lab: &Lab, python: &Path, dst: SocketAddr, mode: &[&str]) -> Value {
    let (host, port) = (dst.ip().to_string(), dst.port().to_string());
    let mut args = vec!["-c", CLIENT, mode[0], &host, &port];
    args.extend_from_slice(&mode[1..]);
    let proc = Proc::spawn_program(&lab.cgroup("scope/client"), Some(NOBODY), python, &args)
        .expect("start the python client");
    let (status, lines) = proc.finish().unwrap();
    assert!(
        status.success(),
        "python client {mode:?}: {status}: {lines:?}"
    );
    serde_json::from_str(lines.last().expect("a report")).unwrap()
}

/// Runs curl as the unprivileged user in the scope; returns what it printed.
fn curl(lab: &Lab, curl: &Path, args: &[&str]) -> Vec<String> {
    let proc = Proc::spawn_program(&lab.cgroup("scope/client"), Some(NOBODY), curl, args)
        .expect("start curl");
    let (status, lines) = proc.finish().unwrap();
    assert!(status.success(), "curl {args:?}: {status}: {lines:?}");
    lines
}

/// Waits (at most 10 s) for proxy `index` to log `n` connections, and
/// checks it logged no more.
fn logged(lab: &Lab, index: usize, n: usize) -> Vec<Value> {
    let log = lab.wait_logged(index, n);
    // A line that should not exist may come a moment later.
    std::thread::sleep(Duration::from_millis(200));
    let log = if log.len() == n {
        lab.proxy_log(index)
    } else {
        log
    };
    assert_eq!(log.len(), n, "{log:#?}");
    log
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A TLS ClientHello that names a denied server only after the proxy
/// stopped waiting (2 s by default) is denied, with a reason that says the
/// first bytes named no host in time; the origin never sees it. Sent at
/// once, a hello for an allowed name passes and one for a denied name is
/// denied by the rule, as before.
#[test]
fn a_late_client_hello_is_denied_under_a_host_rule() {
    let Some(python) = python("pevade-late") else {
        return;
    };
    let rule = format!("deny:host:{DENIED}");
    let Some((lab, origin, proxy)) = filtered("pevade-late", &["--rule", &rule]) else {
        return;
    };
    let dst = origin.addr;
    let late = python_client(&lab, &python, dst, &["hello", DENIED, "2.5", "0"]);
    let log = logged(&lab, proxy, 1);
    assert_eq!(
        log[0]["verdict"], "deny",
        "late hello: {:#?} {late}",
        log[0]
    );
    let reason = log[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("no host name") && reason.contains("2s"),
        "{reason}"
    );
    assert!(!origin.saw(DENIED), "the late hello reached the origin");

    python_client(&lab, &python, dst, &["hello", ALLOWED, "0", "0"]);
    python_client(&lab, &python, dst, &["hello", DENIED, "0", "0"]);
    let log = logged(&lab, proxy, 3);
    assert_eq!(log[1]["verdict"], "allow", "{:#?}", log[1]);
    assert_eq!(log[1]["server_name"], ALLOWED, "{:#?}", log[1]);
    assert_eq!(log[2]["verdict"], "deny", "{:#?}", log[2]);
    assert_eq!(log[2]["reason"], format!("rule 1: {rule}"));
    assert!(origin.saw(ALLOWED));
    assert!(!origin.saw(DENIED));
}

/// A ClientHello padded past the 16 KiB the proxy reads, with its server
/// name after the padding, is denied under a host rule (too large to find a
/// name in), and never reaches the origin.
#[test]
fn a_client_hello_padded_past_the_inspection_limit_is_denied() {
    let Some(python) = python("pevade-pad") else {
        return;
    };
    let rule = format!("deny:host:{DENIED}");
    let Some((lab, origin, proxy)) = filtered("pevade-pad", &["--rule", &rule]) else {
        return;
    };
    let report = python_client(&lab, &python, origin.addr, &["hello", DENIED, "0", "17000"]);
    assert!(report["sent"].as_u64().unwrap() > 17_000, "{report}");
    let log = logged(&lab, proxy, 1);
    assert_eq!(log[0]["verdict"], "deny", "{:#?}", log[0]);
    let reason = log[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("no host name") && reason.contains("16 KiB"),
        "{reason}"
    );
    assert!(!origin.saw(DENIED), "the padded hello reached the origin");
    assert_eq!(log[0]["bytes_up"], 0, "{:#?}", log[0]);
}

/// An absolute-form request target (`GET http://denied.example/`) counts
/// like the Host header: denied although the Host header is allowed, with
/// a 403, and the origin never sees the request. An allowed absolute-form
/// target passes.
#[test]
fn an_absolute_form_target_for_a_denied_host_is_denied() {
    let Some(curl_path) = require_program("pevade-abs", "curl") else {
        return;
    };
    let rule = format!("deny:host:{DENIED}");
    let Some((lab, origin, proxy)) = filtered("pevade-abs", &["--rule", &rule]) else {
        return;
    };
    let url = format!("http://{}/", origin.addr);
    let host = format!("Host: {ALLOWED}");
    let code = |target: &str| {
        let args = [
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            "--request-target",
            target,
            "-H",
            &host,
            &url,
        ];
        curl(&lab, &curl_path, &args)
    };
    assert_eq!(code(&format!("http://{DENIED}/secret")), ["403"]);
    assert_eq!(code("http://fine.test/open"), ["200"]);
    let log = logged(&lab, proxy, 2);
    assert_eq!(log[0]["verdict"], "deny", "{:#?}", log[0]);
    assert_eq!(log[0]["reason"], format!("rule 1: {rule}"));
    assert_eq!(log[0]["bytes_up"], 0, "{:#?}", log[0]);
    assert_eq!(log[1]["verdict"], "allow", "{:#?}", log[1]);
    assert!(!origin.saw(DENIED), "{:?}", origin.received());
    assert!(origin.saw("GET http://fine.test/open"));
}

/// Every request on a keep-alive connection is checked: curl's second
/// request on the same connection, for a denied host, gets a 403 and never
/// reaches the origin; so does a denied request pipelined behind an
/// allowed one. Bodies are not requests: a denied name inside a
/// Content-Length or chunked body passes, and the request after such a
/// body is found and checked.
#[test]
fn every_request_on_a_keep_alive_connection_is_checked() {
    let (Some(curl_path), Some(python)) = (
        require_program("pevade-keepalive", "curl"),
        python("pevade-keepalive"),
    ) else {
        return;
    };
    let rule = format!("deny:host:{DENIED}");
    let Some((lab, origin, proxy)) = filtered("pevade-keepalive", &["--rule", &rule]) else {
        return;
    };
    let dst = origin.addr;
    let (one, two) = (format!("http://{dst}/one"), format!("http://{dst}/two"));
    let (allowed, denied) = (format!("Host: {ALLOWED}"), format!("Host: {DENIED}"));
    let out = "%{http_code} %{num_connects}\n";
    let common = ["-sS", "--max-time", "10", "-o", "/dev/null", "-w", out];
    let mut args = common.to_vec();
    args.extend(["-H", &allowed, &one, "--next"]);
    args.extend(common);
    args.extend(["-H", &denied, &two]);
    // The second request went on the first one's connection (0 new).
    assert_eq!(curl(&lab, &curl_path, &args), ["200 1", "403 0"]);
    let log = logged(&lab, proxy, 1);
    assert_eq!(log[0]["verdict"], "deny", "{:#?}", log[0]);
    assert_eq!(log[0]["reason"], format!("rule 1: {rule}"));
    assert!(origin.saw("GET /one"));
    assert!(!origin.saw("/two"), "{:?}", origin.received());

    // Pipelined: both requests in one write.
    let pipelined =
        format!("GET /three HTTP/1.1\r\n{allowed}\r\n\r\nGET /four HTTP/1.1\r\n{denied}\r\n\r\n");
    python_client(&lab, &python, dst, &["raw", &hex(pipelined.as_bytes())]);
    let log = logged(&lab, proxy, 2);
    assert_eq!(log[1]["verdict"], "deny", "{:#?}", log[1]);
    assert!(origin.saw("GET /three"));
    assert!(!origin.saw("/four"), "{:?}", origin.received());

    // Bodies that look like requests are bodies; what follows them is not.
    let fake = format!("GET /in-body HTTP/1.1\r\n{denied}\r\n\r\n");
    let sized = format!(
        "POST /sized HTTP/1.1\r\n{allowed}\r\nContent-Length: {}\r\n\r\n{fake}",
        fake.len()
    );
    let chunked = format!(
        "POST /chunked HTTP/1.1\r\n{allowed}\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{fake}\r\n5;ext=1\r\nhello\r\n0\r\nTrailer: x\r\n\r\n",
        fake.len()
    );
    let last = format!("GET /five HTTP/1.1\r\n{allowed}\r\n\r\n");
    let all = format!("{sized}{chunked}{last}");
    python_client(&lab, &python, dst, &["raw", &hex(all.as_bytes())]);
    let log = logged(&lab, proxy, 3);
    assert_eq!(log[2]["verdict"], "allow", "{:#?}", log[2]);
    let received = origin.received();
    assert!(
        received.iter().any(|c| c == all.as_bytes()),
        "the origin got every byte: {received:?}"
    );
    let then_denied = format!("{chunked}GET /six HTTP/1.1\r\n{denied}\r\n\r\n");
    python_client(&lab, &python, dst, &["raw", &hex(then_denied.as_bytes())]);
    let log = logged(&lab, proxy, 4);
    assert_eq!(log[3]["verdict"], "deny", "{:#?}", log[3]);
    assert!(!origin.saw("/six"), "{:?}", origin.received());
}

/// Of the connections a `hold` client reported closed (seconds after
/// connecting; null: never), how many were closed at once (under 0.7 s)
/// and how many by the first-bytes timeout of 1 s (0.7 s to 4 s).
fn closed_at_once_and_timed_out(report: &Value) -> (usize, usize) {
    let closed: Vec<f64> = report["closed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_f64().unwrap_or(f64::INFINITY))
        .collect();
    let at_once = closed.iter().filter(|&&t| t < 0.7).count();
    let timed_out = closed.iter().filter(|&&t| (0.7..4.0).contains(&t)).count();
    (at_once, timed_out)
}

/// `--max-connections`: connections past the cap are closed at once, each
/// with a log line saying so; `--first-bytes-timeout`: a connection that
/// sends nothing is closed when the time is up, with a log line saying so.
#[test]
fn connections_past_the_cap_and_silent_clients_are_closed() {
    let Some(python) = python("pevade-limits") else {
        return;
    };
    let args = ["--max-connections", "4", "--first-bytes-timeout", "1s"];
    let Some((lab, origin, proxy)) = filtered("pevade-limits", &args) else {
        return;
    };
    let started = Instant::now();
    let report = python_client(&lab, &python, origin.addr, &["hold", "6"]);
    assert_eq!(closed_at_once_and_timed_out(&report), (2, 4), "{report}");
    let log = logged(&lab, proxy, 6);
    let reasons: Vec<&str> = log
        .iter()
        .map(|l| l["reason"].as_str().unwrap_or_default())
        .collect();
    let capped = reasons
        .iter()
        .filter(|r| r.contains("--max-connections"))
        .count();
    let silent = reasons
        .iter()
        .filter(|r| r.contains("--first-bytes-timeout"))
        .count();
    assert_eq!((capped, silent), (2, 4), "{log:#?}");
    assert!(log.iter().all(|l| l["verdict"] == "deny"), "{log:#?}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

/// `--workers 2`: each worker listens on the service address with a socket
/// of its own (SO_REUSEPORT), each of which the layer takes for the
/// service's listener, and each serves the connections it accepted; the
/// log names the worker.
#[test]
fn two_workers_each_serve_connections() {
    let Some(python) = python("pevade-workers") else {
        return;
    };
    let args = ["--workers", "2", "--rule", "deny:host:*.example"];
    let Some((lab, origin, proxy)) = filtered("pevade-workers", &args) else {
        return;
    };
    // 64 connections from as many ports: that one worker gets none of
    // them happens once in 2^63.
    let report = python_client(&lab, &python, origin.addr, &["get", "64", ALLOWED]);
    assert_eq!(report["answered"], 64, "{report}");
    let log = logged(&lab, proxy, 64);
    assert!(
        log.iter()
            .all(|l| l["verdict"] == "allow" && l["chain"].as_array().is_some_and(|c| c.len() == 1)),
        "{log:#?}"
    );
    let mut per_worker = [0; 2];
    for line in &log {
        let worker = line["worker"].as_u64().expect("the log names the worker");
        per_worker[usize::try_from(worker).unwrap()] += 1;
    }
    assert!(per_worker.iter().all(|&n| n > 0), "{per_worker:?}");
    // A denied host is denied whichever worker accepted it.
    let request = format!("GET / HTTP/1.1\r\nHost: {DENIED}\r\n\r\n");
    let report = python_client(
        &lab,
        &python,
        origin.addr,
        &["raw", &hex(request.as_bytes())],
    );
    assert!(
        report["received"]
            .as_str()
            .unwrap()
            .starts_with("HTTP/1.1 403"),
        "{report}"
    );
    assert!(!origin.saw(DENIED), "{:?}", origin.received());
}

/// `--max-connections` holds across workers: with 2 workers and a cap of
/// 4, of 6 connections 2 are refused at once, however the kernel spread
/// them over the workers (a cap per worker would refuse none).
#[test]
fn the_connection_cap_counts_across_workers() {
    let Some(python) = python("pevade-workercap") else {
        return;
    };
    let args = [
        "--workers",
        "2",
        "--max-connections",
        "4",
        "--first-bytes-timeout",
        "1s",
    ];
    let Some((lab, origin, proxy)) = filtered("pevade-workercap", &args) else {
        return;
    };
    let report = python_client(&lab, &python, origin.addr, &["hold", "6"]);
    assert_eq!(closed_at_once_and_timed_out(&report), (2, 4), "{report}");
    let log = logged(&lab, proxy, 6);
    let capped = log
        .iter()
        .filter(|l| {
            l["reason"]
                .as_str()
                .is_some_and(|r| r.contains("--max-connections"))
        })
        .count();
    assert_eq!(capped, 2, "{log:#?}");
}
