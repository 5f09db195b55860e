//! One redirected connection, from accept to its log line: find the
//! destination, decide, connect with the records, inspect, relay.

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::time::{Duration, SystemTime};

use connredir::{RedirectContext, RedirectRecords, RedirectState, ServiceId};
use socket2::SockRef;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::http::{Requests, Step};
use crate::inspect::{self, FirstBytes, Inspection};
use crate::log::{self, ConnectionLog, Verdict};
use crate::policy::{Action, Decision, Policy};
use crate::relay::{self, Direction, Mode, RelayError, Traffic};

/// Settings all connections share.
#[derive(Debug)]
pub struct Settings {
    /// `--name`, for the log.
    pub name: String,
    /// The rules.
    pub policy: Policy,
    /// Splice or copy.
    pub mode: Mode,
    /// Hand inspected directions of flows accelerated on both legs to the
    /// kernel (not with [`Mode::Copy`]).
    pub cut_through: bool,
    /// No byte either way for this long closes the flow.
    pub idle_timeout: Duration,
    /// How long the client's first bytes may take to name a host.
    pub inspect_timeout: Duration,
    /// How long a client may send nothing at all after connecting.
    pub first_bytes_timeout: Duration,
    /// How long connecting onward may take.
    pub connect_timeout: Duration,
    /// `--standalone`: no layer, SO_ORIGINAL_DST only.
    pub standalone: bool,
}

/// What an accept loop knows about its listener, for its connections.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listener {
    /// The listening address when it is a concrete one (then it is every
    /// accepted socket's local address); `None` for `0.0.0.0` or `[::]`.
    pub addr: Option<SocketAddr>,
    /// The service the layer has registered for it; `None` standalone.
    pub service: Option<ServiceId>,
    /// The worker (0-based) whose listener this is, for the log.
    pub worker: u32,
}

/// What the redirect layer says about an accepted connection.
#[derive(Debug, Default)]
pub struct Redirect {
    /// The records, to hand on; `None` when the layer has none for it.
    pub records: Option<RedirectRecords>,
    /// The context, when this proxy is the service that redirected it.
    pub context: Option<RedirectContext>,
    /// Where to connect.
    pub destination: Option<SocketAddr>,
    /// Why there is no destination.
    pub problem: Option<String>,
    /// The command name of the client thread that opened the flow.
    pub command: Option<String>,
}

impl Redirect {
    /// Asks the layer about `stream`, accepted on `listener` (or a UDP
    /// flow's socket, connected to its client). Failures are normal (no
    /// layer, or not the redirecting service): they leave fields empty.
    /// With records this is one getsockopt, two when the records say this
    /// proxy's service redirected the flow (the context).
    pub fn query(stream: &impl AsFd, listener: &Listener) -> Redirect {
        let records = match connredir::query_records(stream) {
            Ok(records) => Some(records),
            // No layer here, or a connection it did not redirect.
            Err(e @ (connredir::Error::NotSupported | connredir::Error::NotRedirected)) => {
                debug!(error = %e, "no redirect records");
                None
            }
            Err(e) => {
                warn!(error = %e, "cannot read the redirect records; going on without them");
                None
            }
        };
        let Some(records) = records else {
            // No records, no context either: only SO_ORIGINAL_DST may know.
            return Redirect::original_destination_only(stream, listener);
        };
        // Only the service that redirected the flow (now or earlier) may
        // read its context; the layer refuses anybody else.
        let ours = listener.service.is_none_or(|service| {
            matches!(
                records.state_for(service),
                RedirectState::RedirectedBySelf | RedirectState::PreviouslyRedirectedBySelf
            )
        });
        let context = if ours {
            connredir::query_context(stream)
                .inspect_err(|e| debug!(error = %e, "no redirect context"))
                .ok()
        } else {
            None
        };
        // The records carry the destination (what SO_ORIGINAL_DST would
        // answer from them) and the client's command, as the layer saw it
        // at connect time.
        let (destination, problem) = match records.original_destination() {
            Some(dst) => (Some(dst), None),
            None => match connredir::original_destination(stream) {
                Ok(dst) => (Some(dst), None),
                Err(e) => (None, Some(format!("no original destination: {e}"))),
            },
        };
        // Records from an older writer have no command: ask /proc then.
        let command = records.client_command().or_else(|| {
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", records.client().pid));
            Some(comm.ok()?.trim_end().to_string())
        });
        Redirect {
            records: Some(records),
            context,
            destination,
            problem,
            command,
        }
    }
}

