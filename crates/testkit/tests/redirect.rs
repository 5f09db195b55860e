//! End-to-end tests of the redirect layer: real eBPF programs attached to a
//! cgroup tree each test makes, real processes in those cgroups, real TCP
//! connections on loopback.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use connredir_abi::{connredir_default_context, connredir_record};
use connredir_engine::{Rule, Service, ServiceId};
use connredir_testkit::{
    by_cgroup, by_uid, eventually, free_addr, mapped, permutations, require_program, service_spec,
    unmapped, workspace_bin, EchoServer, Lab, Proc, Release,
};
use serde_json::Value;

struct ProxySpec<'a> {
    name: &'a str,
    listen: Vec<SocketAddr>,
    destination: String,
    port: u16,
    priority: u32,
    args: &'a [&'a str],
}

/// The test kit's own proxy and client roles, on a lab.
trait ToyRoles {
    fn proxy(&mut self, spec: ProxySpec) -> (ServiceId, usize);
    fn client(&self, cgroup: &str, connect: SocketAddr, bytes: usize) -> Result<Value>;
    fn client_with(
        &self,
        cgroup: &str,
        connect: SocketAddr,
        bytes: usize,
        extra: &[&str],
    ) -> Result<Value>;
}

impl ToyRoles for Lab {
    /// Registers a service (identity: its own cgroup) with one rule, and
    /// starts its proxy. Returns the service id and the proxy's index.
    fn proxy(&mut self, spec: ProxySpec) -> (ServiceId, usize) {
        let (id, cgroup) = self.own_service(
            spec.name,
            &spec.listen,
            &spec.destination,
            Some(spec.port),
            spec.priority,
        );
        let index = self.toy_proxy(&cgroup, None, spec.name, &spec.listen, spec.args);
        (id, index)
    }

    /// Runs the client role in `cgroup` and returns its report.
    fn client(&self, cgroup: &str, connect: SocketAddr, bytes: usize) -> Result<Value> {
        self.client_with(cgroup, connect, bytes, &[])
    }

    fn client_with(
        &self,
        cgroup: &str,
        connect: SocketAddr,
        bytes: usize,
        extra: &[&str],
    ) -> Result<Value> {
        let (connect, bytes) = (connect.to_string(), bytes.to_string());
        let mut args = vec!["client", "--connect", &connect, "--bytes", &bytes];
        args.extend_from_slice(extra);
        let proc = Proc::spawn(&self.cgroup(cgroup), None, &args)?;
        let pid = proc.pid();
        let (status, lines) = proc.finish()?;
        ensure!(
            status.success(),
            "client failed: {status}, output {lines:?}"
        );
        let mut report: Value = serde_json::from_str(lines.last().context("no report")?)?;
        report["pid"] = pid.into();
        Ok(report)
    }
}

fn v4_proxy(name: &str, destination: SocketAddr, priority: u32) -> ProxySpec<'_> {
    ProxySpec {
        name,
        listen: vec![free_addr("127.0.0.1")],
        destination: format!("{}/32", destination.ip()),
        port: destination.port(),
        priority,
        args: &[],
    }
}

/// A single proxy: the client's bytes reach the server through it, and the
/// proxy sees records, context and SO_ORIGINAL_DST.
fn single_proxy_round_trip(
    server_ip: &str,
    proxy_ips: &[&str],
    prefix: &str,
    connect: impl Fn(SocketAddr) -> SocketAddr,
    test: &str,
) {
    let start = || EchoServer::start(&format!("{server_ip}:0"));
    let Some((mut lab, server)) = Lab::with_server_from(test, start) else {
        return;
    };
    let dst = server.addr();
    let (id, proxy) = lab.proxy(ProxySpec {
        name: "inspector",
        listen: proxy_ips.iter().map(|ip| free_addr(ip)).collect(),
        destination: prefix.to_string(),
        port: dst.port(),
        priority: 0,
        args: &[],
    });

    let report = lab.client("scope/client", connect(dst), 200_000).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    // The client cannot tell: its peer is where it connected, not the
    // service (as behind a NAT redirect).
    assert_eq!(
        report["peer"],
        connect(dst).to_string(),
        "the client's getpeername(): {report}"
    );
    let log = lab.wait_logged(proxy, 1);
    assert_eq!(log.len(), 1, "proxy log: {log:?}");
    let entry = &log[0];
    assert_eq!(entry["records"], "ok", "{entry}");
    assert_eq!(entry["chain"], serde_json::json!([id.0]));
    assert_eq!(entry["original_dst"], dst.to_string());
    assert_eq!(entry["record_dst"], dst.to_string());
    assert_eq!(entry["context"], "ok");
    assert_eq!(entry["context_remote"], dst.to_string());
    // The default context carries the client's own address (an IPv4-mapped
    // address as plain IPv4, the way the layer normalises it).
    let local: SocketAddr = report["local"].as_str().unwrap().parse().unwrap();
    let local = unmapped(local);
    assert_eq!(
        entry["context_local"],
        local.to_string(),
        "{entry} vs {report}"
    );
    assert_eq!(entry["client_pid"], report["pid"]);
    assert_eq!(server.accepted().len(), 1);

    let counters = lab.engine.counters().unwrap();
    assert_eq!(counters.redirects, 1, "{counters:?}");
    assert_eq!(counters.handoffs, 1, "{counters:?}");
    assert_eq!(counters.handoff_misses, 0, "{counters:?}");
    assert!(counters.original_dst_answered >= 1, "{counters:?}");
    assert_eq!(lab.engine.pending_handoffs().unwrap(), 0);
}

#[test]
fn ipv4_connection_is_redirected_inspected_and_forwarded() {
    single_proxy_round_trip("127.0.0.2", &["127.0.0.1"], "127.0.0.2/32", |d| d, "v4");
}

