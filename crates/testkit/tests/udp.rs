//! End-to-end tests of UDP redirection: real eBPF programs attached to a
//! cgroup tree each test makes, the test kit's UDP service role in its own
//! cgroup, clients as an unprivileged user, datagrams on loopback.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use connredir_engine::{OnDown, Protocol, Service, ServiceId};
use connredir_testkit::{
    by_cgroup, eventually, free_addr, mapped, permutations, service_spec, EchoServer, Lab, Proc,
    TestDir, UdpEchoServer,
};
use serde_json::{json, Value};

/// The unprivileged user clients run as.
const NOBODY: u32 = 65534;

/// The lab and a UDP echo server on `server_ip`, the original destination.
fn udp_lab(test: &str, server_ip: &str) -> Option<(Lab, UdpEchoServer)> {
    let lab = Lab::new(test)?;
    let server = UdpEchoServer::start(&format!("{server_ip}:0")).expect("UDP echo server");
    Some((lab, server))
}

/// Runs the UDP client role as `nobody` in `scope/client` and returns its
/// report (with its pid).
fn udp_client(lab: &Lab, connect: SocketAddr, extra: &[&str]) -> Value {
    let connect = connect.to_string();
    let mut args = vec!["udp-client", "--connect", &connect];
    args.extend_from_slice(extra);
    let proc = Proc::spawn(&lab.cgroup("scope/client"), Some(NOBODY), &args).unwrap();
    let pid = proc.pid();
    let (status, lines) = proc.finish().unwrap();
    assert!(status.success(), "client failed: {status}, {lines:?}");
    let mut report: Value = serde_json::from_str(lines.last().expect("a report")).unwrap();
    report["pid"] = pid.into();
    report
}

/// The port a client report's local address names.
fn local_port(report: &Value) -> u16 {
    report["local"]
        .as_str()
        .unwrap()
        .parse::<SocketAddr>()
        .unwrap()
        .port()
}

#[test]
fn connected_udp_client_is_redirected_inspected_and_answered_from_the_original_destination() {
    let Some((mut lab, server)) = udp_lab("udp-connected-v4", "127.0.0.2") else {
        return;
    };
    let dst = server.addr();
    let listen = free_addr("127.0.0.1");
    let (id, service) = lab.udp_service("inspector", listen, "127.0.0.2/32", dst.port(), 0, &[]);

    let report = udp_client(&lab, dst, &[]);
    assert_eq!(report["ok"], true, "{report}");
    // The client cannot tell: every echo comes from the original
    // destination, and that is its socket's peer.
    assert_eq!(report["from"], json!(vec![dst.to_string(); 3]), "{report}");
    assert_eq!(report["peer"], dst.to_string(), "{report}");

    let log = lab.wait_logged(service, 1);
    assert_eq!(log.len(), 1, "service log: {log:?}");
    let entry = &log[0];
    assert_eq!(entry["records"], "ok", "{entry}");
    assert_eq!(entry["chain"], json!([id.0]), "{entry}");
    assert_eq!(entry["original_dst"], dst.to_string(), "{entry}");
    assert_eq!(entry["record_dst"], dst.to_string(), "{entry}");
    assert_eq!(entry["client_pid"], report["pid"], "{entry}");
    assert_eq!(entry["context"], "ok", "{entry}");
    assert_eq!(entry["context_remote"], dst.to_string(), "{entry}");
    let client_port = local_port(&report);
    assert_eq!(
        entry["context_local"],
        format!("127.0.0.1:{client_port}"),
        "{entry}"
    );
    // Every datagram reached the destination through the service, none
    // straight from the client.
    let sources = server.sources();
    assert_eq!(sources.len(), 3, "{sources:?}");
    assert!(
        sources.iter().all(|s| s.port() != client_port),
        "{sources:?} vs client port {client_port}"
    );
    let counters = lab.engine.counters().unwrap();
    assert_eq!(counters.redirects, 1, "{counters:?}");
}

