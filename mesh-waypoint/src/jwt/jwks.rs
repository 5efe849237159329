//! JSON Web Key Sets (RFC 7517) parsed once per configuration into keys `ring` can
//! verify with, and the signature check of one JWS (RFC 7515) against them.
//!
//! Usable keys: RSA (`n`, `e`), EC on P-256 / P-384 (`x`, `y`), OKP Ed25519 (`x`).
//! Anything else (symmetric `oct` keys, other curves, encryption keys) is skipped with
//! a recorded reason rather than failing the whole set: a provider's JWKS often
//! carries keys for other consumers.
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::Value;

use super::b64;

/// A JWS signature algorithm this waypoint verifies (`alg` of RFC 7518). `none` and
/// the HMAC family are deliberately absent: a shared secret has no place in a key set
/// the mesh distributes, and `none` is no signature at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
}

impl Alg {
    /// The algorithm named `name`, or `None` for one we do not verify.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "RS256" => Self::Rs256,
            "RS384" => Self::Rs384,
            "RS512" => Self::Rs512,
            "PS256" => Self::Ps256,
            "PS384" => Self::Ps384,
            "PS512" => Self::Ps512,
            "ES256" => Self::Es256,
            "ES384" => Self::Es384,
            "EdDSA" => Self::EdDsa,
            _ => return None,
        })
    }

    /// Can a key of this material verify this algorithm?
    fn fits(self, material: &Material) -> bool {
        matches!(
            (self, material),
            (Self::Rs256 | Self::Rs384 | Self::Rs512 | Self::Ps256 | Self::Ps384 | Self::Ps512, Material::Rsa { .. })
                | (Self::Es256, Material::P256(_))
                | (Self::Es384, Material::P384(_))
                | (Self::EdDsa, Material::Ed25519(_))
        )
    }
}

/// Public key bytes in the form `ring` takes them.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Material {
    /// Big-endian modulus and exponent.
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed SEC1 point `0x04 || x || y`.
    P256(Vec<u8>),
    P384(Vec<u8>),
    Ed25519(Vec<u8>),
}

/// One usable key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    pub kid: Option<String>,
    /// The key's `alg`, when it names one: it then verifies only that algorithm.
    pub alg: Option<Alg>,
    material: Material,
}

impl Key {
    /// Does this key verify `signature` of `message` under `alg`? `false` when the key
    /// does not fit the algorithm.
    pub fn verify(&self, alg: Alg, message: &[u8], signature: &[u8]) -> bool {
        if self.alg.is_some_and(|own| own != alg) || !alg.fits(&self.material) {
            return false;
        }
        let result = match &self.material {
            Material::Rsa { n, e } => {
                let params = match alg {
                    Alg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                    Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                    Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                    Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
                    Alg::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
                    Alg::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
                    Alg::Es256 | Alg::Es384 | Alg::EdDsa => return false,
                };
                RsaPublicKeyComponents { n, e }.verify(params, message, signature)
            }
            Material::P256(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point).verify(message, signature)
            }
            Material::P384(point) => {
                UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, point).verify(message, signature)
            }
            Material::Ed25519(x) => UnparsedPublicKey::new(&signature::ED25519, x).verify(message, signature),
        };
        result.is_ok()
    }

    /// Is this key a candidate for a token of `alg` and `kid`? As Envoy's
    /// `jwt_verify_lib`: a key without `kid`, or a token without one, matches any.
    pub fn candidate(&self, alg: Alg, kid: Option<&str>) -> bool {
        let kid_ok = match (kid, self.kid.as_deref()) {
            (Some(wanted), Some(own)) => wanted == own,
            _ => true,
        };
        kid_ok && self.alg.is_none_or(|own| own == alg) && alg.fits(&self.material)
    }
}

/// Why one key of a set was left out.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeySkip {
    #[error("keys[{index}] is not a JSON object")]
    NotAnObject { index: usize },
    #[error("keys[{index}] has kty {kty:?}, which is not RSA, EC or OKP")]
    UnsupportedKty { index: usize, kty: String },
    #[error("keys[{index}] has crv {crv:?}; supported: P-256, P-384 (EC), Ed25519 (OKP)")]
    UnsupportedCurve { index: usize, crv: String },
    #[error("keys[{index}] has use {value:?}, not \"sig\"")]
    NotForSignatures { index: usize, value: String },
    #[error("keys[{index}] has alg {alg:?}, which this waypoint does not verify")]
    UnsupportedAlg { index: usize, alg: String },
    #[error("keys[{index}] has alg {alg:?}, which does not fit its kty")]
    AlgDoesNotFit { index: usize, alg: String },
    #[error("keys[{index}] lacks the string field {field:?}")]
    MissingField { index: usize, field: &'static str },
    #[error("keys[{index}].{field} is not base64url")]
    BadBase64 { index: usize, field: &'static str },
    #[error("keys[{index}].{field} has {len} bytes, expected {expected}")]
    BadLength { index: usize, field: &'static str, len: usize, expected: usize },
}

/// Why a whole set is unusable. Each names the issuer whose rule carries the set.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("JWKS of issuer {issuer:?} is not valid JSON")]
    Json {
        issuer: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("JWKS of issuer {issuer:?} has no \"keys\" array")]
    NoKeys { issuer: String },
    #[error("JWKS of issuer {issuer:?} has no usable key{}", skipped_list(.skipped))]
    NoUsableKey { issuer: String, skipped: Vec<KeySkip> },
    #[error("JWT rule of issuer {issuer:?} has neither jwks nor fetched keys for jwksUri {uri:?}")]
    NotFetched { issuer: String, uri: String },
    /// The controller discovers the keys through the issuer's `OpenID` configuration
    /// and writes them into `jwks`; until that succeeds, the rule has no keys.
    #[error("JWT rule of issuer {issuer:?} has neither jwks nor jwksUri, and no keys from OpenID discovery yet")]
    NoKeySource { issuer: String },
}

fn skipped_list(skipped: &[KeySkip]) -> String {
    if skipped.is_empty() {
        return String::new();
    }
    let reasons: Vec<String> = skipped.iter().map(ToString::to_string).collect();
    format!(" ({})", reasons.join("; "))
}

/// A parsed key set: the usable keys and why the others were skipped.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Jwks {
    pub keys: Vec<Key>,
    pub skipped: Vec<KeySkip>,
}

