//! Watching the layer work: the live redirected connections (the `conns`
//! map: TCP legs kept by the sockops program, UDP legs by the connect and
//! sendmsg programs and the sock_release program) and the stream of redirect decisions
//! (the `trace` ring buffer, fed by the connect programs while someone
//! reads it).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData, RingBuf};
use connredir::{RedirectState, ServiceId};
use connredir_abi::{
    connredir_conn, connredir_endpoint, connredir_trace_event, map_names,
    CONNREDIR_DECISION_BLOCKED, CONNREDIR_DECISION_HOP_LIMIT, CONNREDIR_DECISION_LOOP_PREVENTED,
    CONNREDIR_DECISION_NO_MEMORY, CONNREDIR_DECISION_NO_RULE, CONNREDIR_DECISION_PERMITTED,
    CONNREDIR_DECISION_REDIRECTED, CONNREDIR_DECISION_SERVICE_DOWN,
    CONNREDIR_DECISION_SERVICE_DOWN_BYPASSED, CONNREDIR_PROTO_UDP, CONNREDIR_STATE_BY_OTHER,
    CONNREDIR_STATE_BY_SELF, CONNREDIR_STATE_PREVIOUSLY_BY_SELF,
};

use crate::{map_err, Engine, Error, Protocol};

/// One redirected socket: a leg of a flow, opened by the flow's client (the
/// first leg) or by a service forwarding it (the later legs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The process that connected this leg (tgid).
    pub pid: u32,
    /// Its user id.
    pub uid: u32,
    /// Its command name (as in /proc/PID/comm).
    pub command: String,
    /// Its cgroup id.
    pub cgroup_id: u64,
    /// The process that opened the flow.
    pub client_pid: u32,
    /// The user id that opened the flow.
    pub client_uid: u32,
    /// The flow's first socket: what identifies the flow across its legs.
    pub client: Option<SocketAddr>,
    /// This leg's own socket address.
    pub local: Option<SocketAddr>,
    /// Where the flow was going.
    pub original_destination: Option<SocketAddr>,
    /// The services that redirected the flow so far, oldest first; the last
    /// one is where this leg goes.
    pub chain: Vec<ServiceId>,
    /// How long ago this leg was redirected.
    pub age: Duration,
    /// The socket's protocol (`Tcp` or `Udp`; never `TcpAndUdp`).
    pub protocol: Protocol,
}

/// What the connect program decided for one connect(). Serialized by its
/// [`Decision::name`], as `trace --json` and the control protocol carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    /// Sent to a service.
    Redirected,
    /// No rule matched: the connection went direct.
    NoRule,
    /// Every matching rule's service had already handled the flow (or
    /// opened it): the connection went direct.
    LoopPrevented,
    /// The chain was full: the connection went direct.
    HopLimit,
    /// The layer could not allocate the socket's record: the connect was
    /// refused (a selected flow never goes without its record).
    NoMemory,
    /// The service's own listener was absent and its policy is to block:
    /// the connect was refused.
    ServiceDown,
    /// The service's own listener was absent and its policy is to bypass:
    /// it was skipped, and no later rule took the connection.
    ServiceDownBypassed,
    /// A permit rule matched: the connection went direct, and no later
    /// rule was judged.
    Permitted,
    /// A block rule matched: the connect (or datagram) was refused with
    /// `EACCES` before any service saw it.
    Blocked,
}

impl Decision {
    /// Every decision, in the order of the ABI's numbers (1 onwards).
    pub const ALL: [Decision; 9] = [
        Decision::Redirected,
        Decision::NoRule,
        Decision::LoopPrevented,
        Decision::HopLimit,
        Decision::NoMemory,
        Decision::ServiceDown,
        Decision::ServiceDownBypassed,
        Decision::Permitted,
        Decision::Blocked,
    ];