/// `n` UDP services for one destination, registered and started in every
/// order, priority by name: each of several clients' flows passes each
/// service once, in priority order, and reaches the destination once.
fn udp_chain_in_every_start_order(n: usize, test: &str) {
    const FLOWS: usize = 2;
    let names = ["alpha", "bravo", "charlie"];
    for order in permutations(n) {
        let Some((mut lab, server)) = udp_lab(test, "127.0.0.2") else {
            return;
        };
        let dst = server.addr();
        let mut started = vec![None; n];
        for &which in &order {
            let listen = free_addr("127.0.0.1");
            started[which] = Some(lab.udp_service(
                names[which],
                listen,
                "127.0.0.2/32",
                dst.port(),
                which as u32 + 1,
                &[],
            ));
        }
        let started: Vec<(ServiceId, usize)> = started.into_iter().map(Option::unwrap).collect();
        for _ in 0..FLOWS {
            let report = udp_client(&lab, dst, &[]);
            assert_eq!(report["ok"], true, "order {order:?}: {report}");
            assert_eq!(report["peer"], dst.to_string(), "{report}");
        }
        let ids: Vec<u32> = started.iter().map(|(id, _)| id.0).collect();
        for (position, (_, service)) in started.iter().enumerate() {
            let log = lab.wait_logged(*service, FLOWS);
            assert_eq!(
                log.len(),
                FLOWS,
                "order {order:?}, {}: {log:?}",
                names[position]
            );
            for entry in &log {
                assert_eq!(
                    entry["chain"],
                    json!(ids[..=position]),
                    "order {order:?}: {entry}"
                );
                assert_eq!(entry["original_dst"], dst.to_string(), "{entry}");
            }
        }
        // Three datagrams per flow, each once, from the last service's
        // onward socket of that flow.
        let sources = server.sources();
        assert_eq!(sources.len(), 3 * FLOWS, "order {order:?}: {sources:?}");
        let distinct: HashSet<SocketAddr> = sources.iter().copied().collect();
        assert_eq!(distinct.len(), FLOWS, "order {order:?}: {sources:?}");
        let counters = lab.engine.counters().unwrap();
        assert_eq!(counters.redirects, (FLOWS * n) as u64, "{counters:?}");
        assert_eq!(counters.hop_limit, 0, "{counters:?}");
    }
}

#[test]
fn two_udp_services_chain_once_each_in_every_start_order() {
    udp_chain_in_every_start_order(2, "udp-chain2");
}

#[test]
fn three_udp_services_chain_once_each_in_every_start_order() {
    udp_chain_in_every_start_order(3, "udp-chain3");
}

#[test]
fn records_less_udp_service_does_not_loop() {
    let Some((mut lab, server)) = udp_lab("udp-norecords", "127.0.0.2") else {
        return;
    };
    let dst = server.addr();
    let listen = free_addr("127.0.0.1");
    let (id, service) = lab.udp_service(
        "plain",
        listen,
        "127.0.0.2/32",
        dst.port(),
        0,
        &["--no-records"],
    );
    for _ in 0..2 {
        let report = udp_client(&lab, dst, &[]);
        assert_eq!(report["ok"], true, "{report}");
    }
    std::thread::sleep(Duration::from_millis(200));
    let log = lab.proxy_log(service);
    assert_eq!(log.len(), 2, "{log:?}");
    for entry in &log {
        assert_eq!(entry["chain"], json!([id.0]), "{entry}");
    }
    assert_eq!(server.sources().len(), 6, "{:?}", server.sources());
    let counters = lab.engine.counters().unwrap();
    assert_eq!(counters.redirects, 2, "{counters:?}");
    assert!(counters.loops_prevented >= 2, "{counters:?}");
}

