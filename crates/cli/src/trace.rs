//! `connredir trace`: the live stream of redirect decisions.
//!
//! The running `up` owns the kernel's ring buffer (one reader). A hub thread
//! turns the stream on while at least one `trace` is connected, reads it,
//! and hands each decision to every connected `trace` (the control socket
//! writes them as [`TraceMessage`] lines); the `trace` command filters and
//! prints them.

use std::io::Write;
use std::net::IpAddr;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use connredir::RedirectState;
use connredir_engine::{boot_time, TraceEvent, Tracer};
use tracing::warn;

use crate::control::protocol::{Decision, TraceLine, TraceMessage, TraceState};
use crate::process::process_name;

/// One decision of the engine as it travels to `trace`; the service's name
/// is filled in by the hub.
fn trace_line(event: &TraceEvent, boot_offset: Duration) -> TraceLine {
    let wall = SystemTime::UNIX_EPOCH + boot_offset + event.time;
    TraceLine {
        time: humantime::format_rfc3339_millis(wall).to_string(),
        pid: event.pid,
        uid: event.uid,
        command: process_name(event.pid).unwrap_or_else(|| event.command.clone()),
        cgroup_id: event.cgroup_id,
        destination: event.destination,
        rule: event.rule,
        service_id: event.service.map(|s| s.0),
        service: None,
        hops: event.hops,
        state: match event.state {
            RedirectState::NotRedirected => TraceState::NotRedirected,
            RedirectState::RedirectedBySelf => TraceState::RedirectedBySelf,
            RedirectState::RedirectedByOther => TraceState::RedirectedByOther,
            RedirectState::PreviouslyRedirectedBySelf => TraceState::PreviouslyRedirectedBySelf,
        },
        decision: event.decision,
        protocol: event.protocol.names().join(","),
        rule_text: None,
    }
}

/// The `up` side: a handle to ask the hub for a stream.
#[derive(Clone)]
pub struct Hub {
    subscribe: mpsc::Sender<mpsc::SyncSender<TraceMessage>>,
}

/// Per-connection queue length: a `trace` that falls this far behind loses
/// decisions instead of holding up the others.
const BACKLOG: usize = 4096;

impl Hub {
    /// Starts the hub thread around the engine's tracer. `names` gives a
    /// service's name from its id, `rules` a rule's action and conditions
    /// from its id; both must be cheap, as they are asked for every
    /// decision.
    pub fn start(
        mut tracer: Tracer,
        names: impl Fn(u32) -> Option<String> + Send + 'static,
        rules: impl Fn(u32) -> Option<String> + Send + 'static,
    ) -> Hub {
        let (subscribe, subscriptions) = mpsc::channel::<mpsc::SyncSender<TraceMessage>>();
        std::thread::spawn(move || {
            let mut subscribers: Vec<mpsc::SyncSender<TraceMessage>> = Vec::new();
            loop {
                if subscribers.is_empty() {
                    let _ = tracer.set_enabled(false);
                    match subscriptions.recv() {
                        Ok(s) => subscribers.push(s),
                        Err(_) => return,
                    }
                    if let Err(e) = tracer.set_enabled(true) {
                        warn!(error = %e, "cannot turn the trace on");
                    }
                }
                subscribers.extend(subscriptions.try_iter());
                let offset = wall_minus_boot();
                let events = tracer.poll(Duration::from_millis(200));
                for event in &events {
                    let mut line = trace_line(event, offset);
                    line.service = line.service_id.and_then(&names);
                    line.rule_text = line.rule.and_then(&rules);
                    let message = TraceMessage::Decision(line);
                    send(&mut subscribers, &message);
                }
                if events.is_empty() {
                    // Let subscribers that went away notice.
                    send(&mut subscribers, &TraceMessage::Heartbeat);
                }
            }
        });
        Hub { subscribe }
    }

    /// A new stream of decisions, for one `trace` client; it ends when the
    /// receiver is dropped.
    pub fn subscribe(&self) -> Result<mpsc::Receiver<TraceMessage>> {
        let (tx, rx) = mpsc::sync_channel(BACKLOG);
        self.subscribe.send(tx).context("the trace hub stopped")?;
        Ok(rx)
    }
}

/// Hands `message` to every subscriber, and forgets those that went away.
fn send(subscribers: &mut Vec<mpsc::SyncSender<TraceMessage>>, message: &TraceMessage) {
    subscribers.retain(|s| {
        !matches!(
            s.try_send(message.clone()),
            Err(mpsc::TrySendError::Disconnected(_))
        )
    });
}

