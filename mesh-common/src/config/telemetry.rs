//! Istio's `telemetry.istio.io` `Telemetry` kind. Its metric, access-log and tracing
//! blocks follow Istio's large provider schema and are kept as JSON values; the mesh
//! reads what it supports from them.
use std::prelude::rust_2024::*;

use serde::{Deserialize, Serialize};

use super::meta::{ObjectMeta, PolicyTargetReference, WorkloadSelector, nullable};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Telemetry {
    pub metadata: ObjectMeta,
    pub spec: TelemetrySpec,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TelemetrySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<serde_json::Value>,
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub access_logging: Vec<serde_json::Value>,
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "Vec::is_empty")]
    pub tracing: Vec<serde_json::Value>,
}
