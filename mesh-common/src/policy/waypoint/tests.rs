//! L7 evaluation and waypoint binding.
use std::{
    format,
    net::IpAddr,
    string::{String, ToString},
    vec,
    vec::Vec,
};

use proptest::prelude::*;
use serde_json::json;

use super::{Target, TargetKind, Waypoint, WaypointPolicies, WaypointVerdict};
use crate::{
    config::{Config, Source, load},
    policy::{Attributes, Auth, Http, Verdict},
};

fn yaml(text: &str) -> Config {
    load(&[Source::new("test.yaml", text)]).unwrap_or_else(|report| panic!("{report}"))
}

const WAYPOINT: Waypoint<'static> = Waypoint { namespace: "shop", name: "waypoint", class: "istio-waypoint" };
const API: Target<'static> = Target { kind: TargetKind::Service, namespace: "shop", name: "api" };
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A request `GET example.com/` from `web`, with `headers`.
struct Req {
    method: &'static str,
    host: String,
    path: String,
    headers: Vec<(&'static str, &'static str)>,
    auth: Option<Auth>,
    identity: Option<&'static str>,
    /// `remote.ip` (the peer, 10.1.2.3, unless `X-Forwarded-For` named another client).
    remote: IpAddr,
}

impl Req {
    fn new() -> Self {
        Self {
            method: "GET",
            host: "example.com".into(),
            path: "/".into(),
            headers: vec![],
            auth: None,
            identity: Some(WEB),
            remote: ip("10.1.2.3"),
        }
    }

    fn path(self, path: &str) -> Self {
        Self { path: path.into(), ..self }
    }

    fn host(self, host: &str) -> Self {
        Self { host: host.into(), ..self }
    }

    fn with<T>(&self, f: impl FnOnce(&Attributes) -> T) -> T {
        let attrs = Attributes {
            source_identity: self.identity,
            source_ip: ip("10.1.2.3"),
            destination_ip: ip("10.0.0.2"),
            destination_port: 8080,
            http: Some(Http {
                method: self.method,
                host: &self.host,
                path: &self.path,
                headers: &self.headers,
                auth: self.auth.as_ref(),
                sni: None,
                remote_ip: self.remote,
            }),
        };
        f(&attrs)
    }
}

/// A policy bound to the waypoint, with `action` and `rules` as YAML (indented 2).
fn bound(action: &str, rules: &str) -> Config {
    yaml(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n  \
         targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]\n  action: {action}\n  \
         rules:\n{rules}"
    ))
}

/// `config` with a gRPC `ext_authz` provider `opa` in its mesh config.
fn with_opa(config: &Config) -> Config {
    let mut config = config.clone();
    let (mesh, _) = crate::config::mesh::read_for_tests(
        "extensionProviders: [{name: opa, envoyExtAuthzGrpc: {service: opa.opa.svc.cluster.local, port: 9191}}]",
    );
    config.mesh = mesh;
    config
}

fn verdict(config: &Config, req: &Req) -> WaypointVerdict {
    let policies = WaypointPolicies::new(&with_opa(config), &WAYPOINT);
    req.with(|attrs| policies.evaluate(Some(&API), attrs))
}

fn denied(config: &Config, req: &Req) -> bool {
    matches!(verdict(config, req), WaypointVerdict::Deny { .. })
}

#[test]
fn paths_exact_prefix_suffix_and_any() {
    let config = bound(
        "DENY",
        "  - to: [{operation: {paths: [/admin, '/api/*', '*.php', '/x/{*}/y', '/z/{**}', '/{**}/edit', '/f/{**}/']}}]\n",
    );
    for path in [
        "/admin",
        "/api/",
        "/api/v1/x",
        "/index.php",
        "/x/1/y",
        "/z/",
        "/z/a/b/c",
        "/a/edit",
        "/a/b/edit",
        "/f/b/",
        "/f//",
    ] {
        assert!(denied(&config, &Req::new().path(path)), "{path}");
    }
    for path in [
        "/admin/", "/Admin", "/api", "/x/y", "/x//y", "/x/1/2/y", "/x/1/y/z", "/z", "/zz/a", "/edit", "/a/edit/",
        "/f/b", "/f/",
    ] {
        assert!(!denied(&config, &Req::new().path(path)), "{path}");
    }
    let config = bound("DENY", "  - to: [{operation: {paths: ['*']}}]\n");
    assert!(denied(&config, &Req::new()));
}

