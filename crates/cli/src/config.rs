//! The configuration file: scopes, services and rules, in TOML.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use connredir_engine::{
    Action, CgroupCondition, CommandCondition, ExecutableCondition, Identity, OnDown, Protocol,
    Rule, Service, ServiceId,
};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Where the keys that cross-checks complain about are written.
#[derive(Debug, Default, Deserialize)]
struct Spans {
    scope: Option<toml::Spanned<toml::Value>>,
    #[serde(default, rename = "service")]
    services: Vec<NamedSpan>,
    #[serde(default, rename = "rule")]
    rules: Vec<RuleSpan>,
}

#[derive(Debug, Default, Deserialize)]
struct NamedSpan {
    name: Option<toml::Spanned<toml::Value>>,
}

#[derive(Debug, Default, Deserialize)]
struct RuleSpan {
    service: Option<toml::Spanned<toml::Value>>,
    action: Option<toml::Spanned<toml::Value>>,
    destinations: Option<toml::Spanned<toml::Value>>,
    after: Option<toml::Spanned<toml::Value>>,
    cgroup: Option<toml::Spanned<toml::Value>>,
    unit: Option<toml::Spanned<toml::Value>>,
    command: Option<toml::Spanned<toml::Value>>,
    executable: Option<toml::Spanned<toml::Value>>,
    local_ports: Option<toml::Spanned<toml::Value>>,
}

/// An error at byte `at` of file `name`: "NAME, line N, key `K`: MESSAGE",
/// then the line itself.
fn located(name: &str, text: &str, at: Option<usize>, message: &str) -> anyhow::Error {
    let Some(at) = at else {
        return anyhow!("{name}: {message}");
    };
    let at = at.min(text.len());
    let line = text[..at].matches('\n').count() + 1;
    let source = text.lines().nth(line - 1).unwrap_or("");
    let key = source
        .split_once('=')
        .map(|(key, _)| key.trim())
        .filter(|key| !key.is_empty() && !key.starts_with('['))
        .map_or(String::new(), |key| format!(", key `{key}`"));
    anyhow!("{name}, line {line}{key}: {message}\n  {line:>4} | {source}")
}

/// Like [`located`], for a value that may sit on a line of its own inside
/// an array: the key is named by the caller.
fn located_key(name: &str, text: &str, at: Option<usize>, key: &str, message: &str) -> String {
    let Some(at) = at else {
        return format!("{name}, key `{key}`: {message}");
    };
    let at = at.min(text.len());
    let line = text[..at].matches('\n').count() + 1;
    let source = text.lines().nth(line - 1).unwrap_or("");
    format!("{name}, line {line}, key `{key}`: {message}\n  {line:>4} | {source}")
}

/// Why a scope cgroup of the file will not simply be attached on this
/// machine, if it will not: it does not exist (then `up` creates it), or
/// it is not a cgroup v2 directory (then `up` stops on it).
pub fn scope_cgroup_problem(cgroup: &Path, root: Option<&Path>) -> Option<String> {
    if cgroup.join("cgroup.procs").exists() {
        return None;
    }
    let shown = cgroup.display();
    if cgroup.exists() {
        return Some(format!(
            "scope cgroup {shown} is not a cgroup v2 directory: `connredir up` will stop on it; \
             name a directory of the cgroup v2 hierarchy"
        ));
    }
    let Some(root) = root else {
        return Some(format!(
            "scope cgroup {shown} does not exist, and cgroup v2 is not mounted here: \
             `connredir up` needs the unified hierarchy (usually /sys/fs/cgroup)"
        ));
    };
    if !crate::lifecycle::creatable_below(cgroup, root) {
        return Some(format!(
            "scope cgroup {shown} does not exist and is not below the cgroup v2 root {}: \
             `connredir up` will stop on it; name a directory below {}",
            root.display(),
            root.display()
        ));
    }
    Some(format!(
        "scope cgroup {shown} does not exist: `connredir up` will create it \
         (and `connredir down` remove it again while empty)"
    ))
}

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the programs attach.
    #[serde(default)]
    pub scope: Scope,
    /// The services, by name.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// The rules.
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
    /// Who may use the control socket of `up`.
    #[serde(default)]
    pub control: ControlConfig,
}

/// The `[control]` table: who may use the control socket besides root.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// A group whose members may use the control socket (as root may: they
    /// can change rules and services). None: root only.
    pub group: Option<String>,
}

