//! `meshctl manifest generate` without a cluster: every rendered document of every
//! profile parses into its Kubernetes API type (k8s-openapi) with no field lost on
//! the way (k8s-openapi ignores unknown fields, so a typed round trip is compared with
//! the original), the CRDs are structural and accept the Istio manifests of the
//! configuration corpus, the RBAC rules allow exactly the API calls the mesh makes,
//! and bad `--set` values are refused with a message naming the key.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        coordination::v1::Lease,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, ResourceQuota, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use mesh_controller::manifest::{self, ManifestError, Values};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::Value;

/// Install variants the tests render: every profile, and `--set` combinations that
/// touch every key (including values YAML would misread if they were not quoted).
const VARIANTS: &[&[&str]] = &[
    &[],
    &["profile=default"],
    &["profile=demo"],
    &["profile=minimal"],
    &[
        "controller.replicas=3",
        "namespace=mesh",
        "hub=localhost:5000/acme",
        "image=mesh/all",
        "tag=1",
        "trustDomain=example.org",
        "rootNamespace=mesh-root",
        "agent.excludePorts=22,2379",
        "agent.logLevel=warn",
        "controller.logLevel=trace",
        "waypoint.enabled=true",
        "waypoint.namespace=shop",
        "waypoint.name=shop-waypoint",
    ],
    &["profile=minimal", "waypoint.enabled=true", "tag=1.0"],
    &["profile=demo", "waypoint.enabled=false", "namespace=on", "waypoint.name=null"],
    &["waypoint.namespace=yes", "waypoint.enabled=true", "tag=true"],
];

fn render(sets: &[&str]) -> String {
    manifest::generate(sets).unwrap_or_else(|e| panic!("--set {sets:?}: {e}"))
}

/// YAML to JSON the way the API server's decoder does it: mapping keys become strings
/// (`portLevelMtls: {15020: ...}`), aliases are resolved.
fn to_json(yaml: serde_yaml::Value) -> Value {
    match yaml {
        serde_yaml::Value::Null => Value::Null,
        serde_yaml::Value::Bool(b) => Value::Bool(b),
        serde_yaml::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.into()
            } else if let Some(u) = n.as_u64() {
                u.into()
            } else {
                n.as_f64().map_or(Value::Null, Value::from)
            }
        }
        serde_yaml::Value::String(s) => Value::String(s),
        serde_yaml::Value::Sequence(items) => Value::Array(items.into_iter().map(to_json).collect()),
        serde_yaml::Value::Mapping(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        serde_yaml::Value::String(s) => s,
                        other => serde_yaml::to_string(&other).expect("scalar key").trim().to_owned(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        serde_yaml::Value::Tagged(tagged) => to_json(tagged.value),
    }
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| to_json(serde_yaml::Value::deserialize(doc).expect("rendered YAML parses")))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn describe(doc: &Value) -> String {
    format!(
        "{} {}/{}",
        doc["kind"].as_str().unwrap_or("?"),
        doc["metadata"]["namespace"].as_str().unwrap_or("-"),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Paths of the original document that did not survive the typed round trip.
fn lost(original: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(original), Value::Object(typed)) => {
            for (key, value) in original {
                let here = format!("{path}.{key}");
                match typed.get(key) {
                    Some(typed) => lost(value, typed, &here, out),
                    None if value.is_null() => {}
                    None => out.push(here),
                }
            }
        }
        (Value::Array(original), Value::Array(typed)) => {
            if original.len() != typed.len() {
                out.push(format!("{path} (length {} became {})", original.len(), typed.len()));
            }
            for (i, (original, typed)) in original.iter().zip(typed).enumerate() {
                lost(original, typed, &format!("{path}[{i}]"), out);
            }
        }
        // JSON Schema bounds are floats in the API types: 0 and 0.0 are the same value.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (original, typed) if original != typed => out.push(format!("{path} ({original} became {typed})")),
        _ => {}
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<T, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| format!("does not parse: {e}"))?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut missing = Vec::new();
    lost(doc, &back, "", &mut missing);
    if missing.is_empty() { Ok(typed) } else { Err(format!("unknown fields: {}", missing.join(", "))) }
}

/// Every kind an install renders, parsed into its k8s-openapi type.
fn check_typed(doc: &Value) -> Result<(), String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(doc).map(drop)
        }
        ("v1", "Namespace") => round_trip::<Namespace>(doc).map(drop),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(doc).map(drop),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(doc).map(drop),
        ("v1", "ResourceQuota") => round_trip::<ResourceQuota>(doc).map(drop),
        ("v1", "Service") => round_trip::<Service>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => round_trip::<ClusterRoleBinding>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(doc).map(drop),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(doc).map(drop),
        ("coordination.k8s.io/v1", "Lease") => round_trip::<Lease>(doc).map(drop),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(doc).map(drop),
        ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(doc).map(drop),
        // No k8s-openapi type: the mesh's own model (which refuses unknown fields)
        // and the Gateway API CRD's schema.
        ("gateway.networking.k8s.io/v1", "Gateway") => check_gateway(doc),
        _ => Err(format!("{api_version} {kind} is not a kind an install should contain")),
    }
}

