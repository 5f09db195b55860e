//! `connredir run -- CMD`: one command, and its children, inside the scope.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use connredir_host::cgroup::{run_in_cgroup, CgroupTree};
use signal_hook::consts::{SIGINT, SIGTERM};

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