/// The cgroups whose connections meet the rules. The services' own cgroups
/// must be among them (or inside one): their onward connections meet the
/// other services.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    /// cgroup v2 directories, none inside another.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// systemd units (services, scopes, slices): their cgroups.
    #[serde(default)]
    pub units: Vec<String>,
    /// The whole host (the root cgroup); then no cgroups or units.
    #[serde(default)]
    pub host: bool,
}

impl Scope {
    /// The cgroup directories the scope names, with units looked up in
    /// systemd and `host` as the cgroup v2 root.
    pub fn resolve(&self) -> Result<Vec<PathBuf>> {
        let root = connredir_host::cgroup::cgroup2_root()
            .context("cgroup v2 is not mounted (connredir needs the unified hierarchy, usually at /sys/fs/cgroup)")?;
        if self.host {
            return Ok(vec![root]);
        }
        let mut out = self.cgroups.clone();
        for unit in &self.units {
            out.push(unit_cgroup(&root, unit)?);
        }
        Ok(out)
    }
}

/// The cgroup of a systemd unit, as systemd reports it.
fn unit_cgroup(root: &Path, unit: &str) -> Result<PathBuf> {
    unit_cgroup_for("[scope] units", root, unit)
}

/// The cgroup of a systemd unit; errors begin with `what` (where it was named).
fn unit_cgroup_for(what: &str, root: &Path, unit: &str) -> Result<PathBuf> {
    let output = std::process::Command::new("systemctl")
        .args(["show", "--property=ControlGroup", "--value", "--", unit])
        .output()
        .with_context(|| {
            format!("{what}: cannot ask systemd about {unit:?} (is systemctl installed?)")
        })?;
    unit_cgroup_from(root, unit, &String::from_utf8_lossy(&output.stdout))
        .map_err(|e| anyhow!("{}", e.to_string().replacen("[scope] units", what, 1)))
}

/// Joins systemd's `ControlGroup` answer to the cgroup root.
fn unit_cgroup_from(root: &Path, unit: &str, answer: &str) -> Result<PathBuf> {
    let group = answer.trim().trim_start_matches('/');
    if group.is_empty() {
        bail!(
            "[scope] units: systemd reports no cgroup for {unit:?}: is it running? \
             (`systemctl status {unit}`)"
        );
    }
    Ok(root.join(group))
}

/// One `[[service]]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique name.
    pub name: String,
    /// Listening addresses: at most one IPv4 and one IPv6.
    pub listen: Vec<SocketAddr>,
    /// Who the service's processes are.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Optional context string handed to the service.
    pub context: Option<String>,
    /// Whether the service's own connections (by its identity, without
    /// records) count as redirected by self and skip it (default true).
    #[serde(default = "yes")]
    pub own_connections_by_self: bool,
    /// Sockmap acceleration of the service's local legs (default false);
    /// the service must read accelerated sockets with read(), not splice().
    #[serde(default)]
    pub accelerate: bool,
    /// The sockets the service accepts answer getsockname() with the flow's
    /// original destination, as with TPROXY (default false): for proxies
    /// that read the destination there (haproxy on IPv6).
    #[serde(default)]
    pub transparent: bool,
    /// What a selected connection does while nothing of the service's own
    /// listens on its address: "block" (the default) or "bypass".
    #[serde(default)]
    pub on_down: OnDownConfig,
}

/// A service's failure policy as written in files, on the command line and
/// in the control protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OnDownConfig {
    /// Refuse the connection at once while the service is down.
    #[default]
    Block,
    /// Skip the service while it is down: the connection meets the next
    /// matching rule, or goes direct.
    Bypass,
}

impl From<OnDownConfig> for OnDown {
    fn from(value: OnDownConfig) -> OnDown {
        match value {
            OnDownConfig::Block => OnDown::Block,
            OnDownConfig::Bypass => OnDown::Bypass,
        }
    }
}

fn yes() -> bool {
    true
}

/// The `identity` of a service.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// Process ids.
    #[serde(default)]
    pub pids: Vec<u32>,
    /// cgroup v2 directories.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
    /// User ids.
    #[serde(default)]
    pub uids: Vec<u32>,
}

/// One `[[rule]]` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Name of the service that gets matching connections (redirect rules
    /// only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// `redirect` (the default), `permit` or `block`.
    #[serde(default)]
    pub action: Action,
    /// "tcp" (default), "udp", or both: ["tcp", "udp"].
    #[serde(default, with = "protocols")]
    pub protocol: Protocol,
    /// Destination prefixes; none means all.
    #[serde(default)]
    pub destinations: Vec<Prefix>,
    /// Ports and ranges: "443", "8000-8999".
    #[serde(default)]
    pub ports: Vec<PortRange>,
    /// Only connections of this uid.
    pub uid: Option<u32>,
    /// Lower first.
    #[serde(default)]
    pub priority: u32,
    /// Only connections of processes of this (real) gid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Only connections of processes in this cgroup v2 directory or below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Only connections of processes in this systemd unit's cgroup or below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Only connections of processes of this command name (`curl`), or
    /// whose name starts so (`python*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Only sockets whose local port is in this range at connect time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_ports: Option<PortRange>,
    /// Only flows that this service (by name) already inspected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Only connections of processes whose executable has this file name
    /// (`curl`; not a path: the directory is not compared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executable: Option<String>,
}

