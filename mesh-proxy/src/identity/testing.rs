//! For tests of anything that speaks the tunnel (here and in the waypoint): a CA
//! issuing workload certificates the way the controller does (SPIFFE URI SAN,
//! serverAuth and clientAuth), generated in memory.
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};

use super::WorkloadCert;

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub root_pem: String,
}

impl Default for Ca {
    fn default() -> Self {
        Self::new()
    }
}

impl Ca {
    /// A new self-signed root (ECDSA P-256).
    ///
    /// # Panics
    /// When rcgen cannot make a key or sign: a test setup failure.
    pub fn new() -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let root = params.self_signed(&key).expect("CA certificate");
        Self { issuer: Issuer::new(params, key), root_pem: root.pem() }
    }

    /// A workload certificate for the SPIFFE URI `identity`, valid for ever.
    ///
    /// # Panics
    /// When `identity` is not a URI rcgen takes, or signing fails.
    pub fn cert(&self, identity: &str) -> Arc<WorkloadCert> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("workload key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(identity.try_into().expect("identity is a URI"))];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("workload certificate");
        Arc::new(WorkloadCert {
            identity: identity.to_owned(),
            chain_pem: vec![cert.pem()],
            key_pem: key.serialize_pem(),
            root_pem: self.root_pem.clone(),
            issued_at: 0,
            not_after: i64::MAX,
        })
    }
}
