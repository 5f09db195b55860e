//! The connredir engine: loads the kernel programs, attaches them to cgroups,
//! and registers services and rules.
//!
//! ```no_run
//! use connredir_engine::{Engine, Identity, Rule, Service};
//! # fn main() -> Result<(), connredir_engine::Error> {
//! let mut engine = Engine::load()?;
//! engine.attach("/sys/fs/cgroup/unified/my-scope")?;
//! let scanner = engine.add_service(Service {
//!     name: "scanner".into(),
//!     listen: vec!["127.0.0.1:8000".parse().unwrap()],
//!     identity: Identity { uids: vec![990], ..Default::default() },
//!     context: None,
//!     own_connections_by_self: true,
//!     accelerate: false,
//!     transparent: false,
//!     on_down: Default::default(),
//! })?;
//! engine.add_rule(Rule { ports: vec![80..=80, 443..=443], ..Rule::tcp_to(scanner) })?;
//! // Programs stay attached until `engine` is dropped.
//! # Ok(()) }
//! ```
//!
//! Everything the engine attached is detached when it is dropped, also when a
//! later step fails: nothing is left half-attached.
//!
//! This file holds the [`Engine`] facade; each job is a module: `load`
//! (the object, the seal key, the home namespace), `pin` (pinning, takeover
//! and its rollback), `attach` (links to cgroups), `services` (the service
//! registry, listeners, pid identities), `rules` (compile, trie keys, sync),
//! `counters`, `observe` (live connections, the trace), `cost` (the
//! programs' run time, by the kernel's statistics), `maps` (typed map
//! access), `link` (raw link system calls) and `error`.

#![warn(missing_docs)]

mod attach;
mod cost;
mod counters;
mod error;
mod link;
mod load;
mod maps;
mod observe;
mod pin;
mod rules;
mod services;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use aya::Ebpf;
use connredir_abi::{connredir_listener, connredir_service};

pub use attach::CGROUP_PROGRAMS;
pub use connredir_kernel::programs;
pub use cost::{ProgramCost, RunTimeStats};
pub use counters::{Counter, Counters};
pub use error::Error;
pub use observe::{boot_time, Connection, Decision, TraceEvent, Tracer};
pub use pin::ensure_bpffs;
pub use rules::{
    check_rules, Action, CgroupCondition, CommandCondition, ExecutableCondition, Protocol, Rule,
    RuleId,
};
pub use services::{Identity, OnDown, Service, ServiceId};

pub(crate) use error::{map_err, program_err};

use attach::Attachment;
use pin::Previous;
use rules::CompiledRules;
use services::{liveness, Registered};

/// The loaded redirect layer.
pub struct Engine {
    pub(crate) bpf: Ebpf,
    /// Where maps and links are pinned; `None`: they live as long as we do.
    pub(crate) pin_dir: Option<PathBuf>,
    /// Services found in pinned maps, not registered again yet.
    pub(crate) adopted: BTreeMap<ServiceId, connredir_service>,
    /// The state a pinned engine took over, until the takeover is finished.
    pub(crate) previous: Option<Previous>,
    /// The acceleration program the pinned socket map had before this
    /// engine attached its own, until the takeover is finished.
    pub(crate) accel_before: Option<OwnedFd>,
    /// Listeners this engine marked during a takeover, with the mark each
    /// had before, until the takeover is finished.
    pub(crate) remarked: Vec<(OwnedFd, Option<connredir_listener>)>,
    /// The cgroups attached, with their links.
    pub(crate) attachments: Vec<Attachment>,
    /// The registered services, with what was written for each.
    pub(crate) services: BTreeMap<ServiceId, Registered>,
    /// The rules, by id.
    pub(crate) rules: BTreeMap<RuleId, Rule>,
    /// What each generation of the rule trie holds.
    pub(crate) installed: [CompiledRules; 2],
    /// The rule ids whose executable name `rule_exes` holds.
    pub(crate) rule_exes: BTreeSet<u32>,
    /// The generation connects read.
    pub(crate) rules_generation: u8,
    /// When the generation last flipped (a grace period follows).
    pub(crate) rules_flipped_at: Option<std::time::Instant>,
    /// The id the next rule gets (ids are not reused within an engine).
    pub(crate) next_rule: u32,
    /// The registered pids, removed from the kernel when their process exits.
    pub(crate) pids: liveness::PidIdentities,
    /// Per service, the listening sockets (inodes) on its addresses seen
    /// at the last look, so only new ones are searched for their holders.
    pub(crate) listener_inodes: BTreeMap<ServiceId, BTreeSet<u64>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("attached", &self.attached().collect::<Vec<_>>())
            .field("services", &self.services.len())
            .field("rules", &self.rules.len())
            .finish()
    }
}

