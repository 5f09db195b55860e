//! haproxy as a service on the redirect layer: an unmodified third-party
//! transparent proxy (`option transparent`: it sends each connection to the
//! socket's original destination, which it reads with `SO_ORIGINAL_DST`, and
//! sets no records) registered as a service the way `connredir-proxy` is.
//! Its onward connection chains through the layer's `inherit` map, so it is
//! decided past haproxy: the flow reaches the origin once, never loops, and
//! a proxy after haproxy in priority order still sees it exactly once.
//!
//! Clients run as an unprivileged user in the test's cgroup; the origin is
//! an echo server on loopback, reached from IPv4 sockets, from IPv6 sockets
//! (its IPv4-mapped address), and on a native IPv6 address.
//!
//! haproxy (2.6) asks `SO_ORIGINAL_DST` only on IPv4 sockets; on an IPv6
//! socket it takes the destination from getsockname(), as behind TPROXY
//! (behind an nftables REDIRECT it would connect to itself over and over).
//! For IPv6, haproxy is therefore registered as a transparent service: the
//! sockets it accepts answer getsockname() with the original destination,
//! and that answer keeps the record for its onward connect as
//! `SO_ORIGINAL_DST` does. Each haproxy this file starts runs in the
//! foreground (no daemon mode, one thread), from a configuration in the
//! test's own temporary directory, and is ended by its pid with the lab.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use connredir_engine::{Service, ServiceId};
use connredir_testkit::{
    by_cgroup, by_uid, free_addr, host_prefix, mapped, require_program, service_spec, unmapped,
    wait_listening, EchoServer, Lab, Proc, TestDir,
};
use serde_json::{json, Value};

/// The unprivileged user the clients run as.
const NOBODY: u32 = 65534;

/// Payload sizes of the flows of each test. No empty flow: haproxy may drop
/// a client that closes before sending anything without connecting to the
/// origin, so such a flow says nothing about forwarding.
const SIZES: [usize; 3] = [1, 1_000, 300_000];

/// haproxy's per-connection log line, JSON on its standard output: the
/// client's address, where haproxy connected (the original destination it
/// read), and the bytes each way.
const LOG_FORMAT: &str = r#"{"flow":"%ci:%cp","original_dst":"%si:%sp","bytes_up":%U,"bytes_down":%B,"termination":"%ts"}"#;

/// Registers haproxy as a service (identity: its cgroup `services/haproxy`,
/// listening on a free port of `family.listen_ip`, transparent if the
/// family says so) with one rule sending `dst` to it at `priority`, writes
/// its configuration into `dir` and starts it there. Returns the service id
/// and haproxy's index in `lab.procs`.
fn start_haproxy(
    lab: &mut Lab,
    haproxy: &Path,
    dir: &Path,
    family: &Family,
    dst: SocketAddr,
    priority: u32,
) -> (ServiceId, usize) {
    let cgroup = lab.cgroup("services/haproxy");
    let listen = free_addr(family.listen_ip);
    let id = lab.register(Service {
        transparent: family.transparent,
        ..service_spec("haproxy", &[listen], by_cgroup(&cgroup))
    });
    lab.route(id, &host_prefix(dst), Some(dst.port()), priority);
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  nbthread 1\n  log stdout format raw daemon\n\
             defaults\n  mode tcp\n  log global\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend inbound\n  bind {listen}\n  log-format '{LOG_FORMAT}'\n  default_backend original\n\
             backend original\n  option transparent\n"
        ),
    )
    .expect("write the haproxy configuration");
    let args = ["-f", config.to_str().expect("a UTF-8 path"), "-db"];
    let proc = Proc::spawn_program(&cgroup, None, haproxy, &args).expect("start haproxy");
    lab.procs.push(proc);
    wait_listening(listen).expect("haproxy listens");
    (id, lab.procs.len() - 1)
}