/// The BPF socket storage (option memory, `ss -m` field `o`) of each TCP
/// socket of this host that matches the `ss` filter `filter`, by its local
/// and remote address.
fn option_memory(filter: &str) -> Vec<(String, String, u64)> {
    let out = std::process::Command::new("ss")
        .args(["-tmHnO", "state", "established", filter])
        .output()
        .expect("run ss (iproute2)");
    assert!(out.status.success(), "ss: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let optmem = line
                .split([',', '(', ')'])
                .find_map(|f| f.strip_prefix('o').and_then(|n| n.parse().ok()))
                .unwrap_or_else(|| panic!("no option memory in {line}"));
            (fields[2].to_string(), fields[3].to_string(), optmem)
        })
        .collect()
}

/// A flow redirected once costs each of its two redirected sockets (the
/// client's and the one the service accepted) a few hundred bytes of
/// socket storage: the record's one-hop form, not the whole state (872
/// bytes per socket before); the service's onward socket, which carries
/// the records it set, stays within 1 KiB. The records are still answered
/// whole on both ends.
#[test]
fn a_flow_redirected_once_costs_each_socket_little_kernel_memory() {
    let Some((mut lab, server)) = Lab::with_server("sockmem") else {
        return;
    };
    let dst = server.addr();
    let spec = v4_proxy("inspector", dst, 0);
    let listen = spec.listen[0];
    let (id, proxy) = lab.proxy(spec);
    let release = Release::new("sockmem", "release");
    let (connect, until) = (dst.to_string(), release.arg());
    let hold = Proc::spawn(
        &lab.cgroup("scope/client"),
        Some(65534),
        &["hold", "--connect", &connect, "--until", &until],
    )
    .unwrap();
    hold.wait_line("first exchange", |l| l.contains("\"first\""))
        .unwrap();

    let port = listen.port();
    let legs = option_memory(&format!("( sport = :{port} or dport = :{port} )"));
    assert_eq!(
        legs.len(),
        2,
        "the client's and the accepted socket: {legs:?}"
    );
    for (local, remote, optmem) in &legs {
        assert!(
            *optmem > 0 && *optmem <= 512,
            "{local} -> {remote}: {optmem} bytes of socket storage"
        );
    }
    let onward = option_memory(&format!("( dst {dst} )"));
    assert_eq!(onward.len(), 1, "the service's onward socket: {onward:?}");
    assert!(onward[0].2 <= 1024, "onward socket: {onward:?}");

    release.release();
    let (status, lines) = hold.finish().unwrap();
    assert!(status.success(), "{lines:?}");
    let log = lab.wait_logged(proxy, 1);
    assert_eq!(log[0]["records"], "ok", "{log:?}");
    assert_eq!(log[0]["chain"], serde_json::json!([id.0]));
    assert_eq!(log[0]["original_dst"], dst.to_string());
    assert_eq!(log[0]["context"], "ok");
}

#[test]
fn ipv6_connection_is_redirected_inspected_and_forwarded() {
    single_proxy_round_trip("[::1]", &["127.0.0.1", "::1"], "::1/128", |d| d, "v6");
}

#[test]
fn ipv4_mapped_destination_follows_the_ipv4_rules() {
    single_proxy_round_trip(
        "127.0.0.2",
        &["127.0.0.1"],
        "127.0.0.0/8",
        mapped,
        "v4mapped",
    );
}

/// n services whose rules all match one destination, started in every order:
/// each handles each flow once, in priority order, and the flow arrives.
fn chain_in_every_start_order(n: usize, test: &str) {
    const FLOWS: usize = 3;
    let names = ["alpha", "bravo", "charlie"];
    for order in permutations(n) {
        let Some((mut lab, server)) = Lab::with_server(test) else {
            return;
        };
        let dst = server.addr();
        let mut started = vec![None; n];
        let mut listens = vec![None; n];
        for &which in &order {
            // Priority follows the name, whatever the start order.
            let spec = v4_proxy(names[which], dst, which as u32 + 1);
            listens[which] = Some(spec.listen[0]);
            started[which] = Some(lab.proxy(spec));
        }
        let started: Vec<(ServiceId, usize)> = started.into_iter().map(Option::unwrap).collect();
        // Where each service's onward connections go, as it sees them: the
        // next service, and from the last one the destination.
        let onward: Vec<String> = listens[1..]
            .iter()
            .map(|l| l.unwrap().to_string())
            .chain([dst.to_string()])
            .collect();

        let clients: Vec<_> = (0..FLOWS)
            .map(|i| {
                let bytes = [0, 1, 70_000][i % 3];
                lab.client("scope/client", dst, bytes).unwrap()
            })
            .collect();
        for report in &clients {
            assert_eq!(report["ok"], true, "order {order:?}: {report}");
        }
        let ids: Vec<u32> = started.iter().map(|(id, _)| id.0).collect();
        for (position, (_, proxy)) in started.iter().enumerate() {
            let log = lab.wait_logged(*proxy, FLOWS);
            assert_eq!(
                log.len(),
                FLOWS,
                "order {order:?}, {}: {log:?}",
                names[position]
            );
            for entry in &log {
                assert_eq!(
                    entry["chain"],
                    serde_json::json!(ids[..=position]),
                    "order {order:?}: {entry}"
                );
                assert_eq!(entry["original_dst"], dst.to_string());
                assert_eq!(entry["first_dst"], dst.to_string());
                assert_eq!(
                    entry["onward_peer"], onward[position],
                    "a service's getpeername() on its onward socket: {entry}"
                );
            }
        }
        assert_eq!(server.accepted().len(), FLOWS, "order {order:?}");
        let counters = lab.engine.counters().unwrap();
        assert_eq!(counters.redirects, (FLOWS * n) as u64, "{counters:?}");
        assert_eq!(counters.hop_limit, 0);
    }
}

#[test]
fn two_services_chain_once_each_in_every_start_order() {
    chain_in_every_start_order(2, "chain2");
}

#[test]
fn three_services_chain_once_each_in_every_start_order() {
    chain_in_every_start_order(3, "chain3");
}

