//! Tokens are signed here with keys made at test time (ECDSA, Ed25519) or checked in
//! (RSA: `testdata/README.md`), then verified through the public API.
use http::{HeaderMap, HeaderValue};
use mesh_common::config::{
    meta::{ObjectMeta, PolicyTargetReference, WorkloadSelector},
    security::{ClaimToHeader, JwtHeader, JwtRule, RequestAuthentication, RequestAuthenticationSpec},
};
use proptest::prelude::*;
use ring::{
    rand::SystemRandom,
    signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair, RsaPublicKeyComponents},
};
use serde_json::{Value, json};

use super::*;

const RSA_A: &[u8] = include_bytes!("testdata/rsa-a.pk8.der");
const RSA_B: &[u8] = include_bytes!("testdata/rsa-b.pk8.der");
const NOW: u64 = 1_800_000_000;
const ISS: &str = "https://issuer.example";

enum TestKey {
    Rsa(RsaKeyPair),
    P256(EcdsaKeyPair),
    P384(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

impl TestKey {
    fn rsa(der: &[u8]) -> Self {
        Self::Rsa(RsaKeyPair::from_pkcs8(der).expect("rsa test key"))
    }

    fn p256() -> Self {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        Self::P256(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap())
    }

    fn p384() -> Self {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P384_SHA384_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        Self::P384(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap())
    }

    fn ed() -> Self {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Self::Ed(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap())
    }

    /// The public JWK of this key.
    fn jwk(&self, kid: Option<&str>) -> Value {
        let mut jwk = match self {
            Self::Rsa(pair) => {
                let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
                json!({"kty": "RSA", "n": b64::encode(&public.n), "e": b64::encode(&public.e)})
            }
            Self::P256(pair) | Self::P384(pair) => {
                let point = pair.public_key().as_ref();
                let size = (point.len() - 1) / 2;
                let crv = if size == 32 { "P-256" } else { "P-384" };
                json!({"kty": "EC", "crv": crv, "x": b64::encode(&point[1..=size]), "y": b64::encode(&point[1 + size..])})
            }
            Self::Ed(pair) => json!({"kty": "OKP", "crv": "Ed25519", "x": b64::encode(pair.public_key().as_ref())}),
        };
        if let Some(kid) = kid {
            jwk["kid"] = json!(kid);
        }
        jwk
    }

    fn sign(&self, alg: &str, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match self {
            Self::Rsa(pair) => {
                let padding: &dyn signature::RsaEncoding = match alg {
                    "RS256" => &signature::RSA_PKCS1_SHA256,
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    "PS384" => &signature::RSA_PSS_SHA384,
                    "PS512" => &signature::RSA_PSS_SHA512,
                    _ => panic!("not an RSA alg: {alg}"),
                };
                let mut out = vec![0; pair.public().modulus_len()];
                pair.sign(padding, &rng, message, &mut out).unwrap();
                out
            }
            Self::P256(pair) | Self::P384(pair) => pair.sign(&rng, message).unwrap().as_ref().to_vec(),
            Self::Ed(pair) => pair.sign(message).as_ref().to_vec(),
        }
    }
}

fn jwks_of(keys: &[(&TestKey, Option<&str>)]) -> String {
    let keys: Vec<Value> = keys.iter().map(|(k, kid)| k.jwk(*kid)).collect();
    json!({ "keys": keys }).to_string()
}

/// A token with header `header` and payload `claims`, signed by `key` as `alg`.
fn token_with(header: &Value, claims: &Value, key: &TestKey, alg: &str) -> String {
    let signed =
        format!("{}.{}", b64::encode(header.to_string().as_bytes()), b64::encode(claims.to_string().as_bytes()));
    let signature = key.sign(alg, signed.as_bytes());
    format!("{signed}.{}", b64::encode(&signature))
}

fn token(alg: &str, kid: Option<&str>, claims: &Value, key: &TestKey) -> String {
    let mut header = json!({"alg": alg, "typ": "JWT"});
    if let Some(kid) = kid {
        header["kid"] = json!(kid);
    }
    token_with(&header, claims, key, alg)
}

fn claims() -> Value {
    json!({"iss": ISS, "sub": "alice", "aud": ["shop", "other"], "azp": "web", "exp": NOW + 600, "nbf": NOW - 10, "group": {"name": "admins", "level": 3}})
}

fn rule(issuer: &str, jwks: String) -> JwtRule {
    JwtRule { issuer: issuer.to_owned(), jwks: Some(jwks), ..JwtRule::default() }
}

fn policy(name: &str, rules: Vec<JwtRule>) -> RequestAuthentication {
    RequestAuthentication {
        metadata: ObjectMeta { name: name.into(), namespace: "shop".into(), ..ObjectMeta::default() },
        spec: RequestAuthenticationSpec { jwt_rules: rules, ..RequestAuthenticationSpec::default() },
    }
}

fn authenticator(rules: Vec<JwtRule>) -> Authenticator {
    let policy = policy("jwt", rules);
    let (auth, problems) = Authenticator::compile(&[&policy], DEFAULT_CLOCK_SKEW_SECS);
    assert!(problems.is_empty(), "{problems:?}");
    auth
}

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
    headers
}

fn denied(outcome: &Outcome) -> &JwtError {
    match outcome {
        Outcome::Denied(Denied { error }) => error,
        other => panic!("expected a denial, got {other:?}"),
    }
}

fn authenticated(outcome: &Outcome) -> (&Auth, &HeaderEdits) {
    match outcome {
        Outcome::Authenticated { auth, edits } => (auth, edits),
        other => panic!("expected success, got {other:?}"),
    }
}

/// One key, one rule, a bearer token signed with `alg`.
fn check_alg(alg: &str, key: &TestKey) {
    let auth = authenticator(vec![rule(ISS, jwks_of(&[(key, Some("k1"))]))]);
    let outcome = auth.authenticate(&bearer(&token(alg, Some("k1"), &claims(), key)), None, NOW);
    let (auth, edits) = authenticated(&outcome);
    assert_eq!(auth.principal, format!("{ISS}/alice"), "{alg}");
    assert_eq!(auth.audiences, ["shop", "other"]);
    assert_eq!(auth.presenter.as_deref(), Some("web"));
    assert_eq!(auth.claims["group"]["level"], 3);
    assert_eq!(edits.remove, [header::AUTHORIZATION], "the token header is removed by default");
}

#[test]
fn every_algorithm_verifies() {
    let rsa = TestKey::rsa(RSA_A);
    for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
        check_alg(alg, &rsa);
    }
    check_alg("ES256", &TestKey::p256());
    check_alg("ES384", &TestKey::p384());
    check_alg("EdDSA", &TestKey::ed());
}

