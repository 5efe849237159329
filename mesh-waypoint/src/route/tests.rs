//! Route table tests: configurations as YAML through the mesh's loader, requests as
//! values.
#![allow(clippy::float_cmp, reason = "the percentages compared are small numbers read exactly from YAML")]
use std::{collections::BTreeMap, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue};
use mesh_common::config::{Config, Source, load};
use proptest::prelude::*;

use super::*;
use crate::retry::{Outcome, RetryOn};

/// Services `reviews` (9080), `ratings` (9080, 8080), `reviews-v2` in `shop`, the
/// subsets v1/v2 of reviews, and a `ServiceEntry` `api.example.com`.
const BASE: &str = "apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {ports: [{port: 9080, name: http}], selector: {app: reviews}}
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop}
spec: {ports: [{port: 9080, name: http}, {port: 8080, name: http-alt}], selector: {app: ratings}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: shop}
spec: {ports: [{port: 9080, name: http}], selector: {app: reviews, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: shop}
spec: {hosts: [api.example.com], ports: [{number: 443, name: https, protocol: HTTPS}], resolution: DNS}
";

fn config(yaml: &str) -> Config {
    let text = if yaml.trim().is_empty() { BASE.to_string() } else { format!("{BASE}---\n{yaml}") };
    load(&[Source::new("t.yaml", text)]).unwrap_or_else(|report| panic!("{report}"))
}

fn reviews() -> ServiceRef {
    ServiceRef::new("shop", "reviews", 9080)
}

fn table(yaml: &str) -> RouteTable {
    RouteTable::build(&config(yaml), &reviews())
}

/// A request, owned, with builder methods.
#[derive(Clone)]
struct Req {
    method: String,
    path: String,
    authority: String,
    scheme: String,
    headers: HeaderMap,
    port: u16,
    ns: String,
    labels: BTreeMap<String, String>,
}

fn get(path: &str) -> Req {
    Req {
        method: "GET".into(),
        path: path.into(),
        authority: "reviews.shop.svc.cluster.local:9080".into(),
        scheme: "http".into(),
        headers: HeaderMap::new(),
        port: 9080,
        ns: "shop".into(),
        labels: BTreeMap::new(),
    }
}

impl Req {
    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        self
    }
    fn method(mut self, m: &str) -> Self {
        self.method = m.into();
        self
    }
    fn authority(mut self, a: &str) -> Self {
        self.authority = a.into();
        self
    }
    fn scheme(mut self, s: &str) -> Self {
        self.scheme = s.into();
        self
    }
    fn port(mut self, p: u16) -> Self {
        self.port = p;
        self
    }
    fn from(mut self, ns: &str, labels: &[(&str, &str)]) -> Self {
        self.ns = ns.into();
        self.labels = labels.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect();
        self
    }
    fn parts(&self) -> RequestParts<'_> {
        RequestParts {
            method: &self.method,
            path: &self.path,
            authority: &self.authority,
            scheme: &self.scheme,
            headers: &self.headers,
            port: self.port,
            source_namespace: &self.ns,
            source_labels: &self.labels,
        }
    }
}

/// The name of the selected route, `None` for no match.
fn route_name(t: &RouteTable, req: &Req) -> Option<String> {
    t.select(&req.parts()).map(|r| r.name.clone())
}

fn backends(route: &Route) -> &[Backend] {
    match &route.action {
        Action::Forward { backends } => backends,
        other => panic!("{} does not forward: {other:?}", route.name),
    }
}

fn vs(name: &str, hosts: &str, http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  hosts: {hosts}\n  http:\n{http}"
    )
}

// ---------------------------------------------------------------------------------
// Default route, hosts, attachment

#[test]
fn default_route_without_route_objects() {
    let t = table("");
    assert!(!t.is_configured());
    let route = t.select(&get("/anything").parts()).expect("the default route matches all");
    assert_eq!(route.name, "default");
    let b = backends(route);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].host, "reviews.shop.svc.cluster.local");
    assert_eq!(b[0].port, Some(9080));
    assert_eq!(b[0].weight, 100);
    assert_eq!(b[0].unresolved, None);
    assert_eq!(route.retry, crate::retry::RetryPolicy::istio_default());
    assert_eq!(route.retry.conditions, RetryOn::istio_default());
    assert_eq!(route.timeout, None);
    assert!(t.warnings().is_empty());
}

#[test]
fn virtual_service_hosts_name_the_service() {
    let rule = "  - route: [{destination: {host: reviews}}]\n";
    for hosts in [
        "[reviews]",
        "[reviews.shop]",
        "[reviews.shop.svc]",
        "[reviews.shop.svc.cluster.local]",
        "['*.shop.svc.cluster.local']",
        "['*.svc.cluster.local']",
        "[other, reviews]",
    ] {
        let t = table(&vs("r", hosts, rule));
        assert!(t.is_configured(), "{hosts} should name reviews.shop");
        assert_eq!(route_name(&t, &get("/")), Some("VirtualService/shop/r#http[0]".into()), "{hosts}");
    }
    for hosts in
        ["[ratings]", "[reviews.other.svc.cluster.local]", "['*.other.svc.cluster.local']", "[api.example.com]"]
    {
        assert!(!table(&vs("r", hosts, rule)).is_configured(), "{hosts} does not name reviews.shop");
    }
    // A short name is relative to the VirtualService's namespace.
    let other_ns = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: other}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews.shop.svc.cluster.local}}]
";
    assert!(!table(other_ns).is_configured());
    let other_ns_fqdn = other_ns.replace("hosts: [reviews]", "hosts: [reviews.shop.svc.cluster.local]");
    assert!(table(&other_ns_fqdn).is_configured());
}

#[test]
fn export_to_and_gateways() {
    let rule = "  - route: [{destination: {host: reviews.shop.svc.cluster.local}}]\n";
    let from_other = |extra: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: other}}\nspec:\n  hosts: [reviews.shop.svc.cluster.local]\n{extra}  http:\n{rule}"
        )
    };
    assert!(table(&from_other("")).is_configured());
    assert!(table(&from_other("  exportTo: ['*']\n")).is_configured());
    assert!(table(&from_other("  exportTo: [shop]\n")).is_configured());
    assert!(!table(&from_other("  exportTo: ['.']\n")).is_configured(), "exported to its own namespace only");
    assert!(!table(&from_other("  exportTo: [prod]\n")).is_configured());
    assert!(table(&vs("r", "[reviews]\n  exportTo: ['.']", rule)).is_configured());

    assert!(!table(&vs("r", "[reviews]\n  gateways: [istio-system/ingress]", rule)).is_configured());
    assert!(table(&vs("r", "[reviews]\n  gateways: [mesh, istio-system/ingress]", rule)).is_configured());
    // A match for another gateway is left out; the rule keeps its other matches.
    let t = table(&vs(
        "r",
        "[reviews]\n  gateways: [mesh, ingress]",
        "  - match: [{uri: {prefix: /a}, gateways: [ingress]}, {uri: {prefix: /b}}]
    route: [{destination: {host: reviews}}]
",
    ));
    assert_eq!(route_name(&t, &get("/a")), None);
    assert!(route_name(&t, &get("/b")).is_some());
}

#[test]
fn several_virtual_services_merge_in_order() {
    let a = vs("a", "[reviews]", "  - match: [{uri: {prefix: /a}}]\n    route: [{destination: {host: reviews}}]\n");
    let b = vs(
        "b",
        "[reviews.shop.svc.cluster.local]",
        "  - match: [{uri: {prefix: /b}}]\n    route: [{destination: {host: ratings}}]\n  - route: [{destination: {host: reviews}}]\n",
    );
    let t = table(&format!("{a}---\n{b}"));
    assert_eq!(route_name(&t, &get("/a/1")), Some("VirtualService/shop/a#http[0]".into()));
    assert_eq!(route_name(&t, &get("/b/1")), Some("VirtualService/shop/b#http[0]".into()));
    assert_eq!(route_name(&t, &get("/c")), Some("VirtualService/shop/b#http[1]".into()));
    // With creation times (objects from the API server), the oldest comes first,
    // wherever it stands in the configuration.
    let aged = |name: &str, at: &str| {
        vs(name, "[reviews]", "  - route: [{destination: {host: reviews}}]\n").replace(
            &format!("name: {name}, namespace: shop"),
            &format!("name: {name}, namespace: shop, creationTimestamp: '{at}'"),
        )
    };
    let t = table(&format!("{}---\n{}", aged("a", "2026-11-18T10:00:00Z"), aged("b", "2026-11-18T09:00:00Z")));
    assert_eq!(route_name(&t, &get("/")), Some("VirtualService/shop/b#http[0]".into()));
}

#[test]
fn virtual_service_without_http_rules_keeps_the_default() {
    let t = table(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: shop}
spec:
  hosts: [reviews]
  tcp: [{route: [{destination: {host: reviews}}]}]
",
    );
    assert!(!t.is_configured());
    assert_eq!(route_name(&t, &get("/")), Some("default".into()));
}

#[test]
fn no_rule_matching_is_none() {
    let t = table(&vs(
        "r",
        "[reviews]",
        "  - match: [{uri: {exact: /only}}]\n    route: [{destination: {host: reviews}}]\n",
    ));
    assert!(t.is_configured());
    assert!(t.select(&get("/only").parts()).is_some());
    assert!(t.select(&get("/other").parts()).is_none(), "404 NR, not the default route");
}

