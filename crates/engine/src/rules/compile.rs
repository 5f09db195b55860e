//! Rules, and their compilation into the entries of the kernel's rule trie.
//!
//! The connect programs make one longest-prefix-match lookup per connect. For
//! that to find every rule that applies, each prefix's entry must also hold
//! the rules of every shorter prefix that contains it ("leaf pushing"), already
//! in evaluation order. Compiling is O(prefixes × address bits), so the lookup
//! cost in the kernel does not grow with the number of rules.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;

use std::path::{Path, PathBuf};

use connredir_abi::{
    connredir_exe_name, connredir_rule, connredir_rule_set, CONNREDIR_ACTION_BLOCK,
    CONNREDIR_ACTION_PERMIT, CONNREDIR_ACTION_REDIRECT, CONNREDIR_ANY_GID, CONNREDIR_ANY_UID,
    CONNREDIR_COMM_PREFIX, CONNREDIR_EXE_LEN, CONNREDIR_MAX_RULES_PER_PREFIX,
    CONNREDIR_MAX_RULE_EXES, CONNREDIR_PROTO_TCP, CONNREDIR_PROTO_TCP_AND_UDP, CONNREDIR_PROTO_UDP,
    CONNREDIR_RULE_EXE,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{Error, ServiceId};

/// Identifies a rule inside one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleId(pub u32);

impl std::fmt::Display for RuleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rule {}", self.0)
    }
}

/// Transport protocol a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP: connected sockets at `connect()`, unconnected ones at each
    /// `sendto()`/`sendmsg()`.
    Udp,
    /// Both TCP and UDP, as one rule.
    #[serde(rename = "tcp+udp")]
    TcpAndUdp,
}

impl Protocol {
    /// The protocols' names, as the configuration writes them: `tcp`,
    /// `udp`, or both.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Protocol::Tcp => &["tcp"],
            Protocol::Udp => &["udp"],
            Protocol::TcpAndUdp => &["tcp", "udp"],
        }
    }

    fn number(self) -> u8 {
        match self {
            Protocol::Tcp => CONNREDIR_PROTO_TCP as u8,
            Protocol::Udp => CONNREDIR_PROTO_UDP as u8,
            Protocol::TcpAndUdp => CONNREDIR_PROTO_TCP_AND_UDP as u8,
        }
    }
}

/// What a rule does with the connects it matches. Priorities order all
/// three, as WFP's filter weights do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// To the rule's service, unless the service already had the flow (then
    /// the next matching rule is judged).
    #[default]
    Redirect,
    /// The flow goes to its destination; no later rule is judged.
    Permit,
    /// The connect (or UDP datagram) fails with `EACCES`; no service sees it.
    Block,
}

impl Action {
    /// The action's name, as the configuration writes it.
    pub fn name(self) -> &'static str {
        match self {
            Action::Redirect => "redirect",
            Action::Permit => "permit",
            Action::Block => "block",
        }
    }

    fn number(self) -> u8 {
        (match self {
            Action::Redirect => CONNREDIR_ACTION_REDIRECT,
            Action::Permit => CONNREDIR_ACTION_PERMIT,
            Action::Block => CONNREDIR_ACTION_BLOCK,
        }) as u8
    }
}

/// A cgroup subtree condition: the cgroup and every cgroup below it (a
/// container, or a service and its children, as one condition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupCondition {
    /// The cgroup v2 directory.
    pub path: PathBuf,
    /// Its id (the directory's inode), as the kernel reports it.
    pub id: u64,
    /// Its depth below the cgroup v2 root (the root is 0).
    pub level: u8,
}

impl CgroupCondition {
    /// Looks the cgroup up: it must exist now (a cgroup made again later
    /// is another cgroup, with another id).
    pub fn resolve(path: &Path) -> Result<CgroupCondition, Error> {
        let root = connredir_host::cgroup::cgroup2_root().ok_or_else(|| {
            Error::InvalidRule("cgroup v2 is not mounted: a cgroup condition needs it".into())
        })?;
        let path = path
            .canonicalize()
            .map_err(|e| Error::InvalidRule(format!("cgroup {}: {e}", path.display())))?;
        let below = path.strip_prefix(&root).map_err(|_| {
            Error::InvalidRule(format!(
                "cgroup {} is not under the cgroup v2 root {}",
                path.display(),
                root.display()
            ))
        })?;
        let level = below.components().count();
        let level = u8::try_from(level).map_err(|_| {
            Error::InvalidRule(format!("cgroup {} is {level} levels deep", path.display()))
        })?;
        let id = connredir_host::cgroup::cgroup_id(&path)
            .map_err(|e| Error::InvalidRule(format!("cgroup {}: {e}", path.display())))?;
        Ok(CgroupCondition { path, id, level })
    }
}

