//! Connections to endpoints: HBONE through the endpoint's agent for meshed pods
//! (`:authority` = pod IP:target port, expecting the pod's identity), plain TCP for
//! endpoints outside the mesh; HTTP connections on top, pooled per endpoint.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_proxy::{
    identity::WorkloadCert,
    relay::Side,
    socket::Local,
    tunnel::{HBONE_PORT, HboneError, client::Pool, client::StreamGuard, connect_request, stream::H2Stream},
    workloads::Workload,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tracing::debug;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// A copy of a body frame (data or trailers; frames themselves are not `Clone`), for
/// the mirrors' and the retries' copies of a request body. `None` for a frame of
/// another kind.
pub fn copy_frame(frame: &http_body::Frame<Bytes>) -> Option<http_body::Frame<Bytes>> {
    if let Some(data) = frame.data_ref() {
        Some(http_body::Frame::data(data.clone()))
    } else {
        frame.trailers_ref().map(|trailers| http_body::Frame::trailers(trailers.clone()))
    }
}

/// The data bytes of a frame (0 for trailers).
pub fn frame_len(frame: &http_body::Frame<Bytes>) -> usize {
    frame.data_ref().map_or(0, Bytes::len)
}

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// Where a request goes: an endpoint's workload and its address (pod IP:target port).
#[derive(Clone, Debug)]
pub struct Target {
    pub workload: Arc<Workload>,
    pub addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("tunnel to {addr} failed")]
    Tunnel {
        addr: SocketAddr,
        #[source]
        source: HboneError,
    },
    #[error("connecting to {addr} timed out")]
    ConnectTimeout { addr: SocketAddr },
    #[error("HTTP handshake with {addr} failed")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    #[error("the upstream connection closed or reset before the response")]
    Reset(#[source] hyper::Error),
}

impl UpstreamError {
    /// Envoy's response flag: `UF` for a connection that never came up, `UC` for one
    /// that ended before the response.
    pub fn flag(&self) -> &'static str {
        match self {
            Self::Reset(_) => "UC",
            _ => "UF",
        }
    }

    /// Whether the request never reached the upstream (safe to retry anywhere).
    pub fn connect_failure(&self) -> bool {
        !matches!(self, Self::Reset(_))
    }

    /// Whether an HTTP/2 upstream refused the stream (`RST_STREAM` with
    /// `REFUSED_STREAM`: it did not process the request), Envoy's `refused-stream`.
    pub fn refused_stream(&self) -> bool {
        let Self::Reset(error) = self else { return false };
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(error) = source {
            if let Some(h2) = error.downcast_ref::<h2::Error>() {
                return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
            }
            source = error.source();
        }
        false
    }
}

/// A tunnel stream that keeps its pooled connection's stream slot while it lives.
struct Tunneled {
    stream: H2Stream,
    _slot: StreamGuard,
}

impl AsyncRead for Tunneled {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

/// A TCP route's relay moves the tunnel's DATA frames without copying them.
impl Side for Tunneled {
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Option<Poll<io::Result<Bytes>>> {
        self.stream.poll_chunk(cx)
    }

    fn poll_send_chunk(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<()>> {
        self.stream.poll_send_chunk(cx, data)
    }
}

impl AsyncWrite for Tunneled {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

pub trait Io: Side + Send + 'static {}
impl<T: Side + Send + 'static> Io for T {}

/// What a connection is opened with.
pub struct Dial<'a> {
    /// The waypoint's certificate (HBONE client side).
    pub cert: Arc<WorkloadCert>,
    /// The original client, for the tunnel's `forwarded` header.
    pub client: SocketAddr,
    pub baggage: &'a str,
    pub connect_timeout: Duration,
}

pub struct Upstreams {
    tunnels: Pool,
    http1: Mutex<HashMap<SocketAddr, Vec<http1::SendRequest<Body>>>>,
    http2: Mutex<HashMap<SocketAddr, http2::SendRequest<Body>>>,
}

impl Upstreams {
    pub fn new(connect_timeout: Duration) -> Self {
        Self { tunnels: Pool::new(connect_timeout), http1: Mutex::default(), http2: Mutex::default() }
    }

    /// Tunnel connections open now.
    pub fn tunnels(&self) -> usize {
        self.tunnels.connections()
    }

