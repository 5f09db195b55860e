//! Roles for the tests of isolation: a client in a network namespace of its
//! own, a service whose accept queue is full, a client bound to a chosen
//! source address, and a probe of what a process may do as a service.
//!
//! ```text
//! connredir-testkit netns-attacker take|replace --bind ADDR --connect ADDR --go FILE [--serve ADDR]
//! connredir-testkit netns-attacker accel --bind ADDR --connect ADDR --go FILE --until FILE [--serve ADDR]
//! connredir-testkit netns-attacker hold --listen ADDR --connect ADDR --count N --until FILE --go FILE
//!                                       [--serve ADDR]
//! connredir-testkit stalled-service --listen ADDR --until FILE --expect N
//! connredir-testkit bound-client --bind ADDR --connect ADDR --bytes N
//! connredir-testkit service-probe --connect ADDR [--after FILE]
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use socket2::{Domain, Socket, Type};

use crate::{emit, kind, outcome};

/// The options of `netns-attacker`: its mode, then the mode's options.
#[derive(Debug, Args)]
pub struct NetnsAttacker {
    #[command(subcommand)]
    mode: AttackerMode,
}

/// The options every mode of `netns-attacker` takes.
#[derive(Debug, Args)]
struct AttackerCommon {
    /// Where it connects (see each mode).
    #[arg(long, value_name = "ADDR")]
    connect: SocketAddr,
    /// Goes on once FILE exists (the namespace's service instance is up).
    #[arg(long, value_name = "FILE")]
    go: PathBuf,
    /// A server in its namespace that accepts and then neither reads,
    /// writes nor closes.
    #[arg(long, value_name = "ADDR")]
    serve: Option<SocketAddr>,
}

/// What the namespace client does (see [`netns_attacker`]).
#[derive(Debug, Subcommand)]
enum AttackerMode {
    /// Connects from `--bind` to the service's address, not redirected.
    Take {
        #[command(flatten)]
        common: AttackerCommon,
        #[arg(long, value_name = "ADDR")]
        bind: SocketAddr,
    },
    /// Connects from `--bind` to the selected destination, redirected.
    Replace {
        #[command(flatten)]
        common: AttackerCommon,
        #[arg(long, value_name = "ADDR")]
        bind: SocketAddr,
    },
    /// Leaves an accelerated service's accepted end in place until `--until`.
    Accel {
        #[command(flatten)]
        common: AttackerCommon,
        #[arg(long, value_name = "ADDR")]
        bind: SocketAddr,
        #[arg(long, value_name = "FILE")]
        until: PathBuf,
    },
    /// Holds `--count` redirected connects half-open until `--until`.
    Hold {
        #[command(flatten)]
        common: AttackerCommon,
        /// The service instance's own address (its queue gets filled).
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        #[arg(long, value_name = "N")]
        count: usize,
        #[arg(long, value_name = "FILE")]
        until: PathBuf,
    },
}

impl AttackerMode {
    fn common(&self) -> &AttackerCommon {
        match self {
            Self::Take { common, .. }
            | Self::Replace { common, .. }
            | Self::Accel { common, .. }
            | Self::Hold { common, .. } => common,
        }
    }
}

/// The options of `stalled-service` (see [`stalled_service`]).
#[derive(Debug, Args)]
pub struct StalledService {
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Accepts once FILE exists.
    #[arg(long, value_name = "FILE")]
    until: PathBuf,
    /// How many connections it then accepts.
    #[arg(long, value_name = "N")]
    expect: usize,
}

/// The options of `bound-client` (see [`bound_client`]).
#[derive(Debug, Args)]
pub struct BoundClient {
    #[arg(long, value_name = "ADDR")]
    bind: SocketAddr,
    #[arg(long, value_name = "ADDR")]
    connect: SocketAddr,
    #[arg(long, value_name = "N")]
    bytes: usize,
}

/// The options of `service-probe` (see [`service_probe`]).
#[derive(Debug, Args)]
pub struct ServiceProbe {
    #[arg(long, value_name = "ADDR")]
    connect: SocketAddr,
    /// Says `ready`, then waits for FILE before it probes (so the test can
    /// register this very process first).
    #[arg(long, value_name = "FILE")]
    after: Option<PathBuf>,
}