#[test]
fn gateway_api_routes_win_over_virtual_services() {
    let yaml = format!(
        "{}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: h, namespace: shop}}
spec:
  parentRefs: [{{group: '', kind: Service, name: reviews}}]
  rules:
  - backendRefs: [{{name: reviews-v2, port: 9080}}]
",
        vs("r", "[reviews]", "  - route: [{destination: {host: reviews}}]\n")
    );
    let t = table(&yaml);
    let route = t.select(&get("/").parts()).unwrap();
    assert_eq!(route.name, "HTTPRoute/shop/h#rules[0]");
    assert_eq!(backends(route)[0].host, "reviews-v2.shop.svc.cluster.local");
    assert!(t.warnings().iter().any(|w| w.starts_with("VirtualService/shop/r: left out")), "{:?}", t.warnings());
}

fn http_route(name: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  parentRefs: [{parent}]\n  rules:\n{rules}"
    )
}

const TO_REVIEWS: &str = "{group: '', kind: Service, name: reviews}";
const BACKEND: &str = "backendRefs: [{name: reviews, port: 9080}]";

#[test]
fn http_route_parent_refs() {
    let rule = format!("  - {BACKEND}\n");
    for parent in [
        TO_REVIEWS,
        "{kind: Service, name: reviews}",
        "{group: '', kind: Service, name: reviews, namespace: shop}",
        "{group: '', kind: Service, name: reviews, port: 9080}",
    ] {
        assert!(table(&http_route("h", parent, &rule)).is_configured(), "{parent}");
    }
    for parent in [
        "{group: '', kind: Service, name: ratings}",
        "{group: '', kind: Service, name: reviews, namespace: other}",
        "{group: '', kind: Service, name: reviews, port: 8080}",
        "{name: reviews}",
        "{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}",
    ] {
        assert!(!table(&http_route("h", parent, &rule)).is_configured(), "{parent} does not attach");
    }
    // A route in another namespace names the Service's namespace.
    let other = http_route("h", "{group: '', kind: Service, name: reviews, namespace: shop}", &rule)
        .replace("namespace: shop}\nspec", "namespace: other}\nspec")
        .replace("{name: reviews, port: 9080}", "{name: reviews, namespace: shop, port: 9080}");
    let t = table(&other);
    assert!(t.is_configured());
    assert_eq!(backends(t.select(&get("/").parts()).unwrap())[0].host, "reviews.shop.svc.cluster.local");
}

#[test]
fn service_entry_hosts_take_their_routes_by_host_and_by_parent_ref() {
    let ext = ServiceRef::entry("shop", "ext", "api.example.com", 443);
    let rule = "  - route: [{destination: {host: api.example.com}}]\n";
    let t = RouteTable::build(&config(&vs("r", "[api.example.com]", rule)), &ext);
    assert!(t.is_configured());
    assert_eq!(backends(t.select(&get("/").parts()).unwrap())[0].host, "api.example.com");
    // The entry's name is no host: `ext.shop` names a Service `ext`, not the entry.
    assert!(!RouteTable::build(&config(&vs("r", "[ext.shop]", rule)), &ext).is_configured());
    assert!(!RouteTable::build(&config(""), &ext).is_configured());
    assert_eq!(build::default_backend(&ext).host, "api.example.com");
    let rule = "  - backendRefs: [{group: networking.istio.io, kind: Hostname, name: api.example.com, port: 443}]\n";
    let parent = "{group: networking.istio.io, kind: ServiceEntry, name: ext}";
    assert!(RouteTable::build(&config(&http_route("h", parent, rule)), &ext).is_configured());
    // A ServiceEntry parent is no Service of the same name, and the other way round.
    assert!(
        !table(&http_route("h", "{group: networking.istio.io, kind: ServiceEntry, name: reviews}", rule))
            .is_configured()
    );
    for parent in ["{kind: Service, name: ext}", "{kind: ServiceEntry, name: ext}"] {
        assert!(!RouteTable::build(&config(&http_route("h", parent, rule)), &ext).is_configured(), "{parent}");
    }
}

// ---------------------------------------------------------------------------------
// VirtualService matches

fn one_match(m: &str) -> RouteTable {
    table(&vs("r", "[reviews]", &format!("  - match: [{m}]\n    route: [{{destination: {{host: reviews}}}}]\n")))
}

fn matches(t: &RouteTable, req: &Req) -> bool {
    t.select(&req.parts()).is_some()
}

#[test]
fn vs_uri_matches() {
    let t = one_match("{uri: {exact: /a/b}}");
    assert!(matches(&t, &get("/a/b")));
    assert!(matches(&t, &get("/a/b?x=1")), "the query is not part of the path");
    assert!(!matches(&t, &get("/a/b/")));
    assert!(!matches(&t, &get("/A/B")));

    let t = one_match("{uri: {prefix: /api}}");
    assert!(matches(&t, &get("/api")));
    assert!(matches(&t, &get("/api/v1")));
    assert!(matches(&t, &get("/apix")), "Istio prefixes are plain string prefixes");
    assert!(!matches(&t, &get("/ap")));

    let t = one_match("{uri: {regex: '/items/[0-9]+'}}");
    assert!(matches(&t, &get("/items/42")));
    assert!(!matches(&t, &get("/items/42/x")), "regexes match the whole path");
    assert!(!matches(&t, &get("/x/items/42")));

    let t = one_match("{uri: {prefix: /API}, ignoreUriCase: true}");
    assert!(matches(&t, &get("/api/x")));
    assert!(matches(&t, &get("/Api")));
    let t = one_match("{uri: {exact: /Login}, ignoreUriCase: true}");
    assert!(matches(&t, &get("/LOGIN")));
    assert!(!matches(&t, &get("/LOGIN/x")));
}

#[test]
fn vs_scheme_method_authority_port_source() {
    let t = one_match("{scheme: {exact: https}}");
    assert!(matches(&t, &get("/").scheme("https")));
    assert!(!matches(&t, &get("/")));

    let t = one_match("{method: {regex: 'GET|HEAD'}}");
    assert!(matches(&t, &get("/")));
    assert!(matches(&t, &get("/").method("HEAD")));
    assert!(!matches(&t, &get("/").method("POST")));

    let t = one_match("{authority: {prefix: reviews.shop}}");
    assert!(matches(&t, &get("/")));
    assert!(!matches(&t, &get("/").authority("reviews:9080")));

    let t = one_match("{port: 9080}");
    assert!(matches(&t, &get("/")));
    assert!(!matches(&t, &get("/").port(8080)));

    let t = one_match("{sourceLabels: {app: productpage, version: v1}}");
    assert!(matches(&t, &get("/").from("shop", &[("app", "productpage"), ("version", "v1"), ("x", "y")])));
    assert!(!matches(&t, &get("/").from("shop", &[("app", "productpage")])));

    let t = one_match("{sourceNamespace: frontend}");
    assert!(matches(&t, &get("/").from("frontend", &[])));
    assert!(!matches(&t, &get("/")));
}

#[test]
fn vs_header_matches() {
    let t = one_match("{headers: {end-user: {exact: jason}}}");
    assert!(matches(&t, &get("/").header("end-user", "jason")));
    assert!(matches(&t, &get("/").header("End-User", "jason")), "names are case-insensitive");
    assert!(!matches(&t, &get("/").header("end-user", "Jason")));
    assert!(!matches(&t, &get("/")));

    let t = one_match("{headers: {x-env: {prefix: prod}}}");
    assert!(matches(&t, &get("/").header("x-env", "production")));
    assert!(!matches(&t, &get("/").header("x-env", "staging")));

    let t = one_match("{headers: {x-id: {regex: '[a-f0-9]{4}'}}}");
    assert!(matches(&t, &get("/").header("x-id", "beef")));
    assert!(!matches(&t, &get("/").header("x-id", "beef0")));

    // An empty match tests presence.
    let t = one_match("{headers: {x-canary: {}}}");
    assert!(matches(&t, &get("/").header("x-canary", "")));
    assert!(matches(&t, &get("/").header("x-canary", "anything")));
    assert!(!matches(&t, &get("/")));

    // Several headers: all must match.
    let t = one_match("{headers: {a: {exact: '1'}, b: {exact: '2'}}}");
    assert!(matches(&t, &get("/").header("a", "1").header("b", "2")));
    assert!(!matches(&t, &get("/").header("a", "1")));

    // Repeated header fields are joined with commas.
    let t = one_match("{headers: {x-list: {exact: 'a,b'}}}");
    assert!(matches(&t, &get("/").header("x-list", "a").header("x-list", "b")));
}

#[test]
fn vs_without_headers() {
    let t = one_match("{withoutHeaders: {x-debug: {exact: '1'}}}");
    assert!(matches(&t, &get("/")));
    assert!(matches(&t, &get("/").header("x-debug", "0")));
    assert!(!matches(&t, &get("/").header("x-debug", "1")));
    let t = one_match("{withoutHeaders: {x-debug: {}}}");
    assert!(matches(&t, &get("/")));
    assert!(!matches(&t, &get("/").header("x-debug", "")), "an empty match excludes presence");
    let t = one_match("{uri: {prefix: /}, headers: {a: {exact: '1'}}, withoutHeaders: {b: {}}}");
    assert!(matches(&t, &get("/").header("a", "1")));
    assert!(!matches(&t, &get("/").header("a", "1").header("b", "x")));
}

