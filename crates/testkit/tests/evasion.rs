//! The promise, held against the clients themselves: a connection that a
//! rule selects reaches its service, whatever an unprivileged process in
//! the scope does. Each test is one way around a service, tried by a client
//! running as uid 65534 in the test's own cgroup tree against the real
//! programs; the destination is an echo server that lists its peers, so a
//! client's connection that reached it directly is seen by its address.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use connredir_engine::{OnDown, Rule, Service};
use connredir_testkit::{
    by_cgroup, free_addr, service_spec, unmapped, EchoServer, Lab, Proc, TestDir,
};
use serde_json::Value;

/// The unprivileged user every attacker runs as.
const NOBODY: u32 = 65534;

/// A lab with one service (the test kit's forwarding proxy, in
/// `services/proxy`, registered by that cgroup) selecting `dst`.
struct Setup {
    lab: Lab,
    listen: SocketAddr,
    cgroup: std::path::PathBuf,
}

impl Setup {
    fn new(test: &str, dst: SocketAddr, on_down: OnDown) -> Option<Setup> {
        let mut lab = Lab::new(test)?;
        let cgroup = lab.cgroup("services/proxy");
        let ip = if dst.is_ipv4() { "127.0.0.1" } else { "::1" };
        let listen = free_addr(ip);
        let id = lab.register(Service {
            on_down,
            ..service_spec("inspector", &[listen], by_cgroup(&cgroup))
        });
        let prefix = format!("{}/{}", dst.ip(), if dst.is_ipv4() { 32 } else { 128 });
        lab.engine
            .add_rule(Rule {
                destinations: vec![prefix.parse().unwrap()],
                ports: vec![dst.port()..=dst.port()],
                ..Rule::tcp_to(id)
            })
            .expect("add the rule");
        Some(Setup {
            lab,
            listen,
            cgroup,
        })
    }

    /// Starts the proxy; returns its index in `lab.procs`.
    fn start_proxy(&mut self, extra: &[&str]) -> usize {
        self.start_proxy_as(None, extra)
    }

    /// Starts the proxy as `uid` (root when None).
    fn start_proxy_as(&mut self, uid: Option<u32>, extra: &[&str]) -> usize {
        let (cgroup, listen) = (self.cgroup.clone(), self.listen);
        self.lab
            .toy_proxy(&cgroup, uid, "inspector", &[listen], extra)
    }

    /// Runs `attack ARGS` as uid 65534 in `scope/client`; its report.
    fn attack(&self, args: &[&str]) -> Value {
        attack_in(&self.lab, "scope/client", args)
    }
}

fn attack_in(lab: &Lab, cgroup: &str, args: &[&str]) -> Value {
    let mut all = vec!["attack"];
    all.extend_from_slice(args);
    let (status, lines) = Proc::spawn(&lab.cgroup(cgroup), Some(NOBODY), &all)
        .expect("start the attacker")
        .finish()
        .expect("the attacker finishes");
    assert!(status.success(), "attack {args:?} failed: {lines:?}");
    serde_json::from_str(lines.last().expect("a report")).expect("a JSON report")
}

/// The local addresses of the attempts in `report` that got through.
fn locals(attempts: &[&Value]) -> BTreeSet<String> {
    attempts
        .iter()
        .filter_map(|a| a["local"].as_str().map(normalise))
        .collect()
}

/// An address as the echo server sees it (IPv4-mapped as IPv4).
fn normalise(addr: &str) -> String {
    unmapped(addr.parse().unwrap()).to_string()
}

/// Fails when the destination saw a connection from one of the client's
/// own sockets: that connection skipped the service.
fn assert_none_direct(server: &EchoServer, client_locals: &BTreeSet<String>, report: &Value) {
    let direct: Vec<String> = server
        .accepted()
        .iter()
        .map(|p| normalise(&p.to_string()))
        .filter(|p| client_locals.contains(p))
        .collect();
    assert!(
        direct.is_empty(),
        "the client reached the destination without its service from {direct:?}: {report}"
    );
}

