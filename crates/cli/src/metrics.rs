//! `connredir up --metrics ADDR`: the counters in the OpenMetrics text
//! format (which Prometheus reads) at `http://ADDR/metrics`, encoded by
//! `prometheus-client` from one status of the engine per scrape.

use std::net::SocketAddr;
use std::sync::mpsc;

use anyhow::{anyhow, Context, Result};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::control::protocol::{Pending, Reply, Request, Status};
use connredir_engine::Counters;

/// The media type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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
                            tiny_http::Header::from_bytes("Content-Type", CONTENT_TYPE)
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
        Some(Reply::Status(status)) => render(status),
        _ => Err(anyhow!(
            "the engine answered a status request with something else"
        )),
    }
}

/// A label value escaped as the text format wants (`prometheus-client`
/// writes label values as given).
struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        for c in self.0.chars() {
            match c {
                '\\' => encoder.write_str("\\\\")?,
                '"' => encoder.write_str("\\\"")?,
                '\n' => encoder.write_str("\\n")?,
                c => encoder.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// One status as metrics, collected in the order the status lists them.
#[derive(Debug)]
struct StatusMetrics(Status);

impl Collector for StatusMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = &self.0;
        for (name, value) in &status.counters {
            let counter = ConstCounter::new(*value);
            let family = format!("connredir_{name}");
            // The help text is the engine's, from the one table of counters.
            let help = Counters::TABLE.iter().find(|c| c.name == name).map_or_else(
                || format!("The layer's {name} counter."),
                |c| c.help.to_owned(),
            );
            let metric = encoder.encode_descriptor(&family, &help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        let mut hits = encoder.encode_descriptor(
            "connredir_rule_hits",
            "Connections redirected by each rule.",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for rule in &status.rules {
            let id = rule.id.to_string();
            let protocol = if rule.protocol.is_empty() {
                "tcp".to_string()
            } else {
                rule.protocol.join(",")
            };
            let labels = [
                ("rule", Escaped(&id)),
                ("service", Escaped(rule.service.as_deref().unwrap_or(""))),
                ("protocol", Escaped(&protocol)),
            ];
            ConstCounter::new(rule.hits).encode(hits.encode_family(&labels)?)?;
        }
        let mut up = encoder.encode_descriptor(
            "connredir_service_up",
            "Whether something listens on the service's addresses.",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for service in &status.services {
            let labels = [("service", Escaped(&service.name))];
            ConstGauge::new(i64::from(service.up)).encode(up.encode_family(&labels)?)?;
        }
        let live = ConstGauge::new(status.live_connections);
        let metric = encoder.encode_descriptor(
            "connredir_live_connections",
            "Redirected sockets open now.",
            None,
            live.metric_type(),
        )?;
        live.encode(metric)
    }
}

/// The status (as `connredir status --json` prints it) as metrics text.
pub fn render(status: Status) -> Result<String> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatusMetrics(status)));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .context("cannot encode the metrics")?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::{RuleStatus, ServiceStatus};

    #[test]
    fn status_renders_as_openmetrics_text() {
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
                protocol: vec!["udp".into()],
                action: "redirect".into(),
                conditions: vec![],
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
        let text = render(status).unwrap();
        assert!(text.contains("connredir_redirects_total 3\n"), "{text}");
        assert!(text.contains("# HELP connredir_redirects Connections redirected to a service.\n"));
        assert!(
            text.contains("# TYPE connredir_loops_prevented counter\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "# HELP connredir_rule_hits Connections redirected by each rule.\n\
             # TYPE connredir_rule_hits counter\n\
             connredir_rule_hits_total{rule=\"1\",service=\"scan\\\"ner\",protocol=\"udp\"} 3\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "# TYPE connredir_service_up gauge\nconnredir_service_up{service=\"scanner\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "# HELP connredir_live_connections Redirected sockets open now.\n\
             # TYPE connredir_live_connections gauge\n\
             connredir_live_connections 2\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
