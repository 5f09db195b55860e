//! Records belong to the layer: a service's process may hand on only a record
//! the layer issued to its service, as it was issued. Each test drives the
//! real programs: a client's connection is redirected to service A, whose
//! process (uid 65534, unprivileged) takes the record it received and tries
//! to forge it on new sockets, through the real setsockopt; service B's
//! proxy would be next in the chain.
//!
//! The randomized test sends `CONNREDIR_FUZZ_ITERATIONS` mutations (default
//! 100,000, about two seconds); for a longer run:
//!
//! ```sh
//! CONNREDIR_FUZZ_ITERATIONS=5000000 cargo test -p connredir-testkit \
//!     --test forged_records -- --nocapture mutated
//! ```
//! (`CONNREDIR_FUZZ_SEED` repeats a run.)

use std::collections::BTreeMap;
use std::mem::offset_of;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use connredir_abi::{connredir_hop, connredir_record, map_names};
use connredir_engine::{ensure_bpffs, Engine, ServiceId};
use connredir_testkit::{
    by_cgroup, free_addr, require_privileges, require_program, test_tree, EchoServer, Lab, Proc,
};
use serde_json::Value;

/// The unprivileged user every process of these tests runs as.
const NOBODY: u32 = 65534;

/// A lab with the chain client → A → B → destination, where A's process
/// is the forger.
struct Chain {
    lab: Lab,
    server: EchoServer,
    a: ServiceId,
    b: ServiceId,
    b_listen: SocketAddr,
    /// What A's process reported: the record (hex), each case, the tally.
    report: Vec<Value>,
}

impl Chain {
    /// Sets up the chain, sends one client connection through it and runs
    /// A's forgeries (and `iterations` random mutations).
    fn run(name: &str, iterations: u64) -> Option<Chain> {
        let (lab, server) = Lab::with_server(name)?;
        let dst = server.addr();
        Some(Chain::run_in(lab, server, dst, iterations))
    }

    /// As `run`, in a lab made by the caller, with `server` (on `dst`) as
    /// the destination.
    fn run_in(mut lab: Lab, server: EchoServer, dst: SocketAddr, iterations: u64) -> Chain {
        let prefix = format!("{}/32", dst.ip());

        let a_cgroup = lab.cgroup("services/a");
        let a_listen = free_addr("127.0.0.1");
        let a = lab.service("a", &[a_listen], by_cgroup(&a_cgroup), None);
        lab.route(a, &prefix, Some(dst.port()), 10);

        let b_cgroup = lab.cgroup("services/b");
        let b_listen = free_addr("127.0.0.1");
        let b = lab.service("b", &[b_listen], by_cgroup(&b_cgroup), None);
        lab.route(b, &prefix, Some(dst.port()), 20);
        let b_args = ["proxy", "--name", "b", "--listen", &b_listen.to_string()];
        let proxy = Proc::spawn(&b_cgroup, Some(NOBODY), &b_args).unwrap();
        proxy.wait_line("proxy b ready", |l| l == "ready").unwrap();
        lab.procs.push(proxy);

        let seed = std::env::var("CONNREDIR_FUZZ_SEED").unwrap_or_else(|_| "24397".into());
        let (a_addr, dst_text) = (a_listen.to_string(), dst.to_string());
        let (other, iterations_text) = (b.0.to_string(), iterations.to_string());
        let forge_args = [
            "forge",
            "--listen",
            &a_addr,
            "--connect",
            &dst_text,
            "--other",
            &other,
            "--iterations",
            &iterations_text,
            "--seed",
            &seed,
        ];
        let forger = Proc::spawn(&a_cgroup, Some(NOBODY), &forge_args).unwrap();
        forger.wait_line("forger ready", |l| l == "ready").unwrap();

        let client_cgroup = lab.cgroup("scope/client");
        let client_args = ["client", "--connect", &dst_text, "--bytes", "16"];
        let (status, lines) = Proc::spawn(&client_cgroup, Some(NOBODY), &client_args)
            .unwrap()
            .finish()
            .unwrap();
        assert!(status.success(), "client: {lines:?}");

        // About 2 µs a mutation in a debug build, with a wide margin.
        let budget = Duration::from_secs(30 + iterations / 20_000);
        let (status, report) = finish_within(forger, iterations > 0, budget);
        assert!(status.success(), "forger failed: {report:?}");
        Chain {
            lab,
            server,
            a,
            b,
            b_listen,
            report: report
                .iter()
                .filter(|l| l.starts_with('{'))
                .map(|l| serde_json::from_str(l).unwrap())
                .collect(),
        }
    }

