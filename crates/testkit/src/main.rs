//! The programs connredir's integration tests start in their cgroups:
//!
//! ```text
//! connredir-testkit proxy --name NAME --listen ADDR [--listen ADDR] [--no-records] [--check-buffers]
//!                         [--reuseport] [--delay-connect-ms N]
//! connredir-testkit client --connect ADDR --bytes N [--no-half-close]
//! connredir-testkit probe CASE [ADDR]
//! connredir-testkit connect-loop --connect ADDR --count N
//! connredir-testkit many --connect ADDR --sizes N,N,... [--no-half-close]
//! connredir-testkit hold --connect ADDR --until FILE
//! connredir-testkit attack CASE ADDR [ARG] [--elsewhere ADDR]
//! connredir-testkit forge --listen ADDR --connect ADDR --other ID [--iterations N] [--seed S]
//! connredir-testkit set-blob --hex HEX --connect ADDR
//! connredir-testkit udp-proxy --name NAME --listen ADDR [--no-records]
//! connredir-testkit udp-client --connect ADDR [--count N] [--unconnected] [--until FILE]
//! ```
//!
//! and the roles of the isolation tests (see `isolation.rs`).
//!
//! Each prints one JSON object per line on stdout; the proxy prints `ready`
//! once it listens. The proxy is a plain thread-per-connection forwarder built
//! on the `connredir` library, the way a proxy author would write one.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use connredir::{Error as RedirectError, RedirectRecords};
use serde_json::{json, Value};
use socket2::{Domain, Socket, Type};

mod attack;
mod isolation;
mod udp;

