//! UDP: a listening socket per `--udp-listen` address, and a flow per
//! client address.
//!
//! The listening socket is bound to the service's address with
//! SO_REUSEADDR and SO_REUSEPORT. The first datagram from a new client
//! address makes a flow: a socket of its own, bound to the same address
//! and connected to the client, so that the kernel delivers the client's
//! next datagrams to it (a connected socket outscores the unconnected
//! listener) and the layer can answer the record queries on it, as on an
//! accepted TCP socket. The flow reads the records and the original
//! destination there, applies the policy, opens its onward socket (records
//! set before `connect`), and relays datagrams both ways until no datagram
//! has moved for `--udp-idle-timeout` (`--udp-replied-timeout` once the
//! destination has answered). Datagrams that still reach the
//! listener for an existing flow (sent before its socket was connected) are
//! handed to that flow.
//!
//! Flows to port 53 are read as DNS: each query is logged with its answer's
//! response code, and decided by the `dns` rules (see `policy.rs`).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use socket2::{Domain, Protocol as SockProtocol, SockAddr, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::conn::{Listener, Redirect, Settings, Who};
use crate::dns::{self, DenyAnswer};
use crate::log::{self, DnsQueryLog, DnsQuestion, FlowsRefusedLog, LogSink, UdpFlowLog, Verdict};
use crate::policy::{Action, Decision, Protocol};
use crate::Phase;

/// The largest UDP payload (IPv6 without jumbograms: 65535 - 8); IPv4's is
/// 65507. Buffers of this size never truncate a datagram.
const MAX_DATAGRAM: usize = 65_535;

/// Datagrams held for a flow between the listener and the flow's task;
/// more are dropped (the flow's socket takes over once connected).
const HANDOVER_QUEUE: usize = 64;

/// DNS queries of a flow waiting for their answer; past it the oldest is
/// logged as unanswered (a client may not pin memory by never being
/// answered).
const PENDING_QUERIES: usize = 64;

/// How often, at most, refusals at the flow limit are logged.
const REFUSED_EVERY: Duration = Duration::from_secs(10);

/// What the UDP side needs beyond the shared [`Settings`].
#[derive(Debug, Clone)]
pub struct UdpSettings {
    /// A flow whose destination has not answered yet ends after this long
    /// without a datagram either way (conntrack's "unreplied" timeout).
    pub idle_timeout: Duration,
    /// The same, once the destination has answered (conntrack's "replied"
    /// timeout: a flow that works is given longer).
    pub replied_timeout: Duration,
    /// At most this many flows at once (per listening address).
    pub max_flows: usize,
    /// Where flows the layer did not redirect go (`--udp-upstream`).
    pub upstream: Option<SocketAddr>,
    /// How denied DNS queries are answered.
    pub deny_answer: DenyAnswer,
}

/// A UDP socket for `local`, sharing the address with the other sockets
/// of this proxy (SO_REUSEADDR, SO_REUSEPORT), IPv6-only for IPv6, and
/// connected to `peer` when given.
fn socket(local: SocketAddr, peer: Option<SocketAddr>) -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(local),
        Type::DGRAM,
        Some(SockProtocol::UDP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if local.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&SockAddr::from(local))?;
    if let Some(peer) = peer {
        socket.connect(&SockAddr::from(peer))?;
    }
    UdpSocket::from_std(socket.into())
}

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic; the libc crate names it for
/// Android only).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Binds a listening UDP socket (see [`socket`]), and makes it the one the
/// kernel picks among this address's unconnected sockets.
///
/// A flow's socket is bound before it is connected: in between it is an
/// unconnected member of the address's SO_REUSEPORT group, and the kernel
/// would hand some new clients' datagrams to it by hash (they would then
/// sit in the wrong flow's queue). A classic BPF program on the group that
/// always answers index 0 (the listener, the group's first socket, there
/// for the proxy's life) sends every datagram no connected socket matches
/// to the listener. Where it cannot be attached, flows still drop
/// datagrams from anybody but their client ([`take`]).
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = socket(addr, None)?;
    let program = [libc::sock_filter {
        code: (libc::BPF_RET | libc::BPF_K) as u16,
        jt: 0,
        jf: 0,
        k: 0,
    }];
    let fprog = libc::sock_fprog {
        len: 1,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: setsockopt with a valid sock_fprog on a socket we own; the
    // kernel copies the program.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        warn!(%addr, error = %io::Error::last_os_error(),
              "cannot steer new clients to the listening UDP socket; \
               datagrams that reach a flow just opened for another client are dropped");
    }
    enlarge_receive_buffer(&socket);
    Ok(socket)
}