/// Parses the JWKS document `text` of the rule for `issuer`. A document with no
/// usable key is an error: every token of that issuer would be refused.
pub fn parse_jwks(issuer: &str, text: &str) -> Result<Jwks, JwksError> {
    let document: Value =
        serde_json::from_str(text).map_err(|source| JwksError::Json { issuer: issuer.to_owned(), source })?;
    let Some(entries) = document.get("keys").and_then(Value::as_array) else {
        return Err(JwksError::NoKeys { issuer: issuer.to_owned() });
    };
    let mut jwks = Jwks::default();
    for (index, entry) in entries.iter().enumerate() {
        match parse_key(index, entry) {
            Ok(key) => jwks.keys.push(key),
            Err(skip) => jwks.skipped.push(skip),
        }
    }
    if jwks.keys.is_empty() {
        return Err(JwksError::NoUsableKey { issuer: issuer.to_owned(), skipped: jwks.skipped });
    }
    Ok(jwks)
}

fn parse_key(index: usize, entry: &Value) -> Result<Key, KeySkip> {
    let Some(object) = entry.as_object() else { return Err(KeySkip::NotAnObject { index }) };
    let text = |field: &'static str| object.get(field).and_then(Value::as_str);
    if let Some(value) = text("use")
        && value != "sig"
    {
        return Err(KeySkip::NotForSignatures { index, value: value.to_owned() });
    }
    let bytes = |field: &'static str| -> Result<Vec<u8>, KeySkip> {
        let value = text(field).ok_or(KeySkip::MissingField { index, field })?;
        b64::decode(value).ok_or(KeySkip::BadBase64 { index, field })
    };
    let sized = |field: &'static str, expected: usize| -> Result<Vec<u8>, KeySkip> {
        let value = bytes(field)?;
        if value.len() == expected {
            Ok(value)
        } else {
            Err(KeySkip::BadLength { index, field, len: value.len(), expected })
        }
    };
    let point = |size: usize| -> Result<Vec<u8>, KeySkip> {
        let mut point = vec![0x04];
        point.extend(sized("x", size)?);
        point.extend(sized("y", size)?);
        Ok(point)
    };
    let kty = text("kty").ok_or(KeySkip::MissingField { index, field: "kty" })?;
    let material = match kty {
        "RSA" => Material::Rsa { n: strip_zeros(bytes("n")?), e: strip_zeros(bytes("e")?) },
        "EC" => match text("crv").ok_or(KeySkip::MissingField { index, field: "crv" })? {
            "P-256" => Material::P256(point(32)?),
            "P-384" => Material::P384(point(48)?),
            crv => return Err(KeySkip::UnsupportedCurve { index, crv: crv.to_owned() }),
        },
        "OKP" => match text("crv").ok_or(KeySkip::MissingField { index, field: "crv" })? {
            "Ed25519" => Material::Ed25519(sized("x", 32)?),
            crv => return Err(KeySkip::UnsupportedCurve { index, crv: crv.to_owned() }),
        },
        kty => return Err(KeySkip::UnsupportedKty { index, kty: kty.to_owned() }),
    };
    let alg = match text("alg") {
        None => None,
        Some(name) => {
            let alg = Alg::parse(name).ok_or_else(|| KeySkip::UnsupportedAlg { index, alg: name.to_owned() })?;
            if !alg.fits(&material) {
                return Err(KeySkip::AlgDoesNotFit { index, alg: name.to_owned() });
            }
            Some(alg)
        }
    };
    Ok(Key { kid: text("kid").map(str::to_owned), alg, material })
}

/// RFC 7518 says `n` and `e` have no leading zeros, but some issuers pad them;
/// `ring` wants them minimal.
fn strip_zeros(mut value: Vec<u8>) -> Vec<u8> {
    let zeros = value.iter().take_while(|b| **b == 0).count();
    value.drain(..zeros);
    value
}
