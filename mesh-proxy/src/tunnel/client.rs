//! The client side of HBONE: a pool of HTTP/2 connections per (source namespace and
//! identity, destination, expected destination identity). Connects to one key are
//! serialised, so a burst of first connections makes one handshake and shares it.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, StatusCode};
use rustls::{ClientConfig, pki_types::ServerName};
use tokio_rustls::TlsConnector;
use tracing::debug;

use super::{
    CONNECTION_WINDOW, HboneError, MAX_FRAME, MAX_HEADER_LIST, MAX_STREAMS, SEND_BUFFER, STREAM_WINDOW, TLS_TIMEOUT,
    keepalive, stream::H2Stream,
};
use crate::{identity::WorkloadCert, socket::SocketFactory};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    /// The caller's shard ([`crate::shard`]): a connection is driven, and used, by
    /// one thread.
    shard: usize,
    namespace: u64,
    source_identity: String,
    destination: SocketAddr,
    expected_identity: String,
}

struct Pooled {
    sender: h2::client::SendRequest<Bytes>,
    /// The certificate the connection was made with: after a renewal, new streams go
    /// to new connections and old ones drain.
    cert: Arc<WorkloadCert>,
    streams: Arc<AtomicUsize>,
    last_used: Arc<AtomicU64>,
    /// Set when the connection task ended (peer gone, GOAWAY done, keepalive failed).
    closed: Arc<AtomicBool>,
}

/// The connections of one key, and the lock that serialises opening new ones.
#[derive(Default)]
struct Slot {
    conns: Mutex<Vec<Pooled>>,
    opening: tokio::sync::Mutex<()>,
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
        // Release: whoever sees the count drop (the idle release, maybe on another
        // thread) sees this `last_used` too.
        self.streams.fetch_sub(1, Ordering::Release);
    }
}

/// A client configuration and the certificate it was built with.
type Built = (Arc<WorkloadCert>, Arc<ClientConfig>);

/// TLS client configurations, built once per (certificate, expected identity).
#[derive(Default)]
struct Configs(Mutex<HashMap<(String, String), Built>>);

impl Configs {
    fn get(&self, cert: &Arc<WorkloadCert>, expected: &str) -> Result<Arc<ClientConfig>, HboneError> {
        let key = (cert.identity.clone(), expected.to_owned());
        if let Some((built_for, config)) = self.0.lock().expect("lock").get(&key)
            && Arc::ptr_eq(built_for, cert)
        {
            return Ok(config.clone());
        }
        let config = Arc::new(mesh_common::tls::workload_client_config(
            &cert.chain_pem.concat(),
            &cert.key_pem,
            std::slice::from_ref(&cert.root_pem),
            expected,
        )?);
        self.0.lock().expect("lock").insert(key, (cert.clone(), config.clone()));
        Ok(config)
    }

    /// Forgets configurations of certificates no longer in use.
    fn retain(&self, in_use: impl Fn(&Arc<WorkloadCert>) -> bool) {
        self.0.lock().expect("lock").retain(|_, (cert, _)| in_use(cert));
    }
}

/// Client connections, pooled.
pub struct Pool {
    slots: Mutex<HashMap<PoolKey, Arc<Slot>>>,
    configs: Configs,
    epoch: Instant,
    connect_timeout: Duration,
    /// Connections opened (TLS handshakes made).
    pub opened: AtomicU64,
}

