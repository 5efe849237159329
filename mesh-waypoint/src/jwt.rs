//! Istio `RequestAuthentication` at the waypoint: JWT extraction, verification and
//! claim checks, as Envoy's `jwt_authn` filter does them under the configuration istiod
//! generates (every rule a provider, `requires_any` of them or a missing token).
//!
//! Pure: [`Authenticator::compile`] turns the applicable policies into providers once
//! per configuration version (key sets parsed here, never on the request path), and
//! [`Authenticator::authenticate`] takes a request's headers, its query and `now`
//! (Unix seconds; no clock reads) and returns what to do.
//!
//! Semantics (Istio's):
//! - No token in any location the rules read: the request passes unauthenticated (no
//!   request principal); `AuthorizationPolicy`'s `requestPrincipals` decide.
//! - A token that no rule's `issuer` accepts, or that fails any check: 401 with Envoy's
//!   message as the body (for example `Jwt verification fails`, `Jwt is expired`).
//! - Several tokens (several locations filled): every one must verify; the request
//!   principal is the first one's (rules in policy order, locations in rule order).
//!   Istio calls multiple tokens unsupported; refusing an invalid second token is
//!   the fail-closed reading.
//! - `audiences` empty: any `aud` (or none) is accepted. Istio's reference says the
//!   service name is accepted then, but istiod configures Envoy with no audience
//!   check in that case, and that is what users observe; we do the same.
//! - `exp` / `nbf` are checked with a clock-skew tolerance (Envoy's default 60 s):
//!   expired when `now > exp + skew`, not yet valid when `nbf > now + skew`.
//! - `forwardOriginalToken: false` (the default) removes the header the token came in;
//!   a token in a query parameter or cookie stays (Envoy does not remove those either).
use http::{HeaderMap, HeaderName, HeaderValue, header};
use mesh_common::config::{
    Config,
    security::{JwtRule, RequestAuthentication},
};
use serde_json::Value;

pub mod jwks;
pub mod select;

pub use jwks::{Alg, Jwks, JwksError, KeySkip, parse_jwks};

/// Envoy's default `clock_skew_seconds`.
pub const DEFAULT_CLOCK_SKEW_SECS: u64 = 60;

/// Where a token is looked for when a rule names no location (Istio's defaults).
const DEFAULT_PREFIX: &str = "Bearer ";
const DEFAULT_PARAM: &str = "access_token";

/// Base64url (RFC 4648 section 5) with or without padding, as tokens and key sets
/// are written in the wild.
pub(crate) mod b64 {
    use base64::{
        Engine as _,
        alphabet::URL_SAFE,
        engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
    };

    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &URL_SAFE,
        GeneralPurposeConfig::new().with_encode_padding(false).with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );

    pub fn decode(text: &str) -> Option<Vec<u8>> {
        ENGINE.decode(text).ok()
    }

    #[cfg(test)]
    pub fn encode(bytes: &[u8]) -> String {
        ENGINE.encode(bytes)
    }
}

/// Why a token was refused. The `Display` text is Envoy's (`jwt_verify_lib`), the
/// body of the 401; the fields are for the access log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    BadFormat,
    #[error("Jwt header is an invalid Base64url encoded")]
    HeaderBase64,
    #[error("Jwt header is an invalid JSON")]
    HeaderJson,
    #[error("Jwt payload is an invalid Base64url encoded")]
    PayloadBase64,
    #[error("Jwt payload is an invalid JSON")]
    PayloadJson,
    #[error("Jwt signature is an invalid Base64url encoded")]
    SignatureBase64,
    /// `none`, HMAC and anything unknown.
    #[error("Jwt header [alg] is not supported")]
    UnsupportedAlg { alg: String },
    #[error("Jwt payload [{claim}] field is not an integer")]
    ClaimNotInteger { claim: &'static str },
    #[error("Jwt issuer is not configured")]
    UnknownIssuer { issuer: Option<String> },
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    NoMatchingKey { kid: Option<String> },
    #[error("Jwt verification fails")]
    Signature,
    #[error("Jwt is expired")]
    Expired { exp: u64, now: u64 },
    #[error("Jwt not yet valid")]
    NotYetValid { nbf: u64, now: u64 },
    #[error("Audiences in Jwt are not allowed")]
    Audience { audiences: Vec<String> },
}