    /// Sets a record blob (hex) on a new socket of a process in `cgroup`
    /// (as `uid`), which then connects to the destination.
    fn set_blob(&self, cgroup: &str, uid: Option<u32>, hex: &str) -> Value {
        let dst = self.server.addr().to_string();
        let args = ["set-blob", "--hex", hex, "--connect", &dst];
        let (status, lines) = Proc::spawn(&self.lab.cgroup(cgroup), uid, &args)
            .unwrap()
            .finish()
            .unwrap();
        assert!(status.success(), "{lines:?}");
        serde_json::from_str(lines.last().unwrap()).unwrap()
    }

    /// The genuine record A received, in hex.
    fn record_hex(&self) -> String {
        self.report[0]["record"].as_str().unwrap().to_string()
    }

    /// What the layer answered to one forgery case.
    fn case(&self, name: &str) -> &Value {
        self.report
            .iter()
            .find(|l| l["case"] == name)
            .unwrap_or_else(|| panic!("no case {name} in {:?}", self.report))
    }

    /// Asserts the layer refused a case with `errno` (and, when it took it
    /// instead, says where the connection went: the proof of the bypass).
    fn assert_refused(&self, name: &str, errno: &str) {
        let case = self.case(name);
        assert_eq!(
            case["result"],
            errno,
            "{name}: the layer took a forged record; the connection went to {} \
             (B listens on {}, the destination is {})",
            case["peer"],
            self.b_listen,
            self.server.addr()
        );
    }
}

/// Waits (within `budget`) for the forger's last line: its tally, or its
/// last forgery case when there is no random run; then for it to exit.
fn finish_within(
    proc: Proc,
    fuzzing: bool,
    budget: Duration,
) -> (std::process::ExitStatus, Vec<String>) {
    let last = if fuzzing {
        "\"fuzz\""
    } else {
        "\"case\":\"last-byte-flipped\""
    };
    let done = |l: &String| l.contains(last);
    let deadline = Instant::now() + budget;
    while Instant::now() < deadline && !proc.lines().iter().any(done) {
        std::thread::sleep(Duration::from_millis(50));
    }
    proc.finish().unwrap()
}

#[test]
fn a_service_cannot_forge_another_services_hop() {
    let Some(chain) = Chain::run("forgehop", 0) else {
        return;
    };
    for case in [
        "other-service-hop",
        "other-service-hop-built",
        "last-hop-other-service",
    ] {
        chain.assert_refused(case, "EACCES");
    }
    let counters = chain.lab.engine.counters().unwrap();
    assert!(counters.forged_records >= 3, "{counters:?}");
}

#[test]
fn hop_count_forgeries_are_refused() {
    let Some(chain) = Chain::run("forgecount", 0) else {
        return;
    };
    chain.assert_refused("eight-empty-hops", "EACCES");
    chain.assert_refused("eight-hops-own-last", "EACCES");
    chain.assert_refused("nine-hops", "EINVAL");
}

#[test]
fn an_invented_client_or_a_changed_record_is_refused() {
    let Some(chain) = Chain::run("forgeclient", 0) else {
        return;
    };
    for case in [
        "invented-client",
        "changed-command",
        "version-1-copy",
        "last-byte-flipped",
    ] {
        chain.assert_refused(case, "EACCES");
    }
}