#[test]
fn vs_query_params() {
    let t = one_match("{queryParams: {v: {exact: '2'}}}");
    assert!(matches(&t, &get("/?v=2")));
    assert!(matches(&t, &get("/?a=1&v=2")));
    assert!(!matches(&t, &get("/?v=20")));
    assert!(!matches(&t, &get("/")));
    assert!(!matches(&t, &get("/?v=3&v=2")), "the first value counts");

    let t = one_match("{queryParams: {name: {exact: 'a b/c'}}}");
    assert!(matches(&t, &get("/?name=a%20b%2Fc")), "values are decoded");

    let t = one_match("{queryParams: {q: {prefix: ab}}}");
    assert!(matches(&t, &get("/?q=abc")));
    assert!(!matches(&t, &get("/?q=xab")));

    let t = one_match("{queryParams: {id: {regex: '[0-9]+'}}}");
    assert!(matches(&t, &get("/x?id=123")));
    assert!(!matches(&t, &get("/x?id=12a")));

    // Istio reads an empty exact as presence.
    let t = one_match("{queryParams: {debug: {exact: ''}}}");
    assert!(matches(&t, &get("/?debug")));
    assert!(matches(&t, &get("/?debug=true")));
    assert!(!matches(&t, &get("/?other=1")));
}

#[test]
fn matches_are_ored_and_rules_ordered() {
    let t = table(&vs(
        "r",
        "[reviews]",
        "  - name: first
    match: [{uri: {prefix: /a}}, {headers: {x: {exact: '1'}}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{uri: {prefix: /a/b}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: ratings}}]
",
    ));
    assert_eq!(route_name(&t, &get("/a/b")), Some("VirtualService/shop/r#http[0]".into()), "first rule wins");
    assert_eq!(route_name(&t, &get("/z").header("x", "1")), Some("VirtualService/shop/r#http[0]".into()));
    assert_eq!(route_name(&t, &get("/z")), Some("VirtualService/shop/r#http[2]".into()), "no match: all");
    assert_eq!(t.routes().count(), 4, "one entry per match");
}

#[test]
fn bad_regex_never_matches_and_is_reported() {
    // Validation rejects a regex RE2 does not take; a model built another way (or by
    // an older controller) can still carry one.
    let mut config = config(&vs(
        "r",
        "[reviews]",
        "  - match: [{uri: {regex: '/a'}}]
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: ratings}}]
",
    ));
    let rule = config.virtual_services.iter_mut().find(|v| v.metadata.name == "r").expect("r");
    rule.spec.http[0].match_[0].uri.as_mut().expect("uri").regex = Some("/a((".into());
    let t = RouteTable::build(&config, &reviews());
    assert_eq!(route_name(&t, &get("/a((")), Some("VirtualService/shop/r#http[1]".into()));
    assert!(
        t.warnings().iter().any(|w| w.contains("spec.http[0].match[0].uri") && w.contains("does not compile")),
        "{:?}",
        t.warnings()
    );
}

// ---------------------------------------------------------------------------------
// Gateway API matches and precedence

#[test]
fn http_route_path_matches() {
    let rule = |path: &str| http_route("h", TO_REVIEWS, &format!("  - matches: [{{path: {path}}}]\n    {BACKEND}\n"));
    let t = table(&rule("{type: PathPrefix, value: /foo}"));
    assert!(matches(&t, &get("/foo")));
    assert!(matches(&t, &get("/foo/")));
    assert!(matches(&t, &get("/foo/bar?x=1")));
    assert!(!matches(&t, &get("/foobar")), "prefixes are whole segments");
    let t = table(&rule("{type: PathPrefix, value: /foo/}"));
    assert!(matches(&t, &get("/foo")), "a trailing slash is ignored");
    assert!(!matches(&t, &get("/foobar")));
    let t = table(&rule("{type: Exact, value: /foo}"));
    assert!(matches(&t, &get("/foo")));
    assert!(!matches(&t, &get("/foo/")));
    let t = table(&rule("{type: RegularExpression, value: '/v[0-9]/.*'}"));
    assert!(matches(&t, &get("/v1/x")));
    assert!(!matches(&t, &get("/x/v1/x")));
    // No path: PathPrefix `/`, everything.
    let t = table(&http_route("h", TO_REVIEWS, &format!("  - {BACKEND}\n")));
    assert!(matches(&t, &get("/anything")));
}

#[test]
fn http_route_headers_query_method() {
    let t = table(&http_route(
        "h",
        TO_REVIEWS,
        &format!(
            "  - matches:
    - headers: [{{name: X-Version, value: v2}}, {{name: x-id, type: RegularExpression, value: '[0-9]+'}}]
      queryParams: [{{name: debug, value: 'on'}}]
      method: POST
    {BACKEND}
"
        ),
    ));
    let ok = get("/?debug=on").method("POST").header("x-version", "v2").header("X-Id", "77");
    assert!(matches(&t, &ok));
    assert!(!matches(&t, &ok.clone().method("GET")));
    assert!(!matches(&t, &get("/?debug=off").method("POST").header("x-version", "v2").header("x-id", "77")));
    assert!(!matches(&t, &get("/?debug=on").method("POST").header("x-version", "V2").header("x-id", "77")));
    assert!(!matches(&t, &get("/?debug=on").method("POST").header("x-version", "v2").header("x-id", "7a")));
}

#[test]
fn http_route_precedence() {
    // Rules written in the "wrong" order; the spec's order decides.
    let first = http_route(
        "b-first",
        TO_REVIEWS,
        "  - name: catch-all
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /api/v1}}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: Exact, value: /api/v1/x}}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: POST, headers: [{name: a, value: '1'}]}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /api}, method: POST, headers: [{name: a, value: '1'}], queryParams: [{name: q, value: '1'}]}]
    backendRefs: [{name: reviews, port: 9080}]
",
    );
    let second = http_route(
        "a-second",
        TO_REVIEWS,
        "  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: ratings, port: 9080}]
  - matches: [{path: {type: RegularExpression, value: '/api/v1/x.*'}}]
    backendRefs: [{name: ratings, port: 9080}]
",
    );
    let t = table(&format!("{first}---\n{second}"));
    let name = |req: Req| route_name(&t, &req).unwrap();
    assert_eq!(name(get("/api/v1/x")), "HTTPRoute/shop/b-first#rules[3]", "exact first");
    assert_eq!(name(get("/api/v1/xy")), "HTTPRoute/shop/b-first#rules[2]", "longest prefix before regex");
    assert_eq!(name(get("/api/v2")), "HTTPRoute/shop/a-second#rules[0]", "equal prefixes: a/ before b/");
    assert_eq!(name(get("/api/v2").method("POST")), "HTTPRoute/shop/b-first#rules[4]", "method counts");
    assert_eq!(name(get("/api").method("POST").header("a", "1")), "HTTPRoute/shop/b-first#rules[5]", "headers count");
    assert_eq!(
        name(get("/api?q=1").method("POST").header("a", "1")),
        "HTTPRoute/shop/b-first#rules[6]",
        "query counts"
    );
    assert_eq!(name(get("/other")), "HTTPRoute/shop/b-first#rules[0]");
}

#[test]
fn grpc_route_matches() {
    let t = table(
        "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews}]
  rules:
  - matches: [{method: {service: grpc.health.v1.Health}}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{method: {service: grpc.health.v1.Health, method: Check}}]
    backendRefs: [{name: ratings, port: 9080}]
  - matches: [{method: {method: Watch}}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{method: {type: RegularExpression, service: 'echo\\..*', method: 'Echo.*'}}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{headers: [{name: x-tenant, value: blue}]}]
    backendRefs: [{name: reviews-v2, port: 9080}]
",
    );
    let name = |req: Req| route_name(&t, &req);
    let grpc = |path: &str| get(path).method("POST").header("content-type", "application/grpc");
    assert_eq!(name(grpc("/grpc.health.v1.Health/Check")).unwrap(), "GRPCRoute/shop/g#rules[1]", "exact first");
    assert_eq!(name(grpc("/grpc.health.v1.Health/List")).unwrap(), "GRPCRoute/shop/g#rules[0]");
    assert_eq!(name(grpc("/other.Svc/Watch")).unwrap(), "GRPCRoute/shop/g#rules[2]");
    assert_eq!(name(grpc("/echo.v1/EchoStream")).unwrap(), "GRPCRoute/shop/g#rules[3]");
    assert_eq!(name(grpc("/x.Y/Z").header("x-tenant", "blue")).unwrap(), "GRPCRoute/shop/g#rules[4]");
    assert_eq!(name(grpc("/x.Y/Z")), None);
}

// ---------------------------------------------------------------------------------
// Actions