#[test]
fn tampered_payload_fails_verification() {
    let key = TestKey::p256();
    let auth = authenticator(vec![rule(ISS, jwks_of(&[(&key, None)]))]);
    let good = token("ES256", None, &claims(), &key);
    let parts: Vec<&str> = good.split('.').collect();
    let mut forged = claims();
    forged["sub"] = json!("mallory");
    let bad = format!("{}.{}.{}", parts[0], b64::encode(forged.to_string().as_bytes()), parts[2]);
    let outcome = auth.authenticate(&bearer(&bad), None, NOW);
    assert_eq!(denied(&outcome), &JwtError::Signature);
    assert_eq!(Denied { error: JwtError::Signature }.body(), "Jwt verification fails");
}

#[test]
fn wrong_key_fails_verification() {
    let (signer, published) = (TestKey::rsa(RSA_A), TestKey::rsa(RSA_B));
    let auth = authenticator(vec![rule(ISS, jwks_of(&[(&published, None)]))]);
    let outcome = auth.authenticate(&bearer(&token("RS256", None, &claims(), &signer)), None, NOW);
    assert_eq!(denied(&outcome), &JwtError::Signature);
}

#[test]
fn kid_selects_the_key() {
    let (a, b) = (TestKey::ed(), TestKey::ed());
    let auth = authenticator(vec![rule(ISS, jwks_of(&[(&a, Some("a")), (&b, Some("b"))]))]);
    let ok = auth.authenticate(&bearer(&token("EdDSA", Some("b"), &claims(), &b)), None, NOW);
    authenticated(&ok);
    // The right key under the wrong name is not tried.
    let wrong = auth.authenticate(&bearer(&token("EdDSA", Some("a"), &claims(), &b)), None, NOW);
    assert_eq!(denied(&wrong), &JwtError::Signature);
    let unknown = auth.authenticate(&bearer(&token("EdDSA", Some("zz"), &claims(), &b)), None, NOW);
    assert_eq!(denied(&unknown), &JwtError::NoMatchingKey { kid: Some("zz".into()) });
    // No kid in the token: every key of the right type is tried.
    let any = auth.authenticate(&bearer(&token("EdDSA", None, &claims(), &b)), None, NOW);
    authenticated(&any);
}