#[test]
fn proxy_that_sets_no_records_does_not_loop() {
    let Some((mut lab, server)) = Lab::with_server("norecords") else {
        return;
    };
    let dst = server.addr();
    let mut spec = v4_proxy("plain", dst, 0);
    spec.args = &["--no-records"];
    let (_, proxy) = lab.proxy(spec);
    for _ in 0..3 {
        assert_eq!(lab.client("scope/client", dst, 5000).unwrap()["ok"], true);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lab.proxy_log(proxy).len(), 3, "{:?}", lab.proxy_log(proxy));
    assert_eq!(server.accepted().len(), 3);
    let counters = lab.engine.counters().unwrap();
    assert_eq!(counters.redirects, 3);
    assert!(counters.loops_prevented >= 3, "{counters:?}");
}

/// A proxy that sets no records (like an unmodified transparent proxy) in a
/// chain with one that does, in both priority orders: its onward connection
/// inherits the record of the connection it forwards, so the flow visits each
/// service once instead of bouncing between them.
#[test]
fn records_less_proxy_chains_with_others_without_looping() {
    for plain_first in [true, false] {
        let Some((mut lab, server)) = Lab::with_server("inherit") else {
            return;
        };
        let dst = server.addr();
        let mut plain = v4_proxy("plain", dst, if plain_first { 1 } else { 2 });
        plain.args = &["--no-records"];
        let (plain_id, plain_proxy) = lab.proxy(plain);
        let (aware_id, aware_proxy) =
            lab.proxy(v4_proxy("aware", dst, if plain_first { 2 } else { 1 }));
        for bytes in [0, 10, 100_000] {
            assert_eq!(lab.client("scope/client", dst, bytes).unwrap()["ok"], true);
        }
        let expected = if plain_first {
            [vec![plain_id.0], vec![plain_id.0, aware_id.0]]
        } else {
            [vec![aware_id.0, plain_id.0], vec![aware_id.0]]
        };
        std::thread::sleep(Duration::from_millis(200));
        for (proxy, chain) in [(plain_proxy, &expected[0]), (aware_proxy, &expected[1])] {
            let log = lab.proxy_log(proxy);
            assert_eq!(log.len(), 3, "plain first: {plain_first}: {log:?}");
            for entry in log {
                assert_eq!(entry["chain"], serde_json::json!(chain), "{entry}");
            }
        }
        assert_eq!(server.accepted().len(), 3);
        let counters = lab.engine.counters().unwrap();
        assert_eq!(counters.redirects, 6, "{counters:?}");
        assert_eq!(counters.records_inherited, 3, "{counters:?}");
    }
}

/// An unmodified third-party transparent proxy (haproxy with `option
/// transparent`, which finds the destination with SO_ORIGINAL_DST and knows
/// nothing of records) chained after ours: every flow passes each once and
/// arrives byte-exact.
#[test]
fn third_party_transparent_proxy_takes_part_in_a_chain() {
    let Some(haproxy) = require_program("haproxy", "haproxy") else {
        return;
    };
    let Some((mut lab, server)) = Lab::with_server("haproxy") else {
        return;
    };
    let dst = server.addr();
    let (ours, our_proxy) = lab.proxy(v4_proxy("ours", dst, 1));
    lab.haproxy(&haproxy, &format!("{}/32", dst.ip()), dst.port(), 2);

    // (No empty flow: haproxy may drop a connection whose client closes
    // before sending anything, without connecting to the server.)
    for bytes in [1, 1000, 300_000] {
        let report = lab.client("scope/client", dst, bytes).unwrap();
        assert_eq!(report["ok"], true, "{report}");
    }
    let log = lab.wait_logged(our_proxy, 3);
    assert_eq!(log.len(), 3, "{log:?}");
    for entry in &log {
        assert_eq!(entry["chain"], serde_json::json!([ours.0]), "{entry}");
    }
    assert_eq!(server.accepted().len(), 3);
    let counters = lab.engine.counters().unwrap();
    assert_eq!(counters.redirects, 6, "{counters:?}");
    assert_eq!(counters.records_inherited, 3, "{counters:?}");
}

#[test]
fn buffer_protocol_follows_the_wfp_control_codes() {
    let Some((mut lab, server)) = Lab::with_server("buffers") else {
        return;
    };
    let dst = server.addr();
    let mut spec = v4_proxy("checker", dst, 0);
    spec.args = &["--check-buffers"];
    let (_, proxy) = lab.proxy(spec);
    assert_eq!(lab.client("scope/client", dst, 10).unwrap()["ok"], true);
    let log = lab.wait_logged(proxy, 1);
    let buffers = &log[0]["buffers"];
    for (name, size) in [
        ("records", std::mem::size_of::<connredir_record>()),
        ("context", std::mem::size_of::<connredir_default_context>()),
    ] {
        let b = &buffers[name];
        assert_eq!(b["size_query"], size, "{name}: {b}");
        assert_eq!(b["tiny"], "InvalidArgument", "{name}: {b}");
        assert_eq!(b["short"]["error"], "InsufficientBuffer", "{name}: {b}");
        assert_eq!(b["short"]["needed"], size, "{name}: {b}");
        assert_eq!(b["exact"], "ok", "{name}: {b}");
    }
}

/// The error answers of the socket options, each in the case that makes it:
/// queries on sockets with nothing to say, and sets the layer refuses. Each
/// row: what it shows (named when it fails), the probe's cgroup, the probe
/// role's case, whether the case takes the echo server's address, and the
/// answer.
#[test]
fn socket_options_answer_each_error_case() {
    let Some((lab, server)) = Lab::with_server("probes") else {
        return;
    };
    let dst = server.addr();
    #[rustfmt::skip]
    let cases = [
        ("a query on an unconnected socket is not connected", "services", "not-connected", false, "NotConnected"),
        ("a query on a pipe is not a socket", "services", "not-a-socket", false, "NotASocket"),
        ("a query where the layer is not loaded is not supported", "outside", "connected-query", true, "NotSupported"),
        ("a query on a connection that was not redirected", "services", "not-redirected", true, "NotRedirected"),
        ("a set on a connected socket is invalid", "services", "set-connected", true, "InvalidArgument"),
        ("a set of a malformed blob is invalid", "services", "set-malformed", false, "InvalidArgument"),
        ("a set of a truncated blob is invalid", "services", "set-truncated", false, "InvalidArgument"),
        ("a set of a blob of the wrong version is invalid", "services", "set-wrong-version", false, "InvalidArgument"),
        // The same valid blob is accepted from root, so in the three cases
        // above the blob was the problem.
        ("a set of the valid blob from root is accepted", "services", "set", false, "ok"),
    ];
    let addr = dst.to_string();
    for (what, cgroup, case, with_addr, expected) in cases {
        let args: &[&str] = if with_addr { &[case, &addr] } else { &[case] };
        assert_eq!(lab.probe(cgroup, None, args), expected, "{what}");
    }
}

