//! Connect overhead of the redirect layer for connections that match no rule.
//!
//! Three cgroups side by side: one with no programs, one attached with 1
//! rule, one attached with 1,000 rules (each rule set has a rule on the
//! destination's own prefix, for another port, so the lookup finds a set and
//! walks it). A child process in each cgroup opens and closes connections to a
//! loopback listener; rounds are interleaved, and each round's rate is divided
//! by the same round's rate without programs. Prints the median ratio and its
//! spread. Needs root and cgroup v2.
//!
//! cargo bench -p connredir-testkit --bench connect_overhead

use std::net::TcpListener;

use anyhow::{Context, Result};
use connredir_engine::{Engine, Identity, Rule, Service};
use connredir_testkit::{free_addr, require_privileges, test_tree, CgroupTree, Proc};

const ROUNDS: usize = 21;
const CONNECTS: u64 = 20_000;

fn engine_with_rules(tree: &CgroupTree, name: &str, rules: usize) -> Result<Engine> {
    let mut engine = Engine::load()?;
    engine.attach(tree.cgroup(name)?)?;
    let id = engine.add_service(Service {
        name: "bench".into(),
        listen: vec![free_addr("127.0.0.1")],
        identity: Identity {
            uids: vec![4244],
            ..Default::default()
        },
        context: None,
        own_connections_by_self: true,
        accelerate: false,
    })?;
    // One rule on the destination's prefix, but for another port.
    engine.add_rule(Rule {
        destinations: vec!["127.0.0.0/8".parse()?],
        ports: vec![1..=1],
        ..Rule::tcp_to(id)
    })?;
    for i in 1..rules {
        engine.add_rule(Rule {
            destinations: vec![format!("10.{}.{}.0/24", i / 256, i % 256).parse()?],
            ports: vec![80..=80],
            ..Rule::tcp_to(id)
        })?;
    }
    Ok(engine)
}

fn rate(tree: &CgroupTree, cgroup: &str, addr: &str) -> Result<f64> {
    let proc = Proc::spawn(
        &tree.cgroup(cgroup)?,
        None,
        &[
            "connect-loop",
            "--connect",
            addr,
            "--count",
            &CONNECTS.to_string(),
        ],
    )?;
    let (status, lines) = proc.finish()?;
    anyhow::ensure!(status.success(), "connect-loop failed: {lines:?}");
    let report: serde_json::Value = serde_json::from_str(lines.last().context("no report")?)?;
    let ns = report["elapsed_ns"].as_u64().context("elapsed_ns")? as f64;
    Ok(CONNECTS as f64 / (ns / 1e9))
}

fn summary(mut ratios: Vec<f64>) -> String {
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];
    format!(
        "median {median:.3}x  (min {:.3}, max {:.3}, {} rounds)",
        ratios[0],
        ratios[ratios.len() - 1],
        ratios.len()
    )
}

fn main() -> Result<()> {
    if !require_privileges("connect_overhead") {
        return Ok(());
    }
    // A deep backlog: an overflowing accept queue drops SYNs, and a dropped
    // SYN costs a one-second retransmit that would swamp the measurement.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&"127.0.0.2:0".parse::<std::net::SocketAddr>()?.into())?;
    socket.listen(4096)?;
    let listener: TcpListener = socket.into();
    let addr = listener.local_addr()?.to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let tree = test_tree("bench")?;
    tree.cgroup("bare")?;
    let one = engine_with_rules(&tree, "one", 1)?;
    let thousand = engine_with_rules(&tree, "thousand", 1000)?;

    let (mut r1, mut r1000, mut bare_rates) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Rotate the order so no configuration always runs first.
        let mut order = ["bare", "one", "thousand"];
        order.rotate_left(round % 3);
        let mut rates = std::collections::HashMap::new();
        for cgroup in order {
            rates.insert(cgroup, rate(&tree, cgroup, &addr)?);
        }
        bare_rates.push(rates["bare"]);
        r1.push(rates["one"] / rates["bare"]);
        r1000.push(rates["thousand"] / rates["bare"]);
    }
    let redirects = one.counters()?.redirects + thousand.counters()?.redirects;
    anyhow::ensure!(redirects == 0, "no connection should have been redirected");
    bare_rates.sort_by(f64::total_cmp);
    println!("connect+close, no rule matching, {CONNECTS} connections per run, interleaved rounds");
    println!(
        "  no programs: median {:.0} conn/s",
        bare_rates[bare_rates.len() / 2]
    );
    println!("  1 rule:      {}", summary(r1));
    println!("  1000 rules:  {}", summary(r1000));
    drop((one, thousand));
    Ok(())
}
