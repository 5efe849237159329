//! The agent's side of the control plane: a client that keeps a configuration stream
//! open to the controller (reconnecting with backoff) and publishes every applied
//! version to a watch channel the data path reads, and that requests workload
//! certificates. With the controller unreachable, the last applied configuration
//! stays in force (static stability).
use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, client::conn::http2::SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_common::{
    config::Config,
    control::{
        ACK_PATH, Ack, CERTIFICATE_PATH, CONFIG_PATH, CONTROLLER_NAME, CertificateRequest, CertificateResponse,
        RawConfigMessage, RawObjects, materialize_node, materialize_raw,
    },
};
use rustls::pki_types::ServerName;
use tokio::{net::TcpStream, sync::watch};
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach the controller at {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the token file {path}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP/2 with the controller")]
    Http(#[from] hyper::Error),
    #[error("the controller answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("the controller sent a message that is not valid")]
    BadMessage(#[source] serde_json::Error),
    #[error("the configuration stream ended")]
    StreamEnded,
    #[error("cannot make a certificate signing request")]
    Csr(#[source] rcgen::Error),
}

/// What the agent currently runs with.
#[derive(Debug, Default)]
pub struct ConfigState {
    /// 0 until a view is applied (from the controller or restored from the state
    /// directory). Without a view the agent knows no destination and refuses every
    /// captured connection.
    pub version: u64,
    /// The view was read from the state directory at startup and the controller has
    /// not answered since.
    pub restored: bool,
    /// When the controller sent this view (Unix seconds).
    pub received_at: i64,
    /// Objects per kind in the view.
    pub kinds: std::collections::BTreeMap<String, usize>,
    pub config: Config,
}

/// The TLS settings a node-side process (agent, waypoint) reaches the controller with:
/// the node's bootstrap credential (`node-cert.pem`, `node-key.pem`, `root-cert.pem` in
/// `credential_dir`), or, in Kubernetes mode, only the root to verify the controller
/// with (the process then authenticates with its token). The error names the file.
pub fn client_tls(
    credential_dir: Option<&std::path::Path>,
    root_cert: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, String> {
    let read = |path: PathBuf| std::fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()));
    match (credential_dir, root_cert) {
        (Some(dir), _) => mesh_common::tls::client_config(
            &read(dir.join("node-cert.pem"))?,
            &read(dir.join("node-key.pem"))?,
            &[read(dir.join("root-cert.pem"))?],
        )
        .map_err(|e| format!("node credential in {}: {e}", dir.display())),
        (None, Some(root)) => mesh_common::tls::anonymous_client_config(&[read(root.to_path_buf())?])
            .map_err(|e| format!("root certificate {}: {e}", root.display())),
        (None, None) => Err("a credential is needed: --credential-dir or --token-file".to_owned()),
    }
}

pub struct ControlClient {
    /// Where the last applied view is kept for a restart without the controller.
    view_file: Option<PathBuf>,
    /// The newest view to write (the writer takes the latest, skipping any it missed).
    saver: watch::Sender<Option<Arc<Vec<u8>>>>,
    /// Whether a configuration stream is open now.
    connected: AtomicBool,
    /// When the controller was last heard from (Unix seconds).
    last_contact: AtomicI64,
    /// `host:port`; a DNS name is resolved on every connect (the controller's Service).
    addr: String,
    /// Kubernetes mode: the projected `ServiceAccount` token, re-read on every connect
    /// (kubelet rotates it).
    token_file: Option<PathBuf>,
    /// A waypoint's [`mesh_common::control::WAYPOINT_HEADER`] value, sent with every
    /// request so that the controller reports it as a waypoint.
    waypoint: Option<String>,
    tls: TlsConnector,
    state: watch::Sender<Arc<ConfigState>>,
    /// Which kinds of the view become typed config.
    materialize: Materialize,
}

/// How a client turns the view's objects into its typed config: [`all_kinds`] or
/// [`node_kinds`].
pub type Materialize = fn(&RawObjects) -> Result<Config, serde_json::Error>;

/// Every kind of the view (a waypoint).
pub fn all_kinds(objects: &RawObjects) -> Result<Config, serde_json::Error> {
    materialize_raw(objects.iter().map(|(k, v)| (k, v.get())))
}

/// The kinds a node agent acts on: the L7 kinds stay unparsed (see
/// [`materialize_node`]).
pub fn node_kinds(objects: &RawObjects) -> Result<Config, serde_json::Error> {
    materialize_node(objects.iter().map(|(k, v)| (k, v.get())))
}

type Sender = SendRequest<Full<Bytes>>;

impl ControlClient {
    /// A client that keeps its last applied view in `view_file` (when given) and types
    /// it with `materialize`.
    pub fn new(
        addr: String,
        tls: rustls::ClientConfig,
        token_file: Option<PathBuf>,
        view_file: Option<PathBuf>,
        materialize: Materialize,
    ) -> Self {
        let (state, _) = watch::channel(Arc::new(ConfigState::default()));
        let (saver, _) = watch::channel(None);
        Self {
            view_file,
            saver,
            connected: AtomicBool::new(false),
            last_contact: AtomicI64::new(0),
            addr,
            token_file,
            waypoint: None,
            tls: TlsConnector::from(Arc::new(tls)),
            state,
            materialize,
        }
    }

    /// Identifies the client as waypoint `namespace/name` running as `service_account`.
    #[must_use]
    pub fn with_waypoint(mut self, namespace: &str, name: &str, service_account: &str) -> Self {
        self.waypoint = Some(mesh_common::control::waypoint_header(namespace, name, service_account));
        self
    }

    /// Applies the view an earlier run saved, unless the controller has already sent
    /// one. Returns its version and age, or why there is none.
    pub fn restore_view(&self) -> Result<(u64, i64), RestoreError> {
        let path = self.view_file.as_ref().ok_or(RestoreError::NoStateDir)?;
        let bytes = std::fs::read(path).map_err(|source| RestoreError::Read { path: path.clone(), source })?;
        let saved: SavedView =
            serde_json::from_slice(&bytes).map_err(|source| RestoreError::Parse { path: path.clone(), source })?;
        if saved.format != crate::state::FORMAT {
            return Err(RestoreError::Format { path: path.clone(), format: saved.format });
        }
        let config =
            (self.materialize)(&saved.objects).map_err(|source| RestoreError::Parse { path: path.clone(), source })?;
        let kinds = count_kinds(&saved.objects);
        let restored = self.state.send_if_modified(|state| {
            if state.version > 0 {
                return false;
            }
            *state = Arc::new(ConfigState {
                version: saved.version,
                restored: true,
                received_at: saved.received_at,
                kinds,
                config,
            });
            true
        });
        if !restored {
            return Err(RestoreError::AlreadyLive);
        }
        self.last_contact.store(saved.received_at, Ordering::Relaxed);
        Ok((saved.version, crate::state::unix_now() - saved.received_at))
    }

    /// Whether a configuration stream is open, and how long ago the controller was
    /// last heard from (0 while connected).
    pub fn staleness(&self) -> (bool, i64) {
        let connected = self.connected.load(Ordering::Relaxed);
        let age = if connected {
            0
        } else {
            let last = self.last_contact.load(Ordering::Relaxed);
            if last == 0 { 0 } else { (crate::state::unix_now() - last).max(0) }
        };
        (connected, age)
    }

    /// Writes every applied view to the state directory, latest first (a slow disk
    /// skips intermediate versions, never the newest).
    async fn save_views(self: Arc<Self>) {
        let Some(path) = self.view_file.clone() else { return };
        let mut views = self.saver.subscribe();
        while views.changed().await.is_ok() {
            let Some(bytes) = views.borrow_and_update().clone() else { continue };
            let path = path.clone();
            let written = tokio::task::spawn_blocking(move || crate::state::write_atomic(&path, &bytes, 0o600)).await;
            if let Ok(Err(error)) = written {
                warn!(file = %self.view_file.as_ref().map_or(String::new(), |p| p.display().to_string()), %error, "cannot save the view; a restart without the controller would have none");
            }
        }
    }

    /// A request with the agent's credential: the token, when it authenticates with one
    /// (otherwise the TLS client certificate does).
    fn request(&self, method: Method, path: &str, body: Bytes) -> Result<Request<Full<Bytes>>, ControlError> {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(path) = &self.token_file {
            let token =
                std::fs::read_to_string(path).map_err(|source| ControlError::Token { path: path.clone(), source })?;
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {}", token.trim()));
        }
        if let Some(waypoint) = &self.waypoint {
            request = request.header(mesh_common::control::WAYPOINT_HEADER, waypoint);
        }
        Ok(request.body(Full::new(body)).expect("valid request"))
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<ConfigState>> {
        self.state.subscribe()
    }

    pub fn current(&self) -> Arc<ConfigState> {
        self.state.borrow().clone()
    }

    async fn connect(&self) -> Result<Sender, ControlError> {
        let connect = |source| ControlError::Connect { addr: self.addr.clone(), source };
        let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(self.addr.as_str()))
            .await
            .map_err(|_| connect(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect)?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(CONTROLLER_NAME).expect("a valid DNS name");
        let tls = tokio::time::timeout(Duration::from_secs(5), self.tls.connect(name, tcp))
            .await
            .map_err(|_| connect(std::io::ErrorKind::TimedOut.into()))?
            .map_err(connect)?;
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%error, "control connection closed");
            }
        });
        Ok(sender)
    }

    /// Keeps the configuration stream open forever.
    pub async fn run(self: Arc<Self>) {
        tokio::spawn(self.clone().save_views());
        let mut backoff = Backoff::default();
        loop {
            let mut applied = false;
            let error = self.session(&mut applied).await.err().unwrap_or(ControlError::StreamEnded);
            self.connected.store(false, Ordering::Relaxed);
            if applied {
                // The controller answered with a configuration this process could
                // apply: the next outage starts from the shortest wait. A stream whose
                // messages do not apply (a newer controller, a bad object) backs off
                // like an outage instead of fetching a snapshot five times a second.
                backoff.reset();
                self.last_contact.store(crate::state::unix_now(), Ordering::Relaxed);
            }
            let wait = backoff.next_wait();
            let version = self.current().version;
            warn!(%error, version, retry_in = ?wait, "configuration stream down; keeping the current configuration");
            tokio::time::sleep(wait).await;
        }
    }

    async fn session(&self, applied: &mut bool) -> Result<(), ControlError> {
        let mut sender = self.connect().await?;
        let request = self.request(Method::GET, CONFIG_PATH, Bytes::new())?;
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            return Err(ControlError::Status { status, message: String::from_utf8_lossy(&body).trim().to_owned() });
        }
        info!(addr = %self.addr, "configuration stream open");
        self.connected.store(true, Ordering::Relaxed);
        let mut body = response.into_body();
        let mut lines = Lines::default();
        // The view as JSON text; the first message of every stream is a snapshot.
        let mut objects = RawObjects::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else { continue };
            lines.push(&data);
            while let Some(line) = lines.next_line() {
                let message: RawConfigMessage = serde_json::from_slice(&line).map_err(ControlError::BadMessage)?;
                drop(line);
                let version = message.version;
                let large = message.objects.is_some() || message.upserts.as_ref().is_some_and(|u| u.len() > 1000);
                message.apply(&mut objects);
                match (self.materialize)(&objects) {
                    Ok(config) => {
                        *applied = true;
                        let kinds = count_kinds(&objects);
                        info!(version, objects = objects.len(), "configuration applied");
                        let received_at = crate::state::unix_now();
                        if self.view_file.is_some() {
                            let saved = SavedView { format: crate::state::FORMAT, version, received_at, objects };
                            let bytes = serde_json::to_vec(&saved).expect("a view serializes");
                            objects = saved.objects;
                            self.saver.send_replace(Some(Arc::new(bytes)));
                        }
                        let previous = self.state.send_replace(Arc::new(ConfigState {
                            version,
                            restored: false,
                            received_at,
                            kinds,
                            config,
                        }));
                        if large {
                            // A snapshot leaves the parse buffers and the previous view
                            // freed but still held by the allocator: hand them back.
                            drop(previous);
                            lines.shrink();
                            trim_heap();
                        }
                        let ack = serde_json::to_vec(&Ack { version }).expect("ack serializes");
                        let mut sender = sender.clone();
                        let request = self.request(Method::POST, ACK_PATH, Bytes::from(ack))?;
                        tokio::spawn(async move {
                            if let Err(error) = sender.send_request(request).await {
                                debug!(%error, "ack not delivered");
                            }
                        });
                    }
                    // Keep running the last good configuration; the stream is restarted
                    // so that a fresh snapshot repairs the copy.
                    Err(error) => {
                        warn!(version, %error, "configuration from the controller does not apply; keeping the current one");
                        return Err(ControlError::BadMessage(error));
                    }
                }
            }
        }
        Err(ControlError::StreamEnded)
    }

    /// Asks the controller to sign a certificate for `identity`; returns the key too.
    pub async fn certificate(&self, identity: &str) -> Result<(CertificateResponse, String), ControlError> {
        let (key_pem, csr_pem) = mesh_common::tls::make_csr(identity).map_err(ControlError::Csr)?;
        let body =
            serde_json::to_vec(&CertificateRequest { identity: identity.to_owned(), csr_pem }).expect("serializes");
        let mut sender = self.connect().await?;
        let request = self.request(Method::POST, CERTIFICATE_PATH, Bytes::from(body))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        if status != StatusCode::OK {
            return Err(ControlError::Status { status, message: String::from_utf8_lossy(&bytes).trim().to_owned() });
        }
        let issued: CertificateResponse = serde_json::from_slice(&bytes).map_err(ControlError::BadMessage)?;
        Ok((issued, key_pem))
    }
}

