//! The messages of the control protocol: what `connredir` subcommands ask
//! a running `up` over its Unix socket, what it answers, and the decisions
//! `trace` streams. Plain data with serde, shared by the engine side
//! ([`super::server`]), the subcommand side ([`super::client`]), `trace` and
//! `metrics`.
//!
//! One request per connection, one JSON line each way; a trace request is
//! answered with an acknowledgement and then one [`TraceMessage`] line per
//! decision. The fields of the answers are declared in alphabetical order:
//! `status --json`, `conns --json` and the lists print them as they travel,
//! and their keys have always been printed sorted.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use crate::config::{OnDownConfig, RuleConfig, ServiceConfig};

/// What a client asks of the running engine.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Scopes, services, rules with hit counts, counters.
    Status,
    /// Register a service.
    ServiceAdd {
        /// As in a `[[service]]` table.
        service: ServiceConfig,
    },
    /// Unregister a service (its rules must be gone).
    ServiceDel {
        /// The service's name.
        name: String,
    },
    /// Add a rule.
    RuleAdd {
        /// As in a `[[rule]]` table (boxed: requests queue in an enum).
        rule: Box<RuleConfig>,
    },
    /// Remove a rule.
    RuleDel {
        /// The rule's id, as `rule list` shows it.
        id: u32,
    },
    /// The live redirected connections.
    Conns,
    /// Stream redirect decisions (one JSON line each) until the client
    /// closes the connection.
    Trace,
}

impl Request {
    /// The command that sends this request, for messages.
    pub fn command(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::ServiceAdd { .. } => "service add",
            Request::ServiceDel { .. } => "service del",
            Request::RuleAdd { .. } => "rule add",
            Request::RuleDel { .. } => "rule del",
            Request::Conns => "conns",
            Request::Trace => "trace",
        }
    }
}

/// The answer: `data` on success, `error` otherwise. The engine sends a
/// [`Reply`]; a client reads the type its request asked for.
#[derive(Debug, Serialize, Deserialize)]
pub struct Response<T = Reply> {
    /// What was asked for (null for a change that returns nothing, or on
    /// error). Absent counts as null, as for `error`.
    pub data: Option<T>,
    /// What went wrong.
    pub error: Option<String>,
}

impl<T> Response<T> {
    /// A success carrying `data`.
    pub fn ok(data: T) -> Response<T> {
        Response {
            data: Some(data),
            error: None,
        }
    }

    /// A failure saying why.
    pub fn error(error: impl Into<String>) -> Response<T> {
        Response {
            data: None,
            error: Some(error.into()),
        }
    }
}

/// The data of the engine's answers, one shape per request. Written
/// without a tag: each client knows which shape its request gets back.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// To [`Request::Status`].
    Status(Status),
    /// To [`Request::Conns`].
    Conns(Vec<Conn>),
    /// To [`Request::ServiceAdd`] and [`Request::RuleAdd`].
    Created(Created),
    /// To the removals: nothing (null).
    Done,
}

/// A request waiting for the engine thread, with where to send the answer:
/// how the control socket and the metrics endpoint hand requests over
/// inside `up`.
pub type Pending = (Request, mpsc::Sender<Response>);

/// The running engine as `status` shows it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The layer's counters by name.
    pub counters: BTreeMap<String, u64>,
    /// Redirected sockets open now.
    pub live_connections: u64,
    /// The rules in evaluation order, with hit counts.
    pub rules: Vec<RuleStatus>,
    /// The attached cgroups.
    pub scopes: Vec<String>,
    /// The registered services.
    pub services: Vec<ServiceStatus>,
}

/// One registered service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Its id, as records and `trace` name it.
    pub id: u32,
    /// Its listening addresses.
    pub listen: Vec<SocketAddr>,
    /// Its unique name.
    pub name: String,
    /// What happens to its connections while it is not listening.
    pub on_down: OnDownConfig,
    /// Whether it receives on every address, for each protocol its rules
    /// redirect there: a TCP listener, a bound UDP socket (with no rule
    /// yet, either).
    pub up: bool,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleStatus {
    /// Destination prefixes (none: every destination).
    pub destinations: Vec<String>,
    /// Connections it redirected.
    pub hits: u64,
    /// Its id, as `rule del` takes it.
    pub id: u32,
    /// Destination ports and ranges like `8000-8999` (none: all).
    pub ports: Vec<String>,
    /// Evaluation order, lower first.
    pub priority: u32,
    /// Its service's name (absent only while the service is unknown).
    pub service: Option<String>,
    /// The only user id it applies to.
    pub uid: Option<u32>,
    /// Its protocols: `tcp`, `udp`, or both (absent from an older `up`:
    /// TCP).
    #[serde(default)]
    pub protocol: Vec<String>,
    /// `redirect`, `permit` or `block` (absent from an older `up`: redirect).
    #[serde(default = "redirect")]
    pub action: String,
    /// Its conditions on the process and the flow beyond destination, port,
    /// protocol and uid: `gid 100`, `cgroup /sys/fs/cgroup/x`, `command
    /// curl`, `executable curl`, `local-port 1000-2000`, `after scanner`.
    #[serde(default)]
    pub conditions: Vec<String>,
}

