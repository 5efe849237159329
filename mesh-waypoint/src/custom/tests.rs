use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
    }
    map
}

fn request<'a>(method: &'a Method, headers: &'a HeaderMap) -> CheckRequest<'a> {
    CheckRequest {
        method,
        path: "/api/items?x=1",
        host: "shop.example:8080",
        scheme: "http",
        version: Version::HTTP_11,
        headers,
        source_principal: "spiffe://cluster.local/ns/a/sa/client",
        source_addr: "10.0.0.1:40000".parse().unwrap(),
        destination_addr: "10.96.0.10:8080".parse().unwrap(),
        destination_principal: "spiffe://cluster.local/ns/a/sa/waypoint",
        request_id: "req-1",
    }
}

/// Test-side encoder of a `HeaderValueOption` with `append` written when `Some`.
fn option(w: &mut Writer, field: u32, name: &str, value: &str, append: Option<bool>) {
    w.message(field, |o| {
        o.message(1, |h| {
            h.string(1, name).string(2, value);
        });
        if let Some(append) = append {
            o.message(2, |b| {
                b.uint(1, u64::from(append));
            });
        }
    });
}

#[test]
fn header_patterns_are_exact_prefix_or_suffix_without_case() {
    let patterns = vec!["X-Exact".to_string(), "x-pre-*".to_string(), "*-suf".to_string()];
    assert!(header_matches(&patterns, "x-exact"));
    assert!(header_matches(&patterns, "x-pre-anything"));
    assert!(header_matches(&patterns, "my-suf"));
    assert!(!header_matches(&patterns, "x-exact-not"));
    assert!(!header_matches(&patterns, "x-pre"));
    assert!(!header_matches(&[], "x-exact"));
}

#[test]
fn service_host_splits_the_namespace() {
    assert_eq!(service_host("foo/ext-authz.foo.svc.cluster.local"), (Some("foo"), "ext-authz.foo.svc.cluster.local"));
    assert_eq!(service_host("ext-authz.foo"), (None, "ext-authz.foo"));
}

#[test]
fn http_check_carries_prefix_method_host_and_listed_headers_only() {
    let provider = ExtAuthzHttp {
        path_prefix: Some("/check".into()),
        include_request_headers_in_check: vec!["x-ext-authz".into(), "x-b3-*".into()],
        include_additional_headers_in_check: BTreeMap::from([("x-fixed".to_string(), "yes".to_string())]),
        ..ExtAuthzHttp::default()
    };
    let original = headers(&[
        ("x-ext-authz", "allow"),
        ("x-b3-traceid", "abc"),
        ("authorization", "Bearer t"),
        ("cookie", "secret"),
        ("connection", "keep-alive"),
        ("content-length", "12"),
        ("x-fixed", "from-client"),
    ]);
    let method = Method::POST;
    let check = http_check(&provider, &request(&method, &original)).unwrap();
    assert_eq!(check.method(), Method::POST);
    assert_eq!(check.uri(), "/check/api/items?x=1");
    let h = check.headers();
    assert_eq!(h["host"], "shop.example:8080");
    assert_eq!(h["x-ext-authz"], "allow");
    assert_eq!(h["x-b3-traceid"], "abc");
    assert_eq!(h["authorization"], "Bearer t");
    assert_eq!(h["content-length"], "0");
    assert_eq!(h.get_all("x-fixed").iter().collect::<Vec<_>>(), ["yes"]);
    assert!(h.get("cookie").is_none());
    assert!(h.get("connection").is_none());
}

#[test]
fn http_check_rejects_a_bad_additional_header_by_name() {
    let provider = ExtAuthzHttp {
        include_additional_headers_in_check: BTreeMap::from([("bad name".to_string(), "v".to_string())]),
        ..ExtAuthzHttp::default()
    };
    let original = HeaderMap::new();
    let method = Method::GET;
    let error = http_check(&provider, &request(&method, &original)).unwrap_err();
    assert_eq!(error, ConfigError::HeaderName { name: "bad name".into() });
    assert!(error.to_string().contains("`bad name`"));
}

#[test]
fn http_200_allows_and_copies_only_the_named_headers() {
    let provider = ExtAuthzHttp {
        headers_to_upstream_on_allow: vec!["x-ext-authz-check-result".into()],
        headers_to_downstream_on_allow: vec!["x-down-*".into()],
        ..ExtAuthzHttp::default()
    };
    let answer = headers(&[
        ("x-ext-authz-check-result", "allowed"),
        ("x-down-note", "hi"),
        ("x-other", "no"),
        ("x-envoy-auth-headers-to-remove", "cookie, x-secret"),
        ("content-length", "0"),
    ]);
    let decision = http_decision(&provider, StatusCode::OK, &answer, Bytes::new()).unwrap();
    let Decision::Allow { upstream_headers, downstream_headers, remove } = decision else { panic!("{decision:?}") };
    assert_eq!(
        upstream_headers,
        [HeaderEdit::set(HeaderName::from_static("x-ext-authz-check-result"), HeaderValue::from_static("allowed"))]
    );
    assert_eq!(
        downstream_headers,
        [HeaderEdit::set(HeaderName::from_static("x-down-note"), HeaderValue::from_static("hi"))]
    );
    assert_eq!(remove, [HeaderName::from_static("cookie"), HeaderName::from_static("x-secret")]);
}

