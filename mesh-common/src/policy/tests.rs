//! The L4 evaluation (`authorize`) and `PeerAuthentication` modes.
use std::{format, net::IpAddr, string::String, vec};

use proptest::prelude::*;

use super::{
    Connection, EffectiveMtls, NodePolicies, Verdict, Workload, authorize, mtls_mode, strict_ports, wildcard_matches,
};
use crate::config::{
    Config, Source, load,
    meta::{Labels, ObjectMeta},
    security::{Action, AuthorizationPolicy, AuthorizationPolicySpec, MtlsMode, Rule, RuleFrom, RuleSource},
};

fn yaml(text: &str) -> Config {
    load(&[Source::new("test.yaml", text)]).unwrap_or_else(|report| panic!("{report}"))
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A connection to 10.0.0.2:8080 from 10.1.2.3.
fn conn(identity: Option<&str>) -> Connection<'_> {
    Connection {
        source_identity: identity,
        source_ip: ip("10.1.2.3"),
        destination_ip: ip("10.0.0.2"),
        destination_port: 8080,
    }
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ADMIN: &str = "spiffe://cluster.local/ns/ops/sa/admin";

/// [`authorize`], checked against [`NodePolicies`]: every test covers both.
fn verdict(config: &Config, ns: &str, labels: &Labels, conn: &Connection) -> Verdict {
    let workload = Workload { namespace: ns, labels };
    let verdict = authorize(config, &workload, conn);
    assert_eq!(NodePolicies::new(config).authorize(&workload, conn), verdict, "compiled once");
    verdict
}

/// The verdict for the `app: api` workload in `shop`.
fn api(config: &Config, conn: &Connection) -> Verdict {
    verdict(config, "shop", &labels(&[("app", "api")]), conn)
}

fn allowed(config: &Config, conn: &Connection) -> bool {
    api(config, conn).is_allow()
}

fn deny_reason(verdict: Verdict) -> (Option<String>, String) {
    match verdict {
        Verdict::Deny { policy, reason } => (policy, reason),
        Verdict::Allow { .. } => panic!("allowed"),
    }
}

fn allow_all() -> Verdict {
    Verdict::Allow { audited_by: vec![] }
}

/// One policy in `shop` (no selector) with `action` and the rules given as YAML.
fn shop_policy(action: &str, rules: &str) -> Config {
    yaml(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: p, namespace: shop}}\nspec:\n  action: {action}\n  rules:\n{rules}"
    ))
}

#[test]
fn no_policy_allows() {
    let config = Config::default();
    assert_eq!(api(&config, &conn(Some(WEB))), allow_all());
    assert_eq!(api(&config, &conn(None)), allow_all());
}

#[test]
fn deny_by_principal() {
    let config = shop_policy("DENY", "  - from:\n    - source:\n        principals: [cluster.local/ns/ops/sa/admin]\n");
    let (policy, reason) = deny_reason(api(&config, &conn(Some(ADMIN))));
    assert_eq!(policy.as_deref(), Some("shop/p"));
    assert_eq!(reason, "denied by DENY policy shop/p (rule 0)");
    assert!(allowed(&config, &conn(Some(WEB))));
    assert!(allowed(&config, &conn(None)), "plaintext has no principal to deny");
}

#[test]
fn allow_by_principal_admits_only_it() {
    let config = shop_policy("ALLOW", "  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/web]\n");
    assert_eq!(api(&config, &conn(Some(WEB))), allow_all());
    let (policy, reason) = deny_reason(api(&config, &conn(Some(ADMIN))));
    assert_eq!(policy, None);
    assert_eq!(reason, "no ALLOW policy matched (policies: shop/p)");
    assert!(!allowed(&config, &conn(None)));
    assert!(!allowed(&config, &conn(Some("spiffe://cluster.local/ns/shop/sa/web-2"))), "exact, not a prefix");
}