#[test]
fn set_from_an_unregistered_unprivileged_process_is_denied() {
    let Some(mut lab) = Lab::new("setdenied") else {
        return;
    };
    const NOBODY: u32 = 65534;
    assert_eq!(
        lab.probe("services", Some(NOBODY), &["set"]),
        "AccessDenied"
    );
    assert!(lab.engine.counters().unwrap().denied_sets >= 1);
    // Once that uid is a registered service, it may set records, but only
    // ones the layer issued to it: this one is made by hand (see
    // forged_records.rs for records the layer issued).
    let id = lab.service(
        "nobody-proxy",
        &[free_addr("127.0.0.1")],
        by_uid(NOBODY),
        None,
    );
    assert_eq!(id.0, 1, "the hand-made record's hop names this service");
    assert_eq!(
        lab.probe("services", Some(NOBODY), &["set"]),
        "AccessDenied"
    );
    assert!(lab.engine.counters().unwrap().forged_records >= 1);
}

#[test]
fn a_listener_that_is_not_the_services_own_gets_no_flow() {
    let Some((mut lab, server)) = Lab::with_server("ctxdenied") else {
        return;
    };
    let dst = server.addr();
    let listen = vec![free_addr("127.0.0.1")];
    // The service's identity names a uid no process has; the listener is
    // another process (root, so its bind is allowed): it is not the
    // service, so it gets neither the flow, nor the records, nor the
    // context, and the connect is refused.
    let id = lab.service("elsewhere", &listen, by_uid(4242), Some(b"secret"));
    lab.route(id, "127.0.0.2/32", Some(dst.port()), 0);
    let cgroup = lab.cgroup("services/impostor");
    let proxy = lab.toy_proxy(&cgroup, None, "impostor", &listen, &[]);
    assert!(lab.client("scope/client", dst, 100).is_err());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        lab.proxy_log(proxy).is_empty(),
        "{:?}",
        lab.proxy_log(proxy)
    );
    assert!(server.accepted().is_empty());
    let counters = lab.engine.counters().unwrap();
    assert_eq!(counters.service_down_blocked, 1, "{counters:?}");
    assert_eq!(counters.redirects, 0, "{counters:?}");
}

#[test]
fn registered_context_reaches_its_service() {
    let Some((mut lab, server)) = Lab::with_server("ctxown") else {
        return;
    };
    let dst = server.addr();
    let listen = vec![free_addr("127.0.0.1")];
    let cgroup = lab.cgroup("services/owner");
    let id = lab.service("owner", &listen, by_cgroup(&cgroup), Some(b"policy=strict"));
    lab.route(id, "127.0.0.2/32", None, 0);
    let proxy = lab.toy_proxy(&cgroup, None, "owner", &listen, &[]);
    assert_eq!(lab.client("scope/client", dst, 100).unwrap()["ok"], true);
    let log = lab.wait_logged(proxy, 1);
    assert_eq!(log[0]["context"], "ok", "{log:?}");
    assert_eq!(log[0]["context_bytes"], "policy=strict", "{log:?}");
}

#[test]
fn processes_outside_the_scope_are_untouched() {
    let Some((mut lab, server)) = Lab::with_server("outside") else {
        return;
    };
    let dst = server.addr();
    let (_, proxy) = lab.proxy(v4_proxy("watcher", dst, 0));
    assert_eq!(lab.client("outside", dst, 1000).unwrap()["ok"], true);
    std::thread::sleep(Duration::from_millis(200));
    assert!(lab.proxy_log(proxy).is_empty());
    assert_eq!(lab.engine.counters().unwrap().redirects, 0);
    assert_eq!(server.accepted().len(), 1);
}

#[test]
fn rules_that_do_not_match_leave_the_connection_alone() {
    let Some((mut lab, server)) = Lab::with_server("nomatch") else {
        return;
    };
    let dst = server.addr();
    let other = EchoServer::start("127.0.0.3:0").unwrap();
    let (_, proxy) = lab.proxy(v4_proxy("watcher", dst, 0));
    // Same address, other port; and another address on the same port number.
    let other_port = EchoServer::start("127.0.0.2:0").unwrap();
    assert_eq!(
        lab.client("scope/client", other_port.addr(), 10).unwrap()["ok"],
        true
    );
    assert_eq!(
        lab.client("scope/client", other.addr(), 10).unwrap()["ok"],
        true
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(lab.proxy_log(proxy).is_empty());
    assert_eq!(lab.engine.counters().unwrap().redirects, 0);
}

/// Runs of each program between two readings of the engine's costs.
fn runs_between(
    before: &[connredir_engine::ProgramCost],
    after: &[connredir_engine::ProgramCost],
) -> std::collections::BTreeMap<&'static str, (u64, Duration)> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| {
            assert_eq!(a.program, b.program, "the readings list the same programs");
            let d = a.since(b);
            (d.program, (d.runs, d.run_time))
        })
        .collect()
}

