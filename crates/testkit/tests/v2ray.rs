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

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use connredir_engine::{Service, ServiceId};
use connredir_testkit::http_world::{start_origin, wait_for_lines, ChainRounds, NOBODY};
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

/// Runs [`ROUNDS`] rounds of [`AT_ONCE`] curl clients to an origin on
/// `origin_host` through `chain` (services listening on `listen_ip`, V2Ray
/// in `mode`) and checks each round ([`ChainRounds`]); V2Ray's own check:
/// each flow once in its access log, each to the original destination,
/// and where it comes first, from each client once.
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
    let origin_text = origin.to_string();
    let rounds = ChainRounds {
        lab: &lab,
        curl: &curl,
        origin: (origin, origin_log),
        third_party: v2ray_id,
        ours,
        ours_first: chain == Chain::OursThenV2ray,
        rounds: ROUNDS,
        at_once: AT_ONCE,
    };
    rounds.run(&format!("{mode:?} {chain:?}"), |round| {
        // V2Ray's log names no path: a round's entries are those after the
        // earlier rounds' (each round waits for all of its own).
        let seen_before = round.number * AT_ONCE;
        wait_for_lines(|| v2ray_log(&dir), seen_before + AT_ONCE, <[Value]>::len);
        let forwarded: Vec<Value> = v2ray_log(&dir).into_iter().skip(seen_before).collect();
        let sources: BTreeSet<&str> = forwarded
            .iter()
            .map(|e| e["source"].as_str().unwrap_or_default())
            .collect();
        let first = chain != Chain::OursThenV2ray;
        if forwarded.len() != AT_ONCE
            || sources.len() != AT_ONCE
            || (first && sources != round.clients())
            || forwarded
                .iter()
                .any(|e| e["destination"] != origin_text.as_str())
        {
            vec![format!(
                "v2ray forwarded {} connections (want {AT_ONCE}, one from each {}, each to \
                 {origin_text}): {forwarded:?}",
                forwarded.len(),
                if first {
                    "client"
                } else {
                    "connredir-proxy connection"
                }
            )]
        } else {
            Vec::new()
        }
    });
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