#[test]
fn methods_are_case_sensitive_and_hosts_are_not() {
    let config = bound("DENY", "  - to: [{operation: {methods: [DELETE]}}]\n");
    assert!(denied(&config, &Req { method: "DELETE", ..Req::new() }));
    assert!(!denied(&config, &Req { method: "delete", ..Req::new() }), "Istio compares methods exactly");

    let config = bound("DENY", "  - to: [{operation: {hosts: [Example.com, '*.shop.svc']}}]\n");
    for host in ["example.com", "EXAMPLE.COM", "example.com:8080", "api.shop.svc", "API.Shop.SVC:80"] {
        assert!(denied(&config, &Req::new().host(host)), "{host}");
    }
    assert!(!denied(&config, &Req::new().host("example.org")));
    // A pattern with a port needs that port.
    let config = bound("DENY", "  - to: [{operation: {hosts: ['example.com:8080']}}]\n");
    assert!(denied(&config, &Req::new().host("example.com:8080")));
    assert!(!denied(&config, &Req::new().host("example.com")));
    // notHosts.
    let config = bound("ALLOW", "  - to: [{operation: {notHosts: [admin.example.com]}}]\n");
    assert!(denied(&config, &Req::new().host("Admin.Example.com:443")));
    assert!(!denied(&config, &Req::new()));
}

#[test]
fn header_conditions_join_repeated_values_and_ignore_name_case() {
    let config = bound("DENY", "  - when: [{key: 'request.headers[X-User]', values: [mallory]}]\n");
    assert!(denied(&config, &Req { headers: vec![("x-user", "mallory")], ..Req::new() }));
    assert!(denied(&config, &Req { headers: vec![("X-USER", "mallory")], ..Req::new() }));
    // Two values are one joined value, as Envoy sees them: `alice,mallory` is not `mallory`.
    let two = Req { headers: vec![("x-user", "alice"), ("x-user", "mallory")], ..Req::new() };
    assert!(!denied(&config, &two));
    let config = bound("DENY", "  - when: [{key: 'request.headers[x-user]', values: ['*mallory']}]\n");
    assert!(denied(&config, &two), "a suffix pattern sees the joined value");
    // `*` is a presence match, even for an empty value.
    let config = bound("DENY", "  - when: [{key: 'request.headers[x-debug]', values: ['*']}]\n");
    assert!(denied(&config, &Req { headers: vec![("x-debug", "")], ..Req::new() }));
    assert!(!denied(&config, &Req::new()));
    // notValues: an absent header passes.
    let config = bound("ALLOW", "  - when: [{key: 'request.headers[x-env]', notValues: [prod]}]\n");
    assert!(!denied(&config, &Req::new()));
    assert!(denied(&config, &Req { headers: vec![("x-env", "prod")], ..Req::new() }));
}

fn jwt() -> Auth {
    Auth {
        principal: "https://issuer.example/alice".into(),
        audiences: vec!["shop".into(), "billing".into()],
        presenter: Some("web-app".into()),
        claims: json!({"groups": ["dev", "ops"], "org": {"team": "red"}, "level": 3}),
    }
}