    fn from_abi(value: u8) -> Option<Decision> {
        Some(match u32::from(value) {
            CONNREDIR_DECISION_REDIRECTED => Decision::Redirected,
            CONNREDIR_DECISION_NO_RULE => Decision::NoRule,
            CONNREDIR_DECISION_LOOP_PREVENTED => Decision::LoopPrevented,
            CONNREDIR_DECISION_HOP_LIMIT => Decision::HopLimit,
            CONNREDIR_DECISION_NO_MEMORY => Decision::NoMemory,
            CONNREDIR_DECISION_SERVICE_DOWN => Decision::ServiceDown,
            CONNREDIR_DECISION_SERVICE_DOWN_BYPASSED => Decision::ServiceDownBypassed,
            CONNREDIR_DECISION_PERMITTED => Decision::Permitted,
            CONNREDIR_DECISION_BLOCKED => Decision::Blocked,
            _ => return None,
        })
    }

    /// The name used in output and filters (`redirected`, `no-rule`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Decision::Redirected => "redirected",
            Decision::NoRule => "no-rule",
            Decision::LoopPrevented => "loop-prevented",
            Decision::HopLimit => "hop-limit",
            Decision::NoMemory => "no-memory",
            Decision::ServiceDown => "service-down",
            Decision::ServiceDownBypassed => "service-down-bypassed",
            Decision::Permitted => "permitted",
            Decision::Blocked => "blocked",
        }
    }
}

fn state_from_abi(value: u8) -> RedirectState {
    match u32::from(value) {
        CONNREDIR_STATE_BY_SELF => RedirectState::RedirectedBySelf,
        CONNREDIR_STATE_BY_OTHER => RedirectState::RedirectedByOther,
        CONNREDIR_STATE_PREVIOUSLY_BY_SELF => RedirectState::PreviouslyRedirectedBySelf,
        _ => RedirectState::NotRedirected,
    }
}

/// One redirect decision, as the connect program saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEvent {
    /// When (`CLOCK_BOOTTIME`).
    pub time: Duration,
    /// The connecting process (tgid).
    pub pid: u32,
    /// Its user id.
    pub uid: u32,
    /// Its command name.
    pub command: String,
    /// Its cgroup id.
    pub cgroup_id: u64,
    /// The destination connect() asked for.
    pub destination: SocketAddr,
    /// The rule that decided (the first one skipped, for a prevented loop).
    pub rule: Option<u32>,
    /// That rule's service.
    pub service: Option<ServiceId>,
    /// Services in the flow's record before this decision.
    pub hops: u16,
    /// The flow's redirect state for that service.
    pub state: RedirectState,
    /// What happened.
    pub decision: Decision,
    /// The socket's protocol (`Tcp` or `Udp`).
    pub protocol: Protocol,
}

/// A socket's protocol as the programs write it: UDP, or else TCP (0 in a
/// live-connection entry of a layer from before UDP legs were listed).
fn protocol_from_abi(value: u8) -> Protocol {
    if value == CONNREDIR_PROTO_UDP as u8 {
        Protocol::Udp
    } else {
        Protocol::Tcp
    }
}

