//! The policy: `--rule ACTION:KIND:VALUE` rules, checked in the order given;
//! the first rule that matches decides, and a flow no rule matches is allowed.
//!
//! A `host` rule needs the name the client addresses. When the client's
//! first bytes named none (not in time, not within what the proxy reads, or
//! not TLS or HTTP at all), the first `host` rule reached denies the flow:
//! otherwise a client could pass any host rule by hiding its name. With
//! `--allow-unknown-host`, such a flow matches no host rule instead.
//!
//! Rules are scoped by protocol: `host` rules look at TCP flows (the names
//! their first bytes carry; a UDP flow carries none the proxy reads), `dns`
//! rules at the queries of UDP flows to port 53 (each query is decided on
//! its own; a query the proxy cannot read names no name, and is treated as
//! a flow naming no host is), `dst` rules at both, and `port` rules at both
//! unless they name one (`443/udp`).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// What a matching rule does with the flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let it through.
    Allow,
    /// Close it (HTTP requests get a 403 first).
    Deny,
}

/// What a rule looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// The server name (TLS SNI; else the HTTP Host without port, and the
    /// host of an absolute-form or CONNECT request target): a
    /// case-insensitive glob where `*` matches any run of characters
    /// (dots included) and `?` one character.
    Host(String),
    /// The destination address lies in this prefix.
    Dst(IpNet),
    /// The name a DNS query (UDP, port 53) asks for: a glob as for
    /// [`Match::Host`].
    Dns(String),
    /// The destination port lies in this inclusive range, for this protocol
    /// (`None`: both).
    Port(u16, u16, Option<Protocol>),
}

/// The transport protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// A TCP connection.
    Tcp,
    /// A UDP flow (a client address and its original destination).
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// The port DNS queries go to: by default UDP flows to it are read as DNS
/// (`--dns-port` names others).
pub const DNS_PORT: u16 = 53;

/// One rule, as given with `--rule`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// What to do when it matches.
    pub action: Action,
    /// What it matches.
    pub matches: Match,
}