#[test]
fn request_auth_attributes() {
    let with_jwt = Req { auth: Some(jwt()), ..Req::new() };
    let cases = [
        ("  - from: [{source: {requestPrincipals: ['https://issuer.example/*']}}]\n", true),
        ("  - from: [{source: {requestPrincipals: ['*']}}]\n", true),
        ("  - from: [{source: {notRequestPrincipals: ['*']}}]\n", false),
        ("  - when: [{key: request.auth.principal, values: [https://issuer.example/alice]}]\n", true),
        ("  - when: [{key: request.auth.audiences, values: [billing]}]\n", true),
        ("  - when: [{key: request.auth.audiences, values: [other]}]\n", false),
        ("  - when: [{key: request.auth.presenter, values: [web-*]}]\n", true),
        ("  - when: [{key: 'request.auth.claims[groups]', values: [ops]}]\n", true),
        ("  - when: [{key: 'request.auth.claims[org][team]', values: [red]}]\n", true),
        ("  - when: [{key: 'request.auth.claims[org][team]', values: [blue]}]\n", false),
        ("  - when: [{key: 'request.auth.claims[org]', values: ['*']}]\n", false),
        ("  - when: [{key: 'request.auth.claims[level]', values: ['3']}]\n", false),
    ];
    for (rules, matches) in cases {
        let config = bound("DENY", rules);
        assert_eq!(denied(&config, &with_jwt), matches, "{rules}");
    }
    // Without a JWT nothing request.auth.* matches, and notRequestPrincipals does.
    let config = bound("DENY", "  - from: [{source: {requestPrincipals: ['*']}}]\n");
    assert!(!denied(&config, &Req::new()));
    let config = bound("DENY", "  - from: [{source: {notRequestPrincipals: ['*']}}]\n");
    assert!(denied(&config, &Req::new()));
}

#[test]
fn source_and_destination_conditions_and_connection_sni() {
    let config = bound(
        "ALLOW",
        "  - from: [{source: {namespaces: [shop], remoteIpBlocks: [10.1.0.0/16]}}]\n    when: \
         [{key: destination.port, values: ['8080']}, {key: remote.ip, values: [10.1.2.3]}]\n",
    );
    assert!(!denied(&config, &Req::new()));
    assert!(denied(&config, &Req { identity: None, ..Req::new() }));
    let config = bound("DENY", "  - when: [{key: connection.sni, values: ['*']}]\n");
    assert!(!denied(&config, &Req::new()), "no TLS terminated: no SNI");
}

/// With a client behind trusted proxies, `remoteIpBlocks` and `remote.ip` see the
/// client `X-Forwarded-For` named; `ipBlocks` and `source.ip` still see the peer.
#[test]
fn remote_ip_is_the_forwarded_client_and_ip_blocks_the_peer() {
    let forwarded = Req { remote: ip("203.0.113.7"), ..Req::new() };
    let cases = [
        ("  - from: [{source: {remoteIpBlocks: [203.0.113.0/24]}}]\n", true, false),
        ("  - from: [{source: {remoteIpBlocks: [10.1.2.3]}}]\n", false, true),
        ("  - from: [{source: {notRemoteIpBlocks: [203.0.113.0/24]}}]\n", false, true),
        ("  - from: [{source: {ipBlocks: [10.1.2.3]}}]\n", true, true),
        ("  - from: [{source: {ipBlocks: [203.0.113.0/24]}}]\n", false, false),
        ("  - when: [{key: remote.ip, values: [203.0.113.7]}]\n", true, false),
        ("  - when: [{key: remote.ip, notValues: [203.0.113.7]}]\n", false, true),
        ("  - when: [{key: source.ip, values: [10.1.2.3]}]\n", true, true),
    ];
    for (rules, with_forwarded, direct) in cases {
        let config = bound("DENY", rules);
        assert_eq!(denied(&config, &forwarded), with_forwarded, "forwarded: {rules}");
        assert_eq!(denied(&config, &Req::new()), direct, "direct: {rules}");
    }
}

#[test]
fn allow_needs_a_match_and_reasons_name_policies() {
    let config = bound("ALLOW", "  - to: [{operation: {methods: [GET], paths: ['/public/*']}}]\n");
    assert_eq!(verdict(&config, &Req::new().path("/public/a")), WaypointVerdict::Allow { audited_by: vec![] });
    assert_eq!(
        verdict(&config, &Req::new().path("/private")),
        WaypointVerdict::Deny { policy: None, reason: "no ALLOW policy matched (policies: shop/p)".into() }
    );
}