fn redirect() -> String {
    "redirect".into()
}

/// One redirected socket: a leg of a flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Conn {
    /// How long ago this leg was redirected, in milliseconds.
    pub age_ms: u64,
    /// The connecting process's cgroup id.
    pub cgroup_id: u64,
    /// The services the flow went through so far, by name (`#ID` for one
    /// no longer registered).
    pub chain: Vec<String>,
    /// The flow's first socket: what identifies the flow across its legs.
    pub client: Option<SocketAddr>,
    /// The process that opened the flow.
    pub client_pid: u32,
    /// The user id that opened the flow.
    pub client_uid: u32,
    /// The connecting process's name.
    pub command: String,
    /// This leg's own socket address.
    pub local: Option<SocketAddr>,
    /// Where the flow was going.
    pub original_dst: Option<SocketAddr>,
    /// The process that connected this leg.
    pub pid: u32,
    /// The socket's protocol, `tcp` or `udp` (absent from an older `up`,
    /// which listed TCP legs only: `tcp`).
    #[serde(default = "tcp")]
    pub protocol: String,
    /// Its user id.
    pub uid: u32,
}

/// The id of what a request added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// The new service's or rule's id.
    pub id: u32,
}

/// The data of the answer that opens a trace stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Streaming {
    /// Decisions follow, one [`TraceMessage`] per line.
    Trace,
}

/// What the trace stream carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TraceMessage {
    /// One redirect decision.
    Decision(TraceLine),
    /// Nothing happened for a while: lets the sender notice a reader that
    /// went away. Never written to the socket.
    Heartbeat,
}

/// One decision as `trace` shows it; `trace --json` prints it as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceLine {
    /// Wall-clock time, RFC 3339.
    pub time: String,
    /// The connecting process.
    pub pid: u32,
    /// Its user id.
    pub uid: u32,
    /// Its command name.
    pub command: String,
    /// Its cgroup id.
    pub cgroup_id: u64,
    /// Where connect() was going.
    pub destination: SocketAddr,
    /// The deciding rule's id.
    pub rule: Option<u32>,
    /// That rule's service id.
    pub service_id: Option<u32>,
    /// That service's name, when known.
    pub service: Option<String>,
    /// Services in the record before this decision.
    pub hops: u16,
    /// The flow's redirect state for that service.
    pub state: TraceState,
    /// What happened.
    pub decision: Decision,
    /// The socket's protocol, `tcp` or `udp` (absent from an older `up`:
    /// `tcp`).
    #[serde(default = "tcp")]
    pub protocol: String,
    /// The deciding rule as `rule list` shows it: its action and every
    /// condition it names (absent when no rule decided).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule_text: Option<String>,
}

fn tcp() -> String {
    "tcp".into()
}

/// A flow's redirect state for one service, named as the library's
/// `RedirectState` variants are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TraceState {
    /// No service redirected the connection.
    NotRedirected,
    /// The service redirected it last.
    RedirectedBySelf,
    /// Other services redirected it; this one never did.
    RedirectedByOther,
    /// The service redirected it earlier, and another service since.
    PreviouslyRedirectedBySelf,
}

impl TraceState {
    /// The name `trace` prints.
    pub fn name(self) -> &'static str {
        match self {
            TraceState::NotRedirected => "NotRedirected",
            TraceState::RedirectedBySelf => "RedirectedBySelf",
            TraceState::RedirectedByOther => "RedirectedByOther",
            TraceState::PreviouslyRedirectedBySelf => "PreviouslyRedirectedBySelf",
        }
    }
}

