use mesh_common::config::{Source, load};

use super::*;

fn config(extra: &str) -> Config {
    let base = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    istio.io/dataplane-mode: ambient\n---\n\
        apiVersion: v1\nkind: Namespace\nmetadata:\n  name: legacy\n---\n\
        apiVersion: v1\nkind: Namespace\nmetadata:\n  name: billing\n  labels:\n    istio.io/dataplane-mode: ambient\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-1\n  namespace: shop\nspec:\n  nodeName: node1\n  serviceAccountName: web\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-2\n  namespace: shop\nspec:\n  nodeName: node2\n  serviceAccountName: web\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata:\n  name: old-1\n  namespace: legacy\nspec:\n  nodeName: node2\n---\n\
        apiVersion: v1\nkind: Pod\nmetadata:\n  name: pay-1\n  namespace: billing\nspec:\n  nodeName: node2\n---\n\
        apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny\n  namespace: billing\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [legacy]\n---\n\
        apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: mesh\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n";
    load(&[Source { name: "test.yaml".into(), text: format!("{base}{extra}") }]).expect("valid test config")
}

fn keys(view: &Objects) -> Vec<&str> {
    view.keys().map(String::as_str).collect()
}

#[test]
fn view_holds_local_pods_remote_meshed_pods_and_relevant_policies() {
    let config = config("");
    let all = all_objects(&config);
    let node1 = node_view(&config, &all, "node1");
    let k = keys(&node1);
    assert!(k.contains(&"Pod/shop/web-1") && k.contains(&"Pod/shop/web-2") && k.contains(&"Pod/billing/pay-1"));
    assert!(!k.contains(&"Pod/legacy/old-1"), "unmeshed pod of another node: {k:?}");
    assert!(!k.contains(&"AuthorizationPolicy/billing/deny"), "policy of a namespace without local pods");
    assert!(k.contains(&"PeerAuthentication/istio-system/mesh"), "root-namespace policy is mesh-wide");
    let node2 = node_view(&config, &all, "node2");
    let k = keys(&node2);
    assert!(k.contains(&"Pod/legacy/old-1") && k.contains(&"AuthorizationPolicy/billing/deny"));
    // A node with no pods still routes to every meshed pod.
    let node9 = node_view(&config, &all, "node9");
    assert!(keys(&node9).contains(&"Pod/shop/web-1"));
}

/// Whatever the change, incremental updates take every node's view to exactly the
/// view computed from scratch.
#[test]
fn incremental_updates_equal_recomputed_views() {
    let steps = [
        "",
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow\n  namespace: shop\nspec:\n  action: ALLOW\n",
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web-3\n  namespace: shop\nspec:\n  nodeName: node1\n",
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: old-2\n  namespace: legacy\nspec:\n  nodeName: node1\n",
        "",
        WAYPOINT_DENY,
        // The same key, now a selector policy: it leaves the views of nodes without
        // billing pods.
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: waypoint-deny\n  namespace: billing\nspec:\n  action: DENY\n  selector:\n    matchLabels: {app: pay}\n  rules: [{}]\n",
        // Bound by the singular `targetRef`.
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: waypoint-deny\n  namespace: billing\nspec:\n  action: DENY\n  targetRef: {kind: Service, group: '', name: pay}\n  rules: [{}]\n",
    ];
    let configs: Vec<Config> = steps.iter().map(|extra| config(extra)).collect();
    for (from, to) in [(0, 1), (1, 2), (2, 3), (3, 4), (0, 3), (3, 0), (0, 5), (5, 6), (6, 7), (7, 5), (5, 0), (3, 7)] {
        let (old_cfg, new_cfg) = (&configs[from], &configs[to]);
        let (old_all, new_all) = (all_objects(old_cfg), all_objects(new_cfg));
        let (old_index, new_index) = (ViewIndex::new(old_cfg), ViewIndex::new(new_cfg));
        let changed = changed_keys(&old_all, &new_all);
        for node in ["node1", "node2", "node9"] {
            for changed in [Some(changed.as_slice()), None] {
                let mut view = node_view(old_cfg, &old_all, node);
                let update = node_update(
                    &Side { index: &old_index, objects: &old_all },
                    &Side { index: &new_index, objects: &new_all },
                    changed,
                    node,
                    2,
                );
                update.apply(&mut view);
                assert_eq!(view, node_view(new_cfg, &new_all, node), "{from}->{to} on {node}");
            }
        }
    }
}

