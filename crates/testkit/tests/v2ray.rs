//! V2Ray (Debian's package, 4.34) as a service on the redirect layer: an
//! unmodified third-party proxy written in Go, run as users run it for
//! transparent proxying, with a `dokodemo-door` inbound (`followRedirect`)
//! and a `freedom` outbound. It sets no records: its onward connection
//! chains through the layer's `inherit` queue (lib/inherit.h). It asks for
//! the original destination in one of two ways, and the tests run both:
//!
//! - redirect mode (the inbound's default, as under iptables `REDIRECT`):
//!   `SO_ORIGINAL_DST` at level `SOL_IP`, which the layer answers. This
//!   version asks at `SOL_IP` on IPv6 sockets too, where neither conntrack
//!   nor the layer has an IPv4 answer for an IPv6 flow (later V2Ray
//!   versions ask `IP6T_SO_ORIGINAL_DST`): IPv4 only.
//! - TPROXY mode (`streamSettings.sockopt.tproxy = "tproxy"`): the accepted
//!   connection's local address, which Go reads with `getsockname()` as it
//!   accepts. Registered `transparent = true`, the service's accepted
//!   sockets name the original destination there (`sockname.c`), on IPv4
//!   and IPv6. V2Ray cannot set `IP_TRANSPARENT` on its listener as an
//!   unprivileged user; it says so and goes on, and nothing here needs it.
//!
//! Go runs each connection's goroutine on whichever thread is free, so the
//! thread that connects onward is often not the one that asked (in TPROXY
//! mode the question is asked at accept, long before the connect): an
//! onward connection takes some record of the process's queue for that
//! destination, not always its own flow's (README: records-less services).
//! Where V2Ray comes first, the tests check that every onward connection
//! carries a record of the round's clients and that each is used once.
//!
//! Clients are 16 curl processes started at once, run as an unprivileged
//! user in the test's cgroup; the origin is the test kit's Python HTTP
//! origin (http_world.rs). V2Ray runs as that user too, with its
//! configuration and logs in the test's directory; its access log names
//! each connection's source and the destination it forwarded it to. Each
//! test checks, round by round, that every request was answered by the
//! origin, reached it once and passed each proxy once, to the right
//! destination, with the chain of services so far.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use connredir_engine::{Counters, Service, ServiceId};
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

/// How V2Ray learns the original destination.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// `SO_ORIGINAL_DST` (the service registered as usual).
    Redirect,
    /// The accepted socket's local address (the service registered
    /// `transparent`).
    Tproxy,
}

/// Who handles the flow, in order.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Chain {
    V2ray,
    V2rayThenOurs,
    OursThenV2ray,
}

/// V2Ray's configuration: a dokodemo-door inbound on `listen`, following
/// the original destination, a freedom outbound, an access log and an
/// error log in `dir`.
fn v2ray_config(listen: SocketAddr, mode: Mode, dir: &Path) -> String {
    let stream = match mode {
        Mode::Redirect => serde_json::json!({}),
        Mode::Tproxy => serde_json::json!({"sockopt": {"tproxy": "tproxy"}}),
    };
    serde_json::json!({
        "log": {
            "loglevel": "info",
            "access": dir.join("access.log"),
            "error": dir.join("error.log"),
        },
        "inbounds": [{
            "listen": listen.ip().to_string(),
            "port": listen.port(),
            "protocol": "dokodemo-door",
            "settings": {"network": "tcp", "followRedirect": true},
            "streamSettings": stream,
        }],
        "outbounds": [{"protocol": "freedom", "settings": {}}],
    })
    .to_string()
}

/// Registers V2Ray as a service (identity: its cgroup `services/v2ray`,
/// listening on a free port of `listen_ip`, `transparent` in TPROXY mode)
/// with one rule sending `dst` to it at `priority`, and starts it there as
/// [`NOBODY`]. Returns the service id.
fn start_v2ray(
    lab: &mut Lab,
    v2ray: &Path,
    dir: &TestDir,
    listen_ip: &str,
    mode: Mode,
    dst: SocketAddr,
    priority: u32,
) -> ServiceId {
    let cgroup = lab.cgroup("services/v2ray");
    let listen = free_addr(listen_ip);
    let id = lab.register(Service {
        transparent: mode == Mode::Tproxy,
        ..service_spec("v2ray", &[listen], by_cgroup(&cgroup))
    });
    lab.route(id, &host_prefix(dst), Some(dst.port()), priority);
    let conf = dir.write("v2ray.json", &v2ray_config(listen, mode, &dir.0));
    let proc = Proc::spawn_program(&cgroup, Some(NOBODY), v2ray, &["-config", &conf])
        .expect("start v2ray");
    lab.procs.push(proc);
    if let Err(e) = wait_listening(listen) {
        let log = std::fs::read_to_string(dir.0.join("error.log")).unwrap_or_default();
        panic!("v2ray does not listen on {listen} ({e}); its error log:\n{log}");
    }
    id
}

/// V2Ray's access log so far, one object per connection
/// (`DATE TIME SOURCE accepted tcp:DESTINATION`): its `source` and the
/// `destination` V2Ray sent it to.
fn v2ray_log(dir: &TestDir) -> Vec<Value> {
    std::fs::read_to_string(dir.0.join("access.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "accepted")?;
            Some(serde_json::json!({
                "source": words.get(at.checked_sub(1)?)?,
                "destination": words.get(at + 1)?.strip_prefix("tcp:")?,
            }))
        })
        .collect()
}

/// The counters a round follows: redirects and records inherited.
fn counters_of(c: &Counters) -> [u64; 2] {
    [c.redirects, c.records_inherited]
}

