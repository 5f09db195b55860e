//! The benchmark runs: a quick layer-overhead round set (a few seconds),
//! nothing written. Needs root and cgroup v2, like the end-to-end tests:
//! skipped without them, except in CI (`CI=true`), where that fails.

use std::process::Command;

use serde::Deserialize;

#[test]
fn quick_overhead_run() {
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("it needs root")
    } else if connredir_host::cgroup::cgroup2_root().is_none() {
        Some("it needs cgroup v2")
    } else {
        None
    };
    if let Some(why) = why {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the benchmark smoke test cannot run in CI because {why}"
        );
        eprintln!("SKIPPED quick_overhead_run: {why}");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_connredir-bench"))
        .args(["--quick", "--only", "overhead", "--no-write"])
        .output()
        .expect("start connredir-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "connredir-bench failed: {stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let results: Results = serde_json::from_str(&stdout).expect("the results as JSON on stdout");
    let overhead = results.overhead.expect("the overhead scenario");
    let rules: Vec<usize> = overhead.ratios.iter().map(|r| r.0).collect();
    assert_eq!(rules, [0, 1, 1_000, 100_000], "{stdout}");
    for r in &overhead.ratios {
        let median = r.1.median.expect("a median");
        assert!(median > 0.0 && median.is_finite(), "{r:?}");
    }
    // The BPF run time: each rule count's unselected connections, and with
    // rules its redirected ones; every connection met connect4 once, and a
    // redirected one the sockops program at both ends.
    assert_eq!(overhead.costs.len(), 7, "{stdout}");
    for cost in &overhead.costs {
        assert!(cost.connections > 0, "{cost:?}");
        let runs = |name: &str| {
            cost.programs
                .iter()
                .find(|p| p.program == name)
                .map_or(0.0, |p| p.runs)
        };
        assert_eq!(runs("connredir_connect4"), 1.0, "{cost:?}");
        let least_sockops = if cost.case.starts_with("redirected") {
            8.0
        } else {
            4.0
        };
        assert!(runs("connredir_sockops") >= least_sockops, "{cost:?}");
        assert!(cost.programs.iter().all(|p| p.ns_per_run > 0.0), "{cost:?}");
    }
}

// The parts of the results (`Results` in src/scenarios.rs) this test reads.
// The benchmark is a program, not a library, so its own types cannot be
// imported here; serde ignores the fields left out.

/// The results the benchmark prints.
#[derive(Debug, Deserialize)]
struct Results {
    /// Scenario 1, when it ran.
    overhead: Option<Overhead>,
}

/// The layer-overhead figures.
#[derive(Debug, Deserialize)]
struct Overhead {
    /// (rules, rate with programs / rate without).
    ratios: Vec<(usize, Spread)>,
    /// The BPF run time per connection of each case.
    costs: Vec<BpfCost>,
}

/// One case's BPF run time.
#[derive(Debug, Deserialize)]
struct BpfCost {
    /// Which connections.
    case: String,
    /// How many were made.
    connections: u64,
    /// Each program that ran.
    programs: Vec<ProgramShare>,
}

/// One program's runs and time per run.
#[derive(Debug, Deserialize)]
struct ProgramShare {
    program: String,
    runs: f64,
    ns_per_run: f64,
}

/// A ratio over rounds.
#[derive(Debug, Deserialize)]
struct Spread {
    /// `null` when there were no rounds (serde_json writes NaN so).
    median: Option<f64>,
}