#[test]
fn vs_redirect_and_direct_response() {
    let t = table(&vs(
        "r",
        "[reviews]",
        "  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: example.com}
  - match: [{uri: {prefix: /tls}}]
    redirect: {scheme: https, redirectCode: 308}
  - match: [{uri: {prefix: /port}}]
    redirect: {port: 8443, scheme: https}
  - match: [{uri: {prefix: /derive}}]
    redirect: {derivePort: FROM_REQUEST_PORT}
  - match: [{uri: {prefix: /gone}}]
    directResponse: {status: 410, body: {string: gone}}
  - match: [{uri: {prefix: /bytes}}]
    directResponse: {status: 200, body: {bytes: aGVsbG8=}}
  - match: [{uri: {prefix: /empty}}]
    directResponse: {status: 204}
",
    ));
    let redirect = |req: &Req| match &t.select(&req.parts()).unwrap().action {
        Action::Redirect(r) => (r.code, r.location(&req.parts())),
        other => panic!("{other:?}"),
    };
    assert_eq!(redirect(&get("/old/x?q=1")), (301, "http://example.com/new?q=1".into()));
    // The request's port (9080, not http's default) stays, as in Envoy.
    assert_eq!(redirect(&get("/tls/a")), (308, "https://reviews.shop.svc.cluster.local:9080/tls/a".into()));
    assert_eq!(
        redirect(&get("/tls/a").authority("reviews.shop.svc.cluster.local:80")),
        (308, "https://reviews.shop.svc.cluster.local/tls/a".into())
    );
    assert_eq!(redirect(&get("/port")), (301, "https://reviews.shop.svc.cluster.local:8443/port".into()));
    assert_eq!(redirect(&get("/derive").authority("reviews")), (301, "http://reviews:9080/derive".into()));
    assert_eq!(
        redirect(&get("/old").authority("[fd00::1]:9080")),
        (301, "http://example.com/new".into()),
        "a new host drops the old port"
    );
    let direct = |path: &str| match &t.select(&get(path).parts()).unwrap().action {
        Action::DirectResponse { status, body } => (*status, body.clone()),
        other => panic!("{other:?}"),
    };
    assert_eq!(direct("/gone"), (410, Some(b"gone".to_vec())));
    assert_eq!(direct("/bytes"), (200, Some(b"hello".to_vec())));
    assert_eq!(direct("/empty"), (204, None));
}

#[test]
fn redirect_location_keeps_or_drops_ports() {
    let r = Redirect { scheme: None, host: None, port: RedirectPort::Keep, path: None, code: 302 };
    assert_eq!(r.location(&get("/p?q").authority("a:8080").parts()), "http://a:8080/p?q");
    assert_eq!(r.location(&get("/p").authority("a:80").parts()), "http://a/p", "the default port is left out");
    assert_eq!(r.location(&get("/p").authority("[::1]:8080").parts()), "http://[::1]:8080/p");
    let https = Redirect { scheme: Some("https".into()), ..r.clone() };
    // A new scheme keeps a port that is not the old scheme's default (Envoy).
    assert_eq!(https.location(&get("/p").authority("a:8080").parts()), "https://a:8080/p");
    assert_eq!(https.location(&get("/p").authority("a:80").parts()), "https://a/p");
    // A redirect path with its own query replaces the request's.
    let with_query = Redirect { path: Some(PathRewrite::Full("/new?src=x".into())), ..r.clone() };
    assert_eq!(with_query.location(&get("/p?orig=1").authority("a").parts()), "http://a/new?src=x");
    let set = Redirect { port: RedirectPort::Set(443), ..https };
    assert_eq!(set.location(&get("/p").authority("a:8080").parts()), "https://a/p");
}

#[test]
fn http_route_redirect_and_responses() {
    let t = table(&http_route(
        "h",
        TO_REVIEWS,
        "  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /secure}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: secure.example.com}
  - matches: [{path: {type: PathPrefix, value: /nothing}}]
  - matches: [{path: {type: PathPrefix, value: /zero}}]
    backendRefs: [{name: reviews, port: 9080, weight: 0}, {name: ratings, port: 9080, weight: 0}]
",
    ));
    let req = get("/old/x?y=1");
    let Action::Redirect(r) = &t.select(&req.parts()).unwrap().action else { panic!() };
    assert_eq!(
        (r.code, r.location(&req.parts())),
        (301, "http://reviews.shop.svc.cluster.local:9080/new/x?y=1".into())
    );
    let req = get("/secure/a");
    let Action::Redirect(r) = &t.select(&req.parts()).unwrap().action else { panic!() };
    assert_eq!((r.code, r.location(&req.parts())), (302, "https://secure.example.com/secure/a".into()));
    let status = |path: &str| match &t.select(&get(path).parts()).unwrap().action {
        Action::DirectResponse { status, .. } => *status,
        other => panic!("{other:?}"),
    };
    assert_eq!(status("/nothing"), 500, "no backends and no answering filter (the spec's 500)");
    assert_eq!(status("/zero"), 500, "every backend weighs 0");
}

// ---------------------------------------------------------------------------------
// Weights

fn route_with_weights(weights: &[u32]) -> Route {
    let mut route = default_route_for_test();
    let backend = backends(&route)[0].clone();
    route.action = Action::Forward {
        backends: weights
            .iter()
            .enumerate()
            .map(|(i, w)| Backend { host: format!("b{i}"), weight: *w, ..backend.clone() })
            .collect(),
    };
    route
}

fn default_route_for_test() -> Route {
    table("").routes().next().unwrap().clone()
}

#[test]
fn weights_from_virtual_service() {
    let t = table(&vs(
        "r",
        "[reviews]",
        "  - route:
    - destination: {host: reviews, subset: v1}
      weight: 80
    - destination: {host: reviews, subset: v2}
      weight: 20
",
    ));
    let route = t.select(&get("/").parts()).unwrap();
    let mut counts = BTreeMap::new();
    for roll in 0..1000u64 {
        *counts.entry(route.pick_backend(roll).unwrap().subset.clone().unwrap()).or_insert(0) += 1;
    }
    assert_eq!(counts, BTreeMap::from([("v1".to_string(), 800), ("v2".to_string(), 200)]));
}

#[test]
fn weights_edge_cases() {
    assert_eq!(route_with_weights(&[0]).pick_backend(7).unwrap().host, "b0", "a single weight 0 takes all");
    assert_eq!(route_with_weights(&[0, 0]).pick_backend(7).unwrap().host, "b0", "all zero: the first");
    assert_eq!(route_with_weights(&[0, 5]).pick_backend(0).unwrap().host, "b1", "weight 0 gets nothing");
    assert_eq!(route_with_weights(&[u32::MAX, u32::MAX]).pick_backend(u64::MAX).unwrap().host, "b1");
    assert!(route_with_weights(&[]).pick_backend(1).is_none());
    let mut redirect = route_with_weights(&[1]);
    redirect.action = Action::DirectResponse { status: 200, body: None };
    assert!(redirect.pick_backend(1).is_none());
}

proptest! {
    /// Over one full cycle of rolls every backend gets exactly its weight.
    #[test]
    fn shares_match_weights_exactly(weights in prop::collection::vec(0u32..1000, 1..6)) {
        let route = route_with_weights(&weights);
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        prop_assume!(total > 0);
        let mut counts = vec![0u64; weights.len()];
        for roll in 0..total {
            let host = &route.pick_backend(roll).unwrap().host;
            counts[host[1..].parse::<usize>().unwrap()] += 1;
        }
        for (i, w) in weights.iter().enumerate() {
            prop_assert_eq!(counts[i], u64::from(*w));
        }
    }

    /// Uniform random rolls land within a few points of each weight's share.
    #[test]
    fn shares_match_weights_for_random_rolls(
        weights in prop::collection::vec(1u32..100, 1..5),
        rolls in prop::collection::vec(any::<u64>(), 4000),
    ) {
        let route = route_with_weights(&weights);
        let total: f64 = weights.iter().map(|w| f64::from(*w)).sum();
        let mut counts = vec![0usize; weights.len()];
        for roll in &rolls {
            let host = &route.pick_backend(*roll).unwrap().host;
            counts[host[1..].parse::<usize>().unwrap()] += 1;
        }
        for (i, w) in weights.iter().enumerate() {
            let share = counts[i] as f64 / rolls.len() as f64;
            let want = f64::from(*w) / total;
            prop_assert!((share - want).abs() < 0.05, "backend {} share {} want {}", i, share, want);
        }
    }
}

// ---------------------------------------------------------------------------------
// Rewrites

#[test]
fn vs_rewrites() {
    let t = table(&vs(
        "r",
        "[reviews]",
        "  - match: [{uri: {prefix: /api}}, {uri: {exact: /login}}, {uri: {prefix: /v1/}}]
    rewrite: {uri: /v2}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /regex}}]
    rewrite: {uriRegexRewrite: {match: '^/regex/([^/]+)/(.*)$', rewrite: '/\\2/\\1'}}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /host}}]
    rewrite: {authority: ratings.shop}
    route: [{destination: {host: ratings}}]
  - rewrite: {uri: /root}
    route: [{destination: {host: reviews}}]
",
    ));
    let rewrite = |p: &str| t.select(&get(p).parts()).unwrap().rewrite_path(p);
    assert_eq!(rewrite("/api/items?x=1").as_deref(), Some("/v2/items?x=1"), "prefix replaced");
    assert_eq!(rewrite("/apix").as_deref(), Some("/v2x"), "as Envoy's prefix_rewrite");
    assert_eq!(rewrite("/login?next=/").as_deref(), Some("/v2?next=/"), "exact: whole path");
    assert_eq!(rewrite("/v1/a").as_deref(), Some("/v2a"), "the matched prefix, as written");
    assert_eq!(rewrite("/regex/a/b/c").as_deref(), Some("/b/c/a"), "captures");
    assert_eq!(rewrite("/host/x"), None);
    let route = t.select(&get("/host").parts()).unwrap();
    assert_eq!(route.rewrite.as_ref().unwrap().authority.as_deref(), Some("ratings.shop"));
    assert_eq!(rewrite("/other").as_deref(), Some("/rootother"), "no uri match: the prefix `/`");
}