#[test]
fn http_non_200_denies_with_status_body_and_headers() {
    let answer = headers(&[("x-ext-authz-check-result", "denied"), ("www-authenticate", "Bearer"), ("host", "authz")]);
    let body = Bytes::from_static(b"denied by ext_authz");
    // No list: every header but Host and framing.
    let all = http_decision(&ExtAuthzHttp::default(), StatusCode::FORBIDDEN, &answer, body.clone()).unwrap();
    let Decision::Deny { status, headers: h, body: b } = all else { panic!("{all:?}") };
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(b, body);
    let names: Vec<&str> = h.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["x-ext-authz-check-result", "www-authenticate"]);
    // A list: those headers plus WWW-Authenticate; a 2xx other than 200 denies too.
    let provider = ExtAuthzHttp { headers_to_downstream_on_deny: vec!["x-none".into()], ..ExtAuthzHttp::default() };
    let listed = http_decision(&provider, StatusCode::NO_CONTENT, &answer, Bytes::new()).unwrap();
    let Decision::Deny { status, headers: h, .. } = listed else { panic!("{listed:?}") };
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(h.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["www-authenticate"]);
}

#[test]
fn http_5xx_is_a_failure_not_a_denial() {
    let answer = headers(&[("x-ext-authz-check-result", "broken")]);
    for status in [StatusCode::INTERNAL_SERVER_ERROR, StatusCode::SERVICE_UNAVAILABLE] {
        let result = http_decision(&ExtAuthzHttp::default(), status, &answer, Bytes::from_static(b"oops"));
        assert_eq!(result, Err(AnswerError::ServerError { status }));
    }
}

#[test]
fn failure_is_fail_open_or_status_on_error() {
    assert_eq!(on_failure(true, 503), Decision::allow());
    assert!(
        matches!(on_failure(false, 503), Decision::Deny { status, .. } if status == StatusCode::SERVICE_UNAVAILABLE)
    );
    assert!(matches!(on_failure(false, 7), Decision::Deny { status, .. } if status == StatusCode::FORBIDDEN));
}

/// Reads our encoded `CheckRequest` back field by field: the field numbers are
/// Envoy's, so a wrong number fails here.
#[test]
fn check_request_uses_envoys_field_numbers() {
    fn one(data: &[u8], field: u32) -> &[u8] {
        Reader::new(data)
            .map(Result::unwrap)
            .find_map(|(f, v)| match v {
                Value::Len(b) if f == field => Some(b),
                _ => None,
            })
            .unwrap_or_else(|| panic!("field {field} missing"))
    }
    let original = headers(&[
        ("x-ext-authz", "allow"),
        ("x-multi", "a"),
        ("x-multi", "b"),
        ("x-forwarded-for", "203.0.113.7, 10.0.0.9"),
    ]);
    let method = Method::GET;
    let encoded = encode_check_request(&request(&method, &original));
    let attributes = one(&encoded, 1);
    let source = one(attributes, 1);
    let socket = one(one(source, 1), 1);
    // The direct peer, as Envoy's `source.address` (the connection's remote address):
    // never an address from `X-Forwarded-For`, which travels in the headers.
    assert_eq!(one(socket, 2), b"10.0.0.1");
    assert!(Reader::new(socket).map(Result::unwrap).any(|f| f == (3, Value::Varint(40000))));
    assert_eq!(one(source, 4), b"spiffe://cluster.local/ns/a/sa/client");
    let destination = one(attributes, 2);
    assert_eq!(one(one(one(destination, 1), 1), 2), b"10.96.0.10");
    assert_eq!(one(destination, 4), b"spiffe://cluster.local/ns/a/sa/waypoint");
    let http = one(one(attributes, 4), 2);
    assert_eq!(one(http, 1), b"req-1");
    assert_eq!(one(http, 2), b"GET");
    assert_eq!(one(http, 4), b"/api/items?x=1");
    assert_eq!(one(http, 5), b"shop.example:8080");
    assert_eq!(one(http, 6), b"http");
    assert_eq!(one(http, 10), b"HTTP/1.1");
    let map: Vec<(String, String)> = Reader::new(http)
        .map(Result::unwrap)
        .filter_map(|(f, v)| match v {
            Value::Len(entry) if f == 3 => Some((
                String::from_utf8(one(entry, 1).to_vec()).unwrap(),
                String::from_utf8(one(entry, 2).to_vec()).unwrap(),
            )),
            _ => None,
        })
        .collect();
    assert!(map.contains(&("x-ext-authz".into(), "allow".into())));
    assert!(map.contains(&("x-multi".into(), "a,b".into())));
    assert!(map.contains(&("x-forwarded-for".into(), "203.0.113.7, 10.0.0.9".into())));
    assert!(map.contains(&(":path".into(), "/api/items?x=1".into())));
}

