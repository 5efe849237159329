//! The client of the `ext_authz` authorizers that `CUSTOM` policies name
//! (`WaypointVerdict::Custom { provider, .. }`): one [`ExtAuthzClient::check`] per
//! request, over HTTP/1.1 (`envoyExtAuthzHttp`) or gRPC on HTTP/2 cleartext
//! (`envoyExtAuthzGrpc`), with connections pooled per authorizer address. What the
//! check carries and what the answer means is pure logic in [`mesh_waypoint::custom`];
//! this module does the I/O and turns every failure (unresolved service, connect
//! error, timeout, malformed answer) into the provider's `failOpen` / `statusOnError`
//! decision, as Envoy does.
//!
//! The authorizer is reached like any upstream of the waypoint ([`Endpoint`]): a
//! meshed authorizer pod through HBONE to its agent, with the waypoint's identity and
//! expecting the pod's (so its L4 policies see the waypoint, and the check travels in
//! mTLS); one outside the mesh over plain TCP.
use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_common::config::mesh::ExtAuthz;
use mesh_proxy::{telemetry::error_chain, workloads::Workload};
use mesh_waypoint::custom::{self, AnswerError, ConfigError};
pub use mesh_waypoint::custom::{CheckRequest, Decision};
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tracing::debug;

use crate::upstream::{Dial, Io, Target, UpstreamError, Upstreams};

/// Idle HTTP/1.1 connections kept per authorizer address.
const MAX_IDLE_PER_AUTHORIZER: usize = 32;
/// The largest answer body read (a deny page or a gRPC message); more is an error.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// How checks ended: every check counts once in `ok`, `denied` or `error`;
/// `failed_open` counts the errors that allowed anyway (Envoy's `ext_authz.ok`,
/// `.denied`, `.error`, `.failure_mode_allowed`).
#[derive(Debug, Default)]
pub struct ExtAuthzCounters {
    pub ok: Counter,
    pub denied: Counter,
    pub error: Counter,
    pub failed_open: Counter,
}

impl ExtAuthzCounters {
    /// Registers the counters as `mesh_waypoint_ext_authz_{ok,denied,error,failure_mode_allowed}_total`.
    pub fn register(&self, metrics: &mesh_proxy::metrics::Metrics) {
        metrics.register("mesh_waypoint_ext_authz_ok", "External authorization checks that allowed", self.ok.clone());
        metrics.register(
            "mesh_waypoint_ext_authz_denied",
            "External authorization checks that denied",
            self.denied.clone(),
        );
        metrics.register(
            "mesh_waypoint_ext_authz_error",
            "External authorization checks without a usable answer",
            self.error.clone(),
        );
        metrics.register(
            "mesh_waypoint_ext_authz_failure_mode_allowed",
            "Failed external authorization checks allowed by failOpen",
            self.failed_open.clone(),
        );
    }
}

/// Why a check got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("provider service `{service}` port {port} does not resolve to an address")]
    Unresolved { service: String, port: u32 },
    #[error("cannot build the check request")]
    Config {
        #[source]
        source: ConfigError,
    },
    #[error("cannot connect to the authorizer at {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot reach the meshed authorizer at {addr}")]
    Mesh {
        addr: SocketAddr,
        #[source]
        source: UpstreamError,
    },
    #[error("HTTP handshake with the authorizer at {addr} failed")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("the check to {addr} failed")]
    Exchange {
        addr: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("the authorizer at {addr} did not answer within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("the gRPC authorizer at {addr} answered HTTP status {status}")]
    GrpcHttpStatus { addr: SocketAddr, status: StatusCode },
    #[error("the gRPC authorizer at {addr} answered grpc-status {code}: {message}")]
    GrpcStatus { addr: SocketAddr, code: String, message: String },
    #[error("the authorizer at {addr} sent an unusable answer")]
    Answer {
        addr: SocketAddr,
        #[source]
        source: AnswerError,
    },
}

type CheckBody = Full<Bytes>;

/// One endpoint of the authorizer's service, and how to reach it.
pub enum Endpoint<'a> {
    /// Outside the mesh: plain TCP.
    Plain(SocketAddr),
    /// A meshed pod: HBONE through its agent, as the waypoint reaches any meshed
    /// upstream ([`Upstreams::connect`]: the tunnel pool, the waypoint's certificate,
    /// the pod's expected identity). `dial` is the checked request's, so the tunnel's
    /// `forwarded` header names that request's client.
    Mesh { workload: Arc<Workload>, addr: SocketAddr, upstreams: &'a Upstreams, dial: Dial<'a> },
}

