//! Test support for connredir's privileged integration tests.
//!
//! Every test makes its own cgroup tree under the cgroup v2 root, places the
//! processes it starts in it, and removes all of it when the test ends, on
//! failure too. Programs are never attached to the root cgroup.

#![warn(missing_docs)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use connredir_engine::{Engine, Identity, Protocol, Rule, Service, ServiceId};
use connredir_host::child::ChildProcess;
use serde_json::Value;

pub mod http_world;

/// Path of the test-role binary built with this crate.
pub fn testkit_bin() -> PathBuf {
    workspace_bin("connredir-testkit")
}

/// Path of a binary of the workspace: cargo puts binaries in the directory
/// above the test executables (`target/<profile>/deps/..`). Binaries of
/// other packages are there after `cargo build --workspace`.
///
/// Tests run some of them as an unprivileged user, who cannot reach them
/// when the checkout sits in a private directory (a home directory of mode
/// 0700): then the binary is copied once into a directory every user can
/// read, removed when the test process exits.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` before the tests (scripts/test does)",
        path.display()
    );
    if readable_by_everyone(&path) {
        path
    } else {
        shared_copy(&path)
    }
}

/// Whether any user may run `path`: every directory above it searchable by
/// others, the file itself readable and executable by others.
fn readable_by_everyone(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode())
            .unwrap_or(0)
    };
    mode(path) & 0o005 == 0o005
        && path
            .ancestors()
            .skip(1)
            .filter(|p| !p.as_os_str().is_empty())
            .all(|dir| mode(dir) & 0o001 != 0)
}

/// A copy of `binary` in this process's world-readable directory.
fn shared_copy(binary: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    static COPYING: Mutex<()> = Mutex::new(());
    let dir = DIR.get_or_init(|| {
        let dir = PathBuf::from(format!("/tmp/connredir-testkit-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for shared binaries");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("make the shared binary directory readable");
        extern "C" fn remove_shared_dir() {
            let _ = std::fs::remove_dir_all(format!(
                "/tmp/connredir-testkit-bin-{}",
                std::process::id()
            ));
        }
        // SAFETY: the handler only removes a directory; registering it has
        // no other effect.
        unsafe { libc::atexit(remove_shared_dir) };
        dir
    });
    let copy = dir.join(binary.file_name().expect("a file name"));
    let _guard = COPYING.lock().unwrap();
    if !copy.exists() {
        let partial = copy.with_extension("partial");
        std::fs::copy(binary, &partial).expect("copy a binary where every user can run it");
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))
            .expect("make the copy executable");
        std::fs::rename(&partial, &copy).expect("put the copy in place");
    }
    copy
}

/// Decides whether a privileged test can run here. In CI (`CI=true`) a
/// missing privilege is a failure; elsewhere the test is skipped, saying why.
/// Returns false when the test should return early (skip).
pub fn require_privileges(test: &str) -> bool {
    let why = if unsafe { libc::geteuid() } != 0 {
        Some("it needs root")
    } else if cgroup2_root().is_none() {
        Some("it needs cgroup v2 mounted")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: cannot run in CI because {why}")
        }
        Some(why) => {
            eprintln!("SKIPPED {test}: {why} (run the tests as root with cgroup v2)");
            false
        }
    }
}

pub use connredir_host::cgroup::{cgroup2_root, CgroupTree};

/// The cgroup tree of one test: `<cgroup2 root>/connredir-test-<name>-<pid>`.
pub fn test_tree(name: &str) -> Result<CgroupTree> {
    Ok(CgroupTree::create(&format!(
        "connredir-test-{name}-{}",
        std::process::id()
    ))?)
}

/// A child process started in a cgroup; killed (by its pid) on drop.
/// Lines it prints on stdout are collected.
pub struct Proc {
    child: ChildProcess,
}

impl Proc {
    /// Starts the test-role binary with `args` in `cgroup`, optionally as `uid`.
    pub fn spawn(cgroup: &Path, uid: Option<u32>, args: &[&str]) -> Result<Proc> {
        Proc::spawn_program(cgroup, uid, &testkit_bin(), args)
    }