#[test]
fn http_route_rewrites() {
    let t = table(&http_route(
        "h",
        TO_REVIEWS,
        "  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /shop/}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: store.example.com, path: {type: ReplacePrefixMatch, replacePrefixMatch: /store/}}}]
    backendRefs: [{name: reviews, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /index.html}}}]
    backendRefs: [{name: reviews, port: 9080}]
",
    ));
    let rewrite = |p: &str| t.select(&get(p).parts()).unwrap().rewrite_path(p).unwrap();
    assert_eq!(rewrite("/api/v1?x"), "/v1?x");
    assert_eq!(rewrite("/api"), "/");
    assert_eq!(rewrite("/api/"), "/");
    assert_eq!(rewrite("/shop/cart"), "/store/cart");
    assert_eq!(rewrite("/shop"), "/store/");
    assert_eq!(rewrite("/full/a/b?q=1"), "/index.html?q=1");
    let route = t.select(&get("/shop").parts()).unwrap();
    assert_eq!(route.rewrite.as_ref().unwrap().authority.as_deref(), Some("store.example.com"));
}

#[test]
fn path_rewrite_segments() {
    let seg = |prefix: &str, replacement: &str, path: &str| {
        PathRewrite::Segments { prefix: prefix.into(), replacement: replacement.into() }.apply(path)
    };
    assert_eq!(seg("/foo", "/bar", "/foo/x"), "/bar/x");
    assert_eq!(seg("/foo", "/bar", "/foo"), "/bar");
    assert_eq!(seg("/foo/", "/bar/", "/foo/x"), "/bar/x");
    assert_eq!(seg("/foo", "/", "/foo/x"), "/x");
    assert_eq!(seg("/foo", "/", "/foo"), "/");
    assert_eq!(seg("/", "/x", "/a"), "/x/a");
}

// ---------------------------------------------------------------------------------
// Backends

#[test]
fn unresolved_hosts_ports_and_subsets() {
    let t = table(&vs(
        "r",
        "[reviews]",
        "  - match: [{uri: {prefix: /a}}]
    route: [{destination: {host: nosuch}}]
  - match: [{uri: {prefix: /b}}]
    route: [{destination: {host: ratings, port: {number: 7070}}}]
  - match: [{uri: {prefix: /c}}]
    route:
    - destination: {host: api.example.com}
      weight: 50
    - destination: {host: ratings.shop, port: {number: 8080}}
      weight: 50
",
    ));
    let first = |p: &str| backends(t.select(&get(p).parts()).unwrap())[0].clone();
    let b = first("/a");
    assert_eq!(b.host, "nosuch.shop.svc.cluster.local");
    let why = b.unresolved.unwrap();
    assert!(why.contains("`nosuch.shop.svc.cluster.local` is neither a Service nor a ServiceEntry"), "{why}");
    assert!(why.contains("VirtualService/shop/r#http[0] route[0]"), "{why}");
    assert!(first("/b").unresolved.unwrap().contains("Service `ratings.shop.svc.cluster.local` has no port 7070"));
    let route = t.select(&get("/c").parts()).unwrap();
    let [se, alias] = backends(route) else { panic!() };
    assert_eq!((se.host.as_str(), se.namespace.as_str(), se.unresolved.as_ref()), ("api.example.com", "shop", None));
    assert_eq!(
        (alias.host.as_str(), alias.port, alias.unresolved.as_ref()),
        ("ratings.shop.svc.cluster.local", Some(8080), None)
    );

    // Subsets: validation rejects undefined ones, so the rule is changed after loading,
    // as a configuration in flight could have it.
    let mut cfg = config(&vs("r", "[reviews]", "  - route: [{destination: {host: reviews, subset: v1}}]\n"));
    let t = RouteTable::build(&cfg, &reviews());
    assert_eq!(backends(t.select(&get("/").parts()).unwrap())[0].unresolved, None);
    cfg.virtual_services[0].spec.http[0].route[0].destination.subset = Some("v9".into());
    let t = RouteTable::build(&cfg, &reviews());
    let why = backends(t.select(&get("/").parts()).unwrap())[0].unresolved.clone().unwrap();
    assert_eq!(backends(t.select(&get("/").parts()).unwrap())[0].unresolved_status, 503);
    assert!(
        why.contains("subset `v9` is not defined by any DestinationRule for host `reviews.shop.svc.cluster.local`"),
        "{why}"
    );
    cfg.virtual_services[0].spec.http[0].route[0].destination.host = "ratings".into();
    cfg.virtual_services[0].spec.http[0].route[0].destination.subset = Some("v1".into());
    let t = RouteTable::build(&cfg, &reviews());
    let why = backends(t.select(&get("/").parts()).unwrap())[0].unresolved.clone().unwrap();
    assert!(why.contains("no DestinationRule for host `ratings.shop.svc.cluster.local`"), "{why}");
}

#[test]
fn http_route_backends() {
    let t = table(&http_route(
        "h",
        TO_REVIEWS,
        "  - backendRefs:
    - {name: reviews, port: 9080, weight: 3}
    - {name: missing, port: 9080}
    - {group: networking.istio.io, kind: Hostname, name: api.example.com, port: 443}
",
    ));
    let route = t.select(&get("/").parts()).unwrap();
    let b = backends(route);
    assert_eq!(b.iter().map(|b| b.weight).collect::<Vec<_>>(), vec![3, 1, 1], "weight defaults to 1");
    assert_eq!(b[0].unresolved, None);
    assert!(b[1].unresolved.as_ref().unwrap().contains("missing.shop.svc.cluster.local"));
    assert_eq!(b[1].unresolved_status, 500, "the Gateway API spec's answer, not Istio's 503");
    assert_eq!((b[2].host.as_str(), b[2].unresolved.as_ref()), ("api.example.com", None));
}

// ---------------------------------------------------------------------------------
// Header operations

#[test]
fn header_operations() {
    let t = table(&vs(
        "r",
        "[reviews]",
        "  - headers:
      request: {set: {x-route: r1}, add: {x-trace: a}, remove: [x-internal]}
      response: {set: {cache-control: no-store}, remove: [server]}
    route:
    - destination: {host: reviews}
      headers: {request: {set: {x-backend: v1}}, response: {add: {x-served-by: v1}}}
",
    ));
    let route = t.select(&get("/").parts()).unwrap();
    let mut h = HeaderMap::new();
    h.insert("x-route", HeaderValue::from_static("old"));
    h.insert("x-trace", HeaderValue::from_static("0"));
    h.insert("x-internal", HeaderValue::from_static("secret"));
    route.request_headers.apply(&mut h);
    assert_eq!(h.get("x-route").unwrap(), "r1", "set replaces");
    assert_eq!(h.get_all("x-trace").iter().collect::<Vec<_>>(), vec!["0", "a"], "add appends");
    assert!(h.get("x-internal").is_none());
    backends(route)[0].request_headers.apply(&mut h);
    assert_eq!(h.get("x-backend").unwrap(), "v1");
    let mut resp = HeaderMap::new();
    resp.insert("server", HeaderValue::from_static("app"));
    route.response_headers.apply(&mut resp);
    backends(route)[0].response_headers.apply(&mut resp);
    assert!(resp.get("server").is_none());
    assert_eq!(resp.get("cache-control").unwrap(), "no-store");
    assert_eq!(resp.get("x-served-by").unwrap(), "v1");

    // Removal comes first: a header both removed and added ends up added.
    let ops = HeaderOps {
        set: vec![],
        add: vec![(HeaderName::from_static("x"), HeaderValue::from_static("new"))],
        remove: vec![HeaderName::from_static("x")],
    };
    let mut h = HeaderMap::new();
    h.insert("x", HeaderValue::from_static("old"));
    ops.apply(&mut h);
    assert_eq!(h.get_all("x").iter().collect::<Vec<_>>(), vec!["new"]);
}

#[test]
fn gateway_header_modifiers() {
    let t = table(&http_route(
        "h",
        TO_REVIEWS,
        "  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: X-A, value: '1'}], add: [{name: x-b, value: '2'}], remove: [x-c]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: x-resp, value: ok}]}
    backendRefs:
    - name: reviews
      port: 9080
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: x-backend, value: reviews}]}
",
    ));
    let route = t.select(&get("/").parts()).unwrap();
    let mut h = HeaderMap::new();
    h.insert("x-c", HeaderValue::from_static("gone"));
    route.request_headers.apply(&mut h);
    backends(route)[0].request_headers.apply(&mut h);
    assert_eq!(h.get("x-a").unwrap(), "1");
    assert_eq!(h.get("x-b").unwrap(), "2");
    assert_eq!(h.get("x-backend").unwrap(), "reviews");
    assert!(h.get("x-c").is_none());
    let mut resp = HeaderMap::new();
    route.response_headers.apply(&mut resp);
    assert_eq!(resp.get("x-resp").unwrap(), "ok");
}