#[test]
fn program_costs_count_the_runs_of_each_connection_while_statistics_are_on() {
    let Some((mut lab, server)) = Lab::with_server("costs") else {
        return;
    };
    let dst = server.addr();
    let (_, proxy) = lab.proxy(v4_proxy("costed", dst, 0));
    let unselected = EchoServer::start("127.0.0.3:0").unwrap();
    let _stats = connredir_engine::RunTimeStats::enable().unwrap();
    let connect4 = connredir_engine::programs::CONNECT4;
    let sockops = connredir_engine::programs::SOCKOPS;
    let getsockopt = connredir_engine::programs::GETSOCKOPT;

    // A connection no rule selects meets connect4 once and sockops at each
    // TCP event the kernel calls it for; no service reads anything.
    let before = lab.engine.program_costs().unwrap();
    assert_eq!(
        lab.client("scope/client", unselected.addr(), 10).unwrap()["ok"],
        true
    );
    let ran = runs_between(&before, &lab.engine.program_costs().unwrap());
    assert_eq!(ran[connect4].0, 1, "{ran:?}");
    assert!(ran[connect4].1 > Duration::ZERO, "{ran:?}");
    assert!(ran[sockops].0 >= 4, "{ran:?}");
    assert_eq!(ran[getsockopt].0, 0, "{ran:?}");

    // A redirected one also meets the service's side: its accepted socket's
    // events, its questions for the records (getsockopt) and its onward
    // connect.
    let before = lab.engine.program_costs().unwrap();
    assert_eq!(lab.client("scope/client", dst, 10).unwrap()["ok"], true);
    lab.wait_logged(proxy, 1);
    let ran = runs_between(&before, &lab.engine.program_costs().unwrap());
    assert_eq!(
        ran[connect4].0, 2,
        "the client's and the service's onward connect: {ran:?}"
    );
    assert!(ran[getsockopt].0 >= 1, "{ran:?}");
    assert!(ran[sockops].0 > 8, "{ran:?}");
}

#[test]
fn refused_redirects_leave_no_handoff_entry_behind() {
    let Some((mut lab, server)) = Lab::with_server("refused") else {
        return;
    };
    let dst = server.addr();
    // A registered service whose proxy is not running: connects are refused.
    let id = lab.service("down", &[free_addr("127.0.0.1")], by_uid(4243), None);
    lab.route(id, "127.0.0.2/32", None, 0);
    for _ in 0..5 {
        assert!(lab.client("scope/client", dst, 1).is_err());
    }
    let counters = lab.engine.counters().unwrap();
    assert_eq!(counters.service_down_blocked, 5, "{counters:?}");
    assert_eq!(counters.redirects, 0, "{counters:?}");
    assert_eq!(lab.engine.pending_handoffs().unwrap(), 0);
}

#[test]
fn rule_changes_apply_to_the_next_connection_and_count_hits() {
    let Some((mut lab, server)) = Lab::with_server("ruleedit") else {
        return;
    };
    let dst = server.addr();
    let cgroup = lab.cgroup("services/watcher");
    let listen = [free_addr("127.0.0.1")];
    let id = lab.service("watcher", &listen, by_cgroup(&cgroup), None);
    let proxy = lab.toy_proxy(&cgroup, None, "watcher", &listen, &[]);

    assert_eq!(lab.client("scope/client", dst, 10).unwrap()["ok"], true);
    let rule = lab
        .engine
        .add_rule(Rule {
            destinations: vec!["127.0.0.2/32".parse().unwrap()],
            ..Rule::tcp_to(id)
        })
        .unwrap();
    assert_eq!(lab.client("scope/client", dst, 10).unwrap()["ok"], true);
    assert_eq!(lab.client("scope/client", dst, 10).unwrap()["ok"], true);
    assert_eq!(lab.engine.rule_hits().unwrap()[&rule], 2);
    lab.engine.remove_rule(rule).unwrap();
    assert_eq!(lab.client("scope/client", dst, 10).unwrap()["ok"], true);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(lab.proxy_log(proxy).len(), 2);
    assert_eq!(server.accepted().len(), 4);
    assert!(lab.engine.rule_hits().unwrap().is_empty());
}

