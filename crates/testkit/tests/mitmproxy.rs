//! mitmproxy as a service on the redirect layer: an unmodified third-party
//! proxy written in Python (asyncio, one event loop on one thread) run as
//! `mitmdump --mode transparent`. It reads each accepted connection's
//! original destination with `SO_ORIGINAL_DST` (IPv4) or
//! `IP6T_SO_ORIGINAL_DST` (IPv6), which the layer answers, connects there
//! itself, and sets no records: its onward connection chains through the
//! layer's `inherit` map (lib/inherit.h), so it is decided past mitmproxy.
//!
//! Clients are curl, run as an unprivileged user in the test's cgroup,
//! speaking plain HTTP to an origin on loopback (a small Python HTTP server
//! that prints one line per request): on IPv4, on `::1`, and from IPv6
//! sockets to the IPv4 origin's IPv4-mapped address. mitmproxy picks the
//! IPv4 or the IPv6 question by whether the accepted socket's own address
//! has a dot in it (so an IPv4-mapped address gets the IPv4 one); here it
//! listens on one address of one family, and an IPv6 client of the IPv4
//! origin reaches its IPv4 listener. mitmproxy prints one line per HTTP
//! flow through an addon script; `connredir-proxy`, when a test puts it on
//! the flow too, prints its own. Each test checks that every request was
//! answered by the origin, reached it exactly once, and was seen exactly
//! once by each proxy, with the right original destination; the concurrent
//! tests do so with 16 clients at once to the same origin address, the way
//! an event-loop proxy is used.
//!
//! mitmdump runs as uid 65534 from the virtual environment scripts/setup
//! makes at `target/tools/mitmproxy` (with the system's Python, which that
//! user can run), with its configuration directory (`confdir`: the
//! certificates it makes at start) in the test's own temporary directory, so
//! that it writes nothing to a home directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use connredir_engine::{Counters, ServiceId};
use connredir_testkit::http_world::{fetch, ours_path, path_of, start_origin, wait_for, NOBODY};
use connredir_testkit::{
    by_cgroup, free_addr, host_prefix, mapped, require_program, require_setup_tool, service_spec,
    wait_listening_within, Lab, Proc, TestDir,
};
use serde_json::Value;

/// Clients at once in the concurrent tests.
const CONCURRENT: usize = 16;

/// Rounds of [`CONCURRENT`] clients in the concurrent tests.
const ROUNDS: usize = 4;

/// Flows, one at a time, in the other tests.
const SEQUENTIAL: usize = 3;

/// mitmdump's addon: one JSON line per HTTP flow, when its response is in
/// or when it failed: the client mitmproxy accepted, the original
/// destination it read (where it connects), its onward socket's address,
/// the request's path, and the status or the error.
const FLOW_LOG: &str = r#"
import json

def addr(a):
    if not a:
        return None
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"

class FlowLog:
    def response(self, flow):
        self.log(flow, None)

    def error(self, flow):
        self.log(flow, str(flow.error))

    def log(self, flow, error):
        print(json.dumps({
            "client": addr(flow.client_conn.peername),
            "original_dst": addr(flow.server_conn.address),
            "onward": addr(flow.server_conn.sockname),
            "path": flow.request.path,
            "status": flow.response.status_code if flow.response else None,
            "error": error,
        }), flush=True)

addons = [FlowLog()]
"#;

/// Registers mitmdump as a service (identity: its cgroup
/// `services/mitmproxy`, listening on a free port of `listen_ip`) with one
/// rule sending `dst` to it at `priority`, and starts it there as
/// [`NOBODY`] in transparent mode with the [`FLOW_LOG`] addon. Returns the
/// service id and its index in `lab.procs`.
fn start_mitmproxy(
    lab: &mut Lab,
    mitmdump: &Path,
    dir: &TestDir,
    listen_ip: &str,
    everywhere: bool,
    dst: SocketAddr,
    priority: u32,
) -> (ServiceId, usize) {
    let cgroup = lab.cgroup("services/mitmproxy");
    let listen = free_addr(listen_ip);
    let id = lab.register(service_spec("mitmproxy", &[listen], by_cgroup(&cgroup)));
    lab.route(id, &host_prefix(dst), Some(dst.port()), priority);
    let addon = dir.write("flow_log.py", FLOW_LOG);
    let confdir = format!("confdir={}", dir.0.join("mitmproxy").display());
    let port = listen.port().to_string();
    let args = [
        "--mode",
        "transparent",
        "--listen-host",
        if everywhere { "" } else { listen_ip },
        "--listen-port",
        &port,
        "--set",
        &confdir,
        // Only the addon's lines and mitmproxy's warnings and errors.
        "--set",
        "termlog_verbosity=warn",
        "--flow-detail",
        "0",
        "-s",
        &addon,
    ];
    let proc = Proc::spawn_program(&cgroup, Some(NOBODY), mitmdump, &args).expect("start mitmdump");
    lab.procs.push(proc);
    // mitmdump loads for seconds, and this file starts one per test, all
    // at once: on two busy cores 10 s was once not enough.
    if let Err(e) = wait_listening_within(listen, Duration::from_secs(40)) {
        panic!(
            "mitmdump does not listen ({e}); it runs as uid {NOBODY}, who must be able to \
             reach {}; output: {:?}",
            mitmdump.display(),
            lab.procs.last().unwrap().lines()
        );
    }
    (id, lab.procs.len() - 1)
}