    /// A byte stream to `target`: through its agent when it is meshed.
    pub async fn connect(&self, target: &Target, dial: &Dial<'_>) -> Result<Box<dyn Io>, UpstreamError> {
        let addr = target.addr;
        let connect = async {
            if target.workload.meshed {
                let hbone = SocketAddr::new(addr.ip(), HBONE_PORT);
                let request = || connect_request(addr, dial.client, dial.baggage);
                let (stream, slot) = self
                    .tunnels
                    .connect(&Local, dial.cert.clone(), hbone, &target.workload.identity, request)
                    .await
                    .map_err(|source| UpstreamError::Tunnel { addr, source })?;
                Ok(Box::new(Tunneled { stream, _slot: slot }) as Box<dyn Io>)
            } else {
                let tcp = TcpStream::connect(addr).await.map_err(|source| UpstreamError::Connect { addr, source })?;
                let _ = tcp.set_nodelay(true);
                Ok(Box::new(tcp) as Box<dyn Io>)
            }
        };
        tokio::time::timeout(dial.connect_timeout, connect).await.map_err(|_| UpstreamError::ConnectTimeout { addr })?
    }

    /// Sends `request` to `target` over a pooled HTTP/2 (`h2`) or HTTP/1.1 connection.
    pub async fn send(
        &self,
        target: &Target,
        h2: bool,
        request: Request<Body>,
        dial: &Dial<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        if h2 { self.send_h2(target, request, dial).await } else { self.send_h1(target, request, dial).await }
    }

    async fn send_h2(
        &self,
        target: &Target,
        request: Request<Body>,
        dial: &Dial<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let pooled = self.http2.lock().expect("lock").get(&target.addr).filter(|s| !s.is_closed()).cloned();
        let mut sender = if let Some(sender) = pooled {
            sender
        } else {
            let io = self.connect(target, dial).await?;
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(1 << 20)
                .initial_connection_window_size(4 << 20)
                .keep_alive_interval(Duration::from_secs(30))
                .handshake(TokioIo::new(io))
                .await
                .map_err(|source| UpstreamError::Handshake { addr: target.addr, source })?;
            let addr = target.addr;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    debug!(%addr, %error, "upstream HTTP/2 connection ended");
                }
            });
            self.http2.lock().expect("lock").insert(target.addr, sender.clone());
            sender
        };
        sender.send_request(request).await.map_err(UpstreamError::Reset)
    }

    async fn send_h1(
        &self,
        target: &Target,
        request: Request<Body>,
        dial: &Dial<'_>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let idle = {
            let mut pool = self.http1.lock().expect("lock");
            let senders = pool.entry(target.addr).or_default();
            senders.retain(|s| !s.is_closed());
            senders.iter().position(http1::SendRequest::is_ready).map(|i| senders.swap_remove(i))
        };
        let mut sender = match idle {
            Some(sender) => sender,
            None => self.open_h1(target, dial, false).await?,
        };
        let response = sender.send_request(request).await.map_err(UpstreamError::Reset)?;
        // Back to the pool at once: it is ready again when the response body is done.
        let mut pool = self.http1.lock().expect("lock");
        let senders = pool.entry(target.addr).or_default();
        if senders.len() < MAX_IDLE_PER_ENDPOINT {
            senders.push(sender);
        }
        Ok(response)
    }

    /// A new HTTP/1.1 connection; `upgrades` keeps it usable for `Upgrade` (WebSocket).
    pub async fn open_h1(
        &self,
        target: &Target,
        dial: &Dial<'_>,
        upgrades: bool,
    ) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let io = self.connect(target, dial).await?;
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| UpstreamError::Handshake { addr: target.addr, source })?;
        let addr = target.addr;
        tokio::spawn(async move {
            let result = if upgrades { connection.with_upgrades().await } else { connection.await };
            if let Err(error) = result {
                debug!(%addr, %error, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::Empty;

    use super::*;

    /// `refused-stream` retries need an upstream's `REFUSED_STREAM` told apart from any
    /// other reset: hyper reports both as an error whose source is h2's.
    #[tokio::test]
    async fn an_upstream_refusing_a_stream_is_told_apart_from_a_reset() {
        for (reason, refused) in [(h2::Reason::REFUSED_STREAM, true), (h2::Reason::INTERNAL_ERROR, false)] {
            let (client_io, server_io) = tokio::io::duplex(64 << 10);
            tokio::spawn(async move {
                let mut connection = h2::server::handshake(server_io).await.expect("h2 server handshake");
                while let Some(Ok((_, mut respond))) = connection.accept().await {
                    respond.send_reset(reason);
                }
            });
            let (mut sender, connection) =
                http2::handshake(TokioExecutor::new(), TokioIo::new(client_io)).await.expect("h2 client handshake");
            tokio::spawn(connection);
            let request = Request::get("http://upstream/").body(Empty::<Bytes>::new()).unwrap();
            let error = UpstreamError::Reset(sender.send_request(request).await.expect_err("the stream was reset"));
            assert_eq!(error.refused_stream(), refused, "{reason:?}: {error:?}");
            assert!(!error.connect_failure());
        }
    }
}