/// Enters a user and network namespace of its own (as `unshare -Urn`),
/// mapping the caller's uid to root there, and brings its loopback up. The
/// process stays in its cgroup, so the layer's programs still run for it.
fn enter_own_network_namespace() -> Result<()> {
    // SAFETY: plain system calls; the process is single-threaded here.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWUSER|CLONE_NEWNET)");
    }
    std::fs::write("/proc/self/setgroups", "deny").context("setgroups")?;
    std::fs::write("/proc/self/uid_map", format!("0 {uid} 1")).context("uid_map")?;
    std::fs::write("/proc/self/gid_map", format!("0 {gid} 1")).context("gid_map")?;
    // SAFETY: an all-zero ifreq is valid; the ioctls read and write it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("socket for ioctl");
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let up = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 && {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) == 0
        };
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if !up {
            return Err(err).context("bring lo up");
        }
    }
    Ok(())
}

/// A listener with an accept queue of one, so a second connection's SYN is
/// dropped and the client stays in SYN_SENT (retrying) until it is drained.
fn small_backlog_listener(addr: SocketAddr) -> Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    socket.listen(0)?;
    Ok(socket.into())
}

/// A socket bound to `bind` (so the test chooses the 4-tuple).
fn bound_socket(bind: SocketAddr) -> Result<Socket> {
    let socket = Socket::new(Domain::for_address(bind), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&bind.into())
        .with_context(|| format!("bind {bind}"))?;
    Ok(socket)
}

/// What the accepted end of a connection carries: records and their client.
fn accepted_report(stream: &TcpStream) -> Value {
    let records = connredir::query_records(stream);
    let mut line = json!({
        "peer": stream.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
        "records": outcome(&records),
    });
    if let Ok(r) = &records {
        line["client_pid"] = json!(r.client().pid);
        line["chain"] = json!(r.chain().iter().map(|s| s.0).collect::<Vec<_>>());
    }
    line
}

fn wait_for(file: &Path, at_most: Duration) {
    let deadline = Instant::now() + at_most;
    while !file.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A process of the scope in a network namespace of its own, using the
/// same addresses as a host flow. Its namespace has an instance of the
/// service of its own (a container with its own proxy, say): the test starts
/// it there once this role says `{"stage":"netns"}`, then creates `--go`.
/// - `take`: connects from `--bind` to the service's address (`--connect`)
///   without being redirected: does the service's accepted socket in this
///   namespace get the host flow's pending record?
/// - `replace`: connects from `--bind` to the selected destination
///   (`--connect`), redirected to the service in this namespace: its own
///   record travels under the host flow's 4-tuple.
/// - `accel`: the same to an accelerated service, whose onward connection
///   reaches a server here (`--serve`) that never answers nor closes; then
///   closes its end, so only the service's accepted end stays joined (the
///   key the service side of a host flow will have), until `--until`.
/// - `hold`: `--count` redirected connects to `--connect` that never
///   complete (the service here has a full accept queue: the first
///   connection, straight to `--listen`, fills it), held until `--until`.
pub fn netns_attacker(args: &NetnsAttacker) -> Result<()> {
    let mode = &args.mode;
    let AttackerCommon {
        connect,
        ref go,
        serve,
    } = *mode.common();
    if let AttackerMode::Hold { .. } = mode {
        raise_fd_limit()?;
    }
    enter_own_network_namespace()?;
    // A server that accepts and then neither reads, writes nor closes.
    let silent = match serve {
        Some(addr) => {
            let listener = TcpListener::bind(addr).with_context(|| format!("listen on {addr}"))?;
            Some(std::thread::spawn(move || {
                listener.incoming().flatten().collect::<Vec<_>>()
            }))
        }
        None => None,
    };
    emit(json!({ "stage": "netns", "pid": std::process::id() }));
    wait_for(go, Duration::from_secs(30));
    match mode {
        AttackerMode::Take { bind, .. } => connect_from(*bind, connect, "take"),
        AttackerMode::Replace { bind, .. } => connect_from(*bind, connect, "replace"),
        AttackerMode::Accel { bind, until, .. } => {
            let socket = bound_socket(*bind)?;
            socket
                .connect(&connect.into())
                .with_context(|| format!("connect to {connect}"))?;
            // Give the service time to connect onward, then leave.
            std::thread::sleep(Duration::from_millis(300));
            drop(socket);
            emit(json!({ "mode": "accel", "stage": "ready" }));
            wait_for(until, Duration::from_secs(30));
            drop(silent);
            Ok(())
        }
        AttackerMode::Hold {
            listen,
            count,
            until,
            ..
        } => hold_half_open(*listen, connect, *count, until),
    }
}

/// `take` and `replace`: see [`netns_attacker`].
fn connect_from(bind: SocketAddr, connect: SocketAddr, mode: &str) -> Result<()> {
    let socket = bound_socket(bind)?;
    socket
        .connect(&connect.into())
        .with_context(|| format!("connect to {connect}"))?;
    emit(json!({ "mode": mode, "stage": "connected", "pid": std::process::id() }));
    Ok(())
}

/// `hold`: see [`netns_attacker`].
fn hold_half_open(
    listen: SocketAddr,
    connect: SocketAddr,
    count: usize,
    until: &Path,
) -> Result<()> {
    // Not redirected (no rule for the service's own address): fills the queue.
    let filler = TcpStream::connect(listen)?;
    let mut held = Vec::with_capacity(count);
    let started = Instant::now();
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(connect), Type::STREAM, None)?;
        socket.set_nonblocking(true)?;
        match socket.connect(&connect.into()) {
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => held.push(socket),
            other => bail!("connect {} of {count}: {other:?}", held.len() + 1),
        }
    }
    emit(json!({ "held": held.len(), "seconds": started.elapsed().as_secs_f64() }));
    wait_for(until, Duration::from_secs(300));
    drop((held, filler));
    Ok(())
}

