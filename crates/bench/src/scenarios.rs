//! The five scenarios and the setup they share.
//!
//! Layout: a cgroup tree `<cgroup2>/connredir-bench-<pid>` and network
//! namespaces `connredir-bench-<pid>-{plain,nat,mem}`.
//! - `plain`: servers, direct clients, and the connredir path (clients in
//!   the attached cgroup `redir/clients`, the proxy in `redir/proxy`).
//! - `nat`: the same servers and proxy, with an nftables REDIRECT rule
//!   (conntrack) sending the clients' connections to the proxy, which reads
//!   `SO_ORIGINAL_DST`; the proxy's own connections are excluded by its uid.
//! - `mem`: many held connections, its port range widened.
//!
//! A variant is a (cgroup, namespace) pair the clients start in; a further
//! variant (e.g. a sockmap-accelerated layer) is one more entry in
//! [`Bench::variants`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use connredir_engine::{Engine, Identity, Protocol, Rule, RunTimeStats, Service};
use connredir_host::cgroup::CgroupTree;
use serde::Serialize;

use crate::stats::{median, ratios, Spread};
use crate::sys::{self, check_interrupted, Netns, Place, Proc};
use crate::wire;
use crate::Scenario;

/// The uid the proxies run as (what the nftables rule excludes).
const PROXY_UID: u32 = 4245;
/// Where the proxies listen, in their namespace.
const PROXY_ADDR: &str = "127.0.0.1:15001";
/// The origin servers, in both namespaces: small answers, bulk, hold.
const ORIGIN_REPLY: &str = "127.0.0.2:8080";
const ORIGIN_BULK: &str = "127.0.0.2:8081";
const ORIGIN_HOLD: &str = "127.0.0.2:8082";
/// The accelerated proxy, and its origins: the same servers, run inside the
/// accelerating engine's scope so both legs can be accelerated.
const PROXY_ACCEL_ADDR: &str = "127.0.0.1:15002";
const ACCEL_REPLY: &str = "127.0.0.3:8080";
const ACCEL_BULK: &str = "127.0.0.3:8081";
/// A bulk origin outside the accelerating scope, sent to the same
/// accelerated proxy: only the client-to-proxy leg can be accelerated.
const ACCEL_CLIENT_LEG_BULK: &str = "127.0.0.4:8081";
/// haproxy, the third-party yardstick: a service on the layer like the
/// reference proxy (its own engine and scope), for the same origins.
const HAPROXY_ADDR: &str = "127.0.0.1:15003";
/// haproxy's connection log line: the same facts as the reference proxy's
/// per-connection JSON line (when, which flow, its original destination,
/// bytes each way, how long, how it ended), so both format and write one
/// line per connection.
const HAPROXY_LOG_FORMAT: &str = r#"{"time":"%t","flow":"%ci:%cp","original_dst":"%si:%sp","bytes_up":%U,"bytes_down":%B,"duration_ms":%Tt,"termination":"%ts"}"#;
/// The accept-and-close server of the overhead scenario.
const SINK_DROP: &str = "127.0.0.2:7000";
/// The UDP scenario's origins, in the plain namespace: dnsmasq, and a UDP
/// echo server for bulk.
const UDP_ORIGIN_IP: &str = "127.0.0.5";
const DNS_ORIGIN: &str = "127.0.0.5:53";
const UDP_ECHO: &str = "127.0.0.5:9000";
/// The UDP services: one alone (its own engine and scope), and a chain of
/// two (another engine and scope).
const UDP_ONE: &str = "127.0.0.1:15053";
const UDP_CHAIN_FIRST: &str = "127.0.0.1:15054";
const UDP_CHAIN_SECOND: &str = "127.0.0.1:15055";
/// Bytes per datagram of the UDP bulk runs, and datagrams in flight.
const UDP_DATAGRAM: usize = 8192;
const UDP_WINDOW: usize = 32;

/// How much each scenario does.
struct Sizes {
    overhead_rounds: usize,
    overhead_connects: u64,
    /// Connections per case of the BPF run-time measurement.
    cost_connects: u64,
    /// How long the redirected path through the reference proxy is
    /// measured for its BPF run time.
    cost_ms: u64,
    proxied_rounds: usize,
    proxied_ms: u64,
    concurrency: Vec<usize>,
    bulk_rounds: usize,
    bulk_bytes: u64,
    rss_connections: usize,
    kernel_connections: usize,
    kernel_rounds: usize,
    udp_rounds: usize,
    udp_ms: u64,
    udp_concurrency: Vec<usize>,
    udp_bulk_bytes: u64,
}

impl Sizes {
    fn new(quick: bool, nofile: u64) -> Sizes {
        let mut sizes = Sizes::wanted(quick);
        // A proxied connection costs the proxy 6 descriptors (two sockets,
        // two pipes); without CAP_SYS_RESOURCE the hard limit may be low.
        let fit = (nofile.saturating_sub(500) / 6) as usize;
        sizes.rss_connections = sizes.rss_connections.min(fit);
        sizes
    }

    fn wanted(quick: bool) -> Sizes {
        if quick {
            Sizes {
                overhead_rounds: 3,
                overhead_connects: 2_000,
                cost_connects: 500,
                cost_ms: 300,
                proxied_rounds: 2,
                proxied_ms: 300,
                concurrency: vec![1, 16, 256],
                bulk_rounds: 2,
                bulk_bytes: 128 << 20,
                rss_connections: 1_000,
                kernel_connections: 10_000,
                kernel_rounds: 1,
                udp_rounds: 2,
                udp_ms: 300,
                udp_concurrency: vec![1, 16],
                udp_bulk_bytes: 32 << 20,
            }
        } else {
            Sizes {
                overhead_rounds: 11,
                overhead_connects: 10_000,
                cost_connects: 5_000,
                cost_ms: 2_000,
                proxied_rounds: 9,
                proxied_ms: 1_000,
                concurrency: vec![1, 16, 256],
                bulk_rounds: 9,
                bulk_bytes: 1 << 30,
                rss_connections: 10_000,
                kernel_connections: 100_000,
                kernel_rounds: 2,
                udp_rounds: 7,
                udp_ms: 1_000,
                udp_concurrency: vec![1, 16],
                udp_bulk_bytes: 256 << 20,
            }
        }
    }
}

/// Everything measured.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    /// A smoke run.
    pub quick: bool,
    /// CPU model.
    pub cpu: String,
    /// Cores.
    pub cores: usize,
    /// Kernel release.
    pub kernel: String,
    /// Date (UTC).
    pub date: String,
    /// The descriptor limit (RLIMIT_NOFILE) the processes ran with.
    pub nofile: u64,
    /// Scenario 1.
    pub overhead: Option<Overhead>,
    /// Scenario 2, one entry per concurrency.
    pub proxied: Vec<Proxied>,
    /// Scenario 3.
    pub bulk: Option<Bulk>,
    /// Scenario 4.
    pub memory: Option<Memory>,
    /// Scenario 5.
    pub udp: Option<Udp>,
}

/// Layer overhead for connections that match no rule.
#[derive(Debug, Serialize)]
pub struct Overhead {
    /// Connections per run.
    pub connects: u64,
    /// Rate without programs (median over rounds), conn/s.
    pub bare_rate: f64,
    /// (rules, rate with programs / rate without, per round).
    pub ratios: Vec<(usize, Spread)>,
    /// BPF run time per connection at each rule count: connections no rule
    /// selects, and (with rules) connections redirected to an
    /// accept-and-close service.
    pub costs: Vec<BpfCost>,
}

/// The BPF run-time case of connections no rule selects.
pub const COST_UNSELECTED: &str = "no rule selects";
/// The BPF run-time case of connections a rule redirects to the overhead
/// scenario's accept-and-close service.
pub const COST_REDIRECTED_TO_SINK: &str = "redirected to an accept-and-close service";

/// What the layer's programs cost per connection of one kind, by the
/// kernel's statistics (run time and runs of each program while
/// statistics were on, over the connections made meanwhile).
#[derive(Debug, Serialize)]
pub struct BpfCost {
    /// Rules installed.
    pub rules: usize,
    /// Which connections ("no rule selects", ...).
    pub case: &'static str,
    /// Connections made while measuring.
    pub connections: u64,
    /// Each program that ran.
    pub programs: Vec<ProgramShare>,
}

/// One program's part of a [`BpfCost`].
#[derive(Debug, Serialize)]
pub struct ProgramShare {
    /// The program's name.
    pub program: &'static str,
    /// Runs per connection.
    pub runs: f64,
    /// Nanoseconds per run.
    pub ns_per_run: f64,
}

impl ProgramShare {
    /// Nanoseconds per connection.
    pub fn ns(&self) -> f64 {
        self.runs * self.ns_per_run
    }
}

