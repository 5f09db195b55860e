//! `connredir-proxy`: the reference inspecting proxy for connredir.
//!
//! `main` reads the command line, binds the listeners (one per `--listen`
//! address and worker, SO_REUSEPORT when there are several workers), checks
//! that the layer knows each as a registered service (unless
//! `--standalone`), prints `ready`, and starts the workers: each a thread
//! with an event loop of its own, running an accept loop per listener of
//! its own; each connection is a task ([`conn::handle`]) on the worker that
//! accepted it, which logs one JSON line when it ends. UDP runs on the main
//! event loop. SIGINT/SIGTERM stop accepting, let connections drain, then
//! close the rest.

mod conn;
mod dns;
mod http;
mod inspect;
mod log;
mod policy;
mod relay;
mod udp;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgGroup, Parser};
use connredir::ServiceId;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{info, warn};

use crate::conn::{Listener, Redirect, Settings};
use crate::dns::DenyAnswer;
use crate::log::LogSink;
use crate::policy::{Policy, Rule};
use crate::relay::Mode;
use crate::udp::UdpSettings;

const ABOUT: &str = "\
A transparent TCP and UDP proxy that takes part in connredir redirect chains.

The connredir layer sends selected outbound connections to this proxy. For each
one it reads the redirect records (the services that already handled the flow)
and the original destination, applies its rules, opens its own connection to
that destination carrying the same records (so the flow goes on to the next
service in the chain, or to the destination, and never back here), looks at
what the client sends first (TLS server name, HTTP request line and Host) and
relays the bytes both ways (splice(2) unless --no-splice). Each connection ends with one JSON line on stdout
(or --log FILE): who, where, what, how many bytes, and the verdict.

