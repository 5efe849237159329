use proptest::prelude::*;

use super::*;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

const PEER: &str = "10.1.2.3";

fn client(xff: &[&str], hops: u32) -> IpAddr {
    client_address(xff.iter().map(|v| v.as_bytes()), hops, ip(PEER))
}

#[test]
fn the_nth_address_from_the_right() {
    let xff = ["192.0.2.10, 192.0.2.1, 10.0.0.1"];
    assert_eq!(client(&xff, 0), ip(PEER), "no trusted proxy: the peer");
    assert_eq!(client(&xff, 1), ip("10.0.0.1"));
    assert_eq!(client(&xff, 2), ip("192.0.2.1"));
    assert_eq!(client(&xff, 3), ip("192.0.2.10"));
    assert_eq!(client(&xff, 4), ip(PEER), "fewer entries than trusted hops: the peer");
    assert_eq!(client(&xff, u32::MAX), ip(PEER));
    assert_eq!(client(&[], 1), ip(PEER), "no header: the peer");
    // Repeated header lines are one list.
    assert_eq!(client(&["192.0.2.10", "192.0.2.1, 10.0.0.1"], 2), ip("192.0.2.1"));
    assert_eq!(client(&["192.0.2.10", "192.0.2.1, 10.0.0.1"], 3), ip("192.0.2.10"));
    // IPv6, and whitespace around entries (tabs too).
    assert_eq!(client(&["2001:db8::1,\t2001:db8::2 "], 1), ip("2001:db8::2"));
    assert_eq!(client(&["2001:db8::1 ,2001:db8::2"], 2), ip("2001:db8::1"));
}

/// What does not name a client where the trusted hops point falls back to the peer
/// (as Envoy does); it never fails the request and never picks another entry.
#[test]
fn bad_entries_mean_the_peer() {
    for (xff, hops) in [
        ("", 1),
        (",", 1),
        ("192.0.2.10,", 1),
        ("192.0.2.10, ", 1),
        ("unknown", 1),
        ("192.0.2.10:8080", 1),
        ("[2001:db8::1]", 1),
        ("[2001:db8::1]:443", 1),
        ("300.1.2.3", 1),
        ("01.2.3.4", 1),
        ("192.0.2.10 192.0.2.11", 1),
        ("for=192.0.2.10", 1),
        ("192.0.2.10, garbage, 10.0.0.1", 2),
        ("192.0.2.10,,10.0.0.1", 2),
    ] {
        assert_eq!(client(&[xff], hops), ip(PEER), "{xff:?} with {hops} hops");
    }
    // Not UTF-8.
    assert_eq!(client_address([&b"\xff\xfe"[..]], 1, ip(PEER)), ip(PEER));
    // An unparsable entry left of the chosen one does not matter.
    assert_eq!(client(&["garbage, 192.0.2.1"], 1), ip("192.0.2.1"));
}

#[test]
fn from_request_headers() {
    let mut headers = HeaderMap::new();
    assert_eq!(remote_ip(&headers, 1, ip(PEER)), ip(PEER));
    headers.append("x-forwarded-for", "203.0.113.7".parse().unwrap());
    headers.append("X-Forwarded-For", "198.51.100.2".parse().unwrap());
    assert_eq!(remote_ip(&headers, 0, ip(PEER)), ip(PEER));
    assert_eq!(remote_ip(&headers, 1, ip(PEER)), ip("198.51.100.2"));
    assert_eq!(remote_ip(&headers, 2, ip(PEER)), ip("203.0.113.7"));
}

proptest! {
    /// A client that writes any `X-Forwarded-For` in front of `trusted` proxies (each
    /// appending the address it received from) is seen as the address the first
    /// trusted proxy appended, whatever it wrote.
    #[test]
    fn spoofed_entries_never_win(
        spoofed in proptest::collection::vec("[ -~]{0,20}", 0..4),
        chain in proptest::collection::vec(any::<[u8; 4]>(), 1..5),
    ) {
        let appended: Vec<String> = chain.iter().map(|o| IpAddr::from(*o).to_string()).collect();
        let mut entries = spoofed.clone();
        entries.extend(appended.iter().cloned());
        let header = entries.join(", ");
        let trusted = u32::try_from(appended.len()).unwrap();
        prop_assert_eq!(client(&[&header], trusted), ip(&appended[0]));
    }

    /// Never panics, and with no trusted hop is always the peer.
    #[test]
    fn any_header_any_hops(values in proptest::collection::vec(any::<Vec<u8>>(), 0..3), hops in 0u32..6) {
        let found = client_address(values.iter().map(Vec::as_slice), hops, ip(PEER));
        if hops == 0 {
            prop_assert_eq!(found, ip(PEER));
        }
    }
}

