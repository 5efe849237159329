//! The mesh's certificate authority: a root created on first start and persisted, or
//! a root/intermediate plugged in from files (so a migration can share a root with
//! another mesh). It signs short-lived ECDSA P-256 leaves carrying one SPIFFE URI SAN
//! with serverAuth + clientAuth. Who may obtain which identity is decided by the
//! caller (`authorize` in the server); this module only checks that a CSR is well
//! formed, correctly signed, and asks for exactly the identity being granted.
use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a usable CA certificate or key")]
    BadCaMaterial {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("the certificate signing request is malformed or its signature is wrong")]
    BadCsr(#[source] rcgen::Error),
    #[error("the certificate signing request asks for {requested:?}, expected exactly [{expected}]")]
    WrongIdentity { requested: Vec<String>, expected: String },
    #[error("signing failed")]
    Sign(#[source] rcgen::Error),
}

/// A signed leaf, PEM encoded, with the chain up to (and including) the root.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    /// Intermediates (if any), then the root.
    pub chain_pem: Vec<String>,
    pub not_after: OffsetDateTime,
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate, then its chain up to the root.
    chain_pem: Vec<String>,
    root_pem: String,
}

const ROOT_CERT: &str = "root-cert.pem";
const ROOT_KEY: &str = "root-key.pem";

impl Ca {
    /// Loads the root persisted in `dir`, or creates and persists one.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, CaError> {
        let cert_path = dir.join(ROOT_CERT);
        let key_path = dir.join(ROOT_KEY);
        if cert_path.exists() && key_path.exists() {
            return Self::from_files(&cert_path, &key_path, None);
        }
        fs::create_dir_all(dir).map_err(|source| CaError::Write { path: dir.to_owned(), source })?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "mesh root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = OffsetDateTime::now_utc() - Duration::from_mins(5);
        params.not_after = OffsetDateTime::now_utc() + Duration::from_hours(10 * 365 * 24);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(CaError::Sign)?;
        write_private(&key_path, key.serialize_pem().as_bytes())?;
        fs::write(&cert_path, cert.pem()).map_err(|source| CaError::Write { path: cert_path.clone(), source })?;
        Self::from_files(&cert_path, &key_path, None)
    }

    /// A CA from files: the signing certificate and key, and optionally the chain
    /// above it (intermediates and root). Without a chain the certificate is the root.
    pub fn from_files(cert: &Path, key: &Path, chain: Option<&Path>) -> Result<Self, CaError> {
        let read =
            |path: &Path| fs::read_to_string(path).map_err(|source| CaError::Read { path: path.to_owned(), source });
        let cert_pem = read(cert)?;
        let key_pair =
            KeyPair::from_pem(&read(key)?).map_err(|source| CaError::BadCaMaterial { path: key.to_owned(), source })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key_pair)
            .map_err(|source| CaError::BadCaMaterial { path: cert.to_owned(), source })?;
        let mut chain_pem = vec![cert_pem.trim().to_owned() + "\n"];
        if let Some(chain) = chain {
            chain_pem.extend(split_pem(&read(chain)?));
        }
        let root_pem = chain_pem.last().cloned().unwrap_or_default();
        Ok(Self { issuer, chain_pem, root_pem })
    }

    /// The trust anchor agents verify against.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Signs `csr_pem` for `identity` (a URI such as `spiffe://td/ns/a/sa/b`). The CSR
    /// must ask for exactly that URI SAN and nothing else.
    pub fn sign_csr(&self, csr_pem: &str, identity: &str, lifetime: Duration) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)?;
        let requested: Vec<String> = csr.params.subject_alt_names.iter().map(san_string).collect();
        if requested.len() != 1 || requested[0] != format!("URI:{identity}") {
            return Err(CaError::WrongIdentity { requested, expected: format!("URI:{identity}") });
        }
        self.issue(&csr.public_key, vec![SanType::URI(identity.try_into().map_err(CaError::Sign)?)], lifetime)
    }

    /// Issues a certificate and a fresh key for a server or node (bootstrap credentials).
    pub fn issue_with_key(&self, sans: Vec<SanType>, lifetime: Duration) -> Result<(Issued, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let issued = self.issue(&key, sans, lifetime)?;
        Ok((issued, key.serialize_pem()))
    }

    fn issue(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        sans: Vec<SanType>,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        // Allow for clock skew between nodes.
        params.not_before = OffsetDateTime::now_utc() - Duration::from_mins(1);
        params.not_after = OffsetDateTime::now_utc() + lifetime;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(public_key, &self.issuer).map_err(CaError::Sign)?;
        Ok(Issued { cert_pem: cert.pem(), chain_pem: self.chain_pem.clone(), not_after: params.not_after })
    }
}

