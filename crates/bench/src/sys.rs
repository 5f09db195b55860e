//! The privileged plumbing of the benchmark: network namespaces it creates
//! and deletes, child processes started inside a cgroup (and a namespace)
//! that are ended by their pid, the file-descriptor limit, Ctrl-C, and
//! memory readings from /proc.

use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use connredir_host::child::ChildProcess;

use crate::wire::{self, Report};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM set a flag that [`check_interrupted`] turns into
/// an error, so the benchmark unwinds and its guards remove what it made.
pub fn catch_interrupts() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Fails once Ctrl-C (or SIGTERM) was received.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Raises RLIMIT_NOFILE to `want` (soft and hard) where allowed, else the
/// soft limit to the hard one; children inherit it. Returns the limit now
/// in force. Raising the hard limit needs CAP_SYS_RESOURCE.
pub fn raise_nofile(want: u64) -> Result<u64> {
    let limit = libc::rlimit {
        rlim_cur: want,
        rlim_max: want,
    };
    // SAFETY: setrlimit/getrlimit with valid structs.
    unsafe {
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
            return Ok(want);
        }
        let mut now = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) != 0 {
            return Err(std::io::Error::last_os_error()).context("reading RLIMIT_NOFILE");
        }
        now.rlim_cur = now.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &now) != 0 {
            return Err(std::io::Error::last_os_error()).context("raising RLIMIT_NOFILE");
        }
        Ok(now.rlim_max)
    }
}

/// The soft RLIMIT_NOFILE this process (and so each child) runs with.
pub fn nofile() -> Result<u64> {
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading RLIMIT_NOFILE");
    }
    Ok(now.rlim_cur)
}

/// Runs a command to completion, failing with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    run_input(program, args, None)
}

/// Runs a command with `input` on its stdin.
pub fn run_input(program: &str, args: &[&str], input: Option<&str>) -> Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program} (is it installed? scripts/setup)"))?;
    let mut stdin = child.stdin.take().expect("piped");
    if let Some(input) = input {
        stdin.write_all(input.as_bytes())?;
    }
    drop(stdin);
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Output of a command (stdout), failing with its stderr.
pub fn output(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("starting {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace made by the benchmark (`ip netns add`), with its
/// loopback up; deleted on drop.
pub struct Netns {
    name: String,
    file: File,
}

impl Netns {
    /// Creates `name`, brings `lo` up and applies `sysctls` (key=value).
    pub fn create(name: &str, sysctls: &[&str]) -> Result<Netns> {
        run("ip", &["netns", "add", name])?;
        let file = File::open(format!("/run/netns/{name}"));
        let netns = Netns {
            name: name.to_string(),
            file: match file {
                Ok(file) => file,
                Err(e) => {
                    let _ = run("ip", &["netns", "del", name]);
                    return Err(e).context("opening the new network namespace");
                }
            },
        };
        run("ip", &["-n", name, "link", "set", "lo", "up"])?;
        for setting in sysctls {
            run(
                "ip",
                &["netns", "exec", name, "sysctl", "-q", "-w", setting],
            )?;
        }
        Ok(netns)
    }

    /// Runs `program args` inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str], input: Option<&str>) -> Result<()> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run_input("ip", &all, input)
    }

    /// Output of `program args` run inside the namespace.
    pub fn output(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        output("ip", &all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!(
                "warning: could not delete network namespace {}: {e:#}",
                self.name
            );
        }
    }
}

/// Where and as whom a child runs.
#[derive(Clone, Copy)]
pub struct Place<'a> {
    /// The cgroup (v2 directory) it starts in.
    pub cgroup: &'a Path,
    /// The network namespace, if not the benchmark's own.
    pub netns: Option<&'a Netns>,
    /// Run as this uid (and gid), else as root.
    pub uid: Option<u32>,
}

/// A child process started by the benchmark; killed by its pid on drop.
/// Lines it prints are collected; its stdin is a pipe.
pub struct Proc {
    child: ChildProcess,
    what: String,
}

