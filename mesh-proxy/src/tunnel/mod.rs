//! HBONE: the mutually authenticated tunnel between proxies (HTTP/2 `CONNECT` over
//! TLS 1.3 on port 15008), wire-compatible with Istio ambient.
//!
//! [`client::Pool`] opens streams through pooled connections; [`server::Server`]
//! terminates them and hands each `CONNECT` to a [`server::Handler`] (the node
//! agent's "deliver to this pod", the waypoint's L7 router). Both speak HTTP/2 with
//! the `h2` crate directly, and a stream is an [`stream::H2Stream`] that the relay
//! drives from the task that owns it.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use http::{Method, Request, StatusCode};

use crate::telemetry::Outcome;

pub mod client;
pub mod server;
pub mod stream;

pub const HBONE_PORT: u16 = 15008;
/// Streams per pooled connection before another connection is opened.
pub const MAX_STREAMS: usize = 100;
/// Streams a server accepts at once on one connection.
pub const SERVER_MAX_STREAMS: u32 = 1000;
/// HTTP/2 flow-control windows: MiB-scale so that one stream can fill a fast link.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
pub const MAX_FRAME: u32 = 1 << 20;
pub const SEND_BUFFER: usize = 1 << 20;
/// A CONNECT carries a handful of short headers.
pub const MAX_HEADER_LIST: u32 = 16 << 10;
pub const KEEPALIVE: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
pub const TLS_TIMEOUT: Duration = Duration::from_secs(10);
/// Pooled connections without streams for this long are closed.
pub const POOL_IDLE: Duration = Duration::from_mins(5);
/// Idle pooled connections beyond the few kept per destination are closed sooner.
pub const POOL_SPARE_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("no workload certificate for {identity} yet")]
    NoCertificate { identity: String },
    #[error("cannot create a socket for {addr}")]
    Socket {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
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
    #[error("HTTP/2")]
    Http(#[from] h2::Error),
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

/// A CONNECT request for `authority`, with HBONE's headers. A baggage value that is
/// not a valid header (names come from enrollment requests) is left out.
pub fn connect_request(authority: SocketAddr, source: SocketAddr, baggage: &str) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    *request.uri_mut() = http::Uri::try_from(authority.to_string()).expect("ip:port is a valid authority");
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

/// The SPIFFE identity of a peer's certificate (its first `spiffe://` URI SAN).
pub fn peer_identity(tls: &rustls::CommonState) -> Option<String> {
    let leaf = tls.peer_certificates()?.first()?;
    mesh_common::tls::uri_sans(leaf).into_iter().find(|id| id.starts_with("spiffe://"))
}

/// Completes when the peer stops answering HTTP/2 pings (one every [`KEEPALIVE`],
/// each given [`KEEPALIVE_TIMEOUT`]); the connection is then dropped.
pub(crate) async fn keepalive(mut ping: h2::PingPong) {
    loop {
        tokio::time::sleep(KEEPALIVE).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests;
