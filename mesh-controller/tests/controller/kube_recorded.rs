//! The Kubernetes source on recorded API objects (`tests/recorded/`, the API server's
//! JSON with its real fields): the objects go through the same code as on a live
//! cluster, from kube-runtime watcher events to the validated model, and the node
//! authentication and leader election decide on recorded `TokenReview`s and `Lease`s.
use k8s_openapi::{
    api::{
        authentication::v1::TokenReview,
        coordination::v1::Lease,
        core::v1::{ConfigMap, Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    jiff::Timestamp,
};
use kube::{api::DynamicObject, runtime::watcher::Event};
use mesh_common::{
    config::{Config, security::MtlsMode},
    policy::{Connection, Workload, authorize, mtls_mode},
};
use mesh_controller::{
    kube_source::{Admission, Store, WatchedKind, problem_text, status_patch},
    lease::{Decision, decide},
    node_auth::{AuthError, Client, Waypoint, client_of, node_of},
};
use serde_json::{Value, json};

fn recorded(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/recorded").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("recorded file")).expect("recorded JSON")
}

fn items(name: &str) -> Vec<Value> {
    recorded(name)["items"].as_array().expect("a List").clone()
}

fn kind(name: &str) -> &'static WatchedKind {
    WatchedKind::named(name).expect("watched kind")
}

fn dynamic(object: &Value) -> DynamicObject {
    serde_json::from_value(object.clone()).expect("an API object")
}

/// What a watcher yields for a fresh list of `objects` of one kind.
fn relist(store: &mut Store, kind_name: &str, objects: &[Value]) -> bool {
    let kind = kind(kind_name);
    store.apply(kind, Event::Init);
    for object in objects {
        store.apply(kind, Event::InitApply(dynamic(object)));
    }
    store.apply(kind, Event::InitDone)
}

/// The recorded cluster, listed kind by kind as the controller's watchers do.
fn recorded_cluster() -> Store {
    let mut store = Store::default();
    let istio = items("istio.json");
    let by_kind = |k: &str| istio.iter().filter(|o| o["kind"] == k).cloned().collect::<Vec<_>>();
    for watched in mesh_controller::kube_source::WATCHED {
        let objects = match watched.kind {
            "Namespace" => items("namespaces.json"),
            "Pod" => items("pods.json"),
            "Service" => items("services.json"),
            "EndpointSlice" => items("endpointslices.json"),
            "ConfigMap" => items("configmaps.json"),
            "HTTPRoute" | "GRPCRoute" => {
                // The recorded cluster has no Gateway API CRDs.
                assert!(store.absent(watched));
                continue;
            }
            other => by_kind(other),
        };
        assert!(relist(&mut store, watched.kind, &objects), "first list of {} changes the store", watched.kind);
    }
    assert!(store.synced());
    store
}

fn admit(admission: &mut Admission, store: &Store) -> mesh_controller::kube_source::Admitted {
    admission.admit(store.documents(), "cluster.local", "istio-system").expect("admits")
}

fn pod<'a>(config: &'a Config, name: &str) -> &'a mesh_common::config::Pod {
    config.pods.iter().find(|p| p.metadata.name == name).unwrap_or_else(|| panic!("pod {name}"))
}

#[test]
fn recorded_objects_are_real_api_objects() {
    for object in items("namespaces.json") {
        serde_json::from_value::<Namespace>(object).expect("Namespace");
    }
    for object in items("pods.json") {
        serde_json::from_value::<Pod>(object).expect("Pod");
    }
    for object in items("services.json") {
        serde_json::from_value::<Service>(object).expect("Service");
    }
    for object in items("endpointslices.json") {
        serde_json::from_value::<EndpointSlice>(object).expect("EndpointSlice");
    }
    for object in items("configmaps.json") {
        serde_json::from_value::<ConfigMap>(object).expect("ConfigMap");
    }
    for name in [
        "tokenreview.json",
        "tokenreview-unauthenticated.json",
        "tokenreview-no-node.json",
        "tokenreview-waypoint.json",
    ] {
        serde_json::from_value::<TokenReview>(recorded(name)).expect("TokenReview");
    }
    serde_json::from_value::<Lease>(recorded("lease.json")).expect("Lease");
}

