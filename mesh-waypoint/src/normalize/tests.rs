//! Normalization under each of Istio's options, targets refused, hosts.
use mesh_common::config::mesh::PathNormalization::{self, Base, DecodeAndMergeSlashes, MergeSlashes, None as Off};
use proptest::prelude::*;

use super::{Char, Normalized, Reject, normalize, normalize_host, normalize_path, request_host};

fn path(target: &str, option: PathNormalization) -> String {
    normalize("GET", target, "example.com", option).unwrap_or_else(|e| panic!("{target}: {e}")).path
}

#[test]
fn each_option_on_the_classic_targets() {
    // (target, NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
    let cases = [
        ("/a/b", "/a/b", "/a/b", "/a/b", "/a/b"),
        ("/a/./b/../c", "/a/./b/../c", "/a/c", "/a/c", "/a/c"),
        ("/../../a", "/../../a", "/a", "/a", "/a"),
        ("/a/..", "/a/..", "/", "/", "/"),
        ("/a/.", "/a/.", "/a/", "/a/", "/a/"),
        ("//a///b", "//a///b", "//a///b", "/a/b", "/a/b"),
        ("/%61%62%2d%7E", "/%61%62%2d%7E", "/ab-~", "/ab-~", "/ab-~"),
        ("/%2e%2E/a", "/%2e%2E/a", "/a", "/a", "/a"),
        ("/a%2fb", "/a%2fb", "/a%2Fb", "/a%2Fb", "/a/b"),
        ("/a%5cb", "/a%5cb", "/a%5Cb", "/a%5Cb", "/a/b"),
        ("/a%2F..%2Fb", "/a%2F..%2Fb", "/a%2F..%2Fb", "/a%2F..%2Fb", "/b"),
        ("/a\\b", "/a\\b", "/a/b", "/a/b", "/a/b"),
        ("/a/\\..\\b", "/a/\\..\\b", "/a/b", "/a/b", "/a/b"),
        ("/%20%25", "/%20%25", "/%20%25", "/%20%25", "/%20%25"),
        ("/", "/", "/", "/", "/"),
    ];
    for (target, none, base, merge, decode) in cases {
        assert_eq!(path(target, Off), none, "NONE {target}");
        assert_eq!(path(target, Base), base, "BASE {target}");
        assert_eq!(path(target, MergeSlashes), merge, "MERGE_SLASHES {target}");
        assert_eq!(path(target, DecodeAndMergeSlashes), decode, "DECODE_AND_MERGE_SLASHES {target}");
    }
}

#[test]
fn query_fragment_and_absolute_form() {
    let n = normalize("GET", "/a/../b?x=/../y#frag", "Example.COM", Base).unwrap();
    assert_eq!(n, Normalized { path: "/b".into(), query: Some("x=/../y".into()), host: "example.com".into() });
    assert_eq!(n.path_and_query(), "/b?x=/../y");
    let n = normalize("GET", "/admin#/public", "h", Off).unwrap();
    assert_eq!((n.path.as_str(), n.query), ("/admin", None));
    // The absolute form's authority wins over Host.
    let n = normalize("GET", "HTTP://Other.example:80/x", "example.com", Base).unwrap();
    assert_eq!((n.host.as_str(), n.path.as_str()), ("other.example", "/x"));
    let n = normalize("GET", "https://a.example:443", "example.com", Base).unwrap();
    assert_eq!((n.host.as_str(), n.path.as_str()), ("a.example", "/"));
    assert_eq!(normalize("OPTIONS", "*", "h", Base).unwrap().path, "*");
}