impl BpfCost {
    /// All the layer's programs, ns per connection.
    pub fn total_ns(&self) -> f64 {
        self.programs.iter().map(ProgramShare::ns).sum()
    }

    /// Measures `work`, which returns how many connections it made.
    fn measure(
        engine: &Engine,
        rules: usize,
        case: &'static str,
        work: impl FnOnce() -> Result<u64>,
    ) -> Result<BpfCost> {
        let before = engine.program_costs()?;
        let connections = work()?;
        ensure!(
            connections > 0,
            "no connection was made for the BPF run time of {case}"
        );
        let after = engine.program_costs()?;
        let n = connections as f64;
        let programs = after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.since(b))
            .filter(|d| d.runs > 0)
            .map(|d| ProgramShare {
                program: d.program,
                runs: d.runs as f64 / n,
                ns_per_run: d.run_time.as_nanos() as f64 / d.runs as f64,
            })
            .collect();
        Ok(BpfCost {
            rules,
            case,
            connections,
            programs,
        })
    }
}

/// Per-variant figures of one run set.
#[derive(Debug, Serialize)]
pub struct VariantFigures {
    /// Variant name.
    pub name: String,
    /// conn/s (or Gbit/s for bulk), over rounds.
    pub rate: Spread,
    /// p50 connect-to-first-byte latency, µs, over rounds.
    pub p50_us: Spread,
    /// p99, µs, over rounds.
    pub p99_us: Spread,
    /// Failed connections over all rounds.
    pub errors: u64,
}

/// Small requests at one concurrency.
#[derive(Debug, Serialize)]
pub struct Proxied {
    /// Clients at once.
    pub concurrency: usize,
    /// Figures per variant.
    pub variants: Vec<VariantFigures>,
    /// connredir conn/s ÷ direct, per round.
    pub vs_direct: Spread,
    /// connredir conn/s ÷ nftables, per round.
    pub vs_nft: Spread,
    /// nftables conn/s ÷ direct, per round.
    pub nft_vs_direct: Spread,
    /// connredir with sockmap acceleration conn/s ÷ direct, per round.
    pub sockmap_vs_direct: Spread,
    /// connredir conn/s ÷ haproxy on the same layer, per round.
    pub vs_haproxy: Spread,
    /// haproxy on the layer conn/s ÷ direct, per round.
    pub haproxy_vs_direct: Spread,
    /// BPF run time per connection of the connredir path (measured at one
    /// client only).
    pub bpf_cost: Option<BpfCost>,
}

/// Bulk download through the proxy.
#[derive(Debug, Serialize)]
pub struct Bulk {
    /// Bytes per run.
    pub bytes: u64,
    /// Gbit/s per variant.
    pub variants: Vec<VariantFigures>,
    /// connredir ÷ direct.
    pub vs_direct: Spread,
    /// connredir ÷ nftables.
    pub vs_nft: Spread,
    /// nftables ÷ direct.
    pub nft_vs_direct: Spread,
    /// connredir with sockmap acceleration of both legs ÷ direct.
    pub sockmap_vs_direct: Spread,
    /// connredir with only the client-to-proxy leg accelerated ÷ direct.
    pub sockmap_client_leg_vs_direct: Spread,
    /// connredir ÷ haproxy on the same layer.
    pub vs_haproxy: Spread,
    /// haproxy on the layer ÷ direct.
    pub haproxy_vs_direct: Spread,
}

/// Memory.
#[derive(Debug, Serialize)]
pub struct Memory {
    /// Idle proxied connections held for the RSS reading.
    pub rss_connections: usize,
    /// Proxy RSS growth per idle connection (bytes): connredir path.
    pub rss_per_conn_redir: f64,
    /// The same through nftables.
    pub rss_per_conn_nft: f64,
    /// The same for haproxy on the layer.
    pub rss_per_conn_haproxy: f64,
    /// Proxy RSS before, with, and after the connections (connredir path).
    pub rss_redir: [u64; 3],
    /// The same, nftables path.
    pub rss_nft: [u64; 3],
    /// The same, haproxy on the layer.
    pub rss_haproxy: [u64; 3],
    /// Live connections held for the kernel reading.
    pub kernel_connections: usize,
    /// Rounds (direct, redirected pairs).
    pub kernel_rounds: usize,
    /// BPF map memlock sum (bytes): before, with, after (redirected).
    pub memlock: [u64; 3],
    /// Socket option memory (BPF socket storage) per connection, bytes:
    /// direct, redirected.
    pub optmem_per_conn: [f64; 2],
    /// Option memory left after the connections closed (redirected).
    pub optmem_after: u64,
    /// Slab growth per connection (bytes, median over rounds): direct,
    /// redirected.
    pub slab_per_conn: [f64; 2],
    /// Slab after closing minus before (redirected, bytes, median).
    pub slab_after_redir: f64,
    /// Hand-off entries pending while the connections were open.
    pub pending_handoffs: usize,
}

/// DNS queries at one concurrency: direct, through one service, through two.
#[derive(Debug, Serialize)]
pub struct UdpDns {
    /// Clients at once, each with one connected socket.
    pub concurrency: usize,
    /// Queries/s and latency per variant.
    pub variants: Vec<VariantFigures>,
    /// One service's queries/s ÷ direct, per round.
    pub one_vs_direct: Spread,
    /// Two services' queries/s ÷ direct, per round.
    pub two_vs_direct: Spread,
}

/// UDP through the layer and connredir-proxy.
#[derive(Debug, Serialize)]
pub struct Udp {
    /// DNS, one entry per concurrency.
    pub dns: Vec<UdpDns>,
    /// Bytes per bulk run.
    pub bulk_bytes: u64,
    /// Bytes per datagram of the bulk runs.
    pub bulk_datagram: usize,
    /// Datagrams in flight in the bulk runs.
    pub bulk_window: usize,
    /// Bulk Gbit/s per variant (direct, one service).
    pub bulk: Vec<VariantFigures>,
    /// One service's bulk ÷ direct, per round.
    pub bulk_vs_direct: Spread,
}

/// What the benchmark set up; removed on drop (fields drop in order:
/// processes, engines, namespaces, then the cgroup tree).
struct Bench {
    procs: Vec<Proc>,
    plain: Netns,
    nat: Option<Netns>,
    tree: CgroupTree,
    exe: PathBuf,
    proxy_bin: PathBuf,
}

/// haproxy on PATH (scripts/setup installs it).
fn haproxy_bin() -> Result<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("haproxy"))
                .find(|p| p.is_file())
        })
        .context("haproxy is not installed (scripts/setup installs it): the proxied, bulk and memory scenarios compare against it")
}

impl Bench {
    fn new() -> Result<Bench> {
        let exe = std::env::current_exe()?;
        let proxy_bin = exe.with_file_name("connredir-proxy");
        ensure!(
            proxy_bin.exists(),
            "{} is missing: build it first (scripts/bench does: cargo build --release -p connredir-proxy -p connredir-bench)",
            proxy_bin.display()
        );
        let pid = std::process::id();
        let tree = CgroupTree::create(&format!("connredir-bench-{pid}"))?;
        let plain = Netns::create(
            &format!("connredir-bench-{pid}-plain"),
            &["net.core.somaxconn=65535"],
        )?;
        Ok(Bench {
            procs: Vec::new(),
            plain,
            nat: None,
            tree,
            exe,
            proxy_bin,
        })
    }

    fn cgroup(&self, name: &str) -> Result<PathBuf> {
        Ok(self.tree.cgroup(name)?)
    }