#[test]
fn allow_policies_are_named_in_the_reason() {
    let config = yaml(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: b-allow, namespace: shop}
spec:
  rules:
  - from: [{source: {namespaces: [front]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: a-allow, namespace: istio-system}
spec:
  rules:
  - to: [{operation: {ports: ['9090']}}]
",
    );
    let (_, reason) = deny_reason(api(&config, &conn(Some(WEB))));
    assert_eq!(reason, "no ALLOW policy matched (policies: istio-system/a-allow, shop/b-allow)");
}

#[test]
fn allow_without_rules_denies_everything() {
    let config = yaml(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: shop}\nspec: {}\n",
    );
    assert!(!allowed(&config, &conn(Some(WEB))));
    assert!(!allowed(&config, &conn(None)));
    // A DENY policy without rules matches nothing (validation rejects it, as Istio
    // does; the evaluation still fails safe on a model built another way).
    let mut config = Config::default();
    config.authorization_policies.push(AuthorizationPolicy {
        metadata: ObjectMeta { name: "d".into(), namespace: "shop".into(), ..ObjectMeta::default() },
        spec: AuthorizationPolicySpec { action: Action::Deny, ..AuthorizationPolicySpec::default() },
    });
    assert!(allowed(&config, &conn(Some(WEB))));
}

#[test]
fn empty_rule_matches_everything() {
    let config = shop_policy("ALLOW", "  - {}\n");
    assert!(allowed(&config, &conn(Some(WEB))));
    assert!(allowed(&config, &conn(None)));
    let config = shop_policy("DENY", "  - {}\n");
    assert!(!allowed(&config, &conn(Some(WEB))));
    assert!(!allowed(&config, &conn(None)));
}

#[test]
fn plaintext_against_not_principals() {
    // Istio's idiom for "require mTLS": deny whoever has no principal.
    let config = shop_policy("DENY", "  - from:\n    - source:\n        notPrincipals: ['*']\n");
    assert!(!allowed(&config, &conn(None)));
    assert!(allowed(&config, &conn(Some(WEB))));
    // And its ALLOW form: any authenticated client.
    let config = shop_policy("ALLOW", "  - from:\n    - source:\n        principals: ['*']\n");
    assert!(!allowed(&config, &conn(None)));
    assert!(allowed(&config, &conn(Some(ADMIN))));
}

#[test]
fn wildcard_principals() {
    let config =
        shop_policy("ALLOW", "  - from:\n    - source:\n        principals: [cluster.local/ns/shop/*, '*/sa/admin']\n");
    assert!(allowed(&config, &conn(Some(WEB))));
    assert!(allowed(&config, &conn(Some(ADMIN))));
    assert!(!allowed(&config, &conn(Some("spiffe://cluster.local/ns/ops/sa/ci"))));
    assert!(!allowed(&config, &conn(Some("spiffe://cluster.local/ns/shopping/sa/web"))), "prefix is `.../shop/`");
    // Without the SPIFFE scheme an identity has no principal, but is authenticated.
    assert!(!allowed(&config, &conn(Some("cluster.local/ns/shop/sa/web"))));
    let config = shop_policy("ALLOW", "  - from:\n    - source:\n        principals: ['*']\n");
    assert!(allowed(&config, &conn(Some("urn:example:web"))));
}

#[test]
fn default_trust_domain_stands_for_the_mesh_trust_domain() {
    let mut config =
        shop_policy("ALLOW", "  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/web]\n");
    config.trust_domain = "example.org".into();
    assert!(allowed(&config, &conn(Some("spiffe://example.org/ns/shop/sa/web"))));
    assert!(allowed(&config, &conn(Some(WEB))));
    assert!(!allowed(&config, &conn(Some("spiffe://other.org/ns/shop/sa/web"))));
    assert!(!allowed(&config, &conn(Some("spiffe://example.org/ns/shop/sa/api"))));
}