/// What the listening socket may queue: every new client's first datagram
/// waits there while flows are opened, and a burst (a resolver's retries, a
/// flood at the flow limit) overflows the default 208 KiB, where the kernel
/// drops datagrams before the proxy can relay or count them.
const LISTENER_RECEIVE_BUFFER: libc::c_int = 4 << 20;

/// Raises the listener's receive buffer to [`LISTENER_RECEIVE_BUFFER`]:
/// past `net.core.rmem_max` where the proxy may (SO_RCVBUFFORCE, with
/// CAP_NET_ADMIN), else as far as that limit lets SO_RCVBUF go.
fn enlarge_receive_buffer(socket: &UdpSocket) {
    let set = |option| {
        // SAFETY: setsockopt with an int on a socket we own.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&LISTENER_RECEIVE_BUFFER as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    if set(libc::SO_RCVBUFFORCE) != 0 && set(libc::SO_RCVBUF) != 0 {
        debug!(error = %io::Error::last_os_error(), "keeping the listener's receive buffer");
    }
}

/// Refusals at the flow limit, for the log.
#[derive(Debug, Default)]
struct Refused {
    since_line: u64,
    total: u64,
    last_line: Option<Instant>,
}

impl Refused {
    /// Writes the line when there is something to say and it is time (or
    /// `now_anyway`, at the end).
    fn flush(
        &mut self,
        sink: &LogSink,
        name: &str,
        listen: SocketAddr,
        max: usize,
        now_anyway: bool,
    ) {
        let due = self
            .last_line
            .is_none_or(|last| last.elapsed() >= REFUSED_EVERY);
        if self.since_line == 0 || !(due || now_anyway) {
            return;
        }
        warn!(%listen, max, refused = self.since_line, total = self.total,
              "at the UDP flow limit (--max-udp-flows): dropping datagrams from new clients");
        sink.write(&FlowsRefusedLog {
            time: log::rfc3339(SystemTime::now()),
            proxy: name.to_string(),
            protocol: Protocol::Udp,
            listen: listen.to_string(),
            refused_datagrams: self.since_line,
            refused_total: self.total,
            verdict: Verdict::Deny,
            reason: format!("too many UDP flows: {max} open (--max-udp-flows)"),
        });
        self.since_line = 0;
        self.last_line = Some(Instant::now());
    }
}

/// Receives on one listening socket until the proxy stops running; a task
/// per flow. `done` is held by every flow until it ends.
pub async fn front(
    listener: UdpSocket,
    info: Listener,
    settings: Arc<Settings>,
    udp: Arc<UdpSettings>,
    sink: Arc<LogSink>,
    mut phase: watch::Receiver<Phase>,
    done: mpsc::Sender<()>,
) {
    let Some(local) = info.addr else {
        // main refuses unspecified UDP addresses: a flow's socket must be
        // bound to the address its client sent to.
        return;
    };
    // Per client address: the flow's serial number and its hand-over queue.
    let mut flows: HashMap<SocketAddr, (u64, mpsc::Sender<Vec<u8>>)> = HashMap::new();
    let (ended_tx, mut ended) = mpsc::unbounded_channel::<(SocketAddr, u64)>();
    let mut serial = 0u64;
    let mut refused = Refused::default();
    // Flow sockets that could not be opened since the last warning.
    let (mut failed, mut failed_warned) = (0u64, None);
    let mut tick = tokio::time::interval(REFUSED_EVERY);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let stopped = async {
            let _ = phase.wait_for(|p| *p != Phase::Running).await;
        };
        let (n, peer) = tokio::select! {
            () = stopped => break,
            Some((peer, number)) = ended.recv() => {
                if flows.get(&peer).is_some_and(|(n, _)| *n == number) {
                    flows.remove(&peer);
                }
                continue;
            }
            _ = tick.tick() => {
                refused.flush(&sink, &settings.name, local, udp.max_flows, false);
                continue;
            }
            received = listener.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(e) => {
                    debug!(error = %e, "UDP receive failed");
                    continue;
                }
            },
        };
        let datagram = &buf[..n];
        if let Some((_, queue)) = flows.get(&peer) {
            match queue.try_send(datagram.to_vec()) {
                // A full queue: dropped, as a full socket buffer would.
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => continue,
                // The flow just ended: this datagram starts a new one.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    flows.remove(&peer);
                }
            }
        }
        if flows.len() >= udp.max_flows {
            refused.since_line += 1;
            refused.total += 1;
            refused.flush(&sink, &settings.name, local, udp.max_flows, false);
            continue;
        }
        let client = match socket(local, Some(peer)) {
            Ok(client) => client,
            Err(e) => {
                // Out of descriptors and the like: this datagram is lost,
                // the client's next one tries again. Warned at most once
                // per REFUSED_EVERY: a flood must not flood stderr.
                failed += 1;
                if failed_warned.is_none_or(|at: Instant| at.elapsed() >= REFUSED_EVERY) {
                    warn!(%peer, error = %e, failed, "cannot open UDP flow sockets");
                    failed = 0;
                    failed_warned = Some(Instant::now());
                }
                continue;
            }
        };
        serial += 1;
        let (queue_tx, queue_rx) = mpsc::channel(HANDOVER_QUEUE);
        flows.insert(peer, (serial, queue_tx));
        let first = datagram.to_vec();
        let (settings, udp, sink) = (settings.clone(), udp.clone(), sink.clone());
        let (ended_tx, done, number) = (ended_tx.clone(), done.clone(), serial);
        let mut phase = phase.clone();
        tokio::spawn(async move {
            let closing = async move {
                let _ = phase.wait_for(|p| *p == Phase::Closing).await;
            };
            let flow = Flow::start(client, peer, &info, &settings, &udp, &sink);
            flow.run(first, queue_rx, closing).await;
            let _ = ended_tx.send((peer, number));
            drop(done);
        });
    }
    refused.flush(&sink, &settings.name, local, udp.max_flows, true);
}