fn reconnect_after_disconnect(test: &str, server_ip: &str) {
    let server = EchoServer::start(&format!("{server_ip}:0")).unwrap();
    let Some(mut setup) = Setup::new(test, server.addr(), OnDown::Block) else {
        return;
    };
    let proxy = setup.start_proxy(&[]);
    let dst = server.addr().to_string();
    let report = setup.attack(&["reconnect-unspec", &dst]);
    assert_eq!(report["first"]["ok"], true, "{report}");
    assert_eq!(report["second"]["ok"], true, "{report}");
    assert_none_direct(
        &server,
        &locals(&[&report["first"], &report["second"]]),
        &report,
    );
    let log = setup.lab.wait_logged(proxy, 2);
    assert_eq!(log.len(), 2, "both connections are inspected: {log:?}");
}

#[test]
fn reconnect_after_af_unspec_is_inspected_again() {
    reconnect_after_disconnect("evade-unspec", "127.0.0.2");
}

#[test]
fn reconnect_after_af_unspec_is_inspected_again_ipv6() {
    reconnect_after_disconnect("evade-unspec6", "::1");
}

#[test]
fn reconnect_after_a_refused_connect_is_refused_again() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    // The service is registered, its proxy is not running (a restart).
    let Some(setup) = Setup::new("evade-refused", server.addr(), OnDown::Block) else {
        return;
    };
    let report = setup.attack(&["reconnect-refused", &server.addr().to_string()]);
    assert_eq!(report["first"]["ok"], false, "{report}");
    assert_eq!(report["second"]["ok"], false, "{report}");
    assert_none_direct(&server, &locals(&[&report["second"]]), &report);
    assert!(server.accepted().is_empty(), "{:?}", server.accepted());
}

#[test]
fn reconnect_after_a_failed_v4_mapped_connect_is_inspected() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(mut setup) = Setup::new("evade-v6only", server.addr(), OnDown::Block) else {
        return;
    };
    let proxy = setup.start_proxy(&[]);
    let report = setup.attack(&["reconnect-v6only", &server.addr().to_string()]);
    assert_eq!(report["first"]["ok"], false, "{report}");
    assert_eq!(report["second"]["ok"], true, "{report}");
    assert_none_direct(&server, &locals(&[&report["second"]]), &report);
    assert_eq!(setup.lab.wait_logged(proxy, 1).len(), 1);
}

#[test]
fn a_failed_redirect_leaves_no_record_for_a_direct_connect_elsewhere() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(mut setup) = Setup::new("evade-stale-hop", server.addr(), OnDown::Block) else {
        return;
    };
    let inspector = setup.start_proxy(&[]);
    // A second service, on IPv6, that no rule names; it sets no records, so
    // it forwards to whatever original destination the layer tells it.
    let cgroup = setup.lab.cgroup("services/second");
    let listen = free_addr("::1");
    setup
        .lab
        .register(service_spec("second", &[listen], by_cgroup(&cgroup)));
    let second = setup
        .lab
        .toy_proxy(&cgroup, None, "second", &[listen], &["--no-records"]);
    let report = setup.attack(&[
        "stale-hop",
        &server.addr().to_string(),
        "--elsewhere",
        &listen.to_string(),
    ]);
    assert_eq!(report["first"]["ok"], false, "{report}");
    // The client's connection to the second service is its own, with no
    // record: the second service learns no destination from the layer.
    let seen = setup.lab.wait_logged(second, 1);
    for line in &seen {
        assert!(
            line.get("chain").is_none() && line.get("record_dst").is_none(),
            "the second service was handed the record of a redirect that never connected: {line}"
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        server.accepted().is_empty(),
        "the destination was reached without its service: {:?}, inspector saw {:?}, report {report}",
        server.accepted(),
        setup.lab.proxy_log(inspector)
    );
}

/// A service's process that binds its listener, then forks into the
/// background and exits, leaving the listener to its child (as daemons do:
/// haproxy's daemon mode binds before it forks). It prints the pids of the
/// binder and of the server; the server writes one JSON line per accepted
/// connection to the file `argv[3]` and closes it.
const DAEMON: &str = r#"
import json, os, socket, sys
host, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(64)
binder = os.getpid()
child = os.fork()
if child:
    print(json.dumps({"binder": binder, "server": child}), flush=True)
    os._exit(0)
# The test reads the parent's output to its end: the server keeps none of it.
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
while True:
    c, peer = s.accept()
    with open(log, "a") as f:
        f.write(json.dumps({"accepted": str(peer)}) + "\n")
    c.close()
