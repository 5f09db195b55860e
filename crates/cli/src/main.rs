//! `connredir`: cooperative connection redirection for Linux.

mod config;
mod control;
mod demo;
mod doctor;
mod lifecycle;
mod metrics;
mod process;
mod run;
mod trace;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use config::Config;
use control::protocol::{Conn, RuleStatus, ServiceStatus, Status};

/// Sends selected outbound TCP connections to local inspection proxies
/// ("services"), and lets several proxies inspect one flow in turn without
/// loops: each connection carries redirect records naming the services that
/// already handled it.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    places: lifecycle::Places,
}

#[derive(Subcommand)]
enum Command {
    /// Show the whole facility on this machine, on loopback only: a web
    /// server, two inspection proxies that each see the same request once,
    /// and curl; prints what each proxy saw, then removes everything.
    ///
    /// Only the report is printed; the engine's and the proxies' logs are
    /// left out (RUST_LOG=debug shows them on stderr), or written to a file.
    ///
    /// Examples:
    ///   connredir demo
    ///   connredir demo --log /tmp/connredir-demo.log
    Demo {
        /// Write the engine's and the proxies' log lines to this file.
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
    },
    /// Attach the redirect layer as the configuration says and run until
    /// Ctrl-C or SIGTERM. Maps and links are pinned in bpffs, so the layer
    /// stays attached when `up` stops or restarts (a new `up` takes over
    /// without a gap); `connredir down` removes it.
    ///
    /// Example: connredir up --config /etc/connredir.toml
    Up {
        /// The configuration file (TOML): [scope], [[service]], [[rule]].
        #[arg(long, short)]
        config: PathBuf,
        /// Serve the counters for Prometheus at http://ADDR/metrics
        /// (for example 127.0.0.1:9464).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Let members of this group use the control socket (status, conns,
        /// trace, rule and service changes) as root can; overrides the
        /// configuration's `[control] group`. Default: root only.
        #[arg(long, value_name = "GROUP")]
        control_group: Option<String>,
    },
    /// Stop a running `up` and remove everything it attached and pinned,
    /// and the scope cgroups it created (those still empty; never a cgroup
    /// it did not create).
    ///
    /// Example: connredir down
    Down,
    /// Run a command with its connections going through the redirect layer:
    /// it and its children run in a fresh cgroup inside the scope (so it
    /// works for statically linked programs too), removed when it ends.
    /// Exits with the command's status.
    ///
    /// The scope is, in this order: --scope; the first scope cgroup of
    /// --config; the first scope cgroup of the running `connredir up`
    /// (asked over its control socket); the first of
    /// /etc/connredir/connredir.toml.
    ///
    /// Examples:
    ///   connredir run -- curl https://example.com/
    ///   connredir run --scope /sys/fs/cgroup/inspected -- ./client
    ///   connredir run --config my.toml -- wget -O- http://example.com/
    Run {
        /// The scope to run in: a cgroup v2 directory, or a systemd unit
        /// (default: the running engine's first scope cgroup).
        #[arg(long, value_name = "CGROUP|UNIT")]
        scope: Option<String>,
        /// A configuration file whose first scope cgroup to run in, instead
        /// of asking the running engine.
        #[arg(long, short, value_name = "FILE", conflicts_with = "scope")]
        config: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Show the running engine: scopes, services (and whether something
    /// listens on their addresses), rules with hit counts, counters.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the live redirected connections: for each flow, the process
    /// that opened it, where it was going, and the services it went through.
    Conns {
        /// Print JSON (one object per redirected socket) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Stream redirect decisions as connections are made: time, process,
    /// destination, rule, service, redirect state and decision.
    ///
    /// Example: connredir trace --decision loop-prevented --dst 10.0.0.0/8
    Trace {
        #[command(flatten)]
        filter: trace::Filter,
        /// Stop after this many decisions.
        #[arg(long, short = 'n')]
        count: Option<usize>,
        /// Print one JSON object per decision.
        #[arg(long)]
        json: bool,
    },
    /// Add, remove or list services of the running engine.
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Add, remove or list rules of the running engine; each change applies
    /// to the next connection, all at once.
    Rule {
        #[command(subcommand)]
        action: RuleAction,
    },
    /// Check a configuration file without attaching anything. Mistakes are
    /// errors (exit status 1, with the file, line and key); what only this
    /// machine makes a problem, such as a scope cgroup that does not exist
    /// yet (`up` creates it), is a warning on stderr (exit status 0).
    ///
    /// Example: connredir check /etc/connredir/connredir.toml
    Check {
        /// The configuration file.
        file: PathBuf,
    },
    /// Find what keeps the redirect layer from working here, and what else
    /// intercepts connections: BPF programs attached to the scope's cgroups
    /// and their ancestors, nftables and iptables REDIRECT, TPROXY and DNAT
    /// rules, policy-routing rules, services that do not listen, and the
    /// kernel features the layer needs (cgroup v2, bpffs, BTF, and its
    /// programs, probed by loading them). Each finding says what to do.
    ///
    /// The scope is the running engine's, or --config's. Netfilter and
    /// routing are read in the network namespace doctor runs in. Exit
    /// status 1 when something blocks the layer, else 0.
    ///
    /// Examples:
    ///   connredir doctor
    ///   connredir doctor --config /etc/connredir/connredir.toml --json
    ///   nsenter --net=/run/netns/blue connredir doctor
    Doctor {
        /// Take the scope from this configuration file instead of the
        /// running engine.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ServiceAction {
    /// Register a service.
    ///
    /// Example: connredir service add --name scanner --listen 127.0.0.1:15001 --uid 990
    Add {
        /// Unique name.
        #[arg(long)]
        name: String,
        /// Listening address (at most one IPv4 and one IPv6).
        #[arg(long, required = true)]
        listen: Vec<std::net::SocketAddr>,
        /// A process id that is this service.
        #[arg(long)]
        pid: Vec<u32>,
        /// A cgroup v2 directory whose processes are this service.
        #[arg(long)]
        cgroup: Vec<PathBuf>,
        /// A user id that is this service.
        #[arg(long)]
        uid: Vec<u32>,
        /// The context handed to the service with each connection.
        #[arg(long)]
        context: Option<String>,
        /// Let connections the service's own processes open without records
        /// reach the service (by default they count as redirected by self).
        #[arg(long)]
        inspect_own_connections: bool,
        /// Move the data of the service's local connections socket to
        /// socket, without the TCP stack (sockmap); the service must read
        /// them with read(), not splice() (connredir-proxy does).
        #[arg(long)]
        accelerate: bool,
        /// The sockets the service accepts name the flow's original
        /// destination as their local address (getsockname), as TPROXY
        /// sockets do: for proxies that read it there (haproxy's `option
        /// transparent` on IPv6) instead of asking SO_ORIGINAL_DST.
        #[arg(long)]
        transparent: bool,
        /// While nothing of the service's own listens on its address:
        /// `block` refuses the selected connections at once, `bypass` skips
        /// the service (the next matching rule, or the destination).
        #[arg(long, value_enum, default_value_t = config::OnDownConfig::Block)]
        on_down: config::OnDownConfig,
    },
    /// Unregister a service (remove its rules first).
    Del {
        /// The service's name.
        name: String,
    },
    /// List the services.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

// Parsed once per run: boxing the large variant would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum RuleAction {
    /// Add a rule.
    ///
    /// Example: connredir rule add --service scanner --dst 0.0.0.0/0 --port 80 --port 443
    Add {
        /// The service that gets matching connections (redirect rules only).
        #[arg(long)]
        service: Option<String>,
        /// What a match does: redirect (to --service), permit (direct, no
        /// later rule judged) or block (connect fails with EACCES).
        #[arg(long, default_value = "redirect", value_parser = parse_action)]
        action: connredir_engine::Action,
        /// Only processes in this cgroup v2 directory or below it.
        #[arg(long)]
        cgroup: Option<std::path::PathBuf>,
        /// Only processes in this systemd unit's cgroup or below it.
        #[arg(long)]
        unit: Option<String>,
        /// Only processes of this command name (as /proc/PID/comm), or
        /// whose name starts so when it ends in `*` (`python*`).
        #[arg(long)]
        command: Option<String>,
        /// Only processes of this (real) gid.
        #[arg(long)]
        gid: Option<u32>,
        /// Only sockets whose local port is in this range at connect time.
        #[arg(long)]
        local_port: Option<config::PortRange>,
        /// Only flows this service (by name) already inspected.
        #[arg(long)]
        after: Option<String>,
        /// Only processes whose executable has this file name (`curl`,
        /// compared whole, at most 32 bytes; not a path: the directory is
        /// not compared).
        #[arg(long)]
        executable: Option<String>,
        /// Protocol: tcp, udp, or both as tcp,udp (repeatable; none: tcp).
        #[arg(long, value_delimiter = ',')]
        protocol: Vec<String>,
        /// Destination prefix (repeatable; none: every destination).
        #[arg(long)]
        dst: Vec<config::Prefix>,
        /// Destination port or range like 8000-8999 (repeatable; none: all).
        #[arg(long)]
        port: Vec<config::PortRange>,
        /// Only connections opened by this uid.
        #[arg(long)]
        uid: Option<u32>,
        /// Evaluation order, lower first.
        #[arg(long, default_value_t = 0)]
        priority: u32,
    },
    /// Remove a rule by id (see `rule list`).
    Del {
        /// The rule's id.
        id: u32,
    },
    /// List the rules with their hit counts.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    if let Err(e) = real_main() {
        // The message is for people: what went wrong and what to do, without
        // a backtrace.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Logs go to stderr at `info` (RUST_LOG chooses otherwise), except for
/// the demo and the doctor, whose output is their report: there only
/// warnings, or everything at `info` into the demo's `--log` file.
fn init_logs(command: &Command) -> Result<()> {
    let filter = |default: &str| {
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into())
    };
    match command {
        Command::Demo { log: Some(path) } => {
            // Emptied, then written in append mode: the proxies append
            // their lines to the same file, and nothing overwrites them.
            std::fs::File::create(path)
                .with_context(|| format!("cannot create the log file {}", path.display()))?;
            let file = std::fs::OpenOptions::new().append(true).open(path)?;
            tracing_subscriber::fmt()
                .with_env_filter(filter("info"))
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        Command::Demo { log: None } | Command::Doctor { .. } => tracing_subscriber::fmt()
            .with_env_filter(filter("warn"))
            .with_writer(std::io::stderr)
            .init(),
        _ => tracing_subscriber::fmt()
            .with_env_filter(filter("info"))
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    init_logs(&cli.command)?;
    let places = cli.places;
    match cli.command {
        Command::Demo { log } => demo::run(log.as_deref()),
        Command::Doctor { config, json } => {
            let report = doctor::examine(&places, config.as_deref());
            if json {
                print_json(&report)?;
            } else {
                doctor::print(&report);
            }
            if report.blocked {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Check { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let config = Config::parse(&text, &file.display().to_string())?;
            for warning in config.scope_warnings(&text, &file.display().to_string()) {
                eprintln!("warning: {warning}");
            }
            let scope = &config.scope;
            let scope = if scope.host {
                "the whole host".to_string()
            } else {
                format!(
                    "{} cgroups and {} systemd units in scope",
                    scope.cgroups.len(),
                    scope.units.len()
                )
            };
            println!(
                "{}: ok ({scope}, {} services, {} rules)",
                file.display(),
                config.services.len(),
                config.rules.len()
            );
            Ok(())
        }
        Command::Up {
            config,
            metrics,
            control_group,
        } => lifecycle::up(
            &Config::load(&config)?,
            &places,
            metrics,
            control_group.as_deref(),
        ),
        Command::Conns { json } => print_conns(&control::client::conns(&places.state_dir)?, json),
        Command::Trace {
            filter,
            count,
            json,
        } => trace::show(
            control::client::trace(&places.state_dir)?,
            &filter,
            json,
            count,
        ),
        Command::Down => lifecycle::down(&places),
        Command::Status { json } => {
            print_status(&control::client::status(&places.state_dir)?, json)
        }
        Command::Service { action } => service(action, &places),
        Command::Rule { action } => rule(action, &places),
        Command::Run {
            scope,
            config,
            command,
        } => {
            let scope = run::scope(scope, config.as_deref(), &places)?;
            let status = run::run(&scope, &command)?;
            std::process::exit(status);
        }
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

// The ids and numbers in these tables are printed unpadded: their width
// specifiers never applied (they were formatted as JSON values, which
// ignore them), and the output stays as it has been.

fn print_services(services: &[ServiceStatus]) {
    for s in services {
        let listen: Vec<String> = s.listen.iter().map(ToString::to_string).collect();
        println!(
            "  {}  {:<16} {:<40} {:<14} on down: {}",
            s.id,
            s.name,
            listen.join(" "),
            if s.up { "up" } else { "not listening" },
            match s.on_down {
                config::OnDownConfig::Block => "block",
                config::OnDownConfig::Bypass => "bypass",
            },
        );
    }
}

fn print_rules(rules: &[RuleStatus]) {
    let list = |items: &[String], none: &str| {
        if items.is_empty() {
            none.to_string()
        } else {
            items.join(",")
        }
    };
    for r in rules {
        println!(
            "  {}  {:<8} {:<16} {:<7} dst {:<24} ports {:<12} uid {:<6} priority {} hits {}{}",
            r.id,
            r.action,
            match r.action.as_str() {
                "redirect" => format!("→ {}", r.service.as_deref().unwrap_or("?")),
                _ => "-".to_string(),
            },
            list(&r.protocol, "tcp"),
            list(&r.destinations, "any"),
            list(&r.ports, "any"),
            r.uid.map_or("any".into(), |u| u.to_string()),
            r.priority,
            r.hits,
            if r.conditions.is_empty() {
                String::new()
            } else {
                format!("  ({})", r.conditions.join(", "))
            },
        );
    }
}

/// Prints one line per flow: its legs grouped by the flow's protocol and
/// first socket, the client process from the first leg, the chain from the
/// longest. A leg whose first socket is unknown (a UDP client that
/// connected before binding) is a flow of its own.
fn print_conns(conns: &[Conn], json: bool) -> Result<()> {
    if json {
        return print_json(&conns);
    }
    let mut flows: std::collections::BTreeMap<(String, String, usize), Vec<&Conn>> =
        Default::default();
    for (i, leg) in conns.iter().enumerate() {
        let key = match flow_client(leg, conns) {
            Some(c) => (leg.protocol.clone(), c.to_string(), 0),
            None => (leg.protocol.clone(), "?".to_string(), i),
        };
        flows.entry(key).or_default().push(leg);
    }
    println!(
        "{:<5} {:<28} {:<28} {:<28} {:<40} AGE",
        "PROTO", "CLIENT", "PROCESS", "ORIGINAL DESTINATION", "CHAIN"
    );
    for ((protocol, client, _), legs) in &flows {
        let longest = legs
            .iter()
            .max_by_key(|l| l.chain.len())
            .expect("a flow has a leg");
        let process = match legs.iter().find(|l| l.chain.len() == 1) {
            Some(first) => format!("{} {} (uid {})", first.pid, first.command, first.uid),
            None => format!("{} (uid {})", longest.client_pid, longest.client_uid),
        };
        let age = legs.iter().map(|l| l.age_ms).max().unwrap_or(0);
        println!(
            "{:<5} {:<28} {:<28} {:<28} {:<40} {:.1}s",
            protocol,
            client,
            process,
            longest
                .original_dst
                .map_or("?".to_string(), |d| d.to_string()),
            longest.chain.join(" → "),
            age as f64 / 1000.0
        );
    }
    println!("{} flows, {} redirected sockets", flows.len(), conns.len());
    Ok(())
}

/// The first socket of `leg`'s flow. A UDP client's own leg has the address
/// its socket had when it was redirected, often a wildcard one with its
/// port; the services' legs of the flow name the address its datagrams came
/// from, with the same port: that one, when a leg has it.
fn flow_client(leg: &Conn, conns: &[Conn]) -> Option<std::net::SocketAddr> {
    let client = leg.client?;
    if leg.protocol != "udp" || !client.ip().is_unspecified() {
        return Some(client);
    }
    let named = conns.iter().filter_map(|other| {
        let c = other.client?;
        (other.protocol == "udp"
            && other.client_pid == leg.client_pid
            && c.port() == client.port()
            && !c.ip().is_unspecified())
        .then_some(c)
    });
    Some(named.min().unwrap_or(client))
}

fn print_status(status: &Status, json: bool) -> Result<()> {
    if json {
        return print_json(status);
    }
    println!("scopes:");
    for scope in &status.scopes {
        println!("  {scope}");
    }
    println!("services:");
    print_services(&status.services);
    println!("rules:");
    print_rules(&status.rules);
    println!("counters:");
    for (name, value) in &status.counters {
        println!("  {name:<24} {value}");
    }
    println!("live redirected connections: {}", status.live_connections);
    Ok(())
}

fn service(action: ServiceAction, places: &lifecycle::Places) -> Result<()> {
    let dir = &places.state_dir;
    match action {
        ServiceAction::Add {
            name,
            listen,
            pid,
            cgroup,
            uid,
            context,
            inspect_own_connections,
            accelerate,
            transparent,
            on_down,
        } => {
            let service = config::ServiceConfig {
                name,
                listen,
                identity: config::IdentityConfig {
                    pids: pid,
                    cgroups: cgroup,
                    uids: uid,
                },
                context,
                own_connections_by_self: !inspect_own_connections,
                accelerate,
                transparent,
                on_down,
            };
            let created = control::client::service_add(dir, service)?;
            println!("service {} added", created.id);
        }
        ServiceAction::Del { name } => {
            control::client::service_del(dir, name.clone())?;
            println!("service {name} removed");
        }
        ServiceAction::List { json } => {
            let status = control::client::status(dir)?;
            if json {
                return print_json(&status.services);
            }
            print_services(&status.services);
        }
    }
    Ok(())
}

/// `--action`: redirect, permit or block.
fn parse_action(text: &str) -> std::result::Result<connredir_engine::Action, String> {
    match text.to_ascii_lowercase().as_str() {
        "redirect" => Ok(connredir_engine::Action::Redirect),
        "permit" => Ok(connredir_engine::Action::Permit),
        "block" => Ok(connredir_engine::Action::Block),
        _ => Err(format!("{text:?}: give redirect, permit or block")),
    }
}

fn rule(action: RuleAction, places: &lifecycle::Places) -> Result<()> {
    let dir = &places.state_dir;
    match action {
        RuleAction::Add {
            service,
            action,
            cgroup,
            unit,
            command,
            gid,
            local_port,
            after,
            executable,
            protocol,
            dst,
            port,
            uid,
            priority,
        } => {
            let rule = config::RuleConfig {
                service,
                action,
                cgroup,
                unit,
                command,
                gid,
                local_ports: local_port,
                after,
                executable,
                protocol: if protocol.is_empty() {
                    Default::default()
                } else {
                    config::parse_protocols(&protocol).map_err(anyhow::Error::msg)?
                },
                destinations: dst,
                ports: port,
                uid,
                priority,
            };
            // Refused here too, so that no running engine is needed to learn why.
            rule.check()
                .map_err(|(_, message)| anyhow::anyhow!(message))?;
            let created = control::client::rule_add(dir, rule)?;
            println!("rule {} added", created.id);
        }
        RuleAction::Del { id } => {
            control::client::rule_del(dir, id)?;
            println!("rule {id} removed");
        }
        RuleAction::List { json } => {
            let status = control::client::status(dir)?;
            if json {
                return print_json(&status.rules);
            }
            print_rules(&status.rules);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leg(protocol: &str, client: &str, client_pid: u32, hops: usize) -> Conn {
        Conn {
            age_ms: 0,
            cgroup_id: 0,
            chain: vec!["a".into(); hops],
            client: Some(client.parse().unwrap()),
            client_pid,
            client_uid: 65534,
            command: "c".into(),
            local: None,
            original_dst: Some("192.0.2.53:53".parse().unwrap()),
            pid: client_pid,
            protocol: protocol.into(),
            uid: 65534,
        }
    }

    #[test]
    fn a_udp_clients_wildcard_leg_is_one_flow_with_the_services_legs() {
        let conns = [
            leg("udp", "0.0.0.0:40000", 7, 1),
            leg("udp", "127.0.0.1:40000", 7, 2),
            // Another client on the same port number elsewhere: its own flow.
            leg("udp", "0.0.0.0:40000", 8, 1),
            // TCP keeps its address as it is.
            leg("tcp", "0.0.0.0:40000", 7, 1),
        ];
        let flow = |i: usize| flow_client(&conns[i], &conns).unwrap().to_string();
        assert_eq!(flow(0), "127.0.0.1:40000");
        assert_eq!(flow(1), "127.0.0.1:40000");
        assert_eq!(flow(2), "0.0.0.0:40000");
        assert_eq!(flow(3), "0.0.0.0:40000");
    }
}