/// A records-less UDP service chained with one that sets records, in both
/// priority orders: the records-less one's onward socket inherits the
/// record of the flow it forwards, so each flow passes each service once.
#[test]
fn records_less_udp_service_chains_with_others_without_looping() {
    for plain_first in [true, false] {
        let Some((mut lab, server)) = udp_lab("udp-inherit", "127.0.0.2") else {
            return;
        };
        let dst = server.addr();
        let (plain_id, plain) = lab.udp_service(
            "plain",
            free_addr("127.0.0.1"),
            "127.0.0.2/32",
            dst.port(),
            if plain_first { 1 } else { 2 },
            &["--no-records"],
        );
        let (aware_id, aware) = lab.udp_service(
            "aware",
            free_addr("127.0.0.1"),
            "127.0.0.2/32",
            dst.port(),
            if plain_first { 2 } else { 1 },
            &[],
        );
        for _ in 0..2 {
            let report = udp_client(&lab, dst, &[]);
            assert_eq!(report["ok"], true, "plain first: {plain_first}: {report}");
        }
        let expected = if plain_first {
            [vec![plain_id.0], vec![plain_id.0, aware_id.0]]
        } else {
            [vec![aware_id.0, plain_id.0], vec![aware_id.0]]
        };
        std::thread::sleep(Duration::from_millis(200));
        for (service, chain) in [(plain, &expected[0]), (aware, &expected[1])] {
            let log = lab.proxy_log(service);
            assert_eq!(log.len(), 2, "plain first: {plain_first}: {log:?}");
            for entry in log {
                assert_eq!(entry["chain"], json!(chain), "{entry}");
            }
        }
        assert_eq!(server.sources().len(), 6, "{:?}", server.sources());
        let counters = lab.engine.counters().unwrap();
        assert_eq!(counters.redirects, 4, "{counters:?}");
        assert_eq!(counters.records_inherited, 2, "{counters:?}");
    }
}

/// One UDP service for a destination on `server_ip`, reached by a client
/// (connected, or with sendto when `unconnected`) at `connect(dst)`: every
/// datagram goes through the service, whose socket for the client reads the
/// flow's records and original destination, and every echo reads as coming
/// from the address the client sent to.
fn udp_round_trip(
    server_ip: &str,
    listen_ip: &str,
    prefix: &str,
    connect: impl Fn(SocketAddr) -> SocketAddr,
    unconnected: bool,
    test: &str,
) {
    let Some((mut lab, server)) = udp_lab(test, server_ip) else {
        return;
    };
    let dst = server.addr();
    let (id, service) = lab.udp_service(
        "inspector",
        free_addr(listen_ip),
        prefix,
        dst.port(),
        0,
        &[],
    );
    let target = connect(dst);
    // The kernel answers a datagram sent to the unspecified address (or
    // its IPv4-mapped form) from the loopback address it went to, in the
    // socket's family.
    let unspecified = match target {
        SocketAddr::V4(v4) => v4.ip().is_unspecified(),
        SocketAddr::V6(v6) => {
            v6.ip().is_unspecified() || v6.ip().to_ipv4_mapped() == Some(Ipv4Addr::UNSPECIFIED)
        }
    };
    let answered_by = match (unspecified, target) {
        (false, _) => target,
        (true, SocketAddr::V4(_)) => dst,
        (true, SocketAddr::V6(_)) => mapped(dst),
    };
    let extra: &[&str] = if unconnected { &["--unconnected"] } else { &[] };
    let report = udp_client(&lab, target, extra);
    assert_eq!(
        report["ok"],
        true,
        "{report}; service: {:?}",
        lab.proxy_log(service)
    );
    assert_eq!(
        report["from"],
        json!(vec![answered_by.to_string(); 3]),
        "{report}"
    );
    if !unconnected {
        assert_eq!(report["peer"], answered_by.to_string(), "{report}");
    }
    let log = lab.wait_logged(service, 1);
    assert_eq!(log.len(), 1, "service log: {log:?}");
    let entry = &log[0];
    assert_eq!(entry["records"], "ok", "{entry}");
    assert_eq!(entry["chain"], json!([id.0]), "{entry}");
    assert_eq!(entry["original_dst"], dst.to_string(), "{entry}");
    assert_eq!(entry["client_pid"], report["pid"], "{entry}");
    let client_port = local_port(&report);
    let sources = server.sources();
    assert_eq!(sources.len(), 3, "{sources:?}");
    assert!(
        sources.iter().all(|s| s.port() != client_port),
        "{sources:?} vs client port {client_port}"
    );
}

#[test]
fn unconnected_udp_client_is_redirected_per_datagram_and_answered_from_the_original_destination() {
    udp_round_trip(
        "127.0.0.2",
        "127.0.0.1",
        "127.0.0.2/32",
        |d| d,
        true,
        "udp-sendto-v4",
    );
}

#[test]
fn ipv6_udp_clients_are_redirected_connected_and_unconnected() {
    for unconnected in [false, true] {
        udp_round_trip("[::1]", "::1", "::1/128", |d| d, unconnected, "udp-v6");
    }
}