/// A rendered `Gateway`: the mesh's config loader reads it as a waypoint, and the
/// Gateway API CRD (deploy/gateway-api) accepts its spec.
fn check_gateway(doc: &Value) -> Result<(), String> {
    let text = serde_json::to_string(doc).map_err(|e| e.to_string())?;
    let config = mesh_common::config::load(&[mesh_common::config::Source { name: "gateway.json".into(), text }])
        .map_err(|e| e.to_string())?;
    if !(config.gateways.len() == 1 && config.gateways[0].is_waypoint()) {
        return Err("not read as a waypoint Gateway".into());
    }
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway-api/gateway.networking.k8s.io_gateways.yaml");
    let crd = documents(&std::fs::read_to_string(path).map_err(|e| e.to_string())?).remove(0);
    let served =
        crd["spec"]["versions"].as_array().and_then(|v| v.iter().find(|v| v["name"] == "v1")).ok_or("no v1")?;
    let mut errors = Vec::new();
    validate(&doc["spec"], &served["schema"]["openAPIV3Schema"]["properties"]["spec"], ".spec", &mut errors);
    if errors.is_empty() { Ok(()) } else { Err(errors.join(", ")) }
}

#[test]
fn every_document_of_every_variant_parses_into_its_api_type_without_unknown_fields() {
    for sets in VARIANTS {
        let docs = documents(&render(sets));
        assert!(docs.len() >= 15, "--set {sets:?}: only {} documents", docs.len());
        let errors: Vec<String> =
            docs.iter().filter_map(|doc| check_typed(doc).err().map(|e| format!("{}: {e}", describe(doc)))).collect();
        assert!(errors.is_empty(), "--set {sets:?}:\n{}", errors.join("\n"));
    }
}

#[test]
fn the_typed_check_reports_unknown_fields_with_their_path() {
    let mut doc = documents(&render(&[])).into_iter().find(|d| d["kind"] == "DaemonSet").expect("DaemonSet");
    doc["spec"]["template"]["spec"]["hostPid"] = true.into();
    doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilites"] =
        Value::Object(serde_json::Map::default());
    let error = check_typed(&doc).expect_err("misspelled fields are reported");
    assert!(error.contains(".spec.template.spec.hostPid"), "{error}");
    assert!(error.contains(".spec.template.spec.containers[0].securityContext.capabilites"), "{error}");
}

fn rank(doc: &Value) -> u8 {
    if doc["metadata"]["labels"]["app.kubernetes.io/component"] == "waypoint" {
        return 4;
    }
    match doc["kind"].as_str().unwrap_or_default() {
        "CustomResourceDefinition" => 0,
        "Namespace" => 1,
        "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding" => 2,
        "ConfigMap" | "Lease" | "ResourceQuota" => 3,
        _ => 4,
    }
}

#[test]
fn documents_come_in_apply_order_and_namespaced_objects_land_in_the_install_namespace() {
    for sets in VARIANTS {
        let values = Values::from_set_args(sets).expect("valid --set");
        let docs = documents(&render(sets));
        let ranks: Vec<u8> = docs.iter().map(rank).collect();
        assert!(ranks.is_sorted(), "--set {sets:?}: order {ranks:?}");
        for doc in &docs {
            let namespace = doc["metadata"]["namespace"].as_str();
            let expected = match (rank(doc), doc["kind"].as_str().unwrap_or_default()) {
                (0 | 1, _) | (_, "ClusterRole" | "ClusterRoleBinding") => None,
                (4, _) if doc["metadata"]["labels"]["app.kubernetes.io/component"] == "waypoint" => {
                    Some(values.waypoint.namespace.as_str())
                }
                _ => Some(values.namespace.as_str()),
            };
            assert_eq!(namespace, expected, "--set {sets:?}: {}", describe(doc));
        }
        let namespaces: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "Namespace").collect();
        assert_eq!(namespaces.len(), 1, "one Namespace, the install's");
        assert_eq!(namespaces[0]["metadata"]["name"], values.namespace.as_str());
    }
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
}

fn typed<T: DeserializeOwned>(doc: &Value) -> T {
    serde_json::from_value(doc.clone()).expect("typed")
}

fn pod_spec_of(docs: &[Value], kind: &str, name: &str) -> PodSpec {
    let doc = find(docs, kind, name).unwrap_or_else(|| panic!("{kind} {name} is rendered"));
    typed(&doc["spec"]["template"]["spec"])
}

fn only_container(spec: &PodSpec) -> &Container {
    assert_eq!(spec.containers.len(), 1);
    &spec.containers[0]
}