    /// Starts any program with `args` in `cgroup`, optionally as `uid`.
    pub fn spawn_program(
        cgroup: &Path,
        uid: Option<u32>,
        program: &Path,
        args: &[&str],
    ) -> Result<Proc> {
        let mut command = Command::new(program);
        command.args(args).stdin(Stdio::null());
        let child = ChildProcess::spawn(&mut command, cgroup, uid)
            .with_context(|| format!("start {} {args:?}", program.display()))?;
        Ok(Proc { child })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Lines printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.child.lines()
    }

    /// Waits until a printed line satisfies `pred`.
    pub fn wait_line(&self, what: &str, pred: impl Fn(&str) -> bool) -> Result<String> {
        self.child
            .wait_line(Duration::from_secs(10), pred)
            .map_err(|e| match e {
                connredir_host::Error::OutputEnded { .. } => anyhow::anyhow!(
                    "the process ended before {what}; output: {:?}",
                    self.lines()
                ),
                _ => anyhow::anyhow!(
                    "timed out waiting for {what}; output so far: {:?}",
                    self.lines()
                ),
            })
    }

    /// Kills the process with SIGKILL (by its pid) and reaps it.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill().context("SIGKILL and reap the process")
    }

    /// The lines printed so far that are JSON objects (the per-connection
    /// reports of the proxies and clients).
    pub fn json_lines(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// Waits for the process to exit (at most 30 s) and returns its output.
    pub fn finish(mut self) -> Result<(std::process::ExitStatus, Vec<String>)> {
        let status = match self.child.wait_timeout(Duration::from_secs(30)) {
            Ok(status) => status,
            Err(connredir_host::Error::StillRunning { .. }) => bail!(
                "process {} did not exit; output: {:?}",
                self.pid(),
                self.lines()
            ),
            Err(e) => return Err(e.into()),
        };
        Ok((status, self.lines()))
    }
}

/// Polls `what` until it returns Some, for at most 10 s.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A file whose creation releases a role waiting for it (`--until`,
/// `--after`); removed on drop.
pub struct Release(PathBuf);