#[test]
fn trust_domains() {
    let config = shop_policy("ALLOW", "  - from:\n    - source:\n        trustDomains: [cluster.local]\n");
    assert!(allowed(&config, &conn(Some(WEB))));
    assert!(!allowed(&config, &conn(Some("spiffe://partner.example/ns/shop/sa/web"))));
    assert!(!allowed(&config, &conn(None)));
    let config = shop_policy("DENY", "  - from:\n    - source:\n        notTrustDomains: ['*.example']\n");
    assert!(!allowed(&config, &conn(Some(WEB))));
    assert!(allowed(&config, &conn(Some("spiffe://partner.example/ns/shop/sa/web"))));
}

#[test]
fn namespaces() {
    let config = shop_policy("ALLOW", "  - from:\n    - source:\n        namespaces: [shop, 'team-*']\n");
    assert!(allowed(&config, &conn(Some(WEB))));
    assert!(allowed(&config, &conn(Some("spiffe://cluster.local/ns/team-a/sa/x"))));
    assert!(!allowed(&config, &conn(Some(ADMIN))));
    assert!(!allowed(&config, &conn(None)));
    assert!(!allowed(&config, &conn(Some("spiffe://cluster.local/ns/shop"))), "not a workload identity");

    let config = shop_policy("DENY", "  - from:\n    - source:\n        notNamespaces: [shop]\n");
    assert!(allowed(&config, &conn(Some(WEB))));
    assert!(!allowed(&config, &conn(Some(ADMIN))));
    assert!(!allowed(&config, &conn(None)), "plaintext is in no namespace");
}

#[test]
fn service_accounts() {
    // `web` is in the policy's namespace (`shop`); `ops/admin` names its own.
    let config = shop_policy("ALLOW", "  - from:\n    - source:\n        serviceAccounts: [web, ops/admin]\n");
    assert!(allowed(&config, &conn(Some(WEB))));
    assert!(allowed(&config, &conn(Some(ADMIN))));
    assert!(!allowed(&config, &conn(Some("spiffe://cluster.local/ns/other/sa/web"))));
    assert!(!allowed(&config, &conn(None)));
    let config = shop_policy("DENY", "  - from:\n    - source:\n        notServiceAccounts: [web]\n");
    assert!(allowed(&config, &conn(Some(WEB))));
    assert!(!allowed(&config, &conn(Some(ADMIN))));
    assert!(!allowed(&config, &conn(None)));
}

#[test]
fn ip_blocks() {
    let config = shop_policy("ALLOW", "  - from:\n    - source:\n        ipBlocks: [10.1.0.0/16, 192.0.2.7]\n");
    assert!(allowed(&config, &conn(None)));
    let mut other = conn(None);
    other.source_ip = ip("10.2.0.1");
    assert!(!allowed(&config, &other));
    other.source_ip = ip("192.0.2.7");
    assert!(allowed(&config, &other));

    let config = shop_policy(
        "ALLOW",
        "  - from:\n    - source:\n        ipBlocks: [10.0.0.0/8]\n        notIpBlocks: [10.1.2.0/24]\n",
    );
    assert!(!allowed(&config, &conn(None)), "10.1.2.3 is carved out");
    other.source_ip = ip("10.9.9.9");
    assert!(allowed(&config, &other));

    let config = shop_policy("DENY", "  - from:\n    - source:\n        remoteIpBlocks: [10.1.2.3]\n");
    assert!(!allowed(&config, &conn(None)), "the remote address is the peer's at L4");
    let config = shop_policy("DENY", "  - from:\n    - source:\n        notRemoteIpBlocks: [10.0.0.0/8]\n");
    assert!(allowed(&config, &conn(None)));
    assert!(!allowed(&config, &Connection { source_ip: ip("2001:db8::1"), ..conn(None) }));
}