/// Where the origin and the services of a test listen.
struct Family {
    /// The origin's address (its port is any).
    origin: &'static str,
    /// The services' listening address.
    listen_ip: &'static str,
    /// The address curl connects to, from the origin's.
    connect: fn(SocketAddr) -> SocketAddr,
    /// mitmdump listens on every address (its default, an empty
    /// `--listen-host`: 0.0.0.0 and `::` on the port), not only on the
    /// service's.
    everywhere: bool,
}

/// IPv4: the origin on 127.0.0.2 (services listen on 127.0.0.1, so the
/// rule for the origin's /32 never covers them).
const V4: Family = Family {
    origin: "127.0.0.2",
    listen_ip: "127.0.0.1",
    connect: |origin| origin,
    everywhere: false,
};

/// curl's socket is IPv6: it connects to the origin's IPv4-mapped
/// address, which the layer's IPv4 rules cover, and is redirected to the
/// services' IPv4 listeners; mitmproxy accepts an IPv4 socket and asks
/// `SO_ORIGINAL_DST`.
const V6_CLIENT: Family = Family {
    origin: "127.0.0.2",
    listen_ip: "127.0.0.1",
    connect: mapped,
    everywhere: false,
};

/// IPv6 throughout, on `::1`: mitmproxy reads the destination with
/// `IP6T_SO_ORIGINAL_DST`.
const V6: Family = Family {
    origin: "::1",
    listen_ip: "::1",
    connect: |origin| origin,
    everywhere: false,
};

/// IPv4, with mitmdump on every address (as it runs by default): the
/// layer sends flows to the service's 127.0.0.1 address, which its
/// 0.0.0.0 socket accepts.
const V4_EVERYWHERE: Family = Family {
    everywhere: true,
    ..V4
};

/// IPv6, with mitmdump on every address: its `::` socket (IPv6 only, as
/// Python makes it beside the 0.0.0.0 one) accepts the flows sent to the
/// service's `::1` address.
const V6_EVERYWHERE: Family = Family {
    everywhere: true,
    ..V6
};

/// Which services a test puts on the flow, in priority order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chain {
    /// mitmproxy alone.
    Mitmproxy,
    /// mitmproxy first, then connredir-proxy.
    MitmproxyThenOurs,
    /// connredir-proxy first, then mitmproxy.
    OursThenMitmproxy,
}

/// How a test's requests go: `rounds` rounds of `at_once` requests, those
/// of a round all at once, each on its own connection.
#[derive(Debug, Clone, Copy)]
struct Load {
    rounds: usize,
    at_once: usize,
}

/// One request after another.
const ONE_AT_A_TIME: Load = Load {
    rounds: SEQUENTIAL,
    at_once: 1,
};

/// [`CONCURRENT`] requests at once, [`ROUNDS`] times.
const CONCURRENTLY: Load = Load {
    rounds: ROUNDS,
    at_once: CONCURRENT,
};

/// What one round saw, per request: how often each party saw it, and what
/// was wrong with what they said.
#[derive(Debug, Default)]
struct Round {
    /// Requests curl got the origin's answer to (200, and the origin's
    /// `X-Origin-Path` names the path asked for).
    answered: usize,
    /// Times the origin got each path, and mitmproxy and connredir-proxy
    /// logged it: path → [origin, mitmproxy, connredir-proxy].
    seen: BTreeMap<String, [usize; 3]>,
    /// mitmproxy's lines with another original destination than the
    /// origin's, an error, or (mitmproxy first) another client than the
    /// curl that sent the request.
    mitmproxy_wrong: Vec<String>,
    /// connredir-proxy's lines with another original destination, flow
    /// (the client's address), chain or verdict than expected.
    ours_wrong: Vec<String>,
    /// Counters of the layer, what this round added:
    /// redirects, records inherited, loops prevented.
    counters: [u64; 3],
}