/// A command-name condition, on the name the kernel keeps for a process
/// (`/proc/PID/comm`: at most 15 bytes, the executable's name unless the
/// process renamed itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandCondition {
    /// The name, or its start.
    pub name: String,
    /// Whether `name` is a prefix (written `name*`).
    pub prefix: bool,
}

impl CommandCondition {
    /// The longest name the kernel keeps (`TASK_COMM_LEN` - 1).
    pub const MAX_LEN: usize = 15;

    /// Reads `curl` (exactly) or `python*` (a prefix).
    pub fn parse(text: &str) -> Result<CommandCondition, Error> {
        let (name, prefix) = match text.strip_suffix('*') {
            Some(start) => (start, true),
            None => (text, false),
        };
        if name.is_empty() || name.contains('*') || name.contains('\0') {
            return Err(Error::InvalidRule(format!(
                "command {text:?}: give a name (`curl`) or a name's start and one `*` (`python*`)"
            )));
        }
        if name.len() > Self::MAX_LEN {
            return Err(Error::InvalidRule(format!(
                "command {text:?}: the kernel keeps at most {} bytes of a command name \
                 (/proc/PID/comm); write its first {} followed by `*`",
                Self::MAX_LEN,
                Self::MAX_LEN
            )));
        }
        Ok(CommandCondition {
            name: name.to_string(),
            prefix,
        })
    }
}

impl std::fmt::Display for CommandCondition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.name, if self.prefix { "*" } else { "" })
    }
}

/// An executable condition: the file name of the process's executable, as
/// the kernel reads it at connect time (the last component of the path the
/// process was started from, symbolic links resolved; a script's
/// executable is its interpreter). Only the name: the directory is not
/// known to the kernel programs (no `bpf_d_path` without the BPF LSM), so
/// any copy or hard link of that name matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutableCondition {
    /// The file name, compared whole.
    pub name: String,
}

impl ExecutableCondition {
    /// The longest file name a rule can name (`CONNREDIR_EXE_LEN`).
    pub const MAX_LEN: usize = CONNREDIR_EXE_LEN as usize;

    /// Reads a file name (`curl`). A path is refused rather than cut to
    /// its last component: only the name is compared, and a rule written
    /// `/usr/bin/curl` would also match `/tmp/curl`.
    pub fn parse(text: &str) -> Result<ExecutableCondition, Error> {
        if text.contains('/') {
            let name = text.rsplit('/').next().unwrap_or_default();
            return Err(Error::InvalidRule(format!(
                "executable {text:?}: give the executable's file name ({name:?}), not a path: \
                 only the file name is compared, not the directory"
            )));
        }
        if text.is_empty() || text == "." || text == ".." || text.contains('\0') {
            return Err(Error::InvalidRule(format!(
                "executable {text:?}: give the executable's file name (`curl`)"
            )));
        }
        if text.len() > Self::MAX_LEN {
            return Err(Error::InvalidRule(format!(
                "executable {text:?}: a rule can name an executable file name of at most {} \
                 bytes (this one has {})",
                Self::MAX_LEN,
                text.len()
            )));
        }
        Ok(ExecutableCondition {
            name: text.to_string(),
        })
    }
}

impl std::fmt::Display for ExecutableCondition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

/// A filter: which connections a service gets, or which go direct or are
/// refused.
///
/// Rules are evaluated in ascending `priority`, then in the order they were
/// added; the first one that matches decides, except that a redirect rule
/// whose service already handled the flow is passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The service that receives matching connections.
    pub service: ServiceId,
    /// Transport protocol.
    pub protocol: Protocol,
    /// Destination prefixes; empty means every IPv4 and IPv6 destination.
    pub destinations: Vec<IpNet>,
    /// Destination port ranges; empty means every port.
    pub ports: Vec<RangeInclusive<u16>>,
    /// Only connections opened by this uid; `None` for any.
    pub uid: Option<u32>,
    /// Evaluation order: lower first.
    pub priority: u32,
    /// What a match does; `service` counts for `Redirect` only.
    pub action: Action,
    /// Only connections of processes of this (real) gid.
    pub gid: Option<u32>,
    /// Only connections of processes in this cgroup or below it.
    pub cgroup: Option<CgroupCondition>,
    /// Only connections of processes of this command name.
    pub command: Option<CommandCondition>,
    /// Only connections of processes whose executable has this file name.
    pub executable: Option<ExecutableCondition>,
    /// Only sockets whose local port is in this range when they connect
    /// (a socket not bound before `connect()` has local port 0 then).
    pub local_ports: Option<RangeInclusive<u16>>,
    /// Only flows that this service already handled (their record names
    /// it): e.g. what `scanner` already inspected.
    pub after: Option<ServiceId>,
}

