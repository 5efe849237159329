//! TLS configuration shared by the controller and the agents: TLS 1.3 only, AES-GCM
//! suites only, the hybrid post-quantum key exchange `X25519MLKEM768` preferred with
//! X25519 as fallback, ALPN `h2`, client certificates required, no session resumption.
pub mod hybrid;

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

/// The crypto provider: ring, restricted to the TLS 1.3 AES-GCM suites, with the
/// key exchange groups in order of preference: `X25519MLKEM768` (what Istio's
/// ztunnel requires under `COMPLIANCE_POLICY=pqc`), then X25519, P-256 and P-384.
///
/// A client sends two key shares, `X25519MLKEM768` and X25519 (the same X25519 key,
/// see [`hybrid`]), so a server without the hybrid group completes in one round trip.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite, kx_group};
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = std::vec![cipher_suite::TLS13_AES_256_GCM_SHA384, cipher_suite::TLS13_AES_128_GCM_SHA256];
    provider.kx_groups =
        std::vec![hybrid::x25519_mlkem768(), kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1];
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

#[cfg(test)]
mod tests {
    use std::{boxed::Box, string::ToString, vec};

    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
    use rustls::{
        ClientConnection, HandshakeKind, NamedGroup, PeerMisbehaved, ServerConnection,
        crypto::{ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup},
        pki_types::ServerName,
    };

    use super::*;

    const SERVER_ID: &str = "spiffe://cluster.local/ns/shop/sa/server";
    const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/client";

    /// A throwaway CA with a server and a client credential (chain PEM, key PEM).
    struct Pki {
        root: String,
        server: (String, String),
        client: (String, String),
    }

    impl Pki {
        fn new() -> Self {
            let ca_key = KeyPair::generate().unwrap();
            let mut ca = CertificateParams::default();
            ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let root = ca.self_signed(&ca_key).unwrap().pem();
            let issuer = Issuer::new(ca, ca_key);
            let issue = |identity: &str| {
                let key = KeyPair::generate().unwrap();
                // The DNS name serves the peers that verify the server like a web client.
                let mut params = CertificateParams::new(vec!["server.test".to_string()]).unwrap();
                params.subject_alt_names.push(SanType::URI(identity.try_into().unwrap()));
                params.extended_key_usages =
                    vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
                (params.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
            };
            Self { server: issue(SERVER_ID), client: issue(CLIENT_ID), root }
        }

        fn roots(&self) -> Vec<String> {
            vec![self.root.clone()]
        }

        fn server(&self) -> ServerConfig {
            server_config(&self.server.0, &self.server.1, &self.roots()).unwrap()
        }

        fn client(&self) -> ClientConfig {
            workload_client_config(&self.client.0, &self.client.1, &self.roots(), SERVER_ID).unwrap()
        }

        /// Our provider with only `groups`: a peer that offers (or accepts) nothing else.
        fn peer_provider(groups: &[&'static dyn SupportedKxGroup]) -> Arc<CryptoProvider> {
            Arc::new(CryptoProvider { kx_groups: groups.to_vec(), ..(*provider()).clone() })
        }

        fn peer_server(&self, groups: &[&'static dyn SupportedKxGroup]) -> ServerConfig {
            let provider = Self::peer_provider(groups);
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&self.roots()).unwrap()), provider.clone())
                    .build()
                    .unwrap();
            ServerConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(
                    certs(&self.server.0).unwrap(),
                    PrivateKeyDer::from_pem_slice(self.server.1.as_bytes()).unwrap(),
                )
                .unwrap()
        }

        fn peer_client(&self, groups: &[&'static dyn SupportedKxGroup]) -> ClientConfig {
            ClientConfig::builder_with_provider(Self::peer_provider(groups))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots(&self.roots()).unwrap())
                .with_client_auth_cert(
                    certs(&self.client.0).unwrap(),
                    PrivateKeyDer::from_pem_slice(self.client.1.as_bytes()).unwrap(),
                )
                .unwrap()
        }
    }

    /// Which side of an in-memory handshake failed, and how.
    #[derive(Debug)]
    enum Failed {
        Client(rustls::Error),
        Server(rustls::Error),
    }

