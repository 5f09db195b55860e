//! End to end, DNS through the layer: real resolvers as clients, dnsmasq
//! as the origin and connredir-proxy services (`--udp-listen`, no
//! `--udp-upstream`: every flow is the layer's) chained in front of it.
//!
//! Each test makes a network namespace of its own (`ip netns add`, removed
//! at the end, its `/etc/netns/NAME/resolv.conf` too) and runs everything
//! there through `ip netns exec`, so that dnsmasq serves port 53 and the
//! glibc resolver can be pointed at it: dnsmasq on 127.0.0.3:53 and
//! [::1]:53 in the `outside` cgroup (not attached), the services on
//! 127.0.0.1 and ::1 in `services/NAME`, the clients in `scope/client` as
//! uid 65534: `dig` (a connected UDP socket), `getent hosts` and `getent
//! ahostsv4` (the glibc resolver, with the namespace's own resolv.conf) and a Python client that
//! sends with `sendto` on an unconnected socket. The services are
//! registered and started in every order; each query must be answered
//! correctly, logged once by each service it passes, with the chain in
//! priority order, and a name one service denies must get REFUSED and
//! never reach dnsmasq.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use connredir_engine::{Protocol, ServiceId};
use connredir_testkit::{by_cgroup, permutations, require_program, workspace_bin, Lab, Proc};
use serde_json::{json, Value};

/// The unprivileged user clients run as.
const NOBODY: &str = "65534";

/// The origin's addresses inside the namespace (port 53).
const ORIGIN4: &str = "127.0.0.3";
const ORIGIN6: &str = "::1";

/// The programs these tests run; None to skip (outside CI).
struct Programs {
    ip: PathBuf,
    setpriv: PathBuf,
    dnsmasq: PathBuf,
    dig: PathBuf,
    getent: PathBuf,
    python: PathBuf,
}

/// A program of the system, looked for on PATH and in the sbin directories
/// (which a test runner's PATH may not name); in CI a missing one fails.
fn program(test: &str, name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .or_else(|| require_program(test, name))
}

impl Programs {
    fn find(test: &str) -> Option<Programs> {
        Some(Programs {
            ip: program(test, "ip")?,
            setpriv: program(test, "setpriv")?,
            dnsmasq: program(test, "dnsmasq")?,
            dig: program(test, "dig")?,
            getent: program(test, "getent")?,
            // The system's, which uid 65534 can run (not a per-user shim).
            python: program(test, "python3")?,
        })
    }
}

/// A network namespace the test made, with loopback up; deleted on drop,
/// with its `/etc/netns/NAME` directory.
struct Netns {
    name: String,
    ip: PathBuf,
}

impl Netns {
    fn new(ip: &Path, tag: &str) -> Netns {
        let name = format!("crdns-{}-{tag}", std::process::id());
        let run = |args: &[&str]| {
            let status = Command::new(ip).args(args).status().expect("run ip");
            assert!(status.success(), "ip {args:?}: {status}");
        };
        run(&["netns", "add", &name]);
        let netns = Netns {
            name,
            ip: ip.to_owned(),
        };
        run(&["-n", &netns.name, "link", "set", "lo", "up"]);
        // dnsmasq binds the origin's own address (--bind-interfaces).
        run(&[
            "-n",
            &netns.name,
            "addr",
            "add",
            "127.0.0.3/32",
            "dev",
            "lo",
        ]);
        netns
    }

    fn etc(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.name)
    }

    /// Makes `ip netns exec` show the glibc resolver a resolv.conf naming
    /// `nameserver` alone.
    fn resolv_conf(&self, nameserver: &str) {
        std::fs::create_dir_all(self.etc()).unwrap();
        std::fs::write(
            self.etc().join("resolv.conf"),
            format!("nameserver {nameserver}\noptions timeout:3 attempts:1\n"),
        )
        .unwrap();
    }

    /// Starts `program args` inside the namespace in `cgroup`, as uid
    /// 65534 when `nobody` (setpriv drops root after `ip netns exec`).
    fn spawn(&self, cgroup: &Path, nobody: Option<&Path>, program: &Path, args: &[&str]) -> Proc {
        let program = program.to_str().unwrap();
        let mut all = vec!["netns", "exec", &self.name];
        if let Some(setpriv) = nobody {
            all.extend([
                setpriv.to_str().unwrap(),
                "--reuid",
                NOBODY,
                "--regid",
                NOBODY,
                "--clear-groups",
                "--",
            ]);
        }
        all.push(program);
        all.extend_from_slice(args);
        Proc::spawn_program(cgroup, None, &self.ip, &all).expect("start a process in the namespace")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new(&self.ip)
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(self.etc());
    }
}

/// dnsmasq in the namespace, and the file it logs each query to.
struct Origin {
    log: PathBuf,
}