#[test]
fn alg_must_fit_the_key_type() {
    let key = TestKey::p256();
    let auth = authenticator(vec![rule(ISS, jwks_of(&[(&key, None)]))]);
    // An ES256 signature labelled ES384: no P-384 key, so no candidate.
    let mut header = json!({"alg": "ES384"});
    let outcome = auth.authenticate(&bearer(&token_with(&header, &claims(), &key, "ES256")), None, NOW);
    assert_eq!(denied(&outcome), &JwtError::NoMatchingKey { kid: None });
    header["alg"] = json!("RS256");
    let outcome = auth.authenticate(&bearer(&token_with(&header, &claims(), &key, "ES256")), None, NOW);
    assert_eq!(denied(&outcome), &JwtError::NoMatchingKey { kid: None });
}

#[test]
fn time_claims_with_skew() {
    let key = TestKey::ed();
    let auth = authenticator(vec![rule(ISS, jwks_of(&[(&key, None)]))]);
    let with = |field: &str, value: u64| {
        let mut c = claims();
        c[field] = json!(value);
        auth.authenticate(&bearer(&token("EdDSA", None, &c, &key)), None, NOW)
    };
    // exp: tolerated up to the skew, refused one second after.
    authenticated(&with("exp", NOW - DEFAULT_CLOCK_SKEW_SECS));
    assert_eq!(denied(&with("exp", NOW - DEFAULT_CLOCK_SKEW_SECS - 1)), &JwtError::Expired { exp: NOW - 61, now: NOW });
    assert_eq!(Denied { error: JwtError::Expired { exp: 0, now: 0 } }.body(), "Jwt is expired");
    // nbf: the same edge on the other side.
    authenticated(&with("nbf", NOW + DEFAULT_CLOCK_SKEW_SECS));
    assert_eq!(
        denied(&with("nbf", NOW + DEFAULT_CLOCK_SKEW_SECS + 1)),
        &JwtError::NotYetValid { nbf: NOW + 61, now: NOW }
    );
    // Not an integer.
    let mut c = claims();
    c["exp"] = json!("tomorrow");
    let outcome = auth.authenticate(&bearer(&token("EdDSA", None, &c, &key)), None, NOW);
    assert_eq!(denied(&outcome), &JwtError::ClaimNotInteger { claim: "exp" });
    // No exp at all: valid (Envoy does not require it).
    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    authenticated(&auth.authenticate(&bearer(&token("EdDSA", None, &c, &key)), None, NOW));
}

#[test]
fn issuer_must_be_configured() {
    let key = TestKey::ed();
    let auth = authenticator(vec![rule("https://other.example", jwks_of(&[(&key, None)]))]);
    let outcome = auth.authenticate(&bearer(&token("EdDSA", None, &claims(), &key)), None, NOW);
    assert_eq!(denied(&outcome), &JwtError::UnknownIssuer { issuer: Some(ISS.into()) });
    // A rule without issuer accepts any.
    let open = authenticator(vec![rule("", jwks_of(&[(&key, None)]))]);
    authenticated(&open.authenticate(&bearer(&token("EdDSA", None, &claims(), &key)), None, NOW));
}

