//! HBONE: the mutually authenticated tunnel between agents (HTTP/2 `CONNECT` over
//! TLS 1.3 on port 15008), wire-compatible with Istio ambient.
//!
//! Client side: a pool of HTTP/2 connections per (source pod and identity,
//! destination, expected destination identity), opened from inside the source pod's
//! network namespace so the outer packets carry the pod's address. Server side: a
//! listener on 15008 inside every enrolled pod's namespace that terminates TLS with
//! the pod's certificate, checks the client's identity and the authorization
//! policies, connects to the application and only then answers 200.
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, Response, StatusCode, client::conn::http2::SendRequest, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_common::BYPASS_MARK;
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};
use tracing::{debug, info, warn};

use crate::{
    drain,
    enroll::Pod,
    identity::WorkloadCert,
    mesh::Mesh,
    metrics::flags,
    netns::NetnsError,
    relay::{self, Counted},
    telemetry::{AccessLog, Active, Outcome, bump},
};

pub const HBONE_PORT: u16 = 15008;
/// Streams per pooled connection before another connection is opened.
const MAX_STREAMS: usize = 100;
/// Busy connections: beyond this many streams a new connection is opened, up to
/// `SPREAD_CONNECTIONS` per pool key.
const SPREAD_ABOVE: usize = 4;
const SPREAD_CONNECTIONS: usize = 4;
/// HTTP/2 flow-control windows: MiB-scale so that one stream can fill a fast link.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;
const MAX_FRAME: u32 = 1 << 20;
const SEND_BUFFER: usize = 1 << 20;
const KEEPALIVE: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// Pooled connections without streams for this long are closed.
pub const POOL_IDLE: Duration = Duration::from_mins(5);
/// Idle pooled connections beyond the few kept per destination are closed sooner.
pub const POOL_SPARE_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("no workload certificate for {identity} yet")]
    NoCertificate { identity: String },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed")]
    Tls {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration")]
    TlsConfig(#[from] mesh_common::tls::TlsError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("HTTP/2")]
    Http(#[from] hyper::Error),
    #[error("the peer answered {0}")]
    Status(StatusCode),
}

impl HboneError {
    /// The access-log outcome of a failed tunnel setup.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::NoCertificate { .. } => Outcome::NoCertificate,
            Self::Status(StatusCode::UNAUTHORIZED) => Outcome::Denied,
            Self::Status(StatusCode::SERVICE_UNAVAILABLE) | Self::Connect { .. } => Outcome::ConnectFailed,
            _ => Outcome::TunnelFailed,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    netns_cookie: u64,
    source_identity: String,
    destination: SocketAddr,
    expected_identity: String,
}

impl PoolKey {
    fn new(pod: &Pod, cert: &WorkloadCert, destination: SocketAddr, expected: &str) -> Self {
        Self {
            netns_cookie: pod.netns_cookie,
            source_identity: cert.identity.clone(),
            destination,
            expected_identity: expected.to_owned(),
        }
    }
}

struct Pooled {
    sender: SendRequest<Empty<Bytes>>,
    /// The certificate the connection was made with: after a renewal, new streams go
    /// to new connections and old ones drain.
    cert: Arc<WorkloadCert>,
    streams: Arc<AtomicUsize>,
    last_used: Arc<AtomicU64>,
}

/// Holds a stream's slot in its pooled connection.
pub struct StreamGuard {
    streams: Arc<AtomicUsize>,
    last_used: Arc<AtomicU64>,
    epoch: Instant,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.last_used.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Client connections, pooled.
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    epoch: Instant,
    connect_timeout: Duration,
    pub opened: AtomicU64,
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Self {
        Self { conns: Mutex::new(HashMap::new()), epoch: Instant::now(), connect_timeout, opened: AtomicU64::new(0) }
    }

    /// Opens a tunnel stream from `pod` to `authority` through the agent listening at
    /// `destination` (the target's IP, port 15008), which must present `expected`.
    pub async fn connect(
        &self,
        pod: &Pod,
        cert: Arc<WorkloadCert>,
        destination: SocketAddr,
        expected: &str,
        request: impl Fn() -> Request<Empty<Bytes>>,
    ) -> Result<(Upgraded, StreamGuard), HboneError> {
        let (mut sender, guard, reused) = self.checkout(pod, cert.clone(), destination, expected).await?;
        let sent = async {
            sender.ready().await?;
            sender.send_request(request()).await
        };
        let response = match sent.await {
            Ok(response) => response,
            // A pooled connection the peer is closing (GOAWAY after a restart or an
            // un-enrollment, or a dead peer): forget it and try once on a new one.
            Err(error) if reused => {
                debug!(%destination, %error, "pooled tunnel connection refused the stream; retrying on a new one");
                self.evict(&guard);
                drop(guard);
                // A new connection: the other pooled ones may be closing too.
                let (mut sender, guard) = self.open(pod, cert, destination, expected).await?;
                sender.ready().await?;
                let response = sender.send_request(request()).await?;
                return Self::upgrade(response, guard).await;
            }
            Err(error) => return Err(error.into()),
        };
        Self::upgrade(response, guard).await
    }

    async fn upgrade(
        response: Response<hyper::body::Incoming>,
        guard: StreamGuard,
    ) -> Result<(Upgraded, StreamGuard), HboneError> {
        if response.status() != StatusCode::OK {
            return Err(HboneError::Status(response.status()));
        }
        let upgraded = hyper::upgrade::on(response).await?;
        Ok((upgraded, guard))
    }

    /// Removes the pooled connection `guard` holds a stream of.
    fn evict(&self, guard: &StreamGuard) {
        let mut conns = self.conns.lock().expect("lock");
        for list in conns.values_mut() {
            list.retain(|c| !Arc::ptr_eq(&c.streams, &guard.streams));
        }
        conns.retain(|_, list| !list.is_empty());
    }

    async fn checkout(
        &self,
        pod: &Pod,
        cert: Arc<WorkloadCert>,
        destination: SocketAddr,
        expected: &str,
    ) -> Result<(SendRequest<Empty<Bytes>>, StreamGuard, bool), HboneError> {
        let key = PoolKey::new(pod, &cert, destination, expected);
        {
            let mut conns = self.conns.lock().expect("lock");
            if let Some(list) = conns.get_mut(&key) {
                list.retain(|c| !c.sender.is_closed());
                // The least loaded current connection; a busy one (SPREAD_ABOVE streams)
                // is only reused once SPREAD_CONNECTIONS exist, so that parallel bulk
                // transfers do not all queue on one TLS session and one task.
                let count = list.len();
                let usable = list
                    .iter()
                    .filter(|c| Arc::ptr_eq(&c.cert, &cert) && c.sender.is_ready())
                    .min_by_key(|c| c.streams.load(Ordering::Relaxed))
                    .filter(|c| {
                        let streams = c.streams.load(Ordering::Relaxed);
                        streams < SPREAD_ABOVE || (count >= SPREAD_CONNECTIONS && streams < MAX_STREAMS)
                    });
                if let Some(c) = usable {
                    c.streams.fetch_add(1, Ordering::Relaxed);
                    let guard =
                        StreamGuard { streams: c.streams.clone(), last_used: c.last_used.clone(), epoch: self.epoch };
                    return Ok((c.sender.clone(), guard, true));
                }
            }
        }
        let (sender, guard) = self.open(pod, cert, destination, expected).await?;
        Ok((sender, guard, false))
    }

    /// A new pooled connection with one stream slot taken.
    async fn open(
        &self,
        pod: &Pod,
        cert: Arc<WorkloadCert>,
        destination: SocketAddr,
        expected: &str,
    ) -> Result<(SendRequest<Empty<Bytes>>, StreamGuard), HboneError> {
        let key = PoolKey::new(pod, &cert, destination, expected);
        let sender = Box::pin(self.handshake(pod, &cert, destination, expected)).await?;
        let streams = Arc::new(AtomicUsize::new(1));
        let last_used = Arc::new(AtomicU64::new(self.epoch.elapsed().as_millis() as u64));
        let guard = StreamGuard { streams: streams.clone(), last_used: last_used.clone(), epoch: self.epoch };
        self.conns.lock().expect("lock").entry(key).or_default().push(Pooled {
            sender: sender.clone(),
            cert,
            streams,
            last_used,
        });
        Ok((sender, guard))
    }

    async fn handshake(
        &self,
        pod: &Pod,
        cert: &WorkloadCert,
        destination: SocketAddr,
        expected: &str,
    ) -> Result<SendRequest<Empty<Bytes>>, HboneError> {
        let connect = |source| HboneError::Connect { addr: destination, source };
        let socket = pod.netns.tcp_socket(destination.is_ipv6(), BYPASS_MARK)?;
        let tcp = tokio::time::timeout(self.connect_timeout, socket.connect(destination))
            .await
            .map_err(|_| connect(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect)?;
        let config = mesh_common::tls::workload_client_config(
            &cert.chain_pem.concat(),
            &cert.key_pem,
            std::slice::from_ref(&cert.root_pem),
            expected,
        )?;
        let tls_error = |source| HboneError::Tls { addr: destination, source };
        let tls = tokio::time::timeout(
            TLS_TIMEOUT,
            TlsConnector::from(Arc::new(config)).connect(ServerName::IpAddress(destination.ip().into()), tcp),
        )
        .await
        .map_err(|_| tls_error(std::io::ErrorKind::TimedOut.into()))?
        .map_err(tls_error)?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buf_size(SEND_BUFFER)
            .keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        debug!(pod = %pod.spec.name, %destination, expected, "tunnel connection opened");
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%destination, %error, "tunnel connection ended");
            }
        });
        Ok(sender)
    }

    /// Closes pooled connections that carried nothing for `idle`; beyond the first
    /// `SPREAD_CONNECTIONS` idle ones of a key (what a burst left behind), those idle
    /// for `spare_idle` already, so that memory goes back after a burst.
    pub fn release_idle(&self, idle: Duration, spare_idle: Duration) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let (idle, spare_idle) = (idle.as_millis() as u64, spare_idle.as_millis() as u64);
        let mut conns = self.conns.lock().expect("lock");
        for list in conns.values_mut() {
            list.retain(|c| !c.sender.is_closed());
            // Most recently used first: those are the idle ones kept longest.
            list.sort_by_key(|c| std::cmp::Reverse(c.last_used.load(Ordering::Relaxed)));
            let mut idle_kept = 0;
            list.retain(|c| {
                if c.streams.load(Ordering::Relaxed) > 0 {
                    return true;
                }
                let idle_for = now.saturating_sub(c.last_used.load(Ordering::Relaxed));
                let keep = idle_for < if idle_kept < SPREAD_CONNECTIONS { idle } else { spare_idle };
                idle_kept += usize::from(keep);
                keep
            });
        }
        conns.retain(|_, list| !list.is_empty());
    }

    /// Drops the pooled connections of a pod that left: they close once their
    /// streams end.
    pub fn forget_pod(&self, netns_cookie: u64) {
        self.conns.lock().expect("lock").retain(|key, _| key.netns_cookie != netns_cookie);
    }

    pub fn connections(&self) -> usize {
        self.conns.lock().expect("lock").values().map(Vec::len).sum()
    }
}