impl Redirect {
    /// Without the layer (`--standalone`): the destination from
    /// SO_ORIGINAL_DST (conntrack's answer), no records and no context.
    /// `listener` is where `stream` came from.
    pub fn original_destination_only(stream: &impl AsFd, listener: &Listener) -> Redirect {
        // A socket of an IPv4 listener is an IPv4 one, and SO_ORIGINAL_DST
        // the one question to ask: no getsockname first to learn the
        // family. Failures are asked again below, for the library's error.
        let ipv4 = matches!(listener.addr, Some(SocketAddr::V4(_)));
        let found = ipv4
            .then(|| SockRef::from(stream).original_dst().ok()?.as_socket())
            .flatten();
        match found.map_or_else(|| connredir::original_destination(stream), Ok) {
            Ok(dst) => Redirect {
                destination: Some(dst),
                ..Redirect::default()
            },
            Err(e) => Redirect {
                problem: Some(format!("no original destination: {e}")),
                ..Redirect::default()
            },
        }
    }
}

/// The fields every log line about a flow takes from its records.
#[derive(Debug, Clone, Default)]
pub struct Who {
    /// The client process.
    pub client: Option<log::Client>,
    /// The flow's id (the first hop's local address).
    pub flow: Option<String>,
    /// Service ids, oldest first.
    pub chain: Vec<u32>,
    /// The context, when this proxy may read it.
    pub context: Option<log::Context>,
}

impl Redirect {
    /// The log fields from the records and context (empty without them).
    pub fn who(&self) -> Who {
        let records = self.records.as_ref();
        Who {
            client: records.map(|r| log::Client {
                pid: r.client().pid,
                uid: r.client().uid,
                cgroup_id: r.client().cgroup_id,
                command: self.command.clone(),
            }),
            flow: records
                .and_then(|r| r.hops().next())
                .and_then(|hop| hop.local)
                .map(|local| local.to_string()),
            chain: records.map_or_else(Vec::new, |r| r.chain().iter().map(|s| s.0).collect()),
            context: self.context.as_ref().map(|c| match c.original_addresses() {
                Some((remote, _)) => log::Context::Destination(remote.to_string()),
                None => log::Context::Length(c.as_bytes().len()),
            }),
        }
    }
}

/// Why a connection ended other than by both sides closing.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("{0}")]
    NoDestination(String),
    #[error("the destination {0} is this proxy itself (the connection was not redirected)")]
    Loop(SocketAddr),
    #[error("{0}")]
    Denied(String),
    /// Denied by a rule after an HTTP request head: answered with a 403.
    #[error("{0}")]
    DeniedHttp(String),
    #[error("no byte from the client in {0:?} (--first-bytes-timeout)")]
    Silent(Duration),
    #[error("cannot hand the records to the onward socket: {0}")]
    Records(#[source] connredir::Error),
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("connecting to {0}: no answer in {1:?}")]
    ConnectTimeout(SocketAddr, Duration),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error("closed at shutdown")]
    Shutdown,
}

/// What the client-to-server side found, kept outside the futures so it
/// survives their cancellation.
#[derive(Debug, Default)]
struct Seen {
    inspection: Inspection,
    rule: Option<String>,
    /// HTTP requests checked on the connection.
    requests: u64,
}

/// Serves one accepted connection and returns its log line. `closing`
/// resolves when the proxy stops waiting for open connections.
pub async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    listener: &Listener,
    redirect: Redirect,
    settings: &Settings,
    closing: impl Future<Output = ()>,
) -> ConnectionLog {
    let started = Instant::now();
    let traffic = Traffic::default();
    let mut seen = Seen::default();
    let result = tokio::select! {
        result = serve(&client, peer, listener, &redirect, settings, &traffic, &mut seen, started) => result,
        () = closing => Err(Ended::Shutdown),
    };
    let (verdict, reason) = match result {
        Ok(()) => (Verdict::Allow, seen.rule.take()),
        Err(Ended::Denied(rule) | Ended::DeniedHttp(rule)) => (Verdict::Deny, Some(rule)),
        Err(e @ Ended::Silent(_)) => {
            warn!(%peer, "closing a connection: {e}");
            (Verdict::Deny, Some(e.to_string()))
        }
        Err(e @ (Ended::Relay(RelayError::Idle(_)) | Ended::Shutdown)) => {
            (Verdict::Allow, Some(e.to_string()))
        }
        Err(e) => (Verdict::Error, Some(e.to_string())),
    };
    debug!(%peer, ?verdict, ?reason, spliced = traffic.spliced(), "connection ended");
    log_line(
        settings, listener, peer, &redirect, started, seen, &traffic, verdict, reason,
    )
}