#[test]
fn audiences() {
    let key = TestKey::ed();
    let mut r = rule(ISS, jwks_of(&[(&key, None)]));
    r.audiences = vec!["https://billing/".into()];
    let auth = authenticator(vec![r.clone()]);
    let outcome = auth.authenticate(&bearer(&token("EdDSA", None, &claims(), &key)), None, NOW);
    assert_eq!(denied(&outcome), &JwtError::Audience { audiences: vec!["shop".into(), "other".into()] });
    // A string aud, compared without scheme and trailing slash.
    let mut c = claims();
    c["aud"] = json!("billing");
    authenticated(&auth.authenticate(&bearer(&token("EdDSA", None, &c, &key)), None, NOW));
    // No aud at all while audiences are required.
    c.as_object_mut().unwrap().remove("aud");
    authenticated(&authenticator(vec![rule(ISS, jwks_of(&[(&key, None)]))]).authenticate(
        &bearer(&token("EdDSA", None, &c, &key)),
        None,
        NOW,
    ));
    assert!(matches!(
        denied(&auth.authenticate(&bearer(&token("EdDSA", None, &c, &key)), None, NOW)),
        JwtError::Audience { .. }
    ));
}

#[test]
fn alg_none_and_hmac_are_refused() {
    let key = TestKey::ed();
    let auth = authenticator(vec![rule(ISS, jwks_of(&[(&key, None)]))]);
    let payload = b64::encode(claims().to_string().as_bytes());
    for alg in ["none", "HS256", "HS512", "", "ES512"] {
        let header = b64::encode(json!({"alg": alg}).to_string().as_bytes());
        let t = format!("{header}.{payload}.c2ln");
        let outcome = auth.authenticate(&bearer(&t), None, NOW);
        assert_eq!(denied(&outcome), &JwtError::UnsupportedAlg { alg: alg.into() }, "{alg}");
    }
    // `none` with an empty signature is a malformed token first.
    let header = b64::encode(br#"{"alg":"none"}"#);
    assert_eq!(denied(&auth.authenticate(&bearer(&format!("{header}.{payload}.")), None, NOW)), &JwtError::BadFormat);
    // An HMAC key in the set is skipped, not used.
    let set = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}, key.jwk(None)]}).to_string();
    let parsed = parse_jwks(ISS, &set).unwrap();
    assert_eq!(parsed.keys.len(), 1);
    assert_eq!(parsed.skipped, [KeySkip::UnsupportedKty { index: 0, kty: "oct".into() }]);
}

#[test]
fn malformed_tokens() {
    let key = TestKey::ed();
    let auth = authenticator(vec![rule(ISS, jwks_of(&[(&key, None)]))]);
    let good = token("EdDSA", None, &claims(), &key);
    let parts: Vec<&str> = good.split('.').collect();
    let cases = [
        ("a.b", JwtError::BadFormat),
        ("a.b.c.d", JwtError::BadFormat),
        ("..", JwtError::BadFormat),
        (&*format!("{}.{}", parts[0], parts[1]), JwtError::BadFormat),
        (&*format!("!!.{}.{}", parts[1], parts[2]), JwtError::HeaderBase64),
        (&*format!("{}.{}.{}", b64::encode(b"not json"), parts[1], parts[2]), JwtError::HeaderJson),
        (&*format!("{}.%%.{}", parts[0], parts[2]), JwtError::PayloadBase64),
        (&*format!("{}.{}.{}", parts[0], b64::encode(b"[1]"), parts[2]), JwtError::PayloadJson),
        (&*format!("{}.{}.*", parts[0], parts[1]), JwtError::SignatureBase64),
    ];
    for (t, error) in cases {
        assert_eq!(denied(&auth.authenticate(&bearer(t), None, NOW)), &error, "{t}");
    }
}

#[test]
fn no_token_passes_anonymous() {
    let key = TestKey::ed();
    let auth = authenticator(vec![rule(ISS, jwks_of(&[(&key, None)]))]);
    assert_eq!(auth.authenticate(&HeaderMap::new(), Some("a=b"), NOW), Outcome::Anonymous);
    // Another scheme in Authorization is not a bearer token.
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic dXNlcjpwYXNz"));
    assert_eq!(auth.authenticate(&headers, None, NOW), Outcome::Anonymous);
    assert_eq!(Authenticator::default().authenticate(&bearer("x.y.z"), None, NOW), Outcome::Anonymous);
}