#[test]
fn ipv4_mapped_udp_destinations_follow_the_ipv4_rules_connected_and_unconnected() {
    for unconnected in [false, true] {
        udp_round_trip(
            "127.0.0.2",
            "127.0.0.1",
            "127.0.0.0/8",
            mapped,
            unconnected,
            "udp-v4mapped",
        );
    }
}

/// A datagram to 0.0.0.0, :: or ::ffff:0.0.0.0 goes to loopback: a rule on
/// 127.0.0.1 or ::1 must take it through the service like one sent there.
#[test]
fn udp_to_the_unspecified_address_is_redirected_as_loopback() {
    let any4 = |d: SocketAddr| SocketAddr::from(([0, 0, 0, 0], d.port()));
    let any6 = |d: SocketAddr| SocketAddr::from((Ipv6Addr::UNSPECIFIED, d.port()));
    let mapped_any = |d: SocketAddr| mapped(any4(d));
    for unconnected in [false, true] {
        udp_round_trip(
            "127.0.0.1",
            "127.0.0.1",
            "127.0.0.1/32",
            any4,
            unconnected,
            "udp-any4",
        );
        udp_round_trip(
            "127.0.0.1",
            "127.0.0.1",
            "127.0.0.1/32",
            mapped_any,
            unconnected,
            "udp-any-mapped",
        );
        udp_round_trip("[::1]", "::1", "::1/128", any6, unconnected, "udp-any6");
    }
}

/// A client (Python, uid 65534) sends to 0.0.0.0 with `IP_PKTINFO` naming
/// 127.0.0.2 as its source: the kernel routes the datagram there. A rule on
/// 127.0.0.2 must take it through the service.
const PKTINFO_CLIENT: &str = r#"
import json, socket, struct, sys

port = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
info = struct.pack("@i4s4s", 0, socket.inet_aton("127.0.0.2"), socket.inet_aton("0.0.0.0"))
IP_PKTINFO = 8  # <linux/in.h>; not in Python 3.11's socket module
s.sendmsg([b"pktinfo"], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, ("0.0.0.0", port))
try:
    data, source = s.recvfrom(65536)
    print(json.dumps({"ok": data == b"pktinfo", "from": f"{source[0]}:{source[1]}",
                      "local_port": s.getsockname()[1]}), flush=True)
except OSError as e:
    print(json.dumps({"ok": False, "error": str(e), "local_port": s.getsockname()[1]}), flush=True)
"#;

#[test]
fn udp_to_the_unspecified_address_from_a_pktinfo_source_is_redirected() {
    let Some((mut lab, server)) = udp_lab("udp-any-pktinfo", "127.0.0.2") else {
        return;
    };
    let dst = server.addr();
    let listen = free_addr("127.0.0.1");
    let (_, service) = lab.udp_service("inspector", listen, "127.0.0.2/32", dst.port(), 0, &[]);
    let dir = TestDir::new("udp-any-pktinfo", Some(NOBODY));
    let script = dir.write("client.py", PKTINFO_CLIENT);
    let port = dst.port().to_string();
    let python = std::path::Path::new("/usr/bin/python3");
    let client = Proc::spawn_program(
        &lab.cgroup("scope/client"),
        Some(NOBODY),
        python,
        &[&script, &port],
    )
    .unwrap();
    let (status, lines) = client.finish().unwrap();
    assert!(status.success(), "{status}: {lines:?}");
    let report: Value = serde_json::from_str(lines.last().expect("a report")).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let log = lab.wait_logged(service, 1);
    assert_eq!(
        log.len(),
        1,
        "the service takes the flow: {log:?} / {report}"
    );
    assert_eq!(log[0]["original_dst"], dst.to_string(), "{log:?}");
    let client_port = report["local_port"].as_u64().unwrap();
    let sources = server.sources();
    assert!(
        sources.iter().all(|s| u64::from(s.port()) != client_port),
        "the client reached the destination directly: {sources:?}"
    );
}