#[test]
fn check_response_ok_carries_header_edits() {
    let mut w = Writer::new();
    w.message(1, |_| {});
    w.message(3, |ok| {
        option(ok, 2, "x-ext-authz-check-result", "allowed", None);
        option(ok, 2, "x-added", "more", Some(true));
        ok.string(5, "cookie");
        option(ok, 6, "x-down", "d", Some(false));
    });
    let decision = decode_check_response(&w.finish()).unwrap();
    let Decision::Allow { upstream_headers, downstream_headers, remove } = decision else { panic!("{decision:?}") };
    assert_eq!(upstream_headers.len(), 2);
    assert_eq!(upstream_headers[0].action, HeaderAction::Set);
    assert_eq!(upstream_headers[1].action, HeaderAction::Append);
    assert_eq!(remove, [HeaderName::from_static("cookie")]);
    assert_eq!(downstream_headers[0].name, "x-down");
    let mut request = headers(&[("x-added", "first"), ("x-ext-authz-check-result", "forged")]);
    HeaderEdit::apply_all(&upstream_headers, &mut request);
    assert_eq!(request.get_all("x-added").iter().collect::<Vec<_>>(), ["first", "more"]);
    assert_eq!(request.get_all("x-ext-authz-check-result").iter().collect::<Vec<_>>(), ["allowed"]);
}

#[test]
fn check_response_denied_has_status_headers_body_and_403_default() {
    let mut w = Writer::new();
    w.message(1, |s| {
        s.uint(1, 7);
    });
    w.message(2, |d| {
        d.message(1, |s| {
            s.uint(1, 401);
        });
        option(d, 2, "x-why", "nope", None);
        d.string(3, "denied by ext_authz");
    });
    let decision = decode_check_response(&w.finish()).unwrap();
    let Decision::Deny { status, headers, body } = decision else { panic!("{decision:?}") };
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers[0].name, "x-why");
    assert_eq!(body, "denied by ext_authz");
    // status.code set, no denied_response: 403.
    let mut w = Writer::new();
    w.message(1, |s| {
        s.uint(1, 16);
    });
    assert!(
        matches!(decode_check_response(&w.finish()), Ok(Decision::Deny { status, .. }) if status == StatusCode::FORBIDDEN)
    );
    // An empty message is status OK: allow.
    assert_eq!(decode_check_response(&[]), Ok(Decision::allow()));
}

#[test]
fn garbage_answers_are_errors_naming_the_field() {
    // ok_response (field 3) claiming 10 bytes with 1 present.
    assert!(matches!(
        decode_check_response(&[0x1a, 10, 0]),
        Err(AnswerError::Proto { source: ProtoError::Truncated { .. }, .. })
    ));
    // status (field 1) as a varint instead of a message.
    assert_eq!(decode_check_response(&[0x08, 1]), Err(AnswerError::FieldType { field: "status" }));
    let mut w = Writer::new();
    w.message(3, |ok| option(ok, 2, "bad name", "v", None));
    let error = decode_check_response(&w.finish()).unwrap_err();
    assert_eq!(error, AnswerError::HeaderName { field: "ok_response.headers", name: "bad name".into() });
}

#[test]
fn grpc_frames_round_trip_and_bad_frames_fail() {
    let framed = grpc_frame(b"abc");
    assert_eq!(&framed[..], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
    assert_eq!(grpc_unframe(&framed).unwrap(), b"abc");
    assert!(grpc_unframe(&[0, 0, 0]).is_err());
    assert!(grpc_unframe(&[1, 0, 0, 0, 0]).is_err());
    assert!(grpc_unframe(&[0, 0, 0, 0, 4, 1]).is_err());
}

proptest! {
    /// Whatever the authorizer sends, decoding returns (never panics).
    #[test]
    fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_check_response(&bytes);
        let _ = grpc_unframe(&bytes);
    }

    /// Strings and varints written are read back unchanged.
    #[test]
    fn writer_and_reader_agree(field in 1u32..1000, n in any::<u64>(), s in ".{0,40}") {
        let mut w = Writer::new();
        w.uint(field, n).string(field + 1, &s);
        let bytes = w.finish();
        let read: Vec<(u32, Value<'_>)> = Reader::new(&bytes).map(Result::unwrap).collect();
        let mut expected = Vec::new();
        if n != 0 { expected.push((field, Value::Varint(n))); }
        if !s.is_empty() { expected.push((field + 1, Value::Len(s.as_bytes()))); }
        prop_assert_eq!(read, expected);
    }
}