// ---------------------------------------------------------------------------------
// Timeouts, retries, faults, mirrors, CORS

#[test]
fn timeouts_and_retries() {
    let t = table(&vs(
        "r",
        "[reviews]",
        "  - match: [{uri: {prefix: /a}}]
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 500ms, retryOn: 'gateway-error,503'}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /b}}]
    timeout: 0s
    retries: {attempts: 0}
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]
",
    ));
    let a = t.select(&get("/a").parts()).unwrap();
    assert_eq!(a.timeout, Some(Duration::from_millis(1500)));
    assert_eq!(a.retry.attempts, 3);
    assert_eq!(a.retry.per_try_timeout, Some(Duration::from_millis(500)));
    assert!(a.retry.should_retry(3, &Outcome { status: Some(502), ..Outcome::default() }));
    let b = t.select(&get("/b").parts()).unwrap();
    assert_eq!(b.timeout, None, "0s disables the timeout");
    assert_eq!(b.retry.attempts, 0);
    let c = t.select(&get("/c").parts()).unwrap();
    assert_eq!(c.retry, crate::retry::RetryPolicy::istio_default(), "no retries block: Istio's default");

    let t = table(&http_route(
        "h",
        TO_REVIEWS,
        "  - timeouts: {request: 10s, backendRequest: 2s}
    retry: {attempts: 4, codes: [500], backoff: 100ms}
    backendRefs: [{name: reviews, port: 9080}]
",
    ));
    let route = t.select(&get("/").parts()).unwrap();
    assert_eq!(route.timeout, Some(Duration::from_secs(10)));
    assert_eq!(route.retry.per_try_timeout, Some(Duration::from_secs(2)));
    assert_eq!(route.retry.attempts, 4);
    assert!(route.retry.should_retry(1, &Outcome { status: Some(500), ..Outcome::default() }));
    assert_eq!(route.retry.backoff_base, Duration::from_millis(100));
}

#[test]
fn faults() {
    let t = table(&vs(
        "r",
        "[reviews]",
        "  - match: [{uri: {prefix: /delay}}]
    fault: {delay: {fixedDelay: 7s, percentage: {value: 10}}}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 12.5}}}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /grpc}}]
    fault: {abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}, delay: {fixedDelay: 1s, percent: 50}}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /nopercent}}]
    fault: {abort: {httpStatus: 500}}
    route: [{destination: {host: reviews}}]
",
    ));
    let fault = |p: &str| t.select(&get(p).parts()).unwrap().fault.clone().unwrap();
    let delay = fault("/delay");
    assert_eq!(delay.decide(0.05, 0.0), FaultDecision { delay: Some(Duration::from_secs(7)), abort: None });
    assert_eq!(delay.decide(0.10, 0.0), FaultDecision::default(), "10 % fires below 0.10");
    let abort = fault("/abort");
    assert_eq!(abort.decide(0.0, 0.124).abort, Some(Abort::Http(503)));
    assert_eq!(abort.decide(0.0, 0.125).abort, None);
    let grpc = fault("/grpc");
    assert_eq!(
        grpc.decide(0.49, 0.99),
        FaultDecision { delay: Some(Duration::from_secs(1)), abort: Some(Abort::Grpc(14)) },
        "deprecated integer percent"
    );
    assert_eq!(grpc.decide(0.5, 0.0).delay, None);
    assert_eq!(fault("/nopercent").decide(0.0, 0.0).abort, None, "no percentage: no request aborted");
}

#[test]
fn mirrors() {
    let t = table(&vs(
        "r",
        "[reviews]",
        "  - match: [{uri: {prefix: /one}}]
    mirror: {host: reviews-v2}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /pct}}]
    mirror: {host: reviews-v2}
    mirrorPercentage: {value: 25}
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /old}}]
    mirror: {host: reviews-v2}
    mirrorPercent: 10
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /many}}]
    mirrors:
    - destination: {host: reviews, subset: v2}
      percentage: {value: 50}
    - destination: {host: ratings}
    route: [{destination: {host: reviews}}]
",
    ));
    let mirrors = |p: &str| t.select(&get(p).parts()).unwrap().mirrors.clone();
    let one = mirrors("/one");
    assert_eq!((one[0].backend.host.as_str(), one[0].percent), ("reviews-v2.shop.svc.cluster.local", 100.0));
    assert!(one[0].fires(0.999));
    let pct = &mirrors("/pct")[0];
    assert!(pct.fires(0.24) && !pct.fires(0.25));
    assert_eq!(mirrors("/old")[0].percent, 10.0);
    let many = mirrors("/many");
    assert_eq!(many.len(), 2);
    assert_eq!((many[0].backend.subset.as_deref(), many[0].percent), (Some("v2"), 50.0));
    assert_eq!((many[1].backend.host.as_str(), many[1].percent), ("ratings.shop.svc.cluster.local", 100.0));

    let t = table(&http_route(
        "h",
        TO_REVIEWS,
        "  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: reviews-v2, port: 9080}, percent: 30}
    - type: RequestMirror
      requestMirror: {backendRef: {name: ratings, port: 9080}, fraction: {numerator: 1, denominator: 4}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: ratings, port: 8080}}
    backendRefs: [{name: reviews, port: 9080}]
",
    ));
    let m = &t.select(&get("/").parts()).unwrap().mirrors;
    assert_eq!(m.iter().map(|m| m.percent).collect::<Vec<_>>(), vec![30.0, 25.0, 100.0]);
    assert_eq!(m[2].backend.port, Some(8080));
}

#[test]
fn a_destination_without_a_port_takes_the_services_only_port() {
    let t = table(
        &("apiVersion: v1\nkind: Service\nmetadata: {name: canary, namespace: shop}\nspec: {ports: [{port: 8080, name: http}]}\n---\n".to_owned()
            + &vs(
                "r",
                "[reviews]",
                "  - match: [{uri: {prefix: /canary}}]\n    route: [{destination: {host: canary}}]\n  - route: [{destination: {host: ratings}}]\n",
            )),
    );
    let port = |path: &str| t.select(&get(path).parts()).unwrap().pick_backend(0).unwrap().port;
    // One port: that one, whatever port the request came to (9080).
    assert_eq!(port("/canary"), Some(8080));
    // Several: the request's port, decided when the request comes.
    assert_eq!(port("/"), None);
}

#[test]
fn cors() {
    let t = table(&vs(
        "r",
        "[reviews]",
        "  - corsPolicy:
      allowOrigins: [{exact: 'https://shop.example.com'}, {regex: 'https://.*\\.dev\\.example\\.com'}]
      allowMethods: [GET, POST]
      allowHeaders: [content-type, x-token]
      exposeHeaders: [x-request-id]
      maxAge: 24h
      allowCredentials: true
    route: [{destination: {host: reviews}}]
",
    ));
    let cors = t.select(&get("/").parts()).unwrap().cors.clone().unwrap();
    let pre = cors.preflight("https://shop.example.com", "POST", "content-type").unwrap();
    assert_eq!(pre.get("access-control-allow-origin").unwrap(), "https://shop.example.com");
    assert_eq!(pre.get("access-control-allow-methods").unwrap(), "GET,POST");
    assert_eq!(pre.get("access-control-allow-headers").unwrap(), "content-type,x-token");
    assert_eq!(pre.get("access-control-max-age").unwrap(), "86400");
    assert_eq!(pre.get("access-control-allow-credentials").unwrap(), "true");
    assert!(cors.preflight("https://a.dev.example.com", "GET", "").is_some());
    assert!(cors.preflight("https://evil.example.com", "GET", "").is_none());
    let resp = cors.response_headers("https://shop.example.com");
    assert_eq!(resp.get("access-control-expose-headers").unwrap(), "x-request-id");
    assert_eq!(resp.get("access-control-allow-origin").unwrap(), "https://shop.example.com");
    assert!(cors.response_headers("https://evil.example.com").is_empty());
    // `exact: "*"`, as commonly written: every origin.
    let t = table(&vs(
        "r",
        "[reviews]",
        "  - corsPolicy: {allowOrigins: [{exact: '*'}]}\n    route: [{destination: {host: reviews}}]\n",
    ));
    let cors = t.select(&get("/").parts()).unwrap().cors.clone().unwrap();
    let pre = cors.preflight("https://any.example.org", "GET", "").unwrap();
    assert_eq!(pre.get("access-control-allow-origin").unwrap(), "https://any.example.org");

    let t = table(&http_route(
        "h",
        TO_REVIEWS,
        "  - filters:
    - type: CORS
      cors: {allowOrigins: ['https://*.example.com'], allowMethods: ['*'], allowHeaders: ['*']}
    backendRefs: [{name: reviews, port: 9080}]
",
    ));
    let cors = t.select(&get("/").parts()).unwrap().cors.clone().unwrap();
    let pre = cors.preflight("https://a.example.com", "PUT", "x-a,x-b").unwrap();
    assert_eq!(pre.get("access-control-allow-methods").unwrap(), "PUT", "`*` echoes the request");
    assert_eq!(pre.get("access-control-allow-headers").unwrap(), "x-a,x-b");
    assert_eq!(pre.get("access-control-max-age").unwrap(), "5");
    assert!(cors.preflight("https://a.b.example.com", "PUT", "").is_some(), "`*` is one or more labels");
    assert!(cors.preflight("https://example.com", "PUT", "").is_none());
    assert!(cors.preflight("http://a.example.com", "PUT", "").is_none());
}