UDP (--udp-listen): each client address is a flow with a socket of its own
(bound to the service address, connected to the client), its records and
destination read there, relayed datagram by datagram until idle
(--udp-idle-timeout, or --udp-replied-timeout once answered). Flows to port 53 are read as DNS: one JSON line per
query (name, type, the answer's response code), and dns rules answered here.";

const EXAMPLES: &str = "\
Rules (--rule ACTION:KIND:VALUE, repeatable) are checked in the order given; the
first that matches decides; a flow that matches none is allowed.
  ACTION  allow | deny
  KIND    host  server name (TLS SNI, else HTTP Host), case-insensitive glob (* and ?):
                *.example.com (subdomains, not example.com itself), example.com;
                TCP only (a UDP flow names no host)
          dns   the name a DNS query over UDP asks for (flows to --dns-port), the
                same glob: *.ads.example; each query is decided on its own, a
                denied one answered here with REFUSED (--dns-deny-answer)
          dst   destination address or prefix: 10.0.0.0/8, 2001:db8::/32, 192.0.2.7
          port  destination port or range, both protocols or one: 25, 8000-8999,
                443/udp (QUIC: browsers fall back to TCP, where host rules see it)
A denied HTTP request gets a 403; anything else denied is closed. Destination
and port rules decide before the onward connection is opened; host rules after
the client's first bytes, and then not one byte reaches the server. A flow
whose first bytes name no host (none in --inspect-timeout, none in the first
16 KiB, or neither TLS nor HTTP) is denied by the first host rule reached,
unless --allow-unknown-host. Under a host rule every HTTP/1 request on a
connection is checked (Host header and absolute-form target alike). Likewise a
DNS query the proxy cannot read (truncated, malformed) is dropped, unanswered,
by the first dns rule reached (unless --allow-unknown-host), and relayed as it
is when no dns rule is reached. DNS over TCP is not read: add deny:port:53/tcp
where dns rules must hold.

Examples:
  connredir-proxy --name inspector --listen 127.0.0.1:15001 --listen [::1]:15001
  connredir-proxy --name filter --listen 127.0.0.1:15002 \\
      --rule allow:host:*.corp.example --rule deny:host:*.example \\
      --rule deny:port:25 --rule deny:dst:10.0.0.0/8 --log /var/log/filter.jsonl
  connredir-proxy --name dns --udp-listen 127.0.0.1:15053 \\
      --rule deny:dns:*.ads.example --rule deny:port:443/udp
  connredir-proxy --name forwarder --standalone --udp-listen 127.0.0.1:5353 \\
      --udp-upstream 192.0.2.53:53 --rule deny:dns:*.ads.example
Register it with the layer first: at startup each --listen address must be a
registered service, or the proxy exits (code 2) saying what to do; --standalone
runs it without the layer (SO_ORIGINAL_DST only, e.g. behind iptables REDIRECT;
for UDP, which has no SO_ORIGINAL_DST, --udp-upstream names the destination).
  connredir service add --name inspector --listen 127.0.0.1:15001 --uid $(id -u)";

/// The command line.
#[derive(Debug, Parser)]
#[command(version, about = ABOUT, after_help = EXAMPLES)]
#[command(group(ArgGroup::new("listeners").required(true).multiple(true).args(["listen", "udp_listen"])))]
struct Cli {
    /// This proxy's name in the log.
    #[arg(long)]
    name: String,
    /// TCP address to listen on (IPv4 or IPv6); repeat for several.
    #[arg(long, value_name = "ADDR")]
    listen: Vec<SocketAddr>,
    /// UDP address to receive flows on (IPv4 or IPv6, a concrete address:
    /// replies leave from it); repeat for several. A separate option, so
    /// that each protocol's service address is said: give the same address
    /// to --listen and --udp-listen for both.
    #[arg(long, value_name = "ADDR")]
    udp_listen: Vec<SocketAddr>,
    /// End a UDP flow whose destination has not answered yet after this
    /// long without a datagram either way (as conntrack's unreplied UDP
    /// timeout).
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_positive_duration)]
    udp_idle_timeout: Duration,
    /// End a UDP flow whose destination has answered after this long
    /// without a datagram either way (as conntrack's replied UDP timeout).
    #[arg(long, default_value = "120s", value_name = "DURATION", value_parser = parse_positive_duration)]
    udp_replied_timeout: Duration,
    /// At most this many UDP flows at once per --udp-listen address (each
    /// holds two sockets); datagrams from new client addresses past it are
    /// dropped and counted in the log.
    #[arg(long, default_value = "1024", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_udp_flows: u32,
    /// Where UDP flows go that the layer did not redirect (with
    /// --standalone: every flow). Makes the proxy a plain forwarder, e.g. a
    /// filtering DNS forwarder; without it such flows are dropped.
    #[arg(long, value_name = "ADDR")]
    udp_upstream: Option<SocketAddr>,
    /// UDP flows to this destination port are read as DNS; repeat for
    /// several.
    #[arg(long = "dns-port", value_name = "PORT", default_value = "53")]
    dns_ports: Vec<u16>,
    /// How a DNS query denied by a dns rule is answered.
    #[arg(long, value_enum, default_value_t = DenyAnswer::Refused, value_name = "CODE")]
    dns_deny_answer: DenyAnswer,
    /// A policy rule, ACTION:KIND:VALUE (see below); repeat, first match wins.
    #[arg(long = "rule", value_name = "ACTION:KIND:VALUE")]
    rules: Vec<Rule>,
    /// Close a connection after this long without a byte either way.
    #[arg(long, default_value = "300s", value_name = "DURATION", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// At SIGINT/SIGTERM, how long open connections may still run.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// How long the client's first bytes may take to name a host (TLS SNI,
    /// HTTP Host). Past it, a flow a host rule would decide is denied
    /// (unless --allow-unknown-host); any other is relayed as it is.
    #[arg(long, default_value = "2s", value_name = "DURATION", value_parser = parse_duration)]
    inspect_timeout: Duration,
    /// Let a flow whose first bytes named no host (too late, too large,
    /// neither TLS nor HTTP) pass host rules instead of being denied by the
    /// first one reached.
    #[arg(long)]
    allow_unknown_host: bool,
    /// Close a connection whose client sent nothing at all for this long
    /// after connecting (raise it for server-first protocols whose client
    /// may wait longer).
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_positive_duration)]
    first_bytes_timeout: Duration,
    /// At most this many connections at once; more are closed at once, each
    /// with a log line.
    #[arg(long, default_value = "4096", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Worker threads (default: the number of CPUs this process may run
    /// on). Each has its own listening socket per --listen address
    /// (SO_REUSEPORT: the kernel spreads new connections over them) and
    /// its own event loop, which runs the connections it accepted: accept,
    /// inspection and logging run on every core instead of funnelling
    /// through one acceptor, and a connection never moves between threads.
    /// --max-connections counts across all of them.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    workers: Option<u32>,
    /// How long connecting to the destination may take.
    #[arg(long, default_value = "10s", value_name = "DURATION", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Where the JSON lines go: a file (appended), or - for stdout.
    #[arg(long, value_name = "FILE|-", default_value = "-")]
    log: PathBuf,
    /// Relay with read/write instead of zero-copy splice(2) (and never
    /// cut through).
    #[arg(long)]
    no_splice: bool,
    /// Keep relaying flows accelerated on both legs in the proxy. By
    /// default, once a direction of such a flow has moved its first 64 KiB
    /// (inspected), the proxy hands it to the kernel, which moves the rest
    /// socket to socket past the proxy (cut-through).
    #[arg(long)]
    no_cut_through: bool,
    /// Run without the connredir layer: do not require each --listen address
    /// to be a registered service, and find destinations with SO_ORIGINAL_DST
    /// only (e.g. behind iptables REDIRECT), without redirect records; UDP
    /// flows go to --udp-upstream, which is then required with --udp-listen.
    #[arg(long)]
    standalone: bool,
}

