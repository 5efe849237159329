//! The agent's side of the control plane: a client that keeps a configuration stream
//! open to the controller (reconnecting with backoff) and publishes every applied
//! version to a watch channel the data path reads, and that requests workload
//! certificates. With the controller unreachable, the last applied configuration
//! stays in force (static stability).
use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, client::conn::http2::SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_common::{
    config::Config,
    control::{
        ACK_PATH, Ack, CERTIFICATE_PATH, CONFIG_PATH, CONTROLLER_NAME, CertificateRequest, CertificateResponse,
        RawConfigMessage, RawObjects, materialize_raw,
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
    /// 0 until the first snapshot arrives.
    pub version: u64,
    /// Objects per kind in the view.
    pub kinds: std::collections::BTreeMap<String, usize>,
    pub config: Config,
}

pub struct ControlClient {
    /// `host:port`; a DNS name is resolved on every connect (the controller's Service).
    addr: String,
    /// Kubernetes mode: the projected `ServiceAccount` token, re-read on every connect
    /// (kubelet rotates it).
    token_file: Option<PathBuf>,
    tls: TlsConnector,
    state: watch::Sender<Arc<ConfigState>>,
}

type Sender = SendRequest<Full<Bytes>>;

impl ControlClient {
    pub fn new(addr: String, tls: rustls::ClientConfig, token_file: Option<PathBuf>) -> Self {
        let (state, _) = watch::channel(Arc::new(ConfigState::default()));
        Self { addr, token_file, tls: TlsConnector::from(Arc::new(tls)), state }
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
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.session().await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(error) => {
                    let version = self.current().version;
                    warn!(%error, version, retry_in = ?backoff, "configuration stream down; keeping the current configuration");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn session(&self) -> Result<(), ControlError> {
        let mut sender = self.connect().await?;
        let request = self.request(Method::GET, CONFIG_PATH, Bytes::new())?;
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::OK {
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            return Err(ControlError::Status { status, message: String::from_utf8_lossy(&body).trim().to_owned() });
        }
        info!(addr = %self.addr, "configuration stream open");
        let mut body = response.into_body();
        let mut buffer = BytesMut::new();
        // The view as JSON text; the first message of every stream is a snapshot.
        let mut objects = RawObjects::new();
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else { continue };
            buffer.extend_from_slice(&data);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line = buffer.split_to(end + 1);
                let message: RawConfigMessage = serde_json::from_slice(&line).map_err(ControlError::BadMessage)?;
                drop(line);
                let version = message.version;
                let large = message.objects.is_some() || message.upserts.as_ref().is_some_and(|u| u.len() > 1000);
                message.apply(&mut objects);
                match materialize_raw(objects.iter().map(|(k, v)| (k, v.get()))) {
                    Ok(config) => {
                        let mut kinds = std::collections::BTreeMap::new();
                        for key in objects.keys() {
                            *kinds.entry(key.split('/').next().unwrap_or("").to_owned()).or_insert(0) += 1;
                        }
                        info!(version, objects = objects.len(), "configuration applied");
                        let previous = self.state.send_replace(Arc::new(ConfigState { version, kinds, config }));
                        if large {
                            // A snapshot leaves the parse buffers and the previous view
                            // freed but still held by the allocator: hand them back.
                            drop(previous);
                            if buffer.is_empty() && buffer.capacity() > 1 << 20 {
                                buffer = BytesMut::new();
                            }
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

/// Returns free heap memory to the kernel (glibc keeps freed memory otherwise, so a
/// multi-megabyte snapshot would stay in the agent's RSS long after it was parsed).
#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim only releases memory the allocator already considers free;
    // it takes no pointers and is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}