    /// Runs a full handshake in memory.
    fn handshake(client: ClientConfig, server: ServerConfig) -> Result<(ClientConnection, ServerConnection), Failed> {
        let name = ServerName::try_from("server.test").unwrap();
        let mut client = ClientConnection::new(Arc::new(client), name).map_err(Failed::Client)?;
        let mut server = ServerConnection::new(Arc::new(server)).map_err(Failed::Server)?;
        for _ in 0..10 {
            let mut flight = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut flight).unwrap();
            }
            let mut rest = flight.as_slice();
            while !rest.is_empty() {
                server.read_tls(&mut rest).unwrap();
                server.process_new_packets().map_err(Failed::Server)?;
            }
            let mut flight = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut flight).unwrap();
            }
            let mut rest = flight.as_slice();
            while !rest.is_empty() {
                client.read_tls(&mut rest).unwrap();
                client.process_new_packets().map_err(Failed::Client)?;
            }
            if !client.is_handshaking() && !server.is_handshaking() && !client.wants_write() {
                return Ok((client, server));
            }
        }
        panic!("the handshake did not finish");
    }

    fn groups(client: &ClientConnection, server: &ServerConnection) -> (NamedGroup, NamedGroup) {
        (
            client.negotiated_key_exchange_group().expect("client group").name(),
            server.negotiated_key_exchange_group().expect("server group").name(),
        )
    }

    #[test]
    fn provider_prefers_the_hybrid_group_then_x25519() {
        let names: Vec<NamedGroup> = provider().kx_groups.iter().map(|group| group.name()).collect();
        assert_eq!(names[..2], [NamedGroup::X25519MLKEM768, NamedGroup::X25519]);
        assert!(provider().cipher_suites.iter().all(|suite| suite.version() == &rustls::version::TLS13));
    }

    #[test]
    fn our_configs_negotiate_x25519mlkem768() {
        let pki = Pki::new();
        let roots = pki.roots();
        let (chain, key) = &pki.client;
        let clients = [
            ("workload", pki.client(), pki.server()),
            ("control", client_config(chain, key, &roots).unwrap(), pki.server()),
            (
                "anonymous",
                anonymous_client_config(&roots).unwrap(),
                server_config_optional_client(&pki.server.0, &pki.server.1, &roots).unwrap(),
            ),
        ];
        for (what, client, server) in clients {
            let (client, server) = handshake(client, server).unwrap_or_else(|e| panic!("{what}: {e:?}"));
            assert_eq!(groups(&client, &server), (NamedGroup::X25519MLKEM768, NamedGroup::X25519MLKEM768), "{what}");
            assert_eq!(client.handshake_kind(), Some(HandshakeKind::Full), "{what}");
            assert_eq!(client.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3), "{what}");
        }
    }

    #[test]
    fn peers_without_the_hybrid_group_still_work() {
        use rustls::crypto::ring::kx_group::{SECP256R1, X25519};
        let pki = Pki::new();
        // A client offering only X25519 against our server.
        let (client, server) = handshake(pki.peer_client(&[X25519]), pki.server()).unwrap();
        assert_eq!(groups(&client, &server), (NamedGroup::X25519, NamedGroup::X25519));
        // Our client against a server with only X25519: the X25519 share sent beside
        // the hybrid one is taken, no HelloRetryRequest.
        let (client, server) = handshake(pki.client(), pki.peer_server(&[X25519])).unwrap();
        assert_eq!(groups(&client, &server), (NamedGroup::X25519, NamedGroup::X25519));
        assert_eq!(client.handshake_kind(), Some(HandshakeKind::Full));
        // A server with only P-256 still works, after a HelloRetryRequest.
        let (client, server) = handshake(pki.client(), pki.peer_server(&[SECP256R1])).unwrap();
        assert_eq!(groups(&client, &server), (NamedGroup::secp256r1, NamedGroup::secp256r1));
        assert_eq!(client.handshake_kind(), Some(HandshakeKind::FullWithHelloRetryRequest));
    }

    #[test]
    fn peers_with_only_the_hybrid_group_work() {
        let pki = Pki::new();
        let only = [hybrid::x25519_mlkem768()];
        let (client, server) = handshake(pki.peer_client(&only), pki.server()).unwrap();
        assert_eq!(groups(&client, &server), (NamedGroup::X25519MLKEM768, NamedGroup::X25519MLKEM768));
        let (client, server) = handshake(pki.client(), pki.peer_server(&only)).unwrap();
        assert_eq!(groups(&client, &server), (NamedGroup::X25519MLKEM768, NamedGroup::X25519MLKEM768));
        // And a peer without X25519 at all that does not offer the hybrid group fails cleanly.
        let p384 = [rustls::crypto::ring::kx_group::SECP384R1];
        assert!(handshake(pki.peer_client(&only), pki.peer_server(&p384)).is_err());
    }

    /// A peer that claims `X25519MLKEM768` but sends `len` bytes of `byte` as its key share.
    #[derive(Debug)]
    struct BadShare {
        len: usize,
        byte: u8,
    }

    fn bad_share(len: usize, byte: u8) -> &'static dyn SupportedKxGroup {
        Box::leak(Box::new(BadShare { len, byte }))
    }

    impl SupportedKxGroup for BadShare {
        fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
            Ok(Box::new(BadShareExchange { share: vec![self.byte; self.len] }))
        }

        fn start_and_complete(&self, _peer: &[u8]) -> Result<CompletedKeyExchange, rustls::Error> {
            let secret = SharedSecret::from(&[9u8; hybrid::SHARED_SECRET_LEN][..]);
            Ok(CompletedKeyExchange { group: self.name(), pub_key: vec![self.byte; self.len], secret })
        }

        fn name(&self) -> NamedGroup {
            NamedGroup::X25519MLKEM768
        }
    }

    struct BadShareExchange {
        share: Vec<u8>,
    }

    impl ActiveKeyExchange for BadShareExchange {
        fn complete(self: Box<Self>, _peer: &[u8]) -> Result<SharedSecret, rustls::Error> {
            Ok(SharedSecret::from(&[9u8; hybrid::SHARED_SECRET_LEN][..]))
        }

        fn pub_key(&self) -> &[u8] {
            &self.share
        }

        fn group(&self) -> NamedGroup {
            NamedGroup::X25519MLKEM768
        }
    }

    #[test]
    fn malformed_key_shares_fail_the_handshake() {
        let pki = Pki::new();
        let invalid = rustls::Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare);
        // Wrong lengths from a client, and a client share of the right length whose
        // encapsulation key is not one (coefficients of 0xfff, not reduced mod q).
        // (An empty share cannot be sent: rustls refuses to encode one.)
        let client_shares =
            [1, 32, hybrid::SERVER_SHARE_LEN, hybrid::CLIENT_SHARE_LEN - 1, hybrid::CLIENT_SHARE_LEN + 1]
                .map(|len| (len, 7))
                .into_iter()
                .chain([(hybrid::CLIENT_SHARE_LEN, 0xff)]);
        for (len, byte) in client_shares {
            match handshake(pki.peer_client(&[bad_share(len, byte)]), pki.server()) {
                Err(Failed::Server(error)) => assert_eq!(error, invalid, "client share of {len} bytes"),
                other => panic!("client share of {len} bytes: {other:?}"),
            }
        }
        for len in [1, 32, hybrid::CLIENT_SHARE_LEN, hybrid::SERVER_SHARE_LEN - 1, hybrid::SERVER_SHARE_LEN + 1] {
            match handshake(pki.client(), pki.peer_server(&[bad_share(len, 7)])) {
                Err(Failed::Client(error)) => assert_eq!(error, invalid, "server share of {len} bytes"),
                other => panic!("server share of {len} bytes: {other:?}"),
            }
        }
        // A server share of the right length that is not an encapsulation to our key:
        // ML-KEM's implicit rejection gives the client another secret, and the
        // handshake fails when the client cannot decrypt what the server sends.
        match handshake(pki.client(), pki.peer_server(&[bad_share(hybrid::SERVER_SHARE_LEN, 7)])) {
            Err(Failed::Client(rustls::Error::DecryptError)) => {}
            other => panic!("forged ciphertext: {other:?}"),
        }
    }
}
