//! `meshctl waypoint`: declares a namespace's waypoint the way `istioctl waypoint`
//! does, with a Gateway API `Gateway` of class `istio-waypoint` and one listener
//! `{name: mesh, port: 15008, protocol: HBONE}`, labelled `istio.io/waypoint-for`.
//!
//! `generate` prints it, `apply` creates or updates it through the API server
//! (server-side apply, field manager `meshctl`) and, with `--enroll-namespace`, labels
//! the namespace `istio.io/use-waypoint=<name>`; `list` shows the waypoints declared in
//! the cluster. The objects are built and read here as values ([`gateway`],
//! [`waypoint_rows`]) so that everything but the API calls is tested without a cluster.
use std::fmt::Write as _;

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams},
};
use mesh_common::config::gateway::{USE_WAYPOINT_LABEL, WAYPOINT_CLASS, WAYPOINT_FOR_LABEL, WAYPOINT_PORT};
use serde_json::{Value, json};

/// The listener name Istio gives a waypoint's HBONE listener.
pub const LISTENER_NAME: &str = "mesh";
/// Field manager of `meshctl`'s server-side applies.
const FIELD_MANAGER: &str = "meshctl";

/// Which traffic a waypoint takes (`istio.io/waypoint-for`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WaypointFor {
    /// Traffic to the services that use it (Istio's default).
    #[default]
    Service,
    /// Traffic to the workloads (pods) that use it.
    Workload,
    /// Both.
    All,
    /// None: declared but unused.
    None,
}

impl WaypointFor {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Workload => "workload",
            Self::All => "all",
            Self::None => "none",
        }
    }
}

/// A waypoint to declare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub namespace: String,
    /// The Gateway's name (and, by Istio's convention, its pods' `ServiceAccount`).
    pub name: String,
    pub waypoint_for: WaypointFor,
}

#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error("{flag} {value}: not a valid name: expected 1 to 63 of a-z, 0-9, '-', starting and ending alphanumeric")]
    BadName { flag: &'static str, value: String },
    #[error("no cluster to talk to ($KUBECONFIG, ~/.kube/config or in-cluster credentials)")]
    NoCluster {
        #[source]
        source: kube::Error,
    },
    #[error("cannot {action}")]
    Api {
        action: String,
        #[source]
        source: kube::Error,
    },
}

impl Spec {
    /// A spec whose namespace and name are valid DNS labels (they land in YAML and in
    /// API paths unquoted).
    pub fn new(namespace: &str, name: &str, waypoint_for: WaypointFor) -> Result<Self, WaypointError> {
        for (flag, value) in [("--namespace", namespace), ("--name", name)] {
            if !is_dns_label(value) {
                return Err(WaypointError::BadName { flag, value: value.to_owned() });
            }
        }
        Ok(Self { namespace: namespace.to_owned(), name: name.to_owned(), waypoint_for })
    }
}

fn is_dns_label(value: &str) -> bool {
    (1..=63).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-')
}

/// The `Gateway` object that declares the waypoint.
pub fn gateway(spec: &Spec) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": { WAYPOINT_FOR_LABEL: spec.waypoint_for.as_str() },
        },
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{ "name": LISTENER_NAME, "port": WAYPOINT_PORT, "protocol": "HBONE" }],
        },
    })
}

/// `meshctl waypoint generate`: the `Gateway` as YAML, in the layout `istioctl
/// waypoint generate` prints (keys sorted). Every value is a DNS label or a constant,
/// so none needs quoting.
pub fn generate_yaml(spec: &Spec) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "apiVersion: gateway.networking.k8s.io/v1\n\
         kind: Gateway\n\
         metadata:\n  \
           labels:\n    \
             {WAYPOINT_FOR_LABEL}: {for_}\n  \
           name: {name}\n  \
           namespace: {namespace}\n\
         spec:\n  \
           gatewayClassName: {WAYPOINT_CLASS}\n  \
           listeners:\n  \
           - name: {LISTENER_NAME}\n    \
             port: {WAYPOINT_PORT}\n    \
             protocol: HBONE\n",
        for_ = spec.waypoint_for.as_str(),
        name = spec.name,
        namespace = spec.namespace,
    );
    out
}

