//! The programs the benchmark runs inside its cgroups and namespaces: the
//! same executable, started again with `worker <role>`. The roles report on
//! stdout, each report a [`crate::wire`] type on one JSON line; servers
//! print `ready` instead.

use std::io::BufRead;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::wire::{self, Report};

/// The small request of the proxied-connection scenario: an HTTP request,
/// so the proxy's inspection recognises it.
pub const REQUEST: &[u8] =
    b"GET /bench HTTP/1.1\r\nHost: origin.bench\r\nUser-Agent: connredir-bench\r\n\r\n";

/// The origin's answer to it (about 100 bytes).
pub const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 38\r\nConnection: close\r\n\r\nhello from the connredir bench origin\n";

/// A worker role.
#[derive(Debug, Subcommand)]
pub enum Role {
    /// Connect and close (with a reset) COUNT times, one after the other.
    ConnectLoop {
        /// Where to connect.
        #[arg(long)]
        connect: SocketAddr,
        /// How many connections.
        #[arg(long)]
        count: u64,
    },
    /// A server: prints `ready`, then serves until killed.
    Server {
        /// Where to listen.
        #[arg(long)]
        listen: SocketAddr,
        /// What to do with each connection.
        #[arg(long, value_enum)]
        mode: ServerMode,
        /// Share the address with other servers (SO_REUSEPORT).
        #[arg(long)]
        reuseport: bool,
    },
    /// CONCURRENCY clients, each in a loop for DURATION: connect, send the
    /// small request, read the answer to its end, close.
    Load {
        /// Where to connect.
        #[arg(long)]
        connect: SocketAddr,
        /// Clients at once.
        #[arg(long)]
        concurrency: usize,
        /// How long, in milliseconds.
        #[arg(long)]
        duration_ms: u64,
    },
    /// One connection that asks for BYTES and reads them to the end.
    Bulk {
        /// Where to connect.
        #[arg(long)]
        connect: SocketAddr,
        /// How many bytes to download.
        #[arg(long)]
        bytes: u64,
    },
    /// CONCURRENCY DNS clients, each with one connected UDP socket, in a
    /// loop for DURATION: send an A query, wait for its answer (1 s at
    /// most), check it.
    DnsLoad {
        /// The DNS server.
        #[arg(long)]
        connect: SocketAddr,
        /// Clients at once.
        #[arg(long)]
        concurrency: usize,
        /// How long, in milliseconds.
        #[arg(long)]
        duration_ms: u64,
    },
    /// A UDP echo server: prints `ready`, then sends each datagram back to
    /// its sender until killed.
    UdpEcho {
        /// Where to receive.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// One connected UDP socket that sends BYTES in datagrams of SIZE to an
    /// echo server, WINDOW of them in flight, and reads the echoes.
    UdpBulk {
        /// The echo server.
        #[arg(long)]
        connect: SocketAddr,
        /// How many bytes to send (and have echoed).
        #[arg(long)]
        bytes: u64,
        /// Bytes per datagram.
        #[arg(long, default_value_t = 8192)]
        size: usize,
        /// Datagrams in flight.
        #[arg(long, default_value_t = 32)]
        window: usize,
    },
    /// Opens COUNT connections (round robin over the source addresses),
    /// sends a few bytes on each, reports, then waits for a line on stdin
    /// and closes them all.
    Hold {
        /// Where to connect.
        #[arg(long)]
        connect: SocketAddr,
        /// How many connections.
        #[arg(long)]
        count: usize,
        /// Local addresses to bind (port chosen at connect); none: any.
        #[arg(long = "source")]
        sources: Vec<Ipv4Addr>,
    },
}

/// What a [`Role::Server`] does with a connection.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ServerMode {
    /// Accept and close at once.
    Drop,
    /// Read the request, send [`RESPONSE`], close.
    Reply,
    /// Read a decimal byte count and a newline, send that many bytes, close.
    Bulk,
    /// Read whatever comes and keep the connection until the peer closes.
    Hold,
}