#[test]
fn default_locations() {
    let key = TestKey::ed();
    let auth = authenticator(vec![rule(ISS, jwks_of(&[(&key, None)]))]);
    let t = token("EdDSA", None, &claims(), &key);
    let query = format!("x=1&access_token={t}");
    let outcome = auth.authenticate(&HeaderMap::new(), Some(&query), NOW);
    let (_, edits) = authenticated(&outcome);
    assert!(edits.remove.is_empty(), "a parameter stays");
    // `bearer` in another case is still the Bearer scheme.
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&format!("bearer {t}")).unwrap());
    authenticated(&auth.authenticate(&headers, None, NOW));
}

#[test]
fn custom_header_param_and_cookie() {
    let key = TestKey::p256();
    let t = token("ES256", None, &claims(), &key);
    let mut r = rule(ISS, jwks_of(&[(&key, None)]));
    r.from_headers = vec![JwtHeader { name: "X-Jwt".into(), prefix: Some("Token ".into()) }];
    r.from_params = vec!["jwt".into()];
    r.from_cookies = vec!["session".into()];
    let auth = authenticator(vec![r]);

    let mut headers = HeaderMap::new();
    headers.insert("x-jwt", HeaderValue::from_str(&format!("Token {t}")).unwrap());
    let outcome = auth.authenticate(&headers, None, NOW);
    let (_, edits) = authenticated(&outcome);
    assert_eq!(edits.remove, [HeaderName::from_static("x-jwt")]);
    // Without the prefix the header holds no token for this rule.
    headers.insert("x-jwt", HeaderValue::from_str(&t).unwrap());
    assert_eq!(auth.authenticate(&headers, None, NOW), Outcome::Anonymous);
    // The default locations are not read once a rule names its own.
    assert_eq!(auth.authenticate(&bearer(&t), None, NOW), Outcome::Anonymous);

    authenticated(&auth.authenticate(&HeaderMap::new(), Some(&format!("jwt={t}")), NOW));

    let mut headers = HeaderMap::new();
    headers.insert(header::COOKIE, HeaderValue::from_str(&format!("theme=dark; session={t}")).unwrap());
    let outcome = auth.authenticate(&headers, None, NOW);
    assert!(authenticated(&outcome).1.remove.is_empty(), "a cookie stays");
}

#[test]
fn two_rules_with_different_issuers() {
    let (a, b) = (TestKey::ed(), TestKey::p256());
    let auth = authenticator(vec![
        rule("https://a.example", jwks_of(&[(&a, None)])),
        rule("https://b.example", jwks_of(&[(&b, None)])),
    ]);
    let mut c = claims();
    c["iss"] = json!("https://b.example");
    let outcome = auth.authenticate(&bearer(&token("ES256", None, &c, &b)), None, NOW);
    assert_eq!(authenticated(&outcome).0.principal, "https://b.example/alice");
    // b's issuer signed by a's key: b's keys are the ones tried, and fail.
    let outcome = auth.authenticate(&bearer(&token("EdDSA", None, &c, &a)), None, NOW);
    assert_eq!(denied(&outcome), &JwtError::NoMatchingKey { kid: None });
    c["iss"] = json!("https://c.example");
    let outcome = auth.authenticate(&bearer(&token("EdDSA", None, &c, &a)), None, NOW);
    assert!(matches!(denied(&outcome), JwtError::UnknownIssuer { .. }));
}