/// The protocols a rule names ("tcp", "udp", in any case), as one
/// `Protocol`; at least one, each at most once.
pub fn parse_protocols<S: AsRef<str>>(names: &[S]) -> Result<Protocol, String> {
    let (mut tcp, mut udp) = (false, false);
    if names.is_empty() {
        return Err("no protocol: write \"tcp\", \"udp\" or [\"tcp\", \"udp\"]".into());
    }
    for name in names {
        let name = name.as_ref();
        let seen = match name.to_ascii_lowercase().as_str() {
            "tcp" => std::mem::replace(&mut tcp, true),
            "udp" => std::mem::replace(&mut udp, true),
            _ => {
                return Err(format!(
                    "{name:?} is not a protocol: write \"tcp\", \"udp\" or [\"tcp\", \"udp\"]"
                ))
            }
        };
        if seen {
            return Err(format!("protocol {name:?} is named twice"));
        }
    }
    Ok(match (tcp, udp) {
        (true, true) => Protocol::TcpAndUdp,
        (false, true) => Protocol::Udp,
        _ => Protocol::Tcp,
    })
}

/// A rule's `protocol`: one name ("udp") or a list (["tcp", "udp"]).
mod protocols {
    use connredir_engine::Protocol;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(protocol: &Protocol, s: S) -> Result<S::Ok, S::Error> {
        match protocol.names() {
            [one] => s.serialize_str(one),
            many => many.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Protocol, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Names {
            One(String),
            Many(Vec<String>),
        }
        let names = match Names::deserialize(d)? {
            Names::One(name) => vec![name],
            Names::Many(names) => names,
        };
        super::parse_protocols(&names).map_err(serde::de::Error::custom)
    }
}

/// A port or a port range: "443", "8000-8999" (or the number 443).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRange(pub RangeInclusive<u16>);

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<PortRange, String> {
        let port = |s: &str| -> Result<u16, String> {
            let n: u32 = s.trim().parse().map_err(|_| {
                format!("{text:?} is not a port: write a port like \"443\" or a range like \"8000-8999\"")
            })?;
            if n == 0 || n > 65535 {
                return Err(format!("port {n} is out of range: ports are 1 to 65535"));
            }
            Ok(n as u16)
        };
        let range = match text.split_once('-') {
            Some((lo, hi)) => port(lo)?..=port(hi)?,
            None => port(text)?..=port(text)?,
        };
        if range.start() > range.end() {
            return Err(format!(
                "port range {text:?} is empty: write the lower port first"
            ));
        }
        Ok(PortRange(range))
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.start() == self.0.end() {
            write!(f, "{}", self.0.start())
        } else {
            write!(f, "{}-{}", self.0.start(), self.0.end())
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<PortRange, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            Number(i64),
            Text(String),
        }
        let text = match Text::deserialize(d)? {
            Text::Number(n) => n.to_string(),
            Text::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A destination prefix: "10.0.0.0/8", "fd00::/8", or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix(pub IpNet);

impl std::str::FromStr for Prefix {
    type Err = String;

    fn from_str(text: &str) -> Result<Prefix, String> {
        text.parse::<IpNet>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
            .map(Prefix)
            .map_err(|_| {
                format!(
                    "{text:?} is not an address prefix: write an address and a length, \
                     like \"10.0.0.0/8\" or \"fd00::/8\", or one address"
                )
            })
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Prefix, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Config {
    /// Reads and checks a file; errors name the file, line and key.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and checks the text of a file called `name`.
    pub fn parse(text: &str, name: &str) -> Result<Config> {
        let config: Config = toml::from_str(text)
            .map_err(|e| located(name, text, e.span().map(|s| s.start), e.message()))?;
        // A second, lenient pass only to find where things are written.
        let spans: Spans = toml::from_str(text).unwrap_or_default();
        config
            .check(&spans)
            .map_err(|(at, message)| located(name, text, at, &message))?;
        Ok(config)
    }

    /// The checks that need more than one key at a time.
    fn check(&self, spans: &Spans) -> Result<(), (Option<usize>, String)> {
        let scope_at = spans.scope.as_ref().map(|s| s.span().start);
        let scope = &self.scope;
        if !scope.host && scope.cgroups.is_empty() && scope.units.is_empty() {
            return Err((
                scope_at,
                "[scope] names no cgroup: give `cgroups` (cgroup v2 directories), \
                 `units` (systemd units) or `host = true`"
                    .into(),
            ));
        }
        if scope.host && !(scope.cgroups.is_empty() && scope.units.is_empty()) {
            return Err((
                scope_at,
                "[scope] `host = true` already covers every cgroup: remove `cgroups` and `units`"
                    .into(),
            ));
        }
        let at = |span: Option<&toml::Spanned<toml::Value>>| span.map(|s| s.span().start);
        for (i, service) in self.services.iter().enumerate() {
            let name_at = at(spans.services.get(i).and_then(|s| s.name.as_ref()));
            if self.services[..i].iter().any(|s| s.name == service.name) {
                return Err((
                    name_at,
                    format!(
                        "service {:?} is defined twice: give each service its own name",
                        service.name
                    ),
                ));
            }
            service
                .to_service()
                .check()
                .map_err(|e| (name_at, e.to_string()))?;
            if let Some((other, addr)) = self.services[..i].iter().find_map(|other| {
                let addr = service.listen.iter().find(|a| other.listen.contains(a))?;
                Some((other, addr))
            }) {
                return Err((
                    name_at,
                    format!(
                        "service {:?} listens on {addr}, as service {:?} does: give each service its own address",
                        service.name, other.name
                    ),
                ));
            }
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let span = spans.rules.get(i);
            let known: Vec<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
            let undefined = |what: &str, name: &str| {
                format!(
                    "rule {} names service {name:?}{what}, which is not defined (defined: {})",
                    i + 1,
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                )
            };
            rule.check().map_err(|(key, message)| {
                let key_at = span.and_then(|r| match key {
                    RuleKey::Service => r.service.as_ref().or(r.action.as_ref()),
                    RuleKey::Cgroup => r.cgroup.as_ref().or(r.unit.as_ref()),
                    RuleKey::Command => r.command.as_ref(),
                    RuleKey::Executable => r.executable.as_ref(),
                    RuleKey::LocalPorts => r.local_ports.as_ref(),
                });
                (at(key_at), format!("rule {}: {message}", i + 1))
            })?;
            if let Some(service) = &rule.service {
                if !self.services.iter().any(|s| &s.name == service) {
                    return Err((
                        at(span.and_then(|r| r.service.as_ref())),
                        undefined("", service),
                    ));
                }
            }
            if let Some(after) = &rule.after {
                if !self.services.iter().any(|s| &s.name == after) {
                    return Err((
                        at(span.and_then(|r| r.after.as_ref())),
                        undefined(" in `after`", after),
                    ));
                }
            }
        }
        // The limit of rule entries per prefix, as the engine will apply it
        // (conditions on the process do not change how many entries apply;
        // cgroups and units are looked up only when the rules are applied).
        let rules: Vec<Rule> = self
            .rules
            .iter()
            .map(|r| RuleConfig {
                cgroup: None,
                unit: None,
                ..r.clone()
            })
            .map(|r| {
                r.to_rule(|name| {
                    self.services
                        .iter()
                        .position(|s| s.name == name)
                        .map(|i| ServiceId(i as u32 + 1))
                })
            })
            .collect::<Result<_>>()
            .map_err(|e| (None, e.to_string()))?;
        if let Err(e) = connredir_engine::check_rules(&rules) {
            // Point at the last rule the message names: the one too many.
            let message = e.to_string();
            let last = message
                .split_once("in evaluation order: ")
                .and_then(|(_, rest)| rest.split(';').next())
                .and_then(|ids| ids.split(", ").last())
                .and_then(|id| id.trim().parse::<usize>().ok());
            let at_rule = last
                .and_then(|n| spans.rules.get(n.saturating_sub(1)))
                .and_then(|r| {
                    r.destinations
                        .as_ref()
                        .or(r.service.as_ref())
                        .or(r.action.as_ref())
                });
            return Err((at(at_rule), message));
        }
        Ok(())
    }

    /// What only this machine makes a problem, one message per scope
    /// cgroup ("NAME, line N, key `cgroups`: ..." and the line): a cgroup
    /// that does not exist yet (`up` creates it), or one `up` cannot use.
    /// `text` is the file's text, for where each cgroup is written.
    pub fn scope_warnings(&self, text: &str, name: &str) -> Vec<String> {
        #[derive(Default, Deserialize)]
        struct File {
            #[serde(default)]
            scope: ScopeCgroups,
        }
        #[derive(Default, Deserialize)]
        struct ScopeCgroups {
            #[serde(default)]
            cgroups: Vec<toml::Spanned<String>>,
        }
        let spans: File = toml::from_str(text).unwrap_or_default();
        let root = connredir_host::cgroup::cgroup2_root();
        let mut warnings = Vec::new();
        for (i, cgroup) in self.scope.cgroups.iter().enumerate() {
            let Some(message) = scope_cgroup_problem(cgroup, root.as_deref()) else {
                continue;
            };
            let at = spans.scope.cgroups.get(i).map(|s| s.span().start);
            warnings.push(located_key(name, text, at, "cgroups", &message));
        }
        warnings
    }

    /// The services, as the engine takes them.
    pub fn services(&self) -> impl Iterator<Item = Service> + '_ {
        self.services.iter().map(ServiceConfig::to_service)
    }

    /// The rules, given how service names resolved to ids.
    pub fn rules(&self, id_of: impl Fn(&str) -> Option<ServiceId>) -> Result<Vec<Rule>> {
        self.rules.iter().map(|r| r.to_rule(&id_of)).collect()
    }
}

impl ServiceConfig {
    /// The service, as the engine takes it.
    pub fn to_service(&self) -> Service {
        Service {
            name: self.name.clone(),
            listen: self.listen.clone(),
            identity: Identity {
                pids: self.identity.pids.clone(),
                cgroups: self.identity.cgroups.clone(),
                uids: self.identity.uids.clone(),
            },
            context: self.context.as_ref().map(|c| c.as_bytes().to_vec()),
            own_connections_by_self: self.own_connections_by_self,
            accelerate: self.accelerate,
            transparent: self.transparent,
            on_down: self.on_down.into(),
        }
    }
}

/// The key of a rule that [`RuleConfig::check`] complains about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleKey {
    /// `service`.
    Service,
    /// `cgroup` or `unit`.
    Cgroup,
    /// `command`.
    Command,
    /// `executable`.
    Executable,
    /// `local_ports`.
    LocalPorts,
}

impl RuleConfig {
    /// The checks of one rule on its own: which keys go with its action,
    /// and whether its conditions can be written.
    pub fn check(&self) -> std::result::Result<(), (RuleKey, String)> {
        match (self.action, &self.service) {
            (Action::Redirect, None) => {
                return Err((
                    RuleKey::Service,
                    "a redirect rule needs `service` (or give `action = \"permit\"` or \
                     `\"block\"`)"
                        .into(),
                ))
            }
            (Action::Permit | Action::Block, Some(service)) => {
                return Err((
                    RuleKey::Service,
                    format!(
                        "a {} rule sends no flow to a service: remove `service = {service:?}`",
                        self.action.name()
                    ),
                ))
            }
            _ => {}
        }
        if self.cgroup.is_some() && self.unit.is_some() {
            return Err((
                RuleKey::Cgroup,
                "give `cgroup` or `unit`, not both (a unit is a cgroup)".into(),
            ));
        }
        if let Some(command) = &self.command {
            CommandCondition::parse(command).map_err(|e| (RuleKey::Command, e.to_string()))?;
        }
        if let Some(executable) = &self.executable {
            ExecutableCondition::parse(executable)
                .map_err(|e| (RuleKey::Executable, e.to_string()))?;
        }
        if let Some(range) = &self.local_ports {
            if range.0.start() > range.0.end() {
                return Err((
                    RuleKey::LocalPorts,
                    format!("local port range {range} is empty: write the lower port first"),
                ));
            }
        }
        Ok(())
    }

    /// The rule, given how service names resolve to ids; a cgroup or
    /// unit is looked up now.
    pub fn to_rule(&self, id_of: impl Fn(&str) -> Option<ServiceId>) -> Result<Rule> {
        self.check().map_err(|(_, message)| anyhow!(message))?;
        let resolve =
            |name: &str| id_of(name).ok_or_else(|| anyhow!("service {name:?} is not registered"));
        let service = match &self.service {
            Some(name) => resolve(name)?,
            None => ServiceId(0),
        };
        let cgroup = match (&self.cgroup, &self.unit) {
            (Some(path), _) => Some(CgroupCondition::resolve(path)?),
            (None, Some(unit)) => {
                let root = connredir_host::cgroup::cgroup2_root()
                    .context("cgroup v2 is not mounted: a `unit` condition needs it")?;
                Some(CgroupCondition::resolve(&unit_cgroup_for(
                    "rule unit",
                    &root,
                    unit,
                )?)?)
            }
            (None, None) => None,
        };
        Ok(Rule {
            service,
            protocol: self.protocol,
            destinations: self.destinations.iter().map(|p| p.0).collect(),
            ports: self.ports.iter().map(|p| p.0.clone()).collect(),
            uid: self.uid,
            priority: self.priority,
            action: self.action,
            gid: self.gid,
            cgroup,
            command: self
                .command
                .as_deref()
                .map(CommandCondition::parse)
                .transpose()?,
            executable: self
                .executable
                .as_deref()
                .map(ExecutableCondition::parse)
                .transpose()?,
            local_ports: self.local_ports.as_ref().map(|p| p.0.clone()),
            after: self.after.as_deref().map(resolve).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"[scope]
cgroups = ["/sys/fs/cgroup/apps"]

[[service]]
name = "scanner"
listen = ["127.0.0.1:8000", "[::1]:8000"]
identity = { uids = [990] }

[[rule]]
service = "scanner"
destinations = ["0.0.0.0/0", "::/0", "192.0.2.1"]
ports = ["80", "8000-8999", 443]
"#;

    fn error(text: &str) -> String {
        format!("{:#}", Config::parse(text, "t.toml").unwrap_err())
    }

    #[test]
    fn actions_and_conditions_are_read() {
        let text = format!(
            "{GOOD}\n[[rule]]\naction = \"block\"\nprotocol = \"udp\"\nports = [443]\n\
             command = \"chrom*\"\nexecutable = \"chromium\"\ngid = 100\npriority = 1\n\n[[rule]]\naction = \"permit\"\n\
             destinations = [\"192.0.2.7\"]\nports = [22]\nlocal_ports = \"1000-2000\"\n\
             after = \"scanner\"\n"
        );
        let config = Config::parse(&text, "t.toml").unwrap();
        let rules = config.rules(|_| Some(ServiceId(1))).unwrap();
        assert_eq!(rules[0].action, Action::Redirect);
        assert_eq!(rules[1].action, Action::Block);
        let command = rules[1].command.as_ref().unwrap();
        assert_eq!((command.name.as_str(), command.prefix), ("chrom", true));
        assert_eq!(rules[1].executable.as_ref().unwrap().name, "chromium");
        assert_eq!(rules[2].executable, None);
        assert_eq!(rules[1].gid, Some(100));
        assert_eq!(rules[2].action, Action::Permit);
        assert_eq!(rules[2].local_ports, Some(1000..=2000));
        assert_eq!(rules[2].after, Some(ServiceId(1)));
    }

    #[test]
    fn rule_keys_that_do_not_fit_are_refused_at_their_line() {
        let with = |rule: &str| error(&format!("{GOOD}\n[[rule]]\n{rule}\n"));
        let e = with("action = \"permit\"\nservice = \"scanner\"");
        assert!(
            e.starts_with("t.toml, line 16, key `service`: rule 2: a permit rule sends no flow"),
            "{e}"
        );
        let e = with("ports = [22]");
        assert!(e.contains("rule 2: a redirect rule needs `service`"), "{e}");
        let e = with("action = \"block\"\ncommand = \"a-very-long-command-name\"");
        assert!(
            e.starts_with("t.toml, line 16, key `command`: rule 2: ")
                && e.contains("at most 15 bytes"),
            "{e}"
        );
        let e = with("action = \"block\"\nexecutable = \"/usr/bin/curl\"");
        assert!(
            e.starts_with(
                "t.toml, line 16, key `executable`: rule 2: invalid rule: executable \"/usr/bin/curl\""
            ) && e.contains("(\"curl\"), not a path"),
            "{e}"
        );
        let e = with(&format!(
            "action = \"block\"\nexecutable = \"{}\"",
            "x".repeat(33)
        ));
        assert!(
            e.starts_with("t.toml, line 16, key `executable`: rule 2: ")
                && e.contains("at most 32 bytes (this one has 33)"),
            "{e}"
        );
        let e = with("action = \"block\"\nexecutable = \"\"");
        assert!(
            e.starts_with("t.toml, line 16, key `executable`: rule 2: "),
            "{e}"
        );
        let e = with("action = \"block\"\nafter = \"nope\"");
        assert!(
            e.starts_with("t.toml, line 16, key `after`: rule 2 names service \"nope\" in `after`"),
            "{e}"
        );
        let e = with("action = \"block\"\ncgroup = \"/a\"\nunit = \"b.service\"");
        assert!(e.contains("give `cgroup` or `unit`, not both"), "{e}");
    }

    #[test]
    fn check_refuses_more_rule_entries_on_a_prefix_than_the_kernel_judges() {
        let mut text = GOOD.replace("ports = [\"80\", \"8000-8999\", 443]", "ports = [80]");
        for i in 0..16 {
            text.push_str(&format!(
                "\n[[rule]]\naction = \"block\"\ndestinations = [\"10.0.0.0/8\"]\npriority = {i}\n"
            ));
        }
        let e = error(&text);
        assert!(e.contains("17 rule entries apply to 10.0.0.0/8"), "{e}");
        assert!(
            e.contains("at most 16 can, because the connect program judges"),
            "{e}"
        );
        assert!(e.contains(", key `destinations`"), "{e}");
        // One fewer fits.
        let fits = text.rsplitn(2, "\n[[rule]]").last().unwrap().to_string();
        Config::parse(&fits, "t.toml").unwrap();
    }

    #[test]
    fn a_complete_file_parses() {
        let config = Config::parse(GOOD, "t.toml").unwrap();
        let rules = config.rules(|_| Some(ServiceId(1))).unwrap();
        assert_eq!(rules[0].ports, vec![80..=80, 8000..=8999, 443..=443]);
        assert_eq!(rules[0].destinations[2].to_string(), "192.0.2.1/32");
        let service = config.services().next().unwrap();
        assert_eq!(service.identity.uids, vec![990]);
        assert!(service.own_connections_by_self);
        assert_eq!(service.on_down, OnDown::Block, "block is the default");
        assert_eq!(config.control.group, None, "root only by default");
    }

    #[test]
    fn the_failure_policy_and_the_control_group_are_read() {
        let text = GOOD.replace(
            "identity = { uids = [990] }",
            "identity = { uids = [990] }\non_down = \"bypass\"",
        ) + "\n[control]\ngroup = \"connredir\"\n";
        let config = Config::parse(&text, "t.toml").unwrap();
        assert_eq!(config.services().next().unwrap().on_down, OnDown::Bypass);
        assert_eq!(config.control.group.as_deref(), Some("connredir"));
        let bad = GOOD.replace(
            "identity = { uids = [990] }",
            "identity = { uids = [990] }\non_down = \"ignore\"",
        );
        assert_eq!(
            error(&bad),
            "t.toml, line 8, key `on_down`: unknown variant `ignore`, expected `block` or \
             `bypass`\n     8 | on_down = \"ignore\""
        );
    }

    #[test]
    fn unknown_keys_name_the_line_the_key_and_the_valid_ones() {
        assert_eq!(
            error(&GOOD.replace("ports =", "portz =")),
            "t.toml, line 12, key `portz`: unknown field `portz`, expected one of `service`, \
             `action`, `protocol`, `destinations`, `ports`, `uid`, `priority`, `gid`, `cgroup`, \
             `unit`, `command`, `local_ports`, `after`, `executable`\n    12 | portz = [\"80\", \"8000-8999\", 443]"
        );
    }

    #[test]
    fn a_rule_naming_a_missing_service_is_refused_at_its_line() {
        assert_eq!(
            error(&GOOD.replace("service = \"scanner\"", "service = \"nope\"")),
            "t.toml, line 10, key `service`: rule 1 names service \"nope\", which is not \
             defined (defined: scanner)\n    10 | service = \"nope\""
        );
    }

    #[test]
    fn a_scope_that_names_nothing_is_refused() {
        assert_eq!(
            error("[[service]]\nname = \"a\"\nlisten = [\"127.0.0.1:1\"]\n"),
            "t.toml: [scope] names no cgroup: give `cgroups` (cgroup v2 directories), \
             `units` (systemd units) or `host = true`"
        );
        assert!(error("[scope]\nhost = true\nunits = [\"a.service\"]\n")
            .starts_with("t.toml, line 1: [scope] `host = true` already covers every cgroup"));
    }

    #[test]
    fn services_are_checked_before_anything_is_attached() {
        let twice =
            format!("{GOOD}\n[[service]]\nname = \"scanner\"\nlisten = [\"127.0.0.1:9\"]\n");
        assert!(error(&twice)
            .starts_with("t.toml, line 15, key `name`: service \"scanner\" is defined twice"));
        let shared = format!("{GOOD}\n[[service]]\nname = \"b\"\nlisten = [\"[::1]:8000\"]\n");
        assert!(error(&shared).starts_with(
            "t.toml, line 15, key `name`: service \"b\" listens on [::1]:8000, as service \"scanner\" does"
        ), "{}", error(&shared));
        assert!(error(&GOOD.replace("127.0.0.1:8000", "0.0.0.0:8000"))
            .contains("listening address 0.0.0.0:8000 must be a concrete address and port"));
    }

    #[test]
    fn ports_and_prefixes_say_what_would_be_valid() {
        let cases = [
            ("\"80\"", "\"70000\"", "port 70000 is out of range: ports are 1 to 65535"),
            ("\"80\"", "\"http\"", "\"http\" is not a port: write a port like \"443\" or a range like \"8000-8999\""),
            ("8000-8999", "8999-8000", "port range \"8999-8000\" is empty: write the lower port first"),
            ("0.0.0.0/0", "10.0.0.0/33", "\"10.0.0.0/33\" is not an address prefix: write an address and a length, like \"10.0.0.0/8\" or \"fd00::/8\", or one address"),
        ];
        for (from, to, message) in cases {
            let line = if from.contains('.') { 11 } else { 12 };
            let key = if line == 11 { "destinations" } else { "ports" };
            let err = error(&GOOD.replace(from, to));
            assert!(
                err.starts_with(&format!("t.toml, line {line}, key `{key}`: {message}\n")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_rule_names_tcp_udp_or_both() {
        let with = |protocol: &str| {
            let text = GOOD.replace(
                "service = \"scanner\"\n",
                &format!("service = \"scanner\"\nprotocol = {protocol}\n"),
            );
            Config::parse(&text, "t.toml")
                .map(|c| c.rules(|_| Some(ServiceId(1))).unwrap()[0].protocol)
        };
        assert_eq!(
            Config::parse(GOOD, "t.toml")
                .unwrap()
                .rules(|_| Some(ServiceId(1)))
                .unwrap()[0]
                .protocol,
            Protocol::Tcp,
            "tcp is the default"
        );
        assert_eq!(with("\"udp\"").unwrap(), Protocol::Udp);
        assert_eq!(with("\"TCP\"").unwrap(), Protocol::Tcp);
        assert_eq!(with("[\"udp\"]").unwrap(), Protocol::Udp);
        assert_eq!(with("[\"tcp\", \"udp\"]").unwrap(), Protocol::TcpAndUdp);
        assert_eq!(with("[\"udp\", \"tcp\"]").unwrap(), Protocol::TcpAndUdp);
        let bad = GOOD.replace(
            "service = \"scanner\"\n",
            "service = \"scanner\"\nprotocol = \"sctp\"\n",
        );
        assert_eq!(
            error(&bad),
            "t.toml, line 11, key `protocol`: \"sctp\" is not a protocol: write \"tcp\", \"udp\" \
             or [\"tcp\", \"udp\"]\n    11 | protocol = \"sctp\""
        );
        let twice = GOOD.replace(
            "service = \"scanner\"\n",
            "service = \"scanner\"\nprotocol = [\"udp\", \"udp\"]\n",
        );
        assert!(
            error(&twice)
                .starts_with("t.toml, line 11, key `protocol`: protocol \"udp\" is named twice"),
            "{}",
            error(&twice)
        );
        let none = GOOD.replace(
            "service = \"scanner\"\n",
            "service = \"scanner\"\nprotocol = []\n",
        );
        assert!(
            error(&none).starts_with("t.toml, line 11, key `protocol`: no protocol"),
            "{}",
            error(&none)
        );
    }

    #[test]
    fn a_rule_for_both_protocols_goes_back_to_its_list() {
        let rule = RuleConfig {
            service: Some("scanner".into()),
            protocol: Protocol::TcpAndUdp,
            destinations: vec![],
            ports: vec![],
            uid: None,
            priority: 0,
            action: Action::Redirect,
            gid: None,
            cgroup: None,
            unit: None,
            command: None,
            local_ports: None,
            after: None,
            executable: None,
        };
        let json = serde_json::to_string(&rule).unwrap();
        assert!(json.contains("\"protocol\":[\"tcp\",\"udp\"]"), "{json}");
        let back: RuleConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.protocol, Protocol::TcpAndUdp);
        let udp = RuleConfig {
            protocol: Protocol::Udp,
            ..rule
        };
        assert!(serde_json::to_string(&udp)
            .unwrap()
            .contains("\"protocol\":\"udp\""));
    }

    #[test]
    fn systemd_answers_become_cgroup_paths() {
        let root = Path::new("/sys/fs/cgroup");
        assert_eq!(
            unit_cgroup_from(root, "nginx.service", "/system.slice/nginx.service\n").unwrap(),
            Path::new("/sys/fs/cgroup/system.slice/nginx.service")
        );
        let err = unit_cgroup_from(root, "gone.service", "\n").unwrap_err();
        assert!(err.to_string().contains("is it running?"), "{err}");
    }
}