#[test]
fn profiles_render_their_components() {
    let default = documents(&render(&[]));
    let demo = documents(&render(&["profile=demo"]));
    let minimal = documents(&render(&["profile=minimal"]));

    let replicas =
        |docs: &[Value]| find(docs, "Deployment", "mesh-controller").expect("controller")["spec"]["replicas"].clone();
    assert_eq!(replicas(&default), 2);
    assert_eq!(replicas(&demo), 1);
    assert_eq!(replicas(&minimal), 2);
    assert_eq!(
        replicas(&documents(&render(&["controller.replicas=3", "profile=demo"]))),
        3,
        "--set wins over the profile"
    );

    for (docs, agent, waypoint) in [(&default, true, false), (&demo, true, true), (&minimal, false, false)] {
        assert_eq!(find(docs, "DaemonSet", "mesh-agent").is_some(), agent);
        assert_eq!(find(docs, "ServiceAccount", "mesh-agent").is_some(), agent);
        // The agent needs no API access: its pods come from the controller.
        assert!(find(docs, "ClusterRole", "mesh-agent").is_none());
        assert_eq!(find(docs, "Deployment", "waypoint").is_some(), waypoint);
        assert_eq!(find(docs, "Service", "waypoint").is_some(), waypoint);
        assert_eq!(find(docs, "Gateway", "waypoint").is_some(), waypoint);
        assert_eq!(docs.iter().filter(|d| d["kind"] == "CustomResourceDefinition").count(), 8);
        assert!(find(docs, "Service", "mesh-controller").is_some());
        assert!(find(docs, "Lease", "mesh-controller").is_some());
    }
    let demo_agent = pod_spec_of(&demo, "DaemonSet", "mesh-agent");
    let args = only_container(&demo_agent).args.clone().unwrap_or_default();
    assert!(args.contains(&"--log=debug".to_owned()), "{args:?}");
    let default_controller = pod_spec_of(&default, "Deployment", "mesh-controller");
    let demo_controller = pod_spec_of(&demo, "Deployment", "mesh-controller");
    let memory = |spec: &PodSpec| {
        only_container(spec).resources.as_ref().unwrap().requests.as_ref().unwrap()["memory"].0.clone()
    };
    assert_eq!(memory(&default_controller), "128Mi");
    assert_eq!(memory(&demo_controller), "64Mi");
    assert!(find(&documents(&render(&["waypoint.enabled=true"])), "Deployment", "waypoint").is_some());
}

#[test]
fn the_agent_has_exactly_the_privileges_and_host_paths_it_needs() {
    let docs = documents(&render(&["namespace=mesh", "agent.excludePorts=22,2379"]));
    let daemonset: DaemonSet = typed(find(&docs, "DaemonSet", "mesh-agent").expect("agent"));
    let ds_spec = &daemonset.spec;
    let strategy = ds_spec.update_strategy.as_ref().expect("update strategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    // Surge: the new agent takes the node over from the running one (handover).
    let rolling = strategy.rolling_update.as_ref().expect("rolling update");
    let int = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int;
    assert_eq!((rolling.max_surge.clone(), rolling.max_unavailable.clone()), (Some(int(1)), Some(int(0))));
    let spec = ds_spec.template.spec.as_ref().expect("pod spec");
    assert_eq!(spec.host_pid, Some(true));
    assert_ne!(spec.host_network, Some(true));
    assert_eq!(spec.priority_class_name.as_deref(), Some("system-node-critical"));
    assert!(
        spec.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.effect.as_deref() == Some("NoSchedule")),
        "tolerates tainted nodes"
    );
    let agent = only_container(spec);
    let security = agent.security_context.as_ref().expect("security context");
    assert_eq!(security.privileged, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.seccomp_profile.as_ref().map(|p| p.type_.as_str()), Some("RuntimeDefault"));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = capabilities.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(["NET_ADMIN", "SYS_ADMIN", "BPF", "PERFMON", "SYS_PTRACE", "SYS_RESOURCE"]));

    let volumes: BTreeMap<&str, _> = spec.volumes.iter().flatten().map(|v| (v.name.as_str(), v)).collect();
    let host_paths: BTreeSet<&str> =
        volumes.values().filter_map(|v| v.host_path.as_ref()).map(|h| h.path.as_str()).collect();
    assert_eq!(
        host_paths,
        BTreeSet::from(["/sys/fs/bpf", "/sys/fs/cgroup", "/var/run/netns", "/run/mesh", "/proc/sys/net"])
    );
    let mounts: BTreeMap<&str, _> = agent.volume_mounts.iter().flatten().map(|m| (m.name.as_str(), m)).collect();
    assert_eq!(mounts.len(), volumes.len(), "every volume is mounted");
    for mount in mounts.values() {
        assert_ne!(mount.mount_propagation.as_deref(), Some("Bidirectional"), "needs privileged: {}", mount.name);
    }
    assert_eq!(mounts["bpffs"].mount_propagation.as_deref(), Some("HostToContainer"));
    assert_eq!(mounts["cgroup"].read_only, Some(true));
    assert_eq!(mounts["netns"].mount_propagation.as_deref(), Some("HostToContainer"));
    assert_eq!(volumes["state"].host_path.as_ref().unwrap().type_.as_deref(), Some("DirectoryOrCreate"));
    // Where the agent writes a pod's network settings (its container's /proc/sys is
    // read-only): writable, at the path the agent looks for.
    assert_eq!(mounts["proc-sys-net"].mount_path, "/host/proc/sys/net");
    assert_ne!(mounts["proc-sys-net"].read_only, Some(true));
    let projected = volumes["mesh-token"].projected.as_ref().expect("projected token volume");
    let token = projected.sources.iter().flatten().find_map(|s| s.service_account_token.as_ref()).expect("token");
    assert_eq!(token.audience.as_deref(), Some("mesh-controller"));
    assert_eq!(mounts["mesh-token"].mount_path, "/var/run/secrets/mesh");

    let env = agent.env.iter().flatten().find(|e| e.name == "MESH_NODE_NAME").expect("MESH_NODE_NAME");
    let field = env.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect("from the downward API");
    assert_eq!(field.field_path, "spec.nodeName");
    let args = agent.args.clone().unwrap_or_default();
    assert_eq!(args[0], "run");
    for expected in [
        "--controller=mesh-controller.mesh.svc:15012",
        "--token-file=/var/run/secrets/mesh/token",
        "--exclude-port=22,2379",
    ] {
        assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
    }
    let probe = agent.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("readiness probe");
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(probe.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15021));
}