#[test]
fn the_recorded_cluster_becomes_the_model_the_yaml_source_would_give() {
    let store = recorded_cluster();
    let docs = store.documents();
    // Reduced to what the mesh reads: no managedFields, no last-applied annotation.
    let text = serde_json::to_string(docs).unwrap();
    assert!(!text.contains("managedFields") && !text.contains("last-applied-configuration"), "{text}");
    let admitted = admit(&mut Admission::default(), &store);
    assert!(admitted.problems.is_empty(), "{:?}", admitted.problems);
    let config = admitted.config;

    // Meshed: the labelled namespace's pods; not the opted-out pod, not the other
    // namespace's, not the host-network one.
    let echo = pod(&config, "echo-7d9f8c6b5-abcde");
    assert!(config.pod_is_meshed(echo));
    assert_eq!(echo.metadata.uid, "3af9f30c-5a66-4477-bda9-d8c096d38ff5");
    assert_eq!(echo.spec.node_name.as_deref(), Some("node1"));
    assert_eq!(echo.spec.service_account(), "echo");
    assert_eq!(echo.ips(), ["10.98.1.10", "fd00:98:1::10"]);
    assert!(echo.is_ready());
    // readiness httpGet on the named port `health`, liveness tcpSocket 8080, startup gRPC 9090.
    assert_eq!(echo.probe_ports(), [8080, 8081, 9090]);
    assert!(!config.pod_is_meshed(pod(&config, "db-0")));
    assert!(!config.pod_is_meshed(pod(&config, "client-5c8d7f9b4-xyz12")));
    assert!(!config.pod_is_meshed(pod(&config, "kube-proxy-abcde")));

    let service = config.services.iter().find(|s| s.metadata.name == "echo").expect("service echo");
    assert_eq!(service.spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    assert_eq!(service.spec.ports[0].target_port.as_ref().map(ToString::to_string).as_deref(), Some("http"));
    assert_eq!(config.peer_authentications.len(), 2);
    // The API server writes `portLevelMtls` keys as strings (`"8081"`): read as ports.
    let health = config.peer_authentications.iter().find(|p| p.metadata.name == "echo-health").expect("echo-health");
    let ports: Vec<(u32, MtlsMode)> = health.spec.port_level_mtls.iter().map(|(p, m)| (*p, m.mode)).collect();
    assert_eq!(ports, [(8081, MtlsMode::Disable)]);
    assert_eq!(config.authorization_policies[0].metadata.name, "echo-allow");
    assert_eq!(config.virtual_services.len(), 1);
    assert_eq!(config.destination_rules.len(), 1);
    // The local rate limit EnvoyFilter (v1alpha3), its spec as written.
    assert_eq!(config.envoy_filters.len(), 1);
    let limit = config.envoy_filters[0].local_rate_limit().expect("the supported shape");
    assert_eq!(limit.scope.target_refs, [("Gateway".to_string(), "waypoint".to_string())]);
    assert_eq!(limit.filter.map(|b| (b.max_tokens, b.fill_interval.as_secs())), Some((50, 1)));
    // Istio's mesh config from the ConfigMap `istio` (only its `mesh` key is kept).
    let providers: Vec<&str> = config.mesh.extension_providers.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(providers, ["ext-authz-http"]);
    assert!(!text.contains("meshNetworks"), "{text}");
    // Istio's fields this mesh does not use are accepted, with a warning naming them.
    let ignored: Vec<&str> =
        config.warnings.iter().filter(|w| w.file == "ConfigMap/istio-system/istio").map(|w| w.field.as_str()).collect();
    assert_eq!(ignored, ["data.mesh.defaultConfig.discoveryAddress", "data.mesh.enablePrometheusMerge"]);
    assert_eq!(
        mesh_controller::kube_source::MESH_CONFIG_FIELDS,
        format!("metadata.namespace=istio-system,metadata.name={}", mesh_common::config::mesh::CONFIG_MAP_NAME)
    );

    // Relisting the same objects changes nothing; the watch events of the recorded
    // stream do.
    let mut store = store;
    assert!(!relist(&mut store, "Pod", &items("pods.json")));
}

#[test]
fn recorded_watch_events_relabel_a_namespace() {
    let mut store = recorded_cluster();
    let mut admission = Admission::default();
    let meshed = |store: &Store, admission: &mut Admission| {
        let config = admit(admission, store).config;
        config.namespace_is_meshed("legacy")
    };
    assert!(!meshed(&store, &mut admission));
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/recorded/watch-events.jsonl"))
        .expect("recorded stream");
    let mut seen = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = serde_json::from_str(line).expect("a watch event");
        let object = &event["object"];
        let changed = match event["type"].as_str().expect("type") {
            "ADDED" | "MODIFIED" => store.apply(kind("Namespace"), Event::Apply(dynamic(object))),
            "DELETED" => store.apply(kind("Namespace"), Event::Delete(dynamic(object))),
            // kube-runtime's watcher consumes bookmarks itself.
            "BOOKMARK" => continue,
            other => panic!("unexpected event type {other}"),
        };
        seen.push((event["type"].as_str().unwrap().to_owned(), changed, meshed(&store, &mut admission)));
    }
    assert_eq!(
        seen,
        [
            // ADDED of an object already listed: same document, no change.
            ("ADDED".to_owned(), false, false),
            ("MODIFIED".to_owned(), true, true),
            ("MODIFIED".to_owned(), true, false),
            // `tmp` was never listed.
            ("DELETED".to_owned(), false, false),
        ]
    );
}