"#;

/// Kills a process this test started by its pid (one that outlived the
/// parent the test spawned), on drop.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGKILL) };
    }
}

/// Starts the attacker with `args` as uid 65534 in `scope/client` so that
/// its process gets pid `pid`, as an unprivileged user can by starting
/// processes until the kernel hands that pid out again; here root sets the
/// kernel's last pid (`ns_last_pid`) just before, trying again when another
/// process took it first. None when that never worked.
fn attacker_with_pid(lab: &Lab, pid: u32, args: &[&str]) -> Option<Proc> {
    let mut all = vec!["attack"];
    all.extend_from_slice(args);
    for _ in 0..200 {
        std::fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string())
            .expect("set the last pid (needs root)");
        let attacker = Proc::spawn(&lab.cgroup("scope/client"), Some(NOBODY), &all)
            .expect("start the attacker");
        if attacker.pid() == pid {
            return Some(attacker);
        }
        // Another process took the pid first; this attempt connected as
        // any other client (to the service) and is let go.
        let _ = attacker.finish();
    }
    None
}

/// Starts the Python `script` as the setup's service process (in its
/// cgroup), with the service's address and `extra` as its arguments.
fn start_python_service(setup: &Setup, dir: &TestDir, script: &str, extra: &[&str]) -> Proc {
    let script = dir.write("service.py", script);
    let (host, port) = (
        setup.listen.ip().to_string(),
        setup.listen.port().to_string(),
    );
    let mut args = vec![script.as_str(), &host, &port];
    args.extend_from_slice(extra);
    Proc::spawn_program(
        &setup.cgroup,
        None,
        std::path::Path::new("/usr/bin/python3"),
        &args,
    )
    .unwrap()
}

/// Connects to `server` from a process given pid `pid` (see
/// [`attacker_with_pid`]) and fails if it reached `server` directly;
/// returns its report.
fn connect_as_pid(setup: &Setup, pid: u32, server: &EchoServer) -> Value {
    let attacker = attacker_with_pid(&setup.lab, pid, &["connect", &server.addr().to_string()])
        .expect("an attacker process with the pid");
    let (status, lines) = attacker.finish().unwrap();
    assert!(status.success(), "{status}: {lines:?}");
    let report: Value = serde_json::from_str(lines.last().expect("a report")).unwrap();
    let attempts: Vec<&Value> = report["attempts"].as_object().unwrap().values().collect();
    assert_none_direct(server, &locals(&attempts), &report);
    report
}

#[test]
fn a_process_given_the_pid_of_a_services_departed_binder_is_still_inspected() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(setup) = Setup::new("evade-binder-pid", server.addr(), OnDown::Block) else {
        return;
    };
    let dir = TestDir::new("evade-binder-pid", None);
    let log = dir.0.join("accepted.log");
    let daemon = start_python_service(&setup, &dir, DAEMON, &[log.to_str().unwrap()]);
    let (status, lines) = daemon.finish().unwrap();
    assert!(status.success(), "{status}: {lines:?}");
    let pids: Value = serde_json::from_str(lines.last().expect("the pids")).unwrap();
    let binder = pids["binder"].as_u64().unwrap() as u32;
    let _server = KillOnDrop(pids["server"].as_u64().unwrap() as u32);
    connredir_testkit::wait_listening(setup.listen).unwrap();

    // The binder is gone (reaped above); its pid goes to the attacker.
    let report = connect_as_pid(&setup, binder, &server);
    let accepted = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !accepted.is_empty(),
        "the service's listener accepted nothing: {report}"
    );
}

/// A service that sets no records: it accepts one connection, asks the
/// layer for its original destination (`SO_ORIGINAL_DST`, which keeps the
/// flow's record for the onward connect), and exits without connecting on
/// (it crashed, or was restarted). It prints its pid first.
const ASKS_AND_EXITS: &str = r#"
import json, os, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(8)
print(json.dumps({"pid": os.getpid()}), flush=True)
c, _ = s.accept()
asked = c.getsockopt(socket.SOL_IP, 80, 16)
print(json.dumps({"asked": asked.hex()}), flush=True)
c.close()
"#;