/// Objects per kind (the part of a key before the first `/`).
fn count_kinds(objects: &RawObjects) -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for key in objects.keys() {
        *kinds.entry(key.split('/').next().unwrap_or("").to_owned()).or_insert(0) += 1;
    }
    kinds
}

/// The last applied view as the state directory keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct SavedView {
    format: u32,
    version: u64,
    received_at: i64,
    objects: RawObjects,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("no state directory")]
    NoStateDir,
    #[error("no saved view at {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the saved view {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the saved view {path} has format {format}, this agent reads {}", crate::state::FORMAT)]
    Format { path: PathBuf, format: u32 },
    #[error("the controller's view arrived first")]
    AlreadyLive,
}

/// The configuration stream's newline-delimited messages, from the chunks it arrives
/// in. A snapshot is one line of many chunks: each byte is scanned for the newline
/// once, not once per chunk that arrives before the line ends.
#[derive(Default)]
struct Lines {
    buffer: BytesMut,
    /// Bytes at the start of `buffer` known to hold no newline.
    scanned: usize,
}

impl Lines {
    fn push(&mut self, data: &[u8]) {
        self.buffer.extend_from_slice(data);
    }

    /// The next whole line, its newline included.
    fn next_line(&mut self) -> Option<BytesMut> {
        let Some(at) = self.buffer[self.scanned..].iter().position(|b| *b == b'\n') else {
            self.scanned = self.buffer.len();
            return None;
        };
        let line = self.buffer.split_to(self.scanned + at + 1);
        self.scanned = 0;
        Some(line)
    }

