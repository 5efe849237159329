//! A hostile (or merely odd) client of an agent's tunnel port, for the tests of bad
//! input: it speaks TLS and HTTP/2 itself so that it can send what no well-behaved
//! client would (other methods, foreign authorities, wrong certificates, a flood of
//! reset streams). It runs on its own thread inside a lab network namespace.
use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};

/// A client certificate (leaf first) and its key, PEM.
#[derive(Clone, Debug)]
pub struct Credential {
    pub chain_pem: String,
    pub key_pem: String,
}

/// Signs a leaf for `identity` with the CA in `ca_dir` (`root-cert.pem`,
/// `root-key.pem`), valid from `not_before` to `not_after` (years, months, days).
pub fn issue(
    ca_dir: &Path,
    identity: &str,
    not_before: (i32, u8, u8),
    not_after: (i32, u8, u8),
) -> anyhow::Result<Credential> {
    let root_pem = std::fs::read_to_string(ca_dir.join("root-cert.pem"))?;
    let root_key = KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("root-key.pem"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&root_pem, root_key)?;
    leaf(&issuer, identity, not_before, not_after)
}

/// A leaf for `identity` from a root nobody in the mesh trusts.
pub fn foreign(identity: &str) -> anyhow::Result<Credential> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = Issuer::new(params, key);
    leaf(&issuer, identity, (2020, 1, 1), (2099, 1, 1))
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    identity: &str,
    not_before: (i32, u8, u8),
    not_after: (i32, u8, u8),
) -> anyhow::Result<Credential> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
    params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
    let cert = params.signed_by(&key, issuer)?;
    Ok(Credential { chain_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// What a probe ran into.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The TLS handshake (or the first read after it) failed.
    TlsRefused(String),
    /// The server answered the request with this status.
    Status(u16),
    /// HTTP/2 failed after TLS (GOAWAY, reset, closed).
    Http(String),
}

/// What to send.
#[derive(Clone, Debug)]
pub enum Request {
    /// One request with this method and authority (`CONNECT` takes only the authority).
    Single { method: String, authority: String },
    /// `count` CONNECT requests each reset by the client right away (rapid reset).
    RapidReset { count: usize, authority: String },
}

/// Runs one probe against `addr` from inside the network namespace `netns`.
pub fn run(netns: &str, addr: SocketAddr, credential: Option<Credential>, request: Request) -> anyhow::Result<Outcome> {
    let netns = format!("/run/netns/{netns}");
    std::thread::spawn(move || -> anyhow::Result<Outcome> {
        enter_netns(&netns)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        runtime.block_on(async move {
            tokio::time::timeout(Duration::from_secs(20), probe(addr, credential, request))
                .await
                .context("probe timed out")?
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
}

/// Writes raw bytes to `addr` and returns what came back before the server closed.
pub fn garbage(netns: &str, addr: SocketAddr, bytes: &'static [u8]) -> anyhow::Result<Vec<u8>> {
    let netns = format!("/run/netns/{netns}");
    std::thread::spawn(move || -> anyhow::Result<Vec<u8>> {
        use std::io::{Read, Write};
        enter_netns(&netns)?;
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        stream.write_all(bytes)?;
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        Ok(reply)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
}

#[allow(unsafe_code)]
fn enter_netns(path: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).with_context(|| format!("open {path}"))?;
    // SAFETY: plain syscall on a valid fd; it only changes this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Accepts any server certificate: the probe tests the server's checks, not its own.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn probe(addr: SocketAddr, credential: Option<Credential>, request: Request) -> anyhow::Result<Outcome> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut config = match &credential {
        Some(c) => builder.with_client_auth_cert(
            CertificateDer::pem_slice_iter(c.chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?,
            PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = match tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
    {
        Ok(tls) => tls,
        Err(error) => return Ok(Outcome::TlsRefused(error.to_string())),
    };
    // In TLS 1.3 the server judges the client certificate after the client thinks the
    // handshake is done: a refusal shows as an alert on the first read (h2's handshake).
    let (client, connection) = match h2::client::handshake(tls).await {
        Ok(pair) => pair,
        Err(error) => return Ok(Outcome::TlsRefused(error.to_string())),
    };
    let driver = tokio::spawn(connection);
    let outcome = match request {
        Request::Single { method, authority } => {
            let uri = if method == "CONNECT" { authority.clone() } else { format!("https://{authority}/") };
            let request = http::Request::builder().method(method.as_str()).uri(uri).body(())?;
            let result = async {
                let mut client = client.ready().await?;
                let (response, mut stream) = client.send_request(request, false)?;
                let response = response.await?;
                let _ = stream.send_data(bytes::Bytes::new(), true);
                Ok::<_, h2::Error>(response.status().as_u16())
            }
            .await;
            match result {
                Ok(status) => Outcome::Status(status),
                Err(error) if error.is_io() || error.get_io().is_some() => Outcome::TlsRefused(error.to_string()),
                Err(error) => Outcome::Http(error.to_string()),
            }
        }
        Request::RapidReset { count, authority } => {
            let mut failure = None;
            for _ in 0..count {
                let request = http::Request::builder().method("CONNECT").uri(authority.as_str()).body(())?;
                let sent = async {
                    let mut ready = client.clone().ready().await?;
                    let (_, mut stream) = ready.send_request(request, false)?;
                    stream.send_reset(h2::Reason::CANCEL);
                    Ok::<_, h2::Error>(())
                }
                .await;
                if let Err(error) = sent {
                    failure = Some(error.to_string());
                    break;
                }
            }
            // Wait for the server's verdict on the connection (GOAWAY or close).
            let closed = tokio::time::timeout(Duration::from_secs(5), driver).await;
            match (failure, closed) {
                (Some(error), _) => Outcome::Http(error),
                (None, Ok(Ok(Err(error)))) => Outcome::Http(error.to_string()),
                (None, Ok(_)) => Outcome::Http("connection closed".into()),
                (None, Err(_)) => Outcome::Status(0),
            }
        }
    };
    Ok(outcome)
}