    /// Starts a worker role at `place`.
    fn worker(&self, place: Place<'_>, args: &[&str]) -> Result<Proc> {
        let mut all = vec!["worker".to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        Proc::spawn(place, &self.exe, &all)
    }

    /// Starts a server that lives until the end, and waits for `ready`.
    fn server(&mut self, nat: bool, listen: &str, mode: &str) -> Result<()> {
        self.server_in("servers", nat, listen, mode)
    }

    /// A server in cgroup `group` of the tree.
    fn server_in(&mut self, group: &str, nat: bool, listen: &str, mode: &str) -> Result<()> {
        let cgroup = self.cgroup(group)?;
        let netns = if nat {
            self.nat.as_ref().context("no nat namespace")?
        } else {
            &self.plain
        };
        let place = Place {
            cgroup: &cgroup,
            netns: Some(netns),
            uid: None,
        };
        let mut proc = self.worker(place, &["server", "--listen", listen, "--mode", mode])?;
        proc.wait_line(Duration::from_secs(10), |l| l == "ready")?;
        self.procs.push(proc);
        Ok(())
    }

    /// Starts the reference proxy in `cgroup` of `netns` as [`PROXY_UID`];
    /// `standalone`: without the layer (the nftables path).
    fn proxy(&self, cgroup: &Path, netns: &Netns, standalone: bool) -> Result<Proc> {
        self.proxy_at(cgroup, netns, standalone, PROXY_ADDR)
    }

    /// [`Bench::proxy`] listening on `listen`.
    fn proxy_at(
        &self,
        cgroup: &Path,
        netns: &Netns,
        standalone: bool,
        listen: &str,
    ) -> Result<Proc> {
        let mut args: Vec<String> = [
            "--name",
            "bench",
            "--listen",
            listen,
            "--log",
            "/dev/null",
            "--idle-timeout",
            "600s",
            // The memory scenario holds 10,000 idle connections.
            "--max-connections",
            "20000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if standalone {
            args.push("--standalone".into());
        }
        let place = Place {
            cgroup,
            netns: Some(netns),
            uid: Some(PROXY_UID),
        };
        let mut proc = Proc::spawn(place, &self.proxy_bin, &args)?;
        proc.wait_line(Duration::from_secs(10), |l| l == "ready")?;
        Ok(proc)
    }

    /// Starts haproxy in `cgroup` of the plain namespace as [`PROXY_UID`],
    /// listening on `listen`, sending each connection to its original
    /// destination (`option transparent`: SO_ORIGINAL_DST, which the layer
    /// answers) and logging it, as the reference proxy does, to a file that
    /// is /dev/null. Two threads, one per core of the benchmark machine, as
    /// the reference proxy's runtime has; splice in both directions, as the
    /// reference proxy does after the bytes it inspects (`splice-auto`
    /// hardly ever spliced here: 2–3 Gbit/s in bulk against 6 always
    /// splicing); the idle timeout and (as far as the
    /// descriptor limit allows) the connection cap of the reference proxy's
    /// command line.
    fn haproxy(&self, cgroup: &Path, listen: &str) -> Result<Proc> {
        let haproxy = haproxy_bin()?;
        // The reference proxy's cap (20,000), as far as the descriptor limit
        // allows: haproxy counts two descriptors per connection and one pipe
        // (two more) per four connections for splicing, and refuses to
        // start with a cap it cannot reach.
        let maxconn = 20_000.min(sys::nofile()?.saturating_sub(500) / 3);
        let config = format!(
            "global\n  nbthread 2\n  maxconn {maxconn}\n  log stdout format raw daemon\n\
             defaults\n  mode tcp\n  log global\n  option splice-request\n  option splice-response\n  maxconn {maxconn}\n\
             \x20 timeout connect 5s\n  timeout client 600s\n  timeout server 600s\n\
             frontend inbound\n  bind {listen}\n  log-format '{HAPROXY_LOG_FORMAT}'\n\
             \x20 default_backend original\n\
             backend original\n  option transparent\n"
        );
        let path = std::env::temp_dir().join(format!(
            "connredir-bench-{}-haproxy.cfg",
            std::process::id()
        ));
        std::fs::write(&path, config).context("write the haproxy configuration")?;
        let place = Place {
            cgroup,
            netns: Some(&self.plain),
            uid: Some(PROXY_UID),
        };
        // The shell replaces itself with haproxy (same pid) once its
        // standard output, where the log goes, is /dev/null. No daemon
        // mode: the pid is haproxy's, ended by it.
        let args: Vec<String> = [
            "-c",
            "exec \"$0\" -f \"$1\" -db >/dev/null",
            &haproxy.display().to_string(),
            &path.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let proc = Proc::spawn(place, Path::new("/bin/sh"), &args)?;
        let waited = sys::wait_listening(proc.pid(), listen.parse()?, Duration::from_secs(10));
        // Read at start-up: nothing needs it any more.
        let _ = std::fs::remove_file(&path);
        waited.context("haproxy did not start listening")?;
        Ok(proc)
    }
}

/// Runs the chosen scenarios.
pub fn run_all(only: &[Scenario], quick: bool) -> Result<Results> {
    let nofile = sys::raise_nofile(400_000)?;
    let sizes = Sizes::new(quick, nofile);
    let (cpu, cores, kernel) = sys::machine();
    let mut results = Results {
        quick,
        cpu,
        cores,
        kernel,
        date: sys::today(),
        nofile,
        ..Results::default()
    };
    let mut bench = Bench::new()?;
    if only.contains(&Scenario::Overhead) {
        eprintln!("== layer overhead");
        results.overhead = Some(overhead(&mut bench, &sizes)?);
    }
    let proxied = [Scenario::Proxied, Scenario::Bulk, Scenario::Memory];
    if proxied.iter().any(|s| only.contains(s)) {
        let mut setup = ProxySetup::new(&mut bench)?;
        if only.contains(&Scenario::Proxied) {
            eprintln!("== proxied connections");
            for &c in &sizes.concurrency {
                results
                    .proxied
                    .push(proxied_small(&bench, &mut setup, &sizes, c)?);
            }
        }
        if only.contains(&Scenario::Bulk) {
            eprintln!("== bulk");
            results.bulk = Some(bulk(&bench, &setup, &sizes)?);
        }
        if only.contains(&Scenario::Memory) {
            eprintln!("== memory");
            let [rss_redir, rss_nft, rss_haproxy] = proxy_rss(&bench, &setup, &sizes)?;
            let mut memory = kernel_memory(&mut bench, &sizes, nofile)?;
            memory.rss_connections = sizes.rss_connections;
            let n = sizes.rss_connections as f64;
            memory.rss_per_conn_redir = rss_redir[1].saturating_sub(rss_redir[0]) as f64 / n;
            memory.rss_per_conn_nft = rss_nft[1].saturating_sub(rss_nft[0]) as f64 / n;
            memory.rss_per_conn_haproxy = rss_haproxy[1].saturating_sub(rss_haproxy[0]) as f64 / n;
            memory.rss_haproxy = rss_haproxy;
            memory.rss_redir = rss_redir;
            memory.rss_nft = rss_nft;
            results.memory = Some(memory);
        }
        drop(setup);
    }
    if only.contains(&Scenario::Udp) {
        eprintln!("== UDP and DNS");
        let setup = UdpSetup::new(&mut bench)?;
        results.udp = Some(udp(&bench, &setup, &sizes)?);
        drop(setup);
    }
    drop(bench);
    Ok(results)
}

/// Runs one variant's small-request load for a while (for profiling).
pub fn soak(spec: &str) -> Result<()> {
    let parts: Vec<&str> = spec.split(':').collect();
    ensure!(
        parts.len() == 3,
        "--soak wants VARIANT:CLIENTS:SECONDS or VARIANT:bulk:SECONDS"
    );
    let secs: u64 = parts[2].parse()?;
    let mut bench = Bench::new()?;
    let setup = ProxySetup::new(&mut bench)?;
    let variants = bench.bulk_variants()?;
    let v = variants
        .iter()
        .find(|v| v.name == parts[0])
        .with_context(|| format!("no variant {}", parts[0]))?;
    if parts[1] == "bulk" {
        eprintln!("soak: {} bulk downloads for {secs}s", v.name);
        let until = std::time::Instant::now() + Duration::from_secs(secs);
        while std::time::Instant::now() < until {
            check_interrupted()?;
            let gbps = bulk_run(&bench, v, 1 << 30)?;
            println!("{}: {gbps:.1} Gbit/s", v.name);
        }
        drop(setup);
        return Ok(());
    }
    let clients: usize = parts[1].parse()?;
    eprintln!("soak: {} with {clients} clients for {secs}s", v.name);
    let run = load_run(&bench, v, clients, secs * 1000)?;
    println!(
        "{}: {:.0} conn/s, p50 {} µs, p99 {} µs, {} failed",
        v.name, run.rate, run.p50_us, run.p99_us, run.errors
    );
    drop(setup);
    Ok(())
}

/// What one run of a variant gives: a rate (conn/s, queries/s, Gbit/s),
/// and where the run times requests, their latencies and failures.
trait RunFigures {
    /// The rate.
    fn rate(&self) -> f64;

    /// Whether the run times requests: without, its latencies are given
    /// as one 0.
    const TIMED: bool = false;

    /// (p50, p99) latency in µs, where the run times requests.
    fn latency(&self) -> (f64, f64) {
        (0.0, 0.0)
    }

    /// Failed requests.
    fn errors(&self) -> u64 {
        0
    }
}

/// A bulk or connect-loop run: its rate alone.
impl RunFigures for f64 {
    fn rate(&self) -> f64 {
        *self
    }
}

impl RunFigures for LoadRun {
    fn rate(&self) -> f64 {
        self.rate
    }

    const TIMED: bool = true;

    fn latency(&self) -> (f64, f64) {
        (self.p50_us, self.p99_us)
    }

    fn errors(&self) -> u64 {
        self.errors
    }
}

/// Named variants measured in interleaved rounds: each round runs every
/// variant once, the order rotated by one each round, so drift in the
/// machine's load falls on all of them alike.
struct Rounds<T> {
    names: Vec<&'static str>,
    /// Per variant, its figures in round order.
    runs: Vec<Vec<T>>,
}

impl<T: RunFigures> Rounds<T> {
    /// Measures `names` for `rounds` rounds (`measure` runs the variant at
    /// that index), printing a progress line per round after `prefix`
    /// (`describe` gives a variant's part).
    fn measure(
        prefix: &str,
        names: Vec<&'static str>,
        rounds: usize,
        mut measure: impl FnMut(usize) -> Result<T>,
        describe: impl Fn(&str, &T) -> String,
    ) -> Result<Rounds<T>> {
        let n = names.len();
        let mut runs: Vec<Vec<T>> = (0..n).map(|_| Vec::with_capacity(rounds)).collect();
        for round in 0..rounds {
            check_interrupted()?;
            let mut order: Vec<usize> = (0..n).collect();
            order.rotate_left(round % n);
            for i in order {
                runs[i].push(measure(i)?);
            }
            let line: Vec<String> = (0..n)
                .map(|i| describe(names[i], &runs[i][round]))
                .collect();
            eprintln!("  {prefix}round {round}: {}", line.join(" | "));
        }
        Ok(Rounds { names, runs })
    }

    /// Variant `name`'s rates, in round order.
    fn rates(&self, name: &str) -> Vec<f64> {
        let i = self
            .names
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("no variant {name}"));
        self.runs[i].iter().map(T::rate).collect()
    }

    /// Variant `a`'s rate ÷ variant `b`'s, per round.
    fn ratio(&self, a: &str, b: &str) -> Spread {
        Spread::of(&ratios(&self.rates(a), &self.rates(b)))
    }

    /// Each variant's figures over the rounds.
    fn figures(&self) -> Vec<VariantFigures> {
        self.names
            .iter()
            .zip(&self.runs)
            .map(|(name, runs)| {
                let latency = |pick: fn((f64, f64)) -> f64| {
                    if T::TIMED {
                        let values: Vec<f64> = runs.iter().map(|r| pick(r.latency())).collect();
                        Spread::of(&values)
                    } else {
                        Spread::of(&[0.0])
                    }
                };
                VariantFigures {
                    name: (*name).into(),
                    rate: Spread::of(&self.rates(name)),
                    p50_us: latency(|l| l.0),
                    p99_us: latency(|l| l.1),
                    errors: runs.iter().map(T::errors).sum(),
                }
            })
            .collect()
    }
}

/// What one run of a load role (`load`, `dns-load`) measured.
#[derive(Debug, Clone, Copy)]
struct LoadRun {
    /// Requests answered per second.
    rate: f64,
    /// Median latency, µs.
    p50_us: f64,
    /// 99th percentile latency, µs.
    p99_us: f64,
    /// Failed requests.
    errors: u64,
}

/// A run of a load role: which, against what, how many clients, how long.
struct LoadSpec<'a> {
    role: &'a str,
    connect: &'a str,
    concurrency: usize,
    ms: u64,
    /// What a failed request is called on stderr.
    failures: &'a str,
}