impl Origin {
    /// Starts dnsmasq on port 53 of the origin's addresses, answering
    /// `*.example.test` (192.0.2.1, 2001:db8::1) and `*.blocked.test`
    /// itself and nothing upstream, with `--log-queries` to a file of the
    /// test's own. The process is the lab's (the pid is dnsmasq's: `ip
    /// netns exec` execs it).
    fn start(lab: &mut Lab, netns: &Netns, programs: &Programs) -> Origin {
        let log = std::env::temp_dir().join(format!("connredir-{}.dnsmasq.log", netns.name));
        let _ = std::fs::remove_file(&log);
        let log_facility = format!("--log-facility={}", log.display());
        let args = [
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.3",
            "--listen-address=::1",
            "--port=53",
            "--pid-file=",
            "--user=nobody",
            "--group=nogroup",
            &log_facility,
            "--log-queries",
            "--address=/example.test/192.0.2.1",
            "--address=/example.test/2001:db8::1",
            "--address=/blocked.test/192.0.2.66",
        ];
        let proc = netns.spawn(
            &lab.cgroup("outside/dnsmasq"),
            None,
            &programs.dnsmasq,
            &args,
        );
        lab.procs.push(proc);
        let origin = Origin { log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !origin
            .lines()
            .iter()
            .any(|l| l.contains("started, version"))
        {
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not start: {:?}",
                origin.lines()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        origin
    }

    /// The lines dnsmasq logged so far.
    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// One connredir-proxy service: registered as its own cgroup's, on
/// 127.0.0.1:PORT and [::1]:PORT, with UDP rules sending port 53 of the
/// origin's addresses to it at `priority`; started with `extra` options.
/// Returns its id and its index in the lab's processes.
fn service(
    lab: &mut Lab,
    netns: &Netns,
    name: &str,
    port: u16,
    priority: u32,
    extra: &[&str],
) -> (ServiceId, usize) {
    let cgroup = lab.cgroup(&format!("services/{name}"));
    let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let id = lab.service(name, &[v4, v6], by_cgroup(&cgroup), None);
    lab.route_protocol(id, Protocol::Udp, "127.0.0.3/32", Some(53), priority);
    lab.route_protocol(id, Protocol::Udp, "::1/128", Some(53), priority);
    let (v4, v6) = (v4.to_string(), v6.to_string());
    let mut args = vec!["--name", name, "--udp-listen", &v4, "--udp-listen", &v6];
    args.extend_from_slice(extra);
    let proc = netns.spawn(&cgroup, None, &workspace_bin("connredir-proxy"), &args);
    proc.wait_line("proxy ready", |l| l == "ready").unwrap();
    lab.procs.push(proc);
    (id, lab.procs.len() - 1)
}

/// dig as uid 65534 against `server`:53 for `name` A: its status and
/// answer records.
fn dig(
    lab: &Lab,
    netns: &Netns,
    programs: &Programs,
    server: &str,
    name: &str,
) -> (String, Vec<String>) {
    let at = format!("@{server}");
    let args = [
        &at[..],
        "-p",
        "53",
        "+notcp",
        "+tries=1",
        "+time=3",
        "+noall",
        "+comments",
        "+answer",
        name,
        "A",
    ];
    let client = netns.spawn(
        &lab.cgroup("scope/client"),
        Some(&programs.setpriv),
        &programs.dig,
        &args,
    );
    let (_, lines) = client.finish().unwrap();
    let (status, answers) = connredir_testkit::dig_reply(&lines);
    (status, answers)
}

/// `getent DATABASE NAME` as uid 65534, the glibc resolver reading the
/// namespace's resolv.conf (naming `nameserver`): what it printed, and
/// whether it succeeded.
fn getent(
    lab: &Lab,
    netns: &Netns,
    programs: &Programs,
    nameserver: &str,
    database: &str,
    name: &str,
) -> (bool, Vec<String>) {
    netns.resolv_conf(nameserver);
    let client = netns.spawn(
        &lab.cgroup("scope/client"),
        Some(&programs.setpriv),
        &programs.getent,
        &[database, name],
    );
    let (status, lines) = client.finish().unwrap();
    (status.success(), lines)
}

/// A DNS client on an unconnected socket: one `sendto` per name to
/// SERVER:53 from the same socket, one JSON line per answer (its source,
/// response code and first IPv4 answer).
const UNCONNECTED_CLIENT: &str = r#"
import json, socket, struct, sys
server, names = sys.argv[1], sys.argv[2:]
family = socket.AF_INET6 if ":" in server else socket.AF_INET
s = socket.socket(family, socket.SOCK_DGRAM)
s.settimeout(3)
for n, name in enumerate(names):
    qid = 0x4200 + n
    query = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(l)]) + l.encode() for l in name.split("."))
    query += b"\0" + struct.pack(">HH", 1, 1)
    s.sendto(query, (server, 53))
    try:
        data, source = s.recvfrom(4096)
    except socket.timeout:
        print(json.dumps({"name": name, "error": "timeout"}), flush=True)
        continue
    rid, flags, _, ancount = struct.unpack(">HHHH", data[:8])
    answer = ".".join(str(b) for b in data[-4:]) if ancount else None
    print(json.dumps({"name": name, "id_ok": rid == qid, "rcode": flags & 15,
                      "from": [source[0], source[1]], "answer": answer}), flush=True)
