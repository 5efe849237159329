use proptest::prelude::*;

use super::*;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

fn rnd(sample: u32) -> Randomness {
    Randomness { trace_id: [0x11; 16], span_id: [0x22; 8], sample }
}

fn get<'a>(s: &'a Started, name: &str) -> Option<&'a str> {
    s.upstream_headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.to_str().unwrap())
}

#[test]
fn traceparent_version_00_round_trips() {
    let tp = parse_traceparent(TP).unwrap();
    assert!(tp.sampled());
    assert_eq!(tp.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(tp.parent_id.to_string(), "00f067aa0ba902b7");
    assert_eq!(tp.to_header(), TP);
}

#[test]
fn bad_traceparents_are_rejected_with_the_reason() {
    let cases = [
        ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", "trace-id is all zeros"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", "parent-id is all zeros"),
        ("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "trace-id is not 32 lowercase hex digits"),
        ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", "version 00 must be 55 characters"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", "version 00 must be 55 characters"),
        ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "version ff is forbidden"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba9zzb7-01", "parent-id is not 16 lowercase hex digits"),
        ("00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "fields are not separated by '-'"),
        ("0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "version is not two lowercase hex digits"),
        (
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "a future version's extra fields must follow a '-'",
        ),
    ];
    for (value, reason) in cases {
        match parse_traceparent(value) {
            Err(TraceError::Invalid { header, reason: r, .. }) => {
                assert_eq!(header, "traceparent");
                assert_eq!(r, reason, "{value}");
            }
            Ok(tp) => panic!("{value} parsed as {tp:?}"),
        }
    }
}

#[test]
fn a_future_version_is_read_by_its_00_prefix() {
    let tp = parse_traceparent("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-what-ever").unwrap();
    assert_eq!(tp.flags, 1, "only the sampled bit of an unknown version is kept");
    assert_eq!(tp.to_header(), TP);
}

#[test]
fn b3_single_forms() {
    let (b, s) = parse_b3_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90").unwrap();
    let b = b.unwrap();
    assert_eq!(s, Sampling::Accept);
    assert!(!b.trace_id_64);
    assert_eq!(b.parent_id.unwrap().to_string(), "05e3ac9a4f6e3b90");
    let (b, s) = parse_b3_single("a3ce929d0e0e4736-00F067AA0BA902B7-d").unwrap();
    let b = b.unwrap();
    assert!(b.trace_id_64);
    assert_eq!(b.trace_id.to_string(), "0000000000000000a3ce929d0e0e4736");
    assert_eq!(s, Sampling::Debug);
    assert_eq!(parse_b3_single("a3ce929d0e0e4736-00f067aa0ba902b7").unwrap().1, Sampling::Defer);
    assert_eq!(parse_b3_single("0").unwrap(), (None, Sampling::Deny));
    for bad in ["x", "a3ce929d0e0e4736-00f067aa0ba902b7-2", "abc-00f067aa0ba902b7", "a3ce929d0e0e4736-0000000000000000"]
    {
        assert!(parse_b3_single(bad).is_err(), "{bad}");
    }
}

#[test]
fn b3_multi_forms() {
    let h = headers(&[
        ("x-b3-traceid", "a3ce929d0e0e4736"),
        ("x-b3-spanid", "00f067aa0ba902b7"),
        ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
        ("x-b3-sampled", "0"),
    ]);
    let (b, s) = parse_b3_multi(&h).unwrap();
    assert_eq!(s, Sampling::Deny);
    assert!(b.unwrap().trace_id_64);
    let h = headers(&[("x-b3-flags", "1"), ("x-b3-sampled", "0")]);
    assert_eq!(parse_b3_multi(&h).unwrap(), (None, Sampling::Debug));
    let h = headers(&[("x-b3-traceid", "a3ce929d0e0e4736")]);
    assert!(parse_b3_multi(&h).is_err());
    let h = headers(&[("x-b3-sampled", "maybe")]);
    assert!(parse_b3_multi(&h).is_err());
}

#[test]
fn a_new_trace_is_sampled_by_the_percentage() {
    let s = start(&HeaderMap::new(), 1.0, rnd(u32::MAX / 200));
    assert!(s.sampled);
    assert_eq!(s.parent_id, None);
    assert_eq!(get(&s, "traceparent"), Some("00-11111111111111111111111111111111-2222222222222222-01"));
    assert_eq!(s.upstream_headers.len(), 1, "W3C only when the request had no B3");
    let s = start(&HeaderMap::new(), 1.0, rnd(u32::MAX / 50));
    assert!(!s.sampled);
    assert_eq!(get(&s, "traceparent"), Some("00-11111111111111111111111111111111-2222222222222222-00"));
}

#[test]
fn the_incoming_decision_wins_over_the_percentage() {
    let s = start(&headers(&[("traceparent", TP)]), 0.0, rnd(0));
    assert!(s.sampled);
    assert_eq!(s.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(s.parent_id.unwrap().to_string(), "00f067aa0ba902b7");
    let unsampled = TP.replace("-01", "-00");
    let s = start(&headers(&[("traceparent", &unsampled)]), 100.0, rnd(0));
    assert!(!s.sampled);
    let s = start(&headers(&[("b3", "0")]), 100.0, rnd(0));
    assert!(!s.sampled);
    assert_eq!(get(&s, "b3"), Some("11111111111111111111111111111111-2222222222222222-0"));
}

#[test]
fn tracestate_passes_through_and_w3c_is_preferred() {
    let h = headers(&[
        ("traceparent", TP),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("tracestate", "rojo=00f067aa0ba902b7"),
        ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"),
    ]);
    let s = start(&h, 0.0, rnd(0));
    assert_eq!(s.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(s.sampled);
    assert_eq!(get(&s, "tracestate"), Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"));
    // B3 is rewritten to agree with the W3C context.
    assert_eq!(get(&s, "b3"), Some("4bf92f3577b34da6a3ce929d0e0e4736-2222222222222222-1-00f067aa0ba902b7"));
}

#[test]
fn b3_multi_is_answered_in_kind_with_64_bit_ids() {
    let h =
        headers(&[("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", "00f067aa0ba902b7"), ("x-b3-sampled", "1")]);
    let s = start(&h, 0.0, rnd(0));
    assert!(s.sampled);
    assert_eq!(get(&s, "x-b3-traceid"), Some("a3ce929d0e0e4736"));
    assert_eq!(get(&s, "x-b3-spanid"), Some("2222222222222222"));
    assert_eq!(get(&s, "x-b3-parentspanid"), Some("00f067aa0ba902b7"));
    assert_eq!(get(&s, "x-b3-sampled"), Some("1"));
    assert_eq!(get(&s, "traceparent"), Some("00-0000000000000000a3ce929d0e0e4736-2222222222222222-01"));
    let mut out = h.clone();
    inject(&s, &mut out);
    assert_eq!(out.get("x-b3-spanid").unwrap(), "2222222222222222");
    assert!(out.get("b3").is_none());
}

#[test]
fn b3_debug_is_kept() {
    let h = headers(&[("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", "00f067aa0ba902b7"), ("x-b3-flags", "1")]);
    let s = start(&h, 0.0, rnd(u32::MAX));
    assert!(s.sampled);
    assert_eq!(get(&s, "x-b3-flags"), Some("1"));
    assert_eq!(get(&s, "x-b3-sampled"), None, "debug implies accept; do not send both");
}

#[test]
fn an_invalid_traceparent_starts_a_new_trace_and_reports_why() {
    let s = start(&headers(&[("traceparent", "00-zz")]), 100.0, rnd(0));
    assert_eq!(s.parent_id, None);
    assert_eq!(s.trace_id.0, [0x11; 16]);
    assert_eq!(s.errors.len(), 1);
}

#[test]
fn sampling_percent_edges() {
    assert!(!sample(0.0, 0));
    assert!(!sample(f64::NAN, 0));
    assert!(sample(100.0, u32::MAX));
    assert!(sample(50.0, u32::MAX / 2 - 1));
    assert!(!sample(50.0, u32::MAX / 2 + 1));
}

#[test]
fn the_span_records_envoy_and_istio_tags_and_custom_tags() {
    let h = headers(&[("traceparent", TP), ("x-team", "blue")]);
    let s = start(&h, 0.0, rnd(0));
    let facts = RequestFacts {
        service_host: "reviews.default.svc.cluster.local",
        service_port: 9080,
        method: "GET",
        url: "http://reviews:9080/r/1",
        protocol: "HTTP/1.1",
        status: 503,
        response_flags: "UF",
        upstream_cluster: "outbound|9080|v1|reviews.default.svc.cluster.local",
        start_unix_nanos: 10,
        end_unix_nanos: 5,
        ..RequestFacts::default()
    };
    let node = Node { canonical_service: "waypoint", namespace: "default", ..Node::default() };
    let mut tags = BTreeMap::new();
    tags.insert("team".to_string(), CustomTag::Header { name: "x-team".into(), default: None });
    tags.insert("tier".to_string(), CustomTag::Header { name: "x-tier".into(), default: Some("none".into()) });
    tags.insert("env".to_string(), CustomTag::Environment { name: "ZONE".into(), default: None });
    tags.insert("lit".to_string(), CustomTag::Literal("x".into()));
    tags.insert("http.method".to_string(), CustomTag::Literal("overridden".into()));
    let env = |n: &str| (n == "ZONE").then(|| "z1".to_string());
    let span = finish(&s, SpanKind::Server, &facts, &node, &h, &tags, &env);
    let attr = |k: &str| span.attributes.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let str_ = |v: &str| Some(AttrValue::Str(v.into()));
    assert_eq!(span.name, "reviews.default.svc.cluster.local:9080/*");
    assert_eq!(span.parent_id.unwrap().to_string(), "00f067aa0ba902b7");
    assert!(span.error);
    assert_eq!(span.end_unix_nanos, 10, "an end before the start is clamped");
    assert_eq!(attr("http.status_code"), str_("503"));
    assert_eq!(attr("response_flags"), str_("UF"));
    assert_eq!(attr("istio.canonical_service"), str_("waypoint"));
    assert_eq!(attr("team"), str_("blue"));
    assert_eq!(attr("tier"), str_("none"));
    assert_eq!(attr("env"), str_("z1"));
    assert_eq!(attr("lit"), str_("x"));
    assert_eq!(attr("http.method"), str_("overridden"));
    let named = |p| span_name("reviews", 9080, p);
    assert_eq!(named(RoutePath::Prefix("/api/")), "reviews:9080/api/*");
    assert_eq!(named(RoutePath::Exact("/health")), "reviews:9080/health");
    assert_eq!(named(RoutePath::Regex("/v[0-9]+/.*")), "reviews:9080/v[0-9]+/.*");
    let keys: std::collections::BTreeSet<_> = span.attributes.iter().map(|(k, _)| k).collect();
    assert_eq!(keys.len(), span.attributes.len(), "keys are unique");
}

proptest! {
    #[test]
    fn parsing_never_panics(s in "\\PC{0,80}") {
        let _ = parse_traceparent(&s);
        let _ = parse_b3_single(&s);
    }

    #[test]
    fn emitted_headers_parse_back(trace in any::<[u8; 16]>(), span in any::<[u8; 8]>(), sampled in any::<bool>()) {
        prop_assume!(trace != [0; 16] && span != [0; 8]);
        let tp = Traceparent { trace_id: TraceId(trace), parent_id: SpanId(span), flags: u8::from(sampled) };
        prop_assert_eq!(parse_traceparent(&tp.to_header()).unwrap(), tp);
        let s = start(&headers(&[("traceparent", &tp.to_header()), ("b3", "1")]), 0.0, rnd(0));
        prop_assert_eq!(s.trace_id, TraceId(trace));
        let tp2 = parse_traceparent(get(&s, "traceparent").unwrap()).unwrap();
        prop_assert_eq!(tp2.sampled(), sampled);
        let (b3, _) = parse_b3_single(get(&s, "b3").unwrap()).unwrap();
        prop_assert_eq!(b3.unwrap().trace_id, TraceId(trace));
    }
}