#[test]
fn an_invalid_object_is_left_out_or_held_and_reported_while_the_rest_applies() {
    let mut store = recorded_cluster();
    let mut admission = Admission::default();
    admit(&mut admission, &store);
    let broken = recorded("istio-invalid.json");
    store.apply(kind("VirtualService"), Event::Apply(dynamic(&broken)));
    // Something else changes at the same time and still applies.
    let mut relabelled = items("namespaces.json").into_iter().find(|n| n["metadata"]["name"] == "legacy").unwrap();
    relabelled["metadata"]["labels"]["istio.io/dataplane-mode"] = "ambient".into();
    store.apply(kind("Namespace"), Event::Apply(dynamic(&relabelled)));

    let admitted = admit(&mut admission, &store);
    assert!(admitted.config.namespace_is_meshed("legacy"));
    assert_eq!(admitted.left_out, ["VirtualService/shop/broken"]);
    assert!(!admitted.config.virtual_services.iter().any(|v| v.metadata.name == "broken"));
    let problems = &admitted.problems["VirtualService/shop/broken"];
    let text = problem_text(problems);
    assert!(text.contains("spec.http[0].route[0].weight") && text.contains("negative"), "{text}");
    assert!(text.contains("spec.http[0].timeout") && text.contains("2x"), "{text}");
    assert!(problems.iter().all(|p| p.object.as_deref() == Some("VirtualService/shop/broken")));

    // Reported on the object: a status condition with the problems, for the
    // generation the API server gave.
    let object = store.object_ref("VirtualService/shop/broken").expect("known object");
    assert_eq!(object.uid, broken["metadata"]["uid"].as_str().unwrap());
    let patch = status_patch(&object, problems, "2026-11-22T10:00:00Z");
    let condition = &patch["status"]["conditions"][0];
    assert_eq!((condition["type"].as_str(), condition["status"].as_str()), (Some("Accepted"), Some("False")));
    assert_eq!(patch["status"]["observedGeneration"], broken["metadata"]["generation"]);

    // Fixed: accepted. Broken again: the accepted version keeps serving.
    let mut fixed = broken.clone();
    fixed["spec"]["http"][0]["route"][0]["weight"] = 80.into();
    fixed["spec"]["http"][0]["timeout"] = "2s".into();
    store.apply(kind("VirtualService"), Event::Apply(dynamic(&fixed)));
    let admitted = admit(&mut admission, &store);
    assert!(admitted.problems.is_empty(), "{:?}", admitted.problems);
    assert!(admitted.config.virtual_services.iter().any(|v| v.metadata.name == "broken"));
    store.apply(kind("VirtualService"), Event::Apply(dynamic(&broken)));
    let admitted = admit(&mut admission, &store);
    assert_eq!(admitted.held, ["VirtualService/shop/broken"]);
    let held = admitted.config.virtual_services.iter().find(|v| v.metadata.name == "broken").expect("held");
    assert_eq!(held.spec.http[0].timeout.as_deref(), Some("2s"));

    // Deleted: gone, and nothing left to report.
    store.apply(kind("VirtualService"), Event::Delete(dynamic(&broken)));
    let admitted = admit(&mut admission, &store);
    assert!(
        admitted.problems.is_empty() && !admitted.config.virtual_services.iter().any(|v| v.metadata.name == "broken")
    );
}