fn command(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|b| *b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

fn endpoint(ep: &connredir_endpoint) -> Option<SocketAddr> {
    ep.to_socket_addr().filter(|a| a.port() != 0)
}

/// Time since boot (`CLOCK_BOOTTIME`), the kernel programs' clock.
pub fn boot_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

impl Connection {
    fn from_abi(conn: &connredir_conn, now: Duration) -> Connection {
        let hops = usize::from(conn.hop_count).min(conn.chain.len());
        Connection {
            pid: conn.pid,
            uid: conn.uid,
            command: command(&conn.comm),
            cgroup_id: conn.cgroup_id,
            client_pid: conn.client_pid,
            client_uid: conn.client_uid,
            client: endpoint(&conn.client),
            local: endpoint(&conn.local),
            original_destination: endpoint(&conn.original_dst),
            chain: conn.chain[..hops].iter().map(|id| ServiceId(*id)).collect(),
            age: now.saturating_sub(Duration::from_nanos(conn.time_ns)),
            protocol: protocol_from_abi(conn.protocol),
        }
    }
}

impl Engine {
    /// The live redirected connections, oldest first.
    pub fn connections(&self) -> Result<Vec<Connection>, Error> {
        let name = map_names::CONNS;
        let map = self.bpf.map(name).ok_or(Error::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        let conns =
            HashMap::<&MapData, u64, connredir_conn>::try_from(map).map_err(map_err(name))?;
        let now = boot_time();
        let mut out = Vec::new();
        for entry in conns.iter() {
            // An entry may go between the key walk and the lookup: skip it.
            let Ok((_, conn)) = entry else {
                continue;
            };
            // A UDP leg's entry is added blank and then filled: not yet.
            if conn.hop_count == 0 {
                continue;
            }
            out.push(Connection::from_abi(&conn, now));
        }
        out.sort_by_key(|c| std::cmp::Reverse(c.age));
        Ok(out)
    }

    /// Number of sockets in the sockmap acceleration now.
    pub fn accelerated_sockets(&self) -> Result<usize, Error> {
        let name = map_names::ACCEL_STATE;
        let map = self.bpf.map(name).ok_or(Error::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        let state = HashMap::<
            &MapData,
            connredir_abi::connredir_pair_key,
            connredir_abi::connredir_accel_state,
        >::try_from(map)
        .map_err(map_err(name))?;
        Ok(state.keys().count())
    }

    /// Takes the trace reader out of the engine (there is one). Decisions
    /// flow only while a [`Tracer`] is enabled.
    pub fn tracer(&mut self) -> Result<Tracer, Error> {
        let taken = |name: &'static str| Error::Map {
            name,
            source: aya::maps::MapError::InvalidName {
                name: format!("{name} (the tracer was already taken)"),
            },
        };
        let ring = self
            .bpf
            .take_map(map_names::TRACE)
            .ok_or_else(|| taken(map_names::TRACE))?;
        let control = self
            .bpf
            .take_map(map_names::TRACE_CONTROL)
            .ok_or_else(|| taken(map_names::TRACE_CONTROL))?;
        let mut tracer = Tracer {
            ring: RingBuf::try_from(ring).map_err(map_err(map_names::TRACE))?,
            control: Array::try_from(control).map_err(map_err(map_names::TRACE_CONTROL))?,
        };
        // A previous run may have left it on.
        tracer.set_enabled(false)?;
        Ok(tracer)
    }
}

/// Reads redirect decisions from the kernel's ring buffer.
pub struct Tracer {
    ring: RingBuf<MapData>,
    control: Array<MapData, u32>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer").finish_non_exhaustive()
    }
}

impl Tracer {
    /// Turns the stream of decisions on or off (off costs connects one
    /// array lookup).
    pub fn set_enabled(&mut self, on: bool) -> Result<(), Error> {
        self.control
            .set(0, u32::from(on), 0)
            .map_err(map_err(map_names::TRACE_CONTROL))
    }

    /// Waits up to `timeout` for decisions and returns those that arrived.
    pub fn poll(&mut self, timeout: Duration) -> Vec<TraceEvent> {
        let mut events = self.drain();
        if events.is_empty() {
            let mut fd = libc::pollfd {
                fd: self.ring.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd; the ring buffer fd outlives the call.
            unsafe { libc::poll(&mut fd, 1, ms) };
            events = self.drain();
        }
        events
    }

    fn drain(&mut self) -> Vec<TraceEvent> {
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() < std::mem::size_of::<connredir_trace_event>() {
                continue;
            }
            // SAFETY: the item holds at least one event, written by the
            // kernel program with this layout; read_unaligned copes with
            // the ring buffer's 8-byte alignment.
            let raw: connredir_trace_event =
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let Some(decision) = Decision::from_abi(raw.decision) else {
                continue;
            };
            let Some(destination) = raw.dst.to_socket_addr() else {
                continue;
            };
            events.push(TraceEvent {
                time: Duration::from_nanos(raw.time_ns),
                pid: raw.pid,
                uid: raw.uid,
                command: command(&raw.comm),
                cgroup_id: raw.cgroup_id,
                destination,
                rule: (raw.rule_id != 0).then_some(raw.rule_id),
                service: (raw.service_id != 0).then_some(ServiceId(raw.service_id)),
                hops: raw.hop_count,
                state: state_from_abi(raw.state),
                decision,
                protocol: protocol_from_abi(raw.protocol),
            });
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_abi_decision_is_one_of_all_in_order() {
        for (i, decision) in Decision::ALL.into_iter().enumerate() {
            assert_eq!(Decision::from_abi(i as u8 + 1), Some(decision));
        }
        assert_eq!(Decision::from_abi(0), None);
        assert_eq!(Decision::from_abi(Decision::ALL.len() as u8 + 1), None);
    }
}