#[test]
fn the_waypoint_runs_mesh_waypoint_unprivileged_with_its_own_token_and_is_declared() {
    let docs = documents(&render(&["waypoint.enabled=true", "waypoint.namespace=shop", "waypoint.name=shop-wp"]));
    let gateway = find(&docs, "Gateway", "shop-wp").expect("the Gateway that declares the waypoint");
    assert_eq!(gateway["metadata"]["namespace"], "shop");
    assert_eq!(gateway["spec"]["gatewayClassName"], "istio-waypoint");
    assert_eq!(gateway["spec"]["listeners"], serde_json::json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}]));
    assert_eq!(gateway["metadata"]["labels"]["istio.io/waypoint-for"], "service");

    let deployment: Deployment = typed(find(&docs, "Deployment", "shop-wp").expect("deployment"));
    let template = &deployment.spec.template;
    // The controller recognises the pods by this label (and accepts their account).
    let labels = template.metadata.as_ref().unwrap().labels.clone().unwrap();
    assert_eq!(labels["gateway.networking.k8s.io/gateway-name"], "shop-wp");
    assert_eq!(labels["istio.io/dataplane-mode"], "none");
    let spec = template.spec.as_ref().unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("shop-wp"));
    assert_eq!(spec.automount_service_account_token, Some(false), "no API token: it needs no API access");
    assert_ne!(spec.host_pid, Some(true));
    assert_ne!(spec.host_network, Some(true));
    assert_eq!(spec.security_context.as_ref().and_then(|s| s.run_as_non_root), Some(true));
    let container = only_container(spec);
    assert_eq!(container.command, Some(vec!["mesh-waypoint".to_owned()]));
    let args = container.args.clone().unwrap_or_default();
    for expected in [
        "--namespace=shop",
        "--name=shop-wp",
        "--service-account=shop-wp",
        "--controller=mesh-controller.mesh-system.svc:15012",
        "--token-file=/var/run/secrets/mesh/token",
        "--root-cert=/var/run/secrets/mesh/root-cert.pem",
        "--state-dir=/var/run/mesh-waypoint",
    ] {
        assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
    }
    let security = container.security_context.as_ref().expect("security context");
    assert_eq!(security.privileged, Some(false));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_owned()]));
    assert!(security.capabilities.as_ref().and_then(|c| c.add.as_ref()).is_none());
    let ports: BTreeSet<i32> = container.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, BTreeSet::from([15008, 15020, 15021]));
    let probe = container.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("readiness probe");
    assert_eq!(probe.path.as_deref(), Some("/healthz/ready"));
    assert_eq!(probe.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15021));
    let requests = container.resources.as_ref().unwrap().requests.clone().unwrap();
    assert_eq!((requests["cpu"].0.as_str(), requests["memory"].0.as_str()), ("50m", "32Mi"));

    // The token and root certificate where --token-file and --root-cert read them.
    let mount =
        |name: &str| container.volume_mounts.iter().flatten().find(|m| m.name == name).map(|m| m.mount_path.clone());
    assert_eq!(mount("mesh-token").as_deref(), Some("/var/run/secrets/mesh"));
    assert_eq!(mount("state").as_deref(), Some("/var/run/mesh-waypoint"), "a writable state dir");
    let volume = spec.volumes.iter().flatten().find(|v| v.name == "mesh-token").expect("token volume");
    let sources = volume.projected.as_ref().unwrap().sources.clone().unwrap();
    let token = sources.iter().find_map(|s| s.service_account_token.as_ref()).expect("projected token");
    assert_eq!((token.audience.as_deref(), token.path.as_str()), (Some("mesh-controller"), "token"));
    assert!(token.expiration_seconds.is_some_and(|s| s <= 3600));
    let root = sources.iter().find_map(|s| s.config_map.as_ref()).expect("root certificate");
    assert_eq!(root.name, "mesh-root-cert");
    assert_eq!(root.items.as_ref().unwrap()[0].path, "root-cert.pem");
}

#[test]
fn the_controller_runs_unprivileged_and_is_reachable_on_15012() {
    let docs = documents(&render(&[]));
    let spec = pod_spec_of(&docs, "Deployment", "mesh-controller");
    let pod_security = spec.security_context.as_ref().expect("pod security context");
    assert_eq!(pod_security.run_as_non_root, Some(true));
    let controller = only_container(&spec);
    let security = controller.security_context.as_ref().expect("security context");
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.capabilities.as_ref().and_then(|c| c.drop.clone()), Some(vec!["ALL".to_owned()]));
    assert!(security.capabilities.as_ref().and_then(|c| c.add.as_ref()).is_none());
    assert_eq!(security.seccomp_profile.as_ref().map(|p| p.type_.as_str()), Some("RuntimeDefault"));
    let ports: BTreeSet<i32> = controller.ports.iter().flatten().map(|p| p.container_port).collect();
    assert_eq!(ports, BTreeSet::from([15012, 15014]));
    let probe = controller.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("readiness probe");
    assert_eq!(probe.path.as_deref(), Some("/ready"));
    assert!(controller.resources.as_ref().and_then(|r| r.limits.as_ref()).is_some());
    let service: Service = typed(find(&docs, "Service", "mesh-controller").expect("service"));
    let ports: Vec<i32> = service.spec.unwrap().ports.unwrap().iter().map(|p| p.port).collect();
    assert_eq!(ports, [15012]);
}