"#;

/// Runs [`UNCONNECTED_CLIENT`] as uid 65534 for `names`; its answers.
fn unconnected(
    lab: &Lab,
    netns: &Netns,
    programs: &Programs,
    server: &str,
    names: &[&str],
) -> Vec<Value> {
    let mut args = vec!["-c", UNCONNECTED_CLIENT, server];
    args.extend_from_slice(names);
    let client = netns.spawn(
        &lab.cgroup("scope/client"),
        Some(&programs.setpriv),
        &programs.python,
        &args,
    );
    let (status, lines) = client.finish().unwrap();
    assert!(status.success(), "python client: {lines:?}");
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The query lines service `index` logged, by (name, type).
fn queries(lab: &Lab, index: usize) -> BTreeMap<(String, String), Vec<Value>> {
    let mut by_name: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    for line in lab.proxy_log(index) {
        if let Some(dns) = line.get("dns") {
            let key = (
                dns["name"].as_str().unwrap_or("").to_string(),
                dns["type"].as_str().unwrap_or("").to_string(),
            );
            by_name.entry(key).or_default().push(line);
        }
    }
    by_name
}

/// Waits (at most 10 s) until `done` holds of the lab.
fn wait_until(what: &str, lab: &Lab, done: impl Fn(&Lab) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(lab) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What one query went through: its name, type and which family's origin.
struct Asked {
    name: String,
    qtype: &'static str,
    v6: bool,
}

/// `n` services in every start order (priority by name; `bravo` denies
/// `*.blocked.test`): dig, getent and the unconnected client over IPv4 and
/// IPv6, each query answered correctly and logged once by each service it
/// passes, with the chain in priority order; denied names get REFUSED
/// from `bravo`, pass the services before it, and never reach the services
/// after it nor dnsmasq, which sees each allowed query once.
fn dns_chain_in_every_start_order(n: usize, test: &str) {
    let Some(programs) = Programs::find(test) else {
        return;
    };
    let names = ["alpha", "bravo", "charlie"];
    let denier = 1;
    for order in permutations(n) {
        let Some(mut lab) = Lab::new(test) else {
            return;
        };
        let netns = Netns::new(&programs.ip, &n.to_string());
        let origin = Origin::start(&mut lab, &netns, &programs);
        let mut started = vec![None; n];
        for &which in &order {
            let extra: &[&str] = if which == denier {
                &["--rule", "deny:dns:*.blocked.test"]
            } else {
                &[]
            };
            started[which] = Some(service(
                &mut lab,
                &netns,
                names[which],
                15_053 + which as u16,
                which as u32 + 1,
                extra,
            ));
        }
        let started: Vec<(ServiceId, usize)> = started.into_iter().map(Option::unwrap).collect();
        let ids: Vec<u32> = started.iter().map(|(id, _)| id.0).collect();
        let case = format!("{n} services, started in order {order:?}");

        let mut asked = Vec::new();
        for (server, v6) in [(ORIGIN4, false), (ORIGIN6, true)] {
            let family = if v6 { "6" } else { "4" };
            // dig: a connected socket, one query each.
            let allowed = format!("dig{family}.example.test");
            let (status, answers) = dig(&lab, &netns, &programs, server, &allowed);
            assert_eq!(status, "NOERROR", "{case}: dig {allowed}: {answers:?}");
            assert!(
                answers.iter().any(|a| a.contains("192.0.2.1")),
                "{case}: dig {allowed}: {answers:?}"
            );
            let denied = format!("dig{family}.blocked.test");
            let (status, answers) = dig(&lab, &netns, &programs, server, &denied);
            assert_eq!(status, "REFUSED", "{case}: dig {denied}: {answers:?}");
            assert!(answers.is_empty(), "{case}: {answers:?}");
            asked.extend([
                Asked {
                    name: allowed,
                    qtype: "A",
                    v6,
                },
                Asked {
                    name: denied,
                    qtype: "A",
                    v6,
                },
            ]);

            // The glibc resolver: `hosts` (gethostbyname2) asks AAAA
            // first, and has its answer; `ahostsv4` (getaddrinfo) asks A.
            let name = format!("getent{family}.example.test");
            let (ok, lines) = getent(&lab, &netns, &programs, server, "hosts", &name);
            assert!(ok, "{case}: getent hosts {name}: {lines:?}");
            assert_eq!(lines.len(), 1, "{case}: {lines:?}");
            let words: Vec<&str> = lines[0].split_whitespace().collect();
            assert_eq!(words, ["2001:db8::1", &name[..]], "{case}: {lines:?}");
            asked.push(Asked {
                name,
                qtype: "AAAA",
                v6,
            });
            let name = format!("ahosts{family}.example.test");
            let (ok, lines) = getent(&lab, &netns, &programs, server, "ahostsv4", &name);
            assert!(ok, "{case}: getent ahostsv4 {name}: {lines:?}");
            assert!(
                !lines.is_empty() && lines.iter().all(|l| l.starts_with("192.0.2.1 ")),
                "{case}: {lines:?}"
            );
            asked.push(Asked {
                name,
                qtype: "A",
                v6,
            });

            // sendto on an unconnected socket: an allowed and a denied name
            // from one socket, one flow.
            let allowed = format!("sendto{family}.example.test");
            let denied = format!("sendto{family}.blocked.test");
            let answers = unconnected(&lab, &netns, &programs, server, &[&allowed, &denied]);
            assert_eq!(answers.len(), 2, "{case}: {answers:?}");
            for answer in &answers {
                // Replies read as coming from the address the client sent to.
                assert_eq!(answer["from"], json!([server, 53]), "{case}: {answer}");
                assert_eq!(answer["id_ok"], true, "{case}: {answer}");
            }
            assert_eq!(answers[0]["rcode"], 0, "{case}: {answers:?}");
            assert_eq!(answers[0]["answer"], "192.0.2.1", "{case}: {answers:?}");
            assert_eq!(answers[1]["rcode"], 5, "{case}: REFUSED: {answers:?}");
            asked.extend([
                Asked {
                    name: allowed,
                    qtype: "A",
                    v6,
                },
                Asked {
                    name: denied,
                    qtype: "A",
                    v6,
                },
            ]);
        }

        // Each service logged each query that reached it once, with the
        // chain so far in priority order; the services after the denier
        // never saw a denied name.
        let seen_by = |position: usize, asked: &Asked| {
            !asked.name.ends_with(".blocked.test") || position <= denier
        };
        for (position, &(_, index)) in started.iter().enumerate() {
            let expected = asked.iter().filter(|a| seen_by(position, a)).count();
            wait_until(
                &format!("{case}: {}'s query lines", names[position]),
                &lab,
                |lab| queries(lab, index).values().map(Vec::len).sum::<usize>() >= expected,
            );
            let logged = queries(&lab, index);
            assert_eq!(
                logged.values().map(Vec::len).sum::<usize>(),
                expected,
                "{case}, {}: {logged:?}",
                names[position]
            );
            for a in asked.iter().filter(|a| seen_by(position, a)) {
                let key = (a.name.to_string(), a.qtype.to_string());
                let lines = logged.get(&key).map(Vec::as_slice).unwrap_or_default();
                assert_eq!(
                    lines.len(),
                    1,
                    "{case}, {}: {key:?}: {lines:?}",
                    names[position]
                );
                let line = &lines[0];
                assert_eq!(line["chain"], json!(ids[..=position]), "{case}: {line}");
                assert_eq!(line["protocol"], "udp", "{line}");
                let origin = if a.v6 { "[::1]:53" } else { "127.0.0.3:53" };
                assert_eq!(line["original_dst"], origin, "{case}: {line}");
                let denied = a.name.ends_with(".blocked.test");
                let rcode = if denied { "REFUSED" } else { "NOERROR" };
                assert_eq!(line["dns"]["rcode"], rcode, "{case}: {line}");
                let verdict = if denied && position == denier {
                    "deny"
                } else {
                    "allow"
                };
                assert_eq!(line["verdict"], verdict, "{case}: {line}");
            }
        }

        // dnsmasq got each allowed query once, and no denied one.
        let seen = origin.lines();
        for a in asked.iter().filter(|a| a.name.ends_with(".example.test")) {
            let query = format!("query[{}] {} from", a.qtype, a.name);
            let count = seen.iter().filter(|l| l.contains(&query)).count();
            assert_eq!(count, 1, "{case}: {query}: {seen:?}");
        }
        assert!(
            !seen.iter().any(|l| l.contains("blocked.test")),
            "{case}: {seen:?}"
        );
        let counters = lab.engine.counters().unwrap();
        assert_eq!(counters.hop_limit, 0, "{case}: {counters:?}");
        // The processes stop before their namespace goes.
        drop(lab);
    }
}

#[test]
fn dns_through_two_proxy_services_in_every_start_order() {
    dns_chain_in_every_start_order(2, "dns-chain2");
}

#[test]
fn dns_through_three_proxy_services_in_every_start_order() {
    dns_chain_in_every_start_order(3, "dns-chain3");
}