/// Runs [`ROUNDS`] rounds of [`AT_ONCE`] curl clients to an origin on
/// `origin_host` through `chain` (services listening on `listen_ip`, V2Ray
/// in `mode`) and checks each round.
fn run(test: &str, origin_host: &str, listen_ip: &str, mode: Mode, chain: Chain) {
    let Some(curl) = require_program(test, "curl") else {
        return;
    };
    let Some(v2ray) = require_program(test, "v2ray") else {
        return;
    };
    let Some(mut lab) = Lab::new(test) else {
        return;
    };
    let dir = TestDir::new(&format!("v2ray-{test}"), Some(NOBODY));
    let python = PathBuf::from("/usr/bin/python3");
    let (origin, origin_log) = start_origin(&mut lab, &python, &dir, origin_host);
    let (v2ray_priority, ours_priority) = match chain {
        Chain::V2ray | Chain::V2rayThenOurs => (1, 2),
        Chain::OursThenV2ray => (2, 1),
    };
    let v2ray_id = start_v2ray(
        &mut lab,
        &v2ray,
        &dir,
        listen_ip,
        mode,
        origin,
        v2ray_priority,
    );
    let ours =
        (chain != Chain::V2ray).then(|| lab.reference_proxy(listen_ip, origin, ours_priority));
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
        // V2Ray's log names no path: this round's entries are those after
        // the earlier rounds' (each round waits for all of its own).
        let seen_before = r * AT_ONCE;
        wait_for_lines(|| v2ray_log(&dir), seen_before + AT_ONCE, <[Value]>::len);
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
        let clients: BTreeSet<&str> = locals.values().copied().collect();
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
        for path in &paths {
            if at_origin.get(path) != Some(&1) {
                problems.push(format!(
                    "{path}: origin saw it {:?} times",
                    at_origin.get(path)
                ));
            }
        }

        // V2Ray: each flow once, each to the original destination; where
        // it comes first, from each client once.
        let forwarded: Vec<Value> = v2ray_log(&dir).into_iter().skip(seen_before).collect();
        let sources: BTreeSet<&str> = forwarded
            .iter()
            .map(|e| e["source"].as_str().unwrap_or_default())
            .collect();
        let first = chain != Chain::OursThenV2ray;
        if forwarded.len() != AT_ONCE
            || sources.len() != AT_ONCE
            || (first && sources != clients)
            || forwarded
                .iter()
                .any(|e| e["destination"] != origin_text.as_str())
        {
            problems.push(format!(
                "v2ray forwarded {} connections (want {AT_ONCE}, one from each {}, each to \
                 {origin_text}): {forwarded:?}",
                forwarded.len(),
                if first {
                    "client"
                } else {
                    "connredir-proxy connection"
                }
            ));
        }

        if let Some((ours_id, ours)) = ours {
            let ours_lines: Vec<Value> = lab
                .proxy_log(ours)
                .into_iter()
                .filter(|e| ours_path(e).starts_with(&prefix))
                .collect();
            let at_ours = count_paths(ours_lines.clone(), ours_path);
            let expected_chain: Vec<u64> = match chain {
                Chain::V2rayThenOurs => vec![v2ray_id.0.into(), ours_id.0.into()],
                _ => vec![ours_id.0.into()],
            };
            let mut flows = BTreeSet::new();
            for line in &ours_lines {
                let entry_chain: Vec<u64> = line["chain"]
                    .as_array()
                    .map(|c| c.iter().filter_map(Value::as_u64).collect())
                    .unwrap_or_default();
                let flow = line["flow"].as_str().unwrap_or_default();
                // After V2Ray, a flow carries some client's record of the
                // round (the goroutine that connects may run on another
                // thread than the one that asked); first on the flow,
                // connredir-proxy sees each client's own.
                let flow_ok = match chain {
                    Chain::V2rayThenOurs => clients.contains(flow),
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
        "{mode:?} {chain:?}: every request must be answered by the origin, reach it once and \
         pass each proxy once, with a record:\n{}",
        failures.join("\n")
    );
}

#[test]
fn v2ray_redirect_forwards_ipv4_to_the_original_destination() {
    run(
        "v2ray-redir-v4",
        "127.0.0.2",
        "127.0.0.1",
        Mode::Redirect,
        Chain::V2ray,
    );
}

#[test]
fn v2ray_redirect_then_connredir_proxy_ipv4() {
    run(
        "v2ray-redir-ours-v4",
        "127.0.0.2",
        "127.0.0.1",
        Mode::Redirect,
        Chain::V2rayThenOurs,
    );
}

#[test]
fn connredir_proxy_then_v2ray_redirect_ipv4() {
    run(
        "ours-v2ray-redir-v4",
        "127.0.0.2",
        "127.0.0.1",
        Mode::Redirect,
        Chain::OursThenV2ray,
    );
}

#[test]
fn v2ray_tproxy_forwards_ipv4_to_the_original_destination() {
    run(
        "v2ray-tproxy-v4",
        "127.0.0.2",
        "127.0.0.1",
        Mode::Tproxy,
        Chain::V2ray,
    );
}

#[test]
fn v2ray_tproxy_forwards_ipv6_to_the_original_destination() {
    run("v2ray-tproxy-v6", "::1", "::1", Mode::Tproxy, Chain::V2ray);
}

#[test]
fn v2ray_tproxy_then_connredir_proxy_ipv6() {
    run(
        "v2ray-tproxy-ours-v6",
        "::1",
        "::1",
        Mode::Tproxy,
        Chain::V2rayThenOurs,
    );
}

#[test]
fn connredir_proxy_then_v2ray_tproxy_ipv6() {
    run(
        "ours-v2ray-tproxy-v6",
        "::1",
        "::1",
        Mode::Tproxy,
        Chain::OursThenV2ray,
    );
}