#[test]
fn the_effective_values_in_the_config_map_render_the_same_install_again() {
    for sets in VARIANTS {
        let docs = documents(&render(sets));
        let config: ConfigMap = typed(find(&docs, "ConfigMap", "mesh-config").expect("mesh-config"));
        let lines = config.data.expect("data")["values"].clone();
        let again: Vec<&str> = lines.lines().collect();
        assert_eq!(Values::from_set_args(&again), Values::from_set_args(sets), "{lines}");
    }
}

// ---- CRDs ----

/// Kind, group, served versions (in the order Istio's generated CRDs list them) and the
/// storage version, as Istio 1.30.3 ships them (`deploy/refresh-crds.py`).
const CRD_VERSIONS: &[(&str, &str, &[&str], &str)] = &[
    ("AuthorizationPolicy", "security.istio.io", &["v1", "v1beta1"], "v1"),
    ("PeerAuthentication", "security.istio.io", &["v1", "v1beta1"], "v1"),
    ("RequestAuthentication", "security.istio.io", &["v1", "v1beta1"], "v1"),
    ("VirtualService", "networking.istio.io", &["v1", "v1alpha3", "v1beta1"], "v1"),
    ("DestinationRule", "networking.istio.io", &["v1", "v1alpha3", "v1beta1"], "v1"),
    ("ServiceEntry", "networking.istio.io", &["v1", "v1alpha3", "v1beta1"], "v1"),
    ("WorkloadEntry", "networking.istio.io", &["v1", "v1alpha3", "v1beta1"], "v1"),
    ("Telemetry", "telemetry.istio.io", &["v1", "v1alpha1"], "v1alpha1"),
];

fn crds() -> Vec<Value> {
    documents(&render(&[])).into_iter().filter(|d| d["kind"] == "CustomResourceDefinition").collect()
}

/// Structural schema rules: every node says its type (or preserves unknown fields, or
/// is int-or-string), and `properties` and `additionalProperties` never meet.
fn structural(schema: &Value, path: &str, errors: &mut Vec<String>) {
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
    let int_or_string = schema["x-kubernetes-int-or-string"] == true;
    if schema.get("type").is_none() && !preserve && !int_or_string {
        errors.push(format!("{path}: no type"));
    }
    if schema.get("properties").is_some() && schema.get("additionalProperties").is_some() {
        errors.push(format!("{path}: both properties and additionalProperties"));
    }
    for (name, property) in schema["properties"].as_object().into_iter().flatten() {
        structural(property, &format!("{path}.{name}"), errors);
    }
    if let Some(items) = schema.get("items") {
        structural(items, &format!("{path}[]"), errors);
    }
    if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        structural(additional, &format!("{path}.*"), errors);
    }
}

#[test]
fn crds_serve_the_istio_versions_with_structural_typed_schemas() {
    let crds = crds();
    assert_eq!(crds.len(), CRD_VERSIONS.len());
    for (kind, group, versions, storage_version) in CRD_VERSIONS {
        let doc = crds.iter().find(|d| d["spec"]["names"]["kind"] == *kind).unwrap_or_else(|| panic!("CRD of {kind}"));
        let crd: CustomResourceDefinition = round_trip(doc).unwrap_or_else(|e| panic!("{kind}: {e}"));
        let spec = &crd.spec;
        assert_eq!(spec.group, *group);
        assert_eq!(crd.metadata.name.as_deref(), Some(format!("{}.{group}", spec.names.plural).as_str()));
        assert_eq!(spec.scope, "Namespaced");
        let served: Vec<&str> = spec.versions.iter().filter(|v| v.served).map(|v| v.name.as_str()).collect();
        assert_eq!(served, *versions, "{kind}");
        let storage: Vec<&str> = spec.versions.iter().filter(|v| v.storage).map(|v| v.name.as_str()).collect();
        assert_eq!(storage, [*storage_version], "{kind}: the storage version");
        for (i, version) in spec.versions.iter().enumerate() {
            assert!(
                version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(),
                "{kind} {}: status subresource (the controller patches conditions there)",
                version.name
            );
            let schema = &doc["spec"]["versions"][i]["schema"]["openAPIV3Schema"];
            let mut errors = Vec::new();
            structural(schema, "", &mut errors);
            assert!(errors.is_empty(), "{kind} {}: not structural:\n{}", version.name, errors.join("\n"));
            let spec_schema = &schema["properties"]["spec"];
            assert_eq!(spec_schema["type"], "object");
            assert_ne!(spec_schema["x-kubernetes-preserve-unknown-fields"], true, "{kind}: spec is typed");
            assert!(
                !spec_schema["properties"].as_object().is_none_or(serde_json::Map::is_empty),
                "{kind}: spec fields typed"
            );
        }
    }
}