fn san_string(san: &SanType) -> String {
    match san {
        SanType::URI(uri) => format!("URI:{}", uri.as_str()),
        SanType::DnsName(name) => format!("DNS:{}", name.as_str()),
        SanType::Rfc822Name(name) => format!("email:{}", name.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        other => format!("{other:?}"),
    }
}

fn random_serial() -> SerialNumber {
    // Random rather than rcgen's default (a hash of the public key), which would give
    // two certificates for one re-sent CSR the same serial.
    let mut bytes = [0u8; 16];
    let _ = mesh_common::tls::provider().secure_random.fill(&mut bytes);
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), CaError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| CaError::Write { path: path.to_owned(), source })?;
    file.write_all(data).map_err(|source| CaError::Write { path: path.to_owned(), source })
}

/// The PEM blocks of a bundle, each ending in a newline.
pub fn split_pem(bundle: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current = String::new();
    for line in bundle.lines() {
        if line.starts_with("-----BEGIN") {
            current.clear();
        }
        current.push_str(line);
        current.push('\n');
        if line.starts_with("-----END") {
            blocks.push(std::mem::take(&mut current));
        }
    }
    blocks
}

#[cfg(test)]
mod tests {
    use x509_parser::prelude::*;

    use mesh_common::tls::make_csr;

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mesh-ca-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn root_is_persisted_and_reloaded() {
        let dir = temp_dir("persist");
        let ca = Ca::load_or_create(&dir, "cluster.local").unwrap();
        let again = Ca::load_or_create(&dir, "cluster.local").unwrap();
        assert_eq!(ca.root_pem(), again.root_pem());
        let mode = fs::metadata(dir.join(ROOT_KEY)).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn signs_a_csr_for_exactly_the_granted_identity() {
        let dir = temp_dir("sign");
        let ca = Ca::load_or_create(&dir, "cluster.local").unwrap();
        let id = "spiffe://cluster.local/ns/shop/sa/web";
        let (_key, csr) = make_csr(id).unwrap();
        let issued = ca.sign_csr(&csr, id, Duration::from_hours(24)).unwrap();
        let der = ::pem::parse(&issued.cert_pem).unwrap();
        let (_, cert) = X509Certificate::from_der(der.contents()).unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(sans.value.general_names, vec![GeneralName::URI(id)]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let lifetime = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert!((24 * 3600..=24 * 3600 + 120).contains(&lifetime), "{lifetime}");
        assert!(!cert.is_ca());

        let err = ca.sign_csr(&csr, "spiffe://cluster.local/ns/shop/sa/admin", Duration::from_mins(1)).unwrap_err();
        assert!(err.to_string().contains("expected exactly [URI:spiffe://cluster.local/ns/shop/sa/admin]"), "{err}");
        let err = ca.sign_csr("garbage", id, Duration::from_mins(1)).unwrap_err();
        assert!(matches!(err, CaError::BadCsr(_)));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn plugged_in_root_is_used() {
        let dir = temp_dir("plugged");
        let original = Ca::load_or_create(&dir, "cluster.local").unwrap();
        let plugged = Ca::from_files(&dir.join(ROOT_CERT), &dir.join(ROOT_KEY), None).unwrap();
        assert_eq!(original.root_pem(), plugged.root_pem());
        let err = Ca::from_files(&dir.join(ROOT_KEY), &dir.join(ROOT_KEY), None).err().unwrap();
        assert!(err.to_string().contains("is not a usable CA certificate or key"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