#[test]
fn a_record_of_one_service_is_refused_to_another() {
    let Some(chain) = Chain::run("forgeother", 0) else {
        return;
    };
    let hex = chain.record_hex();
    let set = |uid: Option<u32>| chain.set_blob("services/b", uid, &hex);
    // B's process, with A's record: B would be skipped.
    let by_b = set(Some(NOBODY));
    assert_eq!(
        by_b["result"], "EACCES",
        "B's process set A's record; its connection went to {}",
        by_b["peer"]
    );
    // Root keeps the right to set any well-formed record.
    assert_eq!(set(None)["result"], "ok");
}

#[test]
fn a_record_the_layer_issued_passes_and_the_chain_goes_on() {
    let Some(chain) = Chain::run("forgegenuine", 0) else {
        return;
    };
    let genuine = chain.case("genuine");
    assert_eq!(genuine["result"], "ok", "{genuine}");
    assert_eq!(
        genuine["peer"],
        chain.b_listen.to_string(),
        "A's onward connection goes on to B"
    );
    // Bytes the layer never reads (an unused hop slot) change nothing.
    let junk = chain.case("junk-in-unused-hops");
    assert_eq!(junk["result"], "ok", "{junk}");
    assert_eq!(junk["peer"], chain.b_listen.to_string());
    let kept = from_hex(junk["kept"].as_str().unwrap());
    let hop = |i: usize| {
        let at = offset_of!(connredir_record, hops) + i * std::mem::size_of::<connredir_hop>();
        &kept[at..at + std::mem::size_of::<connredir_hop>()]
    };
    assert!(hop(7).iter().all(|&b| b == 0), "unused slots are not kept");
    assert_eq!(&hop(1)[..4], &chain.b.0.to_ne_bytes(), "B's hop follows");
    let logged = chain.lab.wait_logged(0, 1);
    let seen: Vec<u32> = logged[0]["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(seen, [chain.a.0, chain.b.0], "{logged:?}");
}

#[test]
fn mutated_and_forged_records_are_never_accepted() {
    let iterations: u64 = std::env::var("CONNREDIR_FUZZ_ITERATIONS")
        .map(|n| n.parse().expect("CONNREDIR_FUZZ_ITERATIONS is a number"))
        .unwrap_or(100_000);
    let Some(chain) = Chain::run("forgefuzz", iterations) else {
        return;
    };
    let line = chain
        .report
        .iter()
        .find(|l| l.get("fuzz").is_some())
        .expect("the forger's tally");
    let fuzz = &line["fuzz"];
    eprintln!("{fuzz}");
    assert_eq!(fuzz["iterations"], iterations);
    assert_eq!(
        fuzz["forged_taken"], 0,
        "a forged record was taken: {}",
        fuzz["first_forged"]
    );
    let other: BTreeMap<String, u64> =
        serde_json::from_value(fuzz["other_errors"].clone()).unwrap();
    assert!(
        other.is_empty(),
        "errors other than EINVAL/EACCES: {other:?}"
    );
    let refused = fuzz["einval"].as_u64().unwrap() + fuzz["eacces"].as_u64().unwrap();
    assert_eq!(
        refused + fuzz["genuine_taken"].as_u64().unwrap(),
        iterations
    );
    assert!(
        fuzz["eacces"].as_u64().unwrap() > 0,
        "some reach the seal check"
    );
    assert!(fuzz["einval"].as_u64().unwrap() > 0, "some are malformed");
    assert_eq!(fuzz["genuine_after"], "ok", "the layer still works");
    let counters = chain.lab.engine.counters().unwrap();
    assert!(
        counters.forged_records >= fuzz["eacces"].as_u64().unwrap(),
        "{counters:?}"
    );
}

/// Removes a pin directory when the test ends, on failure too (before the
/// cgroup tree goes).
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = Engine::remove_pinned(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_takeover_of_pinned_maps_keeps_issued_records_valid() {
    if !require_privileges("forgetakeover") {
        return;
    }
    ensure_bpffs(Path::new("/sys/fs/bpf")).unwrap();
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/connredir-test-forgetakeover-{}",
        std::process::id()
    ));
    let tree = test_tree("forgetakeover").unwrap();
    let mut engine = Engine::load_pinned(&dir).expect("load pinned");
    let pins = Pins(dir.clone());
    let (scope, services) = (
        tree.cgroup("scope").unwrap(),
        tree.cgroup("services").unwrap(),
    );
    engine.attach(&scope).unwrap();
    engine.attach(&services).unwrap();
    let lab = Lab {
        procs: Vec::new(),
        engine,
        tree,
    };
    let server = EchoServer::start("127.0.0.2:0").unwrap();
    let dst = server.addr();
    let mut chain = Chain::run_in(lab, server, dst, 0);
    let hex = chain.record_hex();
    if let Some(bpftool) = require_program("forgetakeover", "bpftool") {
        assert_is_siphash_2_4(&bpftool, &dir.join(map_names::SEAL_KEY), &hex);
    }
    assert_eq!(
        chain.set_blob("services/a", Some(NOBODY), &hex)["result"],
        "ok"
    );

    // The first run is complete (as `up` completes it), then a new engine
    // takes over the pinned maps and swaps its programs in.
    chain.lab.engine.finish_takeover().unwrap();
    let mut next = Engine::load_pinned(&dir).expect("take over the pinned maps");
    next.attach(&scope).unwrap();
    next.attach(&services).unwrap();
    chain.lab.engine = next;
    let after = chain.set_blob("services/a", Some(NOBODY), &hex);
    assert_eq!(
        after["result"],
        "ok",
        "a record issued before the takeover is refused after it; {:?}",
        chain.lab.engine.counters()
    );
    assert_eq!(
        after["peer"],
        chain.b_listen.to_string(),
        "and goes on to B"
    );
    drop(pins);
}

