//! Admin (15000, localhost: pods, counters, config dump, log level) and readiness
//! (15021, `/healthz/ready`) endpoints.
use std::{
    collections::BTreeSet,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{control::ControlClient, enroll::Registry, identity::CertStore, redirect::Redirect, telemetry::Counters};

type Body = Full<Bytes>;

/// Components that have not yet reported ready. Each holds a [`ReadyGuard`]; the agent
/// is ready once every guard has been dropped.
#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<BTreeSet<&'static str>>>);

pub struct ReadyGuard(Readiness, &'static str);

impl Readiness {
    pub fn register(&self, component: &'static str) -> ReadyGuard {
        self.0.lock().expect("readiness lock").insert(component);
        ReadyGuard(self.clone(), component)
    }

    pub fn pending(&self) -> Vec<&'static str> {
        self.0.lock().expect("readiness lock").iter().copied().collect()
    }
}

impl Drop for ReadyGuard {
    fn drop(&mut self) {
        (self.0).0.lock().expect("readiness lock").remove(self.1);
    }
}

/// Changes the log filter at run time (`POST /logging?level=debug`).
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

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
        let Some((client, certs)) = &self.control else {
            return serde_json::json!({ "connected": false, "note": "standalone: no --controller" });
        };
        let state = client.current();
        let certificates = certs.status();
        // Like `istioctl proxy-config secret`: the chains in use (never the keys).
        let chains: std::collections::BTreeMap<&String, Vec<String>> =
            certificates.keys().filter_map(|id| certs.get(id).map(|c| (id, c.chain_pem.clone()))).collect();
        let (connected, stale_seconds) = client.staleness();
        serde_json::json!({
            "version": state.version,
            "connected": connected,
            // The view came from the state directory (an earlier run), not from the
            // controller since this agent started.
            "restored": state.restored,
            "received_at": state.received_at,
            "age_seconds": if state.received_at > 0 { crate::state::unix_now() - state.received_at } else { 0 },
            "stale_seconds": stale_seconds,
            "objects": state.kinds.values().sum::<usize>(),
            "kinds": state.kinds,
            "certificates": certificates,
            "chains": chains,
        })
    }
}

/// Prometheus text: configuration version and certificate expiry.
pub fn metrics(state: &AdminState) -> Response<Body> {
    use std::fmt::Write as _;
    let mut out = String::new();
    if let Some((client, certs)) = &state.control {
        out += "# HELP mesh_agent_config_version Version of the configuration the agent runs.\n";
        out += "# TYPE mesh_agent_config_version gauge\n";
        let current = client.current();
        let _ = writeln!(out, "mesh_agent_config_version {}", current.version);
        let (connected, stale_seconds) = client.staleness();
        out += "# HELP mesh_agent_config_connected Whether the configuration stream to the controller is open.\n";
        out += "# TYPE mesh_agent_config_connected gauge\n";
        let _ = writeln!(out, "mesh_agent_config_connected {}", u8::from(connected));
        out += "# HELP mesh_agent_config_restored Whether the view in force was restored from the state directory.\n";
        out += "# TYPE mesh_agent_config_restored gauge\n";
        let _ = writeln!(out, "mesh_agent_config_restored {}", u8::from(current.restored));
        out += "# HELP mesh_agent_config_received_timestamp_seconds When the controller sent the view in force.\n";
        out += "# TYPE mesh_agent_config_received_timestamp_seconds gauge\n";
        let _ = writeln!(out, "mesh_agent_config_received_timestamp_seconds {}", current.received_at);
        out += "# HELP mesh_agent_config_stale_seconds Seconds since the controller was last heard from (0 while connected).\n";
        out += "# TYPE mesh_agent_config_stale_seconds gauge\n";
        let _ = writeln!(out, "mesh_agent_config_stale_seconds {stale_seconds}");
        out += "# HELP mesh_agent_certificate_expiry_timestamp_seconds When each workload certificate expires.\n";
        out += "# TYPE mesh_agent_certificate_expiry_timestamp_seconds gauge\n";
        let certificates = certs.status();
        for (identity, status) in &certificates {
            if let Some(not_after) = status.not_after {
                let _ = writeln!(
                    out,
                    "mesh_agent_certificate_expiry_timestamp_seconds{{identity=\"{identity}\"}} {not_after}"
                );
            }
        }
        out += "# HELP mesh_agent_certificate_renewal_failures_total Failed certificate requests.\n";
        out += "# TYPE mesh_agent_certificate_renewal_failures_total counter\n";
        for (identity, status) in &certificates {
            let _ = writeln!(
                out,
                "mesh_agent_certificate_renewal_failures_total{{identity=\"{identity}\"}} {}",
                status.failures
            );
        }
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

/// A tiny HTTP/1 server; `handler` maps a request to a response.
pub struct HttpServer {
    listener: TcpListener,
    name: &'static str,
    /// A second descriptor of the listening socket, for a handover.
    pub socket: (crate::handover::ListenerId, std::os::fd::OwnedFd),
    stop: tokio::sync::watch::Receiver<bool>,
}

impl HttpServer {
    /// Listens on `addr`, on the socket inherited from the agent this one took over
    /// from when there is one; stops accepting once `stop` turns true.
    pub fn bind(
        name: &'static str,
        addr: SocketAddr,
        inherited: &crate::handover::Inherited,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<Self> {
        // A successor in another network namespace (a new pod beside the old one)
        // listens in its own: the old pod's sockets are not where it is reached.
        let same_netns = |listener: &std::net::TcpListener| {
            let probe = std::net::UdpSocket::bind(("127.0.0.1", 0));
            probe
                .is_ok_and(|probe| crate::netns::netns_cookie(&probe).ok() == crate::netns::netns_cookie(listener).ok())
        };
        let listener = if let Some(listener) = inherited.take("", name, addr).filter(same_netns) {
            listener
        } else {
            let socket = socket2::Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            socket.into()
        };
        listener.set_nonblocking(true)?;
        let copy = listener.try_clone()?;
        let id = crate::handover::ListenerId { owner: String::new(), kind: name.to_owned(), addr };
        Ok(Self { listener: TcpListener::from_std(listener)?, name, socket: (id, copy.into()), stop })
    }

    pub async fn run<F, Fut>(mut self, handler: F)
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        loop {
            let accepted = tokio::select! {
                _ = self.stop.wait_for(|stop| *stop) => return,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(server = self.name, %error, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let handler = handler.clone();
            let name = self.name;
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                if let Err(error) =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
                {
                    debug!(server = name, %peer, %error, "http connection error");
                }
            });
        }
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn json(value: &serde_json::Value) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).expect("json values serialize");
    body.push(b'\n');
    reply(StatusCode::OK, "application/json", body)
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

pub fn readiness(ready: &Readiness, req: &Request<Incoming>) -> Response<Body> {
    if req.uri().path() != "/healthz/ready" {
        return reply(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    }
    let pending = ready.pending();
    if pending.is_empty() {
        reply(StatusCode::OK, "text/plain", "ready\n")
    } else {
        reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {}\n", pending.join(", ")))
    }
}
