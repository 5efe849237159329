//! The server side of HBONE: terminates TLS with the handler's certificate, requires a
//! client certificate with a SPIFFE identity of a trusted domain, and hands every
//! `CONNECT` stream to the [`Handler`] in a task of its own, which answers it and
//! then relays on it (no further hand-off).
use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Response, StatusCode, request::Parts};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug};

use super::{
    CONNECTION_WINDOW, HboneError, MAX_FRAME, MAX_HEADER_LIST, SEND_BUFFER, SERVER_MAX_STREAMS, STREAM_WINDOW,
    TLS_TIMEOUT, keepalive, peer_identity, stream::H2Stream,
};
use crate::identity::WorkloadCert;

/// What a tunnel server does with what it terminates.
pub trait Handler: Send + Sync + 'static {
    /// The certificate the server presents now.
    fn certificate(&self) -> Result<Arc<WorkloadCert>, HboneError>;

    /// Whether a client identity is of a trust domain this server accepts.
    fn trusts(&self, identity: &str) -> bool;

    /// A connection refused before any stream (no certificate, TLS failed, no or an
    /// untrusted client identity).
    fn refused(&self, peer: SocketAddr, reason: &str);

    /// Serves one stream: answers it ([`Connect::refuse`] or [`Connect::accept`]) and
    /// relays on it.
    fn serve(self: Arc<Self>, connect: Connect) -> impl Future<Output = ()> + Send;
}

/// One request on a tunnel connection, not answered yet.
pub struct Connect {
    /// The client's address (the TCP peer of the tunnel connection).
    pub peer: SocketAddr,
    /// The client certificate's SPIFFE identity, verified.
    pub identity: Arc<str>,
    pub request: Parts,
    respond: SendResponse<Bytes>,
    body: RecvStream,
}

impl Connect {
    /// The request's `:authority` (for a CONNECT, the target `ip:port`).
    pub fn authority(&self) -> Option<&str> {
        self.request.uri.authority().map(http::uri::Authority::as_str)
    }

    /// Answers `status` and ends the stream.
    pub fn refuse(mut self, status: StatusCode) {
        let _ = self.respond.send_response(response(status), true);
    }

    /// Answers 200: from now on the stream carries the connection's bytes.
    pub fn accept(mut self) -> Result<H2Stream, h2::Error> {
        let send = self.respond.send_response(response(StatusCode::OK), false)?;
        Ok(H2Stream::new(send, self.body))
    }
}

fn response(status: StatusCode) -> Response<()> {
    let mut response = Response::new(());
    *response.status_mut() = status;
    response
}

pub struct Server<H> {
    handler: Arc<H>,
    /// The TLS acceptor of the current certificate, built once per certificate.
    acceptor: Mutex<Option<(Arc<WorkloadCert>, TlsAcceptor)>>,
}

impl<H: Handler> Server<H> {
    pub fn new(handler: Arc<H>) -> Arc<Self> {
        Arc::new(Self { handler, acceptor: Mutex::new(None) })
    }

    pub fn handler(&self) -> &Arc<H> {
        &self.handler
    }

    fn acceptor(&self) -> Result<TlsAcceptor, HboneError> {
        let cert = self.handler.certificate()?;
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
        // Clients make long-lived pooled connections and do not resume sessions.
        config.send_tls13_tickets = 0;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        *cached = Some((cert, acceptor.clone()));
        Ok(acceptor)
    }

    /// Serves one tunnel connection until the client closes it or, after
    /// `shutdown` completes, until its streams end (GOAWAY is sent at once: the
    /// client opens new streams elsewhere).
    pub async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, shutdown: impl Future<Output = ()>) {
        let _ = tcp.set_nodelay(true);
        let acceptor = match self.acceptor() {
            Ok(acceptor) => acceptor,
            Err(error) => return self.handler.refused(peer, &format!("no server certificate: {error}")),
        };
        let tls = match tokio::time::timeout(TLS_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => return self.handler.refused(peer, &format!("TLS handshake failed: {error}")),
            Err(_) => return self.handler.refused(peer, "TLS handshake timed out"),
        };
        let Some(identity) = peer_identity(tls.get_ref().1) else {
            return self.handler.refused(peer, "the client certificate has no SPIFFE identity");
        };
        if !self.handler.trusts(&identity) {
            return self.handler.refused(peer, &format!("client identity {identity} is not of a trusted domain"));
        }
        let identity: Arc<str> = identity.into();
        let handshake = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(SEND_BUFFER)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_concurrent_streams(SERVER_MAX_STREAMS)
            // Rapid reset (CVE-2023-44487): a client that makes the server reset many
            // streams it never serves gets GOAWAY.
            .max_pending_accept_reset_streams(64)
            .max_local_error_reset_streams(Some(256))
            .handshake::<_, Bytes>(tls);
        let mut connection = match tokio::time::timeout(TLS_TIMEOUT, handshake).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(error)) => return debug!(%peer, %error, "tunnel HTTP/2 handshake failed"),
            Err(_) => return debug!(%peer, "tunnel HTTP/2 handshake timed out"),
        };
        let ping = connection.ping_pong().expect("a new connection has its ping handle");
        let keepalive = keepalive(ping);
        tokio::pin!(shutdown, keepalive);
        let mut shutting_down = false;
        loop {
            tokio::select! {
                accepted = connection.accept() => match accepted {
                    Some(Ok((request, respond))) => {
                        let (request, body) = request.into_parts();
                        let connect = Connect { peer, identity: identity.clone(), request, respond, body };
                        // A span per stream: what the handler logs says which one.
                        let span = tracing::debug_span!("tunnel_stream", %peer, authority = connect.authority());
                        tokio::spawn(self.handler.clone().serve(connect).instrument(span));
                    }
                    Some(Err(error)) => {
                        debug!(%peer, %error, "tunnel connection ended with an error");
                        return;
                    }
                    None => return,
                },
                () = &mut shutdown, if !shutting_down => {
                    shutting_down = true;
                    connection.graceful_shutdown();
                }
                () = &mut keepalive => {
                    debug!(%peer, "tunnel connection closed: the client stopped answering pings");
                    return;
                }
            }
        }
    }
}
