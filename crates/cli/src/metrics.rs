//! `connredir up --metrics ADDR`: the counters in the Prometheus text format
//! (version 0.0.4) at `http://ADDR/metrics`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::mpsc;

use anyhow::{anyhow, Result};
use tracing::{info, warn};

use crate::control::protocol::{Pending, Reply, Request, Status};

/// The metrics endpoint, listening but not answering yet.
pub struct Endpoint {
    server: tiny_http::Server,
    addr: SocketAddr,
}

impl Endpoint {
    /// Listens on `addr`; fails (before anything is attached) when the
    /// address is taken.
    pub fn bind(addr: SocketAddr) -> Result<Endpoint> {
        let server = tiny_http::Server::http(addr).map_err(|e| {
            anyhow!("--metrics {addr}: cannot listen there: {e} (pick a free address and port)")
        })?;
        Ok(Endpoint { server, addr })
    }

    /// Serves the metrics, asking the engine for each scrape.
    pub fn serve(self, engine_queue: mpsc::Sender<Pending>) {
        let Endpoint { server, addr } = self;
        info!(%addr, "metrics at http://{addr}/metrics");
        std::thread::spawn(move || {
            for request in server.incoming_requests() {
                let response = if request.url() == "/metrics" {
                    match scrape(&engine_queue) {
                        Ok(text) => tiny_http::Response::from_string(text).with_header(
                            "Content-Type: text/plain; version=0.0.4"
                                .parse::<tiny_http::Header>()
                                .expect("a valid header"),
                        ),
                        Err(e) => {
                            warn!(error = %e, "metrics scrape failed");
                            tiny_http::Response::from_string(format!("{e:#}\n"))
                                .with_status_code(500)
                        }
                    }
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                let _ = request.respond(response);
            }
        });
    }
}

fn scrape(engine_queue: &mpsc::Sender<Pending>) -> Result<String> {
    let (reply, answer) = mpsc::channel();
    engine_queue.send((Request::Status, reply))?;
    let response = answer.recv()?;
    if let Some(error) = response.error {
        return Err(anyhow!(error));
    }
    match response.data {
        Some(Reply::Status(status)) => Ok(render(&status)),
        _ => Err(anyhow!(
            "the engine answered a status request with something else"
        )),
    }
}

/// Label values escaped as the text format wants.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The status (as `connredir status --json` prints it) as metrics.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    for (name, value) in &status.counters {
        let metric = format!("connredir_{name}_total");
        let _ = writeln!(out, "# HELP {metric} The layer's {name} counter.");
        let _ = writeln!(out, "# TYPE {metric} counter");
        let _ = writeln!(out, "{metric} {value}");
    }
    let _ = writeln!(
        out,
        "# HELP connredir_rule_hits_total Connections redirected by each rule.\n\
         # TYPE connredir_rule_hits_total counter"
    );
    for rule in &status.rules {
        let _ = writeln!(
            out,
            "connredir_rule_hits_total{{rule=\"{}\",service=\"{}\"}} {}",
            rule.id,
            label(rule.service.as_deref().unwrap_or("")),
            rule.hits
        );
    }
    let _ = writeln!(
        out,
        "# HELP connredir_service_up Whether something listens on the service's addresses.\n\
         # TYPE connredir_service_up gauge"
    );
    for service in &status.services {
        let _ = writeln!(
            out,
            "connredir_service_up{{service=\"{}\"}} {}",
            label(&service.name),
            u8::from(service.up)
        );
    }
    let _ = writeln!(
        out,
        "# HELP connredir_live_connections Redirected sockets open now.\n\
         # TYPE connredir_live_connections gauge\n\
         connredir_live_connections {}",
        status.live_connections
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{RuleStatus, ServiceStatus};

    #[test]
    fn status_renders_as_prometheus_text() {
        let status = Status {
            counters: [
                ("redirects".to_string(), 3),
                ("loops_prevented".to_string(), 1),
            ]
            .into(),
            rules: vec![RuleStatus {
                destinations: vec![],
                hits: 3,
                id: 1,
                ports: vec![],
                priority: 0,
                service: Some("scan\"ner".into()),
                uid: None,
            }],
            services: vec![ServiceStatus {
                id: 1,
                listen: vec![],
                name: "scanner".into(),
                on_down: Default::default(),
                up: true,
            }],
            live_connections: 2,
            scopes: vec![],
        };
        let text = render(&status);
        assert!(text.contains("connredir_redirects_total 3\n"), "{text}");
        assert!(text.contains("# TYPE connredir_loops_prevented_total counter\n"));
        assert!(text.contains("connredir_rule_hits_total{rule=\"1\",service=\"scan\\\"ner\"} 3\n"));
        assert!(text.contains("connredir_service_up{service=\"scanner\"} 1\n"));
        assert!(text.contains("connredir_live_connections 2\n"));
    }
}