/// While connections keep coming, the rule set is swapped back and forth
/// between "to A, by a /32" and "to B, by a /8". Every connection meets one
/// whole rule set: it reaches a first proxy exactly once and is never left
/// uninspected. (A's onward connection may meet the next set and visit B
/// too: that is a new connect, and B has not seen the flow.)
#[test]
fn rule_set_swaps_are_atomic_under_load() {
    let Some((mut lab, server)) = Lab::with_server("atomic") else {
        return;
    };
    let dst = server.addr();
    let mut ids = Vec::new();
    for name in ["a", "b"] {
        let cgroup = lab.cgroup(&format!("services/{name}"));
        let listen = [free_addr("127.0.0.1")];
        ids.push(lab.service(name, &listen, by_cgroup(&cgroup), None));
        lab.toy_proxy(&cgroup, None, name, &listen, &[]);
    }
    let rule_set = |which: usize| {
        let prefix = if which == 0 {
            "127.0.0.2/32"
        } else {
            "127.0.0.0/8"
        };
        vec![Rule {
            destinations: vec![prefix.parse().unwrap()],
            ports: vec![dst.port()..=dst.port()],
            ..Rule::tcp_to(ids[which])
        }]
    };
    lab.engine.replace_rules(rule_set(0)).unwrap();
    const FLOWS: usize = 400;
    let sizes = vec!["1"; FLOWS].join(",");
    let client = Proc::spawn(
        &lab.cgroup("scope/client"),
        None,
        &["many", "--connect", &dst.to_string(), "--sizes", &sizes],
    )
    .unwrap();
    let mut swaps = 0;
    while client.lines().is_empty() && swaps < 2000 {
        swaps += 1;
        lab.engine.replace_rules(rule_set(swaps % 2)).unwrap();
    }
    let (status, lines) = client.finish().unwrap();
    assert!(status.success(), "{lines:?}");
    let report: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(report["failed"], 0, "{report}");
    assert!(
        swaps > 3,
        "the rule set should have changed during the flows"
    );
    let logs = || -> Vec<Value> { (0..2).flat_map(|i| lab.proxy_log(i)).collect() };
    let first_hops = |logs: &[Value]| {
        logs.iter()
            .filter(|e| e["chain"].as_array().map(Vec::len) == Some(1))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while first_hops(&logs()) < FLOWS && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let logs = logs();
    assert_eq!(first_hops(&logs), FLOWS, "after {swaps} swaps");
    for entry in &logs {
        let chain = entry["chain"].as_array().unwrap();
        assert!(
            chain.len() == 1 || (chain.len() == 2 && chain[0] != chain[1]),
            "{entry}"
        );
    }
    // Each flow reached the server once, through a proxy.
    assert_eq!(server.accepted().len(), FLOWS);
}

/// `connredir run -- CMD` puts a command (dynamically or statically linked)
/// and its children into the scope, passes its exit status on, and leaves
/// no cgroup behind.
#[test]
fn run_puts_a_command_in_the_scope() {
    let Some(busybox) = require_program("run", "busybox") else {
        return;
    };
    let Some(curl) = require_program("run", "curl") else {
        return;
    };
    let start = || EchoServer::start_replying_once("127.0.0.2:0");
    let Some((mut lab, server)) = Lab::with_server_from("run", start) else {
        return;
    };
    let dst = server.addr();
    let (id, proxy) = lab.proxy(v4_proxy("watcher", dst, 0));
    let scope = lab.cgroup("scope");
    let run = |args: &[&str], input: &[u8]| {
        let mut child = std::process::Command::new(workspace_bin("connredir"))
            .args(["run", "--scope", scope.to_str().unwrap(), "--"])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    };

    // curl, dynamically linked; the echo server answers HTTP/0.9 style.
    let url = format!("http://{dst}/through-the-layer");
    let curl = curl.to_str().unwrap();
    let out = run(&[curl, "--http0.9", "-sS", "--max-time", "10", &url], b"");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("GET /through-the-layer"));
    // busybox, statically linked: no preloaded library could catch it.
    let (ip, port) = (dst.ip().to_string(), dst.port().to_string());
    let out = run(
        &[busybox.to_str().unwrap(), "nc", &ip, &port],
        b"static hello\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"static hello\n");

    let log = lab.wait_logged(proxy, 2);
    assert_eq!(log.len(), 2, "{log:?}");
    for entry in &log {
        assert_eq!(entry["chain"], serde_json::json!([id.0]), "{entry}");
    }
    // The exit status passes through, and the run cgroups are gone.
    let out = run(&["sh", "-c", "exit 7"], b"");
    assert_eq!(out.status.code(), Some(7));
    let left: Vec<_> = std::fs::read_dir(&scope)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("connredir-run-")
        })
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn live_connections_show_each_leg_with_its_chain_until_it_closes() {
    let start = || EchoServer::start("127.0.0.1:0");
    let Some((mut lab, server)) = Lab::with_server_from("conns", start) else {
        return;
    };
    let dst = server.addr();
    let (first, proxy_a) = lab.proxy(v4_proxy("first", dst, 0));
    let (second, _) = lab.proxy(v4_proxy("second", dst, 1));
    let proxy_a_pid = lab.procs[proxy_a].pid();
    let release = std::env::temp_dir().join(format!("connredir-conns-{}", std::process::id()));
    let _ = std::fs::remove_file(&release);
    let (connect, until) = (dst.to_string(), release.display().to_string());
    let hold = Proc::spawn(
        &lab.cgroup("scope/client"),
        None,
        &["hold", "--connect", &connect, "--until", &until],
    )
    .unwrap();
    hold.wait_line("first exchange", |l| l.contains("\"first\""))
        .unwrap();

    let conns = eventually("two legs in the connection list", || {
        let conns = lab.engine.connections().unwrap();
        (conns.len() == 2).then_some(conns)
    });
    let leg = |hops: usize| conns.iter().find(|c| c.chain.len() == hops).unwrap();
    let (client_leg, forward_leg) = (leg(1), leg(2));
    assert_eq!(client_leg.chain, vec![first]);
    assert_eq!(client_leg.pid, hold.pid());
    assert_eq!(client_leg.command, "connredir-testk", "{client_leg:?}");
    assert_eq!(client_leg.local, client_leg.client);
    assert_eq!(forward_leg.chain, vec![first, second]);
    assert_eq!(forward_leg.pid, proxy_a_pid);
    assert_eq!(forward_leg.client_pid, hold.pid());
    assert_eq!(forward_leg.client, client_leg.client);
    for leg in [client_leg, forward_leg] {
        assert_eq!(leg.original_destination, Some(dst), "{leg:?}");
    }

    std::fs::write(&release, b"").unwrap();
    let (status, lines) = hold.finish().unwrap();
    let _ = std::fs::remove_file(&release);
    assert!(status.success(), "{lines:?}");
    eventually("the list to empty once the flow closed", || {
        lab.engine.connections().unwrap().is_empty().then_some(())
    });
    assert_eq!(lab.engine.counters().unwrap().conns_untracked, 0);
}

#[test]
fn trace_reports_each_decision_with_rule_service_and_state() {
    use connredir::RedirectState;
    use connredir_engine::Decision;
    let start = || EchoServer::start("127.0.0.1:0");
    let Some((mut lab, server)) = Lab::with_server_from("trace", start) else {
        return;
    };
    let dst = server.addr();
    let unrouted = EchoServer::start("127.0.0.2:0").unwrap();
    let (id, proxy) = lab.proxy(v4_proxy("traced", dst, 0));
    let proxy_pid = lab.procs[proxy].pid();
    let rule = lab.engine.rules().next().unwrap().0;
    let mut tracer = lab.engine.tracer().unwrap();
    tracer.set_enabled(true).unwrap();

    let redirected = lab.client("scope/client", dst, 10).unwrap();
    let direct = lab.client("scope/client", unrouted.addr(), 10).unwrap();
    let mut events = Vec::new();
    let pid = |report: &Value| report["pid"].as_u64().unwrap() as u32;
    eventually("three decisions", || {
        events.extend(tracer.poll(Duration::from_millis(100)));
        (events.len() >= 3).then_some(())
    });

    let find = |pid: u32| events.iter().find(|e| e.pid == pid).unwrap();
    let client = find(pid(&redirected));
    assert_eq!(client.decision, Decision::Redirected, "{client:?}");
    assert_eq!(client.destination, dst);
    assert_eq!((client.rule, client.service), (Some(rule.0), Some(id)));
    assert_eq!(client.state, RedirectState::NotRedirected);
    assert_eq!(client.command, "connredir-testk");
    let forward = find(proxy_pid);
    assert_eq!(forward.decision, Decision::LoopPrevented, "{forward:?}");
    assert_eq!(forward.state, RedirectState::RedirectedBySelf);
    assert_eq!((forward.destination, forward.hops), (dst, 1));
    let other = find(pid(&direct));
    assert_eq!(other.decision, Decision::NoRule, "{other:?}");
    assert_eq!((other.rule, other.service), (None, None));

    // Off again: nothing more arrives.
    tracer.set_enabled(false).unwrap();
    lab.client("scope/client", dst, 10).unwrap();
    assert!(tracer.poll(Duration::from_millis(200)).is_empty());
}

