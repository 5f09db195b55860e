//! End-to-end tests of the reference proxy, `connredir-proxy`, under the real
//! redirect layer: independent proxies chained on one flow, a proxy killed
//! mid-flow, deny rules, a third-party transparent proxy in the chain, and
//! the startup check that a proxy's listener is a registered service.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use connredir_engine::{Rule, ServiceId};
use connredir_testkit::{
    by_cgroup, free_addr, permutations, require_program, service_spec, workspace_bin, EchoServer,
    Lab, Proc, TestDir,
};
use serde_json::{json, Value};

/// One reference proxy of a test: its service's name, rule and arguments.
struct Spec<'a> {
    name: &'a str,
    /// Destination prefix of its rule.
    prefix: &'a str,
    /// Destination ports of its rule; `None`: every port.
    ports: Option<RangeInclusive<u16>>,
    priority: u32,
    /// Extra `connredir-proxy` arguments (`--rule ...`).
    args: &'a [&'a str],
}

/// Registers a service for `spec` (identity: its own cgroup
/// `services/NAME`, listening on a free loopback port) with one rule, then
/// starts `connredir-proxy` there. Returns the service id and the proxy's
/// index in `lab.procs`.
fn reference_proxy(lab: &mut Lab, spec: &Spec) -> (ServiceId, usize) {
    let cgroup = lab.cgroup(&format!("services/{}", spec.name));
    let listen = free_addr("127.0.0.1");
    let id = lab.service(spec.name, &[listen], by_cgroup(&cgroup), None);
    lab.engine
        .add_rule(Rule {
            destinations: vec![spec.prefix.parse().unwrap()],
            ports: spec.ports.clone().into_iter().collect(),
            priority: spec.priority,
            ..Rule::tcp_to(id)
        })
        .expect("add rule");
    let listen = listen.to_string();
    let mut args = vec!["--name", spec.name, "--listen", &listen];
    args.extend_from_slice(spec.args);
    let proc = Proc::spawn_program(&cgroup, None, &workspace_bin("connredir-proxy"), &args)
        .expect("start connredir-proxy");
    proc.wait_line("proxy ready", |l| l == "ready").unwrap();
    lab.procs.push(proc);
    (id, lab.procs.len() - 1)
}

/// Runs the `many` client role in `scope/client` and returns its per-flow
/// reports (the role itself always succeeds; each flow says how it went).
fn many(lab: &Lab, dst: SocketAddr, sizes: &[usize]) -> Vec<Value> {
    many_in(lab, "scope/client", dst, sizes)
}

/// [`many`], run in the lab's cgroup `cgroup`.
fn many_in(lab: &Lab, cgroup: &str, dst: SocketAddr, sizes: &[usize]) -> Vec<Value> {
    let sizes: Vec<String> = sizes.iter().map(usize::to_string).collect();
    let dst = dst.to_string();
    let sizes = sizes.join(",");
    let args = ["many", "--connect", &dst, "--sizes", &sizes];
    let client = Proc::spawn(&lab.cgroup(cgroup), None, &args).unwrap();
    let (status, lines) = client.finish().unwrap();
    assert!(status.success(), "many: {status}: {lines:?}");
    let report: Value = serde_json::from_str(lines.last().expect("a report")).unwrap();
    report["flows"].as_array().expect("flows").clone()
}

