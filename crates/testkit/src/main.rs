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
//! connredir-testkit attack CASE ADDR [ARG]
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

use anyhow::{bail, Context, Result};
use connredir::{Error as RedirectError, RedirectRecords};
use serde_json::{json, Value};
use socket2::{Domain, Socket, Type};

mod attack;
mod isolation;

fn main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(at) = args.iter().position(|a| a == "--retry-eagain") {
        args.remove(at);
        RETRY_EAGAIN.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    match args.first().map(String::as_str) {
        Some("proxy") => proxy(&args[1..]),
        Some("client") => client(&args[1..]),
        Some("probe") => probe(&args[1..]),
        Some("connect-loop") => connect_loop(&args[1..]),
        Some("many") => many(&args[1..]),
        Some("hold") => hold(&args[1..]),
        Some("echo") => echo(&args[1..]),
        Some("attack") => {
            emit(attack::run(&args[1..])?);
            Ok(())
        }
        Some("netns-attacker") => isolation::netns_attacker(&args[1..]),
        Some("stalled-service") => isolation::stalled_service(&args[1..]),
        Some("bound-client") => isolation::bound_client(&args[1..]),
        Some("service-probe") => isolation::service_probe(&args[1..]),
        _ => bail!("usage: connredir-testkit [--retry-eagain] proxy|client|probe|connect-loop|many|hold|echo|attack|netns-attacker|stalled-service|bound-client|service-probe ..."),
    }
}

/// Values of a repeated `--flag VALUE` option.
fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

fn value<'a>(args: &'a [String], flag: &str) -> Result<&'a str> {
    values(args, flag)
        .first()
        .copied()
        .with_context(|| format!("missing {flag}"))
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

fn proxy(args: &[String]) -> Result<()> {
    let options = ProxyOptions {
        name: value(args, "--name")?.to_string(),
        set_records: !args.iter().any(|a| a == "--no-records"),
        check_buffers: args.iter().any(|a| a == "--check-buffers"),
        delay_connect: values(args, "--delay-connect-ms")
            .first()
            .map(|ms| ms.parse().map(std::time::Duration::from_millis))
            .transpose()?,
    };
    let reuseport = args.iter().any(|a| a == "--reuseport");
    let options = std::sync::Arc::new(options);
    let mut threads = Vec::new();
    for addr in values(args, "--listen") {
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
fn echo(args: &[String]) -> Result<()> {
    let addr = value(args, "--listen")?;
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

fn client(args: &[String]) -> Result<()> {
    let addr: SocketAddr = value(args, "--connect")?.parse()?;
    let bytes: usize = value(args, "--bytes")?.parse()?;
    let half_close = !args.iter().any(|a| a == "--no-half-close");
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
fn many(args: &[String]) -> Result<()> {
    let addr: SocketAddr = value(args, "--connect")?.parse()?;
    let half_close = !args.iter().any(|a| a == "--no-half-close");
    let sizes: Vec<usize> = value(args, "--sizes")?
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
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

fn probe(args: &[String]) -> Result<()> {
    let case = args.first().context("missing probe case")?.as_str();
    let addr = || -> Result<SocketAddr> { Ok(args.get(1).context("missing ADDR")?.parse()?) };
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
        "connected-query" => outcome(&connredir::query_records(&TcpStream::connect(addr()?)?)),
        other => bail!("unknown probe case {other}"),
    };
    emit(json!({ "case": case, "result": result }));
    Ok(())
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
fn connect_loop(args: &[String]) -> Result<()> {
    let addr: SocketAddr = value(args, "--connect")?.parse()?;
    let count: u64 = value(args, "--count")?.parse()?;
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
fn hold(args: &[String]) -> Result<()> {
    let addr: SocketAddr = value(args, "--connect")?.parse()?;
    let until = std::path::PathBuf::from(value(args, "--until")?);
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