#[test]
fn all_fields_of_a_source_must_match() {
    let config = shop_policy(
        "ALLOW",
        "  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/web]\n        ipBlocks: [10.9.0.0/16]\n",
    );
    assert!(!allowed(&config, &conn(Some(WEB))), "principal matches, address does not");
    // Across `from` entries, any one suffices.
    let config = shop_policy(
        "ALLOW",
        "  - from:\n    - source: {ipBlocks: [10.9.0.0/16]}\n    - source: {principals: [cluster.local/ns/shop/sa/web]}\n",
    );
    assert!(allowed(&config, &conn(Some(WEB))));
}

#[test]
fn ports_and_not_ports() {
    let config = shop_policy("ALLOW", "  - to:\n    - operation:\n        ports: ['8080', '8443']\n");
    assert!(allowed(&config, &conn(None)));
    assert!(!allowed(&config, &Connection { destination_port: 9090, ..conn(None) }));
    let config = shop_policy("DENY", "  - to:\n    - operation:\n        notPorts: ['8080']\n");
    assert!(allowed(&config, &conn(None)));
    let (_, reason) = deny_reason(api(&config, &Connection { destination_port: 22, ..conn(None) }));
    assert_eq!(reason, "denied by DENY policy shop/p (rule 0)");
}

#[test]
fn from_and_to_must_both_match() {
    let config = shop_policy(
        "ALLOW",
        "  - from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]\n    to: [{operation: {ports: ['9090']}}]\n",
    );
    assert!(!allowed(&config, &conn(Some(WEB))));
    assert!(allowed(&config, &Connection { destination_port: 9090, ..conn(Some(WEB)) }));
    assert!(!allowed(&config, &Connection { destination_port: 9090, ..conn(Some(ADMIN)) }));
}

#[test]
fn when_conditions() {
    let when = |cond: &str| shop_policy("ALLOW", &format!("  - when:\n    - {cond}\n"));
    let web = conn(Some(WEB));
    assert!(allowed(&when("{key: source.ip, values: [10.1.0.0/16]}"), &web));
    assert!(!allowed(&when("{key: source.ip, notValues: [10.1.0.0/16]}"), &web));
    assert!(allowed(&when("{key: remote.ip, values: [10.1.2.3]}"), &web));
    assert!(allowed(&when("{key: destination.ip, values: [10.0.0.0/24]}"), &web));
    assert!(!allowed(&when("{key: destination.ip, values: [10.0.1.0/24]}"), &web));
    assert!(allowed(&when("{key: destination.port, values: ['8080']}"), &web));
    assert!(!allowed(&when("{key: destination.port, notValues: ['8080']}"), &web));
    assert!(allowed(&when("{key: source.namespace, values: [shop]}"), &web));
    assert!(!allowed(&when("{key: source.namespace, values: [shop]}"), &conn(None)));
    assert!(allowed(&when("{key: source.namespace, notValues: [ops]}"), &conn(None)));
    assert!(allowed(&when("{key: source.principal, values: ['cluster.local/ns/shop/*']}"), &web));
    assert!(!allowed(&when("{key: source.principal, values: ['*']}"), &conn(None)));
    // values and notValues together, and every condition of a rule.
    let both = when("{key: source.ip, values: [10.0.0.0/8], notValues: [10.1.2.3]}");
    assert!(!allowed(&both, &web));
    let two = shop_policy(
        "ALLOW",
        "  - when:\n    - {key: source.namespace, values: [shop]}\n    - {key: destination.port, values: ['9090']}\n",
    );
    assert!(!allowed(&two, &web));
}

#[test]
fn root_namespace_policies_are_mesh_wide() {
    let config = yaml(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-plaintext, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {notPrincipals: ['*']}}]
",
    );
    let (policy, _) = deny_reason(verdict(&config, "anywhere", &Labels::new(), &conn(None)));
    assert_eq!(policy.as_deref(), Some("istio-system/no-plaintext"));
    assert!(verdict(&config, "anywhere", &Labels::new(), &conn(Some(WEB))).is_allow());

    // Another root namespace makes it an ordinary namespace policy.
    let mut config = config;
    config.root_namespace = "mesh-root".into();
    assert!(verdict(&config, "anywhere", &Labels::new(), &conn(None)).is_allow());
    assert!(!verdict(&config, "istio-system", &Labels::new(), &conn(None)).is_allow());
}