#[test]
fn own_connections_reach_the_service_only_when_it_says_so() {
    let start = || EchoServer::start("127.0.0.1:0");
    let Some((mut lab, server)) = Lab::with_server_from("own-by-self", start) else {
        return;
    };
    let dst = server.addr();
    let listen = vec![free_addr("127.0.0.1")];
    let cgroup = lab.cgroup("services/curious");
    let id = lab.register(Service {
        own_connections_by_self: false,
        ..service_spec("curious", &listen, by_cgroup(&cgroup))
    });
    lab.route(id, "127.0.0.1/32", Some(dst.port()), 0);
    let proxy = lab.toy_proxy(&cgroup, None, "curious", &listen, &[]);

    // A connection of the service's own cgroup, without records, is inspected
    // by the service; its forwarding connection carries records and does not
    // come back.
    let report = lab.client("services/curious", dst, 1000).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let log = lab.wait_logged(proxy, 1);
    assert_eq!(log.len(), 1, "{log:?}");
    assert_eq!(log[0]["client_pid"], report["pid"]);
    assert_eq!(server.accepted().len(), 1);

    // With the switch on (the default), such a connection goes direct.
    let other = EchoServer::start("127.0.0.1:0").unwrap();
    let shy = lab.proxy(v4_proxy("shy", other.addr(), 0)).1;
    let report = lab.client("services/shy", other.addr(), 1000).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(other.accepted().len(), 1);
    assert!(lab.proxy_log(shy).is_empty(), "{:?}", lab.proxy_log(shy));
}

/// A service with sockmap acceleration, its destination an echo server inside
/// the scope (so both legs can be accelerated), and `proxy` started by
/// `start` in the service's cgroup. Returns the destination and the proxy.
fn accelerated_lab(
    lab: &mut Lab,
    start: impl FnOnce(&std::path::Path, &[SocketAddr]) -> Proc,
) -> (SocketAddr, usize) {
    accelerated_lab_with_server_in(lab, "scope/server", start)
}

/// [`accelerated_lab`] with the echo server in cgroup `server`: outside the
/// scope, only the client-to-proxy leg can be accelerated.
fn accelerated_lab_with_server_in(
    lab: &mut Lab,
    server: &str,
    start: impl FnOnce(&std::path::Path, &[SocketAddr]) -> Proc,
) -> (SocketAddr, usize) {
    let dst = free_addr("127.0.0.3");
    let listen = dst.to_string();
    let echo = Proc::spawn(&lab.cgroup(server), None, &["echo", "--listen", &listen]).unwrap();
    echo.wait_line("echo ready", |l| l == "ready").unwrap();
    lab.procs.push(echo);
    let cgroup = lab.cgroup("services/fast");
    let proxy_listen = vec![free_addr("127.0.0.1")];
    let id = lab.register(Service {
        accelerate: true,
        ..service_spec("fast", &proxy_listen, by_cgroup(&cgroup))
    });
    lab.route(id, "127.0.0.3/32", Some(dst.port()), 0);
    let proxy = start(&cgroup, &proxy_listen);
    proxy.wait_line("proxy ready", |l| l == "ready").unwrap();
    lab.procs.push(proxy);
    (dst, lab.procs.len() - 1)
}

/// Starts the reference proxy as the accelerated service, with `extra`
/// options (a `start` for [`accelerated_lab`]).
fn reference_proxy(
    extra: &'static [&'static str],
) -> impl FnOnce(&std::path::Path, &[SocketAddr]) -> Proc {
    move |cgroup, listen| {
        let listen = listen[0].to_string();
        let mut args = vec!["--name", "fast", "--listen", &listen];
        args.extend_from_slice(extra);
        Proc::spawn_program(cgroup, None, &workspace_bin("connredir-proxy"), &args).unwrap()
    }
}

/// 64 concurrent flows of up to 300 kB, each checked byte for byte.
/// Blocking reads on accelerated sockets see one spurious EAGAIN at end of
/// stream (the kernel's tcp_bpf): these clients retry, as event-loop
/// clients do.
fn many_accelerated_flows(lab: &Lab, dst: SocketAddr) {
    let sizes: Vec<String> = (0..64).map(|i| (i * 7919 % 300_000).to_string()).collect();
    let (sizes, connect) = (sizes.join(","), dst.to_string());
    let (status, lines) = Proc::spawn(
        &lab.cgroup("scope/client"),
        None,
        &[
            "--retry-eagain",
            "many",
            "--connect",
            &connect,
            "--sizes",
            &sizes,
        ],
    )
    .unwrap()
    .finish()
    .unwrap();
    assert!(status.success(), "{lines:?}");
    let report: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(report["failed"], 0, "{report}");
}

/// The data really went socket to socket: writes were moved past TCP, and
/// no joined socket had to stay on TCP.
fn assert_moved_past_tcp(lab: &Lab, flows: u64) {
    let counters = lab.engine.counters().unwrap();
    assert!(counters.accel_joined >= 4 * flows, "{counters:?}");
    assert_eq!(counters.accel_passed, 0, "{counters:?}");
    assert!(counters.accel_sends >= flows, "{counters:?}");
}