/// The log line of a connection refused before it was served (`reason`:
/// why), which the caller then closes.
pub fn refused(
    peer: SocketAddr,
    listener: &Listener,
    redirect: &Redirect,
    settings: &Settings,
    reason: String,
) -> ConnectionLog {
    let (started, traffic) = (Instant::now(), Traffic::default());
    let seen = Seen::default();
    log_line(
        settings,
        listener,
        peer,
        redirect,
        started,
        seen,
        &traffic,
        Verdict::Deny,
        Some(reason),
    )
}

#[allow(clippy::too_many_arguments)]
fn log_line(
    settings: &Settings,
    listener: &Listener,
    peer: SocketAddr,
    redirect: &Redirect,
    started: Instant,
    seen: Seen,
    traffic: &Traffic,
    verdict: Verdict,
    reason: Option<String>,
) -> ConnectionLog {
    let who = redirect.who();
    ConnectionLog {
        time: log::rfc3339(SystemTime::now()),
        proxy: settings.name.clone(),
        worker: listener.worker,
        client: who.client,
        peer: peer.to_string(),
        flow: who.flow,
        original_dst: redirect.destination.map(|d| d.to_string()),
        server_name: seen.inspection.server_name,
        http: seen.inspection.http,
        requests: seen.requests,
        bytes_up: traffic.up(),
        bytes_down: traffic.down(),
        cut_through: traffic.cut_through(),
        duration_ms: started.elapsed().as_millis() as u64,
        chain: who.chain,
        context: who.context,
        verdict,
        reason,
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    client: &TcpStream,
    peer: SocketAddr,
    listener: &Listener,
    redirect: &Redirect,
    settings: &Settings,
    traffic: &Traffic,
    seen: &mut Seen,
    started: Instant,
) -> Result<(), Ended> {
    let no_destination = || Ended::NoDestination(redirect.problem.clone().unwrap_or_default());
    let dst = redirect.destination.ok_or_else(no_destination)?;
    // Without the layer, SO_ORIGINAL_DST may name our own listener (and a
    // rule may cover it). A concrete listening address is the accepted
    // socket's own: no need to ask.
    let local = listener.addr.map_or_else(|| client.local_addr(), Ok);
    if local.as_ref().is_ok_and(|local| *local == dst) {
        return Err(Ended::Loop(dst));
    }
    // Destination rules decide before any onward connection exists.
    let early = settings.policy.before_connect(dst);
    if let Some(decision) = early.as_ref().filter(|d| d.action == Action::Deny) {
        return Err(Ended::Denied(decision.rule.clone().unwrap_or_default()));
    }
    // The client socket has TCP_NODELAY from the listener; `connect` sets it
    // on the onward one.
    let server = connect(dst, redirect.records.as_ref(), settings.connect_timeout).await?;
    let plan = relay::plan(client, &server, settings.mode, settings.cut_through);
    let cut_ends = plan
        .cut_through
        .then(|| cut_through_ends(peer, local.as_ref().ok(), &server))
        .flatten();
    // Told once the client's first bytes are inspected and allowed: whether
    // the flow may be handed to the kernel (not when every HTTP request on
    // it must be seen).
    let (cut_tx, cut_rx) = tokio::sync::oneshot::channel::<bool>();
    // Server-first protocols: the server's bytes flow during inspection.
    let down = async {
        match cut_ends {
            Some((to_client, _)) => {
                let allowed = async {
                    if cut_rx.await != Ok(true) {
                        std::future::pending::<()>().await;
                    }
                };
                relay::pump_cut_through(
                    &server,
                    client,
                    to_client,
                    Direction::Down,
                    traffic,
                    allowed,
                )
                .await?
            }
            None => relay::pump(&server, client, plan.down, Direction::Down, traffic).await?,
        }
        Ok(())
    };
    let up = async {
        // A silent client is not waited for past its time, inspection or not.
        let inspect_for = settings.inspect_timeout.min(settings.first_bytes_timeout);
        let mut first = inspect::read_first(client, inspect_for)
            .await
            .map_err(RelayError::Up)?;
        // Moved, not copied: from here on `seen` holds what was recognised.
        seen.inspection = std::mem::take(&mut first.inspection);
        if first.bytes.is_empty() && !first.eof && started.elapsed() >= settings.first_bytes_timeout
        {
            return Err(Ended::Silent(settings.first_bytes_timeout));
        }
        if early.is_none() && seen.inspection.http.is_some() {
            // A host rule decides: every request on the connection is
            // checked, so its bytes all pass through here.
            let _ = cut_tx.send(false);
            return check_requests(client, &server, first, dst, settings, traffic, seen).await;
        }
        let decision = early.unwrap_or_else(|| {
            let names = &seen.inspection.names;
            settings.policy.decide(dst, names)
        });
        if decision.action == Action::Deny {
            let why = || first.why_no_name(&seen.inspection, inspect_for);
            return Err(Ended::Denied(reason(&decision, why)));
        }
        seen.rule = decision.rule;
        if first.bytes.is_empty() && !first.eof {
            // Allowed without a name: still, nothing sent is not waited for
            // past --first-bytes-timeout.
            let left = settings
                .first_bytes_timeout
                .saturating_sub(started.elapsed());
            match tokio::time::timeout(left, client.readable()).await {
                Err(_) => return Err(Ended::Silent(settings.first_bytes_timeout)),
                Ok(ready) => ready.map_err(RelayError::Up)?,
            }
        }
        relay::write_all(&server, &first.bytes, Direction::Up, traffic)
            .await
            .map_err(RelayError::Up)?;
        let eof = first.eof;
        // Free the inspection buffer (16 KiB) before relaying: an idle
        // connection would otherwise keep it for its whole life.
        drop(first);
        let _ = cut_tx.send(true);
        if eof {
            relay::shutdown_write(&server).map_err(RelayError::Up)?;
        } else if let Some((_, to_server)) = cut_ends {
            let allowed = std::future::ready(());
            relay::pump_cut_through(client, &server, to_server, Direction::Up, traffic, allowed)
                .await?;
        } else {
            relay::pump(client, &server, plan.up, Direction::Up, traffic).await?;
        }
        Ok(())
    };
    // Boxed: passed by value, the two futures would otherwise be laid out
    // twice in this task's state, which every open connection keeps.
    let ends = [client, &server];
    let relayed = relay::supervise(
        Box::pin(up),
        Box::pin(down),
        settings.idle_timeout,
        traffic,
        ends,
    )
    .await;
    match relayed {
        // The server-to-client direction was stopped with the other, so the
        // 403 cannot land inside an answer being relayed (a pipelining
        // client may find the answer before it cut short).
        Err(Ended::DeniedHttp(reason)) => {
            // Boxed: its drain buffer need not be part of every task.
            Box::pin(forbid(client, &settings.name, traffic)).await;
            Err(Ended::Denied(reason))
        }
        other => other,
    }
}

/// The log's reason for a denial: the rule; for a flow that named no host,
/// also why it named none.
fn reason(decision: &Decision, why: impl FnOnce() -> String) -> String {
    let rule = decision.rule.clone().unwrap_or_default();
    if decision.unknown_host {
        let why = why();
        format!(
            "no host name ({why}), and {rule} needs one (--allow-unknown-host would let it pass)"
        )
    } else {
        rule
    }
}

/// Room made in the buffer for each read of [`check_requests`].
const REQUEST_READ: usize = 64 * 1024;

/// Relays the client's HTTP/1 requests one by one, starting with the first
/// bytes already read, and checks each request's names before a byte of it
/// goes on; bodies (Content-Length or chunked) pass unchecked. Ends at the
/// client's EOF, with [`Ended::DeniedHttp`] at a denied request (nothing of
/// it forwarded), or [`Ended::Denied`] at a request the proxy cannot read.
/// After an upgrade or CONNECT, bytes that are no request are relayed as
/// they come.
async fn check_requests(
    client: &TcpStream,
    server: &TcpStream,
    first: FirstBytes,
    dst: SocketAddr,
    settings: &Settings,
    traffic: &Traffic,
    seen: &mut Seen,
) -> Result<(), Ended> {
    let mut requests = Requests::default();
    let (mut buf, mut eof) = (first.bytes, first.eof);
    loop {
        let step = requests.next(&buf);
        seen.requests = requests.count();
        match step {
            Err(e) => {
                let n = requests.count();
                return Err(Ended::Denied(format!(
                    "HTTP request {} on the connection: {e}",
                    n.max(1)
                )));
            }
            Ok(Step::Forward(n)) => {
                relay::write_all(server, &buf[..n], Direction::Up, traffic)
                    .await
                    .map_err(RelayError::Up)?;
                buf.drain(..n);
            }
            Ok(Step::Request(head)) => {
                let decision = settings.policy.decide(dst, &head.names);
                let denied = decision.action == Action::Deny;
                if requests.count() == 1 || denied {
                    // The log shows the first request, or the denied one.
                    seen.inspection.http = Some(head.request.clone());
                    seen.inspection.names = head.names.clone();
                    seen.rule = decision.rule.clone();
                }
                if denied {
                    let why = || "an HTTP request that names no host".to_string();
                    return Err(Ended::DeniedHttp(reason(&decision, why)));
                }
                relay::write_all(server, &buf[..head.len], Direction::Up, traffic)
                    .await
                    .map_err(RelayError::Up)?;
                buf.drain(..head.len);
                requests.allowed();
            }
            Ok(Step::Opaque) => {
                relay::write_all(server, &buf, Direction::Up, traffic)
                    .await
                    .map_err(RelayError::Up)?;
                drop(buf);
                if eof {
                    relay::shutdown_write(server).map_err(RelayError::Up)?;
                } else {
                    relay::pump(client, server, Mode::Copy, Direction::Up, traffic).await?;
                }
                return Ok(());
            }
            Ok(Step::NeedMore) if eof => {
                // What is left is no complete request: it stays here.
                relay::shutdown_write(server).map_err(RelayError::Up)?;
                return Ok(());
            }
            Ok(Step::NeedMore) => {
                if buf.is_empty() {
                    // Between requests, hold no buffer.
                    buf = Vec::new();
                }
                client.readable().await.map_err(RelayError::Up)?;
                buf.reserve(REQUEST_READ);
                match client.try_read_buf(&mut buf) {
                    Ok(0) => eof = true,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(RelayError::Up(e).into()),
                }
            }
        }
    }
}

/// The sockets each cut-through direction sends to, by their addresses:
/// (the client's, the server's). `None` when one cannot be read; the flow
/// then stays in the proxy.
fn cut_through_ends(
    client_peer: SocketAddr,
    client_local: Option<&SocketAddr>,
    server: &TcpStream,
) -> Option<(relay::Ends, relay::Ends)> {
    let to_client = relay::Ends {
        local: *client_local?,
        peer: client_peer,
    };
    // Not `dst`: the layer may have sent the onward connection to the next
    // service of a chain.
    let to_server = relay::Ends {
        local: server.local_addr().ok()?,
        peer: server.peer_addr().ok()?,
    };
    Some((to_client, to_server))
}

/// Opens the onward socket in the destination's family, hands it the
/// records, and connects.
async fn connect(
    dst: SocketAddr,
    records: Option<&RedirectRecords>,
    limit: Duration,
) -> Result<TcpStream, Ended> {
    let socket = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| Ended::Connect(dst, e))?;
    let _ = socket.set_nodelay(true);
    // Before connect: this is what keeps the flow from coming back to us.
    if let Some(records) = records {
        connredir::set_records(&socket, records).map_err(Ended::Records)?;
    }
    tokio::time::timeout(limit, socket.connect(dst))
        .await
        .map_err(|_| Ended::ConnectTimeout(dst, limit))?
        .map_err(|e| Ended::Connect(dst, e))
}