impl Proc {
    /// Starts `program args` at `place`.
    pub fn spawn(place: Place<'_>, program: &Path, args: &[String]) -> Result<Proc> {
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::piped());
        if let Some(netns) = place.netns {
            let fd = netns.file.as_raw_fd();
            // SAFETY: setns is a plain system call on an fd opened before
            // the fork. It runs before the cgroup move and the uid change.
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let what = format!(
            "{} {}",
            program.file_name().unwrap_or_default().to_string_lossy(),
            args.first().map(String::as_str).unwrap_or("")
        );
        let child = ChildProcess::spawn(&mut command, place.cgroup, place.uid)
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Proc { child, what })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Waits (up to `limit`) for a line satisfying `pred`.
    pub fn wait_line(&mut self, limit: Duration, pred: impl Fn(&str) -> bool) -> Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.child.find_line(&pred) {
                return Ok(line);
            }
            check_interrupted()?;
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited ({status}) early", self.what);
            }
            if Instant::now() > deadline {
                bail!("{}: timed out after {limit:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the worker's first report, of type `R`.
    pub fn wait_report<R: Report>(&mut self, limit: Duration) -> Result<R> {
        let line = self.wait_line(limit, wire::is_report)?;
        Ok(R::from_line(&line)?)
    }

    /// Writes a line to its stdin.
    pub fn tell(&mut self, line: &str) -> Result<()> {
        self.child.write_line(line).context("stdin closed")
    }

    /// Waits (up to `limit`) for it to exit successfully; returns its last
    /// report, of type `R`.
    pub fn finish<R: Report>(mut self, limit: Duration) -> Result<R> {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            check_interrupted()?;
            if Instant::now() > deadline {
                bail!("{} did not finish in {limit:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        // It has exited: this only waits for the last of its output.
        self.child.wait_timeout(Duration::ZERO)?;
        ensure!(status.success(), "{} failed ({status})", self.what);
        let lines = self.child.lines();
        let line = lines
            .iter()
            .rev()
            .find(|l| wire::is_report(l))
            .with_context(|| format!("{} printed no report", self.what))?;
        Ok(R::from_line(line)?)
    }
}

/// Waits (up to `limit`) until process `pid` has a TCP socket listening on
/// `addr`, read from the process's own view of the TCP tables (its network
/// namespace), so that no probe connection is counted as a client; fails
/// early when the process has ended.
pub fn wait_listening(pid: u32, addr: SocketAddr, limit: Duration) -> Result<()> {
    let (table, local) = match addr {
        SocketAddr::V4(a) => (
            "tcp",
            format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(a.ip().octets()),
                a.port()
            ),
        ),
        SocketAddr::V6(_) => bail!("{addr}: only IPv4 listeners are looked for"),
    };
    let deadline = Instant::now() + limit;
    loop {
        check_interrupted()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))
            .with_context(|| format!("process {pid} has ended"))?;
        // Columns: sl local_address rem_address st ...; st 0A is LISTEN.
        let listening = text.lines().skip(1).any(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.len() > 3 && cols[1] == local && cols[3] == "0A"
        });
        if listening {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "nothing listens on {addr} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resident set size of a process, in bytes (VmRSS).
pub fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status_kib(&status, "VmRSS:").map(|k| k * 1024)
}

fn status_kib(text: &str, key: &str) -> Result<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key}"))
}

/// Kernel slab memory (/proc/meminfo Slab), in bytes.
pub fn slab() -> Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    status_kib(&info, "Slab:").map(|k| k * 1024)
}

/// Sum of `memlock` over the BPF maps this process holds (fdinfo).
pub fn maps_memlock() -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc/self/fdinfo")? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        if !text.contains("map_type:") {
            continue;
        }
        if let Some(v) = text
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            total += v;
        }
    }
    Ok(total)
}

/// The socket option memory (`optmem`, where per-socket BPF storage is
/// charged) of every TCP socket in `netns`, summed, and the socket count.
pub fn optmem(netns: &Netns) -> Result<(u64, u64)> {
    let text = netns.output("ss", &["-t", "-a", "-n", "-m", "-H"])?;
    let (mut total, mut sockets) = (0u64, 0u64);
    for line in text.lines() {
        if let Some(start) = line.find("skmem:(") {
            sockets += 1;
            let fields = &line[start + 7..];
            let fields = &fields[..fields.find(')').unwrap_or(fields.len())];
            for field in fields.split(',') {
                if let Some(v) = field.strip_prefix('o') {
                    total += v.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    Ok((total, sockets))
}

/// CPU model, core count and kernel of this machine.
pub fn machine() -> (String, usize, String) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    (cpu, cores, kernel)
}

/// Today's date (UTC) as YYYY-MM-DD.
pub fn today() -> String {
    // RFC 3339 begins with the calendar date: "YYYY-MM-DDThh:mm:ssZ".
    let mut stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    stamp.truncate("YYYY-MM-DD".len());
    stamp
}