#[test]
fn root_namespace_selector_applies_in_every_namespace() {
    let config = yaml(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-lockdown, namespace: istio-system}
spec:
  selector: {matchLabels: {tier: db}}
  action: DENY
  rules: [{}]
",
    );
    assert!(!verdict(&config, "shop", &labels(&[("tier", "db"), ("app", "pg")]), &conn(Some(WEB))).is_allow());
    assert!(!verdict(&config, "ops", &labels(&[("tier", "db")]), &conn(Some(WEB))).is_allow());
    assert!(verdict(&config, "shop", &labels(&[("tier", "web")]), &conn(Some(WEB))).is_allow());
}

#[test]
fn selector_scoping() {
    let config = yaml(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-only, namespace: shop}
spec:
  selector: {matchLabels: {app: api, version: v1}}
  action: DENY
  rules: [{}]
",
    );
    let v1 = labels(&[("app", "api"), ("version", "v1"), ("extra", "x")]);
    assert!(!verdict(&config, "shop", &v1, &conn(Some(WEB))).is_allow());
    assert!(verdict(&config, "shop", &labels(&[("app", "api")]), &conn(Some(WEB))).is_allow(), "missing label");
    assert!(
        verdict(&config, "shop", &labels(&[("app", "api"), ("version", "v2")]), &conn(Some(WEB))).is_allow(),
        "other value"
    );
    assert!(verdict(&config, "other", &v1, &conn(Some(WEB))).is_allow(), "other namespace");

    // Without a selector: every workload of the namespace, and only of it.
    let config = shop_policy("DENY", "  - {}\n");
    assert!(!verdict(&config, "shop", &Labels::new(), &conn(Some(WEB))).is_allow());
    assert!(verdict(&config, "ops", &Labels::new(), &conn(Some(WEB))).is_allow());
}

#[test]
fn target_ref_and_custom_policies_are_not_applied() {
    let config = yaml(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: waypoint-deny, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: service-allow, namespace: shop}
spec:
  targetRef: {kind: Service, group: '', name: api}
  rules: [{from: [{source: {principals: [nobody]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{}]
",
    );
    assert_eq!(api(&config, &conn(Some(WEB))), allow_all());
}

#[test]
fn audit_is_recorded_not_enforced() {
    let config = yaml(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-ops, namespace: shop}
spec:
  action: AUDIT
  rules: [{from: [{source: {namespaces: [ops]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: istio-system}
spec:
  action: AUDIT
  rules: [{}]
",
    );
    assert_eq!(
        api(&config, &conn(Some(ADMIN))),
        Verdict::Allow { audited_by: vec!["istio-system/audit-all".into(), "shop/audit-ops".into()] }
    );
    assert_eq!(api(&config, &conn(Some(WEB))), Verdict::Allow { audited_by: vec!["istio-system/audit-all".into()] });
    // AUDIT policies are not ALLOW policies: they do not turn on default-deny.
    assert!(allowed(&config, &conn(None)));
}

#[test]
fn deny_wins_over_allow() {
    let config = yaml(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: shop}
spec:
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-ops, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [front]}}]
  - from: [{source: {namespaces: [ops]}}]
",
    );
    let (policy, reason) = deny_reason(api(&config, &conn(Some(ADMIN))));
    assert_eq!(policy.as_deref(), Some("shop/deny-ops"));
    assert_eq!(reason, "denied by DENY policy shop/deny-ops (rule 1)");
    assert!(allowed(&config, &conn(Some(WEB))));
}

#[test]
fn l7_allow_rule_cannot_admit() {
    let config = yaml(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: shop}
spec:
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]
    to: [{operation: {methods: [GET]}}]
  - when: [{key: 'request.headers[x-user]', values: [alice]}]
",
    );
    let (policy, reason) = deny_reason(api(&config, &conn(Some(WEB))));
    assert_eq!(policy, None);
    assert_eq!(
        reason,
        "no ALLOW policy matched (policies: shop/allow-get); \
             ALLOW policy shop/allow-get rule 0 needs L7 attribute `to.operation.methods`; not enforceable at L4; \
             ALLOW policy shop/allow-get rule 1 needs L7 attribute `when.request.headers[x-user]`; not enforceable at L4"
    );
}

