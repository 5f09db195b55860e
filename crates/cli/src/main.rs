//! `connredir`: cooperative connection redirection for Linux.

mod config;
mod demo;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use connredir_engine::Engine;
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing::info;

use config::Config;

/// Sends selected outbound TCP connections to local inspection proxies
/// ("services"), and lets several proxies inspect one flow in turn without
/// loops: each connection carries redirect records naming the services that
/// already handled it.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the whole facility on this machine, on loopback only: a web
    /// server, two inspection proxies that each see the same request once,
    /// and curl; prints what each proxy saw, then removes everything.
    Demo,
    /// Attach the redirect layer as the configuration says and keep it
    /// attached until Ctrl-C or SIGTERM; everything is detached on exit.
    ///
    /// Example: connredir up --config /etc/connredir.toml
    Up {
        /// The configuration file (TOML): [scope], [[service]], [[rule]].
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a configuration file without attaching anything.
    Check {
        /// The configuration file.
        file: PathBuf,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo => demo::run(),
        Command::Check { file } => {
            let config = Config::load(&file)?;
            println!(
                "{}: ok ({} scope cgroups, {} services, {} rules)",
                file.display(),
                config.scope.cgroups.len(),
                config.services.len(),
                config.rules.len()
            );
            Ok(())
        }
        Command::Up { config } => up(&Config::load(&config)?),
    }
}

fn up(config: &Config) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
        .context("cannot install signal handlers")?;
    // Every step below may fail; dropping `engine` then detaches what was attached.
    let mut engine = Engine::load()?;
    for cgroup in &config.scope.cgroups {
        engine.attach(cgroup)?;
    }
    for service in config.services() {
        engine.add_service(service)?;
    }
    for rule in config.rules(|name| engine.service_by_name(name))? {
        engine.add_rule(rule)?;
    }
    info!(
        services = engine.services().count(),
        rules = engine.rules().count(),
        "redirect layer up; Ctrl-C to stop"
    );
    let signal = signals.forever().next();
    info!(?signal, "stopping");
    let counters = engine.counters()?;
    println!("{}", serde_json::to_string(&counters)?);
    drop(engine);
    Ok(())
}