/// One echo flow of `bytes` from the client role, run as [`NOBODY`] in
/// `scope/client`; returns its report (`ok`, `local`).
fn client(lab: &Lab, dst: SocketAddr, bytes: usize) -> Value {
    let (connect, size) = (dst.to_string(), bytes.to_string());
    let args = ["client", "--connect", &connect, "--bytes", &size];
    let proc =
        Proc::spawn(&lab.cgroup("scope/client"), Some(NOBODY), &args).expect("start the client");
    let (status, lines) = proc.finish().expect("the client ends");
    assert!(status.success(), "client: {status}: {lines:?}");
    serde_json::from_str(lines.last().expect("a report")).expect("a JSON report")
}

/// Waits (at most 10 s) until process `index` has printed `n` JSON lines.
fn wait_log(lab: &Lab, index: usize, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = lab.proxy_log(index);
        if log.len() >= n || Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An address as haproxy's log format (`%ci:%cp`) prints it: IPv6
/// without brackets.
fn haproxy_printed(addr: SocketAddr) -> String {
    let addr = unmapped(addr);
    format!("{}:{}", addr.ip(), addr.port())
}

/// Where the proxies of a test listen and how the client names the origin.
struct Family {
    /// The echo server's address (port 0: any).
    server: &'static str,
    /// The services' listening address.
    listen_ip: &'static str,
    /// The address the client connects to, from the server's.
    connect: fn(SocketAddr) -> SocketAddr,
    /// haproxy is registered as a transparent service: it reads the
    /// destination with getsockname(), not `SO_ORIGINAL_DST`.
    transparent: bool,
}

/// IPv4 sockets throughout.
const V4: Family = Family {
    server: "127.0.0.2:0",
    listen_ip: "127.0.0.1",
    connect: |dst| dst,
    transparent: false,
};

/// The client's socket is IPv6: it connects to the origin's IPv4-mapped
/// address, which the layer's IPv4 rules cover, and is redirected to the
/// service's IPv4 listener.
const V6_CLIENT: Family = Family {
    server: "127.0.0.2:0",
    listen_ip: "127.0.0.1",
    connect: mapped,
    transparent: false,
};

/// IPv6 throughout: the origin, the services and the client on `::1`.
/// haproxy reads the destination with getsockname(), so it is a
/// transparent service.
const V6: Family = Family {
    server: "[::1]:0",
    listen_ip: "::1",
    connect: |dst| dst,
    transparent: true,
};

/// Which services a test puts on the flow, in priority order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chain {
    /// haproxy alone.
    Haproxy,
    /// haproxy first, then connredir-proxy.
    HaproxyThenOurs,
    /// connredir-proxy first, then haproxy.
    OursThenHaproxy,
}

/// Runs [`SIZES`] one flow at a time from an unprivileged client to the
/// echo server through `chain`, and checks that each flow arrives
/// byte-exact, reaches the origin once, passes each service once, and that
/// haproxy forwarded it to its original destination.
fn round_trip(test: &str, family: &Family, chain: Chain) {
    round_trip_after(test, family, chain, |_| {});
}