/// What a flow does with its client's datagrams.
enum Mode {
    /// Relay them to this socket (connected to the destination). `early`:
    /// the policy's decision from the destination alone; `None` for DNS
    /// flows whose queries are decided one by one.
    Relay {
        server: UdpSocket,
        early: Option<Decision>,
    },
    /// Drop them (denied, or nowhere to send them), until the flow ends.
    Drop,
}

/// A DNS query waiting for its answer.
struct Pending {
    query: dns::Query,
    sent: Instant,
}

/// One flow: its client's socket, where it goes and how (with the onward
/// socket), its DNS queries waiting for answers, and its counts.
struct Flow<'a> {
    client: UdpSocket,
    peer: SocketAddr,
    settings: &'a Settings,
    udp: &'a UdpSettings,
    sink: &'a LogSink,
    started: Instant,
    who: Who,
    dst: Option<SocketAddr>,
    mode: Mode,
    verdict: Verdict,
    reason: Option<String>,
    pending: VecDeque<Pending>,
    datagrams_up: u64,
    datagrams_down: u64,
    dropped: u64,
    bytes_up: u64,
    bytes_down: u64,
    dns_queries: u64,
}

/// Why a flow ended, when not by idleness.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("the client {0} is gone: {1}")]
    Client(SocketAddr, #[source] io::Error),
    #[error("the destination {0}: {1}")]
    Server(SocketAddr, #[source] io::Error),
}

impl<'a> Flow<'a> {
    /// Reads what the layer says of the flow's socket, decides from the
    /// destination, and opens the onward socket.
    fn start(
        client: UdpSocket,
        peer: SocketAddr,
        listener: &Listener,
        settings: &'a Settings,
        udp: &'a UdpSettings,
        sink: &'a LogSink,
    ) -> Flow<'a> {
        let mut redirect = if settings.standalone {
            Redirect::default()
        } else {
            Redirect::query(&client, listener)
        };
        if redirect.records.is_none() {
            // Not redirected by the layer (or no layer): `--udp-upstream`,
            // when given, is where such flows go.
            if let Some(upstream) = udp.upstream {
                redirect.destination = Some(upstream);
                redirect.problem = None;
            } else if redirect.destination.is_none() {
                redirect.problem =
                    Some(format!(
                    "{}; the flow was not redirected by the layer and there is no --udp-upstream",
                    redirect.problem.as_deref().unwrap_or("no original destination")
                ));
            }
        }
        let mut flow = Flow {
            client,
            peer,
            settings,
            udp,
            sink,
            started: Instant::now(),
            who: redirect.who(),
            dst: redirect.destination,
            mode: Mode::Drop,
            verdict: Verdict::Error,
            reason: None,
            pending: VecDeque::new(),
            datagrams_up: 0,
            datagrams_down: 0,
            dropped: 0,
            bytes_up: 0,
            bytes_down: 0,
            dns_queries: 0,
        };
        let Some(dst) = redirect.destination else {
            flow.reason = redirect.problem.take();
            return flow;
        };
        if listener.addr == Some(dst) {
            flow.reason = Some(format!(
                "the destination {dst} is this proxy itself (the flow was not redirected)"
            ));
            return flow;
        }
        let early = settings.policy.udp_before(dst);
        if let Some(denied) = early.as_ref().filter(|d| d.action == Action::Deny) {
            flow.verdict = Verdict::Deny;
            flow.reason = denied.rule.clone();
            return flow;
        }
        match onward(dst, redirect.records.as_ref()) {
            Ok(server) => {
                flow.verdict = Verdict::Allow;
                flow.reason = early.as_ref().and_then(|d| d.rule.clone());
                flow.mode = Mode::Relay { server, early };
            }
            Err(e) => flow.reason = Some(e),
        }
        flow
    }

    fn is_dns(&self) -> bool {
        self.dst.is_some_and(|d| self.settings.policy.is_dns(d))
    }

    /// Relays until idle, shutdown (`closing`) or an error; then logs.
    async fn run(
        mut self,
        first: Vec<u8>,
        mut queued: mpsc::Receiver<Vec<u8>>,
        closing: impl Future<Output = ()>,
    ) {
        tokio::pin!(closing);
        let mut last = Instant::now();
        let mut result = self.up(&first).await;
        let mut replied = false;
        while result.is_ok() {
            let idle = if replied {
                self.udp.replied_timeout
            } else {
                self.udp.idle_timeout
            };
            let server = match &self.mode {
                Mode::Relay { server, .. } => Some(server),
                Mode::Drop => None,
            };
            let server_ready = async {
                match server {
                    Some(server) => server.readable().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut closing => {
                    self.end_reason("closed at shutdown");
                    break;
                }
                () = tokio::time::sleep_until(last + idle) => {
                    self.end_reason(&format!("idle for {idle:?}"));
                    break;
                }
                ready = self.client.readable() => {
                    result = match ready.and_then(|()| take(&self.client, Some(self.peer))) {
                        Ok(Some(datagram)) => {
                            last = Instant::now();
                            self.up(&datagram).await
                        }
                        Ok(None) => Ok(()),
                        Err(e) => Err(Ended::Client(self.peer, e)),
                    };
                }
                Some(datagram) = queued.recv() => {
                    last = Instant::now();
                    result = self.up(&datagram).await;
                }
                ready = server_ready => {
                    let dst = self.dst.expect("relaying flows have a destination");
                    let Mode::Relay { server, .. } = &self.mode else {
                        unreachable!("only relaying flows wait for the server")
                    };
                    result = match ready.and_then(|()| take(server, None)) {
                        Ok(Some(datagram)) => {
                            last = Instant::now();
                            replied = true;
                            self.down(&datagram).await
                        }
                        Ok(None) => Ok(()),
                        Err(e) => Err(Ended::Server(dst, e)),
                    };
                }
            }
        }
        if let Err(e) = result {
            match e {
                // A client that closed its socket: the end of the flow.
                Ended::Client(..) => self.end_reason(&e.to_string()),
                Ended::Server(..) => {
                    self.verdict = Verdict::Error;
                    self.reason = Some(e.to_string());
                }
            }
        }
        self.finish();
    }

    /// How an allowed flow ended, after the rule that allowed it.
    fn end_reason(&mut self, why: &str) {
        if self.verdict == Verdict::Allow {
            self.reason = Some(match self.reason.take() {
                Some(rule) => format!("{rule}; {why}"),
                None => why.to_string(),
            });
        }
    }

    /// One datagram from the client.
    async fn up(&mut self, datagram: &[u8]) -> Result<(), Ended> {
        let Mode::Relay { early, .. } = &self.mode else {
            self.dropped += 1;
            return Ok(());
        };
        let dst = self.dst.expect("relaying flows have a destination");
        if self.is_dns() {
            self.dns_queries += 1;
            let parsed = dns::parse_query(datagram);
            let names = parsed.as_ref().map(|q| q.names.clone()).unwrap_or_default();
            let decision = early
                .clone()
                .unwrap_or_else(|| self.settings.policy.decide_dns(dst, &names));
            let question = |rcode: Option<String>| DnsQuestion {
                id: parsed.as_ref().ok().map(|q| q.id),
                name: parsed.as_ref().ok().and_then(|q| q.names.first().cloned()),
                qtype: parsed.as_ref().ok().map(|q| q.qtype.clone()),
                rcode,
            };
            if decision.action == Action::Deny {
                self.dropped += 1;
                let rule = decision.rule.clone().unwrap_or_default();
                let reason = match &parsed {
                    Ok(_) => rule,
                    Err(e) => format!(
                        "{e}: names no name, and {rule} needs one \
                         (--allow-unknown-host would let it pass)"
                    ),
                };
                // A query the proxy read gets its answer; one it cannot
                // read gets none (it has no question to answer).
                let answer = parsed
                    .is_ok()
                    .then(|| dns::deny_answer(datagram, self.udp.deny_answer))
                    .flatten();
                let rcode = match answer {
                    Some(answer) => {
                        self.send_to_client(&answer).await?;
                        dns::answer_header(&answer).map(|(_, code)| dns::rcode_name(code))
                    }
                    None => None,
                };
                self.log_query(question(rcode), None, Verdict::Deny, Some(reason));
                return Ok(());
            }
            match &parsed {
                Ok(query) => {
                    if self.pending.len() >= PENDING_QUERIES {
                        let oldest = self.pending.pop_front().expect("full");
                        self.unanswered(oldest, "no answer before newer queries");
                    }
                    self.pending.push_back(Pending {
                        query: query.clone(),
                        sent: Instant::now(),
                    });
                }
                // Relayed as it is (no dns rule needs its name): logged now,
                // as its answer cannot be told from others'.
                Err(e) => {
                    let reason = Some(format!("{e}; relayed"));
                    self.log_query(question(None), None, Verdict::Allow, reason);
                }
            }
        }
        let Mode::Relay { server, .. } = &self.mode else {
            unreachable!("checked above")
        };
        server
            .send(datagram)
            .await
            .map_err(|e| Ended::Server(dst, e))?;
        self.datagrams_up += 1;
        self.bytes_up += datagram.len() as u64;
        Ok(())
    }

    /// One datagram from the server.
    async fn down(&mut self, datagram: &[u8]) -> Result<(), Ended> {
        if self.is_dns() {
            if let Some((id, rcode)) = dns::answer_header(datagram) {
                if let Some(at) = self.pending.iter().position(|p| p.query.id == id) {
                    let pending = self.pending.remove(at).expect("found");
                    let elapsed = pending.sent.elapsed().as_millis() as u64;
                    let reason = match &self.mode {
                        Mode::Relay {
                            early: Some(decision),
                            ..
                        } => decision.rule.clone(),
                        _ => None,
                    };
                    let question = DnsQuestion {
                        id: Some(id),
                        name: pending.query.names.first().cloned(),
                        qtype: Some(pending.query.qtype),
                        rcode: Some(dns::rcode_name(rcode)),
                    };
                    self.log_query(question, Some(elapsed), Verdict::Allow, reason);
                }
            }
        }
        self.send_to_client(datagram).await
    }

    async fn send_to_client(&mut self, datagram: &[u8]) -> Result<(), Ended> {
        self.client
            .send(datagram)
            .await
            .map_err(|e| Ended::Client(self.peer, e))?;
        self.datagrams_down += 1;
        self.bytes_down += datagram.len() as u64;
        Ok(())
    }

    fn unanswered(&self, pending: Pending, why: &str) {
        let question = DnsQuestion {
            id: Some(pending.query.id),
            name: pending.query.names.first().cloned(),
            qtype: Some(pending.query.qtype),
            rcode: None,
        };
        self.log_query(question, None, Verdict::Allow, Some(why.to_string()));
    }

    fn log_query(
        &self,
        dns: DnsQuestion,
        duration_ms: Option<u64>,
        verdict: Verdict,
        reason: Option<String>,
    ) {
        self.sink.write(&DnsQueryLog {
            time: log::rfc3339(SystemTime::now()),
            proxy: self.settings.name.clone(),
            protocol: Protocol::Udp,
            client: self.who.client.clone(),
            peer: self.peer.to_string(),
            flow: self.who.flow.clone(),
            original_dst: self.dst.map(|d| d.to_string()),
            dns,
            duration_ms,
            chain: self.who.chain.clone(),
            verdict,
            reason,
        });
    }

    /// Logs the queries still waiting, then the flow.
    fn finish(mut self) {
        let why = format!(
            "no answer before the flow ended ({})",
            self.reason.as_deref().unwrap_or("")
        );
        for pending in std::mem::take(&mut self.pending) {
            self.unanswered(pending, &why);
        }
        self.sink.write(&UdpFlowLog {
            time: log::rfc3339(SystemTime::now()),
            proxy: self.settings.name.clone(),
            protocol: Protocol::Udp,
            client: self.who.client.clone(),
            peer: self.peer.to_string(),
            flow: self.who.flow.clone(),
            original_dst: self.dst.map(|d| d.to_string()),
            datagrams_up: self.datagrams_up,
            datagrams_down: self.datagrams_down,
            dropped: self.dropped,
            bytes_up: self.bytes_up,
            bytes_down: self.bytes_down,
            dns_queries: self.dns_queries,
            duration_ms: self.started.elapsed().as_millis() as u64,
            chain: self.who.chain.clone(),
            context: self.who.context.clone(),
            verdict: self.verdict,
            reason: self.reason.clone(),
        });
    }
}

/// Takes the datagram waiting on `socket`, if any (`None`: the readiness
/// was spurious, or the datagram was not from `only`). It is read into
/// this thread's buffer, large enough for any datagram, and copied out at
/// its size: a flow waiting for datagrams holds no buffer (two of 64 KiB
/// per flow would be 128 MiB at 1024 flows).
///
/// `only`: the flow's client. A datagram another client sent while the
/// flow's socket was bound but not yet connected may sit in its queue (see
/// [`bind`]); it is dropped, never relayed as this client's.
fn take(socket: &UdpSocket, only: Option<SocketAddr>) -> io::Result<Option<Vec<u8>>> {
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; MAX_DATAGRAM]);
    }
    BUFFER.with_borrow_mut(|buf| match socket.try_recv_from(buf) {
        Ok((_, from)) if only.is_some_and(|peer| peer != from) => {
            debug!(%from, "dropping a datagram of another client");
            Ok(None)
        }
        Ok((n, _)) => Ok(Some(buf[..n].to_vec())),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    })
}