proptest! {
    /// A Gateway API prefix matches itself and everything below it by whole segments,
    /// never a longer last segment.
    #[test]
    fn segment_prefixes(prefix in "(/[a-z]{1,4}){1,3}", rest in "(/[a-z]{0,4}){0,2}", tail in "[a-z]{1,3}") {
        let m = matcher::PathMatch::segments(&prefix);
        let mut matcher = matcher::Matcher::any();
        matcher.path = m;
        let req = |path: &str| get(path);
        let ok = |path: &str| matcher.matches(&req(path).parts());
        prop_assert!(ok(&prefix));
        let with_slash = format!("{prefix}/");
        prop_assert!(ok(&with_slash));
        let below = format!("{prefix}{rest}");
        prop_assert!(ok(&below));
        let longer = format!("{prefix}{tail}");
        prop_assert!(!ok(&longer));
    }

    /// Percent-decoding turns an encoded value back into itself.
    #[test]
    fn query_values_decode(value in "[ -~]{0,12}") {
        let encoded = value.bytes().fold(String::new(), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "%{b:02X}");
            s
        });
        let query = format!("a=1&k={encoded}");
        prop_assert_eq!(matcher::query_value(&query, "k"), Some(value));
    }
}

// ---------------------------------------------------------------------------------
// L4 routes

fn tcp_table(yaml: &str) -> TcpTable {
    TcpTable::build(&config(yaml), &reviews())
}

fn tcp_request<'a>(labels: &'a BTreeMap<String, String>, source_namespace: &'a str) -> TcpRequest<'a> {
    TcpRequest {
        port: 9080,
        destination: "10.96.0.5".parse().unwrap(),
        source: "10.1.2.3".parse().unwrap(),
        source_namespace,
        source_labels: labels,
    }
}

#[test]
fn tcp_without_route_objects_goes_to_the_service() {
    let table = tcp_table("");
    assert!(!table.is_configured());
    let labels = BTreeMap::new();
    let route = table.select(&tcp_request(&labels, "shop")).unwrap();
    assert_eq!(route.name, "default");
    assert_eq!(route.backends[0].host, "reviews.shop.svc.cluster.local");
    assert_eq!(route.backends[0].port, Some(9080));
}

#[test]
fn tcp_virtual_service_weights_matches_and_first_rule_wins() {
    let table = tcp_table(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  tcp:
  - match: [{sourceLabels: {app: legacy}}, {sourceSubnet: 10.9.0.0/16}]
    route: [{destination: {host: reviews, subset: v1}}]
  - match: [{port: 9080, sourceNamespace: shop}]
    route:
    - {destination: {host: reviews, subset: v1}, weight: 70}
    - {destination: {host: reviews, subset: v2}, weight: 30}
",
    );
    assert!(table.is_configured());
    let legacy = BTreeMap::from([("app".to_string(), "legacy".to_string())]);
    let route = table.select(&tcp_request(&legacy, "other")).unwrap();
    assert_eq!(route.name, "VirtualService/shop/reviews#tcp[0]");
    let none = BTreeMap::new();
    let route = table.select(&tcp_request(&none, "shop")).unwrap();
    assert_eq!(route.name, "VirtualService/shop/reviews#tcp[1]");
    let v1 = (0..100).filter(|r| route.pick_backend(*r).unwrap().subset.as_deref() == Some("v1")).count();
    assert_eq!(v1, 70);
    // No rule matches a caller of another namespace: refused.
    assert!(table.select(&tcp_request(&none, "other")).is_none());
}

#[test]
fn tcp_route_attached_to_the_service_wins_over_virtual_services() {
    let table = tcp_table(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  tcp: [{route: [{destination: {host: ratings}}]}]
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TCPRoute
metadata: {name: reviews, namespace: shop}
spec:
  parentRefs: [{group: '', kind: Service, name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews, port: 9080, weight: 1}, {name: reviews-v2, port: 9080, weight: 3}, {name: nope, port: 1}]
",
    );
    let none = BTreeMap::new();
    let route = table.select(&tcp_request(&none, "shop")).unwrap();
    assert_eq!(route.name, "TCPRoute/shop/reviews#rules[0]");
    let hosts: Vec<&str> = (0..5).map(|r| route.pick_backend(r).unwrap().host.as_str()).collect();
    assert_eq!(
        hosts,
        [
            "reviews.shop.svc.cluster.local",
            "reviews-v2.shop.svc.cluster.local",
            "reviews-v2.shop.svc.cluster.local",
            "reviews-v2.shop.svc.cluster.local",
            "nope.shop.svc.cluster.local"
        ]
    );
    assert!(route.backends[2].unresolved.is_some());
}

#[test]
fn tcp_match_with_a_bad_subnet_is_left_out_with_a_warning() {
    // The loader checks CIDRs; a table built from a model that skipped it must not
    // match everything.
    let mut config = config(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  tcp: [{match: [{sourceSubnet: 10.0.0.0/8}], route: [{destination: {host: reviews}}]}]
",
    );
    config.virtual_services[0].spec.tcp[0].match_[0].source_subnet = Some("10.0.0.0/99".into());
    let table = TcpTable::build(&config, &reviews());
    let none = BTreeMap::new();
    assert!(table.select(&tcp_request(&none, "shop")).is_none());
    assert!(table.warnings()[0].contains("sourceSubnet"), "{:?}", table.warnings());
}

// ---------------------------------------------------------------------------------
// The waypoint Gateway as a parent

const WAYPOINT: WaypointGateway<'static> = WaypointGateway { namespace: "shop", name: "waypoint" };

#[test]
fn a_waypoint_gateway_parent_attaches_nothing_and_is_named() {
    let rule = format!("  - {BACKEND}\n");
    // Only the waypoint as parent (kind and group defaulted, and written out): no
    // routes for the Service, one warning per reference.
    for parent in
        ["{name: waypoint}", "{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint, namespace: shop}"]
    {
        let c = config(&http_route("h", parent, &rule));
        assert!(!RouteTable::build(&c, &reviews()).is_configured(), "{parent}");
        let warnings = waypoint_parent_warnings(&c, WAYPOINT);
        assert_eq!(warnings.len(), 1, "{parent}: {warnings:?}");
        assert!(
            warnings[0].starts_with("HTTPRoute/shop/h: spec.parentRefs[0]: names the waypoint Gateway shop/waypoint")
        );
    }
    // Next to a Service parent: the Service parent attaches, the waypoint one is named.
    let c = config(&http_route("h", &format!("{{name: waypoint}}, {TO_REVIEWS}"), &rule));
    let t = RouteTable::build(&c, &reviews());
    assert!(t.is_configured());
    assert_eq!(route_name(&t, &get("/")).as_deref(), Some("HTTPRoute/shop/h#rules[0]"));
    assert_eq!(waypoint_parent_warnings(&c, WAYPOINT).len(), 1);
    // Another Gateway, another namespace's waypoint of the same name, a Service of the
    // waypoint's name: not this waypoint.
    for parent in [
        "{name: ingress}",
        "{name: waypoint, namespace: other}",
        "{kind: Service, group: '', name: waypoint}",
        "{name: waypoint, group: networking.istio.io}",
    ] {
        let c = config(&http_route("h", parent, &rule));
        assert!(waypoint_parent_warnings(&c, WAYPOINT).is_empty(), "{parent}");
    }
    // GRPCRoute too.
    let grpc = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: shop}}\nspec:\n  parentRefs: [{{name: waypoint}}]\n  rules:\n  - {BACKEND}\n"
    );
    let warnings = waypoint_parent_warnings(&config(&grpc), WAYPOINT);
    assert!(warnings.len() == 1 && warnings[0].starts_with("GRPCRoute/shop/g: "), "{warnings:?}");
}

// ---------------------------------------------------------------------------------
// Delegate VirtualServices

fn delegate_vs(name: &str, ns: &str, extra: &str, http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{extra}  http:\n{http}"
    )
}

const ROOT: &str = "  - name: products
    match: [{uri: {prefix: /products}}]
    timeout: 3s
    delegate: {name: products}
  - name: rest
    route: [{destination: {host: ratings}}]
";