#[test]
fn a_process_given_the_pid_of_a_departed_records_less_service_takes_none_of_its_records() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(setup) = Setup::new("evade-asker-pid", server.addr(), OnDown::Block) else {
        return;
    };
    let dir = TestDir::new("evade-asker-pid", None);
    let service = start_python_service(&setup, &dir, ASKS_AND_EXITS, &[]);
    let started = service
        .wait_line("the service's pid", |l| l.contains("\"pid\""))
        .unwrap();
    let pid = serde_json::from_str::<Value>(&started).unwrap()["pid"]
        .as_u64()
        .unwrap() as u32;
    connredir_testkit::wait_listening(setup.listen).unwrap();
    // A client's flow reaches the service, which asks and exits: the flow's
    // record stays queued under the service's pid.
    let first = setup.attack(&["connect", &server.addr().to_string()]);
    let (status, lines) = service.finish().unwrap();
    assert!(status.success(), "{status}: {lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("asked")),
        "{lines:?} / {first}"
    );

    connect_as_pid(&setup, pid, &server);
    assert!(server.accepted().is_empty(), "{:?}", server.accepted());
}

#[test]
fn a_client_that_fills_its_option_memory_is_refused_not_let_through() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(mut setup) = Setup::new("evade-optmem", server.addr(), OnDown::Block) else {
        return;
    };
    setup.start_proxy(&[]);
    let report = setup.attack(&["fill-optmem", &server.addr().to_string()]);
    assert!(report["md5_keys"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["connect"]["ok"], false, "{report}");
    assert_none_direct(&server, &locals(&[&report["connect"]]), &report);
    let counters = setup.lab.engine.counters().unwrap();
    assert!(counters.failed_closed >= 1, "{counters:?}");
}

#[test]
fn an_impostor_in_the_scope_cannot_bind_a_service_address_while_it_is_down() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(setup) = Setup::new("evade-bind", server.addr(), OnDown::Block) else {
        return;
    };
    let listen = setup.listen.to_string();
    let wildcard = format!("0.0.0.0:{}", setup.listen.port());
    for addr in [&listen, &wildcard] {
        let report = setup.attack(&["bind", addr]);
        assert_ne!(report["bind"], "ok", "{addr}: {report}");
    }
    let counters = setup.lab.engine.counters().unwrap();
    assert!(counters.binds_refused >= 2, "{counters:?}");
}

#[test]
fn an_impostor_outside_the_scope_gets_no_redirected_flow() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(setup) = Setup::new("evade-bind-outside", server.addr(), OnDown::Block) else {
        return;
    };
    // Outside the attached cgroups nothing stops the bind; the layer must
    // still not hand it a flow: it is not the service's own listener.
    let listen = setup.listen.to_string();
    let impostor = Proc::spawn(
        &setup.lab.cgroup("outside"),
        Some(NOBODY),
        &["attack", "bind", &listen],
    )
    .unwrap();
    impostor
        .wait_line("impostor listens", |l| l.contains("\"bind\":\"ok\""))
        .unwrap();
    let report = setup.attack(&["reconnect-refused", &server.addr().to_string()]);
    let (_, lines) = impostor.finish().unwrap();
    let got: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(got["accepted"], serde_json::json!([]), "{got} / {report}");
    assert_eq!(report["first"]["ok"], false, "{report}");
    assert!(server.accepted().is_empty());
}

#[test]
fn an_impostor_cannot_join_a_running_service_through_so_reuseport() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(mut setup) = Setup::new("evade-reuseport", server.addr(), OnDown::Block) else {
        return;
    };
    // A proxy that listens with SO_REUSEPORT, running as the same
    // unprivileged user as the client: the kernel alone would let the
    // client join its listening group and take half of its flows.
    setup.start_proxy_as(Some(NOBODY), &["--reuseport"]);
    let listen = setup.listen.to_string();
    let report = setup.attack(&["bind-reuseport", &listen]);
    assert_ne!(report["bind"], "ok", "{report}");
}