/// Runs a role.
pub fn run(role: Role) -> Result<()> {
    match role {
        Role::ConnectLoop { connect, count } => connect_loop(connect, count),
        Role::Server {
            listen,
            mode,
            reuseport,
        } => runtime()?.block_on(server(listen, mode, reuseport)),
        Role::Load {
            connect,
            concurrency,
            duration_ms,
        } => runtime()?.block_on(latency_load::<TcpClient>(
            connect,
            concurrency,
            Duration::from_millis(duration_ms),
        )),
        Role::Bulk { connect, bytes } => runtime()?.block_on(bulk(connect, bytes)),
        Role::Hold {
            connect,
            count,
            sources,
        } => hold(connect, count, &sources),
        Role::DnsLoad {
            connect,
            concurrency,
            duration_ms,
        } => runtime()?.block_on(latency_load::<DnsClient>(
            connect,
            concurrency,
            Duration::from_millis(duration_ms),
        )),
        Role::UdpEcho { listen } => udp_echo(listen),
        Role::UdpBulk {
            connect,
            bytes,
            size,
            window,
        } => udp_bulk(connect, bytes, size, window),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Prints `report` as its line, for the driver.
fn emit(report: &impl Report) {
    println!("{}", report.to_line());
}

/// Connects and closes `count` times with a reset on close (no TIME_WAIT
/// piles up): the layer-overhead workload.
fn connect_loop(addr: SocketAddr, count: u64) -> Result<()> {
    let start = Instant::now();
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_linger(Some(Duration::ZERO))?;
        socket.connect(&addr.into())?;
    }
    emit(&wire::ConnectLoop {
        count,
        elapsed_ns: start.elapsed().as_nanos() as u64,
    });
    Ok(())
}

async fn server(addr: SocketAddr, mode: ServerMode, reuseport: bool) -> Result<()> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(reuseport)?;
    socket.bind(addr)?;
    // A deep backlog: an overflowing accept queue drops SYNs, and a
    // dropped SYN costs a one-second retransmit.
    let listener: TcpListener = socket.listen(65_535)?;
    println!("ready");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        match mode {
            ServerMode::Drop => drop(stream),
            ServerMode::Reply => {
                tokio::spawn(reply(stream));
            }
            ServerMode::Bulk => {
                tokio::spawn(send_bulk(stream));
            }
            ServerMode::Hold => {
                tokio::spawn(keep(stream));
            }
        }
    }
}

async fn reply(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 || len + n == buf.len() {
            break;
        }
        len += n;
    }
    stream.write_all(RESPONSE).await?;
    stream.shutdown().await
}

async fn send_bulk(mut stream: TcpStream) -> std::io::Result<()> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).await? == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    let mut left: u64 = String::from_utf8_lossy(&line).trim().parse().unwrap_or(0);
    let chunk = vec![0x5a; 256 * 1024];
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..n]).await?;
        left -= n as u64;
    }
    stream.shutdown().await
}

async fn keep(mut stream: TcpStream) {
    let mut buf = [0u8; 64];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// One client of a latency load ([`latency_load`]): how it starts and what
/// one request is; the loop, the tally and the report are shared.
trait LoadClient: Sized + Send + 'static {
    /// How long a client waits after a failed request before the next.
    const PAUSE_AFTER_ERROR: Duration = Duration::ZERO;

    /// Sets up client number `index` of a load on `addr`.
    fn start(
        addr: SocketAddr,
        index: usize,
    ) -> impl std::future::Future<Output = std::io::Result<Self>> + Send;

    /// Makes one request; returns its latency in microseconds.
    fn request(&mut self) -> impl std::future::Future<Output = std::io::Result<u32>> + Send;
}

/// What one client of a latency load counted.
#[derive(Default)]
struct Tally {
    latencies: Vec<u32>,
    errors: u64,
    last_error: Option<String>,
}

impl Tally {
    fn failed(&mut self, e: std::io::Error) {
        self.errors += 1;
        self.last_error = Some(e.to_string());
    }
}