impl Rule {
    /// A TCP rule for every destination and port, priority 0.
    pub fn tcp_to(service: ServiceId) -> Rule {
        Rule {
            service,
            protocol: Protocol::Tcp,
            destinations: Vec::new(),
            ports: Vec::new(),
            uid: None,
            priority: 0,
            action: Action::Redirect,
            gid: None,
            cgroup: None,
            command: None,
            executable: None,
            local_ports: None,
            after: None,
        }
    }

    /// A TCP rule with `action` (permit or block) for every destination
    /// and port, priority 0; it names no service.
    pub fn tcp_action(action: Action) -> Rule {
        Rule {
            action,
            ..Rule::tcp_to(ServiceId(0))
        }
    }

    /// The services the rule names (its own when it redirects, and
    /// `after`), each of which must be registered.
    pub fn services(&self) -> impl Iterator<Item = ServiceId> + '_ {
        (self.action == Action::Redirect)
            .then_some(self.service)
            .into_iter()
            .chain(self.after)
    }

    /// Checks the rule's own fields (not whether its service exists).
    pub fn validate(&self) -> Result<(), Error> {
        for range in &self.ports {
            if range.start() > range.end() {
                return Err(Error::InvalidRule(format!(
                    "port range {}-{} is empty: write the lower port first",
                    range.start(),
                    range.end()
                )));
            }
        }
        if self.uid == Some(CONNREDIR_ANY_UID) {
            return Err(Error::InvalidRule(format!(
                "uid {CONNREDIR_ANY_UID} is reserved (it means any uid)"
            )));
        }
        if self.gid == Some(CONNREDIR_ANY_GID) {
            return Err(Error::InvalidRule(format!(
                "gid {CONNREDIR_ANY_GID} is reserved (it means any gid)"
            )));
        }
        if let Some(range) = &self.local_ports {
            if range.start() > range.end() {
                return Err(Error::InvalidRule(format!(
                    "local port range {}-{} is empty: write the lower port first",
                    range.start(),
                    range.end()
                )));
            }
        }
        if let Some(command) = &self.command {
            CommandCondition::parse(&command.to_string())?;
        }
        if let Some(executable) = &self.executable {
            ExecutableCondition::parse(&executable.name)?;
        }
        if let Some(after) = self.after {
            if after.0 == 0 || after.0 >= connredir_abi::CONNREDIR_MAX_SERVICES {
                return Err(Error::InvalidRule(format!(
                    "`after` names no service ({after})"
                )));
            }
        }
        Ok(())
    }

    fn prefixes(&self) -> Vec<IpNet> {
        if self.destinations.is_empty() {
            vec![
                "0.0.0.0/0".parse().expect("valid prefix"),
                "::/0".parse().expect("valid prefix"),
            ]
        } else {
            self.destinations.iter().map(IpNet::trunc).collect()
        }
    }

    fn port_ranges(&self) -> Vec<RangeInclusive<u16>> {
        if self.ports.is_empty() {
            vec![0..=u16::MAX]
        } else {
            self.ports.clone()
        }
    }
}

/// The compiled rules: every prefix's rule set, by network (host bits
/// cleared).
pub(crate) type CompiledRules = BTreeMap<IpNet, connredir_rule_set>;