/// A verified token is what authorization (`requestPrincipals`, `request.auth.*`)
/// reads: the policy engine's own type.
pub use mesh_common::policy::Auth;

/// Header changes a successful authentication makes to the request sent upstream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    pub remove: Vec<HeaderName>,
    /// Set (replacing any value the client sent, so a client cannot forge them).
    pub set: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderEdits {
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// A refused request: 401 with [`Denied::body`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub error: JwtError,
}

impl Denied {
    pub const STATUS: http::StatusCode = http::StatusCode::UNAUTHORIZED;

    /// Envoy's response body: the reason as text.
    pub fn body(&self) -> String {
        self.error.to_string()
    }

    /// Envoy's `www-authenticate` value; `realm` is the request's `http://host/path`.
    pub fn www_authenticate(realm: &str) -> String {
        format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")
    }
}

/// What authentication decided for one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// No rule applies, or no token was present: continue without a request principal.
    Anonymous,
    /// Every token verified: continue as `auth`, with `edits` applied upstream.
    Authenticated { auth: Auth, edits: HeaderEdits },
    /// 401.
    Denied(Denied),
}

/// Where one rule looks for its token.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Location {
    Header { name: HeaderName, prefix: String },
    Param(String),
    Cookie(String),
}

/// One `jwtRules` entry, compiled.
#[derive(Clone, Debug)]
struct Provider {
    /// Empty: any issuer (a rule that leaves `issuer` out).
    issuer: String,
    audiences: Vec<String>,
    keys: Vec<jwks::Key>,
    locations: Vec<Location>,
    forward: bool,
    payload_header: Option<HeaderName>,
    claim_headers: Vec<(HeaderName, String)>,
}

/// A problem found while compiling rules: the rule stays in force (fail closed: with
/// no keys its tokens are refused), the problem is for logs and status.
#[derive(Debug, thiserror::Error)]
pub enum CompileProblem {
    #[error("{policy}: spec.jwtRules[{rule}]: {source}")]
    Keys {
        policy: String,
        rule: usize,
        #[source]
        source: JwksError,
    },
    #[error("{policy}: spec.jwtRules[{rule}].{field}: {value:?} is not a valid header name")]
    HeaderName { policy: String, rule: usize, field: String, value: String },
}

/// The compiled rules of every policy that applies to one destination at a waypoint.
#[derive(Clone, Debug, Default)]
pub struct Authenticator {
    providers: Vec<Provider>,
    clock_skew: u64,
}

impl Authenticator {
    /// Compiles the rules of `policies` (see [`select::applicable`]). Problems do not
    /// drop a rule: a rule without usable keys refuses every token of its issuer, as
    /// istiod's placeholder key set does when a `jwksUri` cannot be fetched.
    pub fn compile(policies: &[&RequestAuthentication], clock_skew: u64) -> (Self, Vec<CompileProblem>) {
        let mut problems = Vec::new();
        let mut providers = Vec::new();
        for policy in policies {
            let name = format!("RequestAuthentication/{}/{}", policy.metadata.namespace, policy.metadata.name);
            for (index, rule) in policy.spec.jwt_rules.iter().enumerate() {
                providers.push(compile_rule(&name, index, rule, &mut problems));
            }
        }
        (Self { providers, clock_skew }, problems)
    }