impl LoadSpec<'_> {
    /// Runs it from `place`; failures are told on stderr after `label`.
    fn measure(&self, bench: &Bench, place: Place<'_>, label: &str) -> Result<LoadRun> {
        let (c, ms_arg) = (self.concurrency.to_string(), self.ms.to_string());
        let proc = bench.worker(
            place,
            &[
                self.role,
                "--connect",
                self.connect,
                "--concurrency",
                &c,
                "--duration-ms",
                &ms_arg,
            ],
        )?;
        let r: wire::Load =
            proc.finish(Duration::from_millis(self.ms) + Duration::from_secs(60))?;
        if r.errors > 0 {
            // Quoted, as the report line has it.
            eprintln!(
                "  {label}{} failed {} (last: {:?})",
                r.errors,
                self.failures,
                r.last_error.as_deref().unwrap_or_default()
            );
        }
        let secs = r.elapsed_ns as f64 / 1e9;
        Ok(LoadRun {
            rate: r.count as f64 / secs,
            p50_us: f64::from(r.p50_us),
            p99_us: f64::from(r.p99_us),
            errors: r.errors,
        })
    }
}

/// Runs a bulk role (`bulk`, `udp-bulk`) with `args` from `place`; returns
/// Gbit/s.
fn bulk_worker(bench: &Bench, place: Place<'_>, args: &[&str]) -> Result<f64> {
    let r: wire::Bulk = bench
        .worker(place, args)?
        .finish(Duration::from_secs(120))?;
    Ok(r.bytes as f64 * 8.0 / (r.elapsed_ns as f64 / 1e9) / 1e9)
}

// ---- Scenario 1: layer overhead.

/// The overhead scenario's service: it never runs during the timed rounds
/// (no connection there matches a rule); for the BPF run time of redirected
/// connections an accept-and-close server runs as it.
const OVERHEAD_SERVICE_UID: u32 = PROXY_UID + 1;
/// The destination the overhead scenario's one rule on 127.0.0.0/8 selects
/// (its port); [`SINK_DROP`] is on another port, so no rule selects it.
const OVERHEAD_SELECTED: &str = "127.0.0.2:1";

/// The overhead scenario's configurations: a cgroup name each, and the
/// rules of its engine (none: no programs at all).
const OVERHEAD_CONFIGS: [(&str, Option<usize>); 5] = [
    ("bare", None),
    ("r0", Some(0)),
    ("r1", Some(1)),
    ("r1k", Some(1_000)),
    ("r100k", Some(100_000)),
];

/// An engine on `cgroup` with a service listening on `service` and
/// `rules` rules: one on the destination's own prefix but another port, so
/// the lookup finds a rule set and walks it; the rest elsewhere.
fn overhead_engine(cgroup: &Path, rules: usize, service: SocketAddr) -> Result<Engine> {
    let mut engine = Engine::load()?;
    engine.attach(cgroup)?;
    let id = engine.add_service(Service {
        name: "bench".into(),
        listen: vec![service],
        identity: Identity {
            uids: vec![OVERHEAD_SERVICE_UID],
            ..Default::default()
        },
        context: None,
        own_connections_by_self: true,
        accelerate: false,
        transparent: false,
        on_down: Default::default(),
    })?;
    let selected: SocketAddr = OVERHEAD_SELECTED.parse()?;
    let mut all = Vec::new();
    if rules > 0 {
        all.push(Rule {
            destinations: vec!["127.0.0.0/8".parse()?],
            ports: vec![selected.port()..=selected.port()],
            ..Rule::tcp_to(id)
        });
    }
    for i in 1..rules {
        let i = i as u32;
        all.push(Rule {
            destinations: vec![format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255).parse()?],
            ports: vec![80..=80],
            ..Rule::tcp_to(id)
        });
    }
    let started = std::time::Instant::now();
    engine.replace_rules(all)?;
    eprintln!("  {rules} rules installed in {:?}", started.elapsed());
    Ok(engine)
}

/// Runs `count` connect+close of the connect-loop role to `dst` from
/// `cgroup`; returns the elapsed time.
fn connect_loop(bench: &Bench, cgroup: &Path, dst: &str, count: u64) -> Result<Duration> {
    let place = Place {
        cgroup,
        netns: Some(&bench.plain),
        uid: None,
    };
    let count = count.to_string();
    let proc = bench.worker(
        place,
        &["connect-loop", "--connect", dst, "--count", &count],
    )?;
    let report: wire::ConnectLoop = proc.finish(Duration::from_secs(120))?;
    Ok(Duration::from_nanos(report.elapsed_ns))
}