/// One kernel rule entry: the rule with one of its port ranges.
fn rule_entry(id: RuleId, rule: &Rule, ports: &RangeInclusive<u16>) -> connredir_rule {
    let local = rule.local_ports.clone().unwrap_or(0..=u16::MAX);
    let mut comm = [0u8; 16];
    let mut comm_len = 0u8;
    if let Some(command) = &rule.command {
        let name = command.name.as_bytes();
        let len = name.len().min(CommandCondition::MAX_LEN);
        comm[..len].copy_from_slice(&name[..len]);
        comm_len = len as u8;
        if command.prefix {
            comm_len |= CONNREDIR_COMM_PREFIX as u8;
        }
    }
    connredir_rule {
        rule_id: id.0,
        service_id: if rule.action == Action::Redirect {
            rule.service.0
        } else {
            0
        },
        uid: rule.uid.unwrap_or(CONNREDIR_ANY_UID),
        gid: rule.gid.unwrap_or(CONNREDIR_ANY_GID),
        port_min: *ports.start(),
        port_max: *ports.end(),
        local_port_min: *local.start(),
        local_port_max: *local.end(),
        protocol: rule.protocol.number(),
        action: rule.action.number(),
        comm_len,
        cgroup_level: rule.cgroup.as_ref().map_or(0, |c| c.level),
        // Service ids are below CONNREDIR_MAX_SERVICES (validate()).
        after: rule.after.map_or(0, |s| s.0 as u16),
        flags: if rule.executable.is_some() {
            CONNREDIR_RULE_EXE as u16
        } else {
            0
        },
        cgroup_id: rule.cgroup.as_ref().map_or(0, |c| c.id),
        comm,
    }
}

/// The most rules of one rule set that can name an executable: the names
/// of the rules of both generations share `rule_exes`.
pub const MAX_EXECUTABLE_RULES: usize = CONNREDIR_MAX_RULE_EXES as usize / 2;

/// The kernel's `rule_exes` value of `rule`, when it names an executable.
pub(crate) fn exe_name(rule: &Rule) -> Option<connredir_exe_name> {
    let executable = rule.executable.as_ref()?;
    let mut name = [0u8; CONNREDIR_EXE_LEN as usize];
    // Checked by validate(); cut rather than index out of bounds.
    let bytes = executable.name.as_bytes();
    let len = bytes.len().min(name.len());
    name[..len].copy_from_slice(&bytes[..len]);
    Some(connredir_exe_name { name })
}

/// Checks that `rules` can be compiled (at most
/// `CONNREDIR_MAX_RULES_PER_PREFIX` rule entries on one prefix), without an
/// engine: for `connredir check`. Rule ids are the rules' positions, from 1.
pub fn check_rules(rules: &[Rule]) -> Result<(), Error> {
    for rule in rules {
        rule.validate()?;
    }
    compile(
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| (RuleId(i as u32 + 1), r)),
    )
    .map(drop)
}