#[test]
fn an_invalid_security_policy_that_was_never_accepted_closes_instead_of_opening() {
    let mut store = recorded_cluster();
    let mut admission = Admission::default();
    let object = |kind: &str, namespace: &str, name: &str, spec: Value| {
        let group =
            if kind == "PeerAuthentication" || kind == "AuthorizationPolicy" { "security.istio.io/v1" } else { "" };
        json!({"apiVersion": group, "kind": kind, "metadata": {"name": name, "namespace": namespace, "uid": name, "generation": 1}, "spec": spec})
    };
    // Whether `from` (a service account of `shop`) may reach pod `to` on port 8080.
    let allowed = |config: &Config, from: &str, to: &str| {
        let pod = pod(config, to);
        let workload = Workload { namespace: &pod.metadata.namespace, labels: &pod.metadata.labels };
        let identity = format!("spiffe://cluster.local/ns/shop/sa/{from}");
        let conn = Connection {
            source_identity: Some(&identity),
            source_ip: "10.98.2.99".parse().unwrap(),
            destination_ip: pod.ips()[0].parse().unwrap(),
            destination_port: 8080,
        };
        authorize(config, &workload, &conn).is_allow()
    };
    let (client, echo) = ("client-5c8d7f9b4-xyz12", "echo-7d9f8c6b5-abcde");
    let apply = |store: &mut Store, o: Value| store.apply(kind(o["kind"].as_str().unwrap()), Event::Apply(dynamic(&o)));
    // The mesh-wide default PERMISSIVE, so that a namespace's STRICT is its own.
    apply(&mut store, object("PeerAuthentication", "istio-system", "default", json!({"mtls": {"mode": "PERMISSIVE"}})));
    let before = admit(&mut admission, &store).config;
    assert!(allowed(&before, "web", client) && allowed(&before, "client", echo) && !allowed(&before, "web", echo));
    let legacy_mtls = |config: &Config| {
        mtls_mode(config, &Workload { namespace: "legacy", labels: &pod(config, client).metadata.labels }, 8080).mode
    };
    assert_eq!(legacy_mtls(&before), MtlsMode::Permissive);

    // A `when` without values: Istio's webhook refuses it, the API server stores it.
    let bad_rules = json!([{"when": [{"key": "request.headers[x-user]"}]}]);
    // The only ALLOW policy of `legacy`'s client: left out, the client would be open to all.
    apply(
        &mut store,
        object(
            "AuthorizationPolicy",
            "legacy",
            "allow-web",
            json!({"selector": {"matchLabels": {"app": "client"}}, "rules": bad_rules}),
        ),
    );
    // A DENY on echo, whose ALLOW policy admits `client`.
    apply(
        &mut store,
        object(
            "AuthorizationPolicy",
            "shop",
            "deny-some",
            json!({"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY", "rules": bad_rules}),
        ),
    );
    // An AUDIT policy opens and denies nothing: left out. So is a DENY without rules
    // (it never matches), and a PeerAuthentication that asks for no STRICT.
    apply(&mut store, object("AuthorizationPolicy", "shop", "audit", json!({"action": "AUDIT", "rules": bad_rules})));
    apply(&mut store, object("AuthorizationPolicy", "shop", "deny-none", json!({"action": "DENY"})));
    apply(
        &mut store,
        object(
            "PeerAuthentication",
            "istio-system",
            "open",
            json!({"mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"0": {"mode": "DISABLE"}}}),
        ),
    );
    // A PeerAuthentication that makes `legacy` STRICT, with a port-level setting Istio
    // refuses (port 0).
    apply(
        &mut store,
        object(
            "PeerAuthentication",
            "legacy",
            "strict",
            json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"0": {"mode": "STRICT"}}}),
        ),
    );
    let admitted = admit(&mut admission, &store);
    assert_eq!(
        admitted.denying,
        [
            "AuthorizationPolicy/legacy/allow-web",
            "AuthorizationPolicy/shop/deny-some",
            "PeerAuthentication/legacy/strict"
        ]
    );
    assert_eq!(
        admitted.left_out,
        [
            "AuthorizationPolicy/shop/audit",
            "AuthorizationPolicy/shop/deny-none",
            "PeerAuthentication/istio-system/open"
        ]
    );
    let config = &admitted.config;
    assert!(!allowed(config, "web", client), "the broken ALLOW policy's stand-in applies");
    assert!(!allowed(config, "client", echo), "the broken DENY policy's stand-in denies all");
    assert_eq!(legacy_mtls(config), MtlsMode::Strict);
    // The object says what stands in for it, before its own problems.
    let text = problem_text(&admitted.problems["AuthorizationPolicy/shop/deny-some"]);
    assert!(text.starts_with("not valid and never accepted: every request to what it selects is denied"), "{text}");
    assert!(text.contains("spec.rules[0].when[0]"), "{text}");

    // A scope that is itself invalid: the stand-in covers the namespace.
    apply(
        &mut store,
        object(
            "AuthorizationPolicy",
            "shop",
            "deny-some",
            json!({"selector": {"matchLabels": {"app": "-bad-"}}, "action": "DENY", "rules": bad_rules}),
        ),
    );
    let admitted = admit(&mut admission, &store);
    assert!(admitted.denying.contains(&"AuthorizationPolicy/shop/deny-some".to_owned()), "{:?}", admitted.problems);
    let text = problem_text(&admitted.problems["AuthorizationPolicy/shop/deny-some"]);
    assert!(text.contains("every request to its whole namespace is denied"), "{text}");
    assert!(!allowed(&admitted.config, "client", echo));

    // Fixed: the policies as written, nothing standing in.
    apply(
        &mut store,
        object(
            "AuthorizationPolicy",
            "legacy",
            "allow-web",
            json!({"selector": {"matchLabels": {"app": "client"}}, "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]}]}),
        ),
    );
    apply(
        &mut store,
        object(
            "AuthorizationPolicy",
            "shop",
            "deny-some",
            json!({"selector": {"matchLabels": {"app": "echo"}}, "action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["legacy"]}}]}]}),
        ),
    );
    let admitted = admit(&mut admission, &store);
    assert_eq!(admitted.denying, ["PeerAuthentication/legacy/strict"]);
    assert!(allowed(&admitted.config, "web", client) && allowed(&admitted.config, "client", echo));
}

#[test]
fn a_route_whose_destination_rule_is_not_applied_yet_is_served_with_a_warning() {
    let mut store = recorded_cluster();
    let rule = items("istio.json").into_iter().find(|o| o["kind"] == "DestinationRule").expect("DestinationRule");
    store.apply(kind("DestinationRule"), Event::Delete(dynamic(&rule)));
    let admitted = admit(&mut Admission::default(), &store);
    assert!(admitted.problems.is_empty() && admitted.left_out.is_empty(), "{:?}", admitted.problems);
    assert!(admitted.config.virtual_services.iter().any(|v| v.metadata.name == "echo"));
    // (The mesh config's fields this mesh does not use warn too: not counted here.)
    let warnings: Vec<&str> = admitted
        .config
        .warnings
        .iter()
        .filter(|w| w.file == "VirtualService/shop/echo")
        .map(|w| w.field.as_str())
        .collect();
    assert_eq!(
        warnings,
        ["spec.http[0].route[0].destination.subset", "spec.http[0].route[1].destination.subset"],
        "{:?}",
        admitted.config.warnings
    );
}

#[test]
fn recorded_token_reviews_give_the_node_or_a_reason() {
    let review = |name: &str| serde_json::from_value::<TokenReview>(recorded(name)).unwrap().status.unwrap();
    let account = "system:serviceaccount:istio-system:mesh-agent";
    assert_eq!(node_of(&review("tokenreview.json"), "mesh-controller", account), Ok("node1".to_owned()));
    assert!(matches!(
        node_of(&review("tokenreview-unauthenticated.json"), "mesh-controller", account),
        Err(AuthError::NotAuthenticated(e)) if e.contains("invalid bearer token")
    ));
    assert!(matches!(
        node_of(&review("tokenreview-no-node.json"), "mesh-controller", "system:serviceaccount:default:default"),
        Err(AuthError::NoNode(_))
    ));
    // A valid token of another account (a workload's), or for another audience.
    assert!(matches!(
        node_of(&review("tokenreview.json"), "mesh-controller", "system:serviceaccount:istio-system:other"),
        Err(AuthError::WrongAccount { .. })
    ));
    assert!(matches!(node_of(&review("tokenreview.json"), "vault", account), Err(AuthError::WrongAudience { .. })));
}

/// A namespace `shop` with waypoint `waypoint` (class istio-waypoint, as `meshctl
/// waypoint apply` declares it), its pod on node2 running as `waypoint` (the token of
/// `tokenreview-waypoint.json`), and an application pod on node2.
fn waypoint_config(class: &str, pod_account: &str) -> Config {
    let text = format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: shop, labels: {{istio.io/waypoint-for: service}}}}
spec:
  gatewayClassName: {class}
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-7c5d9b8f4-x2m9q
  namespace: shop
  labels: {{gateway.networking.k8s.io/gateway-name: waypoint}}
spec: {{nodeName: node2, serviceAccountName: {pod_account}, containers: [{{name: waypoint, image: mesh}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-1, namespace: shop, labels: {{app: echo}}}}
spec: {{nodeName: node2, serviceAccountName: echo, containers: [{{name: echo, image: echo}}]}}
"
    );
    mesh_common::config::load(&[mesh_common::config::Source { name: "waypoint.yaml".into(), text }]).unwrap()
}

#[test]
fn a_waypoints_token_is_accepted_only_for_a_declared_waypoints_account() {
    let review = |name: &str| serde_json::from_value::<TokenReview>(recorded(name)).unwrap().status.unwrap();
    let agent = "system:serviceaccount:istio-system:mesh-agent";
    let config = waypoint_config("istio-waypoint", "waypoint");
    let expected = Waypoint {
        namespace: "shop".into(),
        name: "waypoint".into(),
        service_account: "waypoint".into(),
        node: "node2".into(),
    };
    let client = client_of(&review("tokenreview-waypoint.json"), "mesh-controller", agent, &config);
    assert_eq!(client, Ok(Client::Waypoint(expected.clone())));
    let client = client.unwrap();
    // Its own identity and nothing else: not the pod next to it on the same node.
    assert_eq!(expected.identity("cluster.local"), "spiffe://cluster.local/ns/shop/sa/waypoint");
    assert!(client.may_issue(&config, "spiffe://cluster.local/ns/shop/sa/waypoint"));
    assert!(!client.may_issue(&config, "spiffe://cluster.local/ns/shop/sa/echo"));
    assert!(!client.may_issue(&config, "spiffe://other.local/ns/shop/sa/waypoint"));
    // The agent's token keeps working, and the agent of node2 may still get the
    // application's identity.
    let agent_client = client_of(&review("tokenreview.json"), "mesh-controller", agent, &config);
    assert_eq!(agent_client, Ok(Client::Agent { node: "node1".into() }));
    assert!(Client::Agent { node: "node2".into() }.may_issue(&config, "spiffe://cluster.local/ns/shop/sa/echo"));

    // Not a waypoint: the Gateway is of another class, or its pods run as another account.
    for config in [waypoint_config("istio", "waypoint"), waypoint_config("istio-waypoint", "other")] {
        let refused = client_of(&review("tokenreview-waypoint.json"), "mesh-controller", agent, &config);
        let Err(error @ AuthError::NotAWaypoint { .. }) = refused else { panic!("{refused:?}") };
        let text = error.to_string();
        assert!(text.contains("system:serviceaccount:shop:waypoint") && text.contains("istio-waypoint"), "{text}");
    }
    // A token not bound to a pod (`kubectl create token`): never a waypoint's.
    assert!(matches!(
        client_of(&review("tokenreview-no-node.json"), "mesh-controller", agent, &config),
        Err(AuthError::NoNode(account)) if account == "system:serviceaccount:default:default"
    ));
    assert!(matches!(
        client_of(&review("tokenreview-unauthenticated.json"), "mesh-controller", agent, &config),
        Err(AuthError::NotAuthenticated(_))
    ));
    assert!(matches!(
        client_of(&review("tokenreview-waypoint.json"), "vault", agent, &config),
        Err(AuthError::WrongAudience { .. })
    ));
}

#[test]
fn a_waypoint_token_without_node_falls_back_to_its_pods_node() {
    let mut status =
        serde_json::from_value::<TokenReview>(recorded("tokenreview-waypoint.json")).unwrap().status.unwrap();
    let extra = status.user.as_mut().unwrap().extra.as_mut().unwrap();
    extra.remove(mesh_controller::node_auth::NODE_NAME_EXTRA);
    let agent = "system:serviceaccount:istio-system:mesh-agent";
    let config = waypoint_config("istio-waypoint", "waypoint");
    let client = client_of(&status, "mesh-controller", agent, &config).unwrap();
    assert_eq!(client.node(), "node2");
    // Bound to no pod at all (no pod or node extras): no pod to check, no node's view.
    status.user.as_mut().unwrap().extra = None;
    assert!(matches!(
        client_of(&status, "mesh-controller", agent, &config),
        Err(AuthError::NoNode(account)) if account == "system:serviceaccount:shop:waypoint"
    ));
}

#[test]
fn a_waypoint_account_token_from_another_pod_is_refused() {
    // The account is a waypoint's, but the token is bound to a pod that is not one of
    // the waypoint's pods (or not seen yet): refused, naming that pod.
    let mut status =
        serde_json::from_value::<TokenReview>(recorded("tokenreview-waypoint.json")).unwrap().status.unwrap();
    let extra = status.user.as_mut().unwrap().extra.as_mut().unwrap();
    extra.insert(mesh_controller::node_auth::POD_NAME_EXTRA.into(), vec!["debug-shell".into()]);
    let refused = client_of(
        &status,
        "mesh-controller",
        "system:serviceaccount:istio-system:mesh-agent",
        &waypoint_config("istio-waypoint", "waypoint"),
    );
    let Err(error @ AuthError::NotAWaypoint { .. }) = refused else { panic!("{refused:?}") };
    assert!(error.to_string().contains("shop/debug-shell"), "{error}");
}

#[test]
fn a_node_credential_with_the_waypoint_header_is_that_nodes_waypoint() {
    let config = waypoint_config("istio-waypoint", "waypoint");
    let client = Client::from_node("node2", Some("shop/waypoint/waypoint"));
    assert!(matches!(&client, Client::Waypoint(w) if w.name == "waypoint" && w.node == "node2"));
    assert!(client.may_issue(&config, "spiffe://cluster.local/ns/shop/sa/waypoint"));
    assert!(!client.may_issue(&config, "spiffe://cluster.local/ns/shop/sa/echo"));
    // The claim only narrows: no waypoint pod of that account on node1.
    assert!(
        !Client::from_node("node1", Some("shop/waypoint/waypoint"))
            .may_issue(&config, "spiffe://cluster.local/ns/shop/sa/waypoint")
    );
    assert_eq!(Client::from_node("node2", None), Client::Agent { node: "node2".into() });
    assert_eq!(Client::from_node("node2", Some("garbage")), Client::Agent { node: "node2".into() });
}

#[test]
fn the_recorded_lease_is_followed_while_valid_and_taken_once_expired() {
    let lease: Lease = serde_json::from_value(recorded("lease.json")).unwrap();
    let spec = lease.spec.as_ref().unwrap();
    let renewed = spec.renew_time.as_ref().unwrap().0;
    let holder = spec.holder_identity.clone().unwrap();
    let during: Timestamp = renewed + k8s_openapi::jiff::SignedDuration::from_secs(5);
    let after: Timestamp = renewed + k8s_openapi::jiff::SignedDuration::from_secs(16);
    assert_eq!(decide(Some(spec), "mesh-controller-other", during), Decision::Follow { holder: holder.clone() });
    assert_eq!(decide(Some(spec), &holder, during), Decision::Renew);
    assert_eq!(decide(Some(spec), "mesh-controller-other", after), Decision::Acquire);
}