impl Round {
    /// Requests seen other than exactly once by `party` (0: origin,
    /// 1: mitmproxy, 2: connredir-proxy).
    fn not_once(&self, party: usize) -> usize {
        self.seen.values().filter(|n| n[party] != 1).count()
    }

    /// Total lines about this round's requests from `party`.
    fn total(&self, party: usize) -> usize {
        self.seen.values().map(|n| n[party]).sum()
    }

    /// One line: the counts of each party (connredir-proxy's if `ours`)
    /// and the layer's.
    fn summary(&self, ours: bool) -> String {
        let mut s = format!(
            "answered {}/{}; origin {} lines ({} paths not once); mitmproxy {} lines ({} not once, {} wrong)",
            self.answered,
            self.seen.len(),
            self.total(0),
            self.not_once(0),
            self.total(1),
            self.not_once(1),
            self.mitmproxy_wrong.len(),
        );
        if ours {
            s += &format!(
                "; connredir-proxy {} lines ({} not once, {} wrong)",
                self.total(2),
                self.not_once(2),
                self.ours_wrong.len()
            );
        }
        let [redirects, inherited, loops] = self.counters;
        s += &format!(
            "; layer: {redirects} redirects, {inherited} records inherited, {loops} loops prevented"
        );
        s
    }
}

/// The counters [`Round::counters`] follows.
fn counters_of(c: &Counters) -> [u64; 3] {
    [c.redirects, c.records_inherited, c.loops_prevented]
}

/// What every test here starts from: the programs, the lab, the test's
/// directory (owned by [`NOBODY`]) and the origin, running.
struct World {
    curl: PathBuf,
    mitmdump: PathBuf,
    lab: Lab,
    dir: TestDir,
    /// The origin's address.
    origin: SocketAddr,
    /// The origin's index in `lab.procs`.
    origin_log: usize,
}

/// Finds curl and mitmdump, makes the lab and starts the origin on
/// `origin_host`; None when the test must be skipped (outside CI).
fn world(test: &str, origin_host: &str) -> Option<World> {
    let curl = require_program(test, "curl")?;
    let mitmdump = require_setup_tool(test, "mitmproxy/bin/mitmdump")?;
    let mut lab = Lab::new(test)?;
    let dir = TestDir::new(&format!("mitmproxy-{test}"), Some(NOBODY));
    // The virtual environment's interpreter: Debian's, which NOBODY can run.
    let python = mitmdump.with_file_name("python3");
    let (origin, origin_log) = start_origin(&mut lab, &python, &dir, origin_host);
    Some(World {
        curl,
        mitmdump,
        lab,
        dir,
        origin,
        origin_log,
    })
}