/// One rule for both protocols sends a TCP connection to the service's TCP
/// listener and a UDP flow to its UDP socket on the same address; a UDP
/// rule leaves TCP alone.
#[test]
fn one_rule_for_tcp_and_udp_redirects_both_and_a_udp_rule_only_udp() {
    for protocol in [Protocol::TcpAndUdp, Protocol::Udp] {
        let Some((mut lab, udp_server)) = udp_lab("udp-both", "127.0.0.2") else {
            return;
        };
        let tcp_server = EchoServer::start("127.0.0.2:0").unwrap();
        let listen = free_addr("127.0.0.1");
        let cgroup = lab.cgroup("services/both");
        let id = lab.service("both", &[listen], by_cgroup(&cgroup), None);
        lab.route_protocol(id, protocol, "127.0.0.2/32", None, 0);
        let udp = lab.start_udp_service(&cgroup, "both-udp", listen, &[]);
        let tcp = lab.toy_proxy(&cgroup, None, "both-tcp", &[listen], &[]);

        let report = udp_client(&lab, udp_server.addr(), &[]);
        assert_eq!(report["ok"], true, "{protocol:?}: {report}");
        assert_eq!(lab.wait_logged(udp, 1).len(), 1, "{protocol:?}");

        let connect = tcp_server.addr().to_string();
        let args = ["client", "--connect", &connect, "--bytes", "1000"];
        let proc = Proc::spawn(&lab.cgroup("scope/client"), Some(NOBODY), &args).unwrap();
        let (status, lines) = proc.finish().unwrap();
        assert!(status.success(), "{protocol:?}: {lines:?}");
        let tcp_log = if protocol == Protocol::TcpAndUdp {
            lab.wait_logged(tcp, 1)
        } else {
            std::thread::sleep(Duration::from_millis(200));
            lab.proxy_log(tcp)
        };
        let expected = usize::from(protocol == Protocol::TcpAndUdp);
        assert_eq!(tcp_log.len(), expected, "{protocol:?}: {tcp_log:?}");
        let counters = lab.engine.counters().unwrap();
        assert_eq!(counters.redirects, 1 + expected as u64, "{counters:?}");
    }
}

/// A client cannot stand in for a UDP service: a bind of the service's UDP
/// address, or of a wildcard address on its port, by anyone else in the
/// scope is refused, even with SO_REUSEPORT as the service's own user
/// (which the kernel alone would let join the service's group).
#[test]
fn an_impostor_cannot_bind_a_udp_services_address() {
    let Some((mut lab, server)) = udp_lab("udp-impostor", "127.0.0.2") else {
        return;
    };
    let dst = server.addr();
    let listen = free_addr("127.0.0.1");
    let cgroup = lab.cgroup("services/guarded");
    let id = lab.service("guarded", &[listen], by_cgroup(&cgroup), None);
    lab.route_protocol(id, Protocol::Udp, "127.0.0.2/32", Some(dst.port()), 0);
    let listen_text = listen.to_string();
    let args = ["udp-proxy", "--name", "guarded", "--listen", &listen_text];
    let service = Proc::spawn(&cgroup, Some(NOBODY), &args).unwrap();
    service
        .wait_line("UDP service ready", |l| l == "ready")
        .unwrap();
    lab.procs.push(service);
    let service = lab.procs.len() - 1;

    for addr in [listen_text.clone(), format!("0.0.0.0:{}", listen.port())] {
        let args = ["attack", "udp-bind", &addr];
        let (status, lines) = Proc::spawn(&lab.cgroup("scope/client"), Some(NOBODY), &args)
            .unwrap()
            .finish()
            .unwrap();
        assert!(status.success(), "{lines:?}");
        let report: Value = serde_json::from_str(lines.last().unwrap()).unwrap();
        assert_eq!(report["errno"], 13, "{addr}: {report}");
    }
    let report = udp_client(&lab, dst, &[]);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(lab.wait_logged(service, 1).len(), 1);
    assert!(lab.engine.counters().unwrap().binds_refused >= 2);
}