#[test]
fn unsupported_keys_fail_closed() {
    let key = "experimental.envoy.filters.network.mysql_proxy[db.table]";
    let config = bound("DENY", &format!("  - when: [{{key: '{key}', values: ['[update]']}}]\n"));
    let WaypointVerdict::Deny { reason, .. } = verdict(&config, &Req::new()) else { panic!("allowed") };
    assert!(reason.contains("needs unsupported attribute `when.experimental"), "{reason}");
    let config = bound("ALLOW", &format!("  - when: [{{key: '{key}', values: ['[update]']}}]\n"));
    let WaypointVerdict::Deny { reason, .. } = verdict(&config, &Req::new()) else { panic!("allowed") };
    assert!(reason.ends_with("not enforceable at the waypoint"), "{reason}");
}

#[test]
fn custom_first_then_deny_then_allow() {
    let config = yaml(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {paths: ['/ext/*']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-ext-admin, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{to: [{operation: {paths: ['/ext/admin']}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: unknown-provider, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: CUSTOM
  provider: {name: nobody}
  rules: [{to: [{operation: {paths: ['/nobody']}}]}]
",
    );
    let policies = WaypointPolicies::new(&with_opa(&config), &WAYPOINT);
    let eval = |path: &str| Req::new().path(path).with(|a| policies.evaluate(Some(&API), a));
    assert_eq!(eval("/ext/admin"), WaypointVerdict::Custom { provider: "opa".into(), policy: "shop/ext".into() });
    let after = Req::new().path("/ext/admin").with(|a| policies.evaluate_after_ext_authz(Some(&API), a));
    assert!(matches!(after, Verdict::Deny { policy: Some(p), .. } if p == "shop/deny-ext-admin"));
    assert_eq!(eval("/other"), WaypointVerdict::Allow { audited_by: vec![] });
    let WaypointVerdict::Deny { policy, reason } = eval("/nobody") else { panic!("not denied") };
    assert_eq!(policy.as_deref(), Some("shop/unknown-provider"));
    assert!(reason.contains("provider `nobody` is not an ext_authz provider"), "{reason}");
    assert_eq!(policies.undeclared_providers(), ["nobody"]);
}

#[test]
fn binding_rules() {
    let config = yaml(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gw, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other-gw, namespace: shop}
spec:
  targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: other}
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: class, namespace: istio-system}
spec:
  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: class-not-root, namespace: shop}
spec:
  targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: svc, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: '', name: api}, {kind: ServiceEntry, group: networking.istio.io, name: ext}]
  action: AUDIT
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: selector, namespace: shop}
spec:
  action: AUDIT
  rules: [{}]
",
    );
    let policies = WaypointPolicies::new(&config, &WAYPOINT);
    let ids = |target: Option<&Target>| policies.applicable(target).map(|p| p.id.clone()).collect::<Vec<String>>();
    assert_eq!(ids(None), ["istio-system/class", "shop/gw"]);
    assert_eq!(ids(Some(&API)), ["istio-system/class", "shop/gw", "shop/svc"]);
    let ext = Target { kind: TargetKind::ServiceEntry, namespace: "shop", name: "ext" };
    assert_eq!(ids(Some(&ext)), ["istio-system/class", "shop/gw", "shop/svc"]);
    // The same name in another namespace, or as the other kind, is another target.
    let elsewhere = Target { namespace: "ops", ..API };
    assert_eq!(ids(Some(&elsewhere)), ["istio-system/class", "shop/gw"]);
    let api_entry = Target { kind: TargetKind::ServiceEntry, ..API };
    assert_eq!(ids(Some(&api_entry)), ["istio-system/class", "shop/gw"]);
}

