//! The pure half of `CUSTOM` authorization (Envoy's `ext_authz`, as Istio configures it
//! from `MeshConfig.extensionProviders`): what the check request to the authorizer
//! carries, and what the authorizer's answer means for the request. The binary's
//! `ext_authz` module does the I/O (connections, timeouts) around these functions.
//!
//! - HTTP provider: the check is the original request's method and `pathPrefix` + path,
//!   with `Host`, `Authorization`, `Content-Length: 0`, the headers
//!   `includeRequestHeadersInCheck` lists and the fixed `includeAdditionalHeadersInCheck`;
//!   no body. A `200` allows; a 5xx is a failure of the authorizer; any other status
//!   denies with that status and body ([`http_check`], [`http_decision`]).
//! - gRPC provider: `envoy.service.auth.v3.Authorization/Check` with a hand-encoded
//!   `CheckRequest` ([`encode_check_request`]); `status.code` 0 allows
//!   ([`decode_check_response`]).
//! - Failures (the binary's to detect): `failOpen` allows, else `statusOnError`
//!   ([`on_failure`]).
use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version, header};
use mesh_common::config::mesh::ExtAuthzHttp;

use self::proto::{ProtoError, Reader, Value, Writer};

pub mod proto;

/// The gRPC method of Envoy's authorization service.
pub const GRPC_CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";
/// An HTTP authorizer's answer header listing request headers to remove (Envoy's).
pub const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

/// The request being authorized, as the waypoint has it after normalization.
#[derive(Clone, Copy, Debug)]
pub struct CheckRequest<'a> {
    pub method: &'a Method,
    /// The normalized path with its query (the one routing and RBAC used).
    pub path: &'a str,
    /// The request's host (`:authority` or `Host`).
    pub host: &'a str,
    /// `http` or `https` as the client sent it.
    pub scheme: &'a str,
    pub version: Version,
    pub headers: &'a HeaderMap,
    /// The client's SPIFFE identity from the tunnel (empty when unknown).
    pub source_principal: &'a str,
    /// The direct peer: the client as the tunnel reports it, never an address from
    /// `X-Forwarded-For`. Envoy fills `attributes.source.address` from the
    /// connection's remote address; `xff_num_trusted_hops` changes only the stream's
    /// view of the client (`remote.ip`, what `remoteIpBlocks` match), so with trusted
    /// proxies the authorizer reads the forwarded client from the headers, as with Envoy.
    pub source_addr: SocketAddr,
    /// The service VIP and port the request was sent to.
    pub destination_addr: SocketAddr,
    /// The waypoint's own SPIFFE identity: the peer the client's mTLS reached, as
    /// Envoy reports it (empty when unknown).
    pub destination_principal: &'a str,
    /// `x-request-id`, or empty.
    pub request_id: &'a str,
}

/// How a header edit combines with headers already there (Envoy's
/// `HeaderValueOption`: `append`, else `append_action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderAction {
    /// Replace every value of the header (`ext_authz`'s default: `append` false).
    Set,
    /// Add a value, keeping the ones there.
    Append,
    /// Add only when the header is absent.
    AddIfAbsent,
    /// Replace only when the header is present.
    OverwriteIfExists,
}

/// One header to put on the request or the response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderEdit {
    pub name: HeaderName,
    pub value: HeaderValue,
    pub action: HeaderAction,
}

impl HeaderEdit {
    fn set(name: HeaderName, value: HeaderValue) -> Self {
        Self { name, value, action: HeaderAction::Set }
    }

    /// Applies the edit to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let present = headers.contains_key(&self.name);
        match self.action {
            HeaderAction::Set => {
                headers.insert(self.name.clone(), self.value.clone());
            }
            HeaderAction::Append => {
                headers.append(self.name.clone(), self.value.clone());
            }
            HeaderAction::AddIfAbsent if !present => {
                headers.insert(self.name.clone(), self.value.clone());
            }
            HeaderAction::OverwriteIfExists if present => {
                headers.insert(self.name.clone(), self.value.clone());
            }
            HeaderAction::AddIfAbsent | HeaderAction::OverwriteIfExists => {}
        }
    }

    /// Applies `edits` in order (a `Set` after an `Append` of the same name wins).
    pub fn apply_all(edits: &[HeaderEdit], headers: &mut HeaderMap) {
        for edit in edits {
            edit.apply(headers);
        }
    }
}

