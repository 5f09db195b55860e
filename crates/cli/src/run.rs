//! `connredir run -- CMD`: one command, and its children, inside the scope.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use connredir_host::cgroup::{run_in_cgroup, CgroupTree};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::config::{Config, Scope};
use crate::control;
use crate::lifecycle::Places;

/// The configuration file `run` reads when neither `--scope`, `--config`
/// nor a running engine names the scope.
pub const DEFAULT_CONFIG: &str = "/etc/connredir/connredir.toml";

/// The cgroup `run` starts the command below: `scope` (a cgroup directory
/// or a systemd unit) when given; else the first scope cgroup of the
/// `config` file; else the first cgroup the running engine is attached to
/// (asked over its control socket, so the file it was started with does
/// not matter); else the first of [`DEFAULT_CONFIG`].
pub fn scope(scope: Option<String>, config: Option<&Path>, places: &Places) -> Result<PathBuf> {
    if let Some(scope) = scope {
        if scope.contains('/') {
            return Ok(PathBuf::from(scope));
        }
        let unit = Scope {
            units: vec![scope],
            ..Default::default()
        };
        return Ok(unit.resolve()?.remove(0));
    }
    if let Some(config) = config {
        return first_of(config);
    }
    let asked = control::client::status(&places.state_dir);
    match asked {
        Ok(status) => status.scopes.first().map(PathBuf::from).context(
            "the running `connredir up` is attached to no cgroup: give one with --scope CGROUP",
        ),
        Err(engine) => {
            // Only a missing engine lets the default file decide: an engine
            // that refuses us (permission) or answers wrongly is an error.
            let socket = control::socket_path(&places.state_dir);
            if socket.exists() && !is_stale(&socket) {
                return Err(engine);
            }
            let default = Path::new(DEFAULT_CONFIG);
            if default.exists() {
                return first_of(default);
            }
            bail!(
                "no scope to run in: no `connredir up` is running (no control socket at {}) \
                 and {DEFAULT_CONFIG} does not exist. Start the layer with \
                 `connredir up --config FILE`, or name the scope: \
                 `connredir run --scope CGROUP|UNIT -- COMMAND` or \
                 `connredir run --config FILE -- COMMAND`",
                socket.display()
            )
        }
    }
}

/// Whether nothing listens on the control socket file (an `up` that died
/// without removing it).
fn is_stale(socket: &Path) -> bool {
    matches!(
        std::os::unix::net::UnixStream::connect(socket),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// The first scope cgroup a configuration file names.
fn first_of(config: &Path) -> Result<PathBuf> {
    Config::load(config)?
        .scope
        .resolve()?
        .first()
        .cloned()
        .with_context(|| format!("{} names no scope cgroup", config.display()))
}

/// Runs `command` in a new cgroup below `scope` and returns the exit code to
/// pass on (128 + signal number when it was killed by a signal).
pub fn run(scope: &Path, command: &[String]) -> Result<i32> {
    let (program, args) = command.split_first().context("no command given")?;
    let tree = CgroupTree::create_in(scope, &format!("connredir-run-{}", std::process::id()))
        .with_context(|| {
            format!(
                "cannot make a cgroup in the scope {} (is it attached by `connredir up`, and are you root?)",
                scope.display()
            )
        })?;
    let mut child = Command::new(program);
    child.args(args);
    run_in_cgroup(&mut child, tree.root(), None)?;
    // Ctrl-C reaches the command through the terminal; a SIGTERM sent to
    // us is passed on. Either way we stay to remove the cgroup afterwards.
    let terminate = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(SIGTERM, Arc::clone(&terminate))?;
    signal_hook::flag::register(SIGINT, Arc::new(AtomicBool::new(false)))?;
    let mut child = child
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if terminate.swap(false, Ordering::SeqCst) {
            // SAFETY: kill has no memory-safety preconditions; the pid is our child's.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(tree);
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}