    /// What `waypoint` enforces for `destination` under `config`: [`select::applicable`]
    /// then [`Authenticator::compile`]. Call once per configuration version and
    /// destination; keep the result for the version's life.
    pub fn for_destination(
        config: &Config,
        waypoint: select::Waypoint<'_>,
        destination: select::Destination<'_>,
        clock_skew: u64,
    ) -> (Self, Vec<CompileProblem>) {
        Self::compile(&select::applicable(config, waypoint, destination), clock_skew)
    }

    /// Is there any rule? (Without one every request is [`Outcome::Anonymous`].)
    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }

    /// Authenticates a request by its headers and query string (`uri.query()`), at
    /// `now` (Unix seconds).
    pub fn authenticate(&self, headers: &HeaderMap, query: Option<&str>, now: u64) -> Outcome {
        // Every (token, where it was) any rule reads, first seen first, with the
        // rules that read it there.
        let mut found: Vec<(String, Location, Vec<usize>)> = Vec::new();
        for (index, provider) in self.providers.iter().enumerate() {
            for location in &provider.locations {
                for token in extract(location, headers, query) {
                    match found.iter_mut().find(|(t, l, _)| *t == token && l == location) {
                        Some((_, _, readers)) => readers.push(index),
                        None => found.push((token, location.clone(), vec![index])),
                    }
                }
            }
        }
        if found.is_empty() {
            return Outcome::Anonymous;
        }
        let mut first: Option<Auth> = None;
        let mut edits = HeaderEdits::default();
        for (token, location, readers) in &found {
            match self.verify(token, readers, now) {
                Ok((auth, provider)) => {
                    provider.edits(token, location, &auth.claims, &mut edits);
                    first.get_or_insert(auth);
                }
                Err(error) => return Outcome::Denied(Denied { error }),
            }
        }
        let auth = first.expect("at least one token verified");
        Outcome::Authenticated { auth, edits }
    }

    /// Verifies one token against the rules that read it where it was found.
    fn verify(&self, token: &str, readers: &[usize], now: u64) -> Result<(Auth, &Provider), JwtError> {
        let parsed = Token::parse(token)?;
        let issuer = parsed.claims.get("iss").and_then(Value::as_str);
        let mut candidates = readers
            .iter()
            .map(|i| &self.providers[*i])
            .filter(|p| p.issuer.is_empty() || Some(p.issuer.as_str()) == issuer)
            .peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::UnknownIssuer { issuer: issuer.map(str::to_owned) });
        }
        let mut last = None;
        for provider in candidates {
            match provider.check(&parsed, now, self.clock_skew) {
                Ok(()) => return Ok((parsed.into_auth(), provider)),
                Err(error) => last = Some(error),
            }
        }
        Err(last.expect("one candidate at least"))
    }
}

fn compile_rule(policy: &str, rule: usize, spec: &JwtRule, problems: &mut Vec<CompileProblem>) -> Provider {
    let keys = match (&spec.jwks, &spec.jwks_uri) {
        (Some(text), _) => parse_jwks(&spec.issuer, text),
        (None, Some(uri)) => Err(JwksError::NotFetched { issuer: spec.issuer.clone(), uri: uri.clone() }),
        (None, None) => Err(JwksError::NoKeySource { issuer: spec.issuer.clone() }),
    };
    let keys = keys.map_or_else(
        |source| {
            problems.push(CompileProblem::Keys { policy: policy.to_owned(), rule, source });
            Vec::new()
        },
        |jwks| jwks.keys,
    );
    let mut header = |field: String, value: &str| {
        let name = HeaderName::try_from(value.to_ascii_lowercase()).ok();
        if name.is_none() {
            problems.push(CompileProblem::HeaderName {
                policy: policy.to_owned(),
                rule,
                field,
                value: value.to_owned(),
            });
        }
        name
    };
    let mut locations = Vec::new();
    for (i, from) in spec.from_headers.iter().enumerate() {
        if let Some(name) = header(format!("fromHeaders[{i}].name"), &from.name) {
            locations.push(Location::Header { name, prefix: from.prefix.clone().unwrap_or_default() });
        }
    }
    locations.extend(spec.from_params.iter().cloned().map(Location::Param));
    locations.extend(spec.from_cookies.iter().cloned().map(Location::Cookie));
    if spec.from_headers.is_empty() && spec.from_params.is_empty() && spec.from_cookies.is_empty() {
        locations.push(Location::Header { name: header::AUTHORIZATION, prefix: DEFAULT_PREFIX.to_owned() });
        locations.push(Location::Param(DEFAULT_PARAM.to_owned()));
    }
    let payload_header =
        spec.output_payload_to_header.as_deref().and_then(|h| header("outputPayloadToHeader".to_owned(), h));
    let claim_headers = spec
        .output_claim_to_headers
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            header(format!("outputClaimToHeaders[{i}].header"), &c.header).map(|name| (name, c.claim.clone()))
        })
        .collect();
    Provider {
        issuer: spec.issuer.clone(),
        audiences: spec.audiences.clone(),
        keys,
        locations,
        forward: spec.forward_original_token,
        payload_header,
        claim_headers,
    }
}