fn overhead(bench: &mut Bench, sizes: &Sizes) -> Result<Overhead> {
    bench.server(false, SINK_DROP, "drop")?;
    // (rules, cgroup, engine, its service's address)
    let mut engines = Vec::new();
    for (i, (name, rules)) in OVERHEAD_CONFIGS.into_iter().enumerate() {
        let cgroup = bench.cgroup(name)?;
        if let Some(rules) = rules {
            let service: SocketAddr = format!("127.0.0.1:{}", 9100 + i).parse()?;
            let engine = overhead_engine(&cgroup, rules, service)?;
            engines.push((rules, cgroup, engine, service));
        }
    }
    let run = |name: &str| -> Result<f64> {
        let elapsed = connect_loop(
            bench,
            &bench.cgroup(name)?,
            SINK_DROP,
            sizes.overhead_connects,
        )?;
        Ok(sizes.overhead_connects as f64 / elapsed.as_secs_f64())
    };
    // Warm-up.
    for (name, _) in OVERHEAD_CONFIGS {
        run(name)?;
    }
    let rates = Rounds::measure(
        "",
        OVERHEAD_CONFIGS.iter().map(|c| c.0).collect(),
        sizes.overhead_rounds,
        |i| run(OVERHEAD_CONFIGS[i].0),
        |name, rate| format!("{name} {rate:.0}/s"),
    )?;
    for (_, _, engine, _) in &engines {
        ensure!(
            engine.counters()?.redirects == 0,
            "a connection matched a rule in the overhead scenario"
        );
    }
    let costs = overhead_costs(bench, sizes, &engines)?;
    drop(engines);
    Ok(Overhead {
        connects: sizes.overhead_connects,
        bare_rate: median(&rates.rates("bare")),
        ratios: OVERHEAD_CONFIGS
            .iter()
            .filter_map(|(name, rules)| Some((rules.as_ref().copied()?, rates.ratio(name, "bare"))))
            .collect(),
        costs,
    })
}

/// The BPF run time per connection of each overhead engine: connections no
/// rule selects and, where there are rules, connections redirected to an
/// accept-and-close server running as the service.
fn overhead_costs(
    bench: &Bench,
    sizes: &Sizes,
    engines: &[(usize, PathBuf, Engine, SocketAddr)],
) -> Result<Vec<BpfCost>> {
    let _stats = RunTimeStats::enable()?;
    let n = sizes.cost_connects;
    let mut costs = Vec::new();
    for (rules, cgroup, engine, service) in engines {
        costs.push(BpfCost::measure(engine, *rules, COST_UNSELECTED, || {
            connect_loop(bench, cgroup, SINK_DROP, n)?;
            Ok(n)
        })?);
        if *rules == 0 {
            continue;
        }
        let place = Place {
            cgroup,
            netns: Some(&bench.plain),
            uid: Some(OVERHEAD_SERVICE_UID),
        };
        let listen = service.to_string();
        let mut sink = bench.worker(place, &["server", "--listen", &listen, "--mode", "drop"])?;
        sink.wait_line(Duration::from_secs(10), |l| l == "ready")?;
        let before = engine.counters()?.redirects;
        let redirected = BpfCost::measure(engine, *rules, COST_REDIRECTED_TO_SINK, || {
            connect_loop(bench, cgroup, OVERHEAD_SELECTED, n)?;
            Ok(engine.counters()?.redirects - before)
        })?;
        ensure!(
            redirected.connections == n,
            "{} of {n} connections were redirected in the BPF run-time case with {rules} rules",
            redirected.connections
        );
        costs.push(redirected);
        drop(sink);
    }
    Ok(costs)
}

// ---- Scenarios 2 and 3: through the proxy.

/// The proxy paths: the engine for the connredir path, the proxies, the
/// origins, and the nftables namespace.
struct ProxySetup {
    engine: Engine,
    redir_proxy: Proc,
    nft_proxy: Proc,
    /// The sockmap variant's own engine (scope `accel`) and proxy, held for
    /// the run: dropping them detaches the programs and stops the proxy.
    accel_engine: Engine,
    #[allow(dead_code)]
    accel_proxy: Proc,
    /// haproxy's own engine (scope `hap`) and haproxy, registered as its
    /// service.
    hap_engine: Engine,
    hap_proxy: Proc,
}

/// A way for clients to reach the origin.
struct Variant {
    name: &'static str,
    cgroup: PathBuf,
    nat: bool,
    /// The origin of small requests.
    reply: &'static str,
    /// The origin of bulk downloads.
    bulk: &'static str,
}

impl Bench {
    fn variants(&self) -> Result<Vec<Variant>> {
        Ok(vec![
            Variant {
                name: "direct",
                cgroup: self.cgroup("direct")?,
                nat: false,
                reply: ORIGIN_REPLY,
                bulk: ORIGIN_BULK,
            },
            Variant {
                name: "connredir",
                cgroup: self.cgroup("redir/clients")?,
                nat: false,
                reply: ORIGIN_REPLY,
                bulk: ORIGIN_BULK,
            },
            Variant {
                name: "nftables",
                cgroup: self.cgroup("nft/clients")?,
                nat: true,
                reply: ORIGIN_REPLY,
                bulk: ORIGIN_BULK,
            },
            // connredir with sockmap acceleration of both local legs.
            Variant {
                name: "sockmap",
                cgroup: self.cgroup("accel/clients")?,
                nat: false,
                reply: ACCEL_REPLY,
                bulk: ACCEL_BULK,
            },
            // haproxy as the layer's service instead of connredir-proxy.
            Variant {
                name: "haproxy",
                cgroup: self.cgroup("hap/clients")?,
                nat: false,
                reply: ORIGIN_REPLY,
                bulk: ORIGIN_BULK,
            },
        ])
    }

    /// The variants of the bulk scenario: [`Bench::variants`], then the
    /// sockmap path with only the client-to-proxy leg accelerated.
    fn bulk_variants(&self) -> Result<Vec<Variant>> {
        let mut variants = self.variants()?;
        variants.push(Variant {
            name: "sockmap-client-leg",
            cgroup: self.cgroup("accel/clients")?,
            nat: false,
            reply: ACCEL_REPLY,
            bulk: ACCEL_CLIENT_LEG_BULK,
        });
        Ok(variants)
    }

    fn place<'a>(&'a self, v: &'a Variant) -> Place<'a> {
        Place {
            cgroup: &v.cgroup,
            netns: Some(if v.nat {
                self.nat.as_ref().expect("made by ProxySetup")
            } else {
                &self.plain
            }),
            uid: None,
        }
    }
}

/// Where variant `name` is in `variants`.
fn position(variants: &[Variant], name: &str) -> usize {
    variants
        .iter()
        .position(|v| v.name == name)
        .unwrap_or_else(|| panic!("no variant {name}"))
}

/// What runs as a redirected path's service.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ServiceProgram {
    /// The reference proxy.
    ConnredirProxy,
    /// haproxy with `option transparent`.
    Haproxy,
}

/// One redirected path: a scope cgroup `group` (with `proxy` and `clients`
/// inside) and its own engine, a service, and a rule sending the origin's
/// address and `ports` to it.
struct RedirectedPath {
    group: &'static str,
    service: &'static str,
    listen: &'static str,
    origin: &'static str,
    ports: std::ops::RangeInclusive<u16>,
    accelerate: bool,
    program: ServiceProgram,
}

impl Bench {
    /// Sets up `path`; returns its engine and its proxy.
    fn redirected_path(&self, path: RedirectedPath) -> Result<(Engine, Proc)> {
        let scope = self.cgroup(path.group)?;
        let proxy_cgroup = self.cgroup(&format!("{}/proxy", path.group))?;
        self.cgroup(&format!("{}/clients", path.group))?;
        let mut engine = Engine::load()?;
        engine.attach(&scope)?;
        let service = engine.add_service(Service {
            name: path.service.into(),
            listen: vec![path.listen.parse()?],
            identity: Identity {
                cgroups: vec![proxy_cgroup.clone()],
                ..Default::default()
            },
            context: None,
            own_connections_by_self: true,
            accelerate: path.accelerate,
            transparent: false,
            on_down: Default::default(),
        })?;
        let origin: SocketAddr = path.origin.parse()?;
        engine.add_rule(Rule {
            destinations: vec![format!("{}/32", origin.ip()).parse()?],
            ports: vec![path.ports],
            ..Rule::tcp_to(service)
        })?;
        let proxy = match path.program {
            ServiceProgram::ConnredirProxy => {
                self.proxy_at(&proxy_cgroup, &self.plain, false, path.listen)?
            }
            ServiceProgram::Haproxy => self.haproxy(&proxy_cgroup, path.listen)?,
        };
        Ok((engine, proxy))
    }
}