/// What the authorizer decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Forward the request: remove `remove` from it, then apply `upstream_headers` to
    /// it; apply `downstream_headers` to the response the client gets.
    Allow { upstream_headers: Vec<HeaderEdit>, downstream_headers: Vec<HeaderEdit>, remove: Vec<HeaderName> },
    /// Answer the client with `status`, `headers` and `body`; the request goes nowhere.
    Deny { status: StatusCode, headers: Vec<HeaderEdit>, body: Bytes },
}

impl Decision {
    /// An allow that changes nothing.
    pub fn allow() -> Self {
        Self::Allow { upstream_headers: Vec::new(), downstream_headers: Vec::new(), remove: Vec::new() }
    }

    pub fn is_allow(&self) -> bool {
        matches!(self, Self::Allow { .. })
    }
}

/// The decision when the authorizer cannot answer (connect error, timeout, malformed
/// answer): `failOpen` allows unchanged, else deny with `statusOnError` (403 when it
/// is not a valid status, as the config model's default).
pub fn on_failure(fail_open: bool, status_on_error: u16) -> Decision {
    if fail_open {
        Decision::allow()
    } else {
        Decision::Deny {
            status: StatusCode::from_u16(status_on_error).unwrap_or(StatusCode::FORBIDDEN),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }
}

/// Splits a provider's `service`, Istio's `[<namespace>/]<hostname>`, into the
/// namespace (when written) and the host name.
pub fn service_host(service: &str) -> (Option<&str>, &str) {
    match service.split_once('/') {
        Some((namespace, host)) => (Some(namespace), host),
        None => (None, service),
    }
}

/// Whether header `name` matches one of Istio's header patterns: exact (`abc`),
/// prefix (`abc*`) or suffix (`*abc`), compared without case.
pub fn header_matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|pattern| {
        let pattern = pattern.to_ascii_lowercase();
        let name = name.to_ascii_lowercase();
        if let Some(prefix) = pattern.strip_suffix('*') {
            name.starts_with(prefix)
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            name.ends_with(suffix)
        } else {
            name == pattern
        }
    })
}

/// Headers that describe one hop's connection or framing: never copied between the
/// client's request, the check and the answers.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
            | "host"
    )
}

/// A provider setting that cannot be used to build the check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("includeAdditionalHeadersInCheck: `{name}` is not a valid header name")]
    HeaderName { name: String },
    #[error("includeAdditionalHeadersInCheck.{name}: `{value}` is not a valid header value")]
    HeaderValue { name: String, value: String },
    #[error("pathPrefix `{prefix}` + path `{path}` is not a valid request target")]
    Path { prefix: String, path: String },
    #[error("the request's host `{host}` is not a valid Host header value")]
    Host { host: String },
}

