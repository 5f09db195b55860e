//! Redirect services: the local proxies that receive redirected connections.

use std::net::SocketAddr;
use std::path::PathBuf;

pub use connredir::ServiceId;
use connredir_abi::{
    connredir_endpoint, connredir_service, CONNREDIR_MAX_CONTEXT, CONNREDIR_SERVICE_ACCELERATE,
    CONNREDIR_SERVICE_ACTIVE, CONNREDIR_SERVICE_BYPASS_WHEN_DOWN, CONNREDIR_SERVICE_LISTEN4,
    CONNREDIR_SERVICE_LISTEN6, CONNREDIR_SERVICE_OWN_BY_SELF, CONNREDIR_SERVICE_TRANSPARENT,
};

use crate::Error;

/// The processes that are the service. Their own connections do not go back
/// to the service (see [`Service::own_connections_by_self`]), they may query
/// the service's context, and they may set records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// Process ids (thread group ids), each an identity for as long as its
    /// process lives: the engine forgets it the moment the process exits,
    /// so a later process given the same pid is not the service. A pid with
    /// no process cannot be registered.
    pub pids: Vec<u32>,
    /// cgroup v2 directories whose member processes are the service.
    pub cgroups: Vec<PathBuf>,
    /// User ids.
    pub uids: Vec<u32>,
}

impl Identity {
    /// True when no process is named.
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty() && self.cgroups.is_empty() && self.uids.is_empty()
    }
}

/// What a service is: a name, where it listens, who it is, and its context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Human-readable unique name.
    pub name: String,
    /// Listening addresses: at most one IPv4 and one IPv6.
    pub listen: Vec<SocketAddr>,
    /// The processes that are this service.
    pub identity: Identity,
    /// The redirect context handed to the service (at most 1024 bytes);
    /// `None`: the original destination and local address.
    pub context: Option<Vec<u8>>,
    /// Whether connections the service's own processes open without records
    /// count as redirected by self, and so never reach the service. Keep it
    /// on for proxies that forward without setting records (they would loop
    /// otherwise); turn it off to have the service inspect its own other
    /// connections, when it sets records on the ones it forwards.
    pub own_connections_by_self: bool,
    /// Sockmap acceleration: connections redirected to the service, and its
    /// onward connections to local destinations, move their data socket to
    /// socket without the TCP stack. The service must then read those
    /// sockets with read()/recv(), not splice() (ask with
    /// `connredir::is_accelerated`).
    pub accelerate: bool,
    /// Transparent, as a TPROXY socket is: the sockets the service accepts
    /// for redirected flows answer `getsockname()` with the flow's original
    /// destination, for proxies that read the destination there rather
    /// than asking `SO_ORIGINAL_DST` (haproxy's `option transparent` on
    /// IPv6). Off by default: a proxy comparing an accepted socket's local
    /// address with the destination, to catch loops, would see every flow
    /// as one.
    pub transparent: bool,
    /// What a selected connection does while nothing of the service's own
    /// listens on its address (it is stopped or restarting).
    pub on_down: OnDown,
}

/// A service's failure policy, decided in the kernel at connect time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnDown {
    /// Refuse the connect (`ECONNREFUSED`): no selected flow gets past a
    /// service that is down. The default.
    #[default]
    Block,
    /// Skip the service: the flow meets the next matching rule, or goes
    /// direct. For services whose inspection is optional.
    Bypass,
}

impl OnDown {
    /// The name used in configuration files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            OnDown::Block => "block",
            OnDown::Bypass => "bypass",
        }
    }
}

impl Service {
    /// Checks the fields: a name, one IPv4 and one IPv6 listening address at
    /// most, concrete addresses, a context of at most 1024 bytes.
    pub fn check(&self) -> Result<(), Error> {
        self.to_kernel().map(|_| ())
    }

    /// Checks the fields and builds the kernel's view of the service.
    pub(crate) fn to_kernel(&self) -> Result<connredir_service, Error> {
        let invalid = |why: String| Error::InvalidService(format!("{}: {why}", self.name));
        if self.name.is_empty() {
            return Err(Error::InvalidService("a service needs a name".into()));
        }
        let mut value = connredir_service {
            flags: CONNREDIR_SERVICE_ACTIVE,
            ..Default::default()
        };
        if self.own_connections_by_self {
            value.flags |= CONNREDIR_SERVICE_OWN_BY_SELF;
        }
        if self.accelerate {
            value.flags |= CONNREDIR_SERVICE_ACCELERATE;
        }
        if self.transparent {
            value.flags |= CONNREDIR_SERVICE_TRANSPARENT;
        }
        if self.on_down == OnDown::Bypass {
            value.flags |= CONNREDIR_SERVICE_BYPASS_WHEN_DOWN;
        }
        for addr in &self.listen {
            let (flag, slot) = match addr {
                SocketAddr::V4(_) => (CONNREDIR_SERVICE_LISTEN4, &mut value.listen4),
                SocketAddr::V6(_) => (CONNREDIR_SERVICE_LISTEN6, &mut value.listen6),
            };
            if value.flags & flag != 0 {
                return Err(invalid(format!(
                    "more than one {} listening address; give at most one IPv4 and one IPv6",
                    if flag == CONNREDIR_SERVICE_LISTEN4 {
                        "IPv4"
                    } else {
                        "IPv6"
                    }
                )));
            }
            if addr.port() == 0 || addr.ip().is_unspecified() {
                return Err(invalid(format!(
                    "listening address {addr} must be a concrete address and port \
                     (for example 127.0.0.1:8000)"
                )));
            }
            value.flags |= flag;
            *slot = connredir_endpoint::from_socket_addr(addr);
        }
        if self.listen.is_empty() {
            return Err(invalid("no listening address".into()));
        }
        if let Some(context) = &self.context {
            if context.is_empty() || context.len() > CONNREDIR_MAX_CONTEXT as usize {
                return Err(invalid(format!(
                    "context is {} bytes; it must be 1 to {CONNREDIR_MAX_CONTEXT}",
                    context.len()
                )));
            }
            value.context_len = context.len() as u32;
            value.context[..context.len()].copy_from_slice(context);
        }
        Ok(value)
    }
}
