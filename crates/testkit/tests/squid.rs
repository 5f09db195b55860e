//! Squid (Debian's package) as a service on the redirect layer: an
//! unmodified third-party caching proxy, single-threaded and event-driven,
//! run as `http_port ... intercept`. It reads each accepted connection's
//! original destination with `SO_ORIGINAL_DST` (IPv4) or
//! `IP6T_SO_ORIGINAL_DST` (IPv6), which the layer answers, connects there
//! itself and sets no records: its onward connection chains through the
//! layer's `inherit` queue (lib/inherit.h).
//!
//! Squid connects onward in the order its clients' requests complete, not
//! in the order it accepted them, and a quick flow may end before an
//! earlier one has connected: the cases the queue's orphaned entries are
//! for. So an onward connection carries some client's record of the round,
//! not always its own (README: records-less services); each test checks
//! that every one carries one, and that the clients' records are used once
//! each.
//!
//! Clients are 16 curl processes started at once, run as an unprivileged
//! user in the test's cgroup (separate processes, so their requests reach
//! squid in no set order); the origin is the test kit's Python HTTP origin (http_world.rs).
//! Squid runs as that user too, with its configuration, logs and pid file
//! in the test's directory, no cache and no persistent server connections
//! (each request its own onward connection, so each is decided by the
//! layer), and logs one JSON line per request to a file (it cannot open the
//! test's pipe, which root owns, by name). Each test checks,
//! round by round, that every request was answered by the origin, reached
//! it once and passed each proxy once, to the right destination, with the
//! chain of services so far.

use std::net::SocketAddr;
use std::path::PathBuf;

use connredir_engine::ServiceId;
use connredir_testkit::http_world::{path_of, start_origin, wait_for_lines, ChainRounds, NOBODY};
use connredir_testkit::{
    by_cgroup, free_addr, host_prefix, require_program, service_spec, wait_listening, Lab, Proc,
    TestDir,
};
use serde_json::Value;

/// Clients at once.
const AT_ONCE: usize = 16;

/// Rounds of [`AT_ONCE`] clients.
const ROUNDS: usize = 4;

/// Squid's configuration; `{listen}` is the intercepting port's address,
/// `{forward}` a plain forward-proxy port (squid wants one), `{dir}` the
/// test's directory. The access log is one JSON line per request.
const SQUID_CONF: &str = r#"
http_port {forward}
http_port {listen} intercept
http_access allow all
cache deny all
server_persistent_connections off
pinger_enable off
logformat flow {"client":"%>a","client_port":"%>p","server":"%<a","server_port":"%<p","path":"%rp","status":"%>Hs"}
access_log stdio:{dir}/access.log flow
cache_log {dir}/cache.log
pid_filename {dir}/squid.pid
coredump_dir {dir}
netdb_filename none
shutdown_lifetime 0 seconds
"#;

/// Who handles the flow, in order.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Chain {
    Squid,
    SquidThenOurs,
    OursThenSquid,
}