/// The seal is SipHash-2-4 (the reference: the standard library's
/// `SipHasher`, deprecated for hash tables, not for this) of the record's
/// bytes before it, under the key in the pinned map, which root can read.
fn assert_is_siphash_2_4(bpftool: &Path, key_map: &Path, record_hex: &str) {
    let out = std::process::Command::new(bpftool)
        .args(["-j", "map", "dump", "pinned"])
        .arg(key_map)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let dump: Value = serde_json::from_slice(&out.stdout).unwrap();
    let value = &dump[0]["value"];
    // With BTF, bpftool prints the struct's fields; without, the bytes.
    let (k0, k1) = if let Some(k0) = value.get("k0") {
        (k0.as_u64().unwrap(), value["k1"].as_u64().unwrap())
    } else {
        let bytes: Vec<u8> = value
            .as_array()
            .unwrap()
            .iter()
            .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
            .collect();
        let word = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap());
        (word(0), word(8))
    };
    assert!(k0 != 0 || k1 != 0, "the engine wrote a key");
    let record = from_hex(record_hex);
    // What the seal covers: the header and the used hops, then the command.
    let field = |at: usize| u16::from_ne_bytes([record[at], record[at + 1]]);
    let hops = usize::from(field(offset_of!(connredir_record, hop_count)));
    let hop_size = std::mem::size_of::<connredir_hop>();
    let used = offset_of!(connredir_record, hops) + hops * hop_size;
    let comm = offset_of!(connredir_record, client_comm);
    let (body, seal) = record.split_at(record.len() - 8);
    let covered = [&body[..used], &body[comm..]].concat();
    #[allow(deprecated)]
    let mut reference = std::hash::SipHasher::new_with_keys(k0, k1);
    std::hash::Hasher::write(&mut reference, &covered);
    assert_eq!(
        u64::from_ne_bytes(seal.try_into().unwrap()),
        std::hash::Hasher::finish(&reference),
        "the seal is SipHash-2-4 of the record under the layer's key"
    );
}

fn from_hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}
