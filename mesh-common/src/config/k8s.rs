//! The Kubernetes core kinds the mesh reads: `Namespace`, `Service`, `Pod`.
//!
//! `Service` lists every field of Kubernetes' `ServiceSpec` so that a typo is caught
//! like in the Istio kinds. `PodSpec` and the statuses are huge and the mesh reads a
//! handful of their fields, so they tolerate what they do not name.
use std::prelude::rust_2024::*;

use serde::{Deserialize, Serialize};

use super::meta::{IntOrString, Labels, ObjectMeta, nullable};

/// Namespace label that enrolls a namespace (`ambient`) or a pod (`ambient`, or `none`
/// to opt a pod out of a meshed namespace).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// Namespace, service or pod label naming the waypoint that serves it.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// Annotation Istio's injector leaves on pods that run a sidecar; ambient skips them.
pub const SIDECAR_STATUS_ANNOTATION: &str = "sidecar.istio.io/status";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Namespace {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NamespaceSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Service {
    pub metadata: ObjectMeta,
    pub spec: ServiceSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceSpec {
    /// `ClusterIP` (the default when absent), `NodePort`, `LoadBalancer`, `ExternalName`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, rename = "clusterIP", skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs", deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<ServicePort>,
    /// Absent: the Service selects no pods (its endpoints are managed elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Labels>,
    #[serde(default, rename = "externalIPs", deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<serde_json::Value>,
    #[serde(default, rename = "loadBalancerIP", skip_serializing_if = "Option::is_none")]
    pub load_balancer_ip: Option<String>,
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer_class: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocate_load_balancer_node_ports: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_not_ready_addresses: Option<bool>,
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub ip_families: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_family_policy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u32,
    /// Defaults to `port` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<IntOrString>,
    /// `TCP` (the default), `UDP`, `SCTP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u32>,
}

/// Label an `EndpointSlice` names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `discovery.k8s.io/v1` `EndpointSlice`: a Service's endpoints as the cluster keeps
/// them (addresses, readiness, ports), including endpoints that are not pods of the
/// view and Services without a selector. Written by controllers, not people, so
/// fields the mesh does not read are tolerated.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN`.
    #[serde(default)]
    pub address_type: String,
    #[serde(default, deserialize_with = "nullable")]
    pub endpoints: Vec<SliceEndpoint>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<SlicePort>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    #[serde(default, deserialize_with = "nullable")]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: EndpointConditions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// Absent conditions mean "unknown", which Kubernetes says to read as ready.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EndpointConditions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlicePort {
    /// Matches the name of the Service port (both empty for a single unnamed port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

impl EndpointSlice {
    /// The Service this slice belongs to.
    pub fn service_name(&self) -> Option<&str> {
        self.metadata.labels.get(SERVICE_NAME_LABEL).map(String::as_str)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

/// The fields of Kubernetes' `PodSpec` the mesh reads; the others are tolerated.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Deprecated alias of `serviceAccountName` that old manifests still carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub host_network: bool,
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub containers: Vec<Container>,
    /// Init containers; those with `restartPolicy: Always` are native sidecars that
    /// serve ports and are probed like containers.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<Container>,
}

impl PodSpec {
    /// The pod's service account (`default` when none is named, as in Kubernetes).
    pub fn service_account(&self) -> &str {
        self.service_account_name
            .as_deref()
            .or(self.service_account.as_deref())
            .filter(|sa| !sa.is_empty())
            .unwrap_or("default")
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub name: String,
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<Probe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup_probe: Option<Probe>,
}

/// The part of a container probe that says where kubelet connects (`exec` probes
/// connect nowhere). Timings and paths are tolerated, not kept.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<ProbePort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<ProbePort>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcProbe>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProbePort {
    /// A number, or the name of one of the container's ports.
    pub port: IntOrString,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GrpcProbe {
    pub port: i64,
}

/// Named container ports resolve a Service's string `targetPort`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub container_port: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs", deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default, rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PodCondition>,
}

/// One of `status.conditions` (`Ready`, `ContainersReady`, ...); only type and status
/// are kept.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PodCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

impl Pod {
    /// Every address of the pod (`status.podIPs`, or `status.podIP` alone), deduplicated
    /// in order.
    pub fn ips(&self) -> Vec<&str> {
        let mut ips: Vec<&str> = Vec::new();
        let all =
            self.status.pod_ip.iter().map(String::as_str).chain(self.status.pod_ips.iter().map(|ip| ip.ip.as_str()));
        for ip in all {
            if !ip.is_empty() && !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        ips
    }

    /// Whether the pod has finished (`Succeeded` or `Failed`): it runs nothing any
    /// more, though its object may stay for days (a completed Job's).
    pub fn has_ended(&self) -> bool {
        matches!(self.status.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    /// Whether the pod takes traffic as a service endpoint: its `Ready` condition is
    /// `True`, or the pod reports no conditions at all (hand-written manifests).
    pub fn is_ready(&self) -> bool {
        self.status.conditions.iter().find(|c| c.type_ == "Ready").is_none_or(|c| c.status == "True")
    }

    /// The ports kubelet probes (liveness, readiness, startup: HTTP, TCP and gRPC),
    /// named ports resolved against the pod's container ports; sorted, each once.
    pub fn probe_ports(&self) -> Vec<u16> {
        let mut ports = Vec::new();
        for container in self.spec.containers.iter().chain(&self.spec.init_containers) {
            let probes = [&container.liveness_probe, &container.readiness_probe, &container.startup_probe];
            for probe in probes.into_iter().flatten() {
                let named = probe.http_get.iter().chain(&probe.tcp_socket).map(|p| &p.port);
                for port in named {
                    let number = match port {
                        IntOrString::Int(n) => u16::try_from(*n).ok(),
                        IntOrString::String(name) => container
                            .ports
                            .iter()
                            .find(|p| p.name.as_deref() == Some(name.as_str()))
                            .and_then(|p| u16::try_from(p.container_port).ok()),
                    };
                    ports.extend(number);
                }
                ports.extend(probe.grpc.as_ref().and_then(|g| u16::try_from(g.port).ok()));
            }
        }
        ports.sort_unstable();
        ports.dedup();
        ports.retain(|p| *p != 0);
        ports
    }
}