/// Runs `concurrency` clients of type `C` against `addr`, each making
/// requests one after the other until `duration` is over, and reports them
/// all as one [`wire::Load`]. A client that cannot start counts as one
/// failure.
async fn latency_load<C: LoadClient>(
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
) -> Result<()> {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let mut tasks = Vec::new();
    for index in 0..concurrency {
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut client = match C::start(addr, index).await {
                Ok(client) => client,
                Err(e) => {
                    tally.failed(e);
                    return tally;
                }
            };
            while tokio::time::Instant::now() < deadline {
                match client.request().await {
                    Ok(latency) => tally.latencies.push(latency),
                    Err(e) => {
                        tally.failed(e);
                        if !C::PAUSE_AFTER_ERROR.is_zero() {
                            tokio::time::sleep(C::PAUSE_AFTER_ERROR).await;
                        }
                    }
                }
            }
            tally
        }));
    }
    let mut all = Vec::new();
    let (mut errors, mut last_error) = (0, None);
    for task in tasks {
        let tally = task.await?;
        all.extend(tally.latencies);
        errors += tally.errors;
        last_error = last_error.or(tally.last_error);
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    emit(&wire::Load {
        count: all.len() as u64,
        elapsed_ns: elapsed.as_nanos() as u64,
        errors,
        last_error,
        p50_us: percentile(&all, 0.50),
        p99_us: percentile(&all, 0.99),
    });
    Ok(())
}

/// A client of the `load` role: a connection per request, the small
/// request, the answer read to its end; the latency is to its first byte.
struct TcpClient {
    addr: SocketAddr,
    buf: Vec<u8>,
}

impl LoadClient for TcpClient {
    // A refused or reset connection fails at once: without a pause a
    // client would spin on it.
    const PAUSE_AFTER_ERROR: Duration = Duration::from_millis(1);

    async fn start(addr: SocketAddr, _index: usize) -> std::io::Result<TcpClient> {
        Ok(TcpClient {
            addr,
            buf: vec![0u8; 4096],
        })
    }

    async fn request(&mut self) -> std::io::Result<u32> {
        let t0 = Instant::now();
        let mut stream = TcpStream::connect(self.addr).await?;
        stream.write_all(REQUEST).await?;
        let n = stream.read(&mut self.buf).await?;
        let first = t0.elapsed().as_micros() as u32;
        let mut total = n;
        if n > 0 {
            loop {
                let n = stream.read(&mut self.buf).await?;
                if n == 0 {
                    break;
                }
                total += n;
            }
        }
        if total != RESPONSE.len() {
            return Err(std::io::Error::other(format!(
                "answer of {total} bytes, expected {}",
                RESPONSE.len()
            )));
        }
        Ok(first)
    }
}

async fn bulk(addr: SocketAddr, bytes: u64) -> Result<()> {
    let start = Instant::now();
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(format!("{bytes}\n").as_bytes()).await?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let elapsed = start.elapsed();
    anyhow::ensure!(got == bytes, "got {got} bytes of {bytes}");
    emit_bulk(got, elapsed);
    Ok(())
}

/// Reports a bulk transfer (`bulk`, `udp-bulk`): `bytes` moved in `elapsed`.
fn emit_bulk(bytes: u64, elapsed: Duration) {
    emit(&wire::Bulk {
        bytes,
        elapsed_ns: elapsed.as_nanos() as u64,
    });
}

