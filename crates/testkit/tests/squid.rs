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

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use connredir_engine::{Counters, ServiceId};
use connredir_testkit::http_world::{
    fetch_each, ours_path, path_of, start_origin, wait_for, wait_for_lines, NOBODY,
};
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

/// The counters a round follows: redirects and records inherited.
fn counters_of(c: &Counters) -> [u64; 2] {
    [c.redirects, c.records_inherited]
}

/// Runs [`ROUNDS`] rounds of [`AT_ONCE`] curl clients to an origin on
/// `origin_host` through `chain` (services listening on `listen_ip`) and
/// checks each round.
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
    let services = if ours.is_some() { 2 } else { 1 };
    let origin_text = origin.to_string();

    let mut failures = Vec::new();
    for r in 0..ROUNDS {
        let before = counters_of(&lab.engine.counters().unwrap());
        let prefix = format!("/r{r}/");
        let paths: Vec<String> = (0..AT_ONCE).map(|i| format!("{prefix}c{i}")).collect();
        let fetched = fetch_each(&lab, &curl, origin, &paths);
        let of_round = |log: &[Value], path: fn(&Value) -> &str| {
            log.iter().filter(|e| path(e).starts_with(&prefix)).count()
        };
        wait_for(&lab, origin_log, AT_ONCE, |l| of_round(l, path_of));
        wait_for_lines(|| squid_log(&dir), AT_ONCE, |l| of_round(l, path_of));
        if let Some((_, ours)) = ours {
            wait_for(&lab, ours, AT_ONCE, |l| of_round(l, ours_path));
        }
        // A little longer, for lines that should not come (a second pass).
        std::thread::sleep(Duration::from_millis(300));

        let mut problems = Vec::new();
        let locals: BTreeMap<&str, &str> = fetched
            .iter()
            .map(|f| (f.path.as_str(), f.local.as_str()))
            .collect();
        for f in &fetched {
            if f.code != 200 || f.answered != f.path {
                problems.push(format!(
                    "{}: status {}, origin's path {:?}, curl: {}",
                    f.path, f.code, f.answered, f.error
                ));
            }
        }
        let count_paths = |lines: Vec<Value>, path: fn(&Value) -> &str| {
            let mut seen = BTreeMap::<String, usize>::new();
            for line in lines.iter().filter(|e| path(e).starts_with(&prefix)) {
                *seen.entry(path(line).to_string()).or_default() += 1;
            }
            seen
        };
        let at_origin = count_paths(lab.proxy_log(origin_log), path_of);
        let squid_lines: Vec<Value> = squid_log(&dir)
            .into_iter()
            .filter(|e| path_of(e).starts_with(&prefix))
            .collect();
        let at_squid = count_paths(squid_lines.clone(), path_of);
        for path in &paths {
            let (o, s) = (at_origin.get(path), at_squid.get(path));
            if o != Some(&1) || s != Some(&1) {
                problems.push(format!("{path}: origin saw it {o:?} times, squid {s:?}"));
            }
        }
        for line in &squid_lines {
            let server = address(
                line["server"].as_str().unwrap_or_default(),
                line["server_port"].as_str().unwrap_or_default(),
            );
            if server != origin_text || line["status"] != "200" {
                problems.push(format!("squid: {line}"));
            }
        }
        if let Some((ours_id, ours)) = ours {
            let ours_lines: Vec<Value> = lab
                .proxy_log(ours)
                .into_iter()
                .filter(|e| ours_path(e).starts_with(&prefix))
                .collect();
            let at_ours = count_paths(ours_lines.clone(), ours_path);
            let expected_chain: Vec<u64> = match chain {
                Chain::SquidThenOurs => vec![squid_id.0.into(), ours_id.0.into()],
                _ => vec![ours_id.0.into()],
            };
            let mut flows = BTreeSet::new();
            for line in &ours_lines {
                let entry_chain: Vec<u64> = line["chain"]
                    .as_array()
                    .map(|c| c.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default();
                let flow = line["flow"].as_str().unwrap_or_default();
                // After squid, a flow carries some client's record of the
                // round (squid connects in its own order); first on the
                // flow, connredir-proxy sees each client's own.
                let flow_ok = match chain {
                    Chain::SquidThenOurs => locals.values().any(|l| *l == flow),
                    _ => locals.get(ours_path(line)).copied() == Some(flow),
                };
                if entry_chain != expected_chain
                    || line["original_dst"] != origin_text.as_str()
                    || line["verdict"] != "allow"
                    || !flow_ok
                    || !flows.insert(flow.to_string())
                {
                    problems.push(format!("connredir-proxy: {line}"));
                }
            }
            for path in &paths {
                if at_ours.get(path) != Some(&1) {
                    problems.push(format!(
                        "{path}: connredir-proxy saw it {:?} times",
                        at_ours.get(path)
                    ));
                }
            }
        }
        let after = counters_of(&lab.engine.counters().unwrap());
        let (redirects, inherited) = (after[0] - before[0], after[1] - before[1]);
        if redirects != (services * AT_ONCE) as u64 || inherited != AT_ONCE as u64 {
            problems.push(format!(
                "redirects {redirects} (want {}), records inherited {inherited} (want {AT_ONCE})",
                services * AT_ONCE
            ));
        }
        if !problems.is_empty() {
            failures.push(format!("round {r}:\n  {}", problems.join("\n  ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{chain:?}: every request must be answered by the origin, reach it once and pass \
         each proxy once, with a record:\n{}",
        failures.join("\n")
    );
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