/// The merge patch that makes a namespace use waypoint `name` (`--enroll-namespace`).
pub fn enroll_patch(name: &str) -> Value {
    json!({ "metadata": { "labels": { USE_WAYPOINT_LABEL: name } } })
}

fn gateway_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"), "gateways")
}

/// A client from `$KUBECONFIG`, `~/.kube/config` or the in-cluster credentials.
pub async fn client() -> Result<Client, WaypointError> {
    Client::try_default().await.map_err(|source| WaypointError::NoCluster { source })
}

/// `meshctl waypoint apply`: creates or updates the `Gateway`, then labels the
/// namespace when `enroll_namespace`.
pub async fn apply(client: &Client, spec: &Spec, enroll_namespace: bool) -> Result<(), WaypointError> {
    let gateways: Api<DynamicObject> = Api::namespaced_with(client.clone(), &spec.namespace, &gateway_resource());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    gateways.patch(&spec.name, &params, &Patch::Apply(gateway(spec))).await.map_err(|source| {
        // 404 for the whole kind: the Gateway API CRDs are missing (not the object).
        let hint = if matches!(&source, kube::Error::Api(status) if status.code == 404) {
            " (are the Gateway API CRDs installed?)"
        } else {
            ""
        };
        WaypointError::Api { action: format!("apply Gateway {}/{}{hint}", spec.namespace, spec.name), source }
    })?;
    if enroll_namespace {
        let namespaces: Api<Namespace> = Api::all(client.clone());
        namespaces
            .patch(&spec.namespace, &PatchParams::default(), &Patch::Merge(enroll_patch(&spec.name)))
            .await
            .map_err(|source| WaypointError::Api {
                action: format!("label namespace {} {USE_WAYPOINT_LABEL}={}", spec.namespace, spec.name),
                source,
            })?;
    }
    Ok(())
}

/// `meshctl waypoint list`: the `Gateway`s of one namespace, or of all, as JSON objects.
pub async fn list(client: &Client, namespace: Option<&str>) -> Result<Vec<Value>, WaypointError> {
    let resource = gateway_resource();
    let gateways: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let listed = gateways.list(&ListParams::default()).await.map_err(|source| WaypointError::Api {
        action: format!("list Gateways in {}", namespace.unwrap_or("all namespaces")),
        source,
    })?;
    Ok(listed.items.into_iter().filter_map(|g| serde_json::to_value(g).ok()).collect())
}

/// One declared waypoint, as `meshctl waypoint list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub namespace: String,
    pub name: String,
    pub waypoint_for: String,
    /// The `Programmed` condition's status, when something reported one.
    pub programmed: String,
}

/// The waypoints among `gateways` (class `istio-waypoint`), sorted.
pub fn waypoint_rows(gateways: &[Value]) -> Vec<Row> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let mut rows: Vec<Row> = gateways
        .iter()
        .filter(|g| g["spec"]["gatewayClassName"] == WAYPOINT_CLASS)
        .map(|g| Row {
            namespace: text(&g["metadata"]["namespace"]),
            name: text(&g["metadata"]["name"]),
            waypoint_for: g["metadata"]["labels"][WAYPOINT_FOR_LABEL].as_str().unwrap_or("service").to_owned(),
            programmed: g["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Programmed")
                .map_or_else(|| "-".to_owned(), |c| text(&c["status"])),
        })
        .collect();
    rows.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    rows
}

/// The table `meshctl waypoint list` prints.
pub fn render_rows(rows: &[Row]) -> String {
    if rows.is_empty() {
        return "no waypoints (Gateways of class istio-waypoint)\n".to_owned();
    }
    let mut out = format!("{:<20} {:<24} {:<10} PROGRAMMED\n", "NAMESPACE", "NAME", "FOR");
    for row in rows {
        let _ = writeln!(out, "{:<20} {:<24} {:<10} {}", row.namespace, row.name, row.waypoint_for, row.programmed);
    }
    out
}