/// The onward socket: the destination's family, the records set before
/// `connect` (what keeps the flow from coming back here), connected.
fn onward(
    dst: SocketAddr,
    records: Option<&connredir::RedirectRecords>,
) -> Result<UdpSocket, String> {
    let failed = |e: io::Error| format!("opening a UDP socket to {dst}: {e}");
    let socket = Socket::new(
        Domain::for_address(dst),
        Type::DGRAM,
        Some(SockProtocol::UDP),
    )
    .map_err(failed)?;
    socket.set_nonblocking(true).map_err(failed)?;
    if let Some(records) = records {
        connredir::set_records(&socket, records)
            .map_err(|e| format!("cannot hand the records to the onward socket: {e}"))?;
    }
    socket
        .connect(&SockAddr::from(dst))
        .map_err(|e| format!("connecting to {dst}: {e}"))?;
    UdpSocket::from_std(socket.into()).map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::tests::query;
    use crate::policy::Policy;
    use crate::relay::Mode as RelayMode;
    use simple_dns::TYPE;

    fn settings(rules: &[&str], dns_port: u16) -> Arc<Settings> {
        Arc::new(Settings {
            name: "udp-test".into(),
            policy: Policy::new(rules.iter().map(|r| r.parse().unwrap()).collect(), false)
                .with_dns_ports(vec![dns_port]),
            mode: RelayMode::Copy,
            cut_through: false,
            idle_timeout: Duration::from_secs(10),
            inspect_timeout: Duration::from_secs(1),
            first_bytes_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            standalone: true,
        })
    }

    /// A proxy front on an ephemeral loopback port with `upstream`; returns
    /// its address, its log and the phase sender.
    async fn start(
        rules: &[&str],
        dns: bool,
        upstream: SocketAddr,
        max_flows: usize,
        idle: Duration,
    ) -> (
        SocketAddr,
        Arc<LogSink>,
        watch::Sender<Phase>,
        mpsc::Receiver<()>,
    ) {
        start_with(rules, dns, upstream, max_flows, idle, idle).await
    }

    /// [`start`] with the unreplied and replied idle timeouts apart.
    async fn start_with(
        rules: &[&str],
        dns: bool,
        upstream: SocketAddr,
        max_flows: usize,
        idle: Duration,
        replied: Duration,
    ) -> (
        SocketAddr,
        Arc<LogSink>,
        watch::Sender<Phase>,
        mpsc::Receiver<()>,
    ) {
        // The proxy listens in the upstream's family.
        let any = if upstream.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        let listener = bind(any.parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = Arc::new(LogSink::memory());
        let (phase, phase_rx) = watch::channel(Phase::Running);
        let (done, all_done) = mpsc::channel(1);
        let dns_port = if dns { upstream.port() } else { 53 };
        let udp = Arc::new(UdpSettings {
            idle_timeout: idle,
            replied_timeout: replied,
            max_flows,
            upstream: Some(upstream),
            deny_answer: DenyAnswer::Refused,
        });
        let info = Listener {
            addr: Some(addr),
            service: None,
            ..Listener::default()
        };
        tokio::spawn(front(
            listener,
            info,
            settings(rules, dns_port),
            udp,
            sink.clone(),
            phase_rx,
            done,
        ));
        (addr, sink, phase, all_done)
    }

    /// A UDP server answering each datagram with `answer(datagram)`.
    async fn server(answer: fn(&[u8]) -> Option<Vec<u8>>) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                if let Some(reply) = answer(&buf[..n]) {
                    let _ = socket.send_to(&reply, from).await;
                }
            }
        });
        addr
    }

    async fn client(to: SocketAddr) -> UdpSocket {
        let any = if to.is_ipv6() {
            "[::1]:0"
        } else {
            "127.0.0.1:0"
        };
        let socket = UdpSocket::bind(any).await.unwrap();
        socket.connect(to).await.unwrap();
        socket
    }

    async fn recv(socket: &UdpSocket) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let n = tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf))
            .await
            .ok()?
            .unwrap();
        Some(buf[..n].to_vec())
    }

    /// Flips a query into a NOERROR answer with no records.
    fn answer_noerror(q: &[u8]) -> Option<Vec<u8>> {
        let mut a = q.to_vec();
        a[2] |= 0x80;
        Some(a)
    }

    #[tokio::test]
    async fn datagrams_of_every_size_go_both_ways_on_one_flow() {
        let echo = server(|d| Some(d.to_vec())).await;
        let (proxy, sink, phase, mut all_done) =
            start(&[], false, echo, 16, Duration::from_millis(300)).await;
        let c = client(proxy).await;
        for size in [0, 1, 1200, 9000, 65_507] {
            let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            c.send(&data).await.unwrap();
            assert_eq!(recv(&c).await.as_deref(), Some(&data[..]), "{size} bytes");
        }
        // Idle expiry ends the flow with its line.
        tokio::time::sleep(Duration::from_millis(600)).await;
        phase.send_replace(Phase::Closing);
        drop(phase);
        all_done.recv().await;
        let lines = sink.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        let flow = &lines[0];
        assert_eq!(flow["protocol"], "udp");
        assert_eq!(flow["datagrams_up"], 5);
        assert_eq!(flow["datagrams_down"], 5);
        assert_eq!(flow["bytes_up"], 1 + 1200 + 9000 + 65_507);
        assert_eq!(flow["verdict"], "allow");
        assert_eq!(flow["reason"], "idle for 300ms");
        assert_eq!(flow["original_dst"], echo.to_string());
    }

    #[tokio::test]
    async fn new_clients_reach_the_listener_not_a_flow_socket_not_yet_connected() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // A flow's socket between bind and connect.
        let fresh = socket(addr, None).unwrap();
        for _ in 0..64 {
            let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            c.send_to(b"new", addr).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut buf = [0u8; 8];
        let mut at_listener = 0;
        while listener.try_recv_from(&mut buf).is_ok() {
            at_listener += 1;
        }
        assert!(
            fresh.try_recv_from(&mut buf).is_err(),
            "a datagram reached the fresh socket"
        );
        assert_eq!(at_listener, 64);
    }

    #[tokio::test]
    async fn an_unreplied_flow_ends_sooner_than_one_that_was_answered() {
        // Unreplied 300 ms, replied 5 s.
        let silent = server(|_| None).await;
        let echo = server(|d| Some(d.to_vec())).await;
        let short = Duration::from_millis(300);
        let long = Duration::from_secs(5);
        let (quiet_proxy, quiet_sink, quiet_phase, mut quiet_done) =
            start_with(&[], false, silent, 4, short, long).await;
        let (proxy, sink, phase, mut all_done) = start_with(&[], false, echo, 4, short, long).await;
        let unanswered = client(quiet_proxy).await;
        unanswered.send(b"anyone?").await.unwrap();
        let answered = client(proxy).await;
        answered.send(b"one").await.unwrap();
        assert_eq!(recv(&answered).await.as_deref(), Some(&b"one"[..]));
        tokio::time::sleep(Duration::from_millis(900)).await;
        // The unreplied flow is gone by now; the answered one lives on.
        assert_eq!(quiet_sink.lines().len(), 1, "{:?}", quiet_sink.lines());
        assert_eq!(quiet_sink.lines()[0]["reason"], "idle for 300ms");
        assert!(sink.lines().is_empty(), "{:?}", sink.lines());
        answered.send(b"two").await.unwrap();
        assert_eq!(recv(&answered).await.as_deref(), Some(&b"two"[..]));
        for phase in [quiet_phase, phase] {
            phase.send_replace(Phase::Closing);
        }
        quiet_done.recv().await;
        all_done.recv().await;
        let lines = sink.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["datagrams_up"], 2);
        assert_eq!(lines[0]["reason"], "closed at shutdown");
    }

    #[tokio::test]
    async fn ipv6_flows_are_relayed() {
        let socket = UdpSocket::bind("[::1]:0").await.unwrap();
        let echo = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(&buf[..n], from).await;
            }
        });
        let (proxy, _sink, _phase, _done) =
            start(&[], false, echo, 4, Duration::from_secs(5)).await;
        assert!(proxy.is_ipv6());
        let c = client(proxy).await;
        for _ in 0..3 {
            c.send(b"over six").await.unwrap();
            assert_eq!(recv(&c).await.as_deref(), Some(&b"over six"[..]));
        }
    }

    #[tokio::test]
    async fn denied_dns_names_are_answered_here_and_others_logged_with_their_code() {
        // The server's port is read as DNS (--dns-port).
        let upstream = server(answer_noerror).await;
        let (proxy, sink, phase, mut all_done) = start(
            &["deny:dns:*.blocked.test"],
            true,
            upstream,
            16,
            Duration::from_secs(5),
        )
        .await;
        let c = client(proxy).await;
        c.send(&query(1, "www.example.test", TYPE::A))
            .await
            .unwrap();
        assert_eq!(dns::answer_header(&recv(&c).await.unwrap()), Some((1, 0)));
        c.send(&query(2, "ads.blocked.test", TYPE::AAAA))
            .await
            .unwrap();
        assert_eq!(dns::answer_header(&recv(&c).await.unwrap()), Some((2, 5)));
        // Truncated: no name to check, so the dns rule drops it, unanswered.
        c.send(&query(3, "x.test", TYPE::A)[..15]).await.unwrap();
        assert_eq!(recv(&c).await, None);
        phase.send_replace(Phase::Closing);
        drop(phase);
        all_done.recv().await;
        let lines = sink.lines();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0]["dns"]["name"], "www.example.test");
        assert_eq!(lines[0]["dns"]["type"], "A");
        assert_eq!(lines[0]["dns"]["rcode"], "NOERROR");
        assert_eq!(lines[0]["verdict"], "allow");
        assert_eq!(lines[1]["dns"]["name"], "ads.blocked.test");
        assert_eq!(lines[1]["dns"]["rcode"], "REFUSED");
        assert_eq!(lines[1]["verdict"], "deny");
        assert_eq!(lines[1]["reason"], "rule 1: deny:dns:*.blocked.test");
        assert_eq!(lines[2]["dns"]["name"], serde_json::Value::Null);
        assert_eq!(lines[2]["verdict"], "deny");
        assert_eq!(lines[3]["dns_queries"], 3);
        assert_eq!(lines[3]["dropped"], 2);
    }

    #[tokio::test]
    async fn the_flow_limit_holds_and_is_counted_while_flows_keep_working() {
        let echo = server(|d| Some(d.to_vec())).await;
        let (proxy, sink, phase, mut all_done) =
            start(&[], false, echo, 4, Duration::from_secs(60)).await;
        let first = client(proxy).await;
        first.send(b"one").await.unwrap();
        assert_eq!(recv(&first).await.as_deref(), Some(&b"one"[..]));
        let mut flood = Vec::new();
        for _ in 0..40 {
            let c = client(proxy).await;
            c.send(b"flood").await.unwrap();
            flood.push(c);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let answered = flood
            .iter()
            .filter(|c| c.try_recv(&mut [0u8; 16]).is_ok())
            .count();
        assert_eq!(answered, 3, "flows past the limit get nothing");
        first.send(b"still").await.unwrap();
        assert_eq!(recv(&first).await.as_deref(), Some(&b"still"[..]));
        // A client that sends and never reads does not stop the others.
        for _ in 0..500 {
            flood[0].send(&[7u8; 1000]).await.unwrap();
        }
        first.send(b"again").await.unwrap();
        assert_eq!(recv(&first).await.as_deref(), Some(&b"again"[..]));
        phase.send_replace(Phase::Closing);
        drop(phase);
        all_done.recv().await;
        let lines = sink.lines();
        let refused: u64 = lines
            .iter()
            .filter_map(|l| l["refused_datagrams"].as_u64())
            .sum();
        assert_eq!(refused, 37, "{lines:?}");
        let flows = lines.iter().filter(|l| l["datagrams_up"].is_u64()).count();
        assert_eq!(flows, 4, "{lines:#?}");
    }
}