/// A CONNECT request for `authority`, with HBONE's headers. A baggage value that is
/// not a valid header (names come from enrollment requests) is left out.
pub fn connect_request(authority: SocketAddr, source: SocketAddr, baggage: &str) -> Request<Empty<Bytes>> {
    let mut request = Request::new(Empty::new());
    *request.method_mut() = Method::CONNECT;
    *request.uri_mut() = hyper::Uri::try_from(authority.to_string()).expect("ip:port is a valid authority");
    let headers = request.headers_mut();
    let forwarded = format!("for=\"{source}\"");
    headers.insert("forwarded", forwarded.parse().expect("an address is a valid header value"));
    if let Ok(baggage) = baggage.parse() {
        headers.insert("baggage", baggage);
    }
    headers.insert("traceparent", traceparent().parse().expect("hex is a valid header value"));
    request
}

/// A fresh W3C trace context (`00-<trace id>-<span id>-00`).
fn traceparent() -> String {
    use std::hash::{BuildHasher, RandomState};
    // Each RandomState is seeded from the OS RNG once per thread and then stepped, which
    // is unpredictable enough for trace ids.
    let a = RandomState::new().hash_one(Instant::now());
    let b = RandomState::new().hash_one(a);
    let c = RandomState::new().hash_one(b);
    format!("00-{a:016x}{b:016x}-{c:016x}-00")
}