#[test]
fn the_crd_files_in_deploy_are_the_ones_rendered() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .expect("deploy/crds")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut embedded: Vec<String> = manifest::CRDS.iter().map(|(name, _)| (*name).to_owned()).collect();
    embedded.sort();
    assert_eq!(on_disk, embedded, "every CRD file is embedded");
}

/// What the API server checks of a custom object against a structural schema: types,
/// enums, required fields, bounds, and (as kubectl's strict field validation reports
/// them) unknown fields.
fn validate(value: &Value, schema: &Value, path: &str, errors: &mut Vec<String>) {
    if value.is_null() {
        return; // pruned
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        errors.push(format!("{path}: {value} is not one of {allowed:?}"));
    }
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
    let ok = match schema["type"].as_str() {
        Some("object") => {
            let Some(object) = value.as_object() else {
                errors.push(format!("{path}: expected an object, got {value}"));
                return;
            };
            for required in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                if !object.contains_key(required) {
                    errors.push(format!("{path}.{required}: required"));
                }
            }
            for (key, item) in object {
                let here = format!("{path}.{key}");
                if let Some(property) = schema["properties"].get(key) {
                    validate(item, property, &here, errors);
                } else if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                    validate(item, additional, &here, errors);
                } else if !preserve {
                    errors.push(format!("{here}: unknown field"));
                }
            }
            true
        }
        Some("array") => {
            let Some(items) = value.as_array() else {
                errors.push(format!("{path}: expected an array, got {value}"));
                return;
            };
            for (i, item) in items.iter().enumerate() {
                validate(item, &schema["items"], &format!("{path}[{i}]"), errors);
            }
            true
        }
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        Some("number") => value.is_number(),
        Some("integer") => {
            let n = value.as_i64().map(i128::from).or_else(|| value.as_u64().map(i128::from));
            let in_bounds = |n: i128| {
                schema["minimum"].as_i64().is_none_or(|min| n >= i128::from(min))
                    && schema["maximum"].as_i64().is_none_or(|max| n <= i128::from(max))
            };
            n.is_some_and(in_bounds)
        }
        None => preserve || (schema["x-kubernetes-int-or-string"] == true && (value.is_string() || value.is_i64())),
        Some(other) => {
            errors.push(format!("{path}: schema type {other}"));
            true
        }
    };
    if !ok {
        errors.push(format!("{path}: {value} does not match type {}", schema["type"]));
    }
}

fn corpus_objects() -> Vec<(PathBuf, Value)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-common/tests/valid");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("mesh-common/tests/valid") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read corpus file");
        for doc in documents(&text) {
            if doc["kind"] == "List" {
                out.extend(doc["items"].as_array().into_iter().flatten().map(|item| (path.clone(), item.clone())));
            } else {
                out.push((path.clone(), doc));
            }
        }
    }
    out
}