/// Answers a denied HTTP request with a 403, then lets the client's
/// remaining bytes drain briefly, so closing does not reset the answer away.
async fn forbid(client: &TcpStream, proxy: &str, traffic: &Traffic) {
    let body = format!("Forbidden by the connredir proxy {proxy:?}.\n");
    let answer = format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if relay::write_all(client, answer.as_bytes(), Direction::Down, traffic)
        .await
        .and_then(|()| relay::shutdown_write(client))
        .is_err()
    {
        return;
    }
    let drain = async {
        let mut buf = [0u8; 4096];
        while client.readable().await.is_ok() {
            match client.try_read(&mut buf) {
                Ok(0) => break,
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => break,
                _ => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::tests::client_hello;
    use crate::relay::tests::pair;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn settings(rules: &[&str]) -> Settings {
        Settings {
            name: "test".into(),
            policy: Policy::new(rules.iter().map(|r| r.parse().unwrap()).collect(), false),
            mode: Mode::Splice,
            cut_through: true,
            idle_timeout: Duration::from_secs(10),
            inspect_timeout: Duration::from_millis(500),
            first_bytes_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            standalone: true,
        }
    }

    /// Runs `handle` for a connection whose destination is `server`, as if
    /// redirected; returns the client's end and the handler task.
    async fn proxied(
        server: SocketAddr,
        settings: Settings,
    ) -> (TcpStream, tokio::task::JoinHandle<ConnectionLog>) {
        let (client, accepted) = pair().await;
        let peer = accepted.peer_addr().unwrap();
        let redirect = Redirect {
            destination: Some(server),
            ..Redirect::default()
        };
        let task = tokio::spawn(async move {
            let listener = Listener::default();
            handle(
                accepted,
                peer,
                &listener,
                redirect,
                &settings,
                std::future::pending(),
            )
            .await
        });
        (client, task)
    }

    #[tokio::test]
    async fn denied_http_gets_403_and_the_server_no_byte() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rules = ["allow:host:ok.test", "deny:host:*.test"];
        let (mut client, task) = proxied(server.local_addr().unwrap(), settings(&rules)).await;
        client
            .write_all(b"GET /secret HTTP/1.1\r\nHost: www.blocked.test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{answer}");
        assert!(answer.contains("Connection: close"));
        drop(client); // as clients do after `Connection: close`
        let (mut onward, _) = server.accept().await.unwrap();
        let mut got = Vec::new();
        onward.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty(), "the server got {got:?}");
        let log = task.await.unwrap();
        assert_eq!(log.verdict, Verdict::Deny);
        assert_eq!(log.reason.as_deref(), Some("rule 2: deny:host:*.test"));
        let http = log.http.unwrap();
        assert_eq!(
            (http.method.as_str(), http.path.as_str()),
            ("GET", "/secret")
        );
        assert_eq!(log.bytes_up, 0);
    }

    #[tokio::test]
    async fn destination_rules_deny_without_connecting() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = server.local_addr().unwrap().port();
        let rule = format!("deny:port:{port}");
        let (mut client, task) = proxied(server.local_addr().unwrap(), settings(&[&rule])).await;
        let log = task.await.unwrap();
        assert_eq!(log.verdict, Verdict::Deny);
        assert_eq!(client.read(&mut [0; 1]).await.unwrap(), 0);
        let accepted = tokio::time::timeout(Duration::from_millis(200), server.accept()).await;
        assert!(accepted.is_err(), "no onward connection was opened");
    }

    #[tokio::test]
    async fn server_first_protocols_and_tls_pass() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut client, task) = proxied(server.local_addr().unwrap(), settings(&[])).await;
        let (mut onward, _) = server.accept().await.unwrap();
        // The banner arrives while the proxy still waits for client bytes.
        onward.write_all(b"220 ready\r\n").await.unwrap();
        let mut banner = [0u8; 11];
        client.read_exact(&mut banner).await.unwrap();
        assert_eq!(&banner, b"220 ready\r\n");
        let hello = client_hello("mail.example.org", 50);
        client.write_all(&hello).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        onward.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, hello, "forwarded unchanged");
        drop(onward);
        let log = task.await.unwrap();
        assert_eq!(log.verdict, Verdict::Allow, "{:?}", log.reason);
        assert_eq!(log.server_name.as_deref(), Some("mail.example.org"));
        assert_eq!((log.bytes_up, log.bytes_down), (hello.len() as u64, 11));
        let line = serde_json::to_value(&log).unwrap();
        assert_eq!(line["client"], serde_json::Value::Null);
        assert_eq!(line["proxy"], "test");
    }

    #[tokio::test]
    async fn under_a_host_rule_a_flow_naming_no_host_in_time_is_denied() {
        for allow_unknown in [false, true] {
            let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut settings = settings(&["deny:host:*.test"]);
            settings.policy = Policy::new(vec!["deny:host:*.test".parse().unwrap()], allow_unknown);
            let (mut client, task) = proxied(server.local_addr().unwrap(), settings).await;
            let (mut onward, _) = server.accept().await.unwrap();
            // Past the inspection time (500 ms), a hello for a denied name.
            tokio::time::sleep(Duration::from_millis(700)).await;
            let _ = client
                .write_all(&client_hello("www.blocked.test", 1000))
                .await;
            let _ = client.shutdown().await;
            let mut got = Vec::new();
            let _ = onward.read_to_end(&mut got).await;
            drop(onward);
            let log = task.await.unwrap();
            if allow_unknown {
                assert_eq!(log.verdict, Verdict::Allow, "{log:?}");
                assert!(!got.is_empty());
            } else {
                assert_eq!(log.verdict, Verdict::Deny, "{log:?}");
                assert_eq!(
                    log.reason.as_deref(),
                    Some(
                        "no host name (nothing sent in 500ms), and rule 1: deny:host:*.test \
                         needs one (--allow-unknown-host would let it pass)"
                    )
                );
                assert!(got.is_empty(), "the server got {got:?}");
            }
        }
    }

    #[tokio::test]
    async fn each_request_of_a_keep_alive_connection_is_checked() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rules = ["deny:host:*.blocked.test"];
        let (mut client, task) = proxied(server.local_addr().unwrap(), settings(&rules)).await;
        let first = b"POST /a HTTP/1.1\r\nHost: ok.test\r\nContent-Length: 5\r\n\r\nhello";
        client.write_all(first).await.unwrap();
        let (mut onward, _) = server.accept().await.unwrap();
        let mut got = vec![0u8; first.len()];
        onward.read_exact(&mut got).await.unwrap();
        assert_eq!(got, first);
        onward
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        let mut answer = [0u8; 38];
        client.read_exact(&mut answer).await.unwrap();
        // The second request names a denied host in its absolute-form target.
        client
            .write_all(b"GET http://x.blocked.test/ HTTP/1.1\r\nHost: ok.test\r\n\r\n")
            .await
            .unwrap();
        let mut rest = String::new();
        client.read_to_string(&mut rest).await.unwrap();
        assert!(rest.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{rest}");
        drop(client);
        let mut more = Vec::new();
        let _ = onward.read_to_end(&mut more).await;
        assert!(more.is_empty(), "the server got {more:?}");
        let log = task.await.unwrap();
        assert_eq!(log.verdict, Verdict::Deny);
        assert_eq!(log.requests, 2);
        assert_eq!(log.http.unwrap().path, "http://x.blocked.test/");
        assert_eq!(
            log.reason.as_deref(),
            Some("rule 1: deny:host:*.blocked.test")
        );
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_is_closed_in_time() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut settings = settings(&[]);
        settings.first_bytes_timeout = Duration::from_millis(800);
        let started = Instant::now();
        let (mut client, task) = proxied(server.local_addr().unwrap(), settings).await;
        let _onward = server.accept().await.unwrap();
        let log = task.await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(800));
        assert_eq!(log.verdict, Verdict::Deny);
        assert_eq!(
            log.reason.as_deref(),
            Some("no byte from the client in 800ms (--first-bytes-timeout)")
        );
        assert_eq!(client.read(&mut [0; 1]).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn on_an_ipv4_listener_the_original_destination_is_asked_as_the_library_does() {
        // No NAT here: conntrack (when loaded) answers the socket's own
        // address, else the kernel refuses; either way both ways agree.
        let (client, accepted) = pair().await;
        let listener = Listener {
            addr: Some(accepted.local_addr().unwrap()),
            ..Listener::default()
        };
        let fast = Redirect::original_destination_only(&accepted, &listener);
        let slow = Redirect::original_destination_only(&accepted, &Listener::default());
        assert_eq!(fast.destination, slow.destination);
        assert_eq!(fast.problem, slow.problem);
        match connredir::original_destination(&accepted) {
            Ok(dst) => assert_eq!(fast.destination, Some(dst)),
            Err(e) => assert_eq!(fast.problem, Some(format!("no original destination: {e}"))),
        }
        drop(client);
    }

    #[tokio::test]
    async fn no_destination_is_an_error() {
        let (client, accepted) = pair().await;
        let peer = accepted.peer_addr().unwrap();
        let listener = Listener::default();
        let redirect = Redirect::query(&accepted, &listener);
        let log = handle(
            accepted,
            peer,
            &listener,
            redirect,
            &settings(&[]),
            std::future::pending(),
        )
        .await;
        // Without the layer: no answer, or (with conntrack) our own address.
        assert_eq!(log.verdict, Verdict::Error, "{log:?}");
        drop(client);
    }
}
