//! The tunnel in-process over loopback: client pool and server against each other,
//! and each against raw TLS and HTTP/2 peers that pin the wire details Istio's
//! ztunnel relies on (design.md, "HBONE facts").
use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use rustls::pki_types::{ServerName, pem::PemObject as _};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::{
    CONNECTION_WINDOW, HboneError, MAX_FRAME, MAX_HEADER_LIST, SERVER_MAX_STREAMS, STREAM_WINDOW,
    client::Pool,
    connect_request,
    server::{Connect, Handler, Server},
};
use crate::{
    identity::{WorkloadCert, testing::Ca},
    socket::Local,
    telemetry::Outcome,
};

const TRUST_DOMAIN: &str = "cluster.local";

fn identity(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{name}")
}

/// A server that answers by the target port: 401 on port 1, 503 on port 2, and
/// otherwise accepts and echoes the stream back.
struct Echo {
    cert: Arc<WorkloadCert>,
    /// TLS handshakes attempted (one certificate lookup each).
    handshakes: AtomicUsize,
    refusals: Mutex<Vec<String>>,
    requests: Mutex<Vec<http::request::Parts>>,
    identities: Mutex<Vec<String>>,
    /// Authorization policies the server applies (as the agent's handler does).
    policies: Option<mesh_common::config::Config>,
}

impl Handler for Echo {
    fn certificate(&self) -> Result<Arc<WorkloadCert>, HboneError> {
        self.handshakes.fetch_add(1, Ordering::SeqCst);
        Ok(self.cert.clone())
    }

    fn trusts(&self, identity: &str) -> bool {
        identity.starts_with(&format!("spiffe://{TRUST_DOMAIN}/"))
    }

    fn refused(&self, _peer: SocketAddr, reason: &str) {
        self.refusals.lock().unwrap().push(reason.to_owned());
    }

    async fn serve(self: Arc<Self>, connect: Connect) {
        self.identities.lock().unwrap().push(connect.identity.to_string());
        self.requests.lock().unwrap().push(connect.request.clone());
        let target = connect.authority().and_then(|a| a.parse::<SocketAddr>().ok());
        if let (Some(config), Some(target)) = (&self.policies, target) {
            let labels = [("app".to_owned(), "server".to_owned())].into();
            let workload = mesh_common::policy::Workload { namespace: "default", labels: &labels };
            let connection = mesh_common::policy::Connection {
                source_identity: Some(&connect.identity),
                source_ip: connect.peer.ip(),
                destination_ip: target.ip(),
                destination_port: target.port(),
            };
            if let mesh_common::policy::Verdict::Deny { .. } =
                mesh_common::policy::authorize(config, &workload, &connection)
            {
                return connect.refuse(http::StatusCode::UNAUTHORIZED);
            }
        }
        let port = target.map_or(0, |a| a.port());
        match port {
            1 => connect.refuse(http::StatusCode::UNAUTHORIZED),
            2 => connect.refuse(http::StatusCode::SERVICE_UNAVAILABLE),
            _ => {
                let Ok(stream) = connect.accept() else { return };
                let (mut reader, mut writer) = tokio::io::split(stream);
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            }
        }
    }
}

struct Harness {
    ca: Ca,
    echo: Arc<Echo>,
    /// Tunnel connections the server has finished with.
    ended: Arc<AtomicUsize>,
    addr: SocketAddr,
    server_identity: String,
}

async fn start() -> Harness {
    start_with(None).await
}

async fn start_with(policies: Option<mesh_common::config::Config>) -> Harness {
    let ca = Ca::new();
    let server_identity = identity("server");
    let echo = Arc::new(Echo {
        cert: ca.cert(&server_identity),
        handshakes: AtomicUsize::new(0),
        refusals: Mutex::default(),
        requests: Mutex::default(),
        identities: Mutex::default(),
        policies,
    });
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(echo.clone());
    let ended = Arc::new(AtomicUsize::new(0));
    let count = ended.clone();
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = listener.accept().await {
            let (server, count) = (server.clone(), count.clone());
            tokio::spawn(async move {
                server.serve(tcp, peer, std::future::pending()).await;
                count.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Harness { ca, echo, ended, addr, server_identity }
}

fn target(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 1, 2, 3], port))
}