/// The tokens at `location` (every value of a repeated header).
fn extract(location: &Location, headers: &HeaderMap, query: Option<&str>) -> Vec<String> {
    match location {
        Location::Header { name, prefix } => headers
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .filter_map(|value| strip_prefix(value, prefix, name == header::AUTHORIZATION))
            .map(|token| token.trim().to_owned())
            .filter(|token| !token.is_empty())
            .collect(),
        Location::Param(param) => query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .filter_map(|pair| pair.split_once('='))
            .filter(|(key, value)| key == param && !value.is_empty())
            .map(|(_, value)| value.to_owned())
            .collect(),
        Location::Cookie(cookie) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(key, value)| key == cookie && !value.is_empty())
            .map(|(_, value)| value.trim_matches('"').to_owned())
            .collect(),
    }
}

/// `value` without `prefix`; the `Bearer` scheme of `Authorization` compares without
/// case (RFC 7235 auth schemes are case-insensitive).
fn strip_prefix<'a>(value: &'a str, prefix: &str, scheme: bool) -> Option<&'a str> {
    if scheme {
        let head = value.get(..prefix.len())?;
        head.eq_ignore_ascii_case(prefix).then(|| &value[prefix.len()..])
    } else {
        value.strip_prefix(prefix)
    }
}

/// A token split and decoded, its signature not yet checked.
struct Token<'a> {
    alg: Alg,
    kid: Option<String>,
    /// `header.payload` as sent: what the signature covers.
    signed: &'a str,
    signature: Vec<u8>,
    claims: Value,
}

impl<'a> Token<'a> {
    fn parse(token: &'a str) -> Result<Self, JwtError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::BadFormat);
        };
        if header.is_empty() || payload.is_empty() || signature.is_empty() {
            return Err(JwtError::BadFormat);
        }
        let header_json = b64::decode(header).ok_or(JwtError::HeaderBase64)?;
        let header_json: Value = serde_json::from_slice(&header_json).map_err(|_| JwtError::HeaderJson)?;
        if !header_json.is_object() {
            return Err(JwtError::HeaderJson);
        }
        let alg_name = header_json.get("alg").and_then(Value::as_str).unwrap_or("");
        let alg = Alg::parse(alg_name).ok_or_else(|| JwtError::UnsupportedAlg { alg: alg_name.to_owned() })?;
        let kid = header_json.get("kid").and_then(Value::as_str).map(str::to_owned);
        let claims = b64::decode(payload).ok_or(JwtError::PayloadBase64)?;
        let claims: Value = serde_json::from_slice(&claims).map_err(|_| JwtError::PayloadJson)?;
        if !claims.is_object() {
            return Err(JwtError::PayloadJson);
        }
        let signature = b64::decode(signature).ok_or(JwtError::SignatureBase64)?;
        let signed = &token[..header.len() + 1 + payload.len()];
        Ok(Self { alg, kid, signed, signature, claims })
    }

    fn audiences(&self) -> Vec<String> {
        match self.claims.get("aud") {
            Some(Value::String(one)) => vec![one.clone()],
            Some(Value::Array(many)) => many.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            _ => Vec::new(),
        }
    }

    /// An integer time claim, if present.
    fn time(&self, claim: &'static str) -> Result<Option<u64>, JwtError> {
        match self.claims.get(claim) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value.as_u64().map(Some).ok_or(JwtError::ClaimNotInteger { claim }),
        }
    }

    fn into_auth(self) -> Auth {
        let text = |claim: &str| self.claims.get(claim).and_then(Value::as_str).map(str::to_owned);
        let principal = format!("{}/{}", text("iss").unwrap_or_default(), text("sub").unwrap_or_default());
        let presenter = text("azp");
        let audiences = self.audiences();
        Auth { principal, audiences, presenter, claims: self.claims }
    }
}

