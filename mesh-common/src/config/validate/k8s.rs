//! Checks of the Kubernetes core kinds, as the API server would make them (the parts
//! the mesh relies on).
use std::{collections::BTreeSet, prelude::rust_2024::*};

use super::Obj;
use crate::config::{
    k8s::{DATAPLANE_MODE_LABEL, Namespace, Pod, Service},
    meta::{IntOrString, Labels},
    values,
};

fn dataplane_mode(o: &mut Obj, labels: &Labels) {
    if let Some(mode) = labels.get(DATAPLANE_MODE_LABEL)
        && mode != "ambient"
        && mode != "none"
    {
        // A warning, not an error: as in Istio the value counts as unset, and the object
        // (a namespace's other labels, a pod's identity) is not lost over it.
        o.warn(
            format!("metadata.labels[{DATAPLANE_MODE_LABEL:?}]"),
            format!("`{mode}` is not `ambient` or `none`; treated as unset"),
        );
    }
}

pub(super) fn namespace(o: &mut Obj, ns: &Namespace) {
    dataplane_mode(o, &ns.metadata.labels);
}

pub(super) fn service(o: &mut Obj, svc: &Service) {
    let spec = &svc.spec;
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !matches!(type_, "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName") {
        o.err("spec.type", format!("`{type_}` is not ClusterIP, NodePort, LoadBalancer or ExternalName"));
    }
    let headless = spec.cluster_ip.as_deref() == Some("None");
    if spec.ports.is_empty() && type_ != "ExternalName" && !headless {
        o.err("spec.ports", "a Service needs at least one port");
    }
    if let Some(ip) = spec.cluster_ip.as_deref()
        && !ip.is_empty()
        && ip != "None"
    {
        o.ip("spec.clusterIP", ip);
    }
    for (i, ip) in spec.cluster_ips.iter().enumerate() {
        if ip != "None" {
            o.ip(&format!("spec.clusterIPs[{i}]"), ip);
        }
    }
    if let Some(selector) = &spec.selector {
        o.labels("spec.selector", selector);
    }
    let mut names = BTreeSet::new();
    let mut ports = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        o.port(&format!("{field}.port"), port.port);
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !matches!(protocol, "TCP" | "UDP" | "SCTP") {
            o.err(format!("{field}.protocol"), format!("`{protocol}` is not TCP, UDP or SCTP"));
        }
        match &port.name {
            Some(name) if !values::is_dns_label(name) => {
                o.err(format!("{field}.name"), format!("`{name}` is not a valid port name (a DNS label)"));
            }
            Some(name) if !names.insert(name.as_str()) => {
                o.err(format!("{field}.name"), format!("duplicate port name `{name}`"));
            }
            None if spec.ports.len() > 1 => {
                o.err(format!("{field}.name"), "every port needs a name when a Service has more than one");
            }
            _ => {}
        }
        if !ports.insert((port.port, protocol)) {
            o.err(format!("{field}.port"), format!("duplicate port {}/{protocol}", port.port));
        }
        match &port.target_port {
            Some(IntOrString::Int(n)) if !(1..=65535).contains(n) => {
                o.err(format!("{field}.targetPort"), format!("port {n} is out of range 1..=65535"));
            }
            Some(IntOrString::String(name)) if !is_port_name(name) => {
                o.err(
                    format!("{field}.targetPort"),
                    format!("`{name}` is not a port number nor a container port name"),
                );
            }
            _ => {}
        }
        if let Some(node_port) = port.node_port {
            o.port(&format!("{field}.nodePort"), node_port);
        }
    }
}

/// Kubernetes' `IANA_SVC_NAME`: at most 15 lowercase letters, digits and '-', with a letter.
fn is_port_name(name: &str) -> bool {
    name.len() <= 15
        && values::is_dns_label(name)
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.contains("--")
}

pub(super) fn pod(o: &mut Obj, pod: &Pod) {
    dataplane_mode(o, &pod.metadata.labels);
    if let Some(ip) = pod.status.pod_ip.as_deref()
        && !ip.is_empty()
    {
        o.ip("status.podIP", ip);
    }
    for (i, ip) in pod.status.pod_ips.iter().enumerate() {
        o.ip(&format!("status.podIPs[{i}].ip"), &ip.ip);
    }
    for (i, container) in pod.spec.containers.iter().enumerate() {
        for (j, port) in container.ports.iter().enumerate() {
            o.port(&format!("spec.containers[{i}].ports[{j}].containerPort"), port.container_port);
        }
    }
}