impl Pool {
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            slots: Mutex::default(),
            configs: Configs::default(),
            epoch: Instant::now(),
            connect_timeout,
            opened: AtomicU64::new(0),
        }
    }

    /// Opens a tunnel stream with `request` (a CONNECT, see
    /// [`super::connect_request`]) through the proxy listening at `destination`
    /// (port 15008), which must present `expected`. New connections are made with
    /// sockets from `sockets` and present `cert`.
    pub async fn connect(
        &self,
        sockets: &dyn SocketFactory,
        cert: Arc<WorkloadCert>,
        destination: SocketAddr,
        expected: &str,
        request: impl Fn() -> Request<()>,
    ) -> Result<(H2Stream, StreamGuard), HboneError> {
        let key = PoolKey {
            shard: crate::shard::current(),
            namespace: sockets.namespace(),
            source_identity: cert.identity.clone(),
            destination,
            expected_identity: expected.to_owned(),
        };
        let slot = self.slots.lock().expect("lock").entry(key).or_default().clone();
        let (sender, guard, reused) = self.checkout(&slot, sockets, &cert, destination, expected).await?;
        match Self::open_stream(sender, request()).await {
            Ok(stream) => Ok((stream, guard)),
            // A pooled connection the peer is closing (GOAWAY after a restart or an
            // un-enrollment, or a dead peer): forget it and try once on a new one.
            Err(HboneError::Http(error)) if reused => {
                debug!(%destination, %error, "pooled tunnel connection refused the stream; retrying on a new one");
                Self::evict(&slot, &guard);
                drop(guard);
                let (sender, guard) = self.open(&slot, sockets, &cert, destination, expected).await?;
                Ok((Self::open_stream(sender, request()).await?, guard))
            }
            Err(error) => Err(error),
        }
    }

    async fn open_stream(sender: h2::client::SendRequest<Bytes>, request: Request<()>) -> Result<H2Stream, HboneError> {
        let mut sender = sender.ready().await?;
        let (response, send) = sender.send_request(request, false)?;
        let response = response.await?;
        if response.status() != StatusCode::OK {
            return Err(HboneError::Status(response.status()));
        }
        Ok(H2Stream::new(send, response.into_body()))
    }

    /// Removes the pooled connection `guard` holds a stream of.
    fn evict(slot: &Slot, guard: &StreamGuard) {
        slot.conns.lock().expect("lock").retain(|c| !Arc::ptr_eq(&c.streams, &guard.streams));
    }

    /// The least loaded current connection with a free stream, its slot taken.
    fn reuse(&self, slot: &Slot, cert: &Arc<WorkloadCert>) -> Option<(h2::client::SendRequest<Bytes>, StreamGuard)> {
        let mut conns = slot.conns.lock().expect("lock");
        conns.retain(|c| !c.closed.load(Ordering::Relaxed));
        let c = conns
            .iter()
            .filter(|c| Arc::ptr_eq(&c.cert, cert))
            .min_by_key(|c| c.streams.load(Ordering::Relaxed))
            .filter(|c| c.streams.load(Ordering::Relaxed) < MAX_STREAMS)?;
        c.streams.fetch_add(1, Ordering::Relaxed);
        let guard = StreamGuard { streams: c.streams.clone(), last_used: c.last_used.clone(), epoch: self.epoch };
        Some((c.sender.clone(), guard))
    }

    async fn checkout(
        &self,
        slot: &Slot,
        sockets: &dyn SocketFactory,
        cert: &Arc<WorkloadCert>,
        destination: SocketAddr,
        expected: &str,
    ) -> Result<(h2::client::SendRequest<Bytes>, StreamGuard, bool), HboneError> {
        if let Some((sender, guard)) = self.reuse(slot, cert) {
            return Ok((sender, guard, true));
        }
        // One connect at a time per key: whoever waited here finds the connection
        // the first one made.
        let _opening = slot.opening.lock().await;
        if let Some((sender, guard)) = self.reuse(slot, cert) {
            return Ok((sender, guard, true));
        }
        let (sender, guard) = self.open(slot, sockets, cert, destination, expected).await?;
        Ok((sender, guard, false))
    }

    /// A new pooled connection with one stream slot taken.
    async fn open(
        &self,
        slot: &Slot,
        sockets: &dyn SocketFactory,
        cert: &Arc<WorkloadCert>,
        destination: SocketAddr,
        expected: &str,
    ) -> Result<(h2::client::SendRequest<Bytes>, StreamGuard), HboneError> {
        let (sender, closed) = Box::pin(self.handshake(sockets, cert, destination, expected)).await?;
        let streams = Arc::new(AtomicUsize::new(1));
        let last_used = Arc::new(AtomicU64::new(self.epoch.elapsed().as_millis() as u64));
        let guard = StreamGuard { streams: streams.clone(), last_used: last_used.clone(), epoch: self.epoch };
        slot.conns.lock().expect("lock").push(Pooled {
            sender: sender.clone(),
            cert: cert.clone(),
            streams,
            last_used,
            closed,
        });
        Ok((sender, guard))
    }

    async fn handshake(
        &self,
        sockets: &dyn SocketFactory,
        cert: &Arc<WorkloadCert>,
        destination: SocketAddr,
        expected: &str,
    ) -> Result<(h2::client::SendRequest<Bytes>, Arc<AtomicBool>), HboneError> {
        let connect = |source| HboneError::Connect { addr: destination, source };
        let socket = sockets
            .tcp_socket(destination.is_ipv6())
            .map_err(|source| HboneError::Socket { addr: destination, source })?;
        let tcp = tokio::time::timeout(self.connect_timeout, socket.connect(destination))
            .await
            .map_err(|_| connect(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect)?;
        let _ = tcp.set_nodelay(true);
        let config = self.configs.get(cert, expected)?;
        let tls_error = |source| HboneError::Tls { addr: destination, source };
        // No SNI: peers are reached by address and named by the expected identity.
        let tls = tokio::time::timeout(
            TLS_TIMEOUT,
            TlsConnector::from(config).connect(ServerName::IpAddress(destination.ip().into()), tcp),
        )
        .await
        .map_err(|_| tls_error(std::io::ErrorKind::TimedOut.into()))?
        .map_err(tls_error)?;
        let (sender, mut connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(tls)
            .await?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        debug!(%destination, expected, "tunnel connection opened");
        let closed = Arc::new(AtomicBool::new(false));
        let ping = connection.ping_pong().expect("a new connection has its ping handle");
        let done = closed.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = &mut connection => {
                    if let Err(error) = result {
                        debug!(%destination, %error, "tunnel connection ended");
                    }
                }
                () = keepalive(ping) => debug!(%destination, "tunnel connection closed: the peer stopped answering pings"),
            }
            done.store(true, Ordering::Relaxed);
        });
        Ok((sender, closed))
    }

    /// Closes pooled connections that carried nothing for `idle`; beyond the first
    /// few idle ones of a key (what a burst left behind), those idle for
    /// `spare_idle` already, so that memory goes back after a burst.
    pub fn release_idle(&self, idle: Duration, spare_idle: Duration) {
        const KEPT_IDLE: usize = 4;
        let now = self.epoch.elapsed().as_millis() as u64;
        let (idle, spare_idle) = (idle.as_millis() as u64, spare_idle.as_millis() as u64);
        let mut in_use: Vec<Arc<WorkloadCert>> = Vec::new();
        let mut slots = self.slots.lock().expect("lock");
        slots.retain(|_, slot| {
            let mut conns = slot.conns.lock().expect("lock");
            conns.retain(|c| !c.closed.load(Ordering::Relaxed));
            // Most recently used first: those are the idle ones kept longest.
            conns.sort_by_key(|c| std::cmp::Reverse(c.last_used.load(Ordering::Relaxed)));
            let mut idle_kept = 0;
            conns.retain(|c| {
                if c.streams.load(Ordering::Acquire) > 0 {
                    return true;
                }
                let idle_for = now.saturating_sub(c.last_used.load(Ordering::Relaxed));
                let keep = idle_for < if idle_kept < KEPT_IDLE { idle } else { spare_idle };
                idle_kept += usize::from(keep);
                keep
            });
            in_use.extend(conns.iter().map(|c| c.cert.clone()));
            // A slot someone is opening a connection in stays.
            !conns.is_empty() || Arc::strong_count(slot) > 1
        });
        drop(slots);
        self.configs.retain(|cert| in_use.iter().any(|c| Arc::ptr_eq(c, cert)));
    }

    /// Drops the pooled connections made from a namespace that is gone (a pod that
    /// left): they close once their streams end.
    pub fn forget(&self, namespace: u64) {
        self.slots.lock().expect("lock").retain(|key, _| key.namespace != namespace);
    }

    pub fn connections(&self) -> usize {
        self.slots.lock().expect("lock").values().map(|s| s.conns.lock().expect("lock").len()).sum()
    }
}