/// Durations as humantime reads them (`500ms`, `2s`, `5m`, `1h 30m`); a bare
/// number is seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map(Duration::from_secs)
            .map_err(|e| format!("{text:?}: {e}"));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration such as 500ms, 2s, 5m or 1h: {e}"))
}

/// A duration above zero (zero would close every connection at once).
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err(format!("{text:?}: must be more than zero")),
        d => Ok(d),
    }
}

/// Startup failures: the configuration cannot work (exit code 2).
#[derive(Debug, thiserror::Error)]
enum StartupError {
    #[error("{0} is already in use by another process: choose another --listen address or stop that process")]
    InUse(SocketAddr),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("cannot open the log file {0}: {1}")]
    Log(PathBuf, #[source] std::io::Error),
    #[error(
        "{addr} is not a registered connredir service: no connection would be redirected here, \
         and this proxy's own connections would be redirected like anybody's. Register it first: \
         `connredir service add --name {name} --listen {addr} --cgroup DIR|--uid UID|--pid PID`, \
         or a [[service]] with listen = [\"{addr}\"] in the configuration of `connredir up`; \
         or pass --standalone to run without the layer (SO_ORIGINAL_DST only)"
    )]
    NotRegistered { addr: SocketAddr, name: String },
    #[error(
        "{0} is not a registered connredir service, and cannot be one: services listen on a \
         concrete address (such as 127.0.0.1:15001). Listen on the address the service is \
         registered with, or pass --standalone to run without the layer (SO_ORIGINAL_DST only)"
    )]
    Unspecified(SocketAddr),
    #[error(
        "the connredir layer is not active for this process (checked on {0}): start `connredir up` \
         and run this proxy in a cgroup of its scope (e.g. `connredir run -- connredir-proxy ...`), \
         or pass --standalone to run without the layer (SO_ORIGINAL_DST only)"
    )]
    LayerNotActive(SocketAddr),
    #[error("cannot ask the connredir layer which service listens on {0}: {1}")]
    ServiceCheck(SocketAddr, #[source] connredir::ServiceError),
    #[error(
        "--udp-listen {0}: a UDP service needs a concrete address (such as 127.0.0.1:15053), \
         since each flow's socket is bound to the address its client sent to"
    )]
    UdpUnspecified(SocketAddr),
    #[error(
        "--udp-listen with --standalone needs --udp-upstream: without the layer a UDP flow \
         has no original destination (there is no SO_ORIGINAL_DST for UDP)"
    )]
    UdpNeedsUpstream,
}