/// Another way to open a connection than a plain `connect()`: `case` of
/// `connredir-testkit attack` against an echo server on `server_ip`. Every
/// attempt the case reports must work, come through the service (logged
/// once each) and never reach the server from the client's own socket.
fn another_way_is_inspected(test: &str, case: &str, server_ip: &str) {
    let server = EchoServer::start(&format!("{server_ip}:0")).unwrap();
    let Some(mut setup) = Setup::new(test, server.addr(), OnDown::Block) else {
        return;
    };
    let proxy = setup.start_proxy(&[]);
    let report = setup.attack(&[case, &server.addr().to_string()]);
    let attempts: Vec<&Value> = report["attempts"].as_object().unwrap().values().collect();
    assert!(!attempts.is_empty(), "{report}");
    assert_none_direct(&server, &locals(&attempts), &report);
    assert!(attempts.iter().all(|a| a["ok"] == true), "{report}");
    let log = setup.lab.wait_logged(proxy, attempts.len());
    assert_eq!(
        log.len(),
        attempts.len(),
        "each is inspected: {log:?} / {report}"
    );
}

/// Connects to 0.0.0.0, :: or ::ffff:0.0.0.0 (`attack unspecified`), which
/// the kernel sends to the socket's bound address or to loopback.
fn unspecified_is_inspected(test: &str, server_ip: &str) {
    another_way_is_inspected(test, "unspecified", server_ip);
}

#[test]
fn a_connect_to_the_unspecified_address_is_inspected_as_loopback() {
    unspecified_is_inspected("evade-any", "127.0.0.1");
}

#[test]
fn a_connect_to_the_unspecified_address_is_inspected_as_the_bound_address() {
    unspecified_is_inspected("evade-any-bound", "127.0.0.2");
}

#[test]
fn a_connect_to_the_unspecified_address_is_inspected_as_loopback_ipv6() {
    unspecified_is_inspected("evade-any6", "::1");
}

#[test]
fn a_multipath_tcp_connect_is_inspected() {
    another_way_is_inspected("evade-mptcp", "mptcp", "127.0.0.2");
}

#[test]
fn a_multipath_tcp_connect_is_inspected_ipv6() {
    another_way_is_inspected("evade-mptcp6", "mptcp", "::1");
}

#[test]
fn a_fast_open_sendto_is_inspected() {
    another_way_is_inspected("evade-tfo-sendto", "fastopen-sendto", "127.0.0.2");
}

#[test]
fn a_fast_open_sendto_is_inspected_ipv6() {
    another_way_is_inspected("evade-tfo-sendto6", "fastopen-sendto", "::1");
}

#[test]
fn a_fast_open_connect_is_inspected() {
    another_way_is_inspected("evade-tfo-connect", "fastopen-connect", "127.0.0.2");
}

#[test]
fn a_fast_open_connect_is_inspected_ipv6() {
    another_way_is_inspected("evade-tfo-connect6", "fastopen-connect", "::1");
}

#[test]
fn an_io_uring_connect_is_inspected() {
    another_way_is_inspected("evade-io-uring", "io-uring", "127.0.0.2");
}

#[test]
fn an_io_uring_connect_is_inspected_ipv6() {
    another_way_is_inspected("evade-io-uring6", "io-uring", "::1");
}

/// Clients connecting in a loop while the proxy is killed and restarted.
const CLIENTS: usize = 4;
/// How many times the proxy is killed (SIGKILL) and started again.
const RESTARTS: usize = 3;

/// Four clients connect in a loop while the proxy is killed and restarted
/// three times (the clients run for 6 s, the restarts take about 2 s);
/// returns their reports and the failed and the made connects in all.
fn clients_across_restarts(setup: &mut Setup, dst: SocketAddr) -> (Vec<Value>, u64, u64) {
    let dst = dst.to_string();
    let clients: Vec<Proc> = (0..CLIENTS)
        .map(|_| {
            Proc::spawn(
                &setup.lab.cgroup("scope/client"),
                Some(NOBODY),
                &["attack", "flows", &dst, "6000"],
            )
            .unwrap()
        })
        .collect();
    let started = Instant::now();
    for _ in 0..RESTARTS {
        std::thread::sleep(Duration::from_millis(300));
        let index = setup.lab.procs.len() - 1;
        setup.lab.procs[index].kill().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        setup.start_proxy(&[]);
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the restarts outlasted the clients"
    );
    let reports: Vec<Value> = clients
        .into_iter()
        .map(|c| {
            let (status, lines) = c.finish().unwrap();
            assert!(status.success(), "{lines:?}");
            serde_json::from_str(lines.last().unwrap()).unwrap()
        })
        .collect();
    let total = |field: &str| -> u64 { reports.iter().map(|r| r[field].as_u64().unwrap()).sum() };
    let (refused, connected) = (total("refused"), total("connected"));
    (reports, refused, connected)
}

