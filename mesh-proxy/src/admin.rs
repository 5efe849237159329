//! What the admin (15000, localhost) and readiness (15021, `/healthz/ready`)
//! endpoints of every proxy share: readiness guards, a small HTTP/1 server, the
//! control-plane dump and metrics.
use std::{
    collections::BTreeSet,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, MetricEncoder},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use crate::{control::ControlClient, identity::CertStore};

pub type Body = Full<Bytes>;

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

/// The control-plane part of `/config_dump`: the view in force, its age, the
/// certificates (chains only, never keys).
pub fn control_dump(client: &ControlClient, certs: &CertStore) -> serde_json::Value {
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
        // controller since this proxy started.
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

/// Metrics of the control plane as this proxy sees it, read at scrape time:
/// configuration version and sync state, certificate expiry and renewal failures.
pub struct ControlMetrics {
    pub client: Arc<ControlClient>,
    pub certs: Arc<CertStore>,
}

impl std::fmt::Debug for ControlMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlMetrics").finish_non_exhaustive()
    }
}

/// Writes one gauge or counter family with its samples (label pairs and value).
pub fn encode_family<'l>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    samples: impl IntoIterator<Item = (Vec<(&'l str, &'l str)>, i64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
    let mut samples = samples.into_iter().peekable();
    if let Some((labels, _)) = samples.peek()
        && labels.is_empty()
    {
        // One sample without labels: `name value`, not `name{} value`.
        let (_, value) = samples.next().expect("peeked");
        return encode_value(metric_type, value, family);
    }
    for (labels, value) in samples {
        let labels: Vec<(&str, String)> =
            labels.into_iter().map(|(key, value)| (key, crate::metrics::escape(value).into_owned())).collect();
        encode_value(metric_type, value, family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn encode_value(metric_type: MetricType, value: i64, sample: MetricEncoder<'_>) -> std::fmt::Result {
    if matches!(metric_type, MetricType::Counter) {
        ConstCounter::new(value.max(0) as u64).encode(sample)
    } else {
        ConstGauge::new(value).encode(sample)
    }
}

impl Collector for ControlMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let current = self.client.current();
        let (connected, stale_seconds) = self.client.staleness();
        let gauges: [(&str, &str, i64); 5] = [
            ("mesh_agent_config_version", "Version of the configuration the agent runs.", current.version as i64),
            (
                "mesh_agent_config_connected",
                "Whether the configuration stream to the controller is open.",
                i64::from(connected),
            ),
            (
                "mesh_agent_config_restored",
                "Whether the view in force was restored from the state directory.",
                i64::from(current.restored),
            ),
            (
                "mesh_agent_config_received_timestamp_seconds",
                "When the controller sent the view in force.",
                current.received_at,
            ),
            (
                "mesh_agent_config_stale_seconds",
                "Seconds since the controller was last heard from (0 while connected).",
                stale_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            encode_family(&mut encoder, name, help, MetricType::Gauge, [(Vec::new(), value)])?;
        }
        let certificates = self.certs.status();
        encode_family(
            &mut encoder,
            "mesh_agent_certificate_expiry_timestamp_seconds",
            "When each workload certificate expires.",
            MetricType::Gauge,
            certificates
                .iter()
                .filter_map(|(identity, status)| Some((vec![("identity", identity.as_str())], status.not_after?))),
        )?;
        encode_family(
            &mut encoder,
            "mesh_agent_certificate_renewal_failures",
            "Failed certificate requests.",
            MetricType::Counter,
            certificates
                .iter()
                .map(|(identity, status)| (vec![("identity", identity.as_str())], status.failures as i64)),
        )
    }
}

/// A tiny HTTP/1 server; `handler` maps a request to a response.
pub struct HttpServer {
    listener: TcpListener,
    name: &'static str,
    /// A second descriptor of the listening socket, for a handover.
    pub socket: std::os::fd::OwnedFd,
    stop: tokio::sync::watch::Receiver<bool>,
}

impl HttpServer {
    /// Listens on `addr`, or on `inherited` (the socket of the process this one took
    /// over from); stops accepting once `stop` turns true.
    pub fn bind(
        name: &'static str,
        addr: SocketAddr,
        inherited: Option<std::net::TcpListener>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<Self> {
        let listener = if let Some(listener) = inherited {
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
        Ok(Self { listener: TcpListener::from_std(listener)?, name, socket: copy.into(), stop })
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

pub fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

pub fn json(value: &serde_json::Value) -> Response<Body> {
    let mut body = serde_json::to_vec_pretty(value).expect("json values serialize");
    body.push(b'\n');
    reply(StatusCode::OK, "application/json", body)
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