#[test]
fn the_crds_accept_the_istio_manifests_of_the_configuration_corpus() {
    let crds = crds();
    let mut checked = BTreeSet::new();
    let mut errors = Vec::new();
    for (path, object) in corpus_objects() {
        let (group, version) = object["apiVersion"].as_str().unwrap_or_default().split_once('/').unwrap_or_default();
        let Some(crd) =
            crds.iter().find(|c| c["spec"]["group"] == group && c["spec"]["names"]["kind"] == object["kind"])
        else {
            continue;
        };
        let name = format!("{}: {}", path.file_name().unwrap().to_string_lossy(), describe(&object));
        let Some(served) =
            crd["spec"]["versions"].as_array().unwrap().iter().find(|v| v["name"] == version && v["served"] == true)
        else {
            errors.push(format!("{name}: version {version} not served"));
            continue;
        };
        let schema = &served["schema"]["openAPIV3Schema"];
        let mut problems = Vec::new();
        for part in ["spec", "status"] {
            if let Some(value) = object.get(part) {
                validate(value, &schema["properties"][part], &format!(".{part}"), &mut problems);
            }
        }
        errors.extend(problems.into_iter().map(|p| format!("{name}: {p}")));
        checked.insert(object["kind"].as_str().unwrap_or_default().to_owned());
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    let all: BTreeSet<String> = CRD_VERSIONS.iter().map(|(kind, _, _, _)| (*kind).to_owned()).collect();
    assert_eq!(checked, all, "the corpus has an object of every kind");
}

#[test]
fn the_schema_check_catches_misspelled_fields_and_bad_enums() {
    let crds = crds();
    let crd = crds.iter().find(|c| c["spec"]["names"]["kind"] == "AuthorizationPolicy").expect("CRD");
    let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let spec = serde_json::json!({
        "action": "PERMIT",
        "rules": [{"from": [{"source": {"principal": ["x"]}}], "when": [{"values": ["a"]}]}],
    });
    let mut errors = Vec::new();
    validate(&spec, schema, ".spec", &mut errors);
    assert_eq!(
        errors,
        [
            ".spec.action: \"PERMIT\" is not one of [String(\"ALLOW\"), String(\"DENY\"), String(\"AUDIT\"), String(\"CUSTOM\")]",
            ".spec.rules[0].from[0].source.principal: unknown field",
            ".spec.rules[0].when[0].key: required",
        ]
    );
}

// ---- RBAC ----

/// One API call the mesh makes: who, API group, resource, verb, and (for namespaced
/// calls limited to one namespace or object) where and which.
#[derive(Clone, Debug)]
struct Call {
    who: &'static str,
    group: &'static str,
    resource: String,
    verb: &'static str,
    namespace: Option<String>,
    name: Option<&'static str>,
}

/// What the controller's Kubernetes source watches (the code's own list).
fn watched() -> impl Iterator<Item = (&'static str, &'static str)> {
    mesh_controller::kube_source::WATCHED.iter().map(|k| (k.group, k.plural))
}

/// The calls of the controller (Kubernetes source, `TokenReview`, leader election,
/// status and events) the agent makes none.
fn calls(install_namespace: &str, agent: bool) -> Vec<Call> {
    let call = |who, group, resource: &str, verb, namespace: Option<&str>, name| Call {
        who,
        group,
        resource: resource.to_owned(),
        verb,
        namespace: namespace.map(str::to_owned),
        name,
    };
    let mut calls = Vec::new();
    for (group, resource) in watched() {
        // A kube-runtime watcher: an initial list, then a watch.
        calls.push(call("mesh-controller", group, resource, "list", None, None));
        calls.push(call("mesh-controller", group, resource, "watch", None, None));
        if group.ends_with("istio.io") {
            calls.push(call("mesh-controller", group, &format!("{resource}/status"), "patch", None, None));
        }
    }
    calls.push(call("mesh-controller", "events.k8s.io", "events", "create", None, None));
    calls.push(call("mesh-controller", "events.k8s.io", "events", "patch", None, None));
    calls.push(call("mesh-controller", "authentication.k8s.io", "tokenreviews", "create", None, None));
    for verb in ["get", "update"] {
        calls.push(call(
            "mesh-controller",
            "coordination.k8s.io",
            "leases",
            verb,
            Some(install_namespace),
            Some("mesh-controller"),
        ));
    }
    // The agent makes no API calls: its node's pods come from the controller.
    let _ = agent;
    calls
}

/// A rule as granted to a service account: by a `ClusterRole` (cluster-wide) or a Role
/// (in its namespace).
struct Grant {
    who: String,
    namespace: Option<String>,
    role: String,
    rule: PolicyRule,
}

fn grants(docs: &[Value], install_namespace: &str) -> Vec<Grant> {
    let mut grants = Vec::new();
    for doc in docs {
        let (role_kind, subjects, role_ref, namespace) = match doc["kind"].as_str() {
            Some("ClusterRoleBinding") => {
                let binding: ClusterRoleBinding = typed(doc);
                ("ClusterRole", binding.subjects.unwrap_or_default(), binding.role_ref, None)
            }
            Some("RoleBinding") => {
                let binding: RoleBinding = typed(doc);
                ("Role", binding.subjects.unwrap_or_default(), binding.role_ref, binding.metadata.namespace)
            }
            _ => continue,
        };
        assert_eq!(role_ref.kind, role_kind, "{}", describe(doc));
        let rules: Vec<PolicyRule> = if role_kind == "ClusterRole" {
            let role: ClusterRole =
                typed(find(docs, "ClusterRole", &role_ref.name).expect("bound ClusterRole is rendered"));
            role.rules.unwrap_or_default()
        } else {
            let role: Role = typed(find(docs, "Role", &role_ref.name).expect("bound Role is rendered"));
            assert_eq!(role.metadata.namespace, namespace);
            role.rules.unwrap_or_default()
        };
        for subject in subjects {
            assert_eq!(subject.kind, "ServiceAccount");
            assert_eq!(subject.namespace.as_deref(), Some(install_namespace), "{}", describe(doc));
            for rule in &rules {
                grants.push(Grant {
                    who: subject.name.clone(),
                    namespace: namespace.clone(),
                    role: role_ref.name.clone(),
                    rule: rule.clone(),
                });
            }
        }
    }
    grants
}

fn allows(grant: &Grant, call: &Call, group: &str, resource: &str, verb: &str) -> bool {
    grant.who == call.who
        && grant.rule.api_groups.iter().flatten().any(|g| g == group)
        && grant.rule.resources.iter().flatten().any(|r| r == resource)
        && grant.rule.verbs.iter().any(|v| v == verb)
        && (grant.namespace.is_none() || grant.namespace == call.namespace)
        && grant
            .rule
            .resource_names
            .as_ref()
            .is_none_or(|names| call.name.is_some_and(|n| names.iter().any(|x| x == n)))
}

#[test]
fn rbac_allows_exactly_the_api_calls_the_mesh_makes() {
    for sets in VARIANTS {
        let values = Values::from_set_args(sets).expect("valid");
        let docs = documents(&render(sets));
        let grants = grants(&docs, &values.namespace);
        let calls = calls(&values.namespace, values.agent.enabled);
        for call in &calls {
            assert!(
                grants.iter().any(|g| allows(g, call, call.group, &call.resource, call.verb)),
                "--set {sets:?}: {call:?} is not allowed"
            );
        }
        for grant in &grants {
            let rule = &grant.rule;
            assert!(rule.non_resource_urls.is_none(), "{}: no non-resource URLs", grant.role);
            for group in rule.api_groups.iter().flatten() {
                for resource in rule.resources.iter().flatten() {
                    assert_ne!(resource, "secrets", "{}: no Secrets", grant.role);
                    for verb in &rule.verbs {
                        assert!(
                            ![group, resource, verb].contains(&&"*".to_owned()),
                            "{}: no wildcards ({group:?}/{resource}/{verb})",
                            grant.role
                        );
                        assert!(
                            calls.iter().any(|call| allows(grant, call, group, resource, verb)
                                && call.group == group
                                && call.resource == *resource
                                && call.verb == verb),
                            "--set {sets:?}: role {} grants {} {verb} on {group:?}/{resource}, which nothing calls",
                            grant.role,
                            grant.who
                        );
                    }
                }
            }
        }
        let bound: BTreeSet<&str> = grants.iter().map(|g| g.who.as_str()).collect();
        let expected = BTreeSet::from(["mesh-controller"]);
        assert_eq!(bound, expected, "--set {sets:?}: only the controller has API access");
        let lease = find(&docs, "Lease", "mesh-controller").expect("the Lease the Role names is rendered");
        assert_eq!(lease["metadata"]["namespace"], values.namespace.as_str());
    }
}

// ---- --set errors ----

fn error(sets: &[&str]) -> String {
    manifest::generate(sets).expect_err("refused").to_string()
}

#[test]
fn bad_set_arguments_name_the_key_and_what_it_accepts() {
    let unknown = error(&["controller.replica=2"]);
    assert!(
        unknown
            .starts_with("--set controller.replica=2: unknown key 'controller.replica'; accepted keys: profile, hub,"),
        "{unknown}"
    );
    assert!(unknown.contains("controller.replicas") && unknown.contains("waypoint.enabled"), "{unknown}");
    assert_eq!(
        error(&["profile=large"]),
        "--set profile=large: bad value for 'profile': expected one of default, demo, minimal"
    );
    assert_eq!(
        error(&["controller.replicas=0"]),
        "--set controller.replicas=0: bad value for 'controller.replicas': expected an integer from 1 to 100"
    );
    assert_eq!(
        error(&["agent.logLevel=verbose"]),
        "--set agent.logLevel=verbose: bad value for 'agent.logLevel': expected one of trace, debug, info, warn, error"
    );
    assert!(error(&["agent.excludePorts=22,70000"]).starts_with("--set agent.excludePorts=22,70000: bad value for 'agent.excludePorts': expected a comma-separated list of ports"));
    assert!(error(&["namespace=Mesh_System"]).contains("bad value for 'namespace': expected a namespace name"));
    assert!(error(&["waypoint.enabled=yes"]).ends_with("expected true or false"));
    assert!(error(&["hub=evil\"quote"]).contains("bad value for 'hub'"));
    assert!(error(&["tag=-rc1"]).contains("bad value for 'tag'"));
    assert!(error(&["trustDomain=cluster..local"]).contains("bad value for 'trustDomain'"));
    assert_eq!(error(&["profile"]), "--set profile: expected KEY=VALUE");
    assert_eq!(
        manifest::generate(&["profile=large"]),
        Err(ManifestError::BadValue {
            key: "profile",
            value: "large".into(),
            expected: "one of default, demo, minimal",
        })
    );
}

fn meshctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl")).args(args).output().expect("run meshctl")
}