/// An address as `ip` and `port` print it, IPv6 in brackets.
fn address(ip: &str, port: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Registers squid as a service (identity: its cgroup `services/squid`,
/// listening on a free port of `listen_ip`) with one rule sending `dst` to
/// it at `priority`, and starts it there as [`NOBODY`]. Returns the service
/// id.
fn start_squid(
    lab: &mut Lab,
    squid: &std::path::Path,
    dir: &TestDir,
    listen_ip: &str,
    dst: SocketAddr,
    priority: u32,
) -> ServiceId {
    let cgroup = lab.cgroup("services/squid");
    let listen = free_addr(listen_ip);
    let forward = free_addr(listen_ip);
    let id = lab.register(service_spec("squid", &[listen], by_cgroup(&cgroup)));
    lab.route(id, &host_prefix(dst), Some(dst.port()), priority);
    let conf = SQUID_CONF
        .replace("{listen}", &listen.to_string())
        .replace("{forward}", &forward.to_string())
        .replace("{dir}", &dir.0.display().to_string());
    let conf = dir.write("squid.conf", &conf);
    let proc = Proc::spawn_program(&cgroup, Some(NOBODY), squid, &["-N", "-f", &conf])
        .expect("start squid");
    lab.procs.push(proc);
    if let Err(e) = wait_listening(listen) {
        let log = std::fs::read_to_string(dir.0.join("cache.log")).unwrap_or_default();
        panic!("squid does not listen on {listen} ({e}); its cache.log:\n{log}");
    }
    id
}

/// Squid's access log so far: one JSON object per request.
fn squid_log(dir: &TestDir) -> Vec<Value> {
    std::fs::read_to_string(dir.0.join("access.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Runs [`ROUNDS`] rounds of [`AT_ONCE`] curl clients to an origin on
/// `origin_host` through `chain` (services listening on `listen_ip`) and
/// checks each round ([`ChainRounds`]); squid's own check: each path once
/// in its access log, each forwarded to the origin and answered.
fn run(test: &str, origin_host: &str, listen_ip: &str, chain: Chain) {
    let Some(curl) = require_program(test, "curl") else {
        return;
    };
    let Some(squid) = require_program(test, "squid") else {
        return;
    };
    let Some(mut lab) = Lab::new(test) else {
        return;
    };
    let dir = TestDir::new(&format!("squid-{test}"), Some(NOBODY));
    let python = PathBuf::from("/usr/bin/python3");
    let (origin, origin_log) = start_origin(&mut lab, &python, &dir, origin_host);
    let (squid_priority, ours_priority) = match chain {
        Chain::Squid | Chain::SquidThenOurs => (1, 2),
        Chain::OursThenSquid => (2, 1),
    };
    let squid_id = start_squid(&mut lab, &squid, &dir, listen_ip, origin, squid_priority);
    let ours =
        (chain != Chain::Squid).then(|| lab.reference_proxy(listen_ip, origin, ours_priority));
    let origin_text = origin.to_string();
    let rounds = ChainRounds {
        lab: &lab,
        curl: &curl,
        origin: (origin, origin_log),
        third_party: squid_id,
        ours,
        ours_first: chain == Chain::OursThenSquid,
        rounds: ROUNDS,
        at_once: AT_ONCE,
    };
    rounds.run(&format!("{chain:?}"), |round| {
        let of_round = |l: &[Value]| {
            l.iter()
                .filter(|e| path_of(e).starts_with(round.prefix))
                .count()
        };
        wait_for_lines(|| squid_log(&dir), AT_ONCE, of_round);
        let lines: Vec<Value> = squid_log(&dir)
            .into_iter()
            .filter(|e| path_of(e).starts_with(round.prefix))
            .collect();
        let mut problems = Vec::new();
        let at_squid = round.count_paths(&lines, path_of);
        for f in round.fetched {
            if at_squid.get(&f.path) != Some(&1) {
                problems.push(format!(
                    "{}: squid saw it {:?} times",
                    f.path,
                    at_squid.get(&f.path)
                ));
            }
        }
        for line in &lines {
            let server = address(
                line["server"].as_str().unwrap_or_default(),
                line["server_port"].as_str().unwrap_or_default(),
            );
            if server != origin_text || line["status"] != "200" {
                problems.push(format!("squid: {line}"));
            }
        }
        problems
    });
}

#[test]
fn squid_forwards_ipv4_to_the_original_destination() {
    run("squid-v4", "127.0.0.2", "127.0.0.1", Chain::Squid);
}

#[test]
fn squid_forwards_ipv6_to_the_original_destination() {
    run("squid-v6", "::1", "::1", Chain::Squid);
}

#[test]
fn squid_then_connredir_proxy_ipv4() {
    run(
        "squid-ours-v4",
        "127.0.0.2",
        "127.0.0.1",
        Chain::SquidThenOurs,
    );
}

#[test]
fn squid_then_connredir_proxy_ipv6() {
    run("squid-ours-v6", "::1", "::1", Chain::SquidThenOurs);
}

#[test]
fn connredir_proxy_then_squid_ipv4() {
    run(
        "ours-squid-v4",
        "127.0.0.2",
        "127.0.0.1",
        Chain::OursThenSquid,
    );
}

#[test]
fn connredir_proxy_then_squid_ipv6() {
    run("ours-squid-v6", "::1", "::1", Chain::OursThenSquid);
}