impl Endpoint<'_> {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Self::Plain(addr) | Self::Mesh { addr, .. } => *addr,
        }
    }

    /// A byte stream to the endpoint.
    async fn connect(&self) -> Result<Box<dyn Io>, CheckError> {
        match self {
            Self::Plain(addr) => {
                let addr = *addr;
                let tcp = TcpStream::connect(addr).await.map_err(|source| CheckError::Connect { addr, source })?;
                let _ = tcp.set_nodelay(true);
                Ok(Box::new(tcp))
            }
            Self::Mesh { workload, addr, upstreams, dial } => {
                let target = Target { workload: workload.clone(), addr: *addr };
                upstreams.connect(&target, dial).await.map_err(|source| CheckError::Mesh { addr: *addr, source })
            }
        }
    }

    /// Pooled connections are kept apart by the way they were made, so that an
    /// endpoint joining or leaving the mesh never reuses the other kind.
    fn pool_key(&self) -> PoolKey {
        (self.addr(), matches!(self, Self::Mesh { .. }))
    }
}

/// An authorizer endpoint's address, and whether it is reached through the mesh.
type PoolKey = (SocketAddr, bool);

/// Shared by every request of the waypoint: pooled connections per authorizer address
/// and the outcome counters.
#[derive(Default)]
pub struct ExtAuthzClient {
    http1: Mutex<HashMap<PoolKey, Vec<http1::SendRequest<CheckBody>>>>,
    http2: Mutex<HashMap<PoolKey, http2::SendRequest<CheckBody>>>,
    counters: Arc<ExtAuthzCounters>,
}

impl ExtAuthzClient {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn counters(&self) -> &Arc<ExtAuthzCounters> {
        &self.counters
    }