/// While a UDP service is down, its failure policy decides in the kernel:
/// `block` refuses the connect or the sendto (ECONNREFUSED) and nothing
/// reaches the destination; `bypass` lets the flow go to the destination.
#[test]
fn a_udp_service_that_is_down_blocks_or_is_bypassed_as_its_policy_says() {
    for on_down in [OnDown::Block, OnDown::Bypass] {
        for unconnected in [false, true] {
            let Some((mut lab, server)) = udp_lab("udp-down", "127.0.0.2") else {
                return;
            };
            let dst = server.addr();
            let cgroup = lab.cgroup("services/absent");
            let id = lab.register(Service {
                on_down,
                ..service_spec("absent", &[free_addr("127.0.0.1")], by_cgroup(&cgroup))
            });
            lab.route_protocol(id, Protocol::Udp, "127.0.0.2/32", Some(dst.port()), 0);
            let extra: &[&str] = if unconnected { &["--unconnected"] } else { &[] };
            let report = udp_client(&lab, dst, extra);
            let case = format!("{on_down:?}, unconnected: {unconnected}");
            let counters = lab.engine.counters().unwrap();
            if on_down == OnDown::Block {
                assert_eq!(report["ok"], false, "{case}: {report}");
                if unconnected {
                    assert_eq!(
                        report["from"],
                        json!(vec!["send error 111"; 3]),
                        "{case}: {report}"
                    );
                } else {
                    assert_eq!(report["errno"], 111, "{case}: {report}");
                }
                std::thread::sleep(Duration::from_millis(200));
                assert!(
                    server.sources().is_empty(),
                    "{case}: {:?}",
                    server.sources()
                );
                assert!(counters.service_down_blocked >= 1, "{case}: {counters:?}");
            } else {
                assert_eq!(report["ok"], true, "{case}: {report}");
                assert_eq!(server.sources().len(), 3, "{case}");
                assert!(counters.service_down_bypassed >= 1, "{case}: {counters:?}");
            }
        }
    }
}

/// The decision trace names the protocol: a UDP client's connect and an
/// unconnected client's datagrams are traced as UDP decisions.
#[test]
fn udp_decisions_are_traced_as_udp() {
    use connredir_engine::Decision;
    let Some((mut lab, server)) = udp_lab("udp-trace", "127.0.0.2") else {
        return;
    };
    let dst = server.addr();
    let (id, _) = lab.udp_service(
        "traced",
        free_addr("127.0.0.1"),
        "127.0.0.2/32",
        dst.port(),
        0,
        &[],
    );
    let mut tracer = lab.engine.tracer().unwrap();
    tracer.set_enabled(true).unwrap();
    let connected = udp_client(&lab, dst, &[]);
    let unconnected = udp_client(&lab, dst, &["--unconnected"]);
    assert_eq!(connected["ok"], true, "{connected}");
    assert_eq!(unconnected["ok"], true, "{unconnected}");
    let pid = |report: &Value| report["pid"].as_u64().unwrap() as u32;
    let mut events = Vec::new();
    eventually("the clients' decisions", || {
        events.extend(tracer.poll(Duration::from_millis(100)));
        let seen = |p: u32| events.iter().any(|e| e.pid == p);
        (seen(pid(&connected)) && seen(pid(&unconnected))).then_some(())
    });
    for report in [&connected, &unconnected] {
        let event = events.iter().find(|e| e.pid == pid(report)).unwrap();
        assert_eq!(event.decision, Decision::Redirected, "{event:?}");
        assert_eq!(event.protocol, Protocol::Udp, "{event:?}");
        assert_eq!((event.destination, event.service), (dst, Some(id)));
    }
}

/// `registered_service` on a bound UDP socket names the service registered
/// for its address (IPv4 and IPv6), as on a listening TCP socket: so that a
/// UDP service can tell at startup that it is the service its address is.
/// None when no service is registered there; "not listening" before bind;
/// "not active" outside the layer's cgroups.
#[test]
fn a_udp_socket_learns_which_service_it_is() {
    let Some(mut lab) = Lab::new("udp-svcid") else {
        return;
    };
    let (v4, v6) = (free_addr("127.0.0.1"), free_addr("::1"));
    let cgroup = lab.cgroup("services/known");
    let id = lab.service("known", &[v4, v6], by_cgroup(&cgroup), None);
    let ok = format!("ok:{}", id.0);
    let (v4s, v6s) = (v4.to_string(), v6.to_string());
    assert_eq!(
        lab.probe("services/known", None, &["udp-service", &v4s]),
        ok
    );
    assert_eq!(
        lab.probe("services/known", None, &["udp-service", &v6s]),
        ok
    );
    let elsewhere = free_addr("127.0.0.1").to_string();
    assert_eq!(
        lab.probe("services/known", None, &["udp-service", &elsewhere]),
        "NotRegistered"
    );
    assert_eq!(
        lab.probe("services/known", None, &["udp-service-unbound", &v4s]),
        "NotListening"
    );
    assert_eq!(
        lab.probe("outside", None, &["udp-service", &v4s]),
        "LayerNotActive"
    );
}

