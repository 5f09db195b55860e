//! The connection log: one JSON object per line, per connection, written
//! when the connection ends. UDP adds three shapes, told apart by their
//! fields: a flow's line ([`UdpFlowLog`], `"protocol": "udp"`), a DNS
//! query's ([`DnsQueryLog`], with `"dns"`), and the flows refused at the
//! flow limit ([`FlowsRefusedLog`], with `"refused_datagrams"`).

use std::fs::OpenOptions;
use std::io::{self, LineWriter, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::http::HttpRequest;
use crate::relay::Direction;

/// What happened to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Relayed (possibly ended by idleness or shutdown; see `reason`).
    Allow,
    /// Refused by a rule.
    Deny,
    /// Could not be relayed, or failed while relaying.
    Error,
}

/// The process that opened the flow, from the redirect records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Client {
    /// Process id.
    pub pid: u32,
    /// User id.
    pub uid: u32,
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// The command name (comm) of the thread that opened the flow, as the
    /// layer recorded it at connect time (`/proc/PID/comm` for records
    /// that do not carry it, when the process is still there).
    pub command: Option<String>,
}

/// The redirect context: the default context's original destination, or
/// the length of a context the redirecting side chose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Context {
    /// A default context: where the connection was going.
    Destination(String),
    /// Any other context: its length in bytes.
    Length(usize),
}

/// One log line.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionLog {
    /// When the connection ended, RFC 3339 UTC.
    pub time: String,
    /// This proxy's `--name`.
    pub proxy: String,
    /// The worker (0-based, below `--workers`) that accepted and served
    /// the connection.
    pub worker: u32,
    /// Who opened the flow; null without records.
    pub client: Option<Client>,
    /// The client socket's address as accepted.
    pub peer: String,
    /// The flow's id: the address of the socket that opened the flow (the
    /// `local` of the first hop in the records), the same in every proxy's
    /// line about this flow; null without records.
    pub flow: Option<String>,
    /// Where the flow was going.
    pub original_dst: Option<String>,
    /// TLS SNI.
    pub server_name: Option<String>,
    /// The HTTP request: the first on the connection, or the denied one.
    pub http: Option<HttpRequest>,
    /// How many HTTP requests on the connection were checked (each one is
    /// when a host rule decides); absent when none was.
    #[serde(skip_serializing_if = "is_zero")]
    pub requests: u64,
    /// Bytes client → server.
    pub bytes_up: u64,
    /// Bytes to the client (the server's, or the proxy's 403).
    pub bytes_down: u64,
    /// Directions handed to the kernel after their first bytes (flows
    /// accelerated on both legs): their later bytes moved socket to socket
    /// past the proxy and are not in `bytes_up` / `bytes_down`. Absent
    /// when none was.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cut_through: Vec<Direction>,
    /// From accept to close.
    pub duration_ms: u64,
    /// Service ids from the records, oldest first.
    pub chain: Vec<u32>,
    /// The redirect context, when this proxy may read it.
    pub context: Option<Context>,
    /// allow, deny or error.
    pub verdict: Verdict,
    /// The deciding rule, or what went wrong.
    pub reason: Option<String>,
}

/// One UDP flow (a client address and its destination), written when it
/// ends (idle, shutdown, or an error).
#[derive(Debug, Clone, Serialize)]
pub struct UdpFlowLog {
    /// When the flow ended, RFC 3339 UTC.
    pub time: String,
    /// This proxy's `--name`.
    pub proxy: String,
    /// Always `udp`.
    pub protocol: crate::policy::Protocol,
    /// Who opened the flow; null without records.
    pub client: Option<Client>,
    /// The client socket's address.
    pub peer: String,
    /// The flow's id, as for TCP; null without records.
    pub flow: Option<String>,
    /// Where the flow was going (or `--udp-upstream`).
    pub original_dst: Option<String>,
    /// Datagrams client → server, relayed.
    pub datagrams_up: u64,
    /// Datagrams to the client (the server's, or the proxy's DNS answers).
    pub datagrams_down: u64,
    /// Datagrams from the client not relayed (denied flow or query, or no
    /// destination).
    pub dropped: u64,
    /// Bytes client → server.
    pub bytes_up: u64,
    /// Bytes to the client.
    pub bytes_down: u64,
    /// DNS queries seen (each has its own line); absent when none.
    #[serde(skip_serializing_if = "is_zero")]
    pub dns_queries: u64,
    /// From the first datagram to the end.
    pub duration_ms: u64,
    /// Service ids from the records, oldest first.
    pub chain: Vec<u32>,
    /// The redirect context, when this proxy may read it.
    pub context: Option<Context>,
    /// allow, deny or error.
    pub verdict: Verdict,
    /// The deciding rule, or why the flow ended.
    pub reason: Option<String>,
}

/// What a DNS query asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsQuestion {
    /// The message id.
    pub id: Option<u16>,
    /// The name asked for (the first question's), null when the query could
    /// not be read.
    pub name: Option<String>,
    /// Its type (`A`, `AAAA`, ...), null when the query could not be read.
    #[serde(rename = "type")]
    pub qtype: Option<String>,
    /// The answer's response code (`NOERROR`, `NXDOMAIN`, `REFUSED`, ...):
    /// the server's, or the proxy's own for a denied query; null when no
    /// answer came (see `reason`).
    pub rcode: Option<String>,
}