/// Where the proxy is in its life; connections and accept loops watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepting and relaying.
    Running,
    /// No new connections; open ones finish.
    Draining,
    /// The drain timeout passed: close what is left.
    Closing,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("connredir-proxy: {e:#}");
            let startup = e.downcast_ref::<StartupError>().is_some();
            ExitCode::from(if startup { 2 } else { 1 })
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let sink = if cli.log.as_os_str() == "-" {
        LogSink::stdout()
    } else {
        LogSink::file(&cli.log).map_err(|e| StartupError::Log(cli.log.clone(), e))?
    };
    let workers = cli.workers.unwrap_or_else(default_workers);
    // Per --listen address, one listener per worker.
    let listeners = cli
        .listen
        .iter()
        .map(|&addr| bind_group(addr, workers))
        .collect::<Result<Vec<_>, _>>()?;
    if cli.standalone && !cli.udp_listen.is_empty() && cli.udp_upstream.is_none() {
        return Err(StartupError::UdpNeedsUpstream.into());
    }
    let udp_listeners = cli
        .udp_listen
        .iter()
        .map(|&addr| bind_udp(addr))
        .collect::<Result<Vec<_>, _>>()?;
    let mut udp_infos = Vec::with_capacity(udp_listeners.len());
    for (socket, &addr) in udp_listeners.iter().zip(&cli.udp_listen) {
        let addr = socket.local_addr().unwrap_or(addr);
        let service = if cli.standalone {
            None
        } else {
            check_registered_udp(socket, addr, &cli.name)?
        };
        udp_infos.push(Listener {
            addr: Some(addr),
            service,
            ..Listener::default()
        });
    }
    let mut infos = Vec::with_capacity(listeners.len());
    for (group, &requested) in listeners.iter().zip(&cli.listen) {
        let addr = group[0].local_addr().unwrap_or(requested);
        // Every listener of the group must be the service's: the layer
        // checks whichever one the kernel would pick for a connect.
        let mut service = None;
        if !cli.standalone {
            for listener in group {
                service = Some(check_registered(listener, addr, &cli.name)?);
            }
        }
        infos.push(Listener {
            addr: (!addr.ip().is_unspecified()).then_some(addr),
            service,
            worker: 0,
        });
    }
    // Each worker's event loop, with its own listeners registered in it.
    let mut groups: Vec<_> = listeners.into_iter().map(Vec::into_iter).collect();
    let mut loops = Vec::with_capacity(workers as usize);
    for worker in 0..workers {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a worker's event loop")?;
        let own = {
            let _registering = runtime.enter();
            groups
                .iter_mut()
                .zip(&infos)
                .map(|(group, info)| {
                    let listener = group.next().expect("one listener per worker");
                    let info = Listener { worker, ..*info };
                    TcpListener::from_std(listener).map(|l| (l, info))
                })
                .collect::<Result<Vec<_>, _>>()
                .context("registering a listener with a worker's event loop")?
        };
        loops.push((runtime, own));
    }
    // Before `ready`, so a supervisor's signal right after it is handled.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // Tests and supervisors wait for this line; after it stdout is JSON only.
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready")
        .and_then(|()| stdout.flush())
        .context("writing to stdout")?;
    info!(name = %cli.name, listen = ?cli.listen, udp_listen = ?cli.udp_listen,
          rules = cli.rules.len(), "listening");

    let settings = Arc::new(Settings {
        name: cli.name,
        policy: Policy::new(cli.rules, cli.allow_unknown_host).with_dns_ports(cli.dns_ports),
        mode: if cli.no_splice {
            Mode::Copy
        } else {
            Mode::Splice
        },
        cut_through: !cli.no_cut_through,
        idle_timeout: cli.idle_timeout,
        inspect_timeout: cli.inspect_timeout,
        first_bytes_timeout: cli.first_bytes_timeout,
        connect_timeout: cli.connect_timeout,
        standalone: cli.standalone,
    });
    let sink = Arc::new(sink);
    let limit = Arc::new(Limit::new(cli.max_connections));
    let (phase, phase_rx) = watch::channel(Phase::Running);
    // Every task holds a sender; `recv` returns None once all are gone.
    let (done_tx, mut all_done) = mpsc::channel::<()>(1);
    for (worker, (runtime, own)) in loops.into_iter().enumerate() {
        let (settings, sink, limit) = (settings.clone(), sink.clone(), limit.clone());
        let (phase, done) = (phase_rx.clone(), done_tx.clone());
        std::thread::Builder::new()
            .name(format!("worker-{worker}"))
            .spawn(move || {
                runtime.block_on(serve_worker(own, settings, sink, limit, phase));
                // Dropped once the worker's connections are all done.
                drop(done);
            })
            .context("starting a worker thread")?;
    }
    let udp = Arc::new(UdpSettings {
        idle_timeout: cli.udp_idle_timeout,
        replied_timeout: cli.udp_replied_timeout,
        max_flows: cli.max_udp_flows as usize,
        upstream: cli.udp_upstream,
        deny_answer: cli.dns_deny_answer,
    });
    for (socket, info) in udp_listeners.into_iter().zip(udp_infos) {
        tokio::spawn(udp::front(
            socket,
            info,
            settings.clone(),
            udp.clone(),
            sink.clone(),
            phase_rx.clone(),
            done_tx.clone(),
        ));
    }
    drop(done_tx);

    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = int.recv() => info!("SIGINT"),
    }
    info!(drain = ?cli.drain_timeout, "stopping: no new connections, draining open ones");
    phase.send_replace(Phase::Draining);
    if tokio::time::timeout(cli.drain_timeout, all_done.recv())
        .await
        .is_err()
    {
        info!("drain timeout: closing the remaining connections");
        phase.send_replace(Phase::Closing);
        all_done.recv().await;
    }
    Ok(())
}