#[test]
fn with_block_no_connection_reaches_the_destination_while_the_proxy_restarts() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(mut setup) = Setup::new("on-down-block", server.addr(), OnDown::Block) else {
        return;
    };
    setup.start_proxy(&[]);
    let (reports, refused, connected) = clients_across_restarts(&mut setup, server.addr());
    assert!(connected > 0, "{reports:?}");
    // Refused for the whole time the proxy was down: far more than the
    // kill instants alone that the bypass test allows.
    assert!(
        refused > (RESTARTS * CLIENTS) as u64,
        "the proxy was down at times: {reports:?}"
    );
    // The clients' flows leave from 127.0.0.3; the proxy's from 127.0.0.1.
    let direct: Vec<SocketAddr> = server
        .accepted()
        .into_iter()
        .filter(|p| p.ip() == std::net::Ipv4Addr::new(127, 0, 0, 3))
        .collect();
    assert!(direct.is_empty(), "uninspected: {direct:?}");
    assert!(!server.accepted().is_empty(), "inspected flows arrived");
    let counters = setup.lab.engine.counters().unwrap();
    assert!(counters.service_down_blocked >= 1, "{counters:?}");
}

#[test]
fn with_bypass_no_connection_fails_while_the_proxy_restarts() {
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let Some(mut setup) = Setup::new("on-down-bypass", server.addr(), OnDown::Bypass) else {
        return;
    };
    setup.start_proxy(&[]);
    let (reports, refused, connected) = clients_across_restarts(&mut setup, server.addr());
    assert!(connected > 0, "{reports:?}");
    // While the proxy is down (300 ms, three times) every connect goes
    // direct: without the bypass that would be hundreds of refusals (as
    // with `block`). What remains is the instant of each SIGKILL: a connect
    // whose listener check passed just before the listener closed has its
    // SYN already on the way to it and is refused; at most once per client
    // per kill.
    assert!(
        refused <= (RESTARTS * CLIENTS) as u64,
        "{refused} refused: {reports:?}"
    );
    let counters = setup.lab.engine.counters().unwrap();
    assert!(counters.service_down_bypassed >= 1, "{counters:?}");
}

/// Registers the test kit's proxy as service `name` (its own cgroup), with
/// a rule for `dst` at `priority`, and starts it with `extra` options.
fn chained_proxy(
    lab: &mut Lab,
    name: &str,
    dst: SocketAddr,
    priority: u32,
    extra: &[&str],
) -> (connredir_engine::ServiceId, usize) {
    let listen = free_addr("127.0.0.1");
    let prefix = format!("{}/32", dst.ip());
    let (id, cgroup) = lab.own_service(name, &[listen], &prefix, Some(dst.port()), priority);
    (id, lab.toy_proxy(&cgroup, None, name, &[listen], extra))
}

#[test]
fn concurrent_records_less_flows_to_one_destination_keep_their_own_client() {
    let Some((mut lab, server)) = Lab::with_server("recordsless-concurrent") else {
        return;
    };
    let dst = server.addr();
    // A records-less proxy that learns each destination, waits, then
    // connects: two flows' questions come before either connect.
    let (first, _) = chained_proxy(
        &mut lab,
        "transparent",
        dst,
        1,
        &["--no-records", "--delay-connect-ms", "400"],
    );
    let (second, logger) = chained_proxy(&mut lab, "logger", dst, 2, &[]);
    let dst = dst.to_string();
    let clients: Vec<Proc> = (0..2)
        .map(|_| {
            Proc::spawn(
                &lab.cgroup("scope/client"),
                Some(NOBODY),
                &["client", "--connect", &dst, "--bytes", "1000"],
            )
            .unwrap()
        })
        .collect();
    let mut pids: Vec<u64> = clients.iter().map(|c| u64::from(c.pid())).collect();
    for client in clients {
        let (status, lines) = client.finish().unwrap();
        assert!(status.success(), "{lines:?}");
    }
    let log = lab.wait_logged(logger, 2);
    let mut seen: Vec<u64> = log
        .iter()
        .map(|l| l["client_pid"].as_u64().unwrap_or(0))
        .collect();
    pids.sort();
    seen.sort();
    assert_eq!(seen, pids, "each flow keeps its own client: {log:?}");
    for entry in &log {
        assert_eq!(
            entry["chain"],
            serde_json::json!([first.0, second.0]),
            "{entry}"
        );
    }
    assert_eq!(
        lab.engine.counters().unwrap().records_inherited,
        2,
        "{:?}",
        lab.engine.counters()
    );
}