/// The roles; each prints JSON lines on stdout.
#[derive(Debug, Parser)]
#[command(
    name = "connredir-testkit",
    about = "The programs connredir's integration tests start in their cgroups."
)]
struct Cli {
    /// Clients treat a read's EAGAIN as "try again" (see `RETRY_EAGAIN`);
    /// accepted before or after the role's own options.
    #[arg(long, global = true)]
    retry_eagain: bool,
    #[command(subcommand)]
    role: Role,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// A thread-per-connection forwarder built on the `connredir` library.
    Proxy {
        /// The name it logs under.
        #[arg(long)]
        name: String,
        /// Where it listens (repeatable).
        #[arg(long = "listen", value_name = "ADDR")]
        listens: Vec<String>,
        /// Do not set the accepted connection's records on the onward socket.
        #[arg(long)]
        no_records: bool,
        /// Report how the buffer protocol answers each query size.
        #[arg(long)]
        check_buffers: bool,
        /// Bind its listeners with SO_REUSEPORT.
        #[arg(long)]
        reuseport: bool,
        /// Wait this long between learning the destination and connecting.
        #[arg(long, value_name = "N")]
        delay_connect_ms: Option<u64>,
    },
    /// One echo flow of `--bytes`, checked byte for byte.
    Client {
        #[arg(long, value_name = "ADDR")]
        connect: SocketAddr,
        #[arg(long, value_name = "N")]
        bytes: usize,
        /// Read the whole echo back before closing instead of half-closing.
        #[arg(long)]
        no_half_close: bool,
    },
    /// One socket-option case; prints its outcome.
    Probe {
        case: String,
        addr: Option<SocketAddr>,
    },
    /// Connects and closes `--count` times and reports the elapsed time.
    ConnectLoop {
        #[arg(long, value_name = "ADDR")]
        connect: SocketAddr,
        #[arg(long, value_name = "N")]
        count: u64,
    },
    /// All flows at once, one per size.
    Many {
        #[arg(long, value_name = "ADDR")]
        connect: SocketAddr,
        #[arg(long, value_name = "N,N,...", value_delimiter = ',', required = true)]
        sizes: Vec<usize>,
        /// Read each echo back before closing instead of half-closing.
        #[arg(long)]
        no_half_close: bool,
    },
    /// One connection kept open until FILE exists.
    Hold {
        #[arg(long, value_name = "ADDR")]
        connect: SocketAddr,
        #[arg(long, value_name = "FILE")]
        until: PathBuf,
    },
    /// An echo server.
    Echo {
        #[arg(long, value_name = "ADDR")]
        listen: String,
    },
    /// A way around a service (see `attack.rs`).
    Attack {
        case: String,
        addr: SocketAddr,
        /// The case's duration in milliseconds (`flows`).
        #[arg(value_name = "MILLISECONDS")]
        millis: Option<u64>,
        /// A second address the case connects to (`stale-hop`).
        #[arg(long, value_name = "ADDR")]
        elsewhere: Option<SocketAddr>,
    },
    /// A forging service: sets forged records and reports what the layer said.
    Forge {
        #[arg(long, value_name = "ADDR")]
        listen: String,
        #[arg(long, value_name = "ADDR")]
        connect: SocketAddr,
        /// Another service's id, for forgeries that name it.
        #[arg(long, value_name = "ID")]
        other: u32,
        /// Random mutations to send after the forgeries.
        #[arg(long, value_name = "N", default_value_t = 0)]
        iterations: u64,
        #[arg(long, value_name = "S", default_value_t = 0x5eed)]
        seed: u64,
    },
    /// Sets a record blob given in hex and connects when the layer takes it.
    SetBlob {
        #[arg(long, value_name = "HEX")]
        hex: String,
        #[arg(long, value_name = "ADDR")]
        connect: SocketAddr,
    },
    /// A toy UDP service built on the `connredir` library (`udp.rs`).
    UdpProxy {
        /// The name it logs under.
        #[arg(long)]
        name: String,
        /// The service address it receives on.
        #[arg(long, value_name = "ADDR")]
        listen: SocketAddr,
        /// Do not set the flow's records on the onward socket.
        #[arg(long)]
        no_records: bool,
    },
    /// UDP datagrams to an echo server, each echo checked (`udp.rs`).
    UdpClient {
        #[arg(long, value_name = "ADDR")]
        connect: SocketAddr,
        #[arg(long, value_name = "N", default_value_t = 3)]
        count: usize,
        /// Send with sendto() on an unconnected socket.
        #[arg(long)]
        unconnected: bool,
        /// After the report, keep the socket open until FILE exists, then
        /// close it (printing `closed`) and live on until FILE is gone.
        #[arg(long, value_name = "FILE")]
        until: Option<PathBuf>,
    },
    /// An attacker in another network namespace (`isolation.rs`).
    NetnsAttacker(isolation::NetnsAttacker),
    /// A service whose accept queue is full (`isolation.rs`).
    StalledService(isolation::StalledService),
    /// A client bound to a given source address (`isolation.rs`).
    BoundClient(isolation::BoundClient),
    /// What a process may do as or against a service (`isolation.rs`).
    ServiceProbe(isolation::ServiceProbe),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    RETRY_EAGAIN.store(cli.retry_eagain, std::sync::atomic::Ordering::Relaxed);
    match cli.role {
        Role::Proxy {
            name,
            listens,
            no_records,
            check_buffers,
            reuseport,
            delay_connect_ms,
        } => {
            let options = ProxyOptions {
                name,
                set_records: !no_records,
                check_buffers,
                delay_connect: delay_connect_ms.map(std::time::Duration::from_millis),
            };
            proxy(options, &listens, reuseport)
        }
        Role::Client {
            connect,
            bytes,
            no_half_close,
        } => client(connect, bytes, !no_half_close),
        Role::Probe { case, addr } => probe(&case, addr),
        Role::ConnectLoop { connect, count } => connect_loop(connect, count),
        Role::Many {
            connect,
            sizes,
            no_half_close,
        } => many(connect, sizes, !no_half_close),
        Role::Hold { connect, until } => hold(connect, &until),
        Role::Echo { listen } => echo(&listen),
        Role::Attack {
            case,
            addr,
            millis,
            elsewhere,
        } => {
            emit(attack::run(&case, addr, millis, elsewhere)?);
            Ok(())
        }
        Role::Forge {
            listen,
            connect,
            other,
            iterations,
            seed,
        } => forge(&listen, connect, other, iterations, seed),
        Role::SetBlob { hex, connect } => set_blob(&hex, connect),
        Role::UdpProxy {
            name,
            listen,
            no_records,
        } => udp::service(&name, listen, !no_records),
        Role::UdpClient {
            connect,
            count,
            unconnected,
            until,
        } => udp::client(connect, count, unconnected, until.as_deref()),
        Role::NetnsAttacker(args) => isolation::netns_attacker(&args),
        Role::StalledService(args) => isolation::stalled_service(&args),
        Role::BoundClient(args) => isolation::bound_client(&args),
        Role::ServiceProbe(args) => isolation::service_probe(&args),
    }
}

fn emit(value: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// The error's variant name, which the tests compare.
fn kind(e: &RedirectError) -> &'static str {
    match e {
        RedirectError::InsufficientBuffer { .. } => "InsufficientBuffer",
        RedirectError::InvalidArgument(_) => "InvalidArgument",
        RedirectError::NotConnected => "NotConnected",
        RedirectError::NotASocket => "NotASocket",
        RedirectError::NotSupported => "NotSupported",
        RedirectError::AccessDenied => "AccessDenied",
        RedirectError::NotRedirected => "NotRedirected",
        RedirectError::Io(_) => "Io",
    }
}

fn outcome<T>(r: &std::result::Result<T, RedirectError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => kind(e).into(),
    }
}

struct ProxyOptions {
    name: String,
    set_records: bool,
    check_buffers: bool,
    /// Wait between learning the destination and connecting to it, so that
    /// concurrent flows interleave.
    delay_connect: Option<std::time::Duration>,
}