/// A `DENY` bound to the waypoint `waypoint` of `billing` (whose pods are all on node2).
const WAYPOINT_DENY: &str = "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: waypoint-deny\n  namespace: billing\nspec:\n  action: DENY\n  targetRefs:\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n  rules:\n  - to:\n    - operation:\n        paths: [/admin]\n";

/// A waypoint on node1 may serve billing, which has no pods there: the policies bound
/// to waypoints reach every node, or the waypoint would miss a `DENY` (fail open).
/// Selector policies of billing still stay off node1.
#[test]
fn target_bound_policies_reach_every_node() {
    let config = config(WAYPOINT_DENY);
    let all = all_objects(&config);
    for node in ["node1", "node2", "node9"] {
        let view = node_view(&config, &all, node);
        let k = keys(&view);
        assert!(k.contains(&"AuthorizationPolicy/billing/waypoint-deny"), "{node}: {k:?}");
        let back = materialize(&view).expect("materializes");
        assert!(back.authorization_policies.iter().any(|p| p.metadata.name == "waypoint-deny"), "{node}");
    }
    let node1 = node_view(&config, &all, "node1");
    assert!(!keys(&node1).contains(&"AuthorizationPolicy/billing/deny"), "selector policy stays with billing's nodes");
}

#[test]
fn relabelling_a_namespace_moves_unchanged_pods() {
    let before = config("");
    let after = {
        let mut c = before.clone();
        c.namespaces
            .iter_mut()
            .find(|n| n.metadata.name == "legacy")
            .unwrap()
            .metadata
            .labels
            .insert("istio.io/dataplane-mode".into(), "ambient".into());
        c
    };
    let (old_all, new_all) = (all_objects(&before), all_objects(&after));
    let changed = changed_keys(&old_all, &new_all);
    assert_eq!(changed, vec!["Namespace//legacy".to_owned()]);
    let update = node_update(
        &Side { index: &ViewIndex::new(&before), objects: &old_all },
        &Side { index: &ViewIndex::new(&after), objects: &new_all },
        Some(&changed),
        "node1",
        2,
    );
    let ConfigMessage::Update { upserts, .. } = update else { panic!("not an update") };
    assert!(upserts.contains_key("Pod/legacy/old-1"), "newly meshed pod must reach node1: {:?}", upserts.keys());
}

#[test]
fn certificates_only_for_pods_on_the_node() {
    let config = config("");
    assert!(may_issue(&config, "node1", "spiffe://cluster.local/ns/shop/sa/web"));
    assert!(!may_issue(&config, "node1", "spiffe://cluster.local/ns/billing/sa/default"));
    assert!(may_issue(&config, "node2", "spiffe://cluster.local/ns/billing/sa/default"));
    assert!(!may_issue(&config, "node1", "spiffe://evil.local/ns/shop/sa/web"));
    assert!(!may_issue(&config, "node1", "spiffe://cluster.local/ns/shop/sa/web/x"));
    assert!(!may_issue(&config, "node3", "spiffe://cluster.local/ns/shop/sa/web"));
}

/// A local rate limit `EnvoyFilter`, aimed at the waypoint `waypoint` of `billing`.
const RATE_LIMIT: &str = "---\napiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata:\n  name: rl\n  namespace: billing\nspec:\n  targetRefs:\n  - {kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}\n  configPatches:\n  - applyTo: HTTP_FILTER\n    patch:\n      operation: INSERT_BEFORE\n      value:\n        name: envoy.filters.http.local_ratelimit\n        typed_config:\n          '@type': type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit\n          stat_prefix: rl\n          token_bucket: {max_tokens: 10, fill_interval: 1s}\n";

/// Waypoints take their node's view; a waypoint may serve services of namespaces
/// without pods on its node, so `EnvoyFilter`s travel to every node (as routes do),
/// and come back typed at the other end.
#[test]
fn envoy_filters_reach_every_node_and_materialize_typed() {
    let with = config(RATE_LIMIT);
    assert_eq!(with.envoy_filters.len(), 1);
    let all = all_objects(&with);
    for node in ["node1", "node2", "node9"] {
        let view = node_view(&with, &all, node);
        assert!(keys(&view).contains(&"EnvoyFilter/billing/rl"), "{node}: {:?}", keys(&view));
        let back = materialize(&view).expect("materializes");
        assert_eq!(back.envoy_filters, with.envoy_filters);
        let limit = back.envoy_filters[0].local_rate_limit().expect("still the supported shape");
        assert_eq!(limit.filter.map(|b| b.max_tokens), Some(10));
    }
    // Removing it is an incremental delete.
    let without = config("");
    let changed = changed_keys(&all, &all_objects(&without));
    assert_eq!(changed, ["EnvoyFilter/billing/rl"]);
}