#[test]
fn refused_targets() {
    let refuse = |method: &str, target: &str| normalize(method, target, "example.com", Base).unwrap_err();
    assert_eq!(refuse("CONNECT", "example.com:443"), Reject::Connect { authority: "example.com:443".into() });
    assert_eq!(refuse("CONNECT", "example.com:443").status(), 403);
    assert_eq!(refuse("GET", "\\admin"), Reject::NotOriginForm { target: "\\admin".into() });
    assert_eq!(refuse("GET", "*"), Reject::NotOriginForm { target: "*".into() });
    assert_eq!(refuse("GET", "admin"), Reject::NotOriginForm { target: "admin".into() });
    assert_eq!(refuse("GET", "ftp://x/y"), Reject::NotOriginForm { target: "ftp://x/y".into() });
    assert_eq!(refuse("GET", "/a\nb"), Reject::InvalidCharacter { what: Char(b'\n'), position: 2 });
    assert_eq!(refuse("GET", "/a b").to_string(), "request target has a space at byte 2");
    assert_eq!(refuse("GET", "/a\u{e9}").to_string(), "request target has non-ASCII byte 0xc3 at byte 2");
    assert_eq!(refuse("GET", "/a%zz"), Reject::BadPercentEncoding { position: 2 });
    assert_eq!(refuse("GET", "/a%2"), Reject::BadPercentEncoding { position: 2 });
    assert_eq!(refuse("GET", "/a%2").status(), 400);
    assert_eq!(normalize("GET", "/", "", Base).unwrap_err(), Reject::MissingHost);
}

#[test]
fn hosts() {
    assert_eq!(normalize_host("Example.COM.", false).unwrap(), "example.com");
    assert_eq!(normalize_host("example.com:80", false).unwrap(), "example.com");
    assert_eq!(normalize_host("example.com:443", false).unwrap(), "example.com:443");
    assert_eq!(normalize_host("example.com.:8080", false).unwrap(), "example.com:8080");
    assert_eq!(normalize_host("[::1]:80", false).unwrap(), "[::1]");
    assert_eq!(normalize_host("10.0.0.1", false).unwrap(), "10.0.0.1");
    for bad in ["a b", "a/b", "user@host", "host:port", "host:99999", "[::1", "[zz]", "a..", "::1", "."] {
        assert!(normalize_host(bad, false).is_err(), "{bad}");
    }
}

#[test]
fn one_host_per_request() {
    assert_eq!(request_host(Some("a.example"), &[]), Ok("a.example"));
    assert_eq!(request_host(None, &["a.example"]), Ok("a.example"));
    assert_eq!(request_host(Some("A.example"), &["a.example.:80"]), Ok("A.example"));
    assert_eq!(
        request_host(None, &["a.example", "admin.example"]),
        Err(Reject::ConflictingHosts { first: "a.example".into(), second: "admin.example".into() })
    );
    assert!(matches!(request_host(Some("a.example"), &["b.example"]), Err(Reject::ConflictingHosts { .. })));
    assert_eq!(request_host(None, &[]), Err(Reject::MissingHost));
}

fn option() -> impl Strategy<Value = PathNormalization> {
    prop_oneof![Just(Base), Just(MergeSlashes), Just(DecodeAndMergeSlashes)]
}

/// Paths made of the pieces that matter: slashes, dots, backslashes, escapes.
fn raw_path() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![
            Just("/"),
            Just("."),
            Just(".."),
            Just("\\"),
            Just("%2F"),
            Just("%2f"),
            Just("%5C"),
            Just("%2E"),
            Just("%41"),
            Just("%25"),
            Just("a"),
            Just("B"),
        ],
        0..12,
    )
    .prop_map(|pieces| format!("/{}", pieces.concat()))
}

proptest! {
    #[test]
    fn normalization_is_idempotent(p in raw_path(), option in option()) {
        let once = normalize_path(&p, option);
        prop_assert_eq!(normalize_path(&once, option), once.clone());
        prop_assert!(once.starts_with('/'));
    }

    #[test]
    fn no_dot_segments_backslashes_or_double_slashes(p in raw_path(), option in option(), fragment in "[a-z/.]{0,4}") {
        let out = normalize("GET", &format!("{p}#{fragment}"), "h", option).unwrap().path;
        for bad in ["/../", "/./", "\\", "#"] {
            prop_assert!(!out.contains(bad), "{} in {}", bad, out);
        }
        prop_assert!(!out.ends_with("/..") && !out.ends_with("/."), "{}", out);
        if option != Base {
            prop_assert!(!out.contains("//"), "{}", out);
        }
        if option == DecodeAndMergeSlashes {
            prop_assert!(!out.to_ascii_uppercase().contains("%2F") && !out.to_ascii_uppercase().contains("%5C"), "{}", out);
        }
    }
}