/// Runs `load` from unprivileged curl clients to the origin through
/// `chain` and checks, round by round, that every request got the origin's
/// answer, reached the origin exactly once, and was logged exactly once by
/// each proxy, mitmproxy with the origin as the original destination it
/// read, connredir-proxy with the origin as the destination, the curl
/// client that sent the request as the flow, and the chain of services so
/// far; and that the layer redirected each request once per service and
/// gave mitmproxy's onward connection a record each time.
fn run(test: &str, family: &Family, chain: Chain, load: Load) {
    let Some(World {
        curl,
        mitmdump,
        mut lab,
        dir,
        origin,
        origin_log,
    }) = world(test, family.origin)
    else {
        return;
    };
    let (mitm_priority, ours_priority) = match chain {
        Chain::Mitmproxy | Chain::MitmproxyThenOurs => (1, 2),
        Chain::OursThenMitmproxy => (2, 1),
    };
    let (mitm_id, mitm) = start_mitmproxy(
        &mut lab,
        &mitmdump,
        &dir,
        family.listen_ip,
        family.everywhere,
        origin,
        mitm_priority,
    );
    let ours = (chain != Chain::Mitmproxy)
        .then(|| lab.reference_proxy(family.listen_ip, origin, ours_priority));
    let services = if ours.is_some() { 2 } else { 1 };
    let origin_text = origin.to_string();

    let mut rounds = Vec::new();
    for r in 0..load.rounds {
        let before = counters_of(&lab.engine.counters().unwrap());
        let prefix = format!("/r{r}/");
        let paths: Vec<String> = (0..load.at_once).map(|i| format!("{prefix}c{i}")).collect();
        let fetched = fetch(&lab, &curl, (family.connect)(origin), &paths);

        // Every party's lines about this round, once they are all in.
        let of_round = |log: &[Value], path: fn(&Value) -> &str| {
            log.iter().filter(|e| path(e).starts_with(&prefix)).count()
        };
        wait_for(&lab, origin_log, load.at_once, |l| of_round(l, path_of));
        wait_for(&lab, mitm, load.at_once, |l| of_round(l, path_of));
        if let Some((_, ours)) = ours {
            wait_for(&lab, ours, load.at_once, |l| of_round(l, ours_path));
        }
        // A little longer, for the lines that should not come: a request
        // seen twice.
        std::thread::sleep(Duration::from_millis(300));

        let mut round = Round::default();
        let locals: BTreeMap<&str, &str> = fetched
            .iter()
            .map(|f| (f.path.as_str(), f.local.as_str()))
            .collect();
        for f in &fetched {
            round.seen.insert(f.path.clone(), [0; 3]);
            if f.code == 200 && f.answered == f.path {
                round.answered += 1;
            } else {
                eprintln!(
                    "{test}: round {r}: {} not answered by the origin: status {}, origin's path {:?}, curl: {:?}",
                    f.path, f.code, f.answered, f.error
                );
            }
        }
        let mut tally = |party: usize, path: &str| {
            round.seen.entry(path.to_string()).or_insert([0; 3])[party] += 1;
        };
        for entry in lab.proxy_log(origin_log) {
            if path_of(&entry).starts_with(&prefix) {
                tally(0, path_of(&entry));
            }
        }
        let mitm_log: Vec<Value> = lab
            .proxy_log(mitm)
            .into_iter()
            .filter(|e| path_of(e).starts_with(&prefix))
            .collect();
        for entry in &mitm_log {
            tally(1, path_of(entry));
        }
        let ours_log: Vec<Value> = ours
            .map(|(_, ours)| lab.proxy_log(ours))
            .unwrap_or_default()
            .into_iter()
            .filter(|e| ours_path(e).starts_with(&prefix))
            .collect();
        for entry in &ours_log {
            tally(2, ours_path(entry));
        }
        for entry in &mitm_log {
            // First on the flow, mitmproxy accepted curl's own connection;
            // after connredir-proxy, that proxy's onward one.
            let client_ok = match chain {
                Chain::OursThenMitmproxy => true,
                _ => entry["client"].as_str() == locals.get(path_of(entry)).copied(),
            };
            if entry["original_dst"] != origin_text.as_str()
                || entry["status"] != 200
                || !entry["error"].is_null()
                || !client_ok
            {
                round.mitmproxy_wrong.push(entry.to_string());
            }
        }
        if let Some((ours_id, _)) = ours {
            let expected_chain = match chain {
                Chain::MitmproxyThenOurs => vec![mitm_id.0, ours_id.0],
                _ => vec![ours_id.0],
            };
            for entry in &ours_log {
                let entry_chain: Vec<u32> = entry["chain"]
                    .as_array()
                    .map(|c| {
                        c.iter()
                            .filter_map(|id| id.as_u64())
                            .map(|id| id as u32)
                            .collect()
                    })
                    .unwrap_or_default();
                if entry["original_dst"] != origin_text.as_str()
                    || entry["verdict"] != "allow"
                    || entry["flow"].as_str() != locals.get(ours_path(entry)).copied()
                    || entry_chain != expected_chain
                {
                    round.ours_wrong.push(entry.to_string());
                }
            }
        }
        let after = counters_of(&lab.engine.counters().unwrap());
        round.counters = [0, 1, 2].map(|i| after[i] - before[i]);
        eprintln!("{test}: round {r}: {}", round.summary(ours.is_some()));
        rounds.push(round);
    }

    let report = rounds
        .iter()
        .enumerate()
        .map(|(r, round)| {
            let mut s = format!("round {r}: {}", round.summary(ours.is_some()));
            for (path, n) in round
                .seen
                .iter()
                .filter(|(_, n)| n[0] != 1 || n[1] != 1 || (ours.is_some() && n[2] != 1))
            {
                s += &format!(
                    "\n  {path}: origin {}, mitmproxy {}, connredir-proxy {}",
                    n[0], n[1], n[2]
                );
            }
            // A few of the wrong lines: a loop makes many.
            for line in round.mitmproxy_wrong.iter().take(3) {
                s += &format!("\n  mitmproxy: {line}");
            }
            for line in round.ours_wrong.iter().take(3) {
                s += &format!("\n  connredir-proxy: {line}");
            }
            s
        })
        .collect::<Vec<_>>()
        .join("\n");
    for round in &rounds {
        let ok = round.answered == load.at_once
            && round.not_once(0) == 0
            && round.not_once(1) == 0
            && (ours.is_none() || round.not_once(2) == 0)
            && round.mitmproxy_wrong.is_empty()
            && round.ours_wrong.is_empty()
            && round.counters[0] == (services * load.at_once) as u64
            && round.counters[1] == load.at_once as u64;
        assert!(
            ok,
            "{chain:?}, {} at once: every request must be answered by the origin, reach it \
             once and pass each proxy once, with its own record:\n{report}",
            load.at_once
        );
    }
}