#[test]
fn meshctl_manifest_generate_prints_the_install_and_exits_2_on_a_bad_set() {
    let out = meshctl(&["manifest", "generate", "--set", "profile=demo", "-s", "waypoint.namespace=shop"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8(out.stdout).expect("UTF-8");
    assert_eq!(yaml, render(&["profile=demo", "waypoint.namespace=shop"]));

    let out = meshctl(&["manifest", "generate", "--set", "agent.loglevel=debug"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "nothing half-rendered on stdout");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(
            "meshctl manifest generate: --set agent.loglevel=debug: unknown key 'agent.loglevel'; accepted keys:"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    let help = meshctl(&["manifest", "generate", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    for (key, _) in manifest::KEYS {
        assert!(help.contains(key), "--help lists {key}:\n{help}");
    }
}

// ---- Grafana dashboard ----

#[test]
fn the_grafana_dashboard_queries_the_istio_and_mesh_metrics_by_their_labels() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/mesh-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    let ids: BTreeSet<u64> = panels.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
    let exprs: Vec<&str> = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str())
        .collect();
    for metric in [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_sent_bytes_total",
        "istio_tcp_received_bytes_total",
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "mesh_agent_certificate_expiry_timestamp_seconds",
        "mesh_agent_certificate_renewal_failures_total",
        "mesh_controller_config_version",
        "mesh_controller_config_rejections_total",
        "mesh_controller_connected_agents",
    ] {
        assert!(exprs.iter().any(|e| e.contains(metric)), "a panel queries {metric}");
    }
    let labels = [
        "reporter",
        "source_workload",
        "source_workload_namespace",
        "destination_workload",
        "destination_workload_namespace",
        "destination_service",
        "connection_security_policy",
        "response_flags",
        "response_code",
        "identity",
        "le",
    ];
    for expr in &exprs {
        for grouping in expr.split("by (").skip(1) {
            for label in grouping.split(')').next().unwrap_or_default().split(',') {
                assert!(labels.contains(&label.trim()), "unknown label {label} in {expr}");
            }
        }
    }
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
    }
}
