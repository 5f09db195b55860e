//! `connredir`: cooperative connection redirection for Linux.

mod config;
mod demo;
mod lifecycle;
mod run;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

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
    /// Attach the redirect layer as the configuration says and run until
    /// Ctrl-C or SIGTERM. Maps and links are pinned in bpffs, so the layer
    /// stays attached when `up` stops or restarts (a new `up` takes over
    /// without a gap); `connredir down` removes it.
    ///
    /// Example: connredir up --config /etc/connredir.toml
    Up {
        /// The configuration file (TOML): [scope], [[service]], [[rule]].
        #[arg(long, short)]
        config: PathBuf,
        #[command(flatten)]
        places: lifecycle::Places,
    },
    /// Stop a running `up` and remove everything it attached and pinned.
    Down {
        #[command(flatten)]
        places: lifecycle::Places,
    },
    /// Run a command with its connections going through the redirect layer:
    /// it and its children run in a fresh cgroup inside the scope (so it
    /// works for statically linked programs too), removed when it ends.
    /// Exits with the command's status.
    ///
    /// Example: connredir run -- curl https://example.com/
    Run {
        /// The scope cgroup to run in (default: the first of the
        /// configuration's [scope] cgroups).
        #[arg(long)]
        scope: Option<PathBuf>,
        /// The configuration file that names the scope.
        #[arg(long, short, default_value = "/etc/connredir/connredir.toml")]
        config: PathBuf,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
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
        Command::Up { config, places } => lifecycle::up(&Config::load(&config)?, &places),
        Command::Down { places } => lifecycle::down(&places),
        Command::Run {
            scope,
            config,
            command,
        } => {
            let scope = match scope {
                Some(scope) => scope,
                None => Config::load(&config)?
                    .scope
                    .cgroups
                    .first()
                    .cloned()
                    .context("the configuration names no scope cgroup")?,
            };
            let status = run::run(&scope, &command)?;
            std::process::exit(status);
        }
    }
}