impl Provider {
    /// Signature, then time, then audience: Envoy's order (a forged token is
    /// reported as forged, not as expired).
    fn check(&self, token: &Token<'_>, now: u64, skew: u64) -> Result<(), JwtError> {
        let mut candidates = self.keys.iter().filter(|k| k.candidate(token.alg, token.kid.as_deref())).peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::NoMatchingKey { kid: token.kid.clone() });
        }
        if !candidates.any(|key| key.verify(token.alg, token.signed.as_bytes(), &token.signature)) {
            return Err(JwtError::Signature);
        }
        if let Some(exp) = token.time("exp")?
            && now > exp.saturating_add(skew)
        {
            return Err(JwtError::Expired { exp, now });
        }
        if let Some(nbf) = token.time("nbf")?
            && nbf > now.saturating_add(skew)
        {
            return Err(JwtError::NotYetValid { nbf, now });
        }
        if !self.audiences.is_empty() {
            let audiences = token.audiences();
            let allowed = audiences.iter().any(|aud| self.audiences.iter().any(|want| same_audience(aud, want)));
            if !allowed {
                return Err(JwtError::Audience { audiences });
            }
        }
        Ok(())
    }

    /// What a verified token of this rule changes in the upstream request.
    fn edits(&self, token: &str, location: &Location, claims: &Value, edits: &mut HeaderEdits) {
        if !self.forward
            && let Location::Header { name, .. } = location
            && !edits.remove.contains(name)
        {
            edits.remove.push(name.clone());
        }
        if let Some(name) = &self.payload_header {
            // The payload segment as the token carries it: base64url, unpadded
            // (Envoy's `forward_payload_header` without `pad_forward_payload_header`).
            let payload = token.split('.').nth(1).unwrap_or_default();
            if let Ok(value) = HeaderValue::from_str(payload) {
                edits.set.push((name.clone(), value));
            }
        }
        for (name, claim) in &self.claim_headers {
            if let Some(value) = claim_value(claims, claim).and_then(|v| HeaderValue::from_str(&v).ok()) {
                edits.set.push((name.clone(), value));
            }
        }
    }
}

/// Audiences compare as Envoy's `jwt_verify_lib` does: without an `http://` or
/// `https://` scheme and without a trailing slash.
fn same_audience(a: &str, b: &str) -> bool {
    fn normal(s: &str) -> &str {
        let s = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")).unwrap_or(s);
        s.strip_suffix('/').unwrap_or(s)
    }
    normal(a) == normal(b)
}

/// The header text of `claim` (nested with `.`: `a.b.c`): strings as they are,
/// numbers and booleans in JSON form; objects, arrays and missing claims give none.
fn claim_value(claims: &Value, claim: &str) -> Option<String> {
    let value = claims.get(claim).or_else(|| claim.split('.').try_fold(claims, |v, part| v.get(part)))?;
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