/// The number of CPUs this process may run on (its affinity and cgroup
/// quota), the default `--workers`.
fn default_workers() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(1024) as u32)
}

/// Binds `workers` listeners on `addr`: one plain listener for one worker,
/// else a SO_REUSEPORT group (all on the first one's port when `addr` asks
/// for any port). An address already in use is refused as with one
/// listener, never joined: a SO_REUSEPORT group another process of this
/// user left open on it would otherwise take a share of the connections.
fn bind_group(addr: SocketAddr, workers: u32) -> Result<Vec<std::net::TcpListener>, StartupError> {
    if workers == 1 {
        return Ok(vec![bind(addr, false)?]);
    }
    // A bind without SO_REUSEPORT conflicts with any socket on the address
    // (a listener, or a group of any user): it says whether the address is
    // free, and which port a request for any port gets.
    let addr = bind_socket(addr, false)?
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(addr);
    (0..workers).map(|_| bind(addr, true)).collect()
}

/// Binds one listener (with SO_REUSEPORT when `reuseport`). IPv6 sockets
/// are IPv6-only, so `[::]:P` and `0.0.0.0:P` can both be given.
fn bind(addr: SocketAddr, reuseport: bool) -> Result<std::net::TcpListener, StartupError> {
    let socket = bind_socket(addr, reuseport)?;
    socket.listen(1024).map_err(|e| bind_error(addr, e))?;
    Ok(socket.into())
}