/// A UDP service whose bind the kernel did not see (it bound before the
/// layer covered its cgroup, as a service started before `connredir up`)
/// is found by the engine's scan when its service is registered, as a TCP
/// listener is: its socket is marked as the service's, so flows go to it
/// rather than being refused as a service that is down.
#[test]
fn a_udp_service_bound_before_the_layer_saw_it_is_found_at_registration() {
    let Some((mut lab, server)) = udp_lab("udp-early", "127.0.0.2") else {
        return;
    };
    let dst = server.addr();
    let listen = free_addr("127.0.0.1");
    let cgroup = lab.cgroup("late/early");
    let service = lab.start_udp_service(&cgroup, "early", listen, &[]);
    // From now on its sockets' binds and connects are the layer's; the
    // receiving socket's bind was not.
    lab.engine.attach(lab.cgroup("late")).expect("attach late");
    let id = lab.service("early", &[listen], by_cgroup(&cgroup), None);
    lab.route_protocol(id, Protocol::Udp, "127.0.0.2/32", Some(dst.port()), 0);

    for extra in [&[][..], &["--unconnected"][..]] {
        let report = udp_client(&lab, dst, extra);
        assert_eq!(report["ok"], true, "{extra:?}: {report}");
        assert_eq!(report["from"], json!(vec![dst.to_string(); 3]), "{report}");
    }
    let log = lab.wait_logged(service, 2);
    assert_eq!(log.len(), 2, "{log:?}");
    for entry in &log {
        assert_eq!(entry["chain"], json!([id.0]), "{entry}");
        assert_eq!(entry["original_dst"], dst.to_string(), "{entry}");
    }
    let counters = lab.engine.counters().unwrap();
    assert_eq!(counters.service_down_blocked, 0, "{counters:?}");
}

