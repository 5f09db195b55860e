//! The configuration file: scopes, services and rules, in TOML.

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use connredir_engine::{Identity, Protocol, Rule, Service, ServiceId};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the programs attach.
    pub scope: Scope,
    /// The services, by name.
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// The rules.
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
}

/// The cgroups whose connections meet the rules. The services' own cgroups
/// must be among them (or inside one): their onward connections meet the
/// other services.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scope {
    /// cgroup v2 directories, none inside another.
    pub cgroups: Vec<PathBuf>,
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
    /// Name of the service that gets matching connections.
    pub service: String,
    /// "tcp" (default).
    #[serde(default)]
    pub protocol: Protocol,
    /// Destination prefixes; none means all.
    #[serde(default)]
    pub destinations: Vec<IpNet>,
    /// Ports and ranges: "443", "8000-8999".
    #[serde(default)]
    pub ports: Vec<String>,
    /// Only connections of this uid.
    pub uid: Option<u32>,
    /// Lower first.
    #[serde(default)]
    pub priority: u32,
}

/// Parses "443" or "8000-8999".
pub fn parse_ports(text: &str) -> Result<RangeInclusive<u16>> {
    let port = |s: &str| -> Result<u16> {
        let n: u32 = s
            .trim()
            .parse()
            .map_err(|_| anyhow!("{s:?} is not a port number"))?;
        if n == 0 || n > 65535 {
            bail!("port {n} is out of range: ports are 1 to 65535");
        }
        Ok(n as u16)
    };
    let range = match text.split_once('-') {
        Some((lo, hi)) => port(lo)?..=port(hi)?,
        None => port(text)?..=port(text)?,
    };
    if range.start() > range.end() {
        bail!("port range {text:?} is empty: write the lower port first");
    }
    Ok(range)
}

impl Config {
    /// Reads and checks a file; errors name the file, line and key.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let config: Config =
            toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        config
            .check()
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        if self.scope.cgroups.is_empty() {
            bail!("[scope] cgroups is empty: name at least one cgroup v2 directory");
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if !self.services.iter().any(|s| s.name == rule.service) {
                let known: Vec<&str> = self.services.iter().map(|s| s.name.as_str()).collect();
                bail!(
                    "rule {} names service {:?}, which is not defined (defined: {})",
                    i + 1,
                    rule.service,
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                );
            }
            for ports in &rule.ports {
                parse_ports(ports).with_context(|| format!("rule {}: ports", i + 1))?;
            }
        }
        Ok(())
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
        }
    }
}

impl RuleConfig {
    /// The rule, given how service names resolve to ids.
    pub fn to_rule(&self, id_of: impl Fn(&str) -> Option<ServiceId>) -> Result<Rule> {
        Ok(Rule {
            service: id_of(&self.service)
                .ok_or_else(|| anyhow!("service {:?} is not registered", self.service))?,
            protocol: self.protocol,
            destinations: self.destinations.clone(),
            ports: self
                .ports
                .iter()
                .map(|p| parse_ports(p))
                .collect::<Result<_>>()?,
            uid: self.uid,
            priority: self.priority,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text)?;
        config.check()?;
        Ok(config)
    }

    const GOOD: &str = r#"
[scope]
cgroups = ["/sys/fs/cgroup/unified/apps"]

[[service]]
name = "scanner"
listen = ["127.0.0.1:8000", "[::1]:8000"]
identity = { uids = [990] }

[[rule]]
service = "scanner"
destinations = ["0.0.0.0/0", "::/0"]
ports = ["80", "8000-8999"]
"#;

    #[test]
    fn a_complete_file_parses() {
        let config = parse(GOOD).unwrap();
        let rules = config.rules(|_| Some(ServiceId(1))).unwrap();
        assert_eq!(rules[0].ports, vec![80..=80, 8000..=8999]);
        assert_eq!(config.services().next().unwrap().identity.uids, vec![990]);
    }

    #[test]
    fn unknown_keys_name_the_line_and_key() {
        let err = parse(&GOOD.replace("priority", "x").replace("ports =", "portz =")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("unknown field `portz`"), "{msg}");
        assert!(msg.contains("line 13"), "{msg}");
        assert!(msg.contains("expected one of `service`"), "{msg}");
    }

    #[test]
    fn a_rule_naming_a_missing_service_is_refused() {
        let err = parse(&GOOD.replace("service = \"scanner\"", "service = \"nope\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"nope\", which is not defined (defined: scanner)"),
            "{err}"
        );
    }

    #[test]
    fn ports_out_of_range_are_refused() {
        let err = parse(&GOOD.replace("\"80\"", "\"70000\"")).unwrap_err();
        assert!(
            format!("{err:#}").contains("port 70000 is out of range"),
            "{err:#}"
        );
    }

    #[test]
    fn bad_prefixes_are_refused_with_the_line() {
        let err = parse(&GOOD.replace("0.0.0.0/0", "10.0.0.0/33"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 12"), "{err}");
        assert!(err.contains("invalid IP address syntax"), "{err}");
    }
}