impl Engine {
    /// Loads the kernel programs (not attached anywhere yet).
    pub fn load() -> Result<Engine, Error> {
        load::load_with(None)
    }

    /// Loads the kernel programs with their maps and links pinned in `dir`
    /// (on bpffs), so they outlive this process: a later `load_pinned` of
    /// the same directory takes over the maps and links without a moment
    /// in which connections go unredirected. [`Engine::remove_pinned`]
    /// removes it all.
    pub fn load_pinned(dir: &Path) -> Result<Engine, Error> {
        pin::load_pinned(dir)
    }

    /// Removes everything a pinned engine left in `dir`: its links (which
    /// detaches the programs), its maps, and the directory. Files it did not
    /// make are left alone.
    pub fn remove_pinned(dir: &Path) -> Result<usize, Error> {
        pin::remove_pinned(dir)
    }

    /// After a restart, once the configuration is registered again: removes
    /// what the previous run registered and this one did not (services,
    /// identities, addresses, hit counts of rules that are gone).
    ///
    /// Until this succeeds, dropping a pinned engine undoes what it changed;
    /// after it, the earlier run's links of cgroups this engine did not
    /// attach are removed too.
    pub fn finish_takeover(&mut self) -> Result<(), Error> {
        pin::finish_takeover(self)
    }

    /// The cgroups the programs are attached to.
    pub fn attached(&self) -> impl Iterator<Item = &Path> {
        attach::attached(self)
    }

    /// Attaches the programs to a cgroup v2 directory: connections opened
    /// there (and in its descendants) meet the rules, and services running
    /// there get records and the syscall interface. Services must run in an
    /// attached cgroup too: their onward connections meet the other services.
    ///
    /// A cgroup nested inside (or containing) an attached one is refused: the
    /// programs would run twice for its sockets.
    pub fn attach(&mut self, cgroup: impl AsRef<Path>) -> Result<(), Error> {
        attach::attach(self, cgroup)
    }

    /// Detaches the programs from one cgroup (and removes its pins).
    pub fn detach(&mut self, cgroup: impl AsRef<Path>) -> Result<(), Error> {
        attach::detach(self, cgroup)
    }

    /// Registers a service and returns its id.
    pub fn add_service(&mut self, service: Service) -> Result<ServiceId, Error> {
        services::add_service(self, service)
    }

    /// Unregisters a service. Its rules must be removed first.
    pub fn remove_service(&mut self, id: ServiceId) -> Result<Service, Error> {
        services::remove_service(self, id)
    }

    /// The registered services.
    pub fn services(&self) -> impl Iterator<Item = (ServiceId, &Service)> {
        services::services(self)
    }

    /// Finds a service by name.
    pub fn service_by_name(&self, name: &str) -> Option<ServiceId> {
        services::service_by_name(self, name)
    }

    /// Marks the services' own listeners that appeared since the last look
    /// (a proxy outside the attached cgroups, whose bind the kernel did not
    /// see, or one that bound before its service was registered and
    /// listened after): `connredir up` calls it every second. Cheap when
    /// nothing changed: it reads `/proc/net/tcp{,6}` and looks for the
    /// holders of a listening socket only when one is new.
    pub fn mark_new_listeners(&mut self) {
        services::mark_new_listeners(self)
    }

    /// Adds a rule; it applies to the next connect.
    pub fn add_rule(&mut self, rule: Rule) -> Result<RuleId, Error> {
        rules::sync::add_rule(self, rule)
    }

    /// Replaces every rule with `rules`, in one step: each connect sees
    /// either the whole old rule set or the whole new one.
    pub fn replace_rules(&mut self, rules: Vec<Rule>) -> Result<Vec<RuleId>, Error> {
        rules::sync::replace_rules(self, rules)
    }

    /// Removes a rule.
    pub fn remove_rule(&mut self, id: RuleId) -> Result<Rule, Error> {
        rules::sync::remove_rule(self, id)
    }

    /// The rules, by id.
    pub fn rules(&self) -> impl Iterator<Item = (RuleId, &Rule)> {
        rules::sync::rules(self)
    }

    /// Redirects per rule since the rule was added.
    pub fn rule_hits(&self) -> Result<BTreeMap<RuleId, u64>, Error> {
        rules::sync::rule_hits(self)
    }

    /// Reads the counters.
    pub fn counters(&self) -> Result<Counters, Error> {
        counters::read(self)
    }

    /// Number of records waiting in the hand-off map (connections redirected
    /// whose service has not accepted them yet).
    pub fn pending_handoffs(&self) -> Result<usize, Error> {
        counters::pending_handoffs(self)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(previous) = self.previous.take() {
            pin::roll_back(self, previous);
        }
        attach::restore_accel(self);
        attach::release_all(self);
    }
}