#[test]
fn accelerated_service_moves_data_socket_to_socket_byte_exact() {
    let Some(mut lab) = Lab::new("accel") else {
        return;
    };
    let (dst, proxy) = accelerated_lab(&mut lab, |cgroup, listen| {
        let listen = listen[0].to_string();
        let args = ["proxy", "--name", "fast", "--listen", &listen];
        Proc::spawn(cgroup, None, &args).unwrap()
    });
    for bytes in [0, 1, 100_000, 8_000_000] {
        let report = lab
            .client_with("scope/client", dst, bytes, &["--retry-eagain"])
            .unwrap();
        assert_eq!(report["ok"], true, "{bytes} bytes: {report}");
    }
    many_accelerated_flows(&lab, dst);
    assert_moved_past_tcp(&lab, 68);
    let log = lab.wait_logged(proxy, 68);
    assert_eq!(log.len(), 68);
    for entry in &log {
        assert_eq!(entry["accelerated"], true, "{entry}");
        assert_eq!(entry["onward_accelerated"], true, "{entry}");
    }
    // Closed sockets leave the acceleration maps.
    eventually("the acceleration maps to empty", || {
        (lab.engine.accelerated_sockets().unwrap() == 0).then_some(())
    });
}

#[test]
fn reference_proxy_relays_accelerated_flows_byte_exact() {
    let Some(mut lab) = Lab::new("accel-ref") else {
        return;
    };
    let (dst, proxy) = accelerated_lab(&mut lab, reference_proxy(&["--no-cut-through"]));
    many_accelerated_flows(&lab, dst);
    assert_moved_past_tcp(&lab, 64);
    let log = lab.wait_logged(proxy, 64);
    assert_eq!(log.len(), 64, "{log:?}");
    // Cut-through directions are not counted by the proxy.
    assert!(
        log.iter().all(|l| l.get("cut_through").is_none()),
        "{log:?}"
    );
    let total: u64 = log.iter().map(|l| l["bytes_up"].as_u64().unwrap()).sum();
    let expected: u64 = (0..64u64).map(|i| i * 7919 % 300_000).sum();
    assert_eq!(total, expected);
}

#[test]
fn reference_proxy_cuts_inspected_bulk_directions_through_the_kernel() {
    let Some(mut lab) = Lab::new("accel-cut") else {
        return;
    };
    let (dst, proxy) = accelerated_lab(&mut lab, reference_proxy(&[]));
    // Byte-exact both ways, across the switch and far past it.
    for bytes in [70_000, 8_000_000] {
        let report = lab
            .client_with("scope/client", dst, bytes, &["--retry-eagain"])
            .unwrap();
        assert_eq!(report["ok"], true, "{bytes} bytes: {report}");
    }
    many_accelerated_flows(&lab, dst);
    assert_moved_past_tcp(&lab, 66);
    let counters = lab.engine.counters().unwrap();
    // Once the client's first bytes are inspected, each direction that is
    // still open goes to the kernel, and data then moves past the proxy. A
    // writer that never pauses can keep a direction in the proxy (see
    // `pump_cut_through`): most flows, not all, must have been cut.
    assert!(counters.cut_throughs >= 50, "{counters:?}");
    assert!(counters.cut_through_sends >= 1, "{counters:?}");
    let log = lab.wait_logged(proxy, 66);
    let cut = log
        .iter()
        .filter(|l| l["cut_through"].as_array().is_some_and(|d| !d.is_empty()))
        .count();
    assert!(cut >= 50, "{cut} of 66 flows cut through: {log:?}");
    // The log still counts every byte: the layer's count of a cut-through
    // direction covers what the proxy never saw.
    let sizes = (0..64u64)
        .map(|i| i * 7919 % 300_000)
        .chain([70_000, 8_000_000]);
    let expected: u64 = sizes.sum();
    for field in ["bytes_up", "bytes_down"] {
        let total: u64 = log.iter().map(|l| l[field].as_u64().unwrap()).sum();
        assert_eq!(total, expected, "{field}");
    }
}

#[test]
fn without_cut_through_the_reference_proxy_relays_every_byte() {
    let Some(mut lab) = Lab::new("accel-nocut") else {
        return;
    };
    let (dst, proxy) = accelerated_lab(&mut lab, reference_proxy(&["--no-cut-through"]));
    let report = lab
        .client_with("scope/client", dst, 3_000_000, &["--retry-eagain"])
        .unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let counters = lab.engine.counters().unwrap();
    assert_eq!(counters.cut_throughs, 0, "{counters:?}");
    let log = lab.wait_logged(proxy, 1);
    assert_eq!(log[0]["bytes_up"], 3_000_000, "{log:?}");
    assert_eq!(log[0]["bytes_down"], 3_000_000, "{log:?}");
}

#[test]
fn reference_proxy_with_only_the_client_leg_accelerated_is_byte_exact() {
    let Some(mut lab) = Lab::new("accel-client-leg") else {
        return;
    };
    // The origin is outside the scope: its end never joins, so the proxy's
    // onward socket stays on TCP and the proxy splices into the accelerated
    // client socket while copying out of it.
    let (dst, proxy) = accelerated_lab_with_server_in(&mut lab, "outside", reference_proxy(&[]));
    many_accelerated_flows(&lab, dst);
    let counters = lab.engine.counters().unwrap();
    // Client and proxy end of each flow, and the proxy's onward socket,
    // which finds no peer and stays on TCP at its first write.
    assert!(counters.accel_joined >= 3 * 64, "{counters:?}");
    assert!(counters.accel_sends >= 64, "{counters:?}");
    let log = lab.wait_logged(proxy, 64);
    let down: u64 = log.iter().map(|l| l["bytes_down"].as_u64().unwrap()).sum();
    let expected: u64 = (0..64u64).map(|i| i * 7919 % 300_000).sum();
    assert_eq!(down, expected);
}