/// What the connect program decided: the engine's own type, serialized by
/// its name (`redirected`, `no-rule`, ...).
pub use connredir_engine::Decision;

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> TraceLine {
        TraceLine {
            time: "2026-03-01T12:34:56.789Z".into(),
            pid: 42,
            uid: 0,
            command: "curl".into(),
            cgroup_id: 5,
            destination: "[::1]:443".parse().unwrap(),
            rule: Some(2),
            service_id: Some(9),
            service: None,
            hops: 1,
            state: TraceState::PreviouslyRedirectedBySelf,
            decision: Decision::ServiceDownBypassed,
            protocol: "udp".into(),
            rule_text: None,
        }
    }

    #[test]
    fn a_trace_line_keeps_its_json_shape() {
        // `trace --json` prints this; scripts read it.
        assert_eq!(
            serde_json::to_string(&line()).unwrap(),
            "{\"time\":\"2026-03-01T12:34:56.789Z\",\"pid\":42,\"uid\":0,\"command\":\"curl\",\
             \"cgroup_id\":5,\"destination\":\"[::1]:443\",\"rule\":2,\"service_id\":9,\
             \"service\":null,\"hops\":1,\"state\":\"PreviouslyRedirectedBySelf\",\
             \"decision\":\"service-down-bypassed\",\"protocol\":\"udp\"}"
        );
        let message = TraceMessage::Decision(line());
        let text = serde_json::to_string(&message).unwrap();
        assert!(text.starts_with("{\"decision\":{\"time\""), "{text}");
        assert_eq!(
            serde_json::from_str::<TraceMessage>(&text).unwrap(),
            message
        );
    }

    #[test]
    fn names_are_the_serialized_names() {
        for state in [
            TraceState::NotRedirected,
            TraceState::RedirectedBySelf,
            TraceState::RedirectedByOther,
            TraceState::PreviouslyRedirectedBySelf,
        ] {
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{}\"", state.name())
            );
        }
        for decision in Decision::ALL {
            assert_eq!(
                serde_json::to_string(&decision).unwrap(),
                format!("\"{}\"", decision.name())
            );
        }
    }

    #[test]
    fn a_conn_carries_its_protocol_and_an_older_one_reads_as_tcp() {
        let conn = Conn {
            age_ms: 1500,
            cgroup_id: 7,
            chain: vec!["dns-guard".into()],
            client: Some("127.0.0.1:40000".parse().unwrap()),
            client_pid: 42,
            client_uid: 65534,
            command: "dig".into(),
            local: Some("127.0.0.1:40000".parse().unwrap()),
            original_dst: Some("192.0.2.53:53".parse().unwrap()),
            pid: 42,
            protocol: "udp".into(),
            uid: 65534,
        };
        let text = serde_json::to_string(&conn).unwrap();
        assert_eq!(
            text,
            "{\"age_ms\":1500,\"cgroup_id\":7,\"chain\":[\"dns-guard\"],\
             \"client\":\"127.0.0.1:40000\",\"client_pid\":42,\"client_uid\":65534,\
             \"command\":\"dig\",\"local\":\"127.0.0.1:40000\",\
             \"original_dst\":\"192.0.2.53:53\",\"pid\":42,\"protocol\":\"udp\",\
             \"uid\":65534}"
        );
        assert_eq!(serde_json::from_str::<Conn>(&text).unwrap(), conn);
        // An `up` from before UDP legs were listed sends no protocol.
        let older = text.replace(",\"protocol\":\"udp\"", "");
        assert_eq!(
            serde_json::from_str::<Conn>(&older).unwrap().protocol,
            "tcp"
        );
    }

    #[test]
    fn answers_keep_their_json_shape() {
        let status = Status {
            counters: [("redirects".to_string(), 3), ("handoffs".to_string(), 2)].into(),
            live_connections: 1,
            rules: vec![RuleStatus {
                destinations: vec!["10.0.0.0/8".into()],
                hits: 3,
                id: 1,
                ports: vec!["80".into(), "8000-8999".into()],
                priority: 0,
                service: Some("scanner".into()),
                uid: None,
                protocol: vec!["tcp".into(), "udp".into()],
                action: "redirect".into(),
                conditions: vec![],
            }],
            scopes: vec!["/sys/fs/cgroup/apps".into()],
            services: vec![ServiceStatus {
                id: 1,
                listen: vec!["127.0.0.1:15001".parse().unwrap()],
                name: "scanner".into(),
                on_down: OnDownConfig::Bypass,
                up: true,
            }],
        };
        let text = serde_json::to_string(&Response::ok(Reply::Status(status.clone()))).unwrap();
        assert_eq!(
            text,
            "{\"data\":{\"counters\":{\"handoffs\":2,\"redirects\":3},\"live_connections\":1,\
             \"rules\":[{\"destinations\":[\"10.0.0.0/8\"],\"hits\":3,\"id\":1,\
             \"ports\":[\"80\",\"8000-8999\"],\"priority\":0,\"service\":\"scanner\",\"uid\":null,\
             \"protocol\":[\"tcp\",\"udp\"],\"action\":\"redirect\",\"conditions\":[]}],\
             \"scopes\":[\"/sys/fs/cgroup/apps\"],\"services\":[{\"id\":1,\
             \"listen\":[\"127.0.0.1:15001\"],\"name\":\"scanner\",\"on_down\":\"bypass\",\
             \"up\":true}]},\"error\":null}"
        );
        let back: Response<Status> = serde_json::from_str(&text).unwrap();
        assert_eq!(back.data, Some(status));
        assert_eq!(
            serde_json::to_string(&Response::ok(Reply::Done)).unwrap(),
            "{\"data\":null,\"error\":null}"
        );
        assert_eq!(
            serde_json::to_string(&Response::<Reply>::error("no")).unwrap(),
            "{\"data\":null,\"error\":\"no\"}"
        );
        assert_eq!(
            serde_json::to_string(&Response::ok(Reply::Created(Created { id: 7 }))).unwrap(),
            "{\"data\":{\"id\":7},\"error\":null}"
        );
        let done: Response<Created> =
            serde_json::from_str("{\"data\":null,\"error\":\"no\"}").unwrap();
        assert_eq!((done.data, done.error.as_deref()), (None, Some("no")));
    }
}