/// The check request to an HTTP provider: method, `pathPrefix` + path and headers
/// (origin-form target: the caller sends it on a connection to the authorizer).
pub fn http_check(provider: &ExtAuthzHttp, req: &CheckRequest<'_>) -> Result<http::Request<()>, ConfigError> {
    let prefix = provider.path_prefix.as_deref().unwrap_or("");
    let target = format!("{prefix}{}", req.path);
    let uri: http::Uri =
        target.parse().map_err(|_| ConfigError::Path { prefix: prefix.to_string(), path: req.path.to_string() })?;
    let mut check = http::Request::new(());
    *check.method_mut() = req.method.clone();
    *check.uri_mut() = uri;
    let headers = check.headers_mut();
    for (name, value) in req.headers {
        if !hop_by_hop(name)
            && (name == header::AUTHORIZATION
                || header_matches(&provider.include_request_headers_in_check, name.as_str()))
        {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(
        header::HOST,
        HeaderValue::from_str(req.host).map_err(|_| ConfigError::Host { host: req.host.to_string() })?,
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    for (name, value) in &provider.include_additional_headers_in_check {
        let header_name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| ConfigError::HeaderName { name: name.clone() })?;
        let header_value = HeaderValue::from_str(value)
            .map_err(|_| ConfigError::HeaderValue { name: name.clone(), value: value.clone() })?;
        headers.insert(header_name, header_value);
    }
    Ok(check)
}

/// What an HTTP provider's answer means (Envoy's HTTP service semantics): `200`
/// allows, copying the answer's headers that `headersToUpstreamOnAllow` names onto the
/// request and those `headersToDownstreamOnAllow` names onto the response, and
/// removing the request headers the answer lists in `x-envoy-auth-headers-to-remove`.
/// A 5xx is the authorizer failing (an error: `failOpen` / `statusOnError` apply, as
/// in Envoy). Any other status denies with that status and the answer's body, and the answer's
/// headers `headersToDownstreamOnDeny` names (all of them but `Host` when the list is
/// empty; `WWW-Authenticate` and `Location` always) — framing headers are not copied,
/// the waypoint frames the body itself.
pub fn http_decision(
    provider: &ExtAuthzHttp,
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Decision, AnswerError> {
    if status.is_server_error() {
        return Err(AnswerError::ServerError { status });
    }
    let copied = |patterns: &[String]| -> Vec<HeaderEdit> {
        headers
            .iter()
            .filter(|(name, _)| !hop_by_hop(name) && header_matches(patterns, name.as_str()))
            .map(|(name, value)| HeaderEdit::set(name.clone(), value.clone()))
            .collect()
    };
    if status == StatusCode::OK {
        let remove = headers
            .get_all(HEADERS_TO_REMOVE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            // Envoy never lets the authorizer remove the request's target or host.
            .filter(|name| *name != header::HOST)
            .collect();
        return Ok(Decision::Allow {
            upstream_headers: copied(&provider.headers_to_upstream_on_allow),
            downstream_headers: copied(&provider.headers_to_downstream_on_allow),
            remove,
        });
    }
    let deny_headers = if provider.headers_to_downstream_on_deny.is_empty() {
        headers
            .iter()
            .filter(|(name, _)| !hop_by_hop(name))
            .map(|(name, value)| HeaderEdit { name: name.clone(), value: value.clone(), action: HeaderAction::Append })
            .collect()
    } else {
        headers
            .iter()
            .filter(|(name, _)| {
                !hop_by_hop(name)
                    && (*name == header::WWW_AUTHENTICATE
                        || *name == header::LOCATION
                        || header_matches(&provider.headers_to_downstream_on_deny, name.as_str()))
            })
            .map(|(name, value)| HeaderEdit { name: name.clone(), value: value.clone(), action: HeaderAction::Append })
            .collect()
    };
    Ok(Decision::Deny { status, headers: deny_headers, body })
}

/// The `envoy.service.auth.v3.CheckRequest` for `req`, protobuf-encoded (not framed).
/// Filled: `attributes.source` (address, principal), `attributes.destination`
/// (address, principal), `attributes.request.http` (id, method, headers with the
/// pseudo-headers `:authority`, `:method`, `:path`, `:scheme` as Envoy lists them,
/// path, host, scheme, protocol). Not filled: the request time and size, TLS
/// session, metadata and context extensions.
pub fn encode_check_request(req: &CheckRequest<'_>) -> Bytes {
    // Field numbers: envoy/service/auth/v3/{external_auth,attribute_context}.proto and
    // envoy/config/core/v3/address.proto.
    fn peer(w: &mut Writer, addr: SocketAddr, principal: &str) {
        // Peer.address (Address) -> Address.socket_address (SocketAddress):
        // address = 2, port_value = 3.
        w.message(1, |a| {
            a.message(1, |s| {
                s.string(2, &addr.ip().to_string()).uint(3, u64::from(addr.port()));
            });
        });
        w.string(4, principal);
    }
    let protocol = match req.version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    };
    let mut w = Writer::new();
    w.message(1, |attributes| {
        attributes.message(1, |source| peer(source, req.source_addr, req.source_principal));
        attributes.message(2, |destination| peer(destination, req.destination_addr, req.destination_principal));
        // AttributeContext.request = 4 -> Request.http = 2 (HttpRequest).
        attributes.message(4, |request| {
            request.message(2, |http| {
                http.string(1, req.request_id).string(2, req.method.as_str());
                let pseudo = [
                    (":authority", req.host),
                    (":method", req.method.as_str()),
                    (":path", req.path),
                    (":scheme", req.scheme),
                ];
                for (name, value) in pseudo {
                    http.message(3, |entry| {
                        entry.string(1, name).string(2, value);
                    });
                }
                // A map entry per name; repeated values joined with `,` (HTTP's rule).
                for name in req.headers.keys() {
                    let values: Vec<String> = req
                        .headers
                        .get_all(name)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .collect();
                    http.message(3, |entry| {
                        entry.string(1, name.as_str()).string(2, &values.join(","));
                    });
                }
                http.string(4, req.path).string(5, req.host).string(6, req.scheme).string(10, protocol);
            });
        });
    });
    w.finish()
}

/// An authorizer's answer that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("CheckResponse.{field}: malformed protobuf")]
    Proto {
        field: &'static str,
        #[source]
        source: ProtoError,
    },
    #[error("CheckResponse.{field}: wire type does not match the field's type")]
    FieldType { field: &'static str },
    #[error("CheckResponse.{field}: `{name}` is not a valid header name")]
    HeaderName { field: &'static str, name: String },
    #[error("CheckResponse.{field}: the value of `{name}` is not a valid header value")]
    HeaderValue { field: &'static str, name: String },
    #[error("the HTTP authorizer answered {status}: a failure, not a denial")]
    ServerError { status: StatusCode },
    #[error("gRPC message frame: {reason}")]
    Frame { reason: &'static str },
}

/// One gRPC length-prefixed message (uncompressed).
pub fn grpc_frame(message: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    Bytes::from(framed)
}

/// The one message of a unary gRPC answer body.
pub fn grpc_unframe(body: &[u8]) -> Result<&[u8], AnswerError> {
    let Some((prefix, rest)) = body.split_first_chunk::<5>() else {
        return Err(AnswerError::Frame { reason: "shorter than the 5-byte prefix" });
    };
    if prefix[0] != 0 {
        return Err(AnswerError::Frame { reason: "compressed message (no compression was offered)" });
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if rest.len() != len {
        return Err(AnswerError::Frame { reason: "length prefix does not match the body (one message expected)" });
    }
    Ok(rest)
}

fn fields<'a>(data: &'a [u8], field: &'static str) -> impl Iterator<Item = Result<(u32, Value<'a>), AnswerError>> + 'a {
    Reader::new(data).map(move |r| r.map_err(|source| AnswerError::Proto { field, source }))
}

fn len<'a>(value: Value<'a>, field: &'static str) -> Result<&'a [u8], AnswerError> {
    match value {
        Value::Len(bytes) => Ok(bytes),
        _ => Err(AnswerError::FieldType { field }),
    }
}

fn varint(value: Value<'_>, field: &'static str) -> Result<u64, AnswerError> {
    match value {
        Value::Varint(v) => Ok(v),
        _ => Err(AnswerError::FieldType { field }),
    }
}

/// Decodes a `config.core.v3.HeaderValueOption`.
fn header_option(data: &[u8], field: &'static str) -> Result<HeaderEdit, AnswerError> {
    let (mut key, mut value, mut raw) = (&[][..], &[][..], None);
    let (mut append, mut action) = (None, 0);
    for item in fields(data, field) {
        match item? {
            (1, v) => {
                for inner in fields(len(v, field)?, field) {
                    match inner? {
                        (1, v) => key = len(v, field)?,
                        (2, v) => value = len(v, field)?,
                        (3, v) => raw = Some(len(v, field)?),
                        _ => {}
                    }
                }
            }
            // google.protobuf.BoolValue { bool value = 1; }
            (2, v) => {
                let mut flag = false;
                for inner in fields(len(v, field)?, field) {
                    if let (1, v) = inner? {
                        flag = varint(v, field)? != 0;
                    }
                }
                append = Some(flag);
            }
            (3, v) => action = varint(v, field)?,
            _ => {}
        }
    }
    let name_text = String::from_utf8_lossy(key).into_owned();
    let name = HeaderName::from_bytes(key).map_err(|_| AnswerError::HeaderName { field, name: name_text.clone() })?;
    let value = HeaderValue::from_bytes(raw.unwrap_or(value))
        .map_err(|_| AnswerError::HeaderValue { field, name: name_text })?;
    // `append`, when written, wins; else `append_action`, whose default 0
    // (APPEND_IF_EXISTS_OR_ADD) cannot be told from "not written": ext_authz documents
    // `append` as false by default there, so 0 means Set.
    let action = match (append, action) {
        (Some(true), _) => HeaderAction::Append,
        (Some(false), _) | (None, 0 | 2) => HeaderAction::Set,
        (None, 1) => HeaderAction::AddIfAbsent,
        (None, _) => HeaderAction::OverwriteIfExists,
    };
    Ok(HeaderEdit { name, value, action })
}

/// Decodes an `envoy.service.auth.v3.CheckResponse`: `status.code` 0 allows with
/// `ok_response` (`headers` onto the request, `headers_to_remove`,
/// `response_headers_to_add` onto the response); any other code denies with
/// `denied_response` (`status.code`, 403 when unset, `headers`, `body`).
pub fn decode_check_response(message: &[u8]) -> Result<Decision, AnswerError> {
    let mut code = 0;
    let (mut upstream, mut downstream, mut remove) = (Vec::new(), Vec::new(), Vec::new());
    let (mut status, mut deny_headers, mut body) = (0, Vec::new(), Bytes::new());
    for item in fields(message, "") {
        match item? {
            (1, v) => {
                for inner in fields(len(v, "status")?, "status") {
                    if let (1, v) = inner? {
                        // int32: negative codes are sign-extended; any non-zero denies.
                        code = varint(v, "status.code")?;
                    }
                }
            }
            (2, v) => {
                for inner in fields(len(v, "denied_response")?, "denied_response") {
                    match inner? {
                        (1, v) => {
                            for s in fields(len(v, "denied_response.status")?, "denied_response.status") {
                                if let (1, v) = s? {
                                    status = varint(v, "denied_response.status.code")?;
                                }
                            }
                        }
                        (2, v) => deny_headers
                            .push(header_option(len(v, "denied_response.headers")?, "denied_response.headers")?),
                        (3, v) => body = Bytes::copy_from_slice(len(v, "denied_response.body")?),
                        _ => {}
                    }
                }
            }
            (3, v) => {
                for inner in fields(len(v, "ok_response")?, "ok_response") {
                    match inner? {
                        (2, v) => upstream.push(header_option(len(v, "ok_response.headers")?, "ok_response.headers")?),
                        (5, v) => {
                            let name = len(v, "ok_response.headers_to_remove")?;
                            remove.push(HeaderName::from_bytes(name).map_err(|_| AnswerError::HeaderName {
                                field: "ok_response.headers_to_remove",
                                name: String::from_utf8_lossy(name).into_owned(),
                            })?);
                        }
                        (6, v) => downstream.push(header_option(
                            len(v, "ok_response.response_headers_to_add")?,
                            "ok_response.response_headers_to_add",
                        )?),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if code == 0 {
        return Ok(Decision::Allow { upstream_headers: upstream, downstream_headers: downstream, remove });
    }
    let status = u16::try_from(status)
        .ok()
        .filter(|s| *s != 0)
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::FORBIDDEN);
    Ok(Decision::Deny { status, headers: deny_headers, body })
}

#[cfg(test)]
mod tests;