#[test]
fn service_bound_allow_applies_to_its_service_only() {
    let config = yaml(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-get-only, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: core, name: api}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
",
    );
    let policies = WaypointPolicies::new(&config, &WAYPOINT);
    let post = Req { method: "POST", ..Req::new() };
    let other = Target { name: "cart", ..API };
    assert!(matches!(post.with(|a| policies.evaluate(Some(&API), a)), WaypointVerdict::Deny { .. }));
    assert!(matches!(post.with(|a| policies.evaluate(Some(&other), a)), WaypointVerdict::Allow { .. }));
}

/// A rule made of L4 attributes only: namespaces, ports, ip blocks, principals.
fn l4_rule() -> impl Strategy<Value = String> {
    (0..4u8, "[ab]", 8079u16..8082, any::<bool>()).prop_map(|(field, ns, port, negate)| {
        let not =
            |name: &str| if negate { format!("not{}{}", name[..1].to_uppercase(), &name[1..]) } else { name.into() };
        match field {
            0 => format!("{{from: [{{source: {{{}: [{ns}]}}}}]}}", not("namespaces")),
            1 => format!("{{to: [{{operation: {{{}: ['{port}']}}}}]}}", not("ports")),
            2 => format!("{{from: [{{source: {{{}: [10.1.0.0/16]}}}}]}}", not("ipBlocks")),
            _ => format!("{{from: [{{source: {{{}: ['cluster.local/ns/{ns}/*']}}}}]}}", not("principals")),
        }
    })
}

proptest! {
    /// On a rule without HTTP attributes, the waypoint (HTTP known) and the agent
    /// (HTTP unknown) decide alike: one matcher for both layers.
    #[test]
    fn l4_rules_decide_alike_at_both_layers(
        rule in l4_rule(),
        action in prop_oneof![Just("ALLOW"), Just("DENY"), Just("AUDIT")],
        ns in "[ab]",
        port in 8079u16..8082,
    ) {
        let config = bound(action, &format!("  - {rule}\n"));
        let policies = WaypointPolicies::new(&config, &WAYPOINT);
        let identity = format!("spiffe://cluster.local/ns/{ns}/sa/x");
        let req = Req { identity: None, ..Req::new() };
        let at_l7 = req.with(|a| {
            let attrs = Attributes { source_identity: Some(&identity), destination_port: port, ..*a };
            let l4 = Attributes { http: None, ..attrs };
            (policies.evaluate_after_ext_authz(Some(&API), &attrs), policies.evaluate_after_ext_authz(Some(&API), &l4))
        });
        prop_assert_eq!(at_l7.0, at_l7.1);
    }


    /// `paths: [p]` and `notPaths: [p]` are complements on any request path.
    #[test]
    fn paths_and_not_paths_are_complements(
        pattern in prop_oneof!["/[ab]{0,2}", "/[ab]{0,2}\\*", "\\*[ab]{1,2}", Just("/a/{*}".to_string()), Just("/{**}".to_string())],
        path in "(/[ab]{0,2}){1,3}",
    ) {
        let positive = bound("DENY", &format!("  - to: [{{operation: {{paths: ['{pattern}']}}}}]\n"));
        let negative = bound("DENY", &format!("  - to: [{{operation: {{notPaths: ['{pattern}']}}}}]\n"));
        let req = Req::new().path(&path);
        prop_assert_ne!(denied(&positive, &req), denied(&negative, &req));
    }

    /// Host matching ignores ASCII case and, for a pattern without a port, the port.
    #[test]
    fn host_case_and_port_do_not_matter(host in "[a-zA-Z]{1,5}\\.[a-zA-Z]{1,3}", port in proptest::option::of(1u16..)) {
        let config = bound("DENY", &format!("  - to: [{{operation: {{hosts: ['{}']}}}}]\n", host.to_ascii_uppercase()));
        let authority = match port { Some(p) => format!("{host}:{p}"), None => host.clone() };
        let req = Req::new().host(&authority);
        prop_assert!(denied(&config, &req));
    }
}