/// The inbound tunnel listener of one pod (15008 in the pod's namespace).
pub struct Inbound {
    listener: TcpListener,
    server: Arc<Server>,
}

/// What the tunnel connections of one pod share. It does not hold the listener: a
/// pooled connection may outlive the pod's enrollment, and must not keep the port
/// bound.
struct Server {
    pod: Arc<Pod>,
    mesh: Arc<Mesh>,
    drain: drain::Watch,
    acceptor: Mutex<Option<(Arc<WorkloadCert>, TlsAcceptor)>>,
}

impl Inbound {
    /// Serves `listener`, bound inside the pod's network namespace (or inherited).
    pub fn new(
        listener: std::net::TcpListener,
        pod: Arc<Pod>,
        mesh: Arc<Mesh>,
        drain: drain::Watch,
    ) -> Result<Self, NetnsError> {
        let listener = pod.netns.tokio_listener(listener)?;
        Ok(Self { listener, server: Arc::new(Server { pod, mesh, drain, acceptor: Mutex::new(None) }) })
    }

    pub async fn run(self) {
        let Self { listener, server } = self;
        let drain = server.drain.clone();
        drain::accept_until_drained(listener, drain, &server.pod.spec.name, "tunnel", |stream, peer| {
            tokio::spawn(server.clone().serve(stream, peer));
        })
        .await;
    }
}