    /// Asks `provider` about `req` and returns what to do with the request. Never
    /// fails: a check without a usable answer becomes the provider's `failOpen` /
    /// `statusOnError` decision (counted, and returned with why, for the access log). `resolve` maps
    /// the provider's `service` as written (Istio's `[<namespace>/]<hostname>`, see
    /// [`custom::service_host`]) and port to one of the authorizer's endpoints.
    pub async fn check<'a>(
        &self,
        provider: ExtAuthz<'_>,
        resolve: impl Fn(&str, u16) -> Option<Endpoint<'a>>,
        req: &CheckRequest<'_>,
    ) -> (Decision, Option<String>) {
        let (fail_open, status_on_error) = match provider {
            ExtAuthz::Http(p) => (p.fail_open, p.status_on_error()),
            ExtAuthz::Grpc(p) => (p.fail_open, p.status_on_error()),
        };
        match self.try_check(provider, resolve, req).await {
            Ok(decision) => {
                let counter = if decision.is_allow() { &self.counters.ok } else { &self.counters.denied };
                counter.inc();
                (decision, None)
            }
            Err(error) => {
                let error = error_chain(&error);
                debug!(%error, fail_open, "ext_authz check failed");
                self.counters.error.inc();
                if fail_open {
                    self.counters.failed_open.inc();
                }
                (custom::on_failure(fail_open, status_on_error), Some(error))
            }
        }
    }

    /// [`Self::check`] without the failure policy or counting: the authorizer's own
    /// decision, or why there is none.
    pub async fn try_check<'a>(
        &self,
        provider: ExtAuthz<'_>,
        resolve: impl Fn(&str, u16) -> Option<Endpoint<'a>>,
        req: &CheckRequest<'_>,
    ) -> Result<Decision, CheckError> {
        let (service, port, timeout) = match provider {
            ExtAuthz::Http(p) => (p.service.as_str(), p.port, p.timeout()),
            ExtAuthz::Grpc(p) => (p.service.as_str(), p.port, p.timeout()),
        };
        let endpoint = u16::try_from(port)
            .ok()
            .and_then(|p| resolve(service, p))
            .ok_or_else(|| CheckError::Unresolved { service: service.to_string(), port })?;
        let addr = endpoint.addr();
        let endpoint = &endpoint;
        let exchange = async {
            match provider {
                ExtAuthz::Http(p) => {
                    let check = custom::http_check(p, req).map_err(|source| CheckError::Config { source })?;
                    let (parts, ()) = check.into_parts();
                    let response = self.send_h1(endpoint, Request::from_parts(parts, Full::new(Bytes::new()))).await?;
                    let (parts, body) = response.into_parts();
                    let body = read_body(addr, body).await?.to_bytes();
                    custom::http_decision(p, parts.status, &parts.headers, body)
                        .map_err(|source| CheckError::Answer { addr, source })
                }
                ExtAuthz::Grpc(_) => {
                    let authority = format!("{}:{port}", custom::service_host(service).1);
                    self.grpc_check(endpoint, &authority, timeout, req).await
                }
            }
        };
        with_timeout(addr, timeout, exchange).await
    }

    async fn grpc_check(
        &self,
        endpoint: &Endpoint<'_>,
        authority: &str,
        timeout: Duration,
        req: &CheckRequest<'_>,
    ) -> Result<Decision, CheckError> {
        let addr = endpoint.addr();
        let message = custom::encode_check_request(req);
        let mut request = Request::post(format!("http://{authority}{}", custom::GRPC_CHECK_PATH))
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers")
            .body(Full::new(custom::grpc_frame(&message)))
            .map_err(|source| CheckError::Exchange { addr, source: source.into() })?;
        // grpc-timeout allows at most 8 digits: milliseconds up to ~27 hours.
        let millis = timeout.as_millis().min(99_999_999);
        if let Ok(value) = HeaderValue::from_str(&format!("{millis}m")) {
            request.headers_mut().insert("grpc-timeout", value);
        }
        let response = self.send_h2(endpoint, request).await?;
        let (parts, body) = response.into_parts();
        if parts.status != StatusCode::OK {
            return Err(CheckError::GrpcHttpStatus { addr, status: parts.status });
        }
        let collected = read_body(addr, body).await?;
        // A trailers-only answer carries grpc-status in the headers.
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let status_of = |name: &str| {
            trailers.get(name).or_else(|| parts.headers.get(name)).and_then(|v| v.to_str().ok()).map(str::to_string)
        };
        let code = status_of("grpc-status").unwrap_or_default();
        if code != "0" {
            let message = status_of("grpc-message").unwrap_or_default();
            return Err(CheckError::GrpcStatus { addr, code, message });
        }
        let body = collected.to_bytes();
        let message = custom::grpc_unframe(&body).map_err(|source| CheckError::Answer { addr, source })?;
        custom::decode_check_response(message).map_err(|source| CheckError::Answer { addr, source })
    }

    async fn send_h1(
        &self,
        endpoint: &Endpoint<'_>,
        request: Request<CheckBody>,
    ) -> Result<Response<Incoming>, CheckError> {
        let (addr, key) = (endpoint.addr(), endpoint.pool_key());
        let idle = {
            let mut pool = self.http1.lock().expect("lock");
            let senders = pool.entry(key).or_default();
            senders.retain(|s| !s.is_closed());
            senders.iter().position(http1::SendRequest::is_ready).map(|i| senders.swap_remove(i))
        };
        let mut sender = if let Some(sender) = idle {
            sender
        } else {
            let io = endpoint.connect().await?;
            let (sender, connection) = http1::Builder::new()
                .handshake(TokioIo::new(io))
                .await
                .map_err(|source| CheckError::Handshake { addr, source })?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    debug!(%addr, %error, "ext_authz HTTP/1.1 connection ended");
                }
            });
            sender
        };
        let response = sender
            .send_request(request)
            .await
            .map_err(|source| CheckError::Exchange { addr, source: source.into() })?;
        // Back to the pool at once: it is ready again when the answer's body is read.
        let mut pool = self.http1.lock().expect("lock");
        let senders = pool.entry(key).or_default();
        if senders.len() < MAX_IDLE_PER_AUTHORIZER {
            senders.push(sender);
        }
        Ok(response)
    }

    async fn send_h2(
        &self,
        endpoint: &Endpoint<'_>,
        request: Request<CheckBody>,
    ) -> Result<Response<Incoming>, CheckError> {
        let (addr, key) = (endpoint.addr(), endpoint.pool_key());
        let pooled = self.http2.lock().expect("lock").get(&key).filter(|s| !s.is_closed()).cloned();
        let mut sender = if let Some(sender) = pooled {
            sender
        } else {
            let io = endpoint.connect().await?;
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .handshake(TokioIo::new(io))
                .await
                .map_err(|source| CheckError::Handshake { addr, source })?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    debug!(%addr, %error, "ext_authz HTTP/2 connection ended");
                }
            });
            self.http2.lock().expect("lock").insert(key, sender.clone());
            sender
        };
        sender.send_request(request).await.map_err(|source| CheckError::Exchange { addr, source: source.into() })
    }
}

/// The whole answer, at most [`MAX_ANSWER_BYTES`].
async fn read_body(addr: SocketAddr, body: Incoming) -> Result<http_body_util::Collected<Bytes>, CheckError> {
    Limited::new(body, MAX_ANSWER_BYTES).collect().await.map_err(|source| CheckError::Exchange { addr, source })
}

async fn with_timeout<T>(
    addr: SocketAddr,
    timeout: Duration,
    future: impl Future<Output = Result<T, CheckError>>,
) -> Result<T, CheckError> {
    tokio::time::timeout(timeout, future).await.map_err(|_| CheckError::Timeout { addr, timeout })?
}

#[cfg(test)]
mod tests;