#[test]
fn delegate_rules_replace_the_root_rule_in_place() {
    let d = delegate_vs(
        "products",
        "shop",
        "",
        "  - name: v2
    match: [{uri: {prefix: /products/v2}, headers: {x-a: {exact: '1'}}}]
    route: [{destination: {host: reviews-v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
    timeout: 1s
",
    );
    let t = table(&format!("{}---\n{d}", vs("root", "[reviews]", ROOT)));
    assert!(t.warnings().is_empty(), "{:?}", t.warnings());
    let names: Vec<&str> = t.routes().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "VirtualService/shop/root#http[0]>VirtualService/shop/products#http[0]",
            "VirtualService/shop/root#http[0]>VirtualService/shop/products#http[1]",
            "VirtualService/shop/root#http[1]",
        ]
    );
    // The delegate's match merged with the root's: its path and header, in place.
    let v2 = t.select(&get("/products/v2/x").header("x-a", "1").parts()).unwrap();
    assert_eq!(backends(v2)[0].host, "reviews-v2.shop.svc.cluster.local");
    assert_eq!(v2.timeout, Some(Duration::from_secs(3)), "the root's timeout fills the delegate's gap");
    // No delegate match: the root's match stands.
    let v1 = t.select(&get("/products/v2/x").parts()).unwrap();
    assert_eq!(backends(v1)[0].subset.as_deref(), Some("v1"));
    assert_eq!(v1.timeout, Some(Duration::from_secs(1)), "the delegate's own timeout wins");
    // Outside the root's match: the next root rule.
    assert_eq!(route_name(&t, &get("/other")).as_deref(), Some("VirtualService/shop/root#http[1]"));
}

#[test]
fn delegate_rules_that_leave_the_root_match_are_left_out() {
    let d = delegate_vs(
        "products",
        "shop",
        "",
        "  - match: [{uri: {prefix: /admin}}]
    route: [{destination: {host: reviews-v2}}]
  - match: [{uri: {regex: '/products/.*'}}]
    route: [{destination: {host: reviews-v2}}]
  - match: [{uri: {exact: /products/x}}]
    route: [{destination: {host: reviews, subset: v2}}]
",
    );
    let t = table(&format!("{}---\n{d}", vs("root", "[reviews]", ROOT)));
    assert_eq!(t.warnings().len(), 2, "{:?}", t.warnings());
    assert!(t.warnings()[0].starts_with("VirtualService/shop/products: spec.http[0].match: not a subset"));
    assert!(t.warnings()[1].starts_with("VirtualService/shop/products: spec.http[1].match: not a subset"));
    assert_eq!(
        route_name(&t, &get("/products/x")).as_deref(),
        Some("VirtualService/shop/root#http[0]>VirtualService/shop/products#http[2]")
    );
    assert_eq!(route_name(&t, &get("/admin")).as_deref(), Some("VirtualService/shop/root#http[1]"));
}

#[test]
fn a_missing_or_hidden_delegate_leaves_only_its_rule_out() {
    // Not there at all.
    let t = table(&vs("root", "[reviews]", ROOT));
    assert_eq!(t.warnings().len(), 1, "{:?}", t.warnings());
    assert!(t.warnings()[0].contains("spec.http[0].delegate: delegate VirtualService shop/products not found"));
    assert_eq!(route_name(&t, &get("/products")).as_deref(), Some("VirtualService/shop/root#http[1]"));
    // A VirtualService with hosts is no delegate.
    let not_delegate = vs("products", "[ratings]", "  - route: [{destination: {host: reviews-v2}}]\n");
    let t = table(&format!("{}---\n{not_delegate}", vs("root", "[reviews]", ROOT)));
    assert!(t.warnings()[0].contains("not found"), "{:?}", t.warnings());
    // In another namespace, exported only to itself.
    let root = ROOT.replace("{name: products}", "{name: products, namespace: team}");
    let d = delegate_vs("products", "team", "  exportTo: [.]\n", "  - route: [{destination: {host: reviews}}]\n");
    let t = table(&format!("{}---\n{d}", vs("root", "[reviews]", &root)));
    assert!(t.warnings()[0].contains("team/products is not exported to namespace shop"), "{:?}", t.warnings());
    assert_eq!(route_name(&t, &get("/products")).as_deref(), Some("VirtualService/shop/root#http[1]"));
}

#[test]
fn delegate_hosts_are_read_in_the_delegates_namespace() {
    let root = "  - match: [{uri: {prefix: /}}]
    mirror: {host: ratings}
    delegate: {name: products, namespace: team}
";
    let team_svc = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: team}\nspec: {ports: [{port: 9080, name: http}]}\n";
    let d = delegate_vs("products", "team", "", "  - route: [{destination: {host: reviews}}]\n");
    let t = table(&format!("{}---\n{d}---\n{team_svc}", vs("root", "[reviews]", root)));
    let route = t.select(&get("/").parts()).unwrap();
    assert_eq!(backends(route)[0].host, "reviews.team.svc.cluster.local");
    assert_eq!(
        route.mirrors[0].backend.host, "ratings.shop.svc.cluster.local",
        "the root's mirror, in the root's namespace"
    );
}

#[test]
fn match_conflicts_follow_istio() {
    let m = |yaml: &str| {
        let rule = format!("  - match: [{yaml}]\n    route: [{{destination: {{host: reviews}}}}]\n");
        config(&vs("m", "[reviews]", &rule)).virtual_services[0].spec.http[0].match_[0].clone()
    };
    let conflict = |root: &str, leaf: &str| has_conflict(&m(root), &m(leaf));
    // Prefixes and exacts under a prefix are subsets; anything else is not.
    assert!(!conflict("{uri: {prefix: /a}}", "{uri: {prefix: /a/b}}"));
    assert!(!conflict("{uri: {prefix: /a}}", "{uri: {exact: /a/b}}"));
    assert!(conflict("{uri: {prefix: /a/b}}", "{uri: {prefix: /a}}"));
    assert!(!conflict("{uri: {exact: /a}}", "{uri: {exact: /a}}"));
    assert!(conflict("{uri: {exact: /a}}", "{uri: {exact: /b}}"));
    assert!(conflict("{uri: {exact: /a}}", "{uri: {prefix: /a}}"));
    assert!(conflict("{uri: {regex: /a.*}}", "{uri: {regex: /a.*}}"), "regexes are never compared");
    assert!(conflict("{uri: {prefix: /a}}", "{uri: {regex: /a.*}}"));
    // Unset on either side: no conflict.
    assert!(!conflict("{}", "{uri: {regex: /a.*}}"));
    assert!(!conflict("{uri: {prefix: /a}}", "{method: {exact: GET}}"));
    // Headers, ports, source namespace, labels, ignoreUriCase.
    assert!(conflict("{headers: {x: {exact: a}}}", "{headers: {x: {exact: b}}}"));
    // A root that tests presence only holds any leaf; a leaf that tests presence only
    // under a value would widen it.
    assert!(!conflict("{headers: {x: {}}}", "{headers: {x: {exact: '1'}}}"));
    assert!(!conflict("{headers: {x: {}}}", "{headers: {x: {regex: '1.*'}}}"));
    assert!(conflict("{headers: {x: {prefix: a}}}", "{headers: {x: {}}}"));
    assert!(conflict("{headers: {x: {exact: a}}}", "{headers: {x: {}}}"));
    assert!(conflict("{headers: {x: {regex: 'a.*'}}}", "{headers: {x: {}}}"));
    // withoutHeaders: a narrower leaf value would widen the root (x absent -> x not 1).
    assert!(conflict("{withoutHeaders: {x: {}}}", "{withoutHeaders: {x: {exact: '1'}}}"));
    assert!(!conflict("{withoutHeaders: {x: {}}}", "{withoutHeaders: {x: {}}}"));
    assert!(!conflict("{withoutHeaders: {x: {}}}", "{withoutHeaders: {y: {exact: '1'}}}"));
    assert!(!conflict("{headers: {x: {exact: a}}}", "{headers: {y: {exact: b}}}"));
    assert!(conflict("{port: 80}", "{port: 81}"));
    assert!(!conflict("{port: 80}", "{}"));
    assert!(conflict("{sourceNamespace: a}", "{}"), "the root's namespace must be repeated");
    assert!(conflict("{sourceLabels: {app: a}}", "{sourceLabels: {app: b}}"));
    assert!(!conflict("{sourceLabels: {app: a}}", "{sourceLabels: {version: v1}}"));
    assert!(conflict("{ignoreUriCase: true}", "{}"));
    assert!(conflict("{gateways: [mesh]}", "{gateways: [mesh, other]}"));
}

proptest! {
    /// Whatever a merged match lets through, the root's match lets through: the
    /// delegate can narrow the root rule, never widen it.
    #[test]
    fn merged_matches_never_widen_the_root(
        root in prop::sample::select(vec!["{prefix: /a}", "{prefix: /a/b}", "{exact: /a/b}", "{prefix: /}", "{regex: '/a.*'}"]),
        leaf in prop::sample::select(vec!["{prefix: /a}", "{prefix: /a/b}", "{exact: /a/b}", "{exact: /ab}", "{prefix: /b}", "{regex: '/a.*'}"]),
        root_header in any::<bool>(),
        path in prop::sample::select(vec!["/a", "/a/b", "/a/b/c", "/ab", "/b", "/"]),
        header in any::<bool>(),
    ) {
        let root_match = if root_header { format!("{{uri: {root}, headers: {{x: {{exact: '1'}}}}}}") } else { format!("{{uri: {root}}}") };
        let root_rule = format!("  - match: [{root_match}]\n    delegate: {{name: d}}\n");
        let d = delegate_vs("d", "shop", "", &format!("  - match: [{{uri: {leaf}}}]\n    route: [{{destination: {{host: reviews-v2}}}}]\n"));
        let merged = table(&format!("{}---\n{d}", vs("root", "[reviews]", &root_rule)));
        let alone = table(&vs("alone", "[reviews]", &format!("  - match: [{root_match}]\n    route: [{{destination: {{host: reviews}}}}]\n")));
        let mut req = get(path);
        if header {
            req = req.header("x", "1");
        }
        if matches(&merged, &req) {
            prop_assert!(matches(&alone, &req), "root {root_match}, leaf {leaf}, {path}");
        }
    }
}