fn proxy(options: ProxyOptions, listens: &[String], reuseport: bool) -> Result<()> {
    let options = std::sync::Arc::new(options);
    let mut threads = Vec::new();
    for addr in listens {
        let listener = listen(addr, reuseport).with_context(|| format!("listen on {addr}"))?;
        let options = std::sync::Arc::clone(&options);
        threads.push(std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let options = std::sync::Arc::clone(&options);
                std::thread::spawn(move || {
                    if let Err(e) = handle(stream, &options) {
                        emit(json!({ "proxy": options.name, "error": format!("{e:#}") }));
                    }
                });
            }
        }));
    }
    println!("ready");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn listen(addr: &str, reuseport: bool) -> Result<TcpListener> {
    let addr: SocketAddr = addr.parse()?;
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn handle(client: TcpStream, options: &ProxyOptions) -> Result<()> {
    let records = connredir::query_records(&client);
    let context = connredir::query_context(&client);
    let original = connredir::original_destination(&client);
    let destination = match (&original, &records) {
        (Ok(dst), _) => *dst,
        (Err(_), Ok(r)) => r.original_destination().context("record without hops")?,
        (Err(e), Err(_)) => bail!("no original destination: {e}"),
    };
    let mut line = json!({
        "proxy": options.name,
        "peer": client.peer_addr()?.to_string(),
        "original_dst": original.as_ref().map(|a| a.to_string()).unwrap_or_else(|e| kind(e).into()),
        "records": outcome(&records),
        "context": outcome(&context),
    });
    if let Ok(r) = &records {
        line["chain"] = json!(r.chain().iter().map(|s| s.0).collect::<Vec<_>>());
        line["client_pid"] = json!(r.client().pid);
        line["record_dst"] = json!(r.original_destination().map(|a| a.to_string()));
        line["first_dst"] = json!(r.first_destination().map(|a| a.to_string()));
    }
    if let Ok(c) = &context {
        line["context_len"] = json!(c.as_bytes().len());
        line["context_bytes"] = json!(String::from_utf8_lossy(c.as_bytes()));
        if let Some((remote, local)) = c.original_addresses() {
            line["context_remote"] = json!(remote.to_string());
            line["context_local"] = json!(local.map(|l| l.to_string()));
        }
    }
    if options.check_buffers {
        line["buffers"] = check_buffers(&client);
    }

    if let Some(delay) = options.delay_connect {
        std::thread::sleep(delay);
    }
    let onward = Socket::new(Domain::for_address(destination), Type::STREAM, None)?;
    if options.set_records {
        if let Ok(r) = &records {
            connredir::set_records(&onward, r).context("set records on the onward socket")?;
        }
    }
    onward
        .connect(&destination.into())
        .with_context(|| format!("connect to {destination}"))?;
    let onward: TcpStream = onward.into();
    // A service sees where its onward socket really goes: the next
    // service, when a later rule took the flow.
    line["onward_peer"] = json!(onward.peer_addr()?.to_string());
    line["accelerated"] = json!(connredir::is_accelerated(&client).unwrap_or(false));
    line["onward_accelerated"] = json!(connredir::is_accelerated(&onward).unwrap_or(false));
    emit(line);
    relay(client, onward)
}

/// Copies both ways until both sides are done, passing half-closes on.
fn relay(a: TcpStream, b: TcpStream) -> Result<()> {
    let (mut a_read, mut b_write) = (a.try_clone()?, b.try_clone()?);
    let upstream = std::thread::spawn(move || {
        let _ = copy(&mut a_read, &mut b_write);
        let _ = b_write.shutdown(Shutdown::Write);
    });
    let (mut b_read, mut a_write) = (b, a);
    let _ = copy(&mut b_read, &mut a_write);
    let _ = a_write.shutdown(Shutdown::Write);
    let _ = upstream.join();
    Ok(())
}

/// read/write until end of stream. An accelerated socket's read may fail with
/// a spurious EAGAIN even when blocking: wait a moment and read again.
fn copy(from: &mut TcpStream, to: &mut TcpStream) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => {
                to.write_all(&buf[..n])?;
                total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Exercises the WFP buffer protocol on an accepted, redirected socket.
fn check_buffers(fd: &impl AsFd) -> Value {
    let mut report = json!({});
    for (name, query) in [
        (
            "records",
            connredir::query_records_into as fn(_, &mut [u8]) -> _,
        ),
        ("context", connredir::query_context_into),
    ] {
        let needed = query(fd.as_fd(), &mut []);
        let tiny = query(fd.as_fd(), &mut [0u8; 2]);
        let (short, exact) = match &needed {
            Ok(n) => {
                let mut short = vec![0u8; n - 1];
                let mut exact = vec![0u8; *n];
                let short = match query(fd.as_fd(), &mut short) {
                    Err(RedirectError::InsufficientBuffer { needed }) => {
                        json!({ "error": "InsufficientBuffer", "needed": needed })
                    }
                    other => json!({ "unexpected": format!("{other:?}") }),
                };
                (
                    short,
                    json!(outcome(&query(fd.as_fd(), &mut exact)).clone()),
                )
            }
            Err(e) => (json!(kind(e)), json!(kind(e))),
        };
        report[name] = json!({
            "size_query": needed.as_ref().map(|n| json!(n)).unwrap_or_else(|e| json!(kind(e))),
            "tiny": outcome(&tiny),
            "short": short,
            "exact": exact,
        });
    }
    report
}

/// An echo server (for tests that need the destination inside a cgroup):
/// prints `ready`, then echoes every connection until end of stream.
fn echo(addr: &str) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("listen on {addr}"))?;
    println!("ready");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let Ok(mut writer) = stream.try_clone() else {
                return;
            };
            let mut reader = stream;
            match copy(&mut reader, &mut writer) {
                Ok(_) => {
                    let _ = writer.shutdown(Shutdown::Write);
                }
                Err(e) => eprintln!("echo: {e}"),
            }
        });
    }
    Ok(())
}