/// [`round_trip`], with `meanwhile` run once the services are registered
/// and started, before the flows.
fn round_trip_after(test: &str, family: &Family, chain: Chain, meanwhile: impl FnOnce(&mut Lab)) {
    let Some(haproxy) = require_program(test, "haproxy") else {
        return;
    };
    let start = || EchoServer::start(family.server);
    let Some((mut lab, server)) = Lab::with_server_from(test, start) else {
        return;
    };
    let dir = TestDir::new(&format!("haproxy-{test}"), None);
    let dst = server.addr();
    let (hap_priority, ours_priority) = match chain {
        Chain::Haproxy | Chain::HaproxyThenOurs => (1, 2),
        Chain::OursThenHaproxy => (2, 1),
    };
    let (hap_id, hap) = start_haproxy(&mut lab, &haproxy, &dir.0, family, dst, hap_priority);
    let ours = (chain != Chain::Haproxy)
        .then(|| lab.reference_proxy(family.listen_ip, dst, ours_priority));
    meanwhile(&mut lab);

    // One flow at a time: haproxy sets no records, so its onward
    // connection inherits the record kept for (service, destination),
    // which concurrent flows to one destination would share.
    let mut locals = Vec::new();
    for size in SIZES {
        let report = client(&lab, (family.connect)(dst), size);
        assert_eq!(report["ok"], true, "{chain:?}: {report}");
        let local: SocketAddr = report["local"].as_str().unwrap().parse().unwrap();
        locals.push(unmapped(local));
    }

    // haproxy logs each connection once, with the original destination it
    // connected to and every byte each way. The client it saw is the
    // client itself when haproxy is first, and the reference proxy's
    // onward connection when haproxy comes after it.
    let hap_log = wait_log(&lab, hap, SIZES.len());
    assert_eq!(hap_log.len(), SIZES.len(), "{chain:?}: {hap_log:?}");
    for (entry, (local, size)) in hap_log.iter().zip(locals.iter().zip(SIZES)) {
        assert_eq!(
            entry["original_dst"],
            haproxy_printed(dst),
            "{chain:?}: {entry}"
        );
        assert_eq!(entry["bytes_up"], size, "{chain:?}: {entry}");
        assert_eq!(entry["bytes_down"], size, "{chain:?}: {entry}");
        if chain != Chain::OursThenHaproxy {
            assert_eq!(entry["flow"], haproxy_printed(*local), "{chain:?}: {entry}");
        }
    }

    // The reference proxy sees each flow once, and the chain so far.
    if let Some((ours_id, ours)) = ours {
        let expected = match chain {
            Chain::HaproxyThenOurs => json!([hap_id.0, ours_id.0]),
            _ => json!([ours_id.0]),
        };
        let log = wait_log(&lab, ours, SIZES.len());
        assert_eq!(log.len(), SIZES.len(), "{chain:?}: {log:?}");
        for (entry, (local, size)) in log.iter().zip(locals.iter().zip(SIZES)) {
            assert_eq!(entry["chain"], expected, "{chain:?}: {entry}");
            assert_eq!(entry["verdict"], "allow", "{entry}");
            assert_eq!(entry["original_dst"], dst.to_string(), "{entry}");
            assert_eq!(entry["flow"], local.to_string(), "{entry}");
            assert_eq!(entry["bytes_up"], size, "{entry}");
            assert_eq!(entry["bytes_down"], size, "{entry}");
        }
    }

    // No loop: the origin accepted each flow once, from the last service's
    // onward connection, and only the services' own inbound legs were
    // redirected.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(server.accepted().len(), SIZES.len(), "{chain:?}");
    let services = if chain == Chain::Haproxy { 1 } else { 2 };
    let counters = lab.engine.counters().unwrap();
    assert_eq!(
        counters.redirects,
        (services * SIZES.len()) as u64,
        "{chain:?}: {counters:?}"
    );
    // haproxy's onward connection took the record its SO_ORIGINAL_DST (or,
    // transparent, its getsockname) question kept: once per flow.
    assert_eq!(
        counters.records_inherited,
        SIZES.len() as u64,
        "{chain:?}: {counters:?}"
    );
    if !family.transparent {
        assert!(
            counters.original_dst_answered >= SIZES.len() as u64,
            "{chain:?}: {counters:?}"
        );
    }
}

#[test]
fn haproxy_forwards_ipv4_to_the_original_destination() {
    round_trip("hap-v4", &V4, Chain::Haproxy);
}

#[test]
fn haproxy_forwards_an_ipv6_client_to_the_original_destination() {
    round_trip("hap-v6", &V6_CLIENT, Chain::Haproxy);
}

#[test]
fn haproxy_then_connredir_proxy_ipv4() {
    round_trip("hap-first-v4", &V4, Chain::HaproxyThenOurs);
}

#[test]
fn connredir_proxy_then_haproxy_ipv4() {
    round_trip("hap-last-v4", &V4, Chain::OursThenHaproxy);
}

#[test]
fn haproxy_then_connredir_proxy_ipv6_client() {
    round_trip("hap-first-v6", &V6_CLIENT, Chain::HaproxyThenOurs);
}

#[test]
fn connredir_proxy_then_haproxy_ipv6_client() {
    round_trip("hap-last-v6", &V6_CLIENT, Chain::OursThenHaproxy);
}

#[test]
fn haproxy_forwards_native_ipv6_to_the_original_destination() {
    round_trip("hap-n6", &V6, Chain::Haproxy);
}