/// A bound TCP socket, non-blocking, with the options every accepted
/// socket inherits.
fn bind_socket(addr: SocketAddr, reuseport: bool) -> Result<Socket, StartupError> {
    let fail = |e| bind_error(addr, e);
    // Non-blocking from the start: no fcntl before the event loop takes it.
    let kind = Type::STREAM.nonblocking();
    let socket = Socket::new(Domain::for_address(addr), kind, Some(Protocol::TCP)).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    // Accepted sockets inherit it: one setsockopt here, none per connection.
    socket.set_nodelay(true).map_err(fail)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(fail)?;
    }
    if reuseport {
        socket.set_reuse_port(true).map_err(fail)?;
    }
    socket.bind(&addr.into()).map_err(fail)?;
    Ok(socket)
}

/// A bind or listen failure, naming an address in use as such.
fn bind_error(addr: SocketAddr, e: std::io::Error) -> StartupError {
    match e.raw_os_error() {
        Some(libc::EADDRINUSE) => StartupError::InUse(addr),
        _ => StartupError::Bind(addr, e),
    }
}

/// Binds one UDP address (see `udp::bind`); an unspecified address is
/// refused.
fn bind_udp(addr: SocketAddr) -> Result<tokio::net::UdpSocket, StartupError> {
    if addr.ip().is_unspecified() {
        return Err(StartupError::UdpUnspecified(addr));
    }
    udp::bind(addr).map_err(|e| match e.raw_os_error() {
        Some(libc::EADDRINUSE) => StartupError::InUse(addr),
        _ => StartupError::Bind(addr, e),
    })
}

/// As [`check_registered`], for a UDP address (the layer answers on a bound
/// UDP socket). A layer from before UDP services answers the service
/// question for listening TCP sockets only, and says "not listening": then
/// the check cannot be made, which is said, and the proxy goes on.
fn check_registered_udp(
    socket: &tokio::net::UdpSocket,
    addr: SocketAddr,
    name: &str,
) -> Result<Option<ServiceId>, StartupError> {
    match connredir::registered_service(socket) {
        Ok(id) => {
            info!(%addr, service = id.0, "registered UDP service");
            Ok(Some(id))
        }
        Err(connredir::ServiceError::NotListening) => {
            warn!(%addr, "the connredir layer does not say which service a UDP address is: \
                   cannot check that this one is registered");
            Ok(None)
        }
        Err(connredir::ServiceError::NotRegistered(_)) => Err(StartupError::NotRegistered {
            addr,
            name: name.to_string(),
        }),
        Err(connredir::ServiceError::LayerNotActive(_)) => Err(StartupError::LayerNotActive(addr)),
        Err(e) => Err(StartupError::ServiceCheck(addr, e)),
    }
}

/// Checks that the layer knows `listener`'s address (`addr`) as a service's,
/// and returns that service.
fn check_registered(
    listener: &std::net::TcpListener,
    addr: SocketAddr,
    name: &str,
) -> Result<ServiceId, StartupError> {
    match connredir::registered_service(listener) {
        Ok(id) => {
            info!(%addr, service = id.0, "registered service");
            Ok(id)
        }
        Err(connredir::ServiceError::NotRegistered(_)) if addr.ip().is_unspecified() => {
            Err(StartupError::Unspecified(addr))
        }
        Err(connredir::ServiceError::NotRegistered(_)) => Err(StartupError::NotRegistered {
            addr,
            name: name.to_string(),
        }),
        Err(connredir::ServiceError::LayerNotActive(_)) => Err(StartupError::LayerNotActive(addr)),
        Err(e) => Err(StartupError::ServiceCheck(addr, e)),
    }
}

/// The cap on concurrent connections (`--max-connections`).
struct Limit {
    max: u32,
    slots: Arc<Semaphore>,
    /// Connections refused since the last warning, and when that was.
    refused: std::sync::Mutex<(u64, Option<std::time::Instant>)>,
}