fn client(addr: SocketAddr, bytes: usize, half_close: bool) -> Result<()> {
    let report = echo_flow(addr, bytes, half_close)?;
    let ok = report["ok"] == true;
    emit(report);
    if !ok {
        bail!("echo mismatch");
    }
    Ok(())
}

/// All connections at once, one per size, each checked byte for byte;
/// reports each flow's local address, size and outcome.
fn many(addr: SocketAddr, sizes: Vec<usize>, half_close: bool) -> Result<()> {
    let start = std::sync::Arc::new(std::sync::Barrier::new(sizes.len()));
    let flows: Vec<_> = sizes
        .into_iter()
        .map(|size| {
            let start = std::sync::Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                echo_flow(addr, size, half_close).unwrap_or_else(
                    |e| json!({ "ok": false, "sent": size, "error": format!("{e:#}") }),
                )
            })
        })
        .collect();
    let reports: Vec<Value> = flows
        .into_iter()
        .map(|t| t.join().expect("flow thread"))
        .collect();
    let failed = reports.iter().filter(|r| r["ok"] != true).count();
    emit(json!({ "flows": reports, "failed": failed }));
    Ok(())
}

/// Set by `--retry-eagain`: clients treat a read's EAGAIN as "try again",
/// the way event-loop clients do. A blocking read on a socket accelerated
/// through sockmap returns one spurious EAGAIN at end of stream.
static RETRY_EAGAIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn retry_eagain() -> bool {
    RETRY_EAGAIN.load(std::sync::atomic::Ordering::Relaxed)
}

/// One connection: send `bytes` of a pattern, read the echo, compare.
fn echo_flow(addr: SocketAddr, bytes: usize, half_close: bool) -> Result<Value> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
    // What the client reads as its peer (getpeername), while connected.
    let peer = stream.peer_addr()?;
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    // Some proxies close both directions at the client's EOF: without
    // half-close, read the whole echo back before closing.
    let mut writer = stream.try_clone()?;
    let to_send = payload.clone();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&to_send)?;
        if half_close {
            writer.shutdown(Shutdown::Write)?;
        }
        Ok(())
    });
    let mut received = Vec::new();
    if retry_eagain() {
        // As an event-loop client would: EAGAIN means "not yet".
        let mut buf = vec![0u8; 64 * 1024];
        while half_close || received.len() < bytes {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    } else if half_close {
        stream.read_to_end(&mut received)?;
    } else {
        received.resize(bytes, 0);
        stream.read_exact(&mut received)?;
    }
    sender.join().expect("sender thread")?;
    Ok(json!({
        "ok": received == payload,
        "sent": bytes,
        "received": received.len(),
        "local": stream.local_addr()?.to_string(),
        "peer": peer.to_string(),
    }))
}

/// A record with one hop, as a forger would build it.
fn forged() -> RedirectRecords {
    let mut records = RedirectRecords::new();
    records
        .push_hop(connredir::ServiceId(1), "127.0.0.9:9".parse().unwrap())
        .expect("an empty chain has room");
    records
}

