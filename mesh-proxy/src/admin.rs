//! What the admin (15000, localhost) and readiness (15021, `/healthz/ready`)
//! endpoints of every proxy share: readiness guards, a small HTTP/1 server, the
//! control-plane dump and metrics.
use std::{
    collections::BTreeSet,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
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
///
/// Readiness and metrics listen on every address of the pod, so any peer can open
/// connections to them: at most [`MAX_ADMIN_CONNECTIONS`] are served at once (more
/// are closed at once), and one that sends no request head within
/// [`ADMIN_HEADER_TIMEOUT`] (also between requests: hyper re-arms the timer when a
/// connection goes idle) is closed. A peer cannot hold the proxy's descriptors.
pub struct HttpServer {
    listener: TcpListener,
    name: &'static str,
    /// A second descriptor of the listening socket, for a handover.
    pub socket: std::os::fd::OwnedFd,
    stop: tokio::sync::watch::Receiver<bool>,
    slots: Arc<tokio::sync::Semaphore>,
    header_timeout: Duration,
}

/// Connections an admin, readiness or metrics server serves at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 64;
/// How long such a connection may take to send a request head, or sit idle.
pub const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

impl HttpServer {
    /// Listens on `addr` (`[::]`: both families, see [`crate::socket::listen`]), or
    /// on `inherited` (the socket of the process this one took over from); stops
    /// accepting once `stop` turns true.
    pub fn bind(
        name: &'static str,
        addr: SocketAddr,
        inherited: Option<std::net::TcpListener>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> std::io::Result<Self> {
        let listener = match inherited {
            Some(listener) => listener,
            None => crate::socket::listen(addr, false)?,
        };
        listener.set_nonblocking(true)?;
        let copy = listener.try_clone()?;
        Ok(Self {
            listener: TcpListener::from_std(listener)?,
            name,
            socket: copy.into(),
            stop,
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS)),
            header_timeout: ADMIN_HEADER_TIMEOUT,
        })
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
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                debug!(server = self.name, %peer, "too many connections; closing this one");
                continue;
            };
            let handler = handler.clone();
            let name = self.name;
            let header_timeout = self.header_timeout;
            tokio::spawn(async move {
                let _slot = slot;
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(stream), service)
                    .await
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

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
    };

    use super::*;

    /// Reads until the server closes (0 bytes or an error) or `within` passes.
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 256];
        loop {
            match tokio::time::timeout(within, stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }

    #[tokio::test]
    async fn silent_and_surplus_connections_are_closed_and_requests_still_served() {
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let mut server = HttpServer::bind("test", "127.0.0.1:0".parse().unwrap(), None, stop).unwrap();
        server.header_timeout = Duration::from_millis(300);
        let addr = server.listener.local_addr().unwrap();
        tokio::spawn(server.run(|_req| async { reply(StatusCode::OK, "text/plain", "ok\n") }));
        let mut silent = Vec::new();
        for _ in 0..MAX_ADMIN_CONNECTIONS {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        // Let the server take them all before the one over the limit.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut surplus = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut surplus, Duration::from_millis(200)).await, "the surplus connection was served");
        for stream in &mut silent {
            assert!(closed_within(stream, Duration::from_secs(2)).await, "a silent connection was kept");
        }
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut answer = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), client.read(&mut answer)).await.unwrap().unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&answer[..n]));
    }
}