/// Why a `--rule` could not be read: a message saying what was expected.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RuleError(String);

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Rule, RuleError> {
        // The value may hold colons (IPv6 prefixes), so split twice only.
        let mut parts = text.splitn(3, ':');
        let (Some(action), Some(kind), Some(value)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(RuleError(
                "expected ACTION:KIND:VALUE, e.g. deny:host:*.example.com or allow:dst:10.0.0.0/8"
                    .into(),
            ));
        };
        let action = match action {
            "allow" => Action::Allow,
            "deny" => Action::Deny,
            other => {
                return Err(RuleError(format!(
                    "unknown action {other:?}: use allow or deny"
                )))
            }
        };
        let bad = |kind, why| RuleError(format!("bad {kind} value {value:?}: {why}"));
        let matches = match kind {
            "host" if !value.is_empty() => Match::Host(value.to_ascii_lowercase()),
            "host" => return Err(bad("host", "a host name or glob such as *.example.com")),
            "dns" if !value.is_empty() => {
                Match::Dns(value.trim_end_matches('.').to_ascii_lowercase())
            }
            "dns" => return Err(bad("dns", "a name or glob such as *.ads.example")),
            "dst" => Match::Dst(
                // A bare address is a one-address prefix.
                value
                    .parse()
                    .or_else(|_| value.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| bad("dst", "an address or prefix such as 10.0.0.0/8"))?,
            ),
            "port" => {
                let usage = "PORT or LOW-HIGH, optionally /tcp or /udp";
                let (range, protocol) = match value.rsplit_once('/') {
                    Some((range, "tcp")) => (range, Some(Protocol::Tcp)),
                    Some((range, "udp")) => (range, Some(Protocol::Udp)),
                    Some(_) => return Err(bad("port", usage)),
                    None => (value, None),
                };
                let port = |s: &str| s.parse::<u16>().map_err(|_| bad("port", usage));
                match range.split_once('-') {
                    Some((lo, hi)) if port(lo)? <= port(hi)? => {
                        Match::Port(port(lo)?, port(hi)?, protocol)
                    }
                    Some(_) => return Err(bad("port", "LOW-HIGH with LOW <= HIGH")),
                    None => Match::Port(port(range)?, port(range)?, protocol),
                }
            }
            other => {
                return Err(RuleError(format!(
                    "unknown kind {other:?}: use host, dns, dst or port"
                )))
            }
        };
        Ok(Rule { action, matches })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.action {
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        match &self.matches {
            Match::Host(glob) => write!(f, "{action}:host:{glob}"),
            Match::Dst(net) => write!(f, "{action}:dst:{net}"),
            Match::Dns(glob) => write!(f, "{action}:dns:{glob}"),
            Match::Port(lo, hi, protocol) => {
                write!(f, "{action}:port:{lo}")?;
                if lo != hi {
                    write!(f, "-{hi}")?;
                }
                match protocol {
                    Some(protocol) => write!(f, "/{protocol}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The outcome for one flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub action: Action,
    /// The rule that decided (`rule 2: deny:port:25`), `None` for the default.
    pub rule: Option<String>,
    /// Denied because a host (or dns) rule was reached and the client
    /// named no host (or its query could not be read).
    pub unknown_host: bool,
}

/// What is known of the host name when a rule is evaluated.
#[derive(Debug, Clone, Copy)]
enum Host<'a> {
    /// Not yet: inspection comes later.
    Later,
    /// The client named none.
    Unknown,
    /// This name.
    Name(&'a str),
}

/// The ordered rules.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    allow_unknown_host: bool,
    /// UDP flows to these destination ports are DNS.
    dns_ports: Vec<u16>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy::new(Vec::new(), false)
    }
}

impl Policy {
    /// A policy of these rules, in this order. `allow_unknown_host`: a flow
    /// whose client named no host matches no host rule (instead of being
    /// denied by the first one reached).
    pub fn new(rules: Vec<Rule>, allow_unknown_host: bool) -> Policy {
        Policy {
            rules,
            allow_unknown_host,
            dns_ports: vec![DNS_PORT],
        }
    }

    /// The same policy, reading UDP flows to `ports` as DNS (instead of
    /// port 53 alone).
    pub fn with_dns_ports(mut self, ports: Vec<u16>) -> Policy {
        self.dns_ports = ports;
        self
    }

    /// Whether a UDP flow to `dst` is read as DNS.
    pub fn is_dns(&self, dst: SocketAddr) -> bool {
        self.dns_ports.contains(&dst.port())
    }

    /// Decides from the destination alone, before connecting. `None` when a
    /// host rule comes before any destination rule that matches: then only
    /// inspection can tell.
    pub fn before_connect(&self, dst: SocketAddr) -> Option<Decision> {
        self.evaluate(dst, Protocol::Tcp, Host::Later)
    }

    /// Decides a UDP flow from its destination alone, before its first
    /// datagram goes on. `None` for a DNS flow (port 53) when a `dns` rule
    /// comes before any destination rule that matches: then each query is
    /// decided on its own ([`Policy::decide_dns`]).
    pub fn udp_before(&self, dst: SocketAddr) -> Option<Decision> {
        self.evaluate(dst, Protocol::Udp, Host::Later)
    }

    /// Decides one DNS query of a UDP flow to port 53 by the names it asks
    /// for (none: the query could not be read); denied when any is.
    pub fn decide_dns(&self, dst: SocketAddr, names: &[String]) -> Decision {
        self.decide_names(dst, Protocol::Udp, names)
    }

    /// Decides with the names the client addressed known (none: it named
    /// no host). A flow naming several (an HTTP Host header and an
    /// absolute-form target) is denied when any of them is.
    pub fn decide(&self, dst: SocketAddr, names: &[String]) -> Decision {
        self.decide_names(dst, Protocol::Tcp, names)
    }

    fn decide_names(&self, dst: SocketAddr, protocol: Protocol, names: &[String]) -> Decision {
        let known = "with the host known every rule can be evaluated";
        if names.is_empty() {
            return self.evaluate(dst, protocol, Host::Unknown).expect(known);
        }
        let mut first = None;
        for name in names {
            let decision = self.evaluate(dst, protocol, Host::Name(name)).expect(known);
            if decision.action == Action::Deny {
                return decision;
            }
            first.get_or_insert(decision);
        }
        first.expect("at least one name")
    }

    /// `host`: the name for `host` rules of a TCP flow, or the query's
    /// name for `dns` rules of a UDP flow to port 53; rules of the other
    /// protocol's kind do not match.
    fn evaluate(&self, dst: SocketAddr, protocol: Protocol, host: Host<'_>) -> Option<Decision> {
        let named_by = |m: &Match| match m {
            Match::Host(_) => protocol == Protocol::Tcp,
            Match::Dns(_) => protocol == Protocol::Udp && self.is_dns(dst),
            _ => false,
        };
        for (i, rule) in self.rules.iter().enumerate() {
            let decided = |action, unknown_host| Decision {
                action,
                rule: Some(format!("rule {}: {rule}", i + 1)),
                unknown_host,
            };
            let hit = match (&rule.matches, host) {
                (m @ (Match::Host(_) | Match::Dns(_)), _) if !named_by(m) => false,
                (Match::Host(_) | Match::Dns(_), Host::Later) => return None,
                (Match::Host(_) | Match::Dns(_), Host::Unknown) if self.allow_unknown_host => false,
                (Match::Host(_) | Match::Dns(_), Host::Unknown) => {
                    return Some(decided(Action::Deny, true))
                }
                (Match::Host(pattern) | Match::Dns(pattern), Host::Name(name)) => {
                    glob(pattern, name)
                }
                (Match::Dst(net), _) => net.contains(&dst.ip()),
                (Match::Port(lo, hi, only), _) => {
                    only.is_none_or(|p| p == protocol) && (*lo..=*hi).contains(&dst.port())
                }
            };
            if hit {
                return Some(decided(rule.action, false));
            }
        }
        Some(Decision {
            action: Action::Allow,
            rule: None,
            unknown_host: false,
        })
    }
}

/// Case-insensitive glob match: `*` any run (dots too), `?` one byte.
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    // Where the last `*` was, and where in `name` it currently stops.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, ni));
                pi += 1;
            }
            Some(c) if *c == b'?' || c.eq_ignore_ascii_case(&n[ni]) => {
                pi += 1;
                ni += 1;
            }
            _ => match star {
                // Let the last star swallow one more byte and retry.
                Some((sp, sn)) => {
                    star = Some((sp, sn + 1));
                    pi = sp + 1;
                    ni = sn + 1;
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(rules: &[&str]) -> Policy {
        Policy::new(rules.iter().map(|r| r.parse().unwrap()).collect(), false)
    }

    fn names(name: Option<&str>) -> Vec<String> {
        name.map(String::from).into_iter().collect()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn globs() {
        assert!(glob("*.example.com", "www.example.com"));
        assert!(glob("*.example.com", "a.b.EXAMPLE.com"));
        assert!(!glob("*.example.com", "example.com"));
        assert!(!glob("*.example.com", "evilexample.com"));
        assert!(glob("example.com", "Example.Com"));
        assert!(!glob("example.com", "example.com.evil"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(glob("ww?.example.*", "www.example.org"));
        assert!(!glob("", "a"));
    }

    #[test]
    fn rules_parse_and_print() {
        for text in [
            "allow:host:*.example.com",
            "deny:dst:10.0.0.0/8",
            "deny:dst:2001:db8::/32",
            "deny:port:25",
            "allow:port:8000-8999",
        ] {
            assert_eq!(text.parse::<Rule>().unwrap().to_string(), text);
        }
        let rule: Rule = "deny:dst:192.0.2.1".parse().unwrap();
        assert_eq!(rule.to_string(), "deny:dst:192.0.2.1/32");
        for bad in [
            "deny",
            "deny:host",
            "deny:host:",
            "block:host:x",
            "deny:ip:1.2.3.4",
            "deny:dst:10.0.0.0/33",
            "deny:port:70000",
            "deny:port:9-1",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn first_match_decides_and_default_allows() {
        let p = policy(&[
            "allow:host:ok.example.com",
            "deny:host:*.example.com",
            "deny:port:25",
        ]);
        let d = |host| p.decide(addr("192.0.2.1:443"), &names(host)).action;
        assert_eq!(d(Some("ok.example.com")), Action::Allow);
        assert_eq!(d(Some("bad.example.com")), Action::Deny);
        assert_eq!(d(Some("elsewhere.org")), Action::Allow);
        let deny = p.decide(addr("192.0.2.1:25"), &names(Some("elsewhere.org")));
        assert_eq!(deny.action, Action::Deny);
        assert_eq!(deny.rule.as_deref(), Some("rule 3: deny:port:25"));
        assert!(!deny.unknown_host);
        assert_eq!(
            p.decide(addr("192.0.2.1:443"), &names(Some("x.org"))).rule,
            None
        );
    }

    #[test]
    fn a_host_rule_denies_a_flow_that_named_no_host_unless_told_otherwise() {
        let rules = [
            "deny:port:25",
            "deny:host:*.example.com",
            "allow:port:1-1024",
        ];
        let strict = policy(&rules);
        let unknown = strict.decide(addr("192.0.2.1:443"), &[]);
        assert_eq!(unknown.action, Action::Deny);
        assert!(unknown.unknown_host);
        assert_eq!(
            unknown.rule.as_deref(),
            Some("rule 2: deny:host:*.example.com")
        );
        // A destination rule before the host rule still decides alone.
        assert!(!strict.decide(addr("192.0.2.1:25"), &[]).unknown_host);
        let lenient = Policy::new(rules.iter().map(|r| r.parse().unwrap()).collect(), true);
        let passed = lenient.decide(addr("192.0.2.1:443"), &[]);
        assert_eq!(passed.action, Action::Allow);
        assert_eq!(passed.rule.as_deref(), Some("rule 3: allow:port:1-1024"));
        // Without host rules nothing needs a name.
        let none = policy(&["deny:port:25"]).decide(addr("192.0.2.1:443"), &[]);
        assert_eq!((none.action, none.unknown_host), (Action::Allow, false));
    }

    #[test]
    fn any_denied_name_denies() {
        let p = policy(&["allow:host:ok.test", "deny:host:*.example"]);
        let dst = addr("192.0.2.1:80");
        let both = |a: &str, b: &str| p.decide(dst, &[a.into(), b.into()]);
        assert_eq!(both("ok.test", "x.example").action, Action::Deny);
        assert_eq!(both("x.example", "ok.test").action, Action::Deny);
        let allowed = both("ok.test", "other.test");
        assert_eq!(allowed.action, Action::Allow);
        assert_eq!(allowed.rule.as_deref(), Some("rule 1: allow:host:ok.test"));
    }

    #[test]
    fn destination_rules_decide_before_connect_unless_a_host_rule_comes_first() {
        let p = policy(&[
            "deny:dst:10.0.0.0/8",
            "allow:host:*.ok.test",
            "deny:port:1-1024",
        ]);
        let early = |a| p.before_connect(addr(a)).map(|d| d.action);
        assert_eq!(early("10.1.2.3:80"), Some(Action::Deny));
        assert_eq!(
            early("192.0.2.1:80"),
            None,
            "the host rule must be seen first"
        );
        assert_eq!(
            p.decide(addr("192.0.2.1:80"), &names(Some("a.ok.test")))
                .action,
            Action::Allow
        );
        assert_eq!(
            p.decide(addr("192.0.2.1:80"), &names(Some("x.test")))
                .action,
            Action::Deny
        );
        assert_eq!(p.decide(addr("192.0.2.1:80"), &[]).action, Action::Deny);

        let p = policy(&["deny:dst:2001:db8::/32"]);
        assert_eq!(early_of(&p, "[2001:db8::1]:443"), Some(Action::Deny));
        assert_eq!(early_of(&p, "[2001:db9::1]:443"), Some(Action::Allow));
        assert_eq!(
            early_of(&Policy::default(), "192.0.2.1:1"),
            Some(Action::Allow)
        );
    }

    #[test]
    fn dns_and_protocol_rules_parse_and_print() {
        for text in [
            "deny:dns:*.ads.example",
            "deny:port:443/udp",
            "allow:port:8000-8999/tcp",
        ] {
            assert_eq!(text.parse::<Rule>().unwrap().to_string(), text);
        }
        let rule: Rule = "deny:dns:Tracker.Example.".parse().unwrap();
        assert_eq!(rule.to_string(), "deny:dns:tracker.example");
        for bad in [
            "deny:dns:",
            "deny:port:443/sctp",
            "deny:port:/udp",
            "deny:port:1-2/",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn udp_flows_meet_dns_and_port_rules_not_host_rules() {
        let p = policy(&[
            "deny:host:*.example",
            "deny:port:443/udp",
            "deny:dns:*.ads.example",
            "deny:port:8443/tcp",
        ]);
        // QUIC: denied by its port before any datagram goes on.
        let quic = p.udp_before(addr("192.0.2.1:443")).unwrap();
        assert_eq!(quic.action, Action::Deny);
        assert_eq!(quic.rule.as_deref(), Some("rule 2: deny:port:443/udp"));
        // A TCP flow to 443 meets the host rule first, as before.
        assert_eq!(p.before_connect(addr("192.0.2.1:443")), None);
        // /tcp rules do not touch UDP, nor dns rules a flow to another port.
        let other = p.udp_before(addr("192.0.2.1:8443")).unwrap();
        assert_eq!((other.action, other.rule), (Action::Allow, None));
        // DNS: decided per query, by the name asked for.
        assert_eq!(p.udp_before(addr("192.0.2.53:53")), None);
        let dns = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            p.decide_dns(addr("192.0.2.53:53"), &names)
        };
        let denied = dns(&["x.ads.example"]);
        assert_eq!(denied.action, Action::Deny);
        assert_eq!(
            denied.rule.as_deref(),
            Some("rule 3: deny:dns:*.ads.example")
        );
        assert_eq!(dns(&["www.example"]).action, Action::Allow);
        // A query that cannot be read names no name: the dns rule denies it.
        let unreadable = dns(&[]);
        assert_eq!(
            (unreadable.action, unreadable.unknown_host),
            (Action::Deny, true)
        );
        let lenient = Policy::new(p.rules.clone(), true);
        assert_eq!(
            lenient.decide_dns(addr("192.0.2.53:53"), &[]).action,
            Action::Allow
        );
        // Without dns rules a DNS flow is decided by its destination.
        let plain = policy(&["deny:host:*.example"]).udp_before(addr("192.0.2.53:53"));
        assert_eq!(plain.map(|d| d.action), Some(Action::Allow));
        // A bare port rule covers both protocols.
        let both = policy(&["deny:port:53"]);
        assert_eq!(
            both.udp_before(addr("192.0.2.53:53")).unwrap().action,
            Action::Deny
        );
        assert_eq!(
            both.before_connect(addr("192.0.2.53:53")).unwrap().action,
            Action::Deny
        );
    }

    fn early_of(p: &Policy, a: &str) -> Option<Action> {
        p.before_connect(addr(a)).map(|d| d.action)
    }
}
