//! `connredir-bench`: side-by-side benchmarks of the redirect layer and the
//! reference proxy, written to `BENCHMARKS.md` and a plot.
//!
//! Every figure is a ratio of runs interleaved in the same process run (A B
//! A B, the order rotated each round), quoted as the median over rounds with
//! its spread, so the noise of a shared machine cancels out of the ratio.
//!
//! Everything runs on loopback inside network namespaces the benchmark makes
//! (`ip netns add`), in a cgroup tree it makes under the cgroup v2 root;
//! programs are attached only to cgroups of that tree. At the end, on
//! failure and on Ctrl-C, the processes it started are ended by their pid,
//! the programs detached, the nftables rules go with their namespace, and
//! the tree and namespaces are removed.

mod plot;
mod report;
mod scenarios;
mod stats;
mod sys;
mod wire;
mod worker;

use std::path::PathBuf;

use anyhow::{ensure, Result};
use clap::{Parser, ValueEnum};

/// The command line.
#[derive(Debug, Parser)]
#[command(
    version,
    about = "Benchmarks connredir side by side with direct connections and nftables REDIRECT (needs root and cgroup v2)."
)]
struct Cli {
    /// Smoke run: few short rounds, small counts (about half a minute).
    #[arg(long)]
    quick: bool,
    /// Only these scenarios (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Where the report goes.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Where the plot goes.
    #[arg(long, default_value = "benchmarks.svg")]
    plot: PathBuf,
    /// Print the results only; write no report or plot.
    #[arg(long)]
    no_write: bool,
    /// Instead of the scenarios: run one variant's small-request load for a
    /// while (VARIANT:CLIENTS:SECONDS, e.g. connredir:16:10), to profile it
    /// from outside (perf record -a).
    #[arg(long, value_name = "VARIANT:CLIENTS:SECONDS")]
    soak: Option<String>,
    #[command(subcommand)]
    worker: Option<WorkerCommand>,
}

#[derive(Debug, clap::Subcommand)]
enum WorkerCommand {
    /// Internal: a process the benchmark starts inside its cgroups.
    #[command(hide = true)]
    Worker {
        #[command(subcommand)]
        role: worker::Role,
    },
}

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// Connect+close rate with 0, 1, 1,000 and 100,000 rules.
    Overhead,
    /// Small requests through the proxy: conn/s and latency.
    Proxied,
    /// Bulk download through the proxy.
    Bulk,
    /// Proxy RSS per idle connection; kernel memory per live connection.
    Memory,
    /// DNS queries through one and two UDP services, and UDP bulk through
    /// one, against direct.
    Udp,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(WorkerCommand::Worker { role }) = cli.worker {
        return worker::run(role);
    }
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the benchmark needs root: it attaches BPF programs, makes cgroups and network namespaces"
    );
    sys::catch_interrupts();
    let only = if cli.only.is_empty() {
        vec![
            Scenario::Overhead,
            Scenario::Proxied,
            Scenario::Bulk,
            Scenario::Memory,
            Scenario::Udp,
        ]
    } else {
        cli.only.clone()
    };
    if let Some(soak) = &cli.soak {
        return scenarios::soak(soak);
    }
    let results = scenarios::run_all(&only, cli.quick)?;
    println!("{}", serde_json::to_string_pretty(&results)?);
    if !cli.no_write {
        report::write(&cli.out, &results)?;
        plot::write(&cli.plot, &results)?;
        println!("wrote {} and {}", cli.out.display(), cli.plot.display());
    }
    Ok(())
}