/// Raises the soft limit of open files to the hard limit, as any process may.
fn raise_fd_limit() -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: limit is a valid rlimit for both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit");
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit");
        }
    }
    Ok(())
}

/// A service whose accept queue is full (a connection it has not accepted
/// yet, which the test makes): the next redirected client's SYN is dropped,
/// so its record waits in the hand-off map. Once FILE exists it accepts
/// `--expect` connections and reports what each carries.
pub fn stalled_service(args: &StalledService) -> Result<()> {
    let StalledService {
        listen,
        ref until,
        expect,
    } = *args;
    let listener = small_backlog_listener(listen)?;
    println!("ready");
    wait_for(until, Duration::from_secs(300));
    for _ in 0..expect {
        let (stream, _) = listener.accept()?;
        emit(accepted_report(&stream));
    }
    Ok(())
}

/// Connects from `--bind` to `--connect`, sends `--bytes` bytes and reads
/// them back (at most 5 s), reporting what came back.
pub fn bound_client(args: &BoundClient) -> Result<()> {
    let BoundClient {
        bind,
        connect,
        bytes,
    } = *args;
    let socket = bound_socket(bind)?;
    socket
        .connect(&connect.into())
        .with_context(|| format!("connect to {connect}"))?;
    let mut stream: TcpStream = socket.into();
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    stream.write_all(&payload)?;
    stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.len() < bytes && Instant::now() < deadline {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            // Timeouts, and the spurious EAGAIN of accelerated sockets.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    emit(json!({
        "ok": received == payload,
        "sent": bytes,
        "received": received.len(),
        "local": stream.local_addr()?.to_string(),
        "pid": std::process::id(),
    }));
    Ok(())
}

/// What this process may do as (or against) a service: set records on a new
/// socket, connect to `--connect` (redirected or not), and read the context
/// of that connection.
pub fn service_probe(args: &ServiceProbe) -> Result<()> {
    let connect = args.connect;
    // `--after FILE`: says `ready`, then waits for FILE (so the test can
    // register this very process first).
    if let Some(after) = &args.after {
        println!("ready");
        wait_for(after, Duration::from_secs(30));
    }
    let socket = Socket::new(Domain::for_address(connect), Type::STREAM, None)?;
    let mut records = connredir::RedirectRecords::new();
    records
        .push_hop(connredir::ServiceId(1), "127.0.0.9:9".parse().unwrap())
        .expect("an empty chain has room");
    let set = connredir::set_records(&socket, &records);
    let stream = TcpStream::connect(connect).with_context(|| format!("connect to {connect}"))?;
    let own = connredir::query_records(&stream);
    let context = connredir::query_context(&stream);
    let mut report = json!({
        "pid": std::process::id(),
        "set": outcome(&set),
        "records": outcome(&own),
        "context": outcome(&context),
    });
    if let Ok(r) = &own {
        report["chain"] = json!(r.chain().iter().map(|s| s.0).collect::<Vec<_>>());
    }
    if let Err(e) = &set {
        report["set_error"] = json!(kind(e));
    }
    emit(report);
    Ok(())
}