impl Limit {
    /// How often, at most, the proxy warns that it refuses connections.
    const WARN_EVERY: Duration = Duration::from_secs(10);

    fn new(max: u32) -> Limit {
        Limit {
            max,
            slots: Arc::new(Semaphore::new(max as usize)),
            refused: std::sync::Mutex::new((0, None)),
        }
    }

    /// A warning when the cap is first hit, then at most one per
    /// [`Limit::WARN_EVERY`] with the count since: a flood must not flood
    /// the diagnostics too.
    fn warn_refused(&self) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused.0 += 1;
        let now = std::time::Instant::now();
        if refused.1.is_none_or(|last| now - last >= Limit::WARN_EVERY) {
            warn!(
                max = self.max,
                refused = refused.0,
                "at the connection limit (--max-connections): refusing new connections"
            );
            *refused = (0, Some(now));
        }
    }
}

/// One worker: an accept loop per listener of its own; returns once they
/// stopped and the connections they accepted are done.
async fn serve_worker(
    listeners: Vec<(TcpListener, Listener)>,
    settings: Arc<Settings>,
    sink: Arc<LogSink>,
    limit: Arc<Limit>,
    phase: watch::Receiver<Phase>,
) {
    // Every task of this worker holds a sender; `recv` returns None once
    // all are gone.
    let (done_tx, mut done) = mpsc::channel::<()>(1);
    for (listener, info) in listeners {
        tokio::spawn(accept_loop(
            listener,
            info,
            settings.clone(),
            sink.clone(),
            limit.clone(),
            phase.clone(),
            done_tx.clone(),
        ));
    }
    drop(done_tx);
    done.recv().await;
}