fn source() -> SocketAddr {
    SocketAddr::from(([10, 9, 8, 7], 40_000))
}

#[tokio::test]
async fn a_stream_carries_bytes_both_ways_through_a_half_close() {
    let h = start().await;
    let pool = Pool::new(Duration::from_secs(5));
    let cert = h.ca.cert(&identity("client"));
    let request = || connect_request(target(8080), source(), "k8s.deployment.name=client");
    let (stream, _guard) = pool.connect(&Local, cert, h.addr, &h.server_identity, request).await.unwrap();
    let bulk: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = bulk.clone();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let writing = tokio::spawn(async move {
        writer.write_all(&sent).await.unwrap();
        writer.shutdown().await.unwrap();
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), reader.read_to_end(&mut echoed)).await.unwrap().unwrap();
    writing.await.unwrap();
    assert_eq!(echoed.len(), bulk.len());
    assert!(echoed == bulk, "every byte back, in order, then end of stream");
    assert_eq!(
        h.echo.identities.lock().unwrap().as_slice(),
        [identity("client")],
        "the server saw the client's identity"
    );
}

#[tokio::test]
async fn an_idle_connection_released_from_the_pool_closes_at_once() {
    let h = start().await;
    let pool = Pool::new(Duration::from_secs(5));
    let cert = h.ca.cert(&identity("client"));
    let request = || connect_request(target(8080), source(), "");
    let (mut stream, slot) = pool.connect(&Local, cert, h.addr, &h.server_identity, request).await.unwrap();
    stream.write_all(b"x").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    drop((stream, slot));
    pool.release_idle(Duration::from_mins(5), Duration::from_secs(10));
    assert_eq!(pool.connections(), 1, "an idle connection is kept for a while");
    pool.release_idle(Duration::ZERO, Duration::ZERO);
    assert_eq!(pool.connections(), 0);
    // Not at the next keepalive ping (30 s): now.
    let closed = async {
        while h.ended.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(2), closed).await.expect("the server saw the connection close");
}

#[tokio::test]
async fn the_server_answers_401_and_503_and_the_client_reports_them() {
    let h = start().await;
    let pool = Pool::new(Duration::from_secs(5));
    let cert = h.ca.cert(&identity("client"));
    for (port, status, outcome) in [
        (1, http::StatusCode::UNAUTHORIZED, Outcome::Denied),
        (2, http::StatusCode::SERVICE_UNAVAILABLE, Outcome::ConnectFailed),
    ] {
        let request = || connect_request(target(port), source(), "");
        let Err(error) = pool.connect(&Local, cert.clone(), h.addr, &h.server_identity, request).await else {
            panic!("port {port} must be refused");
        };
        assert!(matches!(error, HboneError::Status(s) if s == status), "{error:?}");
        assert_eq!(error.outcome(), outcome);
    }
    assert_eq!(pool.opened.load(Ordering::SeqCst), 1, "refused streams do not cost the pooled connection");
}

#[tokio::test]
async fn authorization_policies_decide_on_the_verified_client_identity() {
    let yaml = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: only-client\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: server\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/client\"]\n    to:\n    - operation:\n        ports: [\"8080\"]\n";
    let config =
        mesh_common::config::load(&[mesh_common::config::Source { name: "policy.yaml".into(), text: yaml.into() }])
            .unwrap();
    let h = start_with(Some(config)).await;
    let pool = Pool::new(Duration::from_secs(5));
    let connect = |name: &str, port: u16| {
        let cert = h.ca.cert(&identity(name));
        let pool = &pool;
        let expected = h.server_identity.clone();
        async move {
            let request = || connect_request(target(port), source(), "");
            pool.connect(&Local, cert, h.addr, &expected, request).await.map(|_| ())
        }
    };
    connect("client", 8080).await.expect("the allowed principal on the allowed port");
    let denied = connect("other", 8080).await.expect_err("another principal is denied");
    assert!(matches!(denied, HboneError::Status(http::StatusCode::UNAUTHORIZED)), "{denied:?}");
    let denied = connect("client", 9090).await.expect_err("another port is denied");
    assert!(matches!(denied, HboneError::Status(http::StatusCode::UNAUTHORIZED)), "{denied:?}");
}