/// The unspecified local address of `addr`'s family, any port: where a
/// UDP client binds before it connects.
fn any_local(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// IP_BIND_ADDRESS_NO_PORT: bind the address now, the port at connect.
fn set_bind_address_no_port(socket: &Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int option on a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of_val(&on) as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn hold(addr: SocketAddr, count: usize, sources: &[Ipv4Addr]) -> Result<()> {
    let start = Instant::now();
    let mut open = Vec::with_capacity(count);
    for i in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        if !sources.is_empty() {
            // Let connect pick the port, so each source address has the
            // whole port range for this destination.
            set_bind_address_no_port(&socket)?;
            let src = SocketAddr::from((sources[i % sources.len()], 0));
            socket.bind(&src.into())?;
        }
        socket
            .connect(&addr.into())
            .with_context(|| format!("connection {i} to {addr}"))?;
        socket.send(b"hold\r\n\r\n")?;
        socket.set_linger(Some(Duration::ZERO))?;
        open.push(socket);
    }
    emit(&wire::HoldOpened {
        elapsed_ns: start.elapsed().as_nanos() as u64,
        opened: open.len() as u64,
    });
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    drop(open);
    emit(&wire::HoldClosed {
        closed: count as u64,
    });
    Ok(())
}

/// The name every DNS query of [`DnsClient`] asks for (the origin answers it
/// from its configuration).
pub const DNS_NAME: &str = "bench.example.test";

/// A DNS query for [`DNS_NAME`], type A, recursion desired, with `id`.
fn dns_query(id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(40);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in DNS_NAME.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Checks an answer to [`dns_query`]`(id)`: same id, a response, NOERROR,
/// at least one answer record.
fn dns_answer_ok(answer: &[u8], id: u16) -> std::io::Result<()> {
    let ok = answer.len() >= 12
        && answer[..2] == id.to_be_bytes()
        && answer[2] & 0x80 != 0
        && answer[3] & 0x0f == 0
        && u16::from_be_bytes([answer[6], answer[7]]) > 0;
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "not a good answer to query {id}: {:02x?}",
            &answer[..answer.len().min(12)]
        )))
    }
}

/// A client of the `dns-load` role: one connected UDP socket, an A query
/// per request, its answer awaited (1 s at most) and checked.
struct DnsClient {
    socket: tokio::net::UdpSocket,
    buf: Vec<u8>,
    id: u16,
}

impl LoadClient for DnsClient {
    async fn start(addr: SocketAddr, index: usize) -> std::io::Result<DnsClient> {
        let socket = tokio::net::UdpSocket::bind(any_local(addr)).await?;
        socket.connect(addr).await?;
        Ok(DnsClient {
            socket,
            buf: vec![0u8; 1500],
            id: (index as u16).wrapping_mul(4099),
        })
    }

    async fn request(&mut self) -> std::io::Result<u32> {
        self.id = self.id.wrapping_add(1);
        let id = self.id;
        let t0 = Instant::now();
        self.socket.send(&dns_query(id)).await?;
        // A late answer to an earlier query is skipped.
        loop {
            let n = tokio::time::timeout(Duration::from_secs(1), self.socket.recv(&mut self.buf))
                .await
                .map_err(|_| std::io::Error::other("no answer within 1 s"))??;
            if n >= 2 && self.buf[..2] != id.to_be_bytes() {
                continue;
            }
            dns_answer_ok(&self.buf[..n], id)?;
            return Ok(t0.elapsed().as_micros() as u32);
        }
    }
}

fn udp_echo(addr: SocketAddr) -> Result<()> {
    let socket = std::net::UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
    println!("ready");
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        // A full send buffer drops the echo, as the network would.
        let _ = socket.send_to(&buf[..n], from);
    }
}

/// Sends `bytes` in datagrams of `size` with `window` in flight and reads
/// the echoes; a datagram lost (no echo within 200 ms) is counted and its
/// place in the window given to the next. Reports the bytes echoed.
fn udp_bulk(addr: SocketAddr, bytes: u64, size: usize, window: usize) -> Result<()> {
    let socket = std::net::UdpSocket::bind(any_local(addr))?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let datagram = vec![0x5au8; size];
    let mut buf = vec![0u8; 65_536];
    let total = bytes.div_ceil(size as u64);
    let start = Instant::now();
    let (mut sent, mut in_flight, mut echoed, mut lost) = (0u64, 0usize, 0u64, 0u64);
    while sent < total || in_flight > 0 {
        while in_flight < window && sent < total {
            socket.send(&datagram)?;
            sent += 1;
            in_flight += 1;
        }
        match socket.recv(&mut buf) {
            Ok(n) => {
                echoed += n as u64;
                in_flight -= 1;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                lost += in_flight as u64;
                in_flight = 0;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let elapsed = start.elapsed();
    anyhow::ensure!(
        lost * 10 <= total,
        "{lost} of {total} datagrams lost: not a throughput figure"
    );
    emit_bulk(echoed, elapsed);
    Ok(())
}