fn probe(case: &str, addr: Option<SocketAddr>) -> Result<()> {
    let addr = || addr.context("missing ADDR");
    let new_socket = || Socket::new(Domain::IPV4, Type::STREAM, None);
    let result: String = match case {
        "not-connected" => outcome(&connredir::query_records(&new_socket()?)),
        "not-a-socket" => {
            let (read, _write) = std::io::pipe()?;
            outcome(&connredir::query_records(&read))
        }
        "not-redirected" => outcome(&connredir::query_records(&TcpStream::connect(addr()?)?)),
        "set-connected" => {
            let stream = TcpStream::connect(addr()?)?;
            outcome(&connredir::set_records(&stream, &forged()))
        }
        "set-malformed" => outcome(&connredir::set_records_from(&new_socket()?, &[0xAB; 64])),
        "set-truncated" => {
            let bytes = forged().to_bytes();
            outcome(&connredir::set_records_from(
                &new_socket()?,
                &bytes[..bytes.len() / 2],
            ))
        }
        "set-wrong-version" => {
            let mut bytes = forged().to_bytes();
            let at = std::mem::offset_of!(connredir_abi::connredir_record, version);
            bytes[at..at + 2].copy_from_slice(&99u16.to_ne_bytes());
            outcome(&connredir::set_records_from(&new_socket()?, &bytes))
        }
        "set" => outcome(&connredir::set_records(&new_socket()?, &forged())),
        "service" => service_outcome(&TcpListener::bind(addr()?)?),
        "service-not-listening" => {
            let socket = new_socket()?;
            socket.bind(&addr()?.into())?;
            service_outcome(&socket)
        }
        // A UDP service's socket: bound (there is no listen), or not yet.
        "udp-service" => service_outcome(&std::net::UdpSocket::bind(addr()?)?),
        "udp-service-unbound" => service_outcome(&Socket::new(
            Domain::for_address(addr()?),
            Type::DGRAM,
            None,
        )?),
        "connected-query" => outcome(&connredir::query_records(&TcpStream::connect(addr()?)?)),
        // udp[-as-NAME]: one datagram sent with sendto() (unconnected) and
        // its echo read back: "ok" or the errno.
        udp if udp.starts_with("udp") => {
            if let Some(name) = udp.strip_prefix("udp-as-") {
                let name = std::ffi::CString::new(name)?;
                // SAFETY: PR_SET_NAME reads a NUL-terminated string.
                unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
            }
            let addr = addr()?;
            let bind: SocketAddr = if addr.is_ipv6() {
                "[::]:0".parse()?
            } else {
                "0.0.0.0:0".parse()?
            };
            let socket = std::net::UdpSocket::bind(bind)?;
            socket.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
            errno_outcome(socket.send_to(b"x", addr).and_then(|_| {
                let mut buf = [0u8; 16];
                socket.recv_from(&mut buf).map(drop)
            }))
        }
        // connect[-as-NAME][-from-PORT]: a TCP connect (under command name
        // NAME, from local port PORT) and one echoed byte: "ok" or the errno.
        connect if connect.starts_with("connect") => {
            let mut rest = connect.strip_prefix("connect").unwrap_or_default();
            let mut from = None;
            if let Some((head, port)) = rest.split_once("-from-") {
                from = Some(port.parse::<u16>().context("local port")?);
                rest = head;
            }
            if let Some(name) = rest.strip_prefix("-as-") {
                let name = std::ffi::CString::new(name)?;
                // SAFETY: PR_SET_NAME reads a NUL-terminated string.
                unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr(), 0, 0, 0) };
            }
            errno_outcome(echo_one(addr()?, from))
        }
        other => bail!("unknown probe case {other}"),
    };
    emit(json!({ "case": case, "result": result }));
    Ok(())
}

/// A TCP connect to `addr` (from local port `from`), one byte echoed.
fn echo_one(addr: SocketAddr, from: Option<u16>) -> std::io::Result<()> {
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let socket = Socket::new(domain, Type::STREAM, None)?;
    if let Some(port) = from {
        let local: SocketAddr = if addr.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, port).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, port).into()
        };
        socket.set_reuse_address(true)?;
        socket.bind(&local.into())?;
    }
    socket.connect(&addr.into())?;
    let mut stream: TcpStream = socket.into();
    stream.write_all(b"x")?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte)?;
    Ok(())
}

/// "ok", or the errno's name for the ones tests expect.
fn errno_outcome(result: std::io::Result<()>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(e) => match e.raw_os_error() {
            Some(libc::EACCES) => "EACCES".into(),
            Some(libc::EPERM) => "EPERM".into(),
            Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
            Some(n) => format!("errno {n}"),
            None => e.to_string(),
        },
    }
}

/// What `registered_service` says: `ok:ID` or the error's variant name.
fn service_outcome(listener: &impl AsFd) -> String {
    match connredir::registered_service(listener) {
        Ok(id) => format!("ok:{}", id.0),
        Err(connredir::ServiceError::NotRegistered(_)) => "NotRegistered".into(),
        Err(connredir::ServiceError::LayerNotActive(_)) => "LayerNotActive".into(),
        Err(connredir::ServiceError::NotListening) => "NotListening".into(),
        Err(connredir::ServiceError::Other(e)) => kind(&e).into(),
    }
}

/// Connects and closes `--count` times (reset on close, so no TIME_WAIT piles
/// up) and reports the elapsed time: the benchmark's workload.
fn connect_loop(addr: SocketAddr, count: u64) -> Result<()> {
    let start = std::time::Instant::now();
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_linger(Some(std::time::Duration::ZERO))?;
        socket.connect(&addr.into())?;
    }
    emit(json!({ "count": count, "elapsed_ns": start.elapsed().as_nanos() as u64 }));
    Ok(())
}