fn config(text: &str) -> Config {
    mesh_common::config::load(&[mesh_common::config::Source::new("t.yaml", text)]).unwrap_or_else(|r| panic!("{r}"))
}

const GATEWAY: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: waypoint\n  \
                       namespace: shop\n";
const LISTENERS: &str = "spec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - {name: mesh, port: 15008, \
                         protocol: HBONE}\n";

fn mesh(hops: u32) -> String {
    format!(
        "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n    \
         defaultConfig:\n      gatewayTopology:\n        numTrustedProxies: {hops}\n"
    )
}

fn pod(name: &str, annotation: Option<&str>) -> String {
    let annotations =
        annotation.map_or_else(String::new, |a| format!("  annotations:\n    proxy.istio.io/config: '{a}'\n"));
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels:\n    \
         gateway.networking.k8s.io/gateway-name: waypoint\n{annotations}spec:\n  nodeName: node1\n"
    )
}

#[test]
fn trusted_proxies_by_precedence() {
    // Nothing set: Istio's default, 0.
    let plain = config(&format!("{GATEWAY}{LISTENERS}"));
    assert_eq!(trusted_proxies(&plain, "shop", "waypoint").0, 0);
    // The mesh config's defaultConfig.
    let meshwide = config(&format!("{GATEWAY}{LISTENERS}{}", mesh(2)));
    assert_eq!(trusted_proxies(&meshwide, "shop", "waypoint").0, 2);
    // A pod annotation overrides it; another waypoint's pods do not count.
    let annotated_pod = config(&format!(
        "{GATEWAY}{LISTENERS}{}{}{}",
        mesh(2),
        pod("waypoint-b", Some(r#"{"gatewayTopology": {"numTrustedProxies": 1}}"#)),
        pod("waypoint-a", None)
    ));
    assert_eq!(trusted_proxies(&annotated_pod, "shop", "waypoint").0, 1);
    assert_eq!(trusted_proxies(&annotated_pod, "shop", "other").0, 2);
    // The Gateway's annotations win over its pods': infrastructure, then metadata.
    let gateway = format!(
        "{GATEWAY}  annotations:\n    proxy.istio.io/config: '{{\"gatewayTopology\": {{\"numTrustedProxies\": 3}}}}'\n\
         spec:\n  gatewayClassName: istio-waypoint\n  infrastructure:\n    annotations:\n      \
         proxy.istio.io/config: 'gatewayTopology: {{numTrustedProxies: 4}}'\n  listeners:\n  - {{name: mesh, port: \
         15008, protocol: HBONE}}\n"
    );
    let both =
        config(&format!("{gateway}{}", pod("waypoint-a", Some(r#"{"gatewayTopology": {"numTrustedProxies": 1}}"#))));
    assert_eq!(trusted_proxies(&both, "shop", "waypoint").0, 4);
    // An annotation that sets something else leaves the mesh default.
    let other = config(&format!("{GATEWAY}{LISTENERS}{}{}", mesh(2), pod("waypoint-a", Some("concurrency: 2"))));
    let (hops, problems) = trusted_proxies(&other, "shop", "waypoint");
    assert_eq!((hops, problems.len()), (2, 0));
    // An unreadable one is reported and skipped.
    let bad = config(&format!(
        "{GATEWAY}{LISTENERS}{}{}",
        mesh(2),
        pod("waypoint-a", Some(r#"{"gatewayTopology": {"numTrustedProxies": "two"}}"#))
    ));
    let (hops, problems) = trusted_proxies(&bad, "shop", "waypoint");
    assert_eq!(hops, 2);
    let texts: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(texts, [r#"Pod/shop/waypoint-a: its "proxy.istio.io/config" annotation is skipped"#]);
}