impl ProxySetup {
    fn new(bench: &mut Bench) -> Result<ProxySetup> {
        let pid = std::process::id();
        let nat = Netns::create(
            &format!("connredir-bench-{pid}-nat"),
            &["net.core.somaxconn=65535"],
        )?;
        let port = |a: &str| a.rsplit(':').next().unwrap().to_string();
        let rules = format!(
            "table ip connredir_bench {{\n  chain output {{\n    type nat hook output priority -100; policy accept;\n    ip daddr 127.0.0.2 tcp dport {{ {}, {}, {} }} meta skuid != {PROXY_UID} redirect to :{}\n  }}\n}}\n",
            port(ORIGIN_REPLY),
            port(ORIGIN_BULK),
            port(ORIGIN_HOLD),
            port(PROXY_ADDR)
        );
        nat.exec("nft", &["-f", "-"], Some(&rules)).context(
            "installing the nftables REDIRECT rule (is nftables installed? scripts/setup)",
        )?;
        bench.nat = Some(nat);
        for nat in [false, true] {
            bench.server(nat, ORIGIN_REPLY, "reply")?;
            bench.server(nat, ORIGIN_BULK, "bulk")?;
            bench.server(nat, ORIGIN_HOLD, "hold")?;
        }

        let (engine, redir_proxy) = bench.redirected_path(RedirectedPath {
            group: "redir",
            service: "bench-proxy",
            listen: PROXY_ADDR,
            origin: ORIGIN_REPLY,
            ports: 8080..=8082,
            accelerate: false,
            program: ServiceProgram::ConnredirProxy,
        })?;
        let nft_proxy = bench.proxy(
            &bench.cgroup("nft/proxy")?,
            bench.nat.as_ref().unwrap(),
            true,
        )?;
        // The sockmap variant: its own engine on its own scope, with the
        // origins inside that scope so both local legs can be accelerated.
        bench.server_in("accel/servers", false, ACCEL_REPLY, "reply")?;
        bench.server_in("accel/servers", false, ACCEL_BULK, "bulk")?;
        let (mut accel_engine, accel_proxy) = bench.redirected_path(RedirectedPath {
            group: "accel",
            service: "bench-proxy-sockmap",
            listen: PROXY_ACCEL_ADDR,
            origin: ACCEL_REPLY,
            ports: 8080..=8081,
            accelerate: true,
            program: ServiceProgram::ConnredirProxy,
        })?;
        // Its origin outside the scope: the origin's end never joins, so the
        // proxy-to-origin leg stays on TCP.
        bench.server(false, ACCEL_CLIENT_LEG_BULK, "bulk")?;
        let accel_service = accel_engine
            .service_by_name("bench-proxy-sockmap")
            .context("the sockmap service")?;
        let client_leg: SocketAddr = ACCEL_CLIENT_LEG_BULK.parse()?;
        accel_engine.add_rule(Rule {
            destinations: vec![format!("{}/32", client_leg.ip()).parse()?],
            ports: vec![client_leg.port()..=client_leg.port()],
            ..Rule::tcp_to(accel_service)
        })?;
        // haproxy: a path of its own, the same origins and ports as the
        // connredir variant.
        let (hap_engine, hap_proxy) = bench.redirected_path(RedirectedPath {
            group: "hap",
            service: "bench-haproxy",
            listen: HAPROXY_ADDR,
            origin: ORIGIN_REPLY,
            ports: 8080..=8082,
            accelerate: false,
            program: ServiceProgram::Haproxy,
        })?;
        Ok(ProxySetup {
            engine,
            redir_proxy,
            nft_proxy,
            accel_engine,
            accel_proxy,
            hap_engine,
            hap_proxy,
        })
    }
}

/// One load run of variant `v`'s small requests.
fn load_run(bench: &Bench, v: &Variant, concurrency: usize, ms: u64) -> Result<LoadRun> {
    let label = format!("{}: ", v.name);
    let run = LoadSpec {
        role: "load",
        connect: v.reply,
        concurrency,
        ms,
        failures: "connections",
    };
    run.measure(bench, bench.place(v), &label)
}

fn proxied_small(
    bench: &Bench,
    setup: &mut ProxySetup,
    sizes: &Sizes,
    concurrency: usize,
) -> Result<Proxied> {
    let variants = bench.variants()?;
    for v in &variants {
        load_run(bench, v, concurrency, 200)?;
    }
    let before = setup.engine.counters()?.redirects;
    let hap_before = setup.hap_engine.counters()?.redirects;
    let runs = Rounds::measure(
        &format!("c={concurrency} "),
        variants.iter().map(|v| v.name).collect(),
        sizes.proxied_rounds,
        |i| load_run(bench, &variants[i], concurrency, sizes.proxied_ms),
        |name, r| {
            format!(
                "{name} {:.0}/s p50 {}µs p99 {}µs",
                r.rate, r.p50_us, r.p99_us
            )
        },
    )?;
    ensure!(
        setup.engine.counters()?.redirects > before,
        "the connredir variant's connections were not redirected"
    );
    ensure!(
        setup.hap_engine.counters()?.redirects > hap_before,
        "the haproxy variant's connections were not redirected"
    );
    // Once, at one client: the programs' run time per redirected
    // connection, both ends (the client's socket, the socket the proxy
    // accepts, its questions for records and context, and its onward
    // socket, all in the path's scope).
    let bpf_cost = if concurrency == 1 {
        let connredir = &variants[position(&variants, "connredir")];
        let _stats = RunTimeStats::enable()?;
        let before = setup.engine.counters()?.redirects;
        Some(BpfCost::measure(
            &setup.engine,
            1,
            "redirected through the reference proxy",
            || {
                load_run(bench, connredir, 1, sizes.cost_ms)?;
                Ok(setup.engine.counters()?.redirects - before)
            },
        )?)
    } else {
        None
    };
    Ok(Proxied {
        concurrency,
        vs_direct: runs.ratio("connredir", "direct"),
        vs_nft: runs.ratio("connredir", "nftables"),
        nft_vs_direct: runs.ratio("nftables", "direct"),
        sockmap_vs_direct: runs.ratio("sockmap", "direct"),
        vs_haproxy: runs.ratio("connredir", "haproxy"),
        haproxy_vs_direct: runs.ratio("haproxy", "direct"),
        variants: runs.figures(),
        bpf_cost,
    })
}

/// One download of `bytes` by variant `v`; returns Gbit/s.
fn bulk_run(bench: &Bench, v: &Variant, bytes: u64) -> Result<f64> {
    let bytes = bytes.to_string();
    bulk_worker(
        bench,
        bench.place(v),
        &["bulk", "--connect", v.bulk, "--bytes", &bytes],
    )
}

fn bulk(bench: &Bench, setup: &ProxySetup, sizes: &Sizes) -> Result<Bulk> {
    let variants = bench.bulk_variants()?;
    for v in &variants {
        bulk_run(bench, v, 16 << 20)?;
    }
    let gbps = Rounds::measure(
        "",
        variants.iter().map(|v| v.name).collect(),
        sizes.bulk_rounds,
        |i| bulk_run(bench, &variants[i], sizes.bulk_bytes),
        |name, gbps| format!("{name} {gbps:.1} Gbit/s"),
    )?;
    let accel = setup.accel_engine.counters()?;
    eprintln!(
        "  sockmap: {} sockets joined, {} of them stayed on TCP",
        accel.accel_joined, accel.accel_passed
    );
    Ok(Bulk {
        bytes: sizes.bulk_bytes,
        vs_direct: gbps.ratio("connredir", "direct"),
        vs_nft: gbps.ratio("connredir", "nftables"),
        nft_vs_direct: gbps.ratio("nftables", "direct"),
        sockmap_vs_direct: gbps.ratio("sockmap", "direct"),
        sockmap_client_leg_vs_direct: gbps.ratio("sockmap-client-leg", "direct"),
        vs_haproxy: gbps.ratio("connredir", "haproxy"),
        haproxy_vs_direct: gbps.ratio("haproxy", "direct"),
        variants: gbps.figures(),
    })
}

// ---- Scenario 4: memory.

