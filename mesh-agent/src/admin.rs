//! The agent's admin (15000, localhost: pods, counters, config dump, log level) and
//! metrics (15020) endpoints, on the library's admin server.
use std::sync::Arc;

use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use mesh_proxy::admin::{Body, control_dump, encode_family, json, reply};
pub use mesh_proxy::admin::{HttpServer, Readiness, SetLogLevel, readiness};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, metrics::MetricType};

use crate::{control::ControlClient, enroll::Registry, identity::CertStore, redirect::Redirect, telemetry::Counters};

pub struct AdminState {
    pub registry: Arc<Registry>,
    pub redirect: Arc<Redirect>,
    pub counters: Arc<Counters>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub mesh: Option<Arc<crate::mesh::Mesh>>,
    pub config: serde_json::Value,
    pub set_log_level: SetLogLevel,
    pub control: Option<(Arc<ControlClient>, Arc<CertStore>)>,
}

impl AdminState {
    fn control_dump(&self) -> serde_json::Value {
        match &self.control {
            Some((client, certs)) => control_dump(client, certs),
            None => serde_json::json!({ "connected": false, "note": "standalone: no --controller" }),
        }
    }
}

/// The agent's own metrics, read at scrape time: what the kernel programs decided
/// and what the agent refused or forwarded.
pub struct AgentMetrics {
    pub redirect: Arc<Redirect>,
    pub counters: Arc<Counters>,
    pub dropped_lines: DroppedLines,
}

/// Log lines dropped because the log writer fell behind.
pub use mesh_proxy::logs::DroppedLines;

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentMetrics").finish_non_exhaustive()
    }
}

impl Collector for AgentMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let kernel = self.redirect.kernel_stats();
        encode_family(
            &mut encoder,
            "mesh_agent_kernel_events",
            "What the kernel programs decided, by event.",
            MetricType::Counter,
            kernel.iter().map(|(event, count)| (vec![("event", *event)], *count as i64)),
        )?;
        let c = self.counters.snapshot();
        let refused = [
            ("no_view", c.no_view),
            ("self_target", c.self_target),
            ("connection_limit", c.limited),
            ("plaintext_refused", c.plaintext_refused),
            ("denied", c.denied),
        ];
        encode_family(
            &mut encoder,
            "mesh_agent_connections_refused",
            "Connections the agent refused, by reason.",
            MetricType::Counter,
            refused.map(|(reason, count)| (vec![("reason", reason)], count as i64)),
        )?;
        for (name, help, count) in [
            ("mesh_agent_connections_forwarded", "Captured connections forwarded.", c.forwarded),
            ("mesh_agent_connections_tunneled", "Captured connections sent through the mTLS tunnel.", c.tunneled),
            (
                "mesh_agent_connections_same_node",
                "Captured connections delivered to another pod of this node without the tunnel.",
                c.same_node,
            ),
            (
                "mesh_agent_inbound_tls_failures",
                "Tunnel connections refused during the TLS handshake.",
                c.inbound_tls_failed,
            ),
            (
                "mesh_agent_log_lines_dropped",
                "Log lines (access logs included) dropped because the writer fell behind.",
                self.dropped_lines.dropped_lines(),
            ),
        ] {
            encode_family(&mut encoder, name, help, MetricType::Counter, [(Vec::new(), count as i64)])?;
        }
        Ok(())
    }
}

/// `/metrics`: every metric of the agent, in the format the scraper accepts.
pub fn metrics(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    let accept = req.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = state.metrics.render(accept);
    reply(StatusCode::OK, content_type, body)
}

pub async fn admin(state: Arc<AdminState>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/") => reply(
            StatusCode::OK,
            "text/plain",
            "GET /pods\nGET /stats\nGET /config_dump\nPOST /logging?level=<filter>\n",
        ),
        (&Method::GET, "/pods") => json(&serde_json::json!({ "pods": state.registry.list().await })),
        (&Method::GET, "/stats") => {
            let kernel: serde_json::Map<String, serde_json::Value> =
                state.redirect.kernel_stats().into_iter().map(|(k, v)| (k.to_owned(), v.into())).collect();
            let tunnels = state.mesh.as_ref().map(|m| {
                serde_json::json!({ "pooled_connections": m.pool.connections(), "opened": m.pool.opened.load(std::sync::atomic::Ordering::Relaxed) })
            });
            let (in_use, free) = crate::control::heap_usage();
            let heap = serde_json::json!({ "in_use_bytes": in_use, "free_bytes": free });
            json(
                &serde_json::json!({ "agent": state.counters.snapshot(), "kernel": kernel, "tunnels": tunnels, "heap": heap }),
            )
        }
        (&Method::GET, "/config_dump") => json(&serde_json::json!({
            "config": state.config,
            "control": state.control_dump(),
            "pods": state.registry.list().await,
            // Kubelet probe exemptions: pod address:port pairs reachable in plaintext
            // from the node's own addresses.
            "probe_ports": state.redirect.probe_ports().iter().map(|(ip, port)| std::net::SocketAddr::new(*ip, *port)).collect::<Vec<_>>(),
        })),
        (&Method::POST, "/logging") => {
            let level = req.uri().query().and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")));
            match level {
                None => reply(StatusCode::BAD_REQUEST, "text/plain", "missing query parameter level\n"),
                Some(level) => match (state.set_log_level)(level) {
                    Ok(()) => reply(StatusCode::OK, "text/plain", format!("log level set to {level}\n")),
                    Err(error) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{error}\n")),
                },
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}