/// Accepts until the proxy stops running; one task per connection, as long
/// as the cap allows; past it each connection is logged and closed at once.
async fn accept_loop(
    listener: TcpListener,
    info: Listener,
    settings: Arc<Settings>,
    sink: Arc<LogSink>,
    limit: Arc<Limit>,
    mut phase: watch::Receiver<Phase>,
    done: mpsc::Sender<()>,
) {
    loop {
        let stopped = async {
            let _ = phase.wait_for(|p| *p != Phase::Running).await;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: back off, do not spin.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let redirect = |stream: &tokio::net::TcpStream| {
            if settings.standalone {
                Redirect::original_destination_only(stream, &info)
            } else {
                Redirect::query(stream, &info)
            }
        };
        let Ok(slot) = limit.slots.clone().try_acquire_owned() else {
            limit.warn_refused();
            let reason = format!(
                "too many connections: {} open (--max-connections)",
                limit.max
            );
            sink.write(&conn::refused(
                peer,
                &info,
                &redirect(&stream),
                &settings,
                reason,
            ));
            // A reset, not an orderly close: the client learns at once.
            let _ = stream.set_zero_linger();
            continue;
        };
        let redirect = redirect(&stream);
        let (settings, sink, done) = (settings.clone(), sink.clone(), done.clone());
        let mut phase = phase.clone();
        tokio::spawn(async move {
            let closing = async move {
                let _ = phase.wait_for(|p| *p == Phase::Closing).await;
            };
            let entry = conn::handle(stream, peer, &info, redirect, &settings, closing).await;
            sink.write(&entry);
            drop((slot, done));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("300s"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        for bad in ["", "s", "10x", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert!(parse_positive_duration("0s").is_err());
        assert_eq!(parse_positive_duration("1ms"), Ok(Duration::from_millis(1)));
    }

    #[test]
    fn command_line() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "connredir-proxy",
            "--name=p",
            "--listen=127.0.0.1:1",
            "--listen=[::1]:1",
            "--rule=deny:dst:10.0.0.0/8",
            "--rule=allow:host:*.example.com",
        ])
        .unwrap();
        assert_eq!(cli.listen.len(), 2);
        assert_eq!(cli.rules[1].to_string(), "allow:host:*.example.com");
        assert_eq!(cli.idle_timeout, Duration::from_secs(300));
        assert_eq!(cli.first_bytes_timeout, Duration::from_secs(30));
        assert_eq!(cli.max_connections, 4096);
        assert!(!cli.allow_unknown_host);
        let limited = ["x", "--name=p", "--listen=1.2.3.4:1", "--max-connections=0"];
        assert!(Cli::try_parse_from(limited).is_err());
        assert!(!cli.standalone);
        let cli = Cli::try_parse_from(["x", "--name=p", "--listen=1.2.3.4:1", "--standalone"]);
        assert!(cli.unwrap().standalone);
        assert!(Cli::try_parse_from(["connredir-proxy", "--name=p"]).is_err());
        let udp = Cli::try_parse_from([
            "x",
            "--name=p",
            "--udp-listen=127.0.0.1:5353",
            "--udp-upstream=127.0.0.2:53",
            "--dns-deny-answer=nxdomain",
            "--rule=deny:port:443/udp",
        ])
        .unwrap();
        assert!(udp.listen.is_empty());
        assert_eq!(udp.udp_idle_timeout, Duration::from_secs(30));
        assert_eq!(udp.udp_replied_timeout, Duration::from_secs(120));
        assert_eq!(udp.max_udp_flows, 1024);
        assert_eq!(udp.dns_ports, [53]);
        assert_eq!(udp.dns_deny_answer, DenyAnswer::Nxdomain);
        assert!(matches!(
            bind_udp("0.0.0.0:5353".parse().unwrap()),
            Err(StartupError::UdpUnspecified(_))
        ));
        assert!(
            Cli::try_parse_from(["x", "--name=p", "--listen=1.2.3.4:1", "--rule=nope"]).is_err()
        );
    }

    #[tokio::test]
    async fn without_the_layer_startup_says_what_to_do() {
        // This test process is in no cgroup the layer is attached to.
        let listener = bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = listener.local_addr().unwrap();
        let err = check_registered(&listener, addr, "p").unwrap_err();
        assert!(
            matches!(err, StartupError::LayerNotActive(a) if a == addr),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&addr.to_string()), "{message}");
        assert!(message.contains("connredir up"), "{message}");
        assert!(message.contains("--standalone"), "{message}");
        let message = StartupError::NotRegistered {
            addr,
            name: "p".into(),
        }
        .to_string();
        assert!(
            message.contains(&format!("connredir service add --name p --listen {addr}")),
            "{message}"
        );
        assert!(message.contains("--standalone"), "{message}");
    }

    #[tokio::test]
    async fn udp_without_the_layer_needs_an_upstream() {
        let args = ["x", "--name=p", "--standalone", "--udp-listen=127.0.0.1:0"];
        let err = run(Cli::try_parse_from(args).unwrap()).await.unwrap_err();
        assert!(
            matches!(
                err.downcast_ref::<StartupError>(),
                Some(StartupError::UdpNeedsUpstream)
            ),
            "{err:#}"
        );
    }

    #[tokio::test]
    async fn an_address_in_use_is_named() {
        for workers in [1, 2] {
            let taken = bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
            let addr = taken.local_addr().unwrap();
            let err = bind_group(addr, workers).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("{addr} is already in use by another process: choose another --listen address or stop that process")
            );
        }
        // Nor is a SO_REUSEPORT group of this user joined.
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let addr = group[0].local_addr().unwrap();
        assert_eq!(group[1].local_addr().unwrap(), addr, "one port for all");
        assert!(matches!(
            bind_group(addr, 2),
            Err(StartupError::InUse(a)) if a == addr
        ));
        assert!(matches!(
            bind_group(addr, 1),
            Err(StartupError::InUse(a)) if a == addr
        ));
    }
}
