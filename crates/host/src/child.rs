//! Child processes started inside a cgroup (optionally as another user),
//! whose output lines are collected, that are waited for with a time limit,
//! and that are ended by their pid when dropped.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cgroup::run_in_cgroup;
use crate::Error;

/// How often waiting looks again.
const POLL: Duration = Duration::from_millis(5);

/// The lines a child printed, filled by a reader thread.
#[derive(Default)]
struct Output {
    lines: Mutex<Vec<String>>,
    /// Set once the child's stdout is closed: no line comes any more.
    ended: AtomicBool,
}

/// A child process started in a cgroup. Its stdout is read line by line
/// into a list; its stdin is a pipe when the command asked for one. On drop
/// a child still running is killed (SIGKILL, by its pid) and reaped.
pub struct ChildProcess {
    child: std::process::Child,
    stdin: Option<ChildStdin>,
    output: Arc<Output>,
    reader: Option<JoinHandle<()>>,
}

impl ChildProcess {
    /// Starts `command` inside `cgroup` and, with `uid`, as that user and
    /// group (see [`run_in_cgroup`]). Its stdout is piped and collected;
    /// everything else (arguments, stdin, stderr, further `pre_exec` steps)
    /// is as the caller set it on `command`.
    pub fn spawn(command: &mut Command, cgroup: &Path, uid: Option<u32>) -> Result<Self, Error> {
        command.stdout(Stdio::piped());
        run_in_cgroup(command, cgroup, uid)?;
        let mut child = command.spawn().map_err(|source| Error::Spawn {
            program: command.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stdin = child.stdin.take();
        let output = Arc::new(Output::default());
        let sink = Arc::clone(&output);
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(line) => sink.lines.lock().unwrap().push(line),
                    Err(_) => break,
                }
            }
            sink.ended.store(true, Ordering::SeqCst);
        });
        Ok(ChildProcess {
            child,
            stdin,
            output,
            reader: Some(reader),
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The lines it printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.output.lines.lock().unwrap().clone()
    }

    /// The first line printed so far that satisfies `pred`.
    pub fn find_line(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.output
            .lines
            .lock()
            .unwrap()
            .iter()
            .find(|l| pred(l))
            .cloned()
    }

    /// Waits at most `limit` for a printed line satisfying `pred`. Fails as
    /// soon as the child closed its output without printing one.
    pub fn wait_line(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> Result<String, Error> {
        let deadline = Instant::now() + limit;
        loop {
            // Read before looking, so a line printed just before the end counts.
            let ended = self.output.ended.load(Ordering::SeqCst);
            if let Some(line) = self.find_line(&pred) {
                return Ok(line);
            }
            if ended {
                return Err(Error::OutputEnded { pid: self.pid() });
            }
            if Instant::now() > deadline {
                return Err(Error::LineTimeout {
                    pid: self.pid(),
                    limit,
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// Writes `line` and a newline to its stdin (which must be piped).
    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("stdin is not a pipe"))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()
    }

    /// Its exit status, if it has exited (reaping it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, Error> {
        let pid = self.pid();
        self.child
            .try_wait()
            .map_err(|source| Error::Wait { pid, source })
    }

    /// Waits at most `limit` for it to exit; once it has, every line it
    /// printed has been read. A child still running after `limit` is left
    /// running (and is killed on drop).
    pub fn wait_timeout(&mut self, limit: Duration) -> Result<ExitStatus, Error> {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                return Err(Error::StillRunning {
                    pid: self.pid(),
                    limit,
                });
            }
            std::thread::sleep(POLL);
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        Ok(status)
    }

    /// Sends `signal` to it, by its pid (while it has not been reaped, the
    /// pid is still its own).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: kill has no memory-safety preconditions.
        if unsafe { libc::kill(self.pid() as libc::pid_t, signal) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Kills it with SIGKILL (by its pid) and reaps it.
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.child.kill()?;
        self.child.wait().map(drop)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cgroup this test process is in: moving a child there changes
    /// nothing, so the tests need no cgroup of their own.
    fn own_cgroup() -> Option<std::path::PathBuf> {
        let cgroup = crate::procfs::process_cgroup(std::process::id())?;
        // Writing cgroup.procs needs the right to; skip where it is missing.
        let writable = std::fs::OpenOptions::new()
            .write(true)
            .open(cgroup.join("cgroup.procs"))
            .is_ok();
        writable.then_some(cgroup)
    }

    #[test]
    fn lines_are_collected_and_waited_for() {
        let Some(cgroup) = own_cgroup() else {
            eprintln!("SKIPPED: this process's cgroup is not writable");
            return;
        };
        let mut command = Command::new("sh");
        command
            .args(["-c", "echo one; read x; echo \"got $x\""])
            .stdin(Stdio::piped());
        let mut child = ChildProcess::spawn(&mut command, &cgroup, None).unwrap();
        assert_eq!(
            child
                .wait_line(Duration::from_secs(10), |l| l == "one")
                .unwrap(),
            "one"
        );
        child.write_line("two").unwrap();
        let status = child.wait_timeout(Duration::from_secs(10)).unwrap();
        assert!(status.success());
        assert_eq!(child.lines(), ["one", "got two"]);
        assert!(matches!(
            child.wait_line(Duration::from_secs(10), |l| l == "three"),
            Err(Error::OutputEnded { .. })
        ));
    }

    #[test]
    fn a_running_child_times_out_and_is_killed() {
        let Some(cgroup) = own_cgroup() else {
            eprintln!("SKIPPED: this process's cgroup is not writable");
            return;
        };
        let mut command = Command::new("sleep");
        command.arg("30").stdin(Stdio::null());
        let mut child = ChildProcess::spawn(&mut command, &cgroup, None).unwrap();
        assert!(matches!(
            child.wait_line(Duration::from_millis(50), |_| true),
            Err(Error::LineTimeout { .. })
        ));
        assert!(matches!(
            child.wait_timeout(Duration::from_millis(50)),
            Err(Error::StillRunning { .. })
        ));
        child.kill().unwrap();
        assert!(child.try_wait().unwrap().is_some());
    }
}