impl Server {
    /// The TLS acceptor for the pod's current certificate.
    fn acceptor(&self) -> Result<TlsAcceptor, HboneError> {
        let cert = self
            .mesh
            .certs
            .get(&self.pod.identity())
            .ok_or_else(|| HboneError::NoCertificate { identity: self.pod.identity().to_string() })?;
        let mut cached = self.acceptor.lock().expect("lock");
        if let Some((current, acceptor)) = &*cached
            && Arc::ptr_eq(current, &cert)
        {
            return Ok(acceptor.clone());
        }
        let mut config = mesh_common::tls::server_config(
            &cert.chain_pem.concat(),
            &cert.key_pem,
            std::slice::from_ref(&cert.root_pem),
        )?;
        config.max_early_data_size = 0;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        *cached = Some((cert, acceptor.clone()));
        Ok(acceptor)
    }

    async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let counters = [&*self.mesh.counters, &self.pod.counters];
        let _ = tcp.set_nodelay(true);
        let acceptor = match self.acceptor() {
            Ok(acceptor) => acceptor,
            Err(error) => {
                warn!(pod = %self.pod.spec.name, %peer, %error, "tunnel refused: no server certificate");
                return;
            }
        };
        let tls = match tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                bump(counters, |c| &c.inbound_tls_failed, 1);
                info!(pod = %self.pod.spec.name, %peer, %error, "tunnel TLS handshake refused");
                return;
            }
            Err(_) => {
                bump(counters, |c| &c.inbound_tls_failed, 1);
                info!(pod = %self.pod.spec.name, %peer, "tunnel TLS handshake timed out");
                return;
            }
        };
        let Some(identity) = peer_identity(&tls) else {
            bump(counters, |c| &c.inbound_tls_failed, 1);
            info!(pod = %self.pod.spec.name, %peer, "tunnel refused: client certificate has no SPIFFE identity");
            return;
        };
        if !self.mesh.trusts(&identity) {
            bump(counters, |c| &c.inbound_tls_failed, 1);
            info!(pod = %self.pod.spec.name, %peer, identity, "tunnel refused: client identity is not of a trusted domain");
            return;
        }
        let identity: Arc<str> = identity.into();
        let this = self.clone();
        let service = hyper::service::service_fn(move |request| {
            let this = this.clone();
            let identity = identity.clone();
            async move { Ok::<_, Infallible>(this.handle(request, identity, peer).await) }
        });
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buf_size(SEND_BUFFER)
            .max_concurrent_streams(MAX_STREAMS as u32 * 10)
            // Rapid reset (CVE-2023-44487): a client that makes the server reset many
            // streams it never serves gets GOAWAY.
            .max_pending_accept_reset_streams(Some(64))
            .max_local_error_reset_streams(Some(256))
            .keep_alive_interval(KEEPALIVE)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .serve_connection(TokioIo::new(tls), service);
        tokio::pin!(connection);
        // GOAWAY when the pod leaves or the agent drains: streams in flight finish,
        // the peer's pool opens new connections (to wherever the pod is now).
        let mut removed = self.pod.removed.subscribe();
        let mut drain = self.drain.clone();
        let result = tokio::select! {
            result = &mut connection => result,
            () = async {
                tokio::select! {
                    _ = removed.wait_for(|removed| *removed) => {}
                    () = drain.signaled() => {}
                }
            } => {
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(error) = result {
            debug!(pod = %self.pod.spec.name, %peer, %error, "tunnel connection ended with an error");
        }
    }

    async fn handle(
        self: Arc<Self>,
        mut request: Request<hyper::body::Incoming>,
        identity: Arc<str>,
        peer: SocketAddr,
    ) -> Response<Empty<Bytes>> {
        let counters = [&*self.mesh.counters, &self.pod.counters];
        let start = Instant::now();
        bump(counters, |c| &c.inbound_accepted, 1);
        let source = self.mesh.index().workload(peer.ip()).cloned();
        let mut log = AccessLog {
            direction: "inbound",
            src_workload: source.as_ref().map_or_else(String::new, |w| w.name.clone()),
            src_namespace: source.as_ref().map_or_else(String::new, |w| w.namespace.clone()),
            src_identity: Some(identity.to_string()),
            src_addr: Some(peer),
            dst_workload: Some(self.pod.spec.name.clone()),
            dst_namespace: Some(self.pod.spec.namespace.clone()),
            dst_identity: Some(self.pod.identity().to_string()),
            security: "mutual_tls",
            ..AccessLog::default()
        };
        if !self.pod.enrolled() {
            // A stream that raced the GOAWAY of an un-enrolled pod.
            log.outcome = Some(Outcome::ConnectFailed);
            log.reason = Some("the pod is no longer enrolled".into());
            log.duration = start.elapsed();
            log.emit();
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
        let target = match self.target(&request) {
            Ok(target) => target,
            Err(reason) => {
                bump(counters, |c| &c.inbound_bad_request, 1);
                log.outcome = Some(Outcome::BadRequest);
                log.reason = Some(reason);
                log.duration = start.elapsed();
                log.emit();
                return status(StatusCode::BAD_REQUEST);
            }
        };
        log.dst_addr = Some(target);
        let labels = self.mesh.inbound_labels(&self.pod, source.as_deref(), Some(&identity), "mutual_tls");
        if let Some(reason) = self.mesh.limits.reached(&self.mesh.counters, &self.pod.counters) {
            bump(counters, |c| &c.limited, 1);
            self.mesh.metrics.refused(&labels, flags::OVERFLOW);
            log.outcome = Some(Outcome::Limited);
            log.reason = Some(reason);
            log.duration = start.elapsed();
            log.emit();
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
        if !self.mesh.has_view() {
            // No policies known: fail closed rather than authorize against nothing.
            bump(counters, |c| &c.no_view, 1);
            self.mesh.metrics.refused(&labels, flags::NO_ROUTE);
            log.outcome = Some(Outcome::NoView);
            log.duration = start.elapsed();
            log.emit();
            return status(StatusCode::SERVICE_UNAVAILABLE);
        }
        if let Err(reason) = self.mesh.authorize(&self.pod, Some(&identity), peer.ip(), target) {
            bump(counters, |c| &c.denied, 1);
            self.mesh.metrics.refused(&labels, flags::DENIED);
            info!(pod = %self.pod.spec.name, %identity, %target, reason, "tunnel request denied");
            log.outcome = Some(Outcome::Denied);
            log.reason = Some(reason);
            log.duration = start.elapsed();
            log.emit();
            return status(StatusCode::UNAUTHORIZED);
        }
        let upstream = match relay::deliver(&self.pod, peer.ip(), target, self.mesh.connect_timeout).await {
            Ok(upstream) => upstream,
            Err(error) => {
                bump(counters, |c| &c.connect_failed, 1);
                self.mesh.metrics.refused(&labels, flags::UPSTREAM_FAILURE);
                log.outcome = Some(Outcome::ConnectFailed);
                log.reason = Some(error.to_string());
                log.duration = start.elapsed();
                log.emit();
                return status(StatusCode::SERVICE_UNAVAILABLE);
            }
        };
        let on_upgrade = hyper::upgrade::on(&mut request);
        let this = self.clone();
        let drain = self.drain.clone();
        tokio::spawn(async move {
            let _drain = drain;
            // Answered 200: the connection counts as opened even if the client resets
            // the stream before the upgrade completes.
            this.mesh.metrics.opened(&labels);
            match on_upgrade.await {
                Ok(upgraded) => {
                    let policy = relay::Recheck {
                        mesh: this.mesh.clone(),
                        pod: this.pod.clone(),
                        identity: Some(identity.clone()),
                        source_ip: peer.ip(),
                        target,
                    };
                    let active = Active::enter([&*this.mesh.counters, &this.pod.counters]);
                    // The client side is the tunnel: bytes read from it were sent by the client.
                    let report = relay::run(
                        Counted::new(TokioIo::new(upgraded)),
                        upstream,
                        Some(policy),
                        &this.mesh.metrics,
                        &labels,
                    )
                    .await;
                    drop(active);
                    report.fill(&mut log);
                }
                Err(error) => {
                    log.outcome = Some(Outcome::Reset);
                    log.reason = Some(error.to_string());
                }
            }
            this.mesh.metrics.closed(&labels);
            log.duration = start.elapsed();
            log.emit();
        });
        status(StatusCode::OK)
    }

    /// The request's target: a CONNECT to one of this pod's addresses.
    fn target(&self, request: &Request<hyper::body::Incoming>) -> Result<SocketAddr, String> {
        let authority = request.uri().authority().map(hyper::http::uri::Authority::as_str);
        mesh_common::hbone::connect_target(request.method().as_str(), authority, self.pod.ips())
            .map_err(|reason| format!("{reason} (pod {})", self.pod.spec.name))
    }
}

fn status(code: StatusCode) -> Response<Empty<Bytes>> {
    let mut response = Response::new(Empty::new());
    *response.status_mut() = code;
    response
}

/// The SPIFFE identity of the client certificate (its first `spiffe://` URI SAN).
fn peer_identity(tls: &TlsStream<TcpStream>) -> Option<String> {
    let leaf = tls.get_ref().1.peer_certificates()?.first()?;
    mesh_common::tls::uri_sans(leaf).into_iter().find(|id| id.starts_with("spiffe://"))
}