#[test]
fn haproxy_then_connredir_proxy_native_ipv6() {
    round_trip("hap-first-n6", &V6, Chain::HaproxyThenOurs);
}

#[test]
fn connredir_proxy_then_haproxy_native_ipv6() {
    round_trip("hap-last-n6", &V6, Chain::OursThenHaproxy);
}

/// Registers and removes other services, transparent and not, in an order
/// where a count of transparent services kept wrong (one removal too many,
/// a re-registration not counted) would reach 0 while haproxy is still
/// transparent; the getsockname programs would then answer haproxy with
/// its own address, and it would forward each flow to itself.
fn churn_other_services(lab: &mut Lab) {
    let add = |lab: &mut Lab, name: &str, uid: u32, transparent: bool| {
        lab.register(Service {
            transparent,
            ..service_spec(name, &[free_addr("::1")], by_uid(uid))
        })
    };
    let a = add(lab, "other-a", 4201, true);
    let b = add(lab, "other-b", 4202, true);
    lab.engine.remove_service(a).expect("remove other-a");
    let c = add(lab, "other-c", 4203, false);
    let a = add(lab, "other-a", 4201, true);
    for id in [b, c, a] {
        lab.engine
            .remove_service(id)
            .expect("remove another service");
    }
}

#[test]
fn haproxy_stays_transparent_while_other_services_come_and_go() {
    round_trip_after("hap-churn-n6", &V6, Chain::Haproxy, churn_other_services);
}

/// haproxy retries a connect that failed (`retries`, 3 by default, about a
/// second apart), on a new socket and without asking `SO_ORIGINAL_DST`
/// again. A retry must carry the same flow's record as the first attempt:
/// without it, the layer would decide it as a new connection of haproxy's
/// and send it to connredir-proxy, before haproxy in priority order, which
/// would pass it to haproxy again, which would retry again, one level
/// deeper each time. Here the origin refuses (nothing listens on its
/// address) and a second case puts a down service after haproxy (fail
/// closed): in both, the layer redirects the client's flow to each proxy
/// once, and every one of haproxy's attempts inherits the record.
#[test]
fn haproxy_retrying_a_failed_connect_does_not_send_the_flow_back_through_services() {
    for down_service_after in [false, true] {
        let test = if down_service_after {
            "haproxy-retry-down"
        } else {
            "haproxy-retry-refused"
        };
        let Some(haproxy) = require_program(test, "haproxy") else {
            return;
        };
        let Some(mut lab) = Lab::new(test) else {
            return;
        };
        let dir = TestDir::new(&format!("haproxy-{test}"), None);
        // Nothing listens here.
        let dst = free_addr("127.0.0.2");
        lab.reference_proxy(V4.listen_ip, dst, 1);
        start_haproxy(&mut lab, &haproxy, &dir.0, &V4, dst, 2);
        if down_service_after {
            // Registered, routed after haproxy, never started: down, and
            // its rule blocks (the default failure policy).
            let cgroup = lab.cgroup("services/absent");
            let id = lab.service(
                "absent",
                &[free_addr("127.0.0.1")],
                by_cgroup(&cgroup),
                None,
            );
            lab.route(id, &format!("{}/32", dst.ip()), Some(dst.port()), 3);
        }
        let before = lab.engine.counters().unwrap();
        let (connect, size) = (dst.to_string(), "100".to_string());
        let args = ["client", "--connect", &connect, "--bytes", &size];
        let proc = Proc::spawn(&lab.cgroup("scope/client"), Some(NOBODY), &args)
            .expect("start the client");
        let _ = proc.finish();
        // haproxy's three retries, about a second apart, and a margin.
        std::thread::sleep(Duration::from_secs(5));
        let after = lab.engine.counters().unwrap();
        let redirects = after.redirects - before.redirects;
        let inherited = after.records_inherited - before.records_inherited;
        assert_eq!(
            redirects, 2,
            "{test}: the client's flow must be redirected to connredir-proxy and then to \
             haproxy, once each, whatever haproxy retries ({inherited} records inherited)"
        );
        assert!(
            inherited >= 2,
            "{test}: haproxy's retries must inherit the record too ({inherited} inherited)"
        );
    }
}