/// Waits (at most 20 s) until proxy `index` has logged `n` connections.
fn wait_for_log(lab: &Lab, index: usize, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = lab.proxy_log(index);
        if log.len() >= n || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The payload sizes of the concurrent flows: mostly small, from 0 bytes
/// up, and a few of several MiB.
fn flow_sizes() -> Vec<usize> {
    const MIB: usize = 1 << 20;
    let small = [0, 1, 100, 1_460, 16_384, 65_536, 200_000];
    let mut sizes: Vec<usize> = (0..206).map(|i| small[i % small.len()]).collect();
    sizes.extend([2 * MIB, 3 * MIB, 5 * MIB, 8 * MIB]);
    sizes
}

/// Three independent proxies whose rules overlap (one prefix for one
/// address, one port range, one whole /8), started and registered in every
/// order, with 210 concurrent flows of 0 bytes to 8 MiB: every flow arrives
/// and comes back byte-exact, each proxy logs each flow exactly once, and
/// the chain each proxy sees follows the rules' priorities, whatever the
/// start order.
#[test]
fn three_reference_proxies_chain_every_flow_once_in_every_start_order() {
    let sizes = flow_sizes();
    for order in permutations(3) {
        let Some((mut lab, server)) = Lab::with_server("pchain") else {
            return;
        };
        let dst = server.addr();
        let port = dst.port();
        // In priority order: the chain must be narrow, ports, wide.
        let specs = [
            Spec {
                name: "narrow",
                prefix: "127.0.0.2/32",
                ports: None,
                priority: 10,
                args: &[],
            },
            Spec {
                name: "ports",
                prefix: "127.0.0.0/24",
                ports: Some(port.saturating_sub(50)..=port.saturating_add(50)),
                priority: 20,
                args: &[],
            },
            Spec {
                name: "wide",
                prefix: "127.0.0.0/8",
                ports: None,
                priority: 30,
                // These flows are neither TLS nor HTTP: they name no host,
                // which a host rule denies unless told otherwise.
                args: &["--rule", "deny:host:never.test", "--allow-unknown-host"],
            },
        ];
        let mut started = vec![None; specs.len()];
        for &which in &order {
            started[which] = Some(reference_proxy(&mut lab, &specs[which]));
        }
        let started: Vec<(ServiceId, usize)> = started.into_iter().map(Option::unwrap).collect();
        let ids: Vec<u32> = started.iter().map(|(id, _)| id.0).collect();

        let flows = many(&lab, dst, &sizes);
        assert_eq!(flows.len(), sizes.len());
        let mut sent_by_flow = HashMap::new();
        for flow in &flows {
            assert_eq!(flow["ok"], true, "order {order:?}: {flow}");
            assert_eq!(flow["received"], flow["sent"], "order {order:?}: {flow}");
            let local = flow["local"].as_str().unwrap().to_string();
            sent_by_flow.insert(local, flow["sent"].as_u64().unwrap());
        }
        assert_eq!(sent_by_flow.len(), sizes.len(), "flows have distinct ids");

        for (position, spec) in specs.iter().enumerate() {
            let log = wait_for_log(&lab, started[position].1, sizes.len());
            assert_eq!(
                log.len(),
                sizes.len(),
                "order {order:?}: {} logged {} flows",
                spec.name,
                log.len()
            );
            let mut seen = HashMap::new();
            for entry in &log {
                let what = format!("order {order:?}, {}: {entry}", spec.name);
                assert_eq!(entry["proxy"], spec.name, "{what}");
                assert_eq!(entry["verdict"], "allow", "{what}");
                assert_eq!(entry["chain"], json!(ids[..=position]), "{what}");
                assert_eq!(entry["original_dst"], dst.to_string(), "{what}");
                let flow = entry["flow"].as_str().expect("a flow id").to_string();
                let sent = *sent_by_flow.get(&flow).unwrap_or_else(|| panic!("{what}"));
                assert_eq!(entry["bytes_up"], sent, "{what}");
                assert_eq!(entry["bytes_down"], sent, "{what}");
                *seen.entry(flow).or_insert(0) += 1;
            }
            assert!(
                seen.values().all(|&n| n == 1) && seen.len() == sizes.len(),
                "order {order:?}: {} did not log each flow exactly once",
                spec.name
            );
        }
        assert_eq!(server.accepted().len(), sizes.len(), "order {order:?}");
        let counters = lab.engine.counters().unwrap();
        assert_eq!(counters.redirects, 3 * sizes.len() as u64, "{counters:?}");
        assert_eq!(counters.hop_limit, 0, "{counters:?}");
        assert_eq!(counters.handoff_misses, 0, "{counters:?}");
    }
}

/// A connection a service's own process opens (not one it forwards: it
/// asked nothing, set no records) skips that service, and must not come
/// back to it through the services after it. The second proxy's onward
/// connection carries the flow's record, whose client is the first
/// service's process: the first service counts it as its own there too. A
/// records-less service whose onward connection finds no queued record
/// (squid reusing a kept-alive server connection, a queue past its scan)
/// opens such a connection.
#[test]
fn a_services_own_connection_does_not_come_back_to_it_through_a_later_service() {
    let sizes = [1000, 20_000];
    let Some((mut lab, server)) = Lab::with_server("pchain-own") else {
        return;
    };
    let dst = server.addr();
    let spec = |name, priority| Spec {
        name,
        prefix: "127.0.0.2/32",
        ports: None,
        priority,
        args: &[],
    };
    let (first_id, first) = reference_proxy(&mut lab, &spec("first", 10));
    let (second_id, second) = reference_proxy(&mut lab, &spec("second", 20));

    // The first service's own process connects (its cgroup is its identity).
    let flows = many_in(&lab, "services/first", dst, &sizes);
    assert_eq!(flows.len(), sizes.len());
    for flow in &flows {
        assert_eq!(flow["ok"], true, "{flow}");
        assert_eq!(flow["received"], flow["sent"], "{flow}");
    }

    let log = wait_for_log(&lab, second, sizes.len());
    assert_eq!(
        log.len(),
        sizes.len(),
        "the second service sees each flow: {log:?}"
    );
    // Give a flow sent back to the first service the time to arrive there.
    std::thread::sleep(Duration::from_millis(300));
    let back = lab.proxy_log(first);
    assert!(
        back.is_empty(),
        "the first service ({first_id:?}) got its own connections back from the second ({second_id:?}): {back:?}"
    );
    assert_eq!(server.accepted().len(), sizes.len());
    let counters = lab.engine.counters().unwrap();
    assert_eq!(counters.redirects, sizes.len() as u64, "{counters:?}");
}

/// A records-less service (a Python script: `SO_ORIGINAL_DST`, then a plain
/// onward connection) that asks about two flows, A then B, connects
/// onward for B first and serves it to the end, closing B's accepted
/// connection, and only then connects for A: an event-loop proxy whose
/// second client was quicker. B's onward connect took A's queued record
/// (the oldest); A's must still find one, B's, though B's accepted
/// connection has closed. Both flows reach the later service with their
/// chain through the first and a client of their own.
const OUT_OF_ORDER_PROXY: &str = r#"
import socket, struct, sys

SO_ORIGINAL_DST = 80
host, port = sys.argv[1], int(sys.argv[2])
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((host, port))
listener.listen(8)
print("ready", flush=True)

def accept():
    conn, _ = listener.accept()
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    dst_port, = struct.unpack("!H", raw[2:4])
    print("accepted", flush=True)
    return conn, (socket.inet_ntoa(raw[4:8]), dst_port)

def serve(conn, dst):
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    onward = socket.create_connection(dst)
    onward.sendall(data)
    onward.shutdown(socket.SHUT_WR)
    while chunk := onward.recv(65536):
        conn.sendall(chunk)
    onward.close()
    conn.close()

a = accept()
b = accept()
serve(*b)
print("served b", flush=True)
serve(*a)
print("served a", flush=True)
"#;

#[test]
fn a_records_less_service_connecting_out_of_order_keeps_every_flows_record() {
    let Some((mut lab, server)) = Lab::with_server("pchain-reorder") else {
        return;
    };
    let dst = server.addr();
    let cgroup = lab.cgroup("services/first");
    let listen = free_addr("127.0.0.1");
    let first = lab.register(service_spec("first", &[listen], by_cgroup(&cgroup)));
    lab.route(first, &format!("{}/32", dst.ip()), Some(dst.port()), 10);
    let (second, second_log) = lab.reference_proxy("127.0.0.1", dst, 20);
    let dir = TestDir::new("pchain-reorder", None);
    let script = dir.write("proxy.py", OUT_OF_ORDER_PROXY);
    let (host, port) = (listen.ip().to_string(), listen.port().to_string());
    let python = require_program("pchain-reorder", "python3").expect("python3");
    let proxy = Proc::spawn_program(&cgroup, None, &python, &[&script, &host, &port]).unwrap();
    proxy
        .wait_line("the proxy listens", |l| l == "ready")
        .unwrap();

    let dst_arg = dst.to_string();
    let client = |bytes: &str| {
        Proc::spawn(
            &lab.cgroup("scope/client"),
            None,
            &["client", "--connect", &dst_arg, "--bytes", bytes],
        )
        .unwrap()
    };
    let a = client("1000");
    proxy.wait_line("A accepted", |l| l == "accepted").unwrap();
    let b = client("2000");
    proxy.wait_line("A served", |l| l == "served a").unwrap();
    let (a_pid, b_pid) = (a.pid(), b.pid());
    for (name, c) in [("A", a), ("B", b)] {
        let (status, lines) = c.finish().unwrap();
        assert!(status.success(), "client {name}: {status}: {lines:?}");
    }

    let log = wait_for_log(&lab, second_log, 2);
    assert_eq!(log.len(), 2, "{log:?}");
    let mut clients: Vec<u64> = Vec::new();
    for entry in &log {
        assert_eq!(entry["chain"], json!([first.0, second.0]), "{entry}");
        clients.push(entry["client"]["pid"].as_u64().unwrap());
    }
    clients.sort();
    let mut want = vec![u64::from(a_pid), u64::from(b_pid)];
    want.sort();
    assert_eq!(
        clients, want,
        "each onward flow carries a client's record: {log:?}"
    );
    drop(proxy);
}

/// A proxy killed (SIGKILL) while a flow runs through it, first or second
/// in a chain of two: the client is not left hanging but sees the
/// connection end (EOF or reset), and the surviving proxy closes and logs
/// its side.
#[test]
fn a_proxy_killed_mid_flow_does_not_hang_the_client() {
    for victim in [0, 1] {
        let Some((mut lab, server)) = Lab::with_server("pkill") else {
            return;
        };
        let dst = server.addr();
        let prefix = format!("{}/32", dst.ip());
        let mut proxies = Vec::new();
        for (name, priority) in [("first", 1), ("second", 2)] {
            let spec = Spec {
                name,
                prefix: &prefix,
                ports: Some(dst.port()..=dst.port()),
                priority,
                args: &[],
            };
            proxies.push(reference_proxy(&mut lab, &spec).1);
        }
        let go = std::env::temp_dir().join(format!(
            "connredir-pkill-{}-{victim}.go",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&go);
        let dst_arg = dst.to_string();
        let args = [
            "hold",
            "--connect",
            &dst_arg,
            "--until",
            go.to_str().unwrap(),
        ];
        let held = Proc::spawn(&lab.cgroup("scope/client"), None, &args).unwrap();
        held.wait_line("first exchange", |l| l.contains("\"first\""))
            .unwrap();
        assert!(
            held.lines()[0].contains("\"ok\":true"),
            "{:?}",
            held.lines()
        );

        lab.procs[proxies[victim]].kill().unwrap();
        std::fs::write(&go, b"").unwrap();
        // finish() gives up after 30 s: only a hang gets there.
        let (status, lines) = held.finish().unwrap();
        let _ = std::fs::remove_file(&go);
        assert!(!status.success(), "victim {victim}: {lines:?}");
        let second: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
        assert_eq!(second["stage"], "second", "victim {victim}: {lines:?}");
        assert_eq!(second["ok"], false, "victim {victim}: {second}");
        let kind = second["kind"].as_str().unwrap_or_default();
        assert!(
            ["UnexpectedEof", "ConnectionReset", "BrokenPipe"].contains(&kind),
            "victim {victim}: {second}"
        );

        let survivor = proxies[1 - victim];
        let log = wait_for_log(&lab, survivor, 1);
        assert_eq!(log.len(), 1, "victim {victim}: {log:?}");
        assert_eq!(server.accepted().len(), 1);
    }
}

/// A deny rule of the reference proxy: an HTTP request for a denied host
/// gets a 403 and never reaches the server; an allowed host does; a denied
/// non-HTTP flow is closed without an onward connection.
#[test]
fn deny_rules_answer_http_with_403_and_close_other_flows() {
    let Some(curl) = require_program("pdeny", "curl") else {
        return;
    };
    let Some(mut lab) = Lab::new("pdeny") else {
        return;
    };
    let web = EchoServer::start_replying_once("127.0.0.2:0").unwrap();
    let other = EchoServer::start("127.0.0.3:0").unwrap();
    let (_, proxy) = reference_proxy(
        &mut lab,
        &Spec {
            name: "filter",
            prefix: "127.0.0.0/8",
            ports: None,
            priority: 1,
            // The destination rule first: then it decides before connecting.
            args: &[
                "--rule",
                "deny:dst:127.0.0.3",
                "--rule",
                "deny:host:*.blocked.test",
            ],
        },
    );
    let curl = |host: &str, path: &str, extra: &[&str]| -> (bool, Vec<String>) {
        let url = format!("http://{}{path}", web.addr());
        let header = format!("Host: {host}");
        let mut args = vec!["-sS", "--max-time", "10", "-H", &header];
        args.extend_from_slice(extra);
        args.push(&url);
        let proc = Proc::spawn_program(&lab.cgroup("scope/curl"), None, &curl, &args).unwrap();
        let (status, lines) = proc.finish().unwrap();
        (status.success(), lines)
    };

    let (ok, lines) = curl(
        "www.blocked.test",
        "/secret",
        &["-o", "/dev/null", "-w", "%{http_code}\n"],
    );
    assert!(ok, "{lines:?}");
    assert_eq!(lines, ["403"]);
    // The same server through the same proxy, for a host no rule denies:
    // the echo server sends the request back.
    let (ok, lines) = curl("fine.test", "/open", &["--http0.9"]);
    assert!(ok, "{lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with("GET /open")),
        "{lines:?}"
    );

    // Not HTTP, to a denied destination: closed, nothing comes back.
    let flows = many(&lab, other.addr(), &[1000]);
    assert_eq!(flows[0]["ok"], false, "{flows:?}");
    assert!(flows[0]["received"].as_u64().unwrap_or(0) == 0, "{flows:?}");

    let log = wait_for_log(&lab, proxy, 3);
    assert_eq!(log.len(), 3, "{log:?}");
    let find = |dst: SocketAddr, verdict: &str| {
        log.iter()
            .find(|e| e["original_dst"] == dst.to_string() && e["verdict"] == verdict)
            .unwrap_or_else(|| panic!("no {verdict} line for {dst}: {log:?}"))
    };
    let denied = find(web.addr(), "deny");
    assert_eq!(
        denied["reason"], "rule 2: deny:host:*.blocked.test",
        "{denied}"
    );
    assert_eq!(denied["http"]["host"], "www.blocked.test", "{denied}");
    assert_eq!(denied["bytes_up"], 0, "{denied}");
    let allowed = find(web.addr(), "allow");
    assert!(allowed["bytes_up"].as_u64().unwrap() > 0, "{allowed}");
    let closed = find(other.addr(), "deny");
    assert_eq!(
        closed["reason"], "rule 1: deny:dst:127.0.0.3/32",
        "{closed}"
    );
    // A destination rule decides before any onward connection is opened.
    assert!(other.accepted().is_empty(), "{:?}", other.accepted());
}

/// haproxy (`option transparent`: it reads SO_ORIGINAL_DST and knows
/// nothing of records) and the reference proxy on one flow, in both
/// priority orders: no loop, byte-exact, and the reference proxy sees the
/// chain in priority order.
#[test]
fn haproxy_and_the_reference_proxy_chain_in_both_orders() {
    let Some(haproxy) = require_program("phaproxy", "haproxy") else {
        return;
    };
    for haproxy_first in [false, true] {
        let Some((mut lab, server)) = Lab::with_server("phaproxy") else {
            return;
        };
        let dst = server.addr();
        let prefix = format!("{}/32", dst.ip());
        let (ours_priority, theirs_priority) = if haproxy_first { (2, 1) } else { (1, 2) };
        let (ours, our_proxy) = reference_proxy(
            &mut lab,
            &Spec {
                name: "ours",
                prefix: &prefix,
                ports: Some(dst.port()..=dst.port()),
                priority: ours_priority,
                args: &[],
            },
        );
        let (theirs, _) = lab.haproxy(&haproxy, &prefix, dst.port(), theirs_priority);

        // One flow at a time: haproxy sets no records, so its onward
        // connection inherits the record kept for (service, destination),
        // which concurrent flows to one destination would share. No empty
        // flow either: haproxy may drop a client that closes before
        // sending anything, without connecting to the server.
        let sizes = [1, 1_000, 300_000, 3 << 20];
        let mut locals = Vec::new();
        for &size in &sizes {
            let flow = &many(&lab, dst, &[size])[0];
            assert_eq!(flow["ok"], true, "haproxy first: {haproxy_first}: {flow}");
            locals.push(flow["local"].as_str().unwrap().to_string());
        }

        let chain = if haproxy_first {
            json!([theirs.0, ours.0])
        } else {
            json!([ours.0])
        };
        let log = wait_for_log(&lab, our_proxy, sizes.len());
        assert_eq!(log.len(), sizes.len(), "{log:?}");
        for (entry, (local, size)) in log.iter().zip(locals.iter().zip(sizes)) {
            assert_eq!(
                entry["chain"], chain,
                "haproxy first: {haproxy_first}: {entry}"
            );
            assert_eq!(entry["verdict"], "allow", "{entry}");
            assert_eq!(entry["original_dst"], dst.to_string(), "{entry}");
            assert_eq!(entry["flow"], local.as_str(), "{entry}");
            assert_eq!(entry["bytes_up"], size, "{entry}");
            assert_eq!(entry["bytes_down"], size, "{entry}");
        }
        assert_eq!(server.accepted().len(), sizes.len());
        let counters = lab.engine.counters().unwrap();
        assert_eq!(counters.redirects, 2 * sizes.len() as u64, "{counters:?}");
        assert_eq!(
            counters.records_inherited,
            sizes.len() as u64,
            "{counters:?}"
        );
    }
}

/// `registered_service` on a listening socket names the service registered
/// for its address (IPv4 and IPv6), and says when none is, when the layer
/// does not cover the caller, and when the socket does not listen.
#[test]
fn a_listener_learns_which_service_it_is() {
    let Some(mut lab) = Lab::new("psvcid") else {
        return;
    };
    let (v4, v6) = (free_addr("127.0.0.1"), free_addr("::1"));
    let cgroup = lab.cgroup("services/known");
    let id = lab.service("known", &[v4, v6], by_cgroup(&cgroup), None);
    let ok = format!("ok:{}", id.0);
    let (v4s, v6s) = (v4.to_string(), v6.to_string());
    assert_eq!(lab.probe("services/known", None, &["service", &v4s]), ok);
    assert_eq!(lab.probe("services/known", None, &["service", &v6s]), ok);
    // Any process of an attached cgroup may ask, not only the service's.
    assert_eq!(lab.probe("scope/other", None, &["service", &v4s]), ok);
    let elsewhere = free_addr("127.0.0.1").to_string();
    assert_eq!(
        lab.probe("services/known", None, &["service", &elsewhere]),
        "NotRegistered"
    );
    assert_eq!(
        lab.probe("services/known", None, &["service-not-listening", &v4s]),
        "NotListening"
    );
    assert_eq!(
        lab.probe("outside", None, &["service", &v4s]),
        "LayerNotActive"
    );
    // Unregistered, the address is nobody's again.
    lab.engine.remove_service(id).unwrap();
    assert_eq!(
        lab.probe("services/known", None, &["service", &v4s]),
        "NotRegistered"
    );
}

/// Runs `connredir-proxy ARGS` in `cgroup` until it exits (at most 10 s);
/// returns its exit code and what it said on stderr.
fn proxy_exit(lab: &Lab, cgroup: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut command = std::process::Command::new(workspace_bin("connredir-proxy"));
    command
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    connredir_host::cgroup::run_in_cgroup(&mut command, &lab.cgroup(cgroup), None).unwrap();
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("connredir-proxy {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.code(), stderr)
}

/// The proxy checks at startup that each listening address is a registered
/// service and, when not, exits saying which address and what to do;
/// `--standalone` runs it without the layer.
#[test]
fn the_proxy_refuses_an_unregistered_listening_address() {
    let Some(mut lab) = Lab::new("punreg") else {
        return;
    };
    let registered = free_addr("127.0.0.1");
    let cgroup = lab.cgroup("services/lonely");
    lab.service("lonely", &[registered], by_cgroup(&cgroup), None);
    let unregistered = free_addr("127.0.0.1").to_string();
    let registered = registered.to_string();

    // One of two addresses is not registered.
    let args = [
        "--name",
        "lonely",
        "--listen",
        &registered,
        "--listen",
        &unregistered,
    ];
    let (code, stderr) = proxy_exit(&lab, "services/lonely", &args);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{unregistered} is not a registered connredir service"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "connredir service add --name lonely --listen {unregistered}"
        )),
        "{stderr}"
    );
    // A wildcard address cannot be a service's.
    let args = ["--name", "lonely", "--listen", "0.0.0.0:0"];
    let (code, stderr) = proxy_exit(&lab, "services/lonely", &args);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("concrete address"), "{stderr}");
    // Where the layer is not attached at all, it says that.
    let args = ["--name", "lonely", "--listen", &registered];
    let (code, stderr) = proxy_exit(&lab, "outside", &args);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("the connredir layer is not active"),
        "{stderr}"
    );
    assert!(stderr.contains(&registered), "{stderr}");

    // Registered: it starts. Unregistered but --standalone: it starts too.
    for args in [
        vec!["--name", "lonely", "--listen", &registered],
        vec![
            "--name",
            "lonely",
            "--listen",
            &unregistered,
            "--standalone",
        ],
    ] {
        let proxy = workspace_bin("connredir-proxy");
        let proc = Proc::spawn_program(&cgroup, None, &proxy, &args).unwrap();
        proc.wait_line("proxy ready", |l| l == "ready").unwrap();
    }
}