impl Release {
    /// A file name of its own for `test` and `what`, not there yet.
    pub fn new(test: &str, what: &str) -> Release {
        let path =
            std::env::temp_dir().join(format!("connredir-{test}-{}-{what}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        Release(path)
    }

    /// The path, as a role's argument.
    pub fn arg(&self) -> String {
        self.0.display().to_string()
    }

    /// Creates the file: the waiting role goes on.
    pub fn release(&self) {
        std::fs::write(&self.0, b"").unwrap();
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A port on `ip` free for TCP and for UDP (bound and released), never
/// handed out before by this test process: a port released here is free
/// again until its service binds it, and a service registered on the same
/// address as another one is refused, so two services of one test (or of
/// two tests running at once) must never be given the same port.
pub fn free_addr(ip: &str) -> SocketAddr {
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let listener = TcpListener::bind((ip, 0)).expect("bind an ephemeral port");
        let addr = listener.local_addr().unwrap();
        if std::net::UdpSocket::bind(addr).is_err() {
            continue;
        }
        let mut handed_out = HANDED_OUT.lock().unwrap();
        if !handed_out.contains(&addr.port()) {
            handed_out.push(addr.port());
            return addr;
        }
    }
}

/// An echo server on a thread of the test process: the "original
/// destination". Counts connections; stops on drop.
pub struct EchoServer {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl EchoServer {
    /// Listens on `addr` (port 0 for any); echoes each connection until the
    /// client's EOF.
    pub fn start(addr: &str) -> Result<EchoServer> {
        EchoServer::serve(addr, false)
    }

    /// Like `start`, but answers the first read by echoing it and closing:
    /// for clients that wait for the server to close (curl, nc).
    pub fn start_replying_once(addr: &str) -> Result<EchoServer> {
        EchoServer::serve(addr, true)
    }

    fn serve(addr: &str, once: bool) -> Result<EchoServer> {
        let listener = TcpListener::bind(addr).with_context(|| format!("echo server on {addr}"))?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (log, stopping) = (Arc::clone(&accepted), Arc::clone(&stop));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                if let Ok(peer) = stream.peer_addr() {
                    log.lock().unwrap().push(peer);
                }
                std::thread::spawn(move || {
                    let (mut read, mut write) = (&stream, &stream);
                    if once {
                        let mut buf = [0u8; 64 * 1024];
                        if let Ok(n) = std::io::Read::read(&mut read, &mut buf) {
                            let _ = std::io::Write::write_all(&mut write, &buf[..n]);
                        }
                    } else {
                        let _ = std::io::copy(&mut read, &mut write);
                    }
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Ok(EchoServer {
            addr,
            accepted,
            stop,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Peers of the connections accepted so far.
    pub fn accepted(&self) -> Vec<SocketAddr> {
        self.accepted.lock().unwrap().clone()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// A UDP echo server on a thread of the test process: the "original
/// destination" of UDP tests. Notes where each datagram came from; stops
/// on drop.
pub struct UdpEchoServer {
    addr: SocketAddr,
    sources: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl UdpEchoServer {
    /// Binds `addr` (port 0 for any) and sends every datagram back.
    pub fn start(addr: &str) -> Result<UdpEchoServer> {
        let socket =
            std::net::UdpSocket::bind(addr).with_context(|| format!("UDP echo on {addr}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = socket.local_addr()?;
        let sources = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (log, stopping) = (Arc::clone(&sources), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    log.lock().unwrap().push(from);
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        Ok(UdpEchoServer {
            addr,
            sources,
            stop,
        })
    }

    /// Where it receives.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The source of each datagram received so far.
    pub fn sources(&self) -> Vec<SocketAddr> {
        self.sources.lock().unwrap().clone()
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Waits (at most 10 s) until something listens on `addr`, read from
/// /proc/net/tcp{,6} so that no probe connection disturbs the listener.
pub fn wait_listening(addr: SocketAddr) -> Result<()> {
    wait_listening_within(addr, Duration::from_secs(10))
}

/// [`wait_listening`] with its own limit, for programs slow to start
/// when many start at once on a small machine.
pub fn wait_listening_within(addr: SocketAddr, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !connredir_host::procfs::is_listening(&addr) {
        if Instant::now() > deadline {
            bail!("nothing listens on {addr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Finds a program on PATH. In CI a missing program fails the test (the
/// setup script installs it); elsewhere the test is skipped, saying why.
pub fn require_program(test: &str, name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: {name} is not installed (scripts/setup installs it)");
        }
        eprintln!("SKIPPED {test}: {name} is not installed (run scripts/setup)");
    }
    found
}

/// Whether the system's Python (`/usr/bin/python3`, which the unprivileged
/// user can run) imports `module`, a Debian package scripts/setup installs.
/// In CI a missing one fails the test; elsewhere the test is skipped,
/// saying why.
pub fn require_python_module(test: &str, module: &str) -> bool {
    let found = Command::new("/usr/bin/python3")
        .args(["-c", &format!("import {module}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "{test}: the Python module {module} is not installed (scripts/setup installs it)"
            );
        }
        eprintln!(
            "SKIPPED {test}: the Python module {module} is not installed (run scripts/setup)"
        );
    }
    found
}

/// A program that scripts/setup installs into a virtual environment under
/// `target/tools` (`relative` to it, e.g. `mitmproxy/bin/mitmdump`): pinned
/// versions from PyPI that Debian does not carry. In CI a missing one fails
/// the test; elsewhere the test is skipped, saying why.
pub fn require_setup_tool(test: &str, relative: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().expect("the test executable's path");
    // target/<profile>/deps/<test> → target
    let target = exe.ancestors().nth(3).expect("the target directory");
    let program = target.join("tools").join(relative);
    if program.exists() {
        return Some(program);
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "{test}: {} is missing (scripts/setup installs it)",
            program.display()
        );
    }
    eprintln!(
        "SKIPPED {test}: {} is missing (run scripts/setup)",
        program.display()
    );
    None
}

/// A directory of a test's own under the system's temporary directory
/// (`connredir-test-<name>-<pid>`), made empty, removed on drop: for
/// configuration files and scripts of the programs a test starts.
pub struct TestDir(pub PathBuf);

impl TestDir {
    /// Makes the directory, owned by `owner` if given (a program that runs
    /// as that user writes into it).
    pub fn new(name: &str, owner: Option<u32>) -> TestDir {
        let dir =
            std::env::temp_dir().join(format!("connredir-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("the test's temporary directory");
        if let Some(owner) = owner {
            std::os::unix::fs::chown(&dir, Some(owner), Some(owner))
                .expect("give the temporary directory to its user");
        }
        TestDir(dir)
    }

    /// Writes `contents` to `name` in the directory; returns its path.
    pub fn write(&self, name: &str, contents: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write into the temporary directory");
        path.to_str().expect("a UTF-8 path").to_string()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The rule prefix that names exactly `addr`'s address (/32 or /128).
pub fn host_prefix(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(v4) => format!("{}/32", v4.ip()),
        SocketAddr::V6(v6) => format!("{}/128", v6.ip()),
    }
}

/// An IPv4 address as IPv4-mapped IPv6 (what an IPv6 socket connects to
/// for an IPv4 destination); an IPv6 address as it is.
pub fn mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

/// An address as proxies print it: an IPv4-mapped IPv6 address as plain
/// IPv4.
pub fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// One test's world: a cgroup tree with `scope` (clients) and `services`
/// (proxies) attached, `outside` not attached, the loaded engine, and the
/// processes the test started. Fields drop in order: processes, then the
/// engine (detaching the programs), then the cgroup tree.
pub struct Lab {
    /// Processes started for the test, killed on drop.
    pub procs: Vec<Proc>,
    /// The loaded, attached kernel programs and their maps.
    pub engine: Engine,
    /// The test's cgroup tree.
    pub tree: CgroupTree,
}

impl Lab {
    /// None when the test must be skipped (not root, outside CI).
    pub fn new(name: &str) -> Option<Lab> {
        if !require_privileges(name) {
            return None;
        }
        let tree = test_tree(name).expect("cgroup tree");
        let mut engine = Engine::load().expect("load the kernel programs");
        engine
            .attach(tree.cgroup("scope").unwrap())
            .expect("attach scope");
        engine
            .attach(tree.cgroup("services").unwrap())
            .expect("attach services");
        tree.cgroup("outside").unwrap();
        Some(Lab {
            procs: Vec::new(),
            engine,
            tree,
        })
    }

    /// The start of most end-to-end tests: the lab, and an echo server for
    /// its clients to reach on 127.0.0.2, the "original destination" the
    /// tests' rules name (services listen on 127.0.0.1, so a rule for the
    /// destination's /32 never covers a service's own address). None when
    /// the test must be skipped, as for [`Lab::new`].
    ///
    /// A test that never names the server still binds it (`_server`): it
    /// would stop at once otherwise.
    pub fn with_server(name: &str) -> Option<(Lab, EchoServer)> {
        Lab::with_server_from(name, || EchoServer::start("127.0.0.2:0"))
    }

    /// As [`Lab::with_server`], with the echo server `start` makes: for a
    /// test whose destination is elsewhere or answers once. The server
    /// starts only when the test runs.
    pub fn with_server_from(
        name: &str,
        start: impl FnOnce() -> Result<EchoServer>,
    ) -> Option<(Lab, EchoServer)> {
        let lab = Lab::new(name)?;
        let server = start().expect("start the echo server");
        Some((lab, server))
    }

    /// A cgroup of the tree (made when missing), e.g. `scope/client`.
    pub fn cgroup(&self, relative: &str) -> PathBuf {
        self.tree.cgroup(relative).unwrap()
    }

    /// Registers a service.
    pub fn service(
        &mut self,
        name: &str,
        listen: &[SocketAddr],
        identity: Identity,
        context: Option<&[u8]>,
    ) -> ServiceId {
        self.register(Service {
            context: context.map(<[u8]>::to_vec),
            ..service_spec(name, listen, identity)
        })
    }

    /// Registers `service` as given (see [`service_spec`] for the usual
    /// fields); panics, naming it, when the engine refuses it.
    pub fn register(&mut self, service: Service) -> ServiceId {
        let name = service.name.clone();
        self.engine
            .add_service(service)
            .unwrap_or_else(|e| panic!("register service {name}: {e}"))
    }

    /// Registers `name` as a service whose identity is its own cgroup,
    /// `services/<name>`, listening on `listen`, with one rule sending
    /// `prefix` (on `port`, or any) to it. Returns the id and the cgroup,
    /// where the test starts the service's process.
    pub fn own_service(
        &mut self,
        name: &str,
        listen: &[SocketAddr],
        prefix: &str,
        port: Option<u16>,
        priority: u32,
    ) -> (ServiceId, PathBuf) {
        let cgroup = self.cgroup(&format!("services/{name}"));
        let id = self.service(name, listen, by_cgroup(&cgroup), None);
        self.route(id, prefix, port, priority);
        (id, cgroup)
    }

    /// Registers haproxy (`option transparent`: it finds the destination with
    /// SO_ORIGINAL_DST and knows nothing of records) as a service whose rule
    /// sends `prefix` on `port` to it, and starts it in its own cgroup.
    /// Returns the service id and where haproxy listens.
    pub fn haproxy(
        &mut self,
        haproxy: &Path,
        prefix: &str,
        port: u16,
        priority: u32,
    ) -> (ServiceId, SocketAddr) {
        let cgroup = self.cgroup("services/haproxy");
        let listen = free_addr("127.0.0.1");
        let id = self.service("haproxy", &[listen], by_cgroup(&cgroup), None);
        self.route(id, prefix, Some(port), priority);
        let config = std::env::temp_dir().join(format!(
            "connredir-haproxy-{}-{}.cfg",
            std::process::id(),
            listen.port()
        ));
        std::fs::write(
            &config,
            format!(
                "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                 frontend inbound\n  bind {listen}\n  default_backend original\n\
                 backend original\n  option transparent\n"
            ),
        )
        .expect("write the haproxy configuration");
        let args = ["-f", config.to_str().expect("a UTF-8 path"), "-db"];
        let proc = Proc::spawn_program(&cgroup, None, haproxy, &args).expect("start haproxy");
        self.procs.push(proc);
        wait_listening(listen).expect("haproxy listens");
        // Read at start-up: nothing needs it any more.
        let _ = std::fs::remove_file(&config);
        (id, listen)
    }

    /// Registers `connredir-proxy` as the service `ours` (identity: its
    /// own cgroup `services/ours`, listening on a free port of `listen_ip`)
    /// with one rule sending exactly `dst` (its address and port) to it at
    /// `priority`, starts it there and waits until it is ready: the
    /// reference proxy beside a third-party one. Returns the service id and
    /// its index in `procs`, whose JSON lines are its connection log.
    pub fn reference_proxy(
        &mut self,
        listen_ip: &str,
        dst: SocketAddr,
        priority: u32,
    ) -> (ServiceId, usize) {
        let cgroup = self.cgroup("services/ours");
        let listen = free_addr(listen_ip);
        let id = self.service("ours", &[listen], by_cgroup(&cgroup), None);
        self.route(id, &host_prefix(dst), Some(dst.port()), priority);
        let listen = listen.to_string();
        let args = ["--name", "ours", "--listen", &listen];
        let proc = Proc::spawn_program(&cgroup, None, &workspace_bin("connredir-proxy"), &args)
            .expect("start connredir-proxy");
        proc.wait_line("proxy ready", |l| l == "ready").unwrap();
        self.procs.push(proc);
        (id, self.procs.len() - 1)
    }

    /// Starts the test kit's proxy role as `name` on `listen` in `cgroup`
    /// (as `uid`, if given) with `extra` options, and waits until it
    /// listens. Returns its index in `procs`.
    pub fn toy_proxy(
        &mut self,
        cgroup: &Path,
        uid: Option<u32>,
        name: &str,
        listen: &[SocketAddr],
        extra: &[&str],
    ) -> usize {
        let mut args = vec!["proxy".to_string(), "--name".into(), name.into()];
        for addr in listen {
            args.push("--listen".into());
            args.push(addr.to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = Proc::spawn(cgroup, uid, &args).expect("start proxy");
        proc.wait_line("proxy ready", |l| l == "ready").unwrap();
        self.procs.push(proc);
        self.procs.len() - 1
    }

    /// Sends TCP connections to `prefix` (on `port`, or any) to a service.
    pub fn route(&mut self, id: ServiceId, prefix: &str, port: Option<u16>, priority: u32) {
        self.route_protocol(id, Protocol::Tcp, prefix, port, priority);
    }

    /// Sends `protocol` flows to `prefix` (on `port`, or any) to a service.
    pub fn route_protocol(
        &mut self,
        id: ServiceId,
        protocol: Protocol,
        prefix: &str,
        port: Option<u16>,
        priority: u32,
    ) {
        self.engine
            .add_rule(Rule {
                protocol,
                destinations: vec![prefix.parse().unwrap()],
                ports: port.map(|p| p..=p).into_iter().collect(),
                priority,
                ..Rule::tcp_to(id)
            })
            .expect("add rule");
    }

    /// Registers `name` as a service whose identity is its own cgroup, with
    /// one UDP rule sending `prefix` on `port` to it, and starts the test
    /// kit's UDP service role on `listen` there (`extra`: its options).
    /// Returns the service id and the process's index in `procs`.
    pub fn udp_service(
        &mut self,
        name: &str,
        listen: SocketAddr,
        prefix: &str,
        port: u16,
        priority: u32,
        extra: &[&str],
    ) -> (ServiceId, usize) {
        let cgroup = self.cgroup(&format!("services/{name}"));
        let id = self.service(name, &[listen], by_cgroup(&cgroup), None);
        self.route_protocol(id, Protocol::Udp, prefix, Some(port), priority);
        let index = self.start_udp_service(&cgroup, name, listen, extra);
        (id, index)
    }

    /// Starts the test kit's UDP service role as `name` on `listen` in
    /// `cgroup` and waits until it is bound. Returns its index in `procs`.
    pub fn start_udp_service(
        &mut self,
        cgroup: &Path,
        name: &str,
        listen: SocketAddr,
        extra: &[&str],
    ) -> usize {
        let listen = listen.to_string();
        let mut args = vec!["udp-proxy", "--name", name, "--listen", &listen];
        args.extend_from_slice(extra);
        let proc = Proc::spawn(cgroup, None, &args).expect("start the UDP service");
        proc.wait_line("UDP service ready", |l| l == "ready")
            .unwrap();
        self.procs.push(proc);
        self.procs.len() - 1
    }

    /// Runs the test kit's `probe` role with `args` in the lab's `cgroup`
    /// (as `uid`, or root) and returns the `result` it reported: "ok…", or the name
    /// of the error the probed call gave.
    pub fn probe(&self, cgroup: &str, uid: Option<u32>, args: &[&str]) -> String {
        /// The last line `probe` prints.
        #[derive(serde::Deserialize)]
        struct ProbeReport {
            result: String,
        }
        let mut all = vec!["probe"];
        all.extend_from_slice(args);
        let (status, lines) = Proc::spawn(&self.cgroup(cgroup), uid, &all)
            .and_then(Proc::finish)
            .expect("run the probe");
        assert!(status.success(), "probe {args:?} failed: {lines:?}");
        let last = lines.last().expect("the probe prints its report");
        let report: ProbeReport = serde_json::from_str(last).expect("the probe's report");
        report.result
    }

    /// JSON lines a proxy (`procs[index]`) printed about connections.
    pub fn proxy_log(&self, index: usize) -> Vec<Value> {
        self.procs[index].json_lines()
    }

    /// Waits (at most 10 s) until proxy `index` has logged `n` connections.
    pub fn wait_logged(&self, index: usize, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.proxy_log(index);
            if log.len() >= n || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A service as most tests register it: `name` at `listen` for
/// `identity`, no context, its own connections inspected by itself, not
/// accelerated, not transparent, failing closed while down. A test that
/// needs otherwise writes `Service { accelerate: true, ..service_spec(..) }`.
pub fn service_spec(name: &str, listen: &[SocketAddr], identity: Identity) -> Service {
    Service {
        name: name.into(),
        listen: listen.to_vec(),
        identity,
        context: None,
        own_connections_by_self: true,
        accelerate: false,
        transparent: false,
        on_down: Default::default(),
    }
}

/// A service identity: the processes running as `uid`.
pub fn by_uid(uid: u32) -> Identity {
    Identity {
        uids: vec![uid],
        ..Default::default()
    }
}

/// A service identity: the processes in `cgroup`.
pub fn by_cgroup(cgroup: &Path) -> Identity {
    Identity {
        cgroups: vec![cgroup.to_owned()],
        ..Default::default()
    }
}

/// All permutations of 0..n.
pub fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for rest in permutations(n - 1) {
        for at in 0..=rest.len() {
            let mut p = rest.clone();
            p.insert(at, n - 1);
            out.push(p);
        }
    }
    out
}

/// The response code (`NOERROR`, `REFUSED`, ...) and the answer lines of
/// `dig +noall +comments +answer` output; the code reads "no answer: ..."
/// when dig printed no header (it timed out).
pub fn dig_reply(lines: &[String]) -> (String, Vec<String>) {
    let status = lines
        .iter()
        .find_map(|l| l.split("status: ").nth(1))
        .map(|rest| rest.split(',').next().unwrap().to_string())
        .unwrap_or_else(|| format!("no answer: {lines:?}"));
    let answers = lines
        .iter()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .cloned()
        .collect();
    (status, answers)
}