#[test]
fn every_token_must_verify() {
    let key = TestKey::ed();
    let mut r = rule(ISS, jwks_of(&[(&key, None)]));
    r.from_headers =
        vec![JwtHeader { name: "x-a".into(), prefix: None }, JwtHeader { name: "x-b".into(), prefix: None }];
    let auth = authenticator(vec![r]);
    let good = token("EdDSA", None, &claims(), &key);
    let mut headers = HeaderMap::new();
    headers.insert("x-a", HeaderValue::from_str(&good).unwrap());
    headers.insert("x-b", HeaderValue::from_static("a.b.c"));
    assert_eq!(denied(&auth.authenticate(&headers, None, NOW)), &JwtError::HeaderBase64);
    headers.insert("x-b", HeaderValue::from_str(&good).unwrap());
    let outcome = auth.authenticate(&headers, None, NOW);
    assert_eq!(authenticated(&outcome).1.remove.len(), 2);
}

#[test]
fn header_outputs() {
    let key = TestKey::ed();
    let mut r = rule(ISS, jwks_of(&[(&key, None)]));
    r.forward_original_token = true;
    r.output_payload_to_header = Some("x-jwt-payload".into());
    r.output_claim_to_headers = vec![
        ClaimToHeader { header: "x-sub".into(), claim: "sub".into() },
        ClaimToHeader { header: "x-group".into(), claim: "group.name".into() },
        ClaimToHeader { header: "x-level".into(), claim: "group.level".into() },
        ClaimToHeader { header: "x-aud".into(), claim: "aud".into() },
        ClaimToHeader { header: "x-missing".into(), claim: "nope".into() },
    ];
    let auth = authenticator(vec![r]);
    let t = token("EdDSA", None, &claims(), &key);
    let mut headers = bearer(&t);
    headers.insert("x-sub", HeaderValue::from_static("forged"));
    let outcome = auth.authenticate(&headers, None, NOW);
    let (_, edits) = authenticated(&outcome);
    assert!(edits.remove.is_empty(), "forwardOriginalToken keeps the header");
    edits.apply(&mut headers);
    assert!(headers.contains_key(header::AUTHORIZATION));
    let payload = headers["x-jwt-payload"].to_str().unwrap();
    assert_eq!(payload, t.split('.').nth(1).unwrap());
    assert_eq!(serde_json::from_slice::<Value>(&b64::decode(payload).unwrap()).unwrap(), claims());
    assert_eq!(headers["x-sub"], "alice", "the client's value is replaced");
    assert_eq!(headers["x-group"], "admins");
    assert_eq!(headers["x-level"], "3");
    assert!(!headers.contains_key("x-aud"), "arrays are not copied");
    assert!(!headers.contains_key("x-missing"));
}

