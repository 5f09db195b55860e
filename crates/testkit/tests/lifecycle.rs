//! `connredir up` / `down` as a long-running service: pinning, restart
//! without losing connections or rules, one `up` at a time, and nothing left
//! behind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use connredir_testkit::{
    eventually, free_addr, require_privileges, require_program, test_tree, workspace_bin,
    CgroupTree, EchoServer, Proc, UdpEchoServer,
};
use serde_json::Value;

/// Programs `up` attaches to each cgroup of its scope: connect4/6,
/// bind4/6, sockops, getsockopt, setsockopt, sendmsg4/6, recvmsg4/6,
/// getpeername4/6, sock_release.
const PER_CGROUP: usize = connredir_engine::CGROUP_PROGRAMS;

/// One test's `up` setup: a cgroup tree, a config, a pin and state dir.
struct Service {
    tree: CgroupTree,
    config: PathBuf,
    pin_dir: PathBuf,
    state_dir: PathBuf,
}

impl Service {
    fn new(
        name: &str,
        server: std::net::SocketAddr,
        proxy: std::net::SocketAddr,
    ) -> Option<Service> {
        if !require_privileges(name) {
            return None;
        }
        let tree = test_tree(name).unwrap();
        let scope = tree.cgroup("scope").unwrap();
        let services = tree.cgroup("services").unwrap();
        let proxy_cgroup = tree.cgroup("services/proxy").unwrap();
        tree.cgroup("engine").unwrap();
        let dir = std::env::temp_dir().join(format!("connredir-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("connredir.toml");
        std::fs::write(
            &config,
            format!(
                r#"[scope]
cgroups = ["{scope}", "{services}"]

[[service]]
name = "proxy"
listen = ["{proxy}"]
identity = {{ cgroups = ["{proxy_cgroup}"] }}

[[rule]]
service = "proxy"
destinations = ["{ip}/32"]
ports = ["{port}"]
"#,
                scope = scope.display(),
                services = services.display(),
                proxy_cgroup = proxy_cgroup.display(),
                ip = server.ip(),
                port = server.port(),
            ),
        )
        .unwrap();
        Some(Service {
            tree,
            config,
            pin_dir: PathBuf::from(format!(
                "/sys/fs/bpf/connredir-test-{name}-{}",
                std::process::id()
            )),
            state_dir: dir.join("state"),
        })
    }

    fn places(&self) -> Vec<String> {
        vec![
            "--pin-dir".into(),
            self.pin_dir.display().to_string(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
        ]
    }

    /// Starts `connredir up` and waits until its links are pinned.
    fn up(&self) -> Proc {
        self.up_with(&[])
    }

    /// Starts `connredir ARGS` with this test's pin and state places, in
    /// the tree's `engine` cgroup.
    fn spawn(&self, args: &[&str]) -> Proc {
        let places = self.places();
        let mut all = args.to_vec();
        all.extend(places.iter().map(String::as_str));
        Proc::spawn_program(
            &self.cgroup("engine"),
            None,
            &workspace_bin("connredir"),
            &all,
        )
        .unwrap()
    }

    /// `up` with more arguments.
    fn up_with(&self, extra: &[&str]) -> Proc {
        let config = self.config.display().to_string();
        let mut args = vec!["up", "--config", &config];
        args.extend_from_slice(extra);
        let proc = self.spawn(&args);
        // Loading the programs takes seconds on a busy machine.
        let deadline = Instant::now() + Duration::from_secs(60);
        // The programs of 2 cgroups, and the lock names the new pid.
        while !(self.links() == 2 * PER_CGROUP && self.lock_pid() == Some(proc.pid())) {
            assert!(Instant::now() < deadline, "up did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Answered once its services and rules are registered: a proxy
        // started after this finds its address registered when it binds.
        while !self.command(&["status"]).status.success() {
            assert!(Instant::now() < deadline, "up does not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
        proc
    }

    fn lock_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.state_dir.join("lock"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn links(&self) -> usize {
        std::fs::read_dir(&self.pin_dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("link-"))
                    .count()
            })
            .unwrap_or(0)
    }

    fn command(&self, args: &[&str]) -> std::process::Output {
        Command::new(workspace_bin("connredir"))
            .args(args)
            .args(self.places())
            .output()
            .unwrap()
    }

    fn cgroup(&self, relative: &str) -> PathBuf {
        self.tree.cgroup(relative).unwrap()
    }

    /// Runs one echo client in the scope and checks it succeeded.
    fn client(&self, server: std::net::SocketAddr, bytes: usize) {
        let (server, bytes) = (server.to_string(), bytes.to_string());
        let args = ["client", "--connect", &server, "--bytes", &bytes];
        let client = Proc::spawn(&self.cgroup("scope/client"), None, &args).unwrap();
        let (status, lines) = client.finish().unwrap();
        assert!(status.success(), "{lines:?}");
    }

    /// Starts the service's proxy in its cgroup and waits until it listens.
    fn start_proxy(&self, listen: std::net::SocketAddr) -> Proc {
        let listen = listen.to_string();
        let args = ["proxy", "--name", "proxy", "--listen", &listen];
        let proxy = Proc::spawn(&self.cgroup("services/proxy"), None, &args).unwrap();
        proxy.wait_line("proxy ready", |l| l == "ready").unwrap();
        proxy
    }

    /// Starts `trace --json -n 1 --decision DECISION` and runs `connect`
    /// until it prints (the trace flows only once `trace` is connected, so
    /// an early connection can be missed); returns the traced event.
    fn first_traced(&self, decision: &str, mut connect: impl FnMut()) -> Value {
        let trace = self.spawn(&["trace", "--json", "-n", "1", "--decision", decision]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while trace.lines().is_empty() {
            assert!(Instant::now() < deadline, "trace printed nothing");
            connect();
        }
        let (status, lines) = trace.finish().unwrap();
        assert!(status.success(), "{lines:?}");
        serde_json::from_str(&lines[0]).unwrap()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // Whatever happened, leave no pins behind.
        let _ = self.command(&["down"]);
        if let Some(dir) = self.config.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Programs attached to a cgroup, as bpftool lists them.
fn attached(bpftool: &Path, cgroup: &Path) -> Vec<String> {
    let out = Command::new(bpftool)
        .args(["cgroup", "show"])
        .arg(cgroup)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect()
}

/// Stops `connredir up` the way a service manager does (SIGTERM).
fn stop(proc: Proc) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
    unsafe { libc::kill(proc.pid() as i32, libc::SIGTERM) };
    let (status, _) = proc.finish().unwrap();
    assert!(status.success(), "up exited with {status}");
}

#[test]
fn up_and_down_leave_nothing_behind_and_one_up_at_a_time() {
    let Some(bpftool) = require_program("updown", "bpftool") else {
        return;
    };
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(svc) = Service::new("updown", server.addr(), free_addr("127.0.0.1")) else {
        return;
    };
    let scope = svc.cgroup("scope");
    assert!(attached(&bpftool, &scope).is_empty());
    assert!(!svc.pin_dir.exists());

    let up = svc.up();
    assert_eq!(
        attached(&bpftool, &scope).len(),
        PER_CGROUP,
        "{:?}",
        attached(&bpftool, &scope)
    );
    // A second up says so instead of attaching twice.
    let mut args = vec!["up", "--config", svc.config.to_str().unwrap()];
    let places = svc.places();
    args.extend(places.iter().map(String::as_str));
    let second = Command::new(workspace_bin("connredir"))
        .args(&args)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(said.contains("already running (pid"), "{said}");
    assert_eq!(attached(&bpftool, &scope).len(), PER_CGROUP);

    // Stopping up keeps the layer; down removes all of it, and only it.
    stop(up);
    assert_eq!(attached(&bpftool, &scope).len(), PER_CGROUP);
    let down = svc.command(&["down"]);
    assert!(down.status.success(), "{down:?}");
    assert!(attached(&bpftool, &scope).is_empty());
    assert!(attached(&bpftool, &svc.cgroup("services")).is_empty());
    assert!(!svc.pin_dir.exists());
}

#[test]
fn restart_keeps_open_connections_and_redirects_the_next_one() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let proxy_addr = free_addr("127.0.0.1");
    let Some(svc) = Service::new("restart", server.addr(), proxy_addr) else {
        return;
    };
    let up = svc.up();
    let proxy = svc.start_proxy(proxy_addr);

    let go = svc.config.with_file_name("go");
    let held = Proc::spawn(
        &svc.cgroup("scope/held"),
        None,
        &[
            "hold",
            "--connect",
            &server.addr().to_string(),
            "--until",
            go.to_str().unwrap(),
        ],
    )
    .unwrap();
    held.wait_line("first exchange", |l| l.contains("\"first\""))
        .unwrap();

    // Restart: stop up, start it again; then a new connection at once.
    stop(up);
    let _up = svc.up();
    svc.client(server.addr(), 5000);

    std::fs::write(&go, b"").unwrap();
    let (status, lines) = held.finish().unwrap();
    assert!(status.success(), "{lines:?}");
    let second: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(second["ok"], true, "{lines:?}");

    // Both connections went through the proxy, once each.
    let deadline = Instant::now() + Duration::from_secs(10);
    let logged = || proxy.lines().iter().filter(|l| l.starts_with('{')).count();
    while logged() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(logged(), 2, "{:?}", proxy.lines());
    assert_eq!(server.accepted().len(), 2);
}

#[test]
fn rules_and_services_change_at_run_time_through_the_control_socket() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let proxy_addr = free_addr("127.0.0.1");
    let Some(svc) = Service::new("control", server.addr(), proxy_addr) else {
        return;
    };
    let _up = svc.up();
    let proxy = svc.start_proxy(proxy_addr);
    let connect = || svc.client(server.addr(), 100);
    let logged = || proxy.lines().iter().filter(|l| l.starts_with('{')).count();
    let settle = || std::thread::sleep(Duration::from_millis(200));
    let status = || -> Value {
        let out = svc.command(&["status", "--json"]);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };

    connect();
    settle();
    assert_eq!(logged(), 1);
    let s = status();
    assert_eq!(s["rules"][0]["hits"], 1, "{s}");
    assert_eq!(s["services"][0]["up"], true, "{s}");

    // Without the rule, the next connection goes direct.
    let out = svc.command(&["rule", "del", "1"]);
    assert!(out.status.success(), "{out:?}");
    connect();
    settle();
    assert_eq!(logged(), 1);

    // A new rule applies to the next connection.
    let dst = format!("{}/32", server.addr().ip());
    let port = server.addr().port().to_string();
    let out = svc.command(&[
        "rule",
        "add",
        "--service",
        "proxy",
        "--dst",
        &dst,
        "--port",
        &port,
    ]);
    assert!(out.status.success(), "{out:?}");
    connect();
    settle();
    assert_eq!(logged(), 2);
    assert_eq!(server.accepted().len(), 3);

    // Mistakes are refused with a reason, and change nothing.
    let out = svc.command(&["rule", "add", "--service", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"nope\" is not registered"));
    let out = svc.command(&["service", "del", "proxy"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("still has rules"),
        "{out:?}"
    );
    assert_eq!(status()["rules"].as_array().unwrap().len(), 1);

    // A service's failure policy is set with it and shown.
    let optional = free_addr("127.0.0.1").to_string();
    let out = svc.command(&[
        "service",
        "add",
        "--name",
        "optional",
        "--listen",
        &optional,
        "--uid",
        "4243",
        "--on-down",
        "bypass",
    ]);
    assert!(out.status.success(), "{out:?}");
    let s = status();
    let policies: Vec<(&str, &str)> = s["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["on_down"].as_str().unwrap()))
        .collect();
    assert_eq!(
        policies,
        [("proxy", "block"), ("optional", "bypass")],
        "{s}"
    );
    let text = String::from_utf8(svc.command(&["service", "list"]).stdout).unwrap();
    assert!(text.contains("on down: bypass"), "{text}");
    let out = svc.command(&[
        "service",
        "add",
        "--name",
        "x",
        "--listen",
        &optional,
        "--on-down",
        "open",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("invalid value 'open' for '--on-down <ON_DOWN>'"),
        "{out:?}"
    );
}

/// GET http://addr/metrics.
fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    text
}

#[test]
fn conns_trace_and_metrics_show_a_redirected_connection() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let proxy_addr = free_addr("127.0.0.1");
    let Some(svc) = Service::new("observe", server.addr(), proxy_addr) else {
        return;
    };
    let metrics = free_addr("127.0.0.1");
    let up = svc.up_with(&["--metrics", &metrics.to_string()]);
    let _proxy = svc.start_proxy(proxy_addr);

    // A flow held open: `conns` lists it with its chain and client.
    let release = svc.config.with_file_name("release");
    let (connect, until) = (server.addr().to_string(), release.display().to_string());
    let hold = Proc::spawn(
        &svc.cgroup("scope/client"),
        None,
        &["hold", "--connect", &connect, "--until", &until],
    )
    .unwrap();
    hold.wait_line("first exchange", |l| l.contains("\"first\""))
        .unwrap();
    let out = svc.command(&["conns", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let conns: Value = serde_json::from_slice(&out.stdout).unwrap();
    let legs = conns.as_array().unwrap();
    assert_eq!(legs.len(), 1, "{conns}");
    assert_eq!(legs[0]["chain"], serde_json::json!(["proxy"]));
    assert_eq!(legs[0]["pid"], hold.pid());
    assert_eq!(legs[0]["original_dst"], server.addr().to_string());
    let text = String::from_utf8(svc.command(&["conns"]).stdout).unwrap();
    assert!(
        text.contains(&format!("{} connredir-testk", hold.pid())),
        "{text}"
    );
    assert!(text.contains("1 flows, 1 redirected sockets"), "{text}");

    let scraped = scrape(metrics);
    assert!(
        scraped.contains("connredir_live_connections 1\n"),
        "{scraped}"
    );
    assert!(
        scraped.contains("connredir_redirects_total 1\n"),
        "{scraped}"
    );
    assert!(
        scraped.contains("connredir_service_up{service=\"proxy\"} 1\n"),
        "{scraped}"
    );
    std::fs::write(&release, b"").unwrap();
    assert!(hold.finish().unwrap().0.success());

    // `trace` prints the decisions of new connections as they happen.
    let event = svc.first_traced("redirected", || svc.client(server.addr(), 10));
    assert_eq!(event["decision"], "redirected", "{event}");
    assert_eq!(event["service"], "proxy", "{event}");
    assert_eq!(event["destination"], server.addr().to_string());
    assert_eq!(event["command"], "connredir-testk");
    assert_eq!(event["state"], "NotRedirected");
    stop(up);
}

/// `status --json`'s entry for the one service.
fn service_status(svc: &Service) -> Value {
    let out = svc.command(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    status["services"][0].clone()
}

/// A service whose rule is UDP only is up while its own UDP socket is bound
/// on its address, and not listening otherwise, a TCP listener there
/// included (`status`, the `connredir_service_up` metric); `conns` lists a
/// UDP flow (client uid 65534) with its protocol, chain and original
/// destination, in JSON and text, until the client closes its socket.
#[test]
fn status_and_conns_show_a_udp_service_and_its_flows() {
    let server = UdpEchoServer::start("127.0.0.2:0").unwrap();
    let proxy_addr = free_addr("127.0.0.1");
    let Some(svc) = Service::new("observe-udp", server.addr(), proxy_addr) else {
        return;
    };
    let config = std::fs::read_to_string(&svc.config).unwrap();
    let config = config.replace("[[rule]]\n", "[[rule]]\nprotocol = \"udp\"\n");
    std::fs::write(&svc.config, config).unwrap();
    let metrics = free_addr("127.0.0.1");
    let up = svc.up_with(&["--metrics", &metrics.to_string()]);

    let service = service_status(&svc);
    assert_eq!(service["up"], false, "{service}");
    // A TCP listener on the address is not what a UDP rule needs.
    let tcp = std::net::TcpListener::bind(proxy_addr).unwrap();
    let service = service_status(&svc);
    assert_eq!(service["up"], false, "{service}");
    let text = String::from_utf8(svc.command(&["status"]).stdout).unwrap();
    assert!(text.contains("not listening"), "{text}");
    drop(tcp);

    let listen = proxy_addr.to_string();
    let args = ["udp-proxy", "--name", "proxy", "--listen", &listen];
    let proxy = Proc::spawn(&svc.cgroup("services/proxy"), None, &args).unwrap();
    proxy
        .wait_line("UDP service ready", |l| l == "ready")
        .unwrap();
    let service = service_status(&svc);
    assert_eq!(service["up"], true, "{service}");
    let text = String::from_utf8(svc.command(&["status"]).stdout).unwrap();
    assert!(!text.contains("not listening"), "{text}");
    let scraped = scrape(metrics);
    assert!(
        scraped.contains("connredir_service_up{service=\"proxy\"} 1\n"),
        "{scraped}"
    );

    // A UDP flow held open by an unprivileged client.
    let release = svc.config.with_file_name("release");
    let (connect, until) = (server.addr().to_string(), release.display().to_string());
    let args = ["udp-client", "--connect", &connect, "--until", &until];
    let client = Proc::spawn(&svc.cgroup("scope/client"), Some(65534), &args).unwrap();
    let report = client
        .wait_line("the client's report", |l| l.contains("\"ok\""))
        .unwrap();
    assert!(report.contains("\"ok\":true"), "{report}");
    let out = svc.command(&["conns", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let conns: Value = serde_json::from_slice(&out.stdout).unwrap();
    let legs = conns.as_array().unwrap();
    assert_eq!(legs.len(), 1, "{conns}");
    assert_eq!(legs[0]["protocol"], "udp", "{conns}");
    assert_eq!(legs[0]["chain"], serde_json::json!(["proxy"]), "{conns}");
    assert_eq!(legs[0]["pid"], client.pid(), "{conns}");
    assert_eq!(legs[0]["uid"], 65534, "{conns}");
    assert_eq!(legs[0]["original_dst"], server.addr().to_string());
    let text = String::from_utf8(svc.command(&["conns"]).stdout).unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("udp ")
            && l.contains(&format!("{} connredir-testk", client.pid()))
            && l.contains(&server.addr().to_string())),
        "{text}"
    );
    assert!(text.contains("1 flows, 1 redirected sockets"), "{text}");
    let scraped = scrape(metrics);
    assert!(
        scraped.contains("connredir_live_connections 1\n"),
        "{scraped}"
    );

    std::fs::write(&release, b"").unwrap();
    client
        .wait_line("the socket closed", |l| l.contains("\"closed\""))
        .unwrap();
    eventually("conns to empty once the client closed its socket", || {
        let out = svc.command(&["conns", "--json"]);
        let conns: Value = serde_json::from_slice(&out.stdout).ok()?;
        conns.as_array()?.is_empty().then_some(())
    });
    std::fs::remove_file(&release).unwrap();
    assert!(client.finish().unwrap().0.success());

    // The service gone, it is not listening again.
    drop(proxy);
    eventually("the service to be reported down", || {
        (service_status(&svc)["up"] == false).then_some(())
    });
    stop(up);
}

#[test]
fn up_as_an_ordinary_user_says_it_needs_root() {
    use std::os::unix::process::CommandExt;
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(svc) = Service::new("notroot", server.addr(), free_addr("127.0.0.1")) else {
        return;
    };
    // The config must be readable by the user.
    let dir = svc.config.parent().unwrap();
    Command::new("chmod")
        .arg("-R")
        .arg("a+rX")
        .arg(dir)
        .status()
        .unwrap();
    let out = Command::new(workspace_bin("connredir"))
        .args(["up", "--config"])
        .arg(&svc.config)
        .args(svc.places())
        .uid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: connredir must run as root to load BPF programs (it needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)\n"
    );
    assert!(!svc.state_dir.exists(), "nothing is made before the check");
}

/// Runs `connredir ARGS` (with the test's places) as uid 65534 and `gid`,
/// without supplementary groups.
fn as_nobody(svc: &Service, gid: u32, args: &[&str]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    Command::new(workspace_bin("connredir"))
        .args(args)
        .args(svc.places())
        .uid(65534)
        .gid(gid)
        .env("RUST_LOG", "off")
        .output()
        .unwrap()
}

/// The rule ids `status` shows, asked as root.
fn rule_ids(svc: &Service) -> Vec<u64> {
    let out = svc.command(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    status["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect()
}

#[test]
fn the_control_socket_serves_root_and_a_named_group_and_refuses_everyone_else() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(svc) = Service::new("control-access", server.addr(), free_addr("127.0.0.1")) else {
        return;
    };
    // The user must be able to reach the state directory to be refused by
    // the socket itself rather than by the path.
    let dir = svc.config.parent().unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let up = svc.up();
    let socket = svc.state_dir.join("control.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        (meta.mode() & 0o777, meta.uid(), meta.gid()),
        (0o600, 0, 0),
        "root's alone"
    );
    let root_only = "the control socket accepts root only (`connredir up --control-group GROUP` \
                     or [control] group lets a group in)\n";

    // The socket's mode keeps an ordinary user out, and the command says so.
    let out = as_nobody(&svc, 65534, &["status"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("error: connredir status: permission denied: {root_only}")
    );

    // Even with a socket anyone may open (an administrator's chmod), the
    // engine checks who is asking: nothing is read out or changed.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    for (args, command) in [
        (&["status"][..], "status"),
        (&["rule", "del", "1"][..], "rule del"),
        (&["conns", "--json"][..], "conns"),
        (&["trace", "-n", "1"][..], "trace"),
    ] {
        let out = as_nobody(&svc, 65534, args);
        assert!(!out.status.success(), "{args:?} was served: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            format!("error: connredir {command}: permission denied: {root_only}"),
            "{args:?}"
        );
    }
    assert_eq!(
        rule_ids(&svc),
        vec![1],
        "the refused rule del changed nothing"
    );
    stop(up);

    // A named group: its members are served, others are still refused.
    let _up = svc.up_with(&["--control-group", "nogroup"]);
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 65534));
    let out = as_nobody(&svc, 65534, &["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["services"][0]["name"], "proxy", "{status}");
    let out = as_nobody(&svc, 4242, &["status"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: connredir status: permission denied: the control socket accepts root and \
         members of group nogroup\n"
    );
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let rules = rule_ids(&svc);
    let first = rules[0].to_string();
    let out = as_nobody(&svc, 4242, &["rule", "del", &first]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: connredir rule del: permission denied: the control socket accepts root and \
         members of group nogroup\n"
    );
    assert_eq!(rule_ids(&svc), rules);
}

/// Runs `connredir up` with another configuration text (and more
/// arguments), expecting it to fail; returns what it said.
fn failed_up(svc: &Service, name: &str, config: &str, extra: &[&str]) -> String {
    let path = svc.config.with_file_name(name);
    std::fs::write(&path, config).unwrap();
    let out = Command::new(workspace_bin("connredir"))
        .arg("up")
        .arg("--config")
        .arg(&path)
        .args(svc.places())
        .args(extra)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{name}: up succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Configurations that `check` accepts but `up` cannot apply, each failing
/// at a different step: (file name, text, extra arguments, what up says).
fn failing_configs(
    svc: &Service,
    taken: std::net::SocketAddr,
) -> Vec<(&'static str, String, Vec<String>, String)> {
    let good = std::fs::read_to_string(&svc.config).unwrap();
    let root = svc.tree.root().display().to_string();
    let scope = svc.cgroup("scope").display().to_string();
    let inner = svc.cgroup("scope/inner").display().to_string();
    let plain = svc
        .config
        .parent()
        .unwrap()
        .canonicalize()
        .unwrap()
        .display()
        .to_string();
    let scope_line = good.lines().nth(1).unwrap().to_string();
    let with_scope = |extra: &str| {
        good.replace(
            &scope_line,
            &scope_line.replace("\"]", &format!("\", \"{extra}\"]")),
        )
    };
    // A second service with a uid identity and a rule, registered before
    // the third one fails: its entries must not stay.
    let more_services = format!(
        "{good}\n[[service]]\nname = \"extra\"\nlisten = [\"{extra}\"]\nidentity = {{ uids = [4242] }}\n\
         \n[[service]]\nname = \"ghost\"\nlisten = [\"{ghost}\"]\nidentity = {{ cgroups = [\"{root}/gone\"] }}\n",
        extra = free_addr("127.0.0.1"),
        ghost = free_addr("127.0.0.1"),
    );
    let with_rule = format!(
        "{good}\n[[service]]\nname = \"extra\"\nlisten = [\"{extra}\"]\nidentity = {{ uids = [4242] }}\n\
         \n[[rule]]\nservice = \"extra\"\nports = [\"1-65535\"]\n",
        extra = free_addr("127.0.0.1"),
    );
    vec![
        (
            // A directory, but no cgroup: fails where the programs attach.
            "not-a-cgroup.toml",
            with_scope(&plain),
            vec![],
            format!("{plain}: not a cgroup v2 directory"),
        ),
        (
            // A scope cgroup `up` creates, then a later step fails: the
            // created cgroup goes again (checked by the callers).
            "created-cgroup.toml",
            format!(
                "{}\n[[service]]\nname = \"ghost\"\nlisten = [\"{ghost}\"]\nidentity = {{ cgroups = [\"{root}/gone\"] }}\n",
                with_scope(&format!("{root}/missing")),
                ghost = free_addr("127.0.0.1"),
            ),
            vec![],
            format!("{root}/gone"),
        ),
        (
            // A missing scope cgroup `up` may not create: outside cgroup v2.
            "uncreatable-cgroup.toml",
            with_scope(&format!("{plain}/missing")),
            vec![],
            format!("scope cgroup {plain}/missing does not exist, and connredir creates scope cgroups only below the cgroup v2 root"),
        ),
        (
            "overlapping.toml",
            with_scope(&inner),
            vec![],
            format!("overlaps {scope}"),
        ),
        (
            "missing-identity.toml",
            more_services,
            vec![],
            format!("{root}/gone"),
        ),
        (
            // The proxy's service changes (so gets a new id, and its
            // listener is marked anew) before a later one fails.
            "changed-policy.toml",
            format!(
                "{}\n[[service]]\nname = \"ghost\"\nlisten = [\"{ghost}\"]\nidentity = {{ cgroups = [\"{root}/gone\"] }}\n",
                good.replace("name = \"proxy\"\n", "name = \"proxy\"\non_down = \"bypass\"\n"),
                ghost = free_addr("127.0.0.1"),
            ),
            vec![],
            format!("{root}/gone"),
        ),
        (
            "no-such-group.toml",
            good.clone(),
            vec!["--control-group".into(), "connredir-no-such-group".into()],
            "control group \"connredir-no-such-group\" does not exist".into(),
        ),
        (
            "metrics-taken.toml",
            with_rule,
            vec!["--metrics".into(), taken.to_string()],
            format!("--metrics {taken}: cannot listen there"),
        ),
    ]
}

/// What the layer looks like from outside: the programs attached to each
/// cgroup (with their ids), the pin directory, and the maps `up` writes.
fn layer_state(bpftool: &Path, svc: &Service) -> Vec<String> {
    let mut state = vec![];
    for cgroup in ["scope", "services", "scope/inner"] {
        state.push(format!(
            "{cgroup}: {:?}",
            attached(bpftool, &svc.cgroup(cgroup))
        ));
    }
    let mut pins: Vec<String> = std::fs::read_dir(&svc.pin_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    pins.sort();
    state.push(format!("pins: {pins:?}"));
    for map in [
        "services",
        "service_by_pid",
        "service_by_uid",
        "service_by_cgroup",
        "service_addrs",
        "rules",
        "rules_active",
        "rule_hits",
    ] {
        let out = Command::new(bpftool)
            .args(["map", "dump", "pinned"])
            .arg(svc.pin_dir.join(map))
            .output()
            .unwrap();
        state.push(format!("{map}: {}", String::from_utf8_lossy(&out.stdout)));
    }
    // The acceleration program attached to the pinned socket map.
    let json = |args: &[&str]| -> Value {
        let out = Command::new(bpftool).arg("-j").args(args).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let accel = svc.pin_dir.join("accel_socks").display().to_string();
    let map_id = json(&["map", "show", "pinned", &accel])["id"].clone();
    let programs: Vec<u64> = json(&["prog", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"] == "sk_msg")
        .filter(|p| p["map_ids"].as_array().is_some_and(|m| m.contains(&map_id)))
        .filter_map(|p| p["id"].as_u64())
        .collect();
    state.push(format!("accel programs: {programs:?}"));
    state
}

#[test]
fn a_failed_first_up_leaves_nothing_behind() {
    let Some(bpftool) = require_program("failed-up", "bpftool") else {
        return;
    };
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(svc) = Service::new("failed-up", server.addr(), free_addr("127.0.0.1")) else {
        return;
    };
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    for (name, text, extra, says) in failing_configs(&svc, taken.local_addr().unwrap()) {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let said = failed_up(&svc, name, &text, &extra);
        assert!(said.contains(&says), "{name}: {said}");
        for cgroup in ["scope", "services", "scope/inner"] {
            let programs = attached(&bpftool, &svc.cgroup(cgroup));
            assert!(programs.is_empty(), "{name}: {cgroup} has {programs:?}");
        }
        assert!(!svc.pin_dir.exists(), "{name}: pins left behind");
        assert!(
            !svc.tree.root().join("missing").exists(),
            "{name}: the created scope cgroup was left behind"
        );
        assert!(
            !svc.state_dir.join("control.sock").exists(),
            "{name}: control socket left behind"
        );
        let status = svc.command(&["status"]);
        assert!(!status.status.success(), "{name}: {status:?}");
    }
}

#[test]
fn a_failed_takeover_leaves_the_previous_layer_as_it_was() {
    let Some(bpftool) = require_program("failed-takeover", "bpftool") else {
        return;
    };
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let proxy_addr = free_addr("127.0.0.1");
    let Some(svc) = Service::new("failed-takeover", server.addr(), proxy_addr) else {
        return;
    };
    let proxy = svc.start_proxy(proxy_addr);
    // The previous run: attached, registered, pinned, then stopped as a
    // service manager stops it.
    stop(svc.up());
    let before = layer_state(&bpftool, &svc);
    assert!(before[0].contains("connect4"), "{before:?}");
    let accel = before.last().unwrap();
    assert!(
        !accel.ends_with("[]") && !accel.contains(','),
        "one acceleration program: {accel}"
    );

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    for (name, text, extra, says) in failing_configs(&svc, taken.local_addr().unwrap()) {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let said = failed_up(&svc, name, &text, &extra);
        assert!(said.contains(&says), "{name}: {said}");
        // The failed run's own programs are freed shortly after it exits.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut after = layer_state(&bpftool, &svc);
        while after != before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            after = layer_state(&bpftool, &svc);
        }
        for (was, is) in before.iter().zip(&after) {
            assert_eq!(was, is, "{name} changed the layer");
        }
        assert!(!svc.state_dir.join("control.sock").exists(), "{name}");
        assert!(
            !svc.tree.root().join("missing").exists(),
            "{name}: the created scope cgroup was left behind"
        );
    }

    // The previous layer still works, and a good up takes it over.
    svc.client(server.addr(), 100);
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.lines().iter().filter(|l| l.starts_with('{')).count() < 1 {
        assert!(Instant::now() < deadline, "{:?}", proxy.lines());
        std::thread::sleep(Duration::from_millis(20));
    }
    let _up = svc.up();
    let out = svc.command(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["services"].as_array().unwrap().len(), 1, "{status}");
    assert_eq!(status["rules"].as_array().unwrap().len(), 1, "{status}");
}

#[test]
fn a_takeover_detaches_the_cgroups_no_longer_in_scope() {
    let Some(bpftool) = require_program("narrower", "bpftool") else {
        return;
    };
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(svc) = Service::new("narrower", server.addr(), free_addr("127.0.0.1")) else {
        return;
    };
    stop(svc.up());
    let services = svc.cgroup("services");
    assert_eq!(attached(&bpftool, &services).len(), PER_CGROUP);

    // The next run's scope no longer names the services' cgroup.
    let good = std::fs::read_to_string(&svc.config).unwrap();
    let narrower = good.replace(&format!(", \"{}\"", services.display()), "");
    assert_ne!(good, narrower);
    let config = svc.config.with_file_name("narrower.toml");
    std::fs::write(&config, narrower).unwrap();
    let up = svc.spawn(&["up", "--config", &config.display().to_string()]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(svc.lock_pid() == Some(up.pid()) && svc.links() == PER_CGROUP) {
        assert!(Instant::now() < deadline, "up did not take over");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        attached(&bpftool, &services).is_empty(),
        "{:?}",
        attached(&bpftool, &services)
    );
    assert_eq!(attached(&bpftool, &svc.cgroup("scope")).len(), PER_CGROUP);
    stop(up);
}

#[test]
fn run_takes_its_scope_from_the_running_engine_without_a_configuration_file() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let proxy_addr = free_addr("127.0.0.1");
    let Some(svc) = Service::new("runscope", server.addr(), proxy_addr) else {
        return;
    };
    let _up = svc.up();
    let proxy = svc.start_proxy(proxy_addr);
    // `run` gets no --config and no --scope; the file `up` read is gone,
    // so only the engine can name the scope.
    let config_text = std::fs::read_to_string(&svc.config).unwrap();
    std::fs::remove_file(&svc.config).unwrap();
    let empty = std::env::temp_dir().join(format!("connredir-runscope-cwd-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let run = |command: &[&str]| {
        let mut args = vec!["run".to_string()];
        args.extend(svc.places());
        args.push("--".into());
        args.extend(command.iter().map(|s| s.to_string()));
        Command::new(workspace_bin("connredir"))
            .args(&args)
            .current_dir(&empty)
            .output()
            .unwrap()
    };

    // The command runs in a cgroup of its own inside the engine's first
    // scope cgroup, removed afterwards.
    let out = run(&["cat", "/proc/self/cgroup"]);
    assert!(out.status.success(), "{out:?}");
    let cgroup = String::from_utf8_lossy(&out.stdout);
    let root = connredir_testkit::cgroup2_root().unwrap();
    let scope = svc.cgroup("scope");
    let relative = scope.strip_prefix(&root).unwrap().display().to_string();
    assert!(
        cgroup.contains(&format!("/{relative}/connredir-run-")),
        "{cgroup} is not below {relative}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&scope)
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("connredir-run-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // An unprivileged client started by `run` goes through the service.
    let testkit = connredir_testkit::testkit_bin();
    let server_addr = server.addr().to_string();
    let out = run(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        testkit.to_str().unwrap(),
        "client",
        "--connect",
        &server_addr,
        "--bytes",
        "1000",
    ]);
    assert!(out.status.success(), "{out:?}");
    let logged = connredir_testkit::eventually("the proxy's report", || {
        proxy.json_lines().into_iter().next()
    });
    assert_eq!(logged["original_dst"], server_addr, "{logged}");
    assert_eq!(server.accepted().len(), 1);
    // The exit status is the command's.
    assert_eq!(run(&["sh", "-c", "exit 7"]).status.code(), Some(7));
    std::fs::write(&svc.config, config_text).unwrap();
    let _ = std::fs::remove_dir_all(&empty);
}

#[test]
fn up_creates_a_missing_scope_cgroup_and_down_removes_only_that_one() {
    let Some(bpftool) = require_program("mkscope", "bpftool") else {
        return;
    };
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(svc) = Service::new("mkscope", server.addr(), free_addr("127.0.0.1")) else {
        return;
    };
    // The scope names two levels that do not exist below the test's tree;
    // `services` exists (the operator's own) and must stay.
    let fresh = svc.tree.root().join("fresh");
    let inner = fresh.join("inner");
    let scope = svc.cgroup("scope");
    let text = std::fs::read_to_string(&svc.config).unwrap().replacen(
        &format!("\"{}\"", scope.display()),
        &format!("\"{}\"", inner.display()),
        1,
    );
    std::fs::write(&svc.config, text).unwrap();
    let checked = svc.command(&["check", svc.config.to_str().unwrap()]);
    assert!(checked.status.success(), "{checked:?}");
    assert!(
        String::from_utf8_lossy(&checked.stderr).contains(&format!(
            "scope cgroup {} does not exist: `connredir up` will create it",
            inner.display()
        )),
        "{checked:?}"
    );

    let up = svc.up();
    assert!(inner.join("cgroup.procs").exists());
    assert_eq!(attached(&bpftool, &inner).len(), PER_CGROUP);
    stop(up);
    let down = svc.command(&["down"]);
    assert!(down.status.success(), "{down:?}");
    let said = String::from_utf8_lossy(&down.stdout);
    assert!(
        said.contains(&format!("removed the scope cgroup {}", inner.display()))
            && said.contains(&format!("removed the scope cgroup {}", fresh.display())),
        "{said}"
    );
    assert!(!fresh.exists(), "the created cgroups are gone");
    assert!(
        svc.cgroup("services").exists(),
        "the operator's cgroup stays"
    );

    // A created cgroup someone uses at `down` stays, and stays on the
    // record: the next `down` removes it once it is empty.
    let _up = svc.up();
    let busy = svc.cgroup("fresh/inner/busy");
    stop(_up);
    let down = svc.command(&["down"]);
    assert!(down.status.success(), "{down:?}");
    assert!(inner.exists() && fresh.exists(), "a cgroup in use is kept");
    std::fs::remove_dir(&busy).unwrap();
    let down = svc.command(&["down"]);
    assert!(down.status.success(), "{down:?}");
    assert!(!fresh.exists(), "removed once empty: {down:?}");

    // A cgroup made again at a recorded path by someone else is theirs.
    let up = svc.up();
    stop(up);
    std::fs::remove_dir(&inner).unwrap();
    std::fs::remove_dir(&fresh).unwrap();
    std::fs::create_dir(&fresh).unwrap();
    std::fs::create_dir(&inner).unwrap();
    let down = svc.command(&["down"]);
    let kept = inner.exists() && fresh.exists();
    let _ = std::fs::remove_dir(&inner);
    let _ = std::fs::remove_dir(&fresh);
    assert!(down.status.success(), "{down:?}");
    assert!(kept, "a cgroup someone made again was removed: {down:?}");
}

#[test]
fn doctor_knows_the_layers_own_programs_and_a_service_that_does_not_listen() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let proxy_addr = free_addr("127.0.0.1");
    let Some(svc) = Service::new("doctor-own", server.addr(), proxy_addr) else {
        return;
    };
    let _up = svc.up();
    let doctor = || -> Value {
        let out = svc.command(&["doctor", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let scope = svc.cgroup("scope").display().to_string();
    let report = doctor();
    assert_eq!(report["engine"]["running"], true, "{report:#}");
    assert_eq!(report["engine"]["scope_from"], "engine");
    assert_eq!(report["cgroups"][0]["path"], scope);
    let programs = report["cgroups"][0]["programs"].as_array().unwrap();
    assert_eq!(programs.len(), PER_CGROUP, "{report:#}");
    assert!(programs.iter().all(|p| p["ours"] == true), "{report:#}");
    let about_scope = |report: &Value| -> Vec<Value> {
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["area"] == "bpf" && f["what"].as_str().unwrap().contains(&scope))
            .cloned()
            .collect()
    };
    assert_eq!(about_scope(&report), Vec::<Value>::new());
    // The proxy is not started: its service does not listen, and its rule
    // refuses (on_down = block).
    assert_eq!(report["services"][0]["up"], false, "{report:#}");
    let down: Vec<&Value> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["area"] == "service")
        .collect();
    assert_eq!(down.len(), 1, "{report:#}");
    assert_eq!(down[0]["severity"], "warning");
    assert!(
        down[0]["what"]
            .as_str()
            .unwrap()
            .starts_with(&format!("service proxy does not listen on {proxy_addr}")),
        "{report:#}"
    );

    let _proxy = svc.start_proxy(proxy_addr);
    let report = doctor();
    assert_eq!(report["services"][0]["up"], true, "{report:#}");
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["area"] != "service"),
        "{report:#}"
    );
}

#[test]
fn rule_add_takes_an_executable_and_list_and_trace_name_it() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(svc) = Service::new("cli-exe", server.addr(), free_addr("127.0.0.1")) else {
        return;
    };
    let up = svc.up();
    // A destination the configuration's redirect rule does not name.
    let other = EchoServer::start("127.0.0.3:0").unwrap();
    let dst = other.addr();
    let (ip, port) = (format!("{}/32", dst.ip()), dst.port().to_string());
    // The probe's executable is the test kit's binary, under its own name.
    let out = svc.command(&[
        "rule",
        "add",
        "--action",
        "block",
        "--dst",
        &ip,
        "--port",
        &port,
        "--executable",
        "connredir-testkit",
    ]);
    assert!(out.status.success(), "{out:?}");
    let list = String::from_utf8(svc.command(&["rule", "list"]).stdout).unwrap();
    assert!(
        list.contains("block") && list.contains("(executable connredir-testkit)"),
        "{list}"
    );

    let addr = dst.to_string();
    let event = svc.first_traced("blocked", || {
        // Under another command name: the executable decides.
        let (status, lines) = Proc::spawn(
            &svc.cgroup("scope/client"),
            Some(65534),
            &["probe", "connect-as-curl", &addr],
        )
        .unwrap()
        .finish()
        .unwrap();
        assert!(status.success());
        assert!(lines.last().unwrap().contains("EACCES"), "{lines:?}");
    });
    assert_eq!(event["decision"], "blocked", "{event}");
    let text = event["rule_text"].as_str().unwrap();
    assert!(
        text.starts_with("block ") && text.contains("executable connredir-testkit"),
        "{text}"
    );
    stop(up);
}

#[test]
fn rule_add_takes_actions_and_conditions_and_trace_names_the_deciding_rule() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(svc) = Service::new("cli-block", server.addr(), free_addr("127.0.0.1")) else {
        return;
    };
    let up = svc.up();
    // A destination the configuration's redirect rule does not name.
    let other = EchoServer::start("127.0.0.3:0").unwrap();
    let dst = other.addr();
    let (ip, port) = (format!("{}/32", dst.ip()), dst.port().to_string());
    let out = svc.command(&[
        "rule",
        "add",
        "--action",
        "block",
        "--dst",
        &ip,
        "--port",
        &port,
        "--command",
        "quicb*",
        "--uid",
        "65534",
    ]);
    assert!(out.status.success(), "{out:?}");
    let added = String::from_utf8(out.stdout).unwrap();
    let id: u32 = added
        .trim()
        .strip_prefix("rule ")
        .and_then(|s| s.strip_suffix(" added"))
        .unwrap()
        .parse()
        .unwrap();
    let list = String::from_utf8(svc.command(&["rule", "list"]).stdout).unwrap();
    assert!(
        list.contains("block") && list.contains("(command quicb*)"),
        "{list}"
    );

    let addr = dst.to_string();
    let event = svc.first_traced("blocked", || {
        let (status, lines) = Proc::spawn(
            &svc.cgroup("scope/client"),
            Some(65534),
            &["probe", "connect-as-quicbrowser", &addr],
        )
        .unwrap()
        .finish()
        .unwrap();
        assert!(status.success());
        assert!(lines.last().unwrap().contains("EACCES"), "{lines:?}");
    });
    assert_eq!(event["decision"], "blocked", "{event}");
    assert_eq!(event["rule"], id, "{event}");
    let text = event["rule_text"].as_str().unwrap();
    assert!(
        text.starts_with("block ") && text.contains("uid 65534") && text.contains("command quicb*"),
        "{text}"
    );
    let status: Value = serde_json::from_slice(&svc.command(&["status", "--json"]).stdout).unwrap();
    assert!(
        status["counters"]["blocked"].as_u64().unwrap() >= 1,
        "{status}"
    );
    stop(up);
}
