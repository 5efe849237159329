//! TLS configuration shared by the controller and the agents: TLS 1.3 only, AES-GCM
//! suites only, ALPN `h2`, client certificates required, no session resumption.
use std::{string::String, sync::Arc, vec::Vec};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    client::Resumption,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::{NoServerSessionStorage, WebPkiClientVerifier},
};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no certificate in the PEM data")]
    NoCertificate,
    #[error("bad PEM data")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The crypto provider: ring, restricted to the TLS 1.3 AES-GCM suites.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = std::vec![
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
    ];
    Arc::new(provider)
}

pub fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(certs)
}

pub fn roots(pems: &[String]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for pem in pems {
        for cert in certs(pem)? {
            store.add(cert)?;
        }
    }
    Ok(store)
}

/// A server that requires a client certificate chaining to `root_pems`.
pub fn server_config(chain_pem: &str, key_pem: &str, root_pems: &[String]) -> Result<ServerConfig, TlsError> {
    server_config_with(chain_pem, key_pem, root_pems, true)
}

/// Like [`server_config`], but a client may also come without a certificate (it then
/// authenticates otherwise, e.g. with a bearer token). A certificate it does present
/// must still chain to `root_pems`.
pub fn server_config_optional_client(
    chain_pem: &str,
    key_pem: &str,
    root_pems: &[String],
) -> Result<ServerConfig, TlsError> {
    server_config_with(chain_pem, key_pem, root_pems, false)
}

fn server_config_with(
    chain_pem: &str,
    key_pem: &str,
    root_pems: &[String],
    client_cert_required: bool,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(root_pems)?), provider.clone());
    let verifier = if client_cert_required { builder.build()? } else { builder.allow_unauthenticated().build()? };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(chain_pem)?, PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?)?;
    config.alpn_protocols = std::vec![b"h2".to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client presenting `chain_pem` and trusting `root_pems`.
pub fn client_config(chain_pem: &str, key_pem: &str, root_pems: &[String]) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(root_pems)?)
        .with_client_auth_cert(certs(chain_pem)?, PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?)?;
    config.alpn_protocols = std::vec![b"h2".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// A client without a certificate of its own (it authenticates with a token),
/// trusting `root_pems`.
pub fn anonymous_client_config(root_pems: &[String]) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(root_pems)?)
        .with_no_client_auth();
    config.alpn_protocols = std::vec![b"h2".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// The URI SANs of a DER certificate (SPIFFE identities).
pub fn uri_sans(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(sans)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    sans.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(String::from(*uri)),
            _ => None,
        })
        .collect()
}

/// Seconds since the epoch at which a PEM certificate expires.
pub fn not_after(pem: &str) -> Option<i64> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = certs(pem).ok()?.into_iter().next()?;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// A fresh ECDSA P-256 key and a CSR for `identity` (a URI SAN), both PEM: what an
/// agent sends to the controller.
pub fn make_csr(identity: &str) -> Result<(String, String), rcgen::Error> {
    use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = std::vec![SanType::URI(identity.try_into()?)];
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// A client for the HBONE tunnel: presents `chain_pem`, and accepts only a server
/// whose certificate chains to `root_pems` and names `expected_identity` as a URI SAN
/// (the server name of the TLS handshake plays no part: pods are reached by IP).
pub fn workload_client_config(
    chain_pem: &str,
    key_pem: &str,
    root_pems: &[String],
    expected_identity: &str,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: Arc::new(roots(root_pems)?),
        expected: expected_identity.into(),
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs(chain_pem)?, PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?)?;
    config.alpn_protocols = std::vec![b"h2".to_vec()];
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// Why a server's certificate was refused although its chain is valid.
#[derive(Debug, thiserror::Error)]
#[error("server identity is {found:?}, expected {expected}")]
pub struct WrongIdentity {
    pub expected: String,
    pub found: Vec<String>,
}

/// Verifies the chain like any web PKI client (signatures, validity, serverAuth EKU),
/// then requires the expected SPIFFE identity instead of a DNS name.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
    provider: Arc<CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let found = uri_sans(end_entity);
        if !found.contains(&self.expected) {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(WrongIdentity { expected: self.expected.clone(), found }),
            ))));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is never negotiated (the config allows TLS 1.3 only).
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