#[test]
fn jwks_parsing() {
    let ed = TestKey::ed();
    let mut bad_curve = TestKey::p256().jwk(None);
    bad_curve["crv"] = json!("P-521");
    let mut enc = ed.jwk(Some("enc"));
    enc["use"] = json!("enc");
    let mut short = ed.jwk(None);
    short["x"] = json!("AAAA");
    let mut mismatched = ed.jwk(None);
    mismatched["alg"] = json!("RS256");
    let set = json!({"keys": [bad_curve, enc, short, mismatched, 7, {"kty": "RSA", "e": "AQAB"}, ed.jwk(Some("ok"))]});
    let parsed = parse_jwks(ISS, &set.to_string()).unwrap();
    assert_eq!(parsed.keys.len(), 1);
    assert_eq!(parsed.keys[0].kid.as_deref(), Some("ok"));
    assert_eq!(
        parsed.skipped,
        [
            KeySkip::UnsupportedCurve { index: 0, crv: "P-521".into() },
            KeySkip::NotForSignatures { index: 1, value: "enc".into() },
            KeySkip::BadLength { index: 2, field: "x", len: 3, expected: 32 },
            KeySkip::AlgDoesNotFit { index: 3, alg: "RS256".into() },
            KeySkip::NotAnObject { index: 4 },
            KeySkip::MissingField { index: 5, field: "n" },
        ]
    );

    let err = parse_jwks(ISS, r#"{"keys": []}"#).unwrap_err();
    assert_eq!(err.to_string(), format!("JWKS of issuer {ISS:?} has no usable key"));
    let err = parse_jwks(ISS, r#"{"keys": [{"kty": "oct"}]}"#).unwrap_err();
    assert!(err.to_string().contains(r#"keys[0] has kty "oct""#), "{err}");
    assert!(matches!(parse_jwks(ISS, "{").unwrap_err(), JwksError::Json { .. }));
    assert!(matches!(parse_jwks(ISS, "{}").unwrap_err(), JwksError::NoKeys { .. }));
}

#[test]
fn padded_and_zero_prefixed_key_fields_are_accepted() {
    let rsa = TestKey::rsa(RSA_A);
    let mut jwk = rsa.jwk(None);
    let n = b64::decode(jwk["n"].as_str().unwrap()).unwrap();
    let padded_n = [&[0u8][..], &n].concat();
    // 257 bytes: 343 base64 characters and one `=` of padding.
    jwk["n"] = json!(format!("{}=", b64::encode(&padded_n)));
    let jwks = json!({"keys": [jwk]}).to_string();
    let auth = authenticator(vec![rule(ISS, jwks)]);
    authenticated(&auth.authenticate(&bearer(&token("RS256", None, &claims(), &rsa)), None, NOW));
}

#[test]
fn a_rule_without_keys_refuses_its_tokens() {
    let key = TestKey::ed();
    let r = JwtRule { issuer: ISS.into(), jwks_uri: Some("http://keys.example/jwks".into()), ..JwtRule::default() };
    let p = policy("fetching", vec![r]);
    let (auth, problems) = Authenticator::compile(&[&p], DEFAULT_CLOCK_SKEW_SECS);
    assert_eq!(problems.len(), 1);
    assert_eq!(
        problems[0].to_string(),
        format!(
            "RequestAuthentication/shop/fetching: spec.jwtRules[0]: JWT rule of issuer {ISS:?} has neither jwks nor \
             fetched keys for jwksUri \"http://keys.example/jwks\""
        )
    );
    let outcome = auth.authenticate(&bearer(&token("EdDSA", None, &claims(), &key)), None, NOW);
    assert_eq!(denied(&outcome), &JwtError::NoMatchingKey { kid: None });
}

#[test]
fn bad_header_names_are_reported() {
    let key = TestKey::ed();
    let mut r = rule(ISS, jwks_of(&[(&key, None)]));
    r.from_headers = vec![JwtHeader { name: "bad header".into(), prefix: None }];
    r.output_payload_to_header = Some("also bad".into());
    let p = policy("bad", vec![r]);
    let (_, problems) = Authenticator::compile(&[&p], DEFAULT_CLOCK_SKEW_SECS);
    let text: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "RequestAuthentication/shop/bad: spec.jwtRules[0].fromHeaders[0].name: \"bad header\" is not a valid header name",
            "RequestAuthentication/shop/bad: spec.jwtRules[0].outputPayloadToHeader: \"also bad\" is not a valid header name",
        ]
    );
}

#[test]
fn www_authenticate() {
    assert_eq!(
        Denied::www_authenticate("http://shop/cart"),
        "Bearer realm=\"http://shop/cart\", error=\"invalid_token\""
    );
}

mod selection {
    use mesh_common::config::Config;

    use super::*;
    use crate::jwt::select::{Destination, DestinationKind, Waypoint, applicable};

    fn targeted(name: &str, namespace: &str, group: &str, kind: &str, target: &str) -> RequestAuthentication {
        let mut p = policy(name, Vec::new());
        p.metadata.namespace = namespace.into();
        p.spec.target_refs = vec![PolicyTargetReference {
            group: group.into(),
            kind: kind.into(),
            name: target.into(),
            ..Default::default()
        }];
        p
    }

    #[test]
    fn attachment_rules() {
        let gw = "gateway.networking.k8s.io";
        let mut selector = policy("selector", Vec::new());
        selector.spec.selector = Some(WorkloadSelector::default());
        let mut single = targeted("single-ref", "shop", "", "Service", "cart");
        single.spec.target_ref = single.spec.target_refs.pop();
        let mut elsewhere = targeted("elsewhere", "shop", "", "Service", "cart");
        elsewhere.spec.target_refs[0].namespace = "other".into();
        let config = Config {
            request_authentications: vec![
                targeted("waypoint", "shop", gw, "Gateway", "wp"),
                targeted("other-waypoint", "shop", gw, "Gateway", "wp2"),
                targeted("waypoint-other-ns", "ops", gw, "Gateway", "wp"),
                targeted("class", "istio-system", gw, "GatewayClass", "istio-waypoint"),
                targeted("class-not-root", "shop", gw, "GatewayClass", "istio-waypoint"),
                targeted("service", "shop", "core", "Service", "cart"),
                targeted("other-service", "shop", "", "Service", "users"),
                targeted("service-entry", "shop", "networking.istio.io", "ServiceEntry", "cart"),
                targeted("bad-group", "shop", "example.com", "Gateway", "wp"),
                single,
                elsewhere,
                selector,
                policy("namespace-wide", Vec::new()),
            ],
            ..Config::default()
        };
        let waypoint = Waypoint { namespace: "shop", name: "wp", class: "istio-waypoint" };
        let names = |kind| -> Vec<String> {
            applicable(&config, waypoint, Destination { kind, namespace: "shop", name: "cart" })
                .iter()
                .map(|p| p.metadata.name.clone())
                .collect()
        };
        assert_eq!(names(DestinationKind::Service), ["waypoint", "class", "service", "single-ref"]);
        assert_eq!(names(DestinationKind::ServiceEntry), ["waypoint", "class", "service-entry"]);
        let (auth, problems) = Authenticator::for_destination(
            &config,
            Waypoint { namespace: "shop", name: "wp2", class: "other-class" },
            Destination { kind: DestinationKind::Service, namespace: "shop", name: "users" },
            DEFAULT_CLOCK_SKEW_SECS,
        );
        assert!(problems.is_empty());
        assert!(auth.is_empty(), "the test policies have no rules");
        let mut keyed = targeted("keyed", "shop", gw, "Gateway", "wp2");
        keyed.spec.jwt_rules = vec![JwtRule { issuer: ISS.into(), ..JwtRule::default() }];
        let config = Config { request_authentications: vec![keyed], ..Config::default() };
        let (auth, problems) = Authenticator::for_destination(
            &config,
            Waypoint { namespace: "shop", name: "wp2", class: "other-class" },
            Destination { kind: DestinationKind::Service, namespace: "shop", name: "users" },
            DEFAULT_CLOCK_SKEW_SECS,
        );
        assert!(!auth.is_empty());
        assert!(matches!(problems[..], [CompileProblem::Keys { source: JwksError::NoKeySource { .. }, .. }]));
    }
}

proptest! {
    /// Whatever arrives in the header, authentication answers without panicking.
    #[test]
    fn arbitrary_tokens_never_panic(token in proptest::collection::vec(any::<u8>(), 0..300), dots in 0usize..4) {
        let key = TestKey::ed();
        let auth = authenticator(vec![rule(ISS, jwks_of(&[(&key, None)]))]);
        let mut text: String = token.iter().map(|b| char::from(b' ' + b % 95)).collect();
        for i in 0..dots {
            text.insert(text.len() * i / 4, '.');
        }
        if let Ok(value) = HeaderValue::from_str(&format!("Bearer {text}")) {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value);
            let outcome = auth.authenticate(&headers, Some(&format!("access_token={text}")), NOW);
            let accepted = matches!(outcome, Outcome::Authenticated { .. });
            prop_assert!(!accepted, "accepted {}", text);
        }
        let _ = parse_jwks(ISS, &String::from_utf8_lossy(&token));
    }

    /// Well-formed but unsigned-by-us tokens with any claims are refused, never accepted.
    #[test]
    fn arbitrary_claims_with_a_foreign_key_are_refused(sub in ".{0,20}", exp in any::<u64>()) {
        let (ours, theirs) = (TestKey::ed(), TestKey::ed());
        let auth = authenticator(vec![rule(ISS, jwks_of(&[(&ours, None)]))]);
        let t = token("EdDSA", None, &json!({"iss": ISS, "sub": sub, "exp": exp}), &theirs);
        let outcome = auth.authenticate(&bearer(&t), None, NOW);
        prop_assert_eq!(denied(&outcome), &JwtError::Signature);
    }
}