#[test]
fn mitmproxy_forwards_ipv4_to_the_original_destination() {
    run("mitm-v4", &V4, Chain::Mitmproxy, ONE_AT_A_TIME);
}

#[test]
fn mitmproxy_forwards_ipv6_to_the_original_destination() {
    run("mitm-v6", &V6, Chain::Mitmproxy, ONE_AT_A_TIME);
}

#[test]
fn mitmproxy_forwards_an_ipv6_client_to_the_original_destination() {
    run("mitm-v6c", &V6_CLIENT, Chain::Mitmproxy, ONE_AT_A_TIME);
}

#[test]
fn mitmproxy_then_connredir_proxy_ipv4() {
    run(
        "mitm-first-v4",
        &V4,
        Chain::MitmproxyThenOurs,
        ONE_AT_A_TIME,
    );
}

#[test]
fn mitmproxy_then_connredir_proxy_ipv6() {
    run(
        "mitm-first-v6",
        &V6,
        Chain::MitmproxyThenOurs,
        ONE_AT_A_TIME,
    );
}

#[test]
fn mitmproxy_then_connredir_proxy_ipv6_client() {
    run(
        "mitm-first-v6c",
        &V6_CLIENT,
        Chain::MitmproxyThenOurs,
        ONE_AT_A_TIME,
    );
}

#[test]
fn connredir_proxy_then_mitmproxy_ipv4() {
    run("mitm-last-v4", &V4, Chain::OursThenMitmproxy, ONE_AT_A_TIME);
}

#[test]
fn connredir_proxy_then_mitmproxy_ipv6() {
    run("mitm-last-v6", &V6, Chain::OursThenMitmproxy, ONE_AT_A_TIME);
}

#[test]
fn connredir_proxy_then_mitmproxy_ipv6_client() {
    run(
        "mitm-last-v6c",
        &V6_CLIENT,
        Chain::OursThenMitmproxy,
        ONE_AT_A_TIME,
    );
}

// mitmproxy serves every connection on one thread: with many clients at
// once it accepts several connections and asks each one's original
// destination before it connects onward for the first. Each onward
// connection must still take the record of the connection it forwards:
// else it is decided again as a new flow, and a service it already passed
// sees it a second time.

#[test]
fn mitmproxy_alone_concurrent_clients_ipv4() {
    run("mitm-many-v4", &V4, Chain::Mitmproxy, CONCURRENTLY);
}

#[test]
fn connredir_proxy_then_mitmproxy_concurrent_clients_ipv4() {
    run(
        "mitm-last-many-v4",
        &V4,
        Chain::OursThenMitmproxy,
        CONCURRENTLY,
    );
}

#[test]
fn connredir_proxy_then_mitmproxy_concurrent_clients_ipv6() {
    run(
        "mitm-last-many-v6",
        &V6,
        Chain::OursThenMitmproxy,
        CONCURRENTLY,
    );
}

#[test]
fn mitmproxy_then_connredir_proxy_concurrent_clients_ipv4() {
    run(
        "mitm-first-many-v4",
        &V4,
        Chain::MitmproxyThenOurs,
        CONCURRENTLY,
    );
}

#[test]
fn mitmproxy_then_connredir_proxy_concurrent_clients_ipv6() {
    run(
        "mitm-first-many-v6",
        &V6,
        Chain::MitmproxyThenOurs,
        CONCURRENTLY,
    );
}