#[tokio::test]
async fn a_hundred_concurrent_first_connections_make_one_handshake() {
    let h = start().await;
    let pool = Arc::new(Pool::new(Duration::from_secs(5)));
    let cert = h.ca.cert(&identity("client"));
    let mut tasks = Vec::new();
    for i in 0..100u16 {
        let (pool, cert, addr, expected) = (pool.clone(), cert.clone(), h.addr, h.server_identity.clone());
        tasks.push(tokio::spawn(async move {
            let request = || connect_request(target(8000 + i), source(), "");
            let (mut stream, guard) = pool.connect(&Local, cert, addr, &expected, request).await.unwrap();
            stream.write_all(&i.to_be_bytes()).await.unwrap();
            let mut back = [0u8; 2];
            stream.read_exact(&mut back).await.unwrap();
            assert_eq!(back, i.to_be_bytes());
            (stream, guard)
        }));
    }
    let mut open = Vec::new();
    for task in tasks {
        open.push(tokio::time::timeout(Duration::from_secs(20), task).await.unwrap().unwrap());
    }
    assert_eq!(pool.opened.load(Ordering::SeqCst), 1, "one TLS handshake for the whole burst");
    assert_eq!(h.echo.handshakes.load(Ordering::SeqCst), 1, "the server saw one connection");
    assert_eq!(h.echo.requests.lock().unwrap().len(), 100);
    assert_eq!(pool.connections(), 1);
    drop(open);
}

#[tokio::test]
async fn the_client_refuses_a_server_with_another_identity_and_the_server_a_foreign_domain() {
    let h = start().await;
    let pool = Pool::new(Duration::from_secs(5));
    let cert = h.ca.cert(&identity("client"));
    let request = || connect_request(target(8080), source(), "");
    let error = pool.connect(&Local, cert, h.addr, &identity("someone-else"), request).await.err().unwrap();
    assert!(matches!(error, HboneError::Tls { .. }), "{error:?}");
    let foreign = h.ca.cert("spiffe://other.domain/ns/default/sa/client");
    let result = pool.connect(&Local, foreign, h.addr, &h.server_identity, request).await;
    assert!(result.is_err(), "a client of another trust domain gets no stream");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let refusals = h.echo.refusals.lock().unwrap().clone();
    assert!(refusals.iter().any(|r| r.contains("not of a trusted domain")), "{refusals:?}");
    assert!(h.echo.requests.lock().unwrap().is_empty(), "no request reached the handler");
}

#[tokio::test]
async fn garbage_from_a_peer_does_not_take_the_server_down() {
    let h = start().await;
    for garbage in
        [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0][..], &[0u8; 4096][..]]
    {
        let mut tcp = TcpStream::connect(h.addr).await.unwrap();
        let _ = tcp.write_all(garbage).await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut sink)).await;
    }
    let pool = Pool::new(Duration::from_secs(5));
    let request = || connect_request(target(8080), source(), "");
    let cert = h.ca.cert(&identity("client"));
    let (mut stream, _guard) = pool.connect(&Local, cert, h.addr, &h.server_identity, request).await.unwrap();
    stream.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    assert_eq!(h.echo.refusals.lock().unwrap().len(), 3, "each garbage connection refused in the handshake");
}

// ---- wire details, pinned against raw peers ----