#[test]
fn l4_allow_rule_still_admits_next_to_an_l7_one() {
    let config = shop_policy(
        "ALLOW",
        "  - from: [{source: {requestPrincipals: ['*']}}]\n  - from: [{source: {namespaces: [shop]}}]\n",
    );
    assert!(allowed(&config, &conn(Some(WEB))));
    let (_, reason) = deny_reason(api(&config, &conn(Some(ADMIN))));
    assert!(
        reason.ends_with(
            "ALLOW policy shop/p rule 0 needs L7 attribute `from.source.requestPrincipals`; not enforceable at L4"
        ),
        "{reason}"
    );
    // connection.sni is not visible to L4 either.
    let config = shop_policy("ALLOW", "  - when: [{key: connection.sni, values: [api.shop]}]\n");
    let (_, reason) = deny_reason(api(&config, &conn(Some(WEB))));
    assert!(reason.contains("`when.connection.sni`"), "{reason}");
}

#[test]
fn l7_deny_rule_fails_closed() {
    let config = yaml(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-delete, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [ops]}}]
    to: [{operation: {methods: [DELETE], ports: ['8080']}}]
",
    );
    let (policy, reason) = deny_reason(api(&config, &conn(Some(ADMIN))));
    assert_eq!(policy.as_deref(), Some("shop/deny-delete"));
    assert_eq!(
        reason,
        "denied by DENY policy shop/deny-delete (rule 0); DENY policy shop/deny-delete rule 0 needs L7 attribute \
             `to.operation.methods`; not enforceable at L4, matched on its L4 parts alone (fail closed)"
    );
    // Its L4 parts still have to match.
    assert!(allowed(&config, &conn(Some(WEB))));
    assert!(allowed(&config, &Connection { destination_port: 9090, ..conn(Some(ADMIN)) }));

    // A rule made only of L7 attributes matches every connection.
    let config = shop_policy("DENY", "  - to: [{operation: {paths: [/admin]}}]\n");
    assert!(!allowed(&config, &conn(None)));
    let config = shop_policy("DENY", "  - when: [{key: request.auth.principal, values: [x]}]\n");
    assert!(!allowed(&config, &conn(Some(WEB))));
}

const MTLS: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: shop, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: UNSET}
  portLevelMtls:
    5432: {mode: STRICT}
    9100: {mode: DISABLE}
    9200: {mode: UNSET}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: api, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: other-root, namespace: istio-system}
spec:
  selector: {matchLabels: {app: api}}
  mtls: {mode: DISABLE}
";

fn mode(config: &Config, ns: &str, labels: &Labels, port: u16) -> (MtlsMode, Option<String>) {
    let effective = mtls_mode(config, &Workload { namespace: ns, labels }, port);
    (effective.mode, effective.policy)
}

fn decided(mode: MtlsMode, policy: &str) -> (MtlsMode, Option<String>) {
    (mode, Some(policy.into()))
}

#[test]
fn mtls_default_is_permissive() {
    let effective = mtls_mode(&Config::default(), &Workload { namespace: "shop", labels: &Labels::new() }, 80);
    assert_eq!(effective, EffectiveMtls { mode: MtlsMode::Permissive, policy: None });
    assert!(effective.accepts_plaintext());
}