/// Two proxies that set no records, haproxy (`option transparent`, its
/// default two threads) and mitmproxy, one after the other in priority
/// order (`haproxy_first` or not), with [`CONCURRENT`] clients at once to
/// one origin, [`ROUNDS`] times: each request must reach the origin once
/// and pass mitmproxy once, and the layer must redirect it once per proxy
/// and give each proxy's onward connection a record. Neither proxy carries
/// records, so the second one's hop reaches the origin only through what
/// the first one's onward connection inherited, and a connection without
/// one would be decided anew and sent back through a proxy it passed.
fn run_two_records_less(test: &str, haproxy_first: bool) {
    let Some(haproxy) = require_program(test, "haproxy") else {
        return;
    };
    let Some(World {
        curl,
        mitmdump,
        mut lab,
        dir,
        origin,
        origin_log,
    }) = world(test, V4.origin)
    else {
        return;
    };
    let (haproxy_priority, mitm_priority) = if haproxy_first { (1, 2) } else { (2, 1) };
    let (_, mitm) = start_mitmproxy(
        &mut lab,
        &mitmdump,
        &dir,
        V4.listen_ip,
        V4.everywhere,
        origin,
        mitm_priority,
    );
    lab.haproxy(
        &haproxy,
        &host_prefix(origin),
        origin.port(),
        haproxy_priority,
    );

    let mut report = Vec::new();
    let mut ok = true;
    for r in 0..ROUNDS {
        let before = counters_of(&lab.engine.counters().unwrap());
        let prefix = format!("/r{r}/");
        let paths: Vec<String> = (0..CONCURRENT).map(|i| format!("{prefix}c{i}")).collect();
        let fetched = fetch(&lab, &curl, origin, &paths);
        let of_round = |log: &[Value]| {
            log.iter()
                .filter(|e| path_of(e).starts_with(&prefix))
                .count()
        };
        wait_for(&lab, origin_log, CONCURRENT, of_round);
        wait_for(&lab, mitm, CONCURRENT, of_round);
        // A little longer, for the lines that should not come.
        std::thread::sleep(Duration::from_millis(300));
        let answered = fetched
            .iter()
            .filter(|f| f.code == 200 && f.answered == f.path)
            .count();
        let once = |index: usize| {
            let log = lab.proxy_log(index);
            paths
                .iter()
                .filter(|p| log.iter().filter(|e| path_of(e) == p.as_str()).count() == 1)
                .count()
        };
        let (at_origin, at_mitm) = (once(origin_log), once(mitm));
        let after = counters_of(&lab.engine.counters().unwrap());
        let [redirects, inherited, _] = [0, 1, 2].map(|i| after[i] - before[i]);
        report.push(format!(
            "round {r}: answered {answered}/{CONCURRENT}; once at the origin {at_origin}, \
             once at mitmproxy {at_mitm}; layer: {redirects} redirects, {inherited} records inherited"
        ));
        ok &= answered == CONCURRENT
            && at_origin == CONCURRENT
            && at_mitm == CONCURRENT
            && redirects == 2 * CONCURRENT as u64
            && inherited == 2 * CONCURRENT as u64;
    }
    let report = report.join("\n");
    eprintln!("{test}:\n{report}");
    assert!(
        ok,
        "haproxy {} mitmproxy, {CONCURRENT} at once: every request must be answered, reach the \
         origin and mitmproxy once, and pass each proxy once with a record:\n{report}",
        if haproxy_first { "then" } else { "after" }
    );
}

#[test]
fn haproxy_then_mitmproxy_concurrent_clients_ipv4() {
    run_two_records_less("haproxy-mitm", true);
}

#[test]
fn mitmproxy_then_haproxy_concurrent_clients_ipv4() {
    run_two_records_less("mitm-haproxy", false);
}

#[test]
fn connredir_proxy_then_mitmproxy_on_every_address_concurrent_clients_ipv4() {
    run(
        "mitm-all-v4",
        &V4_EVERYWHERE,
        Chain::OursThenMitmproxy,
        CONCURRENTLY,
    );
}

#[test]
fn mitmproxy_on_every_address_then_connredir_proxy_concurrent_clients_ipv6() {
    run(
        "mitm-all-v6",
        &V6_EVERYWHERE,
        Chain::MitmproxyThenOurs,
        CONCURRENTLY,
    );
}
