//! The agent's admin (15000, localhost: pods, counters, config dump, log level) and
//! metrics (15020) endpoints, on the library's admin server.
use std::sync::Arc;

use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use mesh_proxy::admin::{Body, control_dump, control_metrics, json, reply};
pub use mesh_proxy::admin::{HttpServer, Readiness, SetLogLevel, readiness};

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

/// Prometheus text: configuration version and certificate expiry.
pub fn metrics(state: &AdminState) -> Response<Body> {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Some((client, certs)) = &state.control {
        control_metrics(client, certs, &mut out);
    }
    out += "# HELP mesh_agent_kernel_events_total What the kernel programs decided, by event.\n";
    out += "# TYPE mesh_agent_kernel_events_total counter\n";
    for (event, count) in state.redirect.kernel_stats() {
        let _ = writeln!(out, "mesh_agent_kernel_events_total{{event=\"{event}\"}} {count}");
    }
    let counters = state.counters.snapshot();
    out += "# HELP mesh_agent_connections_refused_total Connections the agent refused, by reason.\n";
    out += "# TYPE mesh_agent_connections_refused_total counter\n";
    for (reason, count) in [
        ("no_view", counters.no_view),
        ("self_target", counters.self_target),
        ("connection_limit", counters.limited),
        ("plaintext_refused", counters.plaintext_refused),
        ("denied", counters.denied),
    ] {
        let _ = writeln!(out, "mesh_agent_connections_refused_total{{reason=\"{reason}\"}} {count}");
    }
    out += "# HELP mesh_agent_connections_forwarded_total Captured connections forwarded.\n";
    out += "# TYPE mesh_agent_connections_forwarded_total counter\n";
    let _ = writeln!(out, "mesh_agent_connections_forwarded_total {}", counters.forwarded);
    out += "# HELP mesh_agent_connections_tunneled_total Captured connections sent through the mTLS tunnel.\n";
    out += "# TYPE mesh_agent_connections_tunneled_total counter\n";
    let _ = writeln!(out, "mesh_agent_connections_tunneled_total {}", counters.tunneled);
    out += "# HELP mesh_agent_inbound_tls_failures_total Tunnel connections refused during the TLS handshake.\n";
    out += "# TYPE mesh_agent_inbound_tls_failures_total counter\n";
    let _ = writeln!(out, "mesh_agent_inbound_tls_failures_total {}", counters.inbound_tls_failed);
    state.metrics.render(&mut out);
    reply(StatusCode::OK, "text/plain; version=0.0.4", out)
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
            json(&serde_json::json!({ "agent": state.counters.snapshot(), "kernel": kernel, "tunnels": tunnels }))
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