/// One DNS query of a UDP flow to port 53, written when its answer passes
/// (or the proxy answers it, or no answer came before the flow ended).
#[derive(Debug, Clone, Serialize)]
pub struct DnsQueryLog {
    /// When the answer passed, RFC 3339 UTC.
    pub time: String,
    /// This proxy's `--name`.
    pub proxy: String,
    /// Always `udp`.
    pub protocol: crate::policy::Protocol,
    /// Who asked; null without records.
    pub client: Option<Client>,
    /// The client socket's address.
    pub peer: String,
    /// The flow's id; null without records.
    pub flow: Option<String>,
    /// The DNS server the query was going to.
    pub original_dst: Option<String>,
    /// The query and its answer.
    pub dns: DnsQuestion,
    /// From the query to its answer; null without one.
    pub duration_ms: Option<u64>,
    /// Service ids from the records, oldest first.
    pub chain: Vec<u32>,
    /// allow or deny.
    pub verdict: Verdict,
    /// The deciding rule, or what was wrong with the query.
    pub reason: Option<String>,
}

/// Datagrams from new client addresses dropped at `--max-udp-flows`: one
/// line on the first, then at most one per 10 s with the count since the
/// last line, and one at shutdown.
#[derive(Debug, Clone, Serialize)]
pub struct FlowsRefusedLog {
    /// When written, RFC 3339 UTC.
    pub time: String,
    /// This proxy's `--name`.
    pub proxy: String,
    /// Always `udp`.
    pub protocol: crate::policy::Protocol,
    /// The UDP address they came to.
    pub listen: String,
    /// How many, since the previous such line.
    pub refused_datagrams: u64,
    /// How many since the proxy started.
    pub refused_total: u64,
    /// Always deny.
    pub verdict: Verdict,
    /// The limit.
    pub reason: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Where log lines go; shared by all connections, one line at a time.
pub struct LogSink(Mutex<Box<dyn Write + Send>>, #[cfg(test)] Option<Memory>);

/// Lines kept in memory, for tests.
#[cfg(test)]
#[derive(Clone, Default)]
pub struct Memory(std::sync::Arc<Mutex<Vec<u8>>>);

#[cfg(test)]
impl Write for Memory {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl LogSink {
    /// Lines kept in memory.
    pub fn memory() -> LogSink {
        let memory = Memory::default();
        LogSink(Mutex::new(Box::new(memory.clone())), Some(memory))
    }

    /// The lines written so far, parsed.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let memory = self.1.as_ref().expect("a memory sink");
        let bytes = memory.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl LogSink {
    /// Lines to stdout.
    pub fn stdout() -> LogSink {
        LogSink(
            Mutex::new(Box::new(io::stdout())),
            #[cfg(test)]
            None,
        )
    }

    /// Lines appended to `path` (created when missing).
    pub fn file(path: &Path) -> io::Result<LogSink> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(LogSink(
            Mutex::new(Box::new(LineWriter::new(file))),
            #[cfg(test)]
            None,
        ))
    }

    /// Writes one line; a failure is reported, never fatal. The line is
    /// serialized into the calling thread's buffer (kept between lines, so
    /// a line costs no allocation) and handed on in one write.
    pub fn write(&self, entry: &impl Serialize) {
        LINE.with_borrow_mut(|line| {
            line.clear();
            serde_json::to_writer(&mut *line, entry).expect("log entries serialize");
            line.push(b'\n');
            let mut out = self
                .0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Err(e) = out.write_all(line).and_then(|()| out.flush()) {
                tracing::warn!(error = %e, "cannot write the connection log");
            }
            // An unusually long line (a long reason or host) is not kept.
            if line.capacity() > LINE_KEPT {
                *line = Vec::with_capacity(LINE_KEPT);
            }
        });
    }
}

/// The capacity of a thread's line buffer: room for any ordinary line.
const LINE_KEPT: usize = 4 * 1024;

thread_local! {
    /// The line being written by this thread (see [`LogSink::write`]).
    static LINE: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(LINE_KEPT));
}

/// The last instant humantime can write (the end of year 9999).
const LAST_WRITABLE: Duration = Duration::from_millis(253_402_300_800_000 - 1);

/// `t` as RFC 3339 UTC with milliseconds: `2026-03-01T12:34:56.789Z`.
/// Times before 1970 are written as 1970-01-01T00:00:00.000Z, and times
/// after year 9999 (which RFC 3339 cannot write) as its last millisecond.
pub fn rfc3339(t: SystemTime) -> String {
    let since = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .min(LAST_WRITABLE);
    humantime::format_rfc3339_millis(UNIX_EPOCH + since).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        let at = |secs: u64, millis: u64| {
            rfc3339(UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis))
        };
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_709_251_199, 999), "2024-02-29T23:59:59.999Z");
        assert_eq!(at(4_102_444_800, 0), "2100-01-01T00:00:00.000Z");
        assert_eq!(at(1_767_225_599, 0), "2025-12-31T23:59:59.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH - Duration::from_secs(1)),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(300_000_000_000)),
            "9999-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn context_and_verdict_shapes() {
        let json = |v: serde_json::Result<String>| v.unwrap();
        let dst = Context::Destination("192.0.2.1:443".into());
        assert_eq!(json(serde_json::to_string(&dst)), "\"192.0.2.1:443\"");
        assert_eq!(json(serde_json::to_string(&Context::Length(12))), "12");
        assert_eq!(json(serde_json::to_string(&Verdict::Deny)), "\"deny\"");
    }
}