/// Compiles rules into trie entries. Fails when more than
/// `CONNREDIR_MAX_RULES_PER_PREFIX` rule entries apply to one prefix.
pub(crate) fn compile<'a>(
    rules: impl IntoIterator<Item = (RuleId, &'a Rule)>,
) -> Result<CompiledRules, Error> {
    // Every rule entry (one per port range), grouped by prefix.
    let mut by_prefix: HashMap<IpNet, Vec<(u32, RuleId, connredir_rule)>> = HashMap::new();
    let mut executables = 0;
    for (id, rule) in rules {
        if rule.executable.is_some() {
            executables += 1;
            if executables > MAX_EXECUTABLE_RULES {
                return Err(Error::InvalidRule(format!(
                    "more than {MAX_EXECUTABLE_RULES} rules name an executable ({id} is one too \
                     many)"
                )));
            }
        }
        for net in rule.prefixes() {
            for ports in rule.port_ranges() {
                let entry = rule_entry(id, rule, &ports);
                by_prefix
                    .entry(net)
                    .or_default()
                    .push((rule.priority, id, entry));
            }
        }
    }
    let prefixes: HashSet<IpNet> = by_prefix.keys().copied().collect();

    let mut compiled = CompiledRules::new();
    for net in &prefixes {
        // This prefix's rules plus those of every shorter prefix containing it.
        let mut entries = Vec::new();
        for len in 0..=net.prefix_len() {
            let ancestor = IpNet::new(net.addr(), len)
                .expect("length within bounds")
                .trunc();
            if let Some(found) = by_prefix.get(&ancestor) {
                entries.extend(found.iter().copied());
            }
        }
        entries.sort_by_key(|(priority, id, _)| (*priority, *id));
        if entries.len() > CONNREDIR_MAX_RULES_PER_PREFIX as usize {
            let mut named: Vec<u32> = entries.iter().map(|(_, id, _)| id.0).collect();
            let mut seen = HashSet::new();
            named.retain(|id| seen.insert(*id));
            let named: Vec<String> = named.iter().map(u32::to_string).collect();
            return Err(Error::InvalidRule(format!(
                "{} rule entries apply to {net} (rules, in evaluation order: {}; each port range of a rule counts \
                 once, and a rule for a shorter prefix applies to every longer one inside it); \
                 at most {} can, because the connect program judges every entry that applies \
                 to a destination, and that bound keeps its cost independent of the number of \
                 rules: merge rules or their port ranges, or move conditions into fewer rules",
                entries.len(),
                named.join(", "),
                CONNREDIR_MAX_RULES_PER_PREFIX
            )));
        }
        let mut set = connredir_rule_set {
            count: entries.len() as u32,
            ..Default::default()
        };
        for (slot, (_, _, entry)) in set.rules.iter_mut().zip(entries) {
            *slot = entry;
        }
        compiled.insert(net.trunc(), set);
    }
    Ok(compiled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(service: u32, dst: &[&str], priority: u32) -> Rule {
        Rule {
            destinations: dst.iter().map(|d| d.parse().unwrap()).collect(),
            priority,
            ..Rule::tcp_to(ServiceId(service))
        }
    }

    fn services_at(compiled: &CompiledRules, net: &str) -> Vec<u32> {
        let set = &compiled[&net.parse::<IpNet>().unwrap()];
        set.rules[..set.count as usize]
            .iter()
            .map(|r| r.service_id)
            .collect()
    }

    #[test]
    fn longer_prefixes_inherit_covering_rules_in_priority_order() {
        let a = rule(1, &["10.0.0.0/8"], 5);
        let b = rule(2, &["10.1.0.0/16"], 1);
        let c = rule(3, &[], 9);
        let compiled = compile([(RuleId(1), &a), (RuleId(2), &b), (RuleId(3), &c)]).unwrap();
        assert_eq!(services_at(&compiled, "10.0.0.0/8"), vec![1, 3]);
        assert_eq!(services_at(&compiled, "10.1.0.0/16"), vec![2, 1, 3]);
        assert_eq!(services_at(&compiled, "0.0.0.0/0"), vec![3]);
        assert_eq!(services_at(&compiled, "::/0"), vec![3]);
        assert_eq!(compiled.len(), 4);
    }

    #[test]
    fn ties_keep_insertion_order_and_ports_expand() {
        let mut a = rule(1, &["127.0.0.2/32"], 0);
        a.ports = vec![80..=80, 8000..=8999];
        let b = rule(2, &["127.0.0.0/8"], 0);
        let compiled = compile([(RuleId(1), &a), (RuleId(2), &b)]).unwrap();
        assert_eq!(services_at(&compiled, "127.0.0.2/32"), vec![1, 1, 2]);
        let set = &compiled[&"127.0.0.2/32".parse::<IpNet>().unwrap()];
        assert_eq!((set.rules[1].port_min, set.rules[1].port_max), (8000, 8999));
    }

    #[test]
    fn host_bits_are_ignored() {
        let a = rule(1, &["192.168.7.9/16"], 0);
        let compiled = compile([(RuleId(1), &a)]).unwrap();
        let (prefix, _) = compiled.iter().next().unwrap();
        assert_eq!(*prefix, "192.168.0.0/16".parse::<IpNet>().unwrap());
    }

    #[test]
    fn too_many_rules_on_one_prefix_is_an_error() {
        let rules: Vec<Rule> = (0..17).map(|i| rule(1, &["10.0.0.0/8"], i)).collect();
        let err = compile(rules.iter().enumerate().map(|(i, r)| (RuleId(i as u32), r)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("17 rule entries apply to 10.0.0.0/8"), "{err}");
    }

    #[test]
    fn actions_and_conditions_reach_the_kernel_entry() {
        let mut block = Rule {
            gid: Some(100),
            command: Some(CommandCondition::parse("chrom*").unwrap()),
            executable: Some(ExecutableCondition::parse("chromium-browser").unwrap()),
            local_ports: Some(1000..=2000),
            after: Some(ServiceId(3)),
            ..Rule::tcp_action(Action::Block)
        };
        block.cgroup = Some(CgroupCondition {
            path: "/sys/fs/cgroup/a/b".into(),
            id: 77,
            level: 2,
        });
        let compiled = compile([(RuleId(9), &block)]).unwrap();
        let entry = compiled[&"0.0.0.0/0".parse::<IpNet>().unwrap()].rules[0];
        assert_eq!(entry.action, CONNREDIR_ACTION_BLOCK as u8);
        assert_eq!(entry.service_id, 0);
        assert_eq!((entry.gid, entry.uid), (100, CONNREDIR_ANY_UID));
        assert_eq!((entry.local_port_min, entry.local_port_max), (1000, 2000));
        assert_eq!(
            (entry.after, entry.cgroup_id, entry.cgroup_level),
            (3, 77, 2)
        );
        assert_eq!(entry.comm_len, 5 | CONNREDIR_COMM_PREFIX as u8);
        assert_eq!(&entry.comm[..6], b"chrom\0");
        assert_eq!(entry.flags, CONNREDIR_RULE_EXE as u16);
        let name = exe_name(&block).unwrap().name;
        assert_eq!(&name[..17], b"chromium-browser\0");
        assert!(name[17..].iter().all(|b| *b == 0));
        // No condition: every field says "any".
        let plain = compile([(RuleId(1), &Rule::tcp_to(ServiceId(2)))]).unwrap();
        let entry = plain[&"::/0".parse::<IpNet>().unwrap()].rules[0];
        assert_eq!(
            (entry.action, entry.service_id),
            (CONNREDIR_ACTION_REDIRECT as u8, 2)
        );
        assert_eq!(
            (entry.gid, entry.comm_len, entry.cgroup_id, entry.after),
            (CONNREDIR_ANY_GID, 0, 0, 0)
        );
        assert_eq!((entry.local_port_min, entry.local_port_max), (0, u16::MAX));
        assert_eq!(entry.flags, 0);
        assert!(exe_name(&Rule::tcp_to(ServiceId(2))).is_none());
    }

    #[test]
    fn executable_names_are_file_names_that_fit_the_rule() {
        assert_eq!(ExecutableCondition::parse("curl").unwrap().name, "curl");
        let longest = "x".repeat(ExecutableCondition::MAX_LEN);
        assert!(ExecutableCondition::parse(&longest).is_ok());
        let e = ExecutableCondition::parse("/usr/bin/curl")
            .unwrap_err()
            .to_string();
        assert!(e.contains("(\"curl\"), not a path"), "{e}");
        let e = ExecutableCondition::parse(&format!("{longest}x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 32 bytes (this one has 33)"), "{e}");
        for bad in ["", ".", "..", "a\0b", "bin/"] {
            assert!(ExecutableCondition::parse(bad).is_err(), "{bad:?}");
        }
        let rule = Rule {
            executable: Some(ExecutableCondition { name: "a/b".into() }),
            ..Rule::tcp_to(ServiceId(1))
        };
        assert!(rule.validate().is_err());
    }

    #[test]
    fn at_most_half_the_name_map_is_one_rule_sets() {
        let named = Rule {
            executable: Some(ExecutableCondition::parse("curl").unwrap()),
            ..Rule::tcp_action(Action::Block)
        };
        let rules = vec![named; MAX_EXECUTABLE_RULES + 1];
        let ids = || (1..).map(RuleId).zip(rules.iter());
        let err = compile(ids().take(MAX_EXECUTABLE_RULES + 1)).unwrap_err();
        assert!(
            err.to_string()
                .contains("more than 4096 rules name an executable (rule 4097 is one too many)"),
            "{err}"
        );
        // Each rule has a prefix of its own: only the name limit applies.
        let spread: Vec<Rule> = (0..MAX_EXECUTABLE_RULES as u32)
            .map(|i| Rule {
                destinations: vec![format!("10.{}.{}.0/24", i >> 8, i & 255).parse().unwrap()],
                ..rules[0].clone()
            })
            .collect();
        assert!(compile((1..).map(RuleId).zip(spread.iter())).is_ok());
    }

    #[test]
    fn command_names_are_exact_or_a_prefix_and_fit_the_kernel() {
        let exact = CommandCondition::parse("curl").unwrap();
        assert!(!exact.prefix);
        assert!(CommandCondition::parse("py*").unwrap().prefix);
        for bad in ["", "*", "a*b", "a-sixteen-bytes!"] {
            assert!(CommandCondition::parse(bad).is_err(), "{bad:?}");
        }
        assert!(CommandCondition::parse("fifteen-bytes!!").is_ok());
    }

    #[test]
    fn empty_port_range_is_rejected() {
        let mut a = rule(1, &[], 0);
        #[allow(clippy::reversed_empty_ranges)]
        {
            a.ports = vec![90..=80];
        }
        assert!(a.validate().unwrap_err().to_string().contains("90-80"));
    }
}