/// A redirected UDP client socket (uid 65534, connected or sending with
/// `sendto()`) is a leg in the live-connection list while it is open: the
/// UDP protocol, the client process, the chain, the original destination,
/// its bound port; it leaves the list when the client closes the socket,
/// while the client process still lives.
fn udp_flow_is_listed_until_its_socket_closes(
    server_ip: &str,
    listen_ip: &str,
    prefix: &str,
    unconnected: bool,
    test: &str,
) {
    let Some((mut lab, server)) = udp_lab(test, server_ip) else {
        return;
    };
    let dst = server.addr();
    let (id, service) = lab.udp_service("listed", free_addr(listen_ip), prefix, dst.port(), 0, &[]);
    let release = std::env::temp_dir().join(format!(
        "connredir-{test}-{}-{unconnected}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&release);
    let (connect, until) = (dst.to_string(), release.display().to_string());
    let mut args = vec!["udp-client", "--connect", &connect, "--until", &until];
    if unconnected {
        args.push("--unconnected");
    }
    let client = Proc::spawn(&lab.cgroup("scope/client"), Some(NOBODY), &args).unwrap();
    let line = client
        .wait_line("the client's report", |l| l.contains("\"ok\""))
        .unwrap();
    let report: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        report["ok"],
        true,
        "{report}; service: {:?}",
        lab.proxy_log(service)
    );

    // The service's onward socket goes to the destination, not redirected:
    // the client's socket is the one leg.
    let conns = lab.engine.connections().unwrap();
    assert_eq!(conns.len(), 1, "{conns:?}");
    let leg = &conns[0];
    assert_eq!(leg.protocol, Protocol::Udp, "{leg:?}");
    assert_eq!(leg.chain, vec![id], "{leg:?}");
    assert_eq!(leg.original_destination, Some(dst), "{leg:?}");
    assert_eq!((leg.pid, leg.uid), (client.pid(), NOBODY), "{leg:?}");
    assert_eq!((leg.client_pid, leg.client_uid), (client.pid(), NOBODY));
    assert_eq!(leg.command, "connredir-testk", "{leg:?}");
    // Bound before it connected or sent: its port is known.
    let local = leg.local.expect("the client socket's bound address");
    assert_eq!(local.port(), local_port(&report), "{leg:?}");
    assert_eq!(leg.client, leg.local, "{leg:?}");
    assert!(leg.age < Duration::from_secs(30), "{leg:?}");

    std::fs::write(&release, b"").unwrap();
    client
        .wait_line("the socket closed", |l| l.contains("\"closed\""))
        .unwrap();
    eventually("the leg to leave the list once its socket closed", || {
        lab.engine.connections().unwrap().is_empty().then_some(())
    });
    std::fs::remove_file(&release).unwrap();
    let (status, lines) = client.finish().unwrap();
    assert!(status.success(), "{lines:?}");
    assert_eq!(lab.engine.counters().unwrap().conns_untracked, 0);
}

#[test]
fn redirected_udp_flows_are_listed_until_their_socket_closes_ipv4() {
    for unconnected in [false, true] {
        udp_flow_is_listed_until_its_socket_closes(
            "127.0.0.2",
            "127.0.0.1",
            "127.0.0.2/32",
            unconnected,
            "udp-conns-v4",
        );
    }
}

#[test]
fn redirected_udp_flows_are_listed_until_their_socket_closes_ipv6() {
    for unconnected in [false, true] {
        udp_flow_is_listed_until_its_socket_closes(
            "[::1]",
            "::1",
            "::1/128",
            unconnected,
            "udp-conns-v6",
        );
    }
}

/// A UDP flow through two services is listed leg by leg, as a TCP flow is:
/// the client's socket (chain: the first service) and the first service's
/// onward socket (both services, opened by the service for the same
/// client), each UDP, each with the original destination. Closing the
/// client's socket removes its leg only: the service's socket is its own.
#[test]
fn a_chained_udp_flow_is_listed_leg_by_leg_and_the_clients_leaves_when_it_closes() {
    let Some((mut lab, server)) = udp_lab("udp-conns-chain", "127.0.0.2") else {
        return;
    };
    let dst = server.addr();
    let prefix = "127.0.0.2/32";
    let (first, a) = lab.udp_service("alpha", free_addr("127.0.0.1"), prefix, dst.port(), 0, &[]);
    let (second, _) = lab.udp_service("bravo", free_addr("127.0.0.1"), prefix, dst.port(), 1, &[]);
    let release =
        std::env::temp_dir().join(format!("connredir-udp-conns-chain-{}", std::process::id()));
    let _ = std::fs::remove_file(&release);
    let (connect, until) = (dst.to_string(), release.display().to_string());
    let args = ["udp-client", "--connect", &connect, "--until", &until];
    let client = Proc::spawn(&lab.cgroup("scope/client"), Some(NOBODY), &args).unwrap();
    let line = client
        .wait_line("the client's report", |l| l.contains("\"ok\""))
        .unwrap();
    let report: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(report["ok"], true, "{report}");

    let conns = eventually("both legs in the list", || {
        let conns = lab.engine.connections().unwrap();
        (conns.len() == 2).then_some(conns)
    });
    let leg = |hops: usize| conns.iter().find(|c| c.chain.len() == hops).unwrap();
    let (client_leg, forward_leg) = (leg(1), leg(2));
    assert_eq!(client_leg.chain, vec![first], "{client_leg:?}");
    assert_eq!(client_leg.pid, client.pid(), "{client_leg:?}");
    assert_eq!(forward_leg.chain, vec![first, second], "{forward_leg:?}");
    assert_eq!(forward_leg.pid, lab.procs[a].pid(), "{forward_leg:?}");
    assert_eq!(
        (forward_leg.client_pid, forward_leg.client_uid),
        (client.pid(), NOBODY),
        "{forward_leg:?}"
    );
    for leg in [client_leg, forward_leg] {
        assert_eq!(leg.protocol, Protocol::Udp, "{leg:?}");
        assert_eq!(leg.original_destination, Some(dst), "{leg:?}");
        let port = leg.client.map(|c| c.port());
        assert_eq!(port, Some(local_port(&report)), "{leg:?}");
    }

    std::fs::write(&release, b"").unwrap();
    client
        .wait_line("the socket closed", |l| l.contains("\"closed\""))
        .unwrap();
    let left = eventually("the client's leg to leave the list", || {
        let conns = lab.engine.connections().unwrap();
        (conns.len() == 1).then_some(conns)
    });
    assert_eq!(left[0].chain, vec![first, second], "{left:?}");
    std::fs::remove_file(&release).unwrap();
    assert!(client.finish().unwrap().0.success());
}