/// A rustls client with our provider and the given tweaks.
fn raw_client(
    cert: Option<&WorkloadCert>,
    alpn: &[&[u8]],
    suites: Option<Vec<rustls::SupportedCipherSuite>>,
) -> rustls::ClientConfig {
    let mut provider = (*mesh_common::tls::provider()).clone();
    if let Some(suites) = suites {
        provider.cipher_suites = suites;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer));
    let mut config = match cert {
        Some(cert) => builder
            .with_client_auth_cert(
                mesh_common::tls::certs(&cert.chain_pem.concat()).unwrap(),
                rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// Frames of HTTP/2 read raw: (type, flags, stream, payload).
async fn read_frames<S: tokio::io::AsyncRead + Unpin>(
    io: &mut S,
    until: impl Fn(&[(u8, u8, u32, Vec<u8>)]) -> bool,
) -> Vec<(u8, u8, u32, Vec<u8>)> {
    let mut frames = Vec::new();
    let read = async {
        while !until(&frames) {
            let mut header = [0u8; 9];
            if io.read_exact(&mut header).await.is_err() {
                break;
            }
            let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            let mut payload = vec![0u8; len];
            io.read_exact(&mut payload).await.unwrap();
            let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
            frames.push((header[3], header[4], stream, payload));
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read).await.expect("frames in time");
    frames
}

fn settings(frames: &[(u8, u8, u32, Vec<u8>)]) -> Vec<(u16, u32)> {
    let (_, _, _, payload) = frames.iter().find(|f| f.0 == 0x4 && f.1 & 0x1 == 0).expect("a SETTINGS frame");
    payload
        .chunks(6)
        .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
        .collect()
}

fn connection_window_update(frames: &[(u8, u8, u32, Vec<u8>)]) -> Option<u32> {
    frames
        .iter()
        .find(|f| f.0 == 0x8 && f.2 == 0)
        .map(|f| u32::from_be_bytes([f.3[0], f.3[1], f.3[2], f.3[3]]) & 0x7fff_ffff)
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];

#[tokio::test]
async fn the_server_speaks_tls13_aes_gcm_h2_requires_a_client_certificate_and_does_not_resume() {
    let h = start().await;
    let cert = h.ca.cert(&identity("client"));
    let connect = |config: rustls::ClientConfig| async move {
        let tcp = TcpStream::connect(h.addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(ServerName::IpAddress(h.addr.ip().into()), tcp).await
    };
    // Ours: TLS 1.3, an AES-GCM suite, h2, and the server's HTTP/2 settings.
    let config = Arc::new(raw_client(Some(&cert), &[b"h2"], None));
    let mut tls = connect((*config).clone()).await.unwrap();
    let (_, session) = tls.get_ref();
    assert_eq!(session.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let suite = session.negotiated_cipher_suite().unwrap().suite();
    assert!(
        [rustls::CipherSuite::TLS13_AES_256_GCM_SHA384, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256].contains(&suite),
        "{suite:?}"
    );
    assert_eq!(session.alpn_protocol(), Some(&b"h2"[..]));
    // Post-quantum hybrid key exchange first (what ztunnel's COMPLIANCE_POLICY=pqc
    // requires).
    assert_eq!(
        session.negotiated_key_exchange_group().map(rustls::crypto::SupportedKxGroup::name),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    tls.write_all(PREFACE).await.unwrap();
    tls.write_all(&EMPTY_SETTINGS).await.unwrap();
    let frames = read_frames(&mut tls, |f| f.iter().any(|f| f.0 == 0x4) && connection_window_update(f).is_some()).await;
    let mut settings = settings(&frames);
    settings.sort_unstable();
    assert_eq!(
        settings,
        [(0x3, SERVER_MAX_STREAMS), (0x4, STREAM_WINDOW), (0x5, MAX_FRAME), (0x6, MAX_HEADER_LIST)],
        "MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE"
    );
    assert_eq!(connection_window_update(&frames), Some(CONNECTION_WINDOW - 65_535));
    assert_eq!((STREAM_WINDOW, CONNECTION_WINDOW, MAX_FRAME), (4 << 20, 16 << 20, 1 << 20));
    drop(tls);

    // No session resumption: a second connection with the same client config (which
    // would resume if offered a ticket) makes a full handshake.
    let tls = connect((*config).clone()).await.unwrap();
    assert_eq!(tls.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Full));
    drop(tls);

    // Refused: no client certificate, no common ALPN, no AES-GCM suite.
    let refusals_before = h.echo.refusals.lock().unwrap().len();
    let no_cert = raw_client(None, &[b"h2"], None);
    if let Ok(mut tls) = connect(no_cert).await {
        // TLS 1.3: the client learns of the refusal on its first read.
        let mut buf = [0u8; 1];
        assert!(!matches!(tls.read(&mut buf).await, Ok(1)), "a client without a certificate gets nothing");
    }
    assert!(connect(raw_client(Some(&cert), &[b"http/1.1"], None)).await.is_err(), "ALPN h2 only");
    let chacha = vec![rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256];
    assert!(connect(raw_client(Some(&cert), &[b"h2"], Some(chacha))).await.is_err(), "AES-GCM suites only");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.echo.refusals.lock().unwrap().len(), refusals_before + 3);
}

/// A raw TLS server with the given certificate (requires a client certificate).
async fn raw_server(cert: &WorkloadCert) -> (TcpListener, tokio_rustls::TlsAcceptor) {
    let config =
        mesh_common::tls::server_config(&cert.chain_pem.concat(), &cert.key_pem, std::slice::from_ref(&cert.root_pem))
            .unwrap();
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    (listener, tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

#[tokio::test]
async fn the_client_sends_no_sni_h2_settings_and_a_connect_with_hbone_headers() {
    let ca = Ca::new();
    let server_cert = ca.cert(&identity("server"));
    let client_cert = ca.cert(&identity("client"));
    let (listener, acceptor) = raw_server(&server_cert).await;
    let addr = listener.local_addr().unwrap();

    // First connection read raw: the TLS session and the client's first frames.
    let raw = tokio::spawn({
        let acceptor = acceptor.clone();
        async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let (_, session) = tls.get_ref();
            let facts = (
                session.server_name().map(str::to_owned),
                session.alpn_protocol().map(<[u8]>::to_vec),
                session.protocol_version(),
                super::peer_identity(session),
            );
            let mut preface = [0u8; 24];
            tls.read_exact(&mut preface).await.unwrap();
            assert_eq!(preface, PREFACE);
            let frames = read_frames(&mut tls, |f| f.iter().any(|f| f.0 == 0x1)).await;
            (facts, frames, listener)
        }
    });
    let pool = Pool::new(Duration::from_secs(5));
    let request = || connect_request(target(8080), source(), "k8s.namespace.name=default");
    let server_identity = identity("server");
    let first = pool.connect(&Local, client_cert.clone(), addr, &server_identity, request);
    let (first, raw) = tokio::join!(first, raw);
    assert!(first.is_err(), "the raw server never answers");
    let ((sni, alpn, version, peer), frames, listener) = raw.unwrap();
    assert_eq!(sni, None, "no SNI: peers are reached by address");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert_eq!(peer, Some(identity("client")), "the client presented its workload certificate");
    let mut settings = settings(&frames);
    settings.sort_unstable();
    assert_eq!(settings, [(0x2, 0), (0x4, STREAM_WINDOW), (0x5, MAX_FRAME), (0x6, MAX_HEADER_LIST)]);
    assert_eq!(connection_window_update(&frames), Some(CONNECTION_WINDOW - 65_535));
    let headers = frames.iter().find(|f| f.0 == 0x1).unwrap();
    assert_eq!(headers.1 & 0x1, 0, "a CONNECT's HEADERS do not end the stream");

    // Second connection through a real HTTP/2 server: the request itself.
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut connection = h2::server::handshake(tls).await.unwrap();
        let (request, mut respond) = connection.accept().await.unwrap().unwrap();
        tokio::spawn(async move { while connection.accept().await.is_some() {} });
        let mut send = respond.send_response(http::Response::new(()), false).unwrap();
        let (parts, mut body) = request.into_parts();
        let data = body.data().await.unwrap().unwrap();
        send.send_data(data, true).unwrap();
        parts
    });
    let (mut stream, _guard) = pool.connect(&Local, client_cert, addr, &identity("server"), request).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    stream.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"ping");
    let parts = server.await.unwrap();
    assert_eq!(parts.method, http::Method::CONNECT);
    assert_eq!(parts.uri.authority().map(http::uri::Authority::as_str), Some("10.1.2.3:8080"));
    assert_eq!(parts.uri.scheme(), None, "CONNECT has no :scheme");
    assert_eq!(parts.headers["forwarded"], "for=\"10.9.8.7:40000\"");
    assert_eq!(parts.headers["baggage"], "k8s.namespace.name=default");
    let traceparent = parts.headers["traceparent"].to_str().unwrap();
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent}");
    assert_eq!((fields[0], fields[1].len(), fields[2].len(), fields[3]), ("00", 32, 16, "00"), "{traceparent}");
    assert!(fields[1].chars().chain(fields[2].chars()).all(|c| c.is_ascii_hexdigit()), "{traceparent}");
}

/// The raw client checks nothing of the server: these tests look at what the server
/// does with a client, not the other way round.
#[derive(Debug)]
struct AcceptAnyServer;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &rustls::pki_types::CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        mesh_common::tls::provider().signature_verification_algorithms.supported_schemes()
    }
}