/// Keeps one connection open across a change: an echo exchange, then a wait
/// until FILE exists, then another exchange on the same connection (its
/// failure is reported, with the I/O error kind, before the role fails).
fn hold(addr: SocketAddr, until: &std::path::Path) -> Result<()> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
    let mut exchange = |word: &str| -> Result<bool> {
        stream.write_all(word.as_bytes())?;
        let mut back = vec![0u8; word.len()];
        stream.read_exact(&mut back)?;
        Ok(back == word.as_bytes())
    };
    let first = exchange("first\n")?;
    emit(json!({ "stage": "first", "ok": first }));
    while !until.exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The connection may have died meanwhile (a killed proxy): report how.
    match exchange("second\n") {
        Ok(second) => {
            emit(json!({ "stage": "second", "ok": second }));
            Ok(())
        }
        Err(e) => {
            let kind = e
                .downcast_ref::<std::io::Error>()
                .map(|io| format!("{:?}", io.kind()));
            emit(
                json!({ "stage": "second", "ok": false, "error": format!("{e:#}"), "kind": kind }),
            );
            Err(e)
        }
    }
}

/// The offset of a record field.
macro_rules! at {
    ($field:ident) => {
        std::mem::offset_of!(connredir_abi::connredir_record, $field)
    };
}

/// Byte offsets in a record blob, for forgeries.
const HOP_SIZE: usize = std::mem::size_of::<connredir_abi::connredir_hop>();

fn put_u16(blob: &mut [u8], at: usize, value: u16) {
    blob[at..at + 2].copy_from_slice(&value.to_ne_bytes());
}

