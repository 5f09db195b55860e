//! Rules, and their compilation into the entries of the kernel's rule trie.
//!
//! The connect programs make one longest-prefix-match lookup per connect. For
//! that to find every rule that applies, each prefix's entry must also hold
//! the rules of every shorter prefix that contains it ("leaf pushing"), already
//! in evaluation order. Compiling is O(prefixes × address bits), so the lookup
//! cost in the kernel does not grow with the number of rules.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::RangeInclusive;

use connredir_abi::{
    connredir_rule, connredir_rule_set, CONNREDIR_ANY_UID, CONNREDIR_MAX_RULES_PER_PREFIX,
    CONNREDIR_PROTO_TCP, CONNREDIR_PROTO_TCP_AND_UDP, CONNREDIR_PROTO_UDP,
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

/// A filter: which connections a service gets.
///
/// Rules are evaluated in ascending `priority`, then in the order they were
/// added; the first one whose service has not yet handled the flow wins.
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
        }
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

/// Compiles rules into trie entries. Fails when more than
/// `CONNREDIR_MAX_RULES_PER_PREFIX` rule entries apply to one prefix.
pub(crate) fn compile<'a>(
    rules: impl IntoIterator<Item = (RuleId, &'a Rule)>,
) -> Result<CompiledRules, Error> {
    // Every rule entry (one per port range), grouped by prefix.
    let mut by_prefix: HashMap<IpNet, Vec<(u32, RuleId, connredir_rule)>> = HashMap::new();
    for (id, rule) in rules {
        for net in rule.prefixes() {
            for ports in rule.port_ranges() {
                let entry = connredir_rule {
                    rule_id: id.0,
                    service_id: rule.service.0,
                    uid: rule.uid.unwrap_or(CONNREDIR_ANY_UID),
                    port_min: *ports.start(),
                    port_max: *ports.end(),
                    protocol: rule.protocol.number(),
                    reserved: [0; 3],
                };
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
            return Err(Error::InvalidRule(format!(
                "{} rule entries apply to {net} (each port range counts once); at most {} can: \
                 merge rules or their port ranges",
                entries.len(),
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
    fn empty_port_range_is_rejected() {
        let mut a = rule(1, &[], 0);
        #[allow(clippy::reversed_empty_ranges)]
        {
            a.ports = vec![90..=80];
        }
        assert!(a.validate().unwrap_err().to_string().contains("90-80"));
    }
}