#[cfg(test)]
mod tests {
    use mesh_common::config::{Source, load};

    use super::*;

    fn loaded(yaml: &str) -> mesh_common::config::Config {
        load(&[Source { name: "waypoint.yaml".into(), text: yaml.to_owned() }]).expect("the mesh accepts it")
    }

    #[test]
    fn generate_prints_a_gateway_the_mesh_reads_as_that_waypoint() {
        for (waypoint_for, label) in [
            (WaypointFor::Service, "service"),
            (WaypointFor::Workload, "workload"),
            (WaypointFor::All, "all"),
            (WaypointFor::None, "none"),
        ] {
            let spec = Spec::new("shop", "shop-wp", waypoint_for).unwrap();
            let config = loaded(&generate_yaml(&spec));
            assert_eq!(config.gateways.len(), 1);
            let declared = &config.gateways[0];
            assert!(declared.is_waypoint());
            assert_eq!((declared.metadata.namespace.as_str(), declared.metadata.name.as_str()), ("shop", "shop-wp"));
            assert_eq!(declared.spec.gateway_class_name, "istio-waypoint");
            assert_eq!(declared.waypoint_for(), label);
            assert_eq!(declared.metadata.labels.get(WAYPOINT_FOR_LABEL).map(String::as_str), Some(label));
            let listeners: Vec<_> =
                declared.spec.listeners.iter().map(|l| (l.name.as_str(), l.port, l.protocol.as_str())).collect();
            assert_eq!(listeners, [("mesh", 15008, "HBONE")]);
            // The YAML and the object `apply` sends are the same Gateway.
            assert_eq!(loaded(&gateway(&spec).to_string()).gateways, config.gateways);
        }
    }

    #[test]
    fn bad_names_are_refused_with_the_flag_and_value() {
        for (namespace, name, flag) in [
            ("Shop", "waypoint", "--namespace"),
            ("shop", "", "--name"),
            ("shop", "a: b", "--name"),
            ("-x", "w", "--namespace"),
        ] {
            let error = Spec::new(namespace, name, WaypointFor::Service).unwrap_err().to_string();
            assert!(error.starts_with(flag), "{error}");
        }
        assert!(Spec::new("shop", &"a".repeat(63), WaypointFor::Service).is_ok());
        assert!(Spec::new("shop", &"a".repeat(64), WaypointFor::Service).is_err());
    }

    #[test]
    fn enrolling_labels_the_namespace_with_the_waypoint() {
        assert_eq!(enroll_patch("wp")["metadata"]["labels"]["istio.io/use-waypoint"], "wp");
    }

    #[test]
    fn list_shows_only_waypoints_sorted_with_their_state() {
        let mut programmed = gateway(&Spec::new("shop", "b", WaypointFor::All).unwrap());
        programmed["status"] =
            json!({"conditions": [{"type": "Accepted", "status": "True"}, {"type": "Programmed", "status": "False"}]});
        let mut ingress = gateway(&Spec::new("shop", "ingress", WaypointFor::Service).unwrap());
        ingress["spec"]["gatewayClassName"] = "istio".into();
        let mut unlabelled = gateway(&Spec::new("app", "a", WaypointFor::Service).unwrap());
        unlabelled["metadata"]["labels"] = json!({});
        let rows = waypoint_rows(&[programmed, ingress, unlabelled]);
        let names: Vec<_> = rows
            .iter()
            .map(|r| (r.namespace.as_str(), r.name.as_str(), r.waypoint_for.as_str(), r.programmed.as_str()))
            .collect();
        assert_eq!(names, [("app", "a", "service", "-"), ("shop", "b", "all", "False")]);
        let table = render_rows(&rows);
        assert_eq!(table.lines().count(), 3, "{table}");
        assert!(table.lines().next().unwrap().starts_with("NAMESPACE"), "{table}");
        assert!(render_rows(&[]).starts_with("no waypoints"));
    }
}