    /// Hands a snapshot's buffer back once it is empty.
    fn shrink(&mut self) {
        if self.buffer.is_empty() && self.buffer.capacity() > 1 << 20 {
            self.buffer = BytesMut::new();
        }
    }
}

/// Reconnect waits: doubling from 200 ms to 10 s, each with +-50 % jitter so that the
/// agents of a cluster do not reconnect in lock-step after a controller restart.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Backoff::FIRST }
    }
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(10);

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    fn next_wait(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        base.mul_f64(0.5 + jitter())
    }
}

/// A number in [0, 1) that differs between processes and calls.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    let bits = RandomState::new().hash_one(std::time::Instant::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Keeps the allocator to one arena per data-path thread at most: glibc's default
/// (eight per core) spreads a burst of connections over arenas whose freed memory
/// fragments and is hard to give back.
#[allow(unsafe_code)]
pub fn limit_arenas(threads: usize) {
    // SAFETY: mallopt only sets an allocator parameter; called once at startup.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, threads.clamp(1, 8) as libc::c_int);
    }
}

/// Returns free heap memory to the kernel (glibc keeps freed memory otherwise, so a
/// multi-megabyte snapshot would stay in the agent's RSS long after it was parsed).
#[allow(unsafe_code)]
pub fn trim_heap() {
    // SAFETY: malloc_trim only releases memory the allocator already considers free;
    // it takes no pointers and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The allocator's view of the heap, in bytes: (in use, free but kept). A large
/// "free but kept" after a burst means fragmentation, a large "in use" live data.
#[allow(unsafe_code)]
pub fn heap_usage() -> (u64, u64) {
    // SAFETY: mallinfo2 only reads the allocator's counters and returns them by value.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks as u64 + info.hblkhd as u64, info.fordblks as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_whole_from_any_chunking() {
        let text = b"{\"a\":1}\n{\"b\":2}\n\n{\"c\":3}\n";
        for chunk in 1..=text.len() {
            let mut lines = Lines::default();
            let mut seen = Vec::new();
            for piece in text.chunks(chunk) {
                lines.push(piece);
                while let Some(line) = lines.next_line() {
                    seen.push(String::from_utf8(line.to_vec()).unwrap());
                }
            }
            assert_eq!(seen, ["{\"a\":1}\n", "{\"b\":2}\n", "\n", "{\"c\":3}\n"], "chunks of {chunk}");
            assert!(lines.buffer.is_empty());
        }
        // A line split over many chunks is scanned once: what was scanned is not again.
        let mut lines = Lines::default();
        lines.push(b"{\"long\":");
        assert!(lines.next_line().is_none());
        assert_eq!(lines.scanned, 8);
        lines.push(b"1}\nrest");
        assert_eq!(&lines.next_line().unwrap()[..], b"{\"long\":1}\n");
        assert!(lines.next_line().is_none());
        assert_eq!(&lines.buffer[..], b"rest");
    }

    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let mut backoff = Backoff::default();
        let waits: Vec<Duration> = (0..10).map(|_| backoff.next_wait()).collect();
        assert!(waits[0] >= Duration::from_millis(100) && waits[0] < Duration::from_millis(300), "{waits:?}");
        assert!(waits[9] >= Duration::from_secs(5) && waits[9] < Duration::from_secs(15), "{waits:?}");
        backoff.reset();
        assert!(backoff.next_wait() < Duration::from_millis(300));
        // Jitter: two agents starting together do not wait the same.
        let a: Vec<Duration> = (0..5).map(|_| Backoff::default().next_wait()).collect();
        assert!(a.windows(2).any(|w| w[0] != w[1]), "{a:?}");
    }

    #[test]
    fn a_waypoint_names_itself_on_every_request_and_an_agent_does_not() {
        let tls = || {
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth()
        };
        let agent = ControlClient::new("controller:15012".into(), tls(), None, None, node_kinds);
        let request = agent.request(Method::GET, CONFIG_PATH, Bytes::new()).unwrap();
        assert!(request.headers().get(mesh_common::control::WAYPOINT_HEADER).is_none());
        let waypoint = ControlClient::new("controller:15012".into(), tls(), None, None, all_kinds)
            .with_waypoint("shop", "wp", "wp-sa");
        for path in [CONFIG_PATH, ACK_PATH, CERTIFICATE_PATH] {
            let request = waypoint.request(Method::POST, path, Bytes::new()).unwrap();
            assert_eq!(request.headers()[mesh_common::control::WAYPOINT_HEADER], "shop/wp/wp-sa", "{path}");
        }
    }
}