#[test]
fn mtls_scopes() {
    let config = yaml(MTLS);
    // Mesh-wide, for a namespace without its own policy.
    assert_eq!(mode(&config, "ops", &Labels::new(), 80), decided(MtlsMode::Strict, "istio-system/mesh"));
    // Namespace-wide.
    assert_eq!(mode(&config, "shop", &labels(&[("app", "web")]), 80), decided(MtlsMode::Permissive, "shop/shop"));
    // Workload selector; the root namespace's selector policy is ignored.
    assert_eq!(mode(&config, "shop", &labels(&[("app", "api")]), 80), decided(MtlsMode::Strict, "shop/api"));
    assert_eq!(mode(&config, "ops", &labels(&[("app", "api")]), 80), decided(MtlsMode::Strict, "istio-system/mesh"));
    // Port level overrides; UNSET inherits: port 9200 -> workload UNSET -> namespace.
    let db = labels(&[("app", "db")]);
    assert_eq!(mode(&config, "shop", &db, 5432), decided(MtlsMode::Strict, "shop/db"));
    assert_eq!(mode(&config, "shop", &db, 9100), decided(MtlsMode::Disable, "shop/db"));
    assert_eq!(mode(&config, "shop", &db, 9200), decided(MtlsMode::Permissive, "shop/shop"));
    assert_eq!(mode(&config, "shop", &db, 80), decided(MtlsMode::Permissive, "shop/shop"));
    let disabled = mtls_mode(&config, &Workload { namespace: "shop", labels: &db }, 9100);
    assert!(disabled.accepts_plaintext());
    assert!(!mtls_mode(&config, &Workload { namespace: "shop", labels: &db }, 5432).accepts_plaintext());
}

#[test]
fn of_two_namespace_policies_the_oldest_wins() {
    let two = |strict_at: &str, permissive_at: &str| {
        yaml(&format!(
            "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: z-strict, namespace: shop, creationTimestamp: '{strict_at}'}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: a-permissive, namespace: shop, creationTimestamp: '{permissive_at}'}}
spec: {{mtls: {{mode: PERMISSIVE}}}}
"
        ))
    };
    let none = Labels::new();
    // The older one, whatever the names (`a-` would win by name).
    let config = two("2026-11-18T09:00:00Z", "2026-11-18T10:00:00Z");
    assert_eq!(mode(&config, "shop", &none, 80), decided(MtlsMode::Strict, "shop/z-strict"));
    let config = two("2026-11-18T10:00:00Z", "2026-11-18T09:00:00Z");
    assert_eq!(mode(&config, "shop", &none, 80), decided(MtlsMode::Permissive, "shop/a-permissive"));
}

#[test]
fn strict_ports_agree_with_the_mode_of_every_port() {
    let config = yaml(MTLS);
    let db = labels(&[("app", "db")]);
    let workload = Workload { namespace: "shop", labels: &db };
    assert_eq!(strict_ports(&config, &workload), (false, vec![(5432, true)]));
    let api = labels(&[("app", "api")]);
    assert_eq!(strict_ports(&config, &Workload { namespace: "shop", labels: &api }), (true, vec![]));
    assert_eq!(strict_ports(&config, &Workload { namespace: "ops", labels: &Labels::new() }), (true, vec![]));
    // What the kernel decides from the entries equals the mode of every port.
    for (namespace, labels) in [("shop", &db), ("shop", &api), ("shop", &Labels::new()), ("ops", &db)] {
        let workload = Workload { namespace, labels };
        let (default, overrides) = strict_ports(&config, &workload);
        for port in [1, 80, 5432, 9100, 9200, 65535] {
            let kernel = overrides.iter().find(|(p, _)| *p == port).map_or(default, |(_, strict)| *strict);
            assert_eq!(kernel, mtls_mode(&config, &workload, port).mode == MtlsMode::Strict, "{namespace} {port}");
        }
    }
}