#[test]
fn a_records_less_service_whose_cgroup_was_recreated_does_not_loop() {
    let Some((mut lab, server)) = Lab::with_server("recordsless-drift") else {
        return;
    };
    let dst = server.addr();
    let (_, proxy) = chained_proxy(&mut lab, "drifting", dst, 1, &["--no-records"]);
    // The service's cgroup is made anew (as systemd does when it restarts
    // a unit) with the proxy back inside: the registered identity names the
    // old cgroup, so the proxy's own onward connections no longer look like
    // the service's.
    let cgroup = lab.cgroup("services/drifting");
    let aside = lab.cgroup("services/aside");
    let pid = lab.procs[proxy].pid().to_string();
    std::fs::write(aside.join("cgroup.procs"), &pid).unwrap();
    std::fs::remove_dir(&cgroup).unwrap();
    std::fs::create_dir(&cgroup).unwrap();
    std::fs::write(cgroup.join("cgroup.procs"), &pid).unwrap();

    let report = attack_in(
        &lab,
        "scope/client",
        &["reconnect-refused", &dst.to_string()],
    );
    assert_eq!(report["first"]["ok"], true, "{report}");
    std::thread::sleep(Duration::from_millis(500));
    let log = lab.proxy_log(proxy);
    assert!(
        log.len() == 1,
        "the proxy got its own flows back {} times",
        log.len()
    );
    assert_eq!(server.accepted().len(), 1, "{:?}", server.accepted());
}

#[test]
fn a_proxy_started_before_its_service_is_registered_gets_its_flows() {
    let Some((mut lab, server)) = Lab::with_server("late-registration") else {
        return;
    };
    let dst = server.addr();
    let cgroup = lab.cgroup("services/early");
    let listen = free_addr("127.0.0.1");
    lab.toy_proxy(&cgroup, None, "early", &[listen], &[]);
    let id = lab.service("early", &[listen], by_cgroup(&cgroup), None);
    lab.route(id, &format!("{}/32", dst.ip()), Some(dst.port()), 0);
    let report = attack_in(
        &lab,
        "scope/client",
        &["reconnect-refused", &dst.to_string()],
    );
    assert_eq!(report["first"]["ok"], true, "{report}");
    assert_eq!(lab.wait_logged(0, 1).len(), 1);
}

#[test]
fn a_proxy_outside_the_scope_is_found_once_it_listens() {
    let Some((mut lab, server)) = Lab::with_server("outside-proxy") else {
        return;
    };
    let dst = server.addr();
    // The service runs outside the attached cgroups: the kernel never sees
    // its bind, so until the engine has looked, it is down.
    let cgroup = lab.cgroup("outside/proxy");
    let listen = free_addr("127.0.0.1");
    let id = lab.service("outside", &[listen], by_cgroup(&cgroup), None);
    lab.route(id, &format!("{}/32", dst.ip()), Some(dst.port()), 0);
    lab.toy_proxy(&cgroup, None, "outside", &[listen], &[]);
    let before = attack_in(
        &lab,
        "scope/client",
        &["reconnect-refused", &dst.to_string()],
    );
    assert_eq!(before["first"]["ok"], false, "{before}");
    lab.engine.mark_new_listeners();
    // Now the flow reaches the proxy. (Outside the scope the proxy cannot
    // query records or SO_ORIGINAL_DST, so it drops the connection: services
    // belong inside the scope, which is why the kernel normally sees them.)
    let after = attack_in(
        &lab,
        "scope/client",
        &["reconnect-refused", &dst.to_string()],
    );
    assert!(after["first"]["local"].is_string(), "connected: {after}");
    assert_eq!(lab.wait_logged(0, 1).len(), 1);
    assert!(server.accepted().is_empty());
}