fn put_u32(blob: &mut [u8], at: usize, value: u32) {
    blob[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

/// Where hop `i`'s service id sits in a blob.
fn hop_service_at(i: usize) -> usize {
    at!(hops) + i * HOP_SIZE
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Result<Vec<u8>> {
    ensure!(text.len().is_multiple_of(2), "odd hex length");
    (0..text.len())
        .step_by(2)
        .map(|i| Ok(u8::from_str_radix(&text[i..i + 2], 16)?))
        .collect()
}

/// setsockopt(CONNREDIR_SO_RECORDS) straight, so every errno is seen as is.
fn raw_set(fd: &impl AsFd, blob: &[u8]) -> std::result::Result<(), i32> {
    use std::os::fd::AsRawFd;
    // SAFETY: blob is valid for blob.len() bytes.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            connredir_abi::CONNREDIR_SOL as i32,
            connredir_abi::CONNREDIR_SO_RECORDS as i32,
            blob.as_ptr().cast(),
            blob.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn errno_name(errno: i32) -> String {
    match errno {
        libc::EINVAL => "EINVAL".into(),
        libc::EACCES => "EACCES".into(),
        libc::EPERM => "EPERM".into(),
        libc::ENOMEM => "ENOMEM".into(),
        libc::EISCONN => "EISCONN".into(),
        other => format!("errno {other}"),
    }
}

/// Sets `blob` on a new socket; when the layer takes it, connects to `dst`
/// and says where the connection went (`peer`: a service's address, or `dst`
/// itself when every service was skipped).
fn set_and_connect(blob: &[u8], dst: SocketAddr) -> Value {
    let socket = match Socket::new(Domain::for_address(dst), Type::STREAM, None) {
        Ok(s) => s,
        Err(e) => return json!({ "result": format!("socket: {e}") }),
    };
    match raw_set(&socket, blob) {
        Err(errno) => json!({ "result": errno_name(errno) }),
        Ok(()) => {
            let peer = socket
                .connect(&dst.into())
                .and_then(|()| socket.peer_addr())
                .map(|p| p.as_socket().map(|a| a.to_string()).unwrap_or_default())
                .unwrap_or_else(|e| format!("connect failed: {e}"));
            // The record the layer kept (and extended, when it redirected).
            let mut kept = vec![0u8; 4096];
            let kept = connredir::query_records_into(socket.as_fd(), &mut kept)
                .map(|n| to_hex(&kept[..n]))
                .unwrap_or_else(|e| kind(&e).into());
            json!({ "result": "ok", "peer": peer, "kept": kept })
        }
    }
}

/// The forgeries a service's process could try with a record it received
/// (`genuine`, whose last hop is its own service) to make a flow skip
/// `other` or go direct, or to lie about the client.
fn forgeries(genuine: &[u8], other: u32) -> Vec<(&'static str, Vec<u8>)> {
    let count = at!(hop_count);
    let hops = usize::from(u16::from_ne_bytes([genuine[count], genuine[count + 1]]));
    let last = hops.max(1) - 1;
    let mut cases = vec![("genuine", genuine.to_vec())];

    // The other service's hop slipped in before ours: it counts as done.
    let mut b = genuine.to_vec();
    b.copy_within(
        at!(hops) + last * HOP_SIZE..at!(hops) + hops * HOP_SIZE,
        at!(hops) + hops * HOP_SIZE,
    );
    put_u32(&mut b, hop_service_at(last), other);
    put_u16(&mut b, count, hops as u16 + 1);
    cases.push(("other-service-hop", b));

    // The same record built by hand, as a forger with the library would.
    let mut records = RedirectRecords::from_bytes(genuine).expect("a genuine record parses");
    let dst = records
        .original_destination()
        .unwrap_or_else(|| "127.0.0.9:9".parse().unwrap());
    let own = records
        .chain()
        .last()
        .copied()
        .unwrap_or(connredir::ServiceId(0));
    let mut built = RedirectRecords::new();
    built.set_client(records.client());
    built.push_hop(connredir::ServiceId(other), dst).unwrap();
    built.push_hop(own, dst).unwrap();
    cases.push(("other-service-hop-built", built.to_bytes()));

    // The last hop renamed: the record is not the caller's.
    let mut b = genuine.to_vec();
    put_u32(&mut b, hop_service_at(last), other);
    cases.push(("last-hop-other-service", b));

    // A full chain of empty hops: the hop limit sends the flow direct.
    let mut b = genuine.to_vec();
    put_u16(&mut b, count, 8);
    cases.push(("eight-empty-hops", b));

    // A full chain whose last hop is the caller's own.
    let mut b = genuine.to_vec();
    put_u16(&mut b, count, 8);
    b.copy_within(
        at!(hops) + last * HOP_SIZE..at!(hops) + (last + 1) * HOP_SIZE,
        at!(hops) + 7 * HOP_SIZE,
    );
    cases.push(("eight-hops-own-last", b));

    let mut b = genuine.to_vec();
    put_u16(&mut b, count, 9);
    cases.push(("nine-hops", b));

    // Another client: pid 1, uid 0.
    let mut b = genuine.to_vec();
    put_u32(&mut b, at!(client_pid), 1);
    put_u32(&mut b, at!(client_uid), 0);
    cases.push(("invented-client", b));

    // The record as an older version, which has no seal.
    let v1 = at!(client_comm);
    let mut b = genuine[..v1].to_vec();
    put_u16(&mut b, at!(version), 1);
    put_u16(&mut b, at!(size), v1 as u16);
    cases.push(("version-1-copy", b));

    records.set_client_command("invented");
    cases.push(("changed-command", records.to_bytes()));

    // Junk where the layer reads nothing: the same record.
    let mut b = genuine.to_vec();
    b[hop_service_at(7)..hop_service_at(8)].fill(0xa5);
    cases.push(("junk-in-unused-hops", b));

    let mut b = genuine.to_vec();
    *b.last_mut().unwrap() ^= 1;
    cases.push(("last-byte-flipped", b));
    cases
}

/// A small, seedable generator (xorshift64*), so a failing run can be
/// repeated with its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A byte position in `genuine` for a mutation: half the time one the seal
/// covers (header, used hops, command, seal), so that most mutations change
/// what the layer reads.
fn position(rng: &mut Rng, genuine: &[u8]) -> usize {
    let count = at!(hop_count);
    let hops = usize::from(u16::from_ne_bytes([genuine[count], genuine[count + 1]])).min(8);
    let used = at!(hops) + hops * HOP_SIZE;
    let tail = genuine.len() - at!(client_comm);
    match rng.below(2) {
        0 => rng.below(genuine.len()),
        _ => match rng.below(used + tail) {
            at if at < used => at,
            at => at!(client_comm) + at - used,
        },
    }
}

/// One mutation of `genuine`: bit flips, random bytes of any length up to
/// twice a record, truncations, extensions, overwritten ranges, or a
/// well-formed record with random hops, client and seal whose last hop is
/// the caller's (so it reaches the seal check).
fn mutate(rng: &mut Rng, genuine: &[u8]) -> Vec<u8> {
    let size = genuine.len();
    match rng.below(7) {
        0 => {
            let mut b = genuine.to_vec();
            for _ in 0..1 + rng.below(8) {
                let at = position(rng, genuine);
                b[at] ^= 1 << rng.below(8);
            }
            b
        }
        1 => {
            let n = rng.below(2 * size + 1);
            rng.bytes(n)
        }
        2 => genuine[..rng.below(size)].to_vec(),
        3 => {
            let mut b = genuine.to_vec();
            let extra = 1 + rng.below(size);
            b.extend(rng.bytes(extra));
            // Sometimes flip a bit of the record part too.
            if rng.below(2) == 0 {
                let at = position(rng, genuine);
                b[at] ^= 1 << rng.below(8);
            }
            b
        }
        4 => {
            let mut b = genuine.to_vec();
            let from = position(rng, genuine);
            let len = 1 + rng.below(size - from);
            let noise = rng.bytes(len);
            b[from..from + len].copy_from_slice(&noise);
            b
        }
        5 => {
            // A single byte changed to any value, anywhere.
            let mut b = genuine.to_vec();
            let at = position(rng, genuine);
            b[at] = b[at].wrapping_add(1 + rng.below(255) as u8);
            b
        }
        _ => {
            let count = at!(hop_count);
            let own_hops = usize::from(u16::from_ne_bytes([genuine[count], genuine[count + 1]]));
            let own = u32::from_ne_bytes(
                genuine[hop_service_at(own_hops.max(1) - 1)..][..4]
                    .try_into()
                    .unwrap(),
            );
            let mut b = genuine.to_vec();
            let header = at!(hop_count);
            let tail = rng.bytes(size - header);
            b[header..].copy_from_slice(&tail);
            let hops = 1 + rng.below(8);
            put_u16(&mut b, count, hops as u16);
            put_u32(&mut b, hop_service_at(hops - 1), own);
            b
        }
    }
}

/// Where a forging service's process starts: it is the service. It accepts
/// one redirected connection, prints the record it got (hex), echoes the
/// client's bytes until its end, then sets each forgery (see `forgeries`) on a new
/// socket and reports what the layer said and, when it took one, where the
/// connection to `--connect` went. With `--iterations N` it then sends N
/// random mutations through setsockopt and reports the tally.
fn forge(listen: &str, dst: SocketAddr, other: u32, iterations: u64, seed: u64) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("listen on {listen}"))?;
    println!("ready");
    let (stream, _) = listener.accept()?;
    let mut buf = vec![0u8; 4096];
    let n = connredir::query_records_into(stream.as_fd(), &mut buf)
        .map_err(|e| anyhow::anyhow!("query the records: {e}"))?;
    buf.truncate(n);
    let genuine = buf;
    emit(json!({ "record": to_hex(&genuine) }));
    // The client's exchange ends before the forgeries begin.
    let (mut read, mut write) = (&stream, &stream);
    std::io::copy(&mut read, &mut write)?;
    stream.shutdown(Shutdown::Write)?;
    for (case, blob) in forgeries(&genuine, other) {
        let mut line = set_and_connect(&blob, dst);
        line["case"] = json!(case);
        emit(line);
    }
    if iterations > 0 {
        emit(json!({ "fuzz": fuzz(&genuine, iterations, seed)? }));
    }
    Ok(())
}

/// Is `blob` the `genuine` record, as far as the layer reads it: the same
/// header, used hops, command and seal? Unused hop slots and bytes past the
/// record may differ: the layer does not read them (nor keep them).
fn same_record(blob: &[u8], genuine: &[u8]) -> bool {
    let count = at!(hop_count);
    let hops = usize::from(u16::from_ne_bytes([genuine[count], genuine[count + 1]])).min(8);
    let used = at!(hops) + hops * HOP_SIZE;
    blob.len() >= genuine.len()
        && blob[..used] == genuine[..used]
        && blob[at!(client_comm)..genuine.len()] == genuine[at!(client_comm)..]
}

/// Sends `iterations` mutations of `genuine` through the real setsockopt.
/// The oracle: the layer takes a blob only when it is the genuine record
/// (`same_record`); it refuses every other one with EINVAL or EACCES. A
/// genuine set afterwards still works.
fn fuzz(genuine: &[u8], iterations: u64, seed: u64) -> Result<Value> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let mut rng = Rng(seed | 1);
    let (mut taken, mut forged_taken, mut einval, mut eacces) = (0u64, 0u64, 0u64, 0u64);
    let mut other = std::collections::BTreeMap::<String, u64>::new();
    let mut first_forged: Option<String> = None;
    let start = std::time::Instant::now();
    for _ in 0..iterations {
        let blob = mutate(&mut rng, genuine);
        match raw_set(&socket, &blob) {
            Ok(()) if same_record(&blob, genuine) => taken += 1,
            Ok(()) => {
                forged_taken += 1;
                first_forged.get_or_insert_with(|| to_hex(&blob));
            }
            Err(libc::EINVAL) => einval += 1,
            Err(libc::EACCES) => eacces += 1,
            Err(errno) => *other.entry(errno_name(errno)).or_default() += 1,
        }
    }
    let elapsed = start.elapsed();
    let genuine_after = raw_set(&socket, genuine).map_or_else(errno_name, |()| "ok".into());
    Ok(json!({
        "iterations": iterations,
        "seed": seed,
        "elapsed_ms": elapsed.as_millis() as u64,
        "genuine_taken": taken,
        "forged_taken": forged_taken,
        "first_forged": first_forged,
        "einval": einval,
        "eacces": eacces,
        "other_errors": other,
        "genuine_after": genuine_after,
    }))
}

/// Sets a record blob given in hex (as `forge` prints it) on a new socket,
/// and, when the layer takes it, connects to `--connect`.
fn set_blob(hex: &str, dst: SocketAddr) -> Result<()> {
    let blob = from_hex(hex)?;
    emit(set_and_connect(&blob, dst));
    Ok(())
}