#[test]
fn mtls_unset_inherits_up_to_the_default() {
    let config = yaml(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh, namespace: istio-system}
spec: {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ns, namespace: shop}
spec: {mtls: {mode: UNSET}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: b, namespace: shop}
spec: {selector: {matchLabels: {app: api}}, mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: a, namespace: shop}
spec: {selector: {matchLabels: {app: api}}}
",
    );
    // `a` wins over `b` (first name) and is UNSET: up to the namespace, the mesh, the default.
    assert_eq!(mode(&config, "shop", &labels(&[("app", "api")]), 80), (MtlsMode::Permissive, None));
    assert_eq!(mode(&config, "shop", &Labels::new(), 80), (MtlsMode::Permissive, None));
}

#[test]
fn wildcard_match_forms() {
    assert!(wildcard_matches("*", "x"));
    assert!(!wildcard_matches("*", ""));
    assert!(wildcard_matches("ab*", "abc"));
    assert!(wildcard_matches("ab*", "ab"));
    assert!(!wildcard_matches("ab*", "xab"));
    assert!(wildcard_matches("*bc", "abc"));
    assert!(!wildcard_matches("*bc", "bcd"));
    assert!(wildcard_matches("abc", "abc"));
    assert!(!wildcard_matches("abc", "abcd"));
}

/// A mesh-wide policy built without YAML (proptest runs it many times).
fn mesh_policy(action: Action, source: RuleSource) -> Config {
    let mut config = Config::default();
    config.authorization_policies.push(AuthorizationPolicy {
        metadata: ObjectMeta { name: "p".into(), namespace: "istio-system".into(), ..ObjectMeta::default() },
        spec: AuthorizationPolicySpec {
            action,
            rules: vec![Rule { from: vec![RuleFrom { source: Some(source) }], ..Rule::default() }],
            ..AuthorizationPolicySpec::default()
        },
    });
    config
}

fn pattern() -> impl Strategy<Value = String> {
    ("[ab]{0,2}", 0..3u8).prop_map(|(stem, shape)| match shape {
        0 => format!("cluster.local/ns/{stem}"),
        1 => format!("cluster.local/ns/{stem}*"),
        _ => format!("*{stem}/sa/x"),
    })
}

proptest! {
    /// For an authenticated client, `principals: [p]` and `notPrincipals: [p]` are
    /// complements; for a plaintext one the first never matches, the second always.
    #[test]
    fn principals_and_not_principals_are_complements(p in pattern(), ns in "[ab]{1,2}", plaintext: bool) {
        let identity = format!("spiffe://cluster.local/ns/{ns}/sa/x");
        let conn = conn((!plaintext).then_some(identity.as_str()));
        let positive = mesh_policy(Action::Deny, RuleSource { principals: vec![p.clone()], ..RuleSource::default() });
        let negative = mesh_policy(Action::Deny, RuleSource { not_principals: vec![p], ..RuleSource::default() });
        let denied = |config: &Config| !verdict(config, "shop", &Labels::new(), &conn).is_allow();
        if plaintext {
            prop_assert!(!denied(&positive));
            prop_assert!(denied(&negative));
        } else {
            prop_assert_ne!(denied(&positive), denied(&negative));
        }
    }

    /// An ALLOW and a DENY policy with the same L4 rule decide opposite ways.
    #[test]
    fn allow_and_deny_are_mirror_images(ns in "[ab]{1,2}", rule_ns in "[ab]{1,2}", port in 8079u16..8082) {
        let identity = format!("spiffe://cluster.local/ns/{ns}/sa/x");
        let conn = Connection { destination_port: port, ..conn(Some(identity.as_str())) };
        let mut source = RuleSource { namespaces: vec![rule_ns], ..RuleSource::default() };
        source.not_ip_blocks = vec!["10.9.0.0/16".into()];
        let allow = verdict(&mesh_policy(Action::Allow, source.clone()), "shop", &Labels::new(), &conn);
        let deny = verdict(&mesh_policy(Action::Deny, source), "shop", &Labels::new(), &conn);
        prop_assert_ne!(allow.is_allow(), deny.is_allow());
    }
}