/// Wall-clock time minus boot time: turns the kernel's timestamps into
/// dates.
fn wall_minus_boot() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(boot_time())
}

/// Which decisions `connredir trace` prints.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Filter {
    /// Only this process id.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Only this command name (as in /proc/PID/comm, at most 15 characters).
    #[arg(long)]
    pub command: Option<String>,
    /// Only destinations in this prefix (for example 10.0.0.0/8).
    #[arg(long)]
    pub dst: Option<ipnet::IpNet>,
    /// Only this destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only decisions about this service (by name).
    #[arg(long)]
    pub service: Option<String>,
    /// Only this decision: redirected, no-rule, loop-prevented, hop-limit,
    /// no-memory, service-down, service-down-bypassed, permitted, blocked.
    #[arg(long, value_parser = parse_decision)]
    pub decision: Option<Decision>,
}

fn parse_decision(text: &str) -> Result<Decision, String> {
    Decision::ALL
        .into_iter()
        .find(|d| d.name() == text)
        .ok_or_else(|| {
            format!(
                "unknown decision; use one of: {}",
                Decision::ALL.map(|d| d.name()).join(", ")
            )
        })
}

impl Filter {
    /// Does `line` pass?
    pub fn accepts(&self, line: &TraceLine) -> bool {
        let ip: IpAddr = line.destination.ip();
        self.pid.is_none_or(|p| p == line.pid)
            && self.command.as_ref().is_none_or(|c| *c == line.command)
            && self.dst.is_none_or(|net| net.contains(&ip))
            && self.port.is_none_or(|p| p == line.destination.port())
            && self
                .service
                .as_ref()
                .is_none_or(|s| line.service.as_ref() == Some(s))
            && self.decision.is_none_or(|d| d == line.decision)
    }
}

/// `connredir trace`: prints the decisions of `lines` (from
/// `control::client::trace`) that pass `filter`, until the stream ends or
/// `limit` are shown.
pub fn show(
    lines: impl Iterator<Item = Result<TraceLine>>,
    filter: &Filter,
    json: bool,
    limit: Option<usize>,
) -> Result<()> {
    if !json {
        println!(
            "{:<24} {:>7} {:<15} {:<5} {:<28} {:<15} {:<5} {:<28} DECISION",
            "TIME", "PID", "COMMAND", "PROTO", "DESTINATION", "SERVICE", "RULE", "STATE"
        );
    }
    let mut shown = 0;
    for line in lines {
        let line = line?;
        if !filter.accepts(&line) {
            continue;
        }
        if json {
            println!("{}", serde_json::to_string(&line)?);
        } else {
            println!(
                "{:<24} {:>7} {:<15} {:<5} {:<28} {:<15} {:<5} {:<28} {}",
                line.time,
                line.pid,
                line.command,
                line.protocol,
                line.destination,
                line.service
                    .clone()
                    .or(line.service_id.map(|id| format!("#{id}")))
                    .unwrap_or_else(|| "-".into()),
                line.rule.map_or("-".into(), |r| r.to_string()),
                line.state.name(),
                match &line.rule_text {
                    Some(text) => format!("{}  [{text}]", line.decision.name()),
                    None => line.decision.name().to_string(),
                }
            );
        }
        std::io::stdout().flush()?;
        shown += 1;
        if limit.is_some_and(|n| shown >= n) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use connredir_engine as engine;

    #[test]
    fn trace_decision_takes_every_name_and_lists_them_for_an_unknown_one() {
        for d in Decision::ALL {
            assert_eq!(parse_decision(d.name()), Ok(d));
        }
        let refused = parse_decision("redirect").unwrap_err();
        assert!(
            refused.contains("service-down-bypassed, permitted, blocked"),
            "{refused}"
        );
    }

    #[test]
    fn states_are_named_as_before() {
        // `trace` has always printed the library's Debug names.
        for s in [
            RedirectState::NotRedirected,
            RedirectState::RedirectedBySelf,
            RedirectState::RedirectedByOther,
            RedirectState::PreviouslyRedirectedBySelf,
        ] {
            let event = TraceEvent {
                time: Duration::ZERO,
                pid: 0,
                uid: 0,
                command: String::new(),
                cgroup_id: 0,
                destination: "127.0.0.1:1".parse().unwrap(),
                rule: None,
                service: None,
                hops: 0,
                state: s,
                decision: engine::Decision::NoRule,
                protocol: engine::Protocol::Udp,
            };
            let line = trace_line(&event, Duration::ZERO);
            assert_eq!(line.state.name(), format!("{s:?}"));
            assert_eq!(line.protocol, "udp");
        }
    }
}