/// Number of open file descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Proxy RSS before, with `rss_connections` idle proxied connections, and
/// after they closed; for the connredir path, the nftables path and haproxy
/// on the layer, in that order.
fn proxy_rss(bench: &Bench, setup: &ProxySetup, sizes: &Sizes) -> Result<[[u64; 3]; 3]> {
    let variants = bench.variants()?;
    let at = |name| &variants[position(&variants, name)];
    let n = sizes.rss_connections;
    let mut out = Vec::new();
    for (v, proxy) in [
        (at("connredir"), &setup.redir_proxy),
        (at("nftables"), &setup.nft_proxy),
        (at("haproxy"), &setup.hap_proxy),
    ] {
        let pid = proxy.pid();
        let fds0 = open_fds(pid);
        let before = sys::rss(pid)?;
        let mut hold = bench.worker(
            bench.place(v),
            &["hold", "--connect", ORIGIN_HOLD, "--count", &n.to_string()],
        )?;
        hold.wait_report::<wire::HoldOpened>(Duration::from_secs(120))?;
        // Wait until the proxy holds both sockets of every connection and
        // has set up its relays (its descriptor count stops growing).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut last = (0, std::time::Instant::now());
        loop {
            check_interrupted()?;
            let fds = open_fds(pid);
            if fds != last.0 {
                last = (fds, std::time::Instant::now());
            } else if fds >= fds0 + 2 * n && last.1.elapsed() > Duration::from_millis(500) {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "{}: the proxy holds {fds} descriptors, expected at least {}",
                v.name,
                fds0 + 2 * n
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let with = sys::rss(pid)?;
        hold.tell("close")?;
        hold.finish::<wire::HoldClosed>(Duration::from_secs(60))?;
        std::thread::sleep(Duration::from_millis(1000));
        let after = sys::rss(pid)?;
        eprintln!(
            "  {} proxy RSS: {} KiB, with {n} idle connections {} KiB, after {} KiB",
            v.name,
            before >> 10,
            with >> 10,
            after >> 10
        );
        out.push([before, with, after]);
    }
    Ok([out[0], out[1], out[2]])
}

/// Kernel memory of `kernel_connections` live connections held by an
/// accept-only sink, redirected to it by the layer, against the same
/// number of direct connections.
fn kernel_memory(bench: &mut Bench, sizes: &Sizes, nofile: u64) -> Result<Memory> {
    let pid = std::process::id();
    let mem = Netns::create(
        &format!("connredir-bench-{pid}-mem"),
        &[
            "net.ipv4.ip_local_port_range=1024 65535",
            "net.core.somaxconn=65535",
        ],
    )?;
    let sink_addr = "127.0.0.1:9100";
    let attached = bench.cgroup("mem")?;
    let sink_cgroup = bench.cgroup("mem/sink")?;
    let redir_cgroup = bench.cgroup("mem/clients")?;
    let direct_cgroup = bench.cgroup("memdirect")?;
    let n = sizes.kernel_connections;
    // Each process stays well inside the descriptor limit: several sinks
    // share the address (SO_REUSEPORT), several clients share the work.
    let per_process = (nofile.saturating_sub(500) as usize).min(20_000) * 2 / 3;
    let processes = n.div_ceil(per_process).max(1);
    // The maps of the engines loaded before this one (other scenarios).
    let others = sys::maps_memlock()?;
    let mut engine = Engine::load()?;
    engine.attach(&attached)?;
    let service = engine.add_service(Service {
        name: "sink".into(),
        listen: vec![sink_addr.parse()?],
        identity: Identity {
            cgroups: vec![sink_cgroup.clone()],
            ..Default::default()
        },
        context: None,
        own_connections_by_self: true,
        accelerate: false,
        transparent: false,
        on_down: Default::default(),
    })?;
    engine.add_rule(Rule {
        destinations: vec!["127.0.0.0/8".parse()?],
        ports: vec![9..=9],
        ..Rule::tcp_to(service)
    })?;
    // The sinks start after their service is registered, so the bind
    // program marks their listeners as the service's own (a listener bound
    // earlier in another network namespace would count as down).
    let mut sinks = Vec::new();
    for _ in 0..processes + 1 {
        let mut sink = bench.worker(
            Place {
                cgroup: &sink_cgroup,
                netns: Some(&mem),
                uid: None,
            },
            &[
                "server",
                "--listen",
                sink_addr,
                "--mode",
                "hold",
                "--reuseport",
            ],
        )?;
        sink.wait_line(Duration::from_secs(10), |l| l == "ready")?;
        sinks.push(sink);
    }
    // 4 source addresses × up to 64,512 ports each.
    let sources = ["127.0.0.10", "127.0.0.11", "127.0.0.12", "127.0.0.13"];
    let mut slab = [Vec::new(), Vec::new()];
    let mut slab_after_redir = Vec::new();
    let mut optmem = [0.0; 2];
    let mut memlock = [0u64; 3];
    let mut optmem_after = 0;
    let mut pending = 0;
    for round in 0..sizes.kernel_rounds {
        for (i, redirected) in [(0, false), (1, true)] {
            check_interrupted()?;
            let (cgroup, target) = if redirected {
                (&redir_cgroup, "127.0.0.3:9")
            } else {
                (&direct_cgroup, sink_addr)
            };
            std::thread::sleep(Duration::from_millis(500));
            let slab0 = sys::slab()?;
            let lock0 = sys::maps_memlock()? - others;
            let redirects0 = engine.counters()?.redirects;
            let started = std::time::Instant::now();
            let mut holds = Vec::new();
            for p in 0..processes {
                let count = n / processes + usize::from(p < n % processes);
                let mut args = vec![
                    "hold".to_string(),
                    "--connect".into(),
                    target.into(),
                    "--count".into(),
                    count.to_string(),
                ];
                for s in sources {
                    args.push("--source".into());
                    args.push(s.into());
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                holds.push(bench.worker(
                    Place {
                        cgroup,
                        netns: Some(&mem),
                        uid: None,
                    },
                    &args,
                )?);
            }
            for hold in &mut holds {
                hold.wait_report::<wire::HoldOpened>(Duration::from_secs(300))?;
            }
            let opened_in = started.elapsed();
            std::thread::sleep(Duration::from_millis(500));
            let slab1 = sys::slab()?;
            let lock1 = sys::maps_memlock()? - others;
            let (opt, sockets) = sys::optmem(&mem)?;
            let redirected_now = engine.counters()?.redirects - redirects0;
            if redirected {
                ensure!(
                    redirected_now as usize == n,
                    "{redirected_now} of {n} connections were redirected"
                );
                pending = engine.pending_handoffs()?;
            }
            for hold in &mut holds {
                hold.tell("close")?;
            }
            for hold in holds {
                hold.finish::<wire::HoldClosed>(Duration::from_secs(120))?;
            }
            std::thread::sleep(Duration::from_millis(1500));
            let slab2 = sys::slab()?;
            let lock2 = sys::maps_memlock()? - others;
            let (opt2, _) = sys::optmem(&mem)?;
            eprintln!(
                "  round {round} {}: {n} connections in {:.1}s, {sockets} sockets; slab +{} MiB, after {:+} MiB; optmem {} KiB, after {} KiB; memlock {} / {} / {} KiB",
                if redirected { "redirected" } else { "direct" },
                opened_in.as_secs_f64(),
                (slab1 as i64 - slab0 as i64) >> 20,
                (slab2 as i64 - slab0 as i64) >> 20,
                opt >> 10,
                opt2 >> 10,
                lock0 >> 10,
                lock1 >> 10,
                lock2 >> 10,
            );
            slab[i].push((slab1 as f64 - slab0 as f64) / n as f64);
            optmem[i] = opt as f64 / n as f64;
            if redirected {
                slab_after_redir.push(slab2 as f64 - slab0 as f64);
                memlock = [lock0, lock1, lock2];
                optmem_after = opt2;
            }
        }
    }
    drop(engine);
    drop(sinks);
    drop(mem);
    Ok(Memory {
        rss_connections: 0,
        rss_per_conn_redir: 0.0,
        rss_per_conn_nft: 0.0,
        rss_per_conn_haproxy: 0.0,
        rss_redir: [0; 3],
        rss_nft: [0; 3],
        rss_haproxy: [0; 3],
        kernel_connections: n,
        kernel_rounds: sizes.kernel_rounds,
        memlock,
        optmem_per_conn: optmem,
        optmem_after,
        slab_per_conn: [median(&slab[0]), median(&slab[1])],
        slab_after_redir: median(&slab_after_redir),
        pending_handoffs: pending,
    })
}

// ---- Scenario 5: UDP and DNS.

/// The UDP paths: dnsmasq and an echo server in the plain namespace, one
/// service under its own engine (scope `udp1`), and two chained services
/// under another (scope `udp2`). Fields drop in order: the processes, then
/// the engines.
struct UdpSetup {
    /// Held for the run: dropping them stops them.
    #[allow(dead_code)]
    procs: Vec<Proc>,
    one: Engine,
    two: Engine,
}

impl Bench {
    /// Starts connredir-proxy as a UDP service on `listen` in `cgroup` (of
    /// the plain namespace, as [`PROXY_UID`]); it logs each query to
    /// /dev/null, as a service would to its log.
    fn udp_proxy(&self, cgroup: &Path, name: &str, listen: &str) -> Result<Proc> {
        let args: Vec<String> = [
            "--name",
            name,
            "--udp-listen",
            listen,
            "--log",
            "/dev/null",
            "--max-udp-flows",
            "10000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let place = Place {
            cgroup,
            netns: Some(&self.plain),
            uid: Some(PROXY_UID),
        };
        let mut proc = Proc::spawn(place, &self.proxy_bin, &args)?;
        proc.wait_line(Duration::from_secs(10), |l| l == "ready")?;
        Ok(proc)
    }

    /// An engine attached to scope `group`, with a UDP service per
    /// `(name, listen)` (each in `group/name`, priority in order) for port
    /// `ports` of the UDP origin; their proxies started.
    fn udp_path(
        &self,
        group: &str,
        services: &[(&str, &str)],
        ports: &[u16],
        procs: &mut Vec<Proc>,
    ) -> Result<Engine> {
        let scope = self.cgroup(group)?;
        self.cgroup(&format!("{group}/clients"))?;
        let mut engine = Engine::load()?;
        engine.attach(&scope)?;
        for (priority, (name, listen)) in services.iter().enumerate() {
            let cgroup = self.cgroup(&format!("{group}/{name}"))?;
            let id = engine.add_service(Service {
                name: (*name).into(),
                listen: vec![listen.parse()?],
                identity: Identity {
                    cgroups: vec![cgroup.clone()],
                    ..Default::default()
                },
                context: None,
                own_connections_by_self: true,
                accelerate: false,
                transparent: false,
                on_down: Default::default(),
            })?;
            engine.add_rule(Rule {
                protocol: Protocol::Udp,
                destinations: vec![format!("{UDP_ORIGIN_IP}/32").parse()?],
                ports: ports.iter().map(|&p| p..=p).collect(),
                priority: priority as u32 + 1,
                ..Rule::tcp_to(id)
            })?;
            procs.push(self.udp_proxy(&cgroup, name, listen)?);
        }
        Ok(engine)
    }
}

impl UdpSetup {
    fn new(bench: &mut Bench) -> Result<UdpSetup> {
        // dnsmasq binds the origin's own address (--bind-interfaces).
        bench.plain.exec(
            "ip",
            &["addr", "add", &format!("{UDP_ORIGIN_IP}/32"), "dev", "lo"],
            None,
        )?;
        let servers = bench.cgroup("udp-servers")?;
        let place = Place {
            cgroup: &servers,
            netns: Some(&bench.plain),
            uid: None,
        };
        let dnsmasq = ["/usr/sbin/dnsmasq", "/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .context("dnsmasq is not installed (scripts/setup installs dnsmasq-base)")?;
        let args: Vec<String> = [
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={UDP_ORIGIN_IP}"),
            "--port=53",
            "--pid-file=",
            "--user=nobody",
            "--group=nogroup",
            &format!("--address=/{}/192.0.2.1", crate::worker::DNS_NAME),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut procs = vec![Proc::spawn(place, dnsmasq, &args)?];
        let mut echo = bench.worker(place, &["udp-echo", "--listen", UDP_ECHO])?;
        echo.wait_line(Duration::from_secs(10), |l| l == "ready")?;
        procs.push(echo);
        let direct = bench.cgroup("udp-direct")?;
        let place = Place {
            cgroup: &direct,
            netns: Some(&bench.plain),
            uid: None,
        };
        // dnsmasq says nothing when it is ready: ask until it answers.
        let mut answered = false;
        for _ in 0..50 {
            let run = dns_run(bench, place, 1, 100)?;
            if run.rate > 0.0 && run.errors == 0 {
                answered = true;
                break;
            }
        }
        ensure!(answered, "dnsmasq does not answer on {DNS_ORIGIN}");
        let one = bench.udp_path("udp1", &[("dns-one", UDP_ONE)], &[53, 9000], &mut procs)?;
        let two = bench.udp_path(
            "udp2",
            &[
                ("dns-first", UDP_CHAIN_FIRST),
                ("dns-second", UDP_CHAIN_SECOND),
            ],
            &[53],
            &mut procs,
        )?;
        Ok(UdpSetup { procs, one, two })
    }
}

/// One DNS load run against the origin from `place`.
fn dns_run(bench: &Bench, place: Place<'_>, concurrency: usize, ms: u64) -> Result<LoadRun> {
    let run = LoadSpec {
        role: "dns-load",
        connect: DNS_ORIGIN,
        concurrency,
        ms,
        failures: "queries",
    };
    run.measure(bench, place, "")
}

/// One UDP bulk run against the echo server from `place`; returns Gbit/s
/// of data echoed.
fn udp_bulk_run(bench: &Bench, place: Place<'_>, bytes: u64) -> Result<f64> {
    let (bytes, size, window) = (
        bytes.to_string(),
        UDP_DATAGRAM.to_string(),
        UDP_WINDOW.to_string(),
    );
    bulk_worker(
        bench,
        place,
        &[
            "udp-bulk",
            "--connect",
            UDP_ECHO,
            "--bytes",
            &bytes,
            "--size",
            &size,
            "--window",
            &window,
        ],
    )
}

fn udp(bench: &Bench, setup: &UdpSetup, sizes: &Sizes) -> Result<Udp> {
    let names = ["direct", "connredir, 1 service", "connredir, 2 services"];
    let cgroups = [
        bench.cgroup("udp-direct")?,
        bench.cgroup("udp1/clients")?,
        bench.cgroup("udp2/clients")?,
    ];
    let place = |i: usize| Place {
        cgroup: &cgroups[i],
        netns: Some(&bench.plain),
        uid: None,
    };
    let before = (
        setup.one.counters()?.redirects,
        setup.two.counters()?.redirects,
    );
    let mut dns = Vec::new();
    for &concurrency in &sizes.udp_concurrency {
        for i in 0..names.len() {
            dns_run(bench, place(i), concurrency, 200)?;
        }
        let runs = Rounds::measure(
            &format!("dns c={concurrency} "),
            names.to_vec(),
            sizes.udp_rounds,
            |i| dns_run(bench, place(i), concurrency, sizes.udp_ms),
            |name, r| {
                format!(
                    "{name} {:.0} q/s p50 {}µs p99 {}µs",
                    r.rate, r.p50_us, r.p99_us
                )
            },
        )?;
        dns.push(UdpDns {
            concurrency,
            one_vs_direct: runs.ratio(names[1], names[0]),
            two_vs_direct: runs.ratio(names[2], names[0]),
            variants: runs.figures(),
        });
    }
    for i in 0..2 {
        udp_bulk_run(bench, place(i), 4 << 20)?;
    }
    let gbps = Rounds::measure(
        "bulk ",
        names[..2].to_vec(),
        sizes.udp_rounds,
        |i| udp_bulk_run(bench, place(i), sizes.udp_bulk_bytes),
        |name, gbps| format!("{name} {gbps:.2} Gbit/s"),
    )?;
    // Every query of the connredir variants was the layer's to redirect.
    let after = (
        setup.one.counters()?.redirects,
        setup.two.counters()?.redirects,
    );
    ensure!(
        after.0 > before.0 && after.1 > before.1,
        "the connredir variants' flows were not redirected"
    );
    Ok(Udp {
        dns,
        bulk_bytes: sizes.udp_bulk_bytes,
        bulk_datagram: UDP_DATAGRAM,
        bulk_window: UDP_WINDOW,
        bulk_vs_direct: gbps.ratio(names[1], names[0]),
        bulk: gbps.figures(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_rotate_the_order_and_keep_each_variants_runs() {
        let mut order = Vec::new();
        let rounds = Rounds::measure(
            "",
            vec!["a", "b", "c"],
            4,
            |i| {
                order.push(i);
                Ok((order.len() * 10 + i) as f64)
            },
            |name, rate| format!("{name} {rate}"),
        )
        .unwrap();
        assert_eq!(order, [0, 1, 2, 1, 2, 0, 2, 0, 1, 0, 1, 2]);
        // A variant's runs are its own, in round order.
        assert_eq!(rounds.rates("a"), [10.0, 60.0, 80.0, 100.0]);
        assert_eq!(rounds.rates("b"), [21.0, 41.0, 91.0, 111.0]);
        assert_eq!(rounds.ratio("b", "a").n, 4);
        assert_eq!(rounds.ratio("b", "a").max, 2.1);
    }

    #[test]
    fn figures_of_timed_and_untimed_runs() {
        let load = |rate: f64, errors| LoadRun {
            rate,
            p50_us: rate / 10.0,
            p99_us: rate,
            errors,
        };
        let mut runs = vec![load(100.0, 1), load(300.0, 0), load(200.0, 2)].into_iter();
        let timed = Rounds::measure(
            "",
            vec!["x"],
            3,
            |_| Ok(runs.next().unwrap()),
            |_, _| String::new(),
        )
        .unwrap()
        .figures();
        assert_eq!(timed.len(), 1);
        let x = &timed[0];
        assert_eq!((x.name.as_str(), x.errors), ("x", 3));
        assert_eq!(
            (x.rate.median, x.p50_us.median, x.p99_us.max),
            (200.0, 20.0, 300.0)
        );
        assert_eq!(x.p50_us.n, 3);
        // A bulk run times no requests: its latencies are one 0, as the
        // report has always had them.
        let untimed = Rounds::measure("", vec!["y"], 2, |_| Ok(5.0), |_, _| String::new())
            .unwrap()
            .figures();
        let y = &untimed[0];
        assert_eq!((y.rate.median, y.rate.n, y.errors), (5.0, 2, 0));
        assert_eq!((y.p50_us.median, y.p50_us.n, y.p99_us.n), (0.0, 1, 1));
    }
}
