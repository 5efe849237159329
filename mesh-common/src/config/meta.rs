//! What every kind shares: object metadata, selectors, policy target references and
//! the small value types (`IntOrString`) that Kubernetes and Istio schemas reuse.
use std::{collections::BTreeMap, fmt, prelude::rust_2024::*};

use serde::{Deserialize, Deserializer, Serialize, de};

/// Labels (and annotations): key -> value, sorted so that serialization is stable.
pub type Labels = BTreeMap<String, String>;

/// The part of Kubernetes' `ObjectMeta` the mesh reads.
///
/// Unknown fields (`resourceVersion`, `managedFields`, ...) are tolerated, not
/// rejected: exported objects carry them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    /// Empty for cluster-scoped kinds; the loader sets `default` on namespaced kinds
    /// that do not name one.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    /// The API server's unique id of the object (pods: what the node agent finds the
    /// pod's processes by). Empty in hand-written manifests.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "String::is_empty")]
    pub uid: String,
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: Labels,
    /// RFC 3339 as the API server writes it (`2026-11-18T09:45:11Z`, so that text order
    /// is time order); empty in hand-written manifests. Where Istio lets the oldest of
    /// several objects win, age decides here too, then the name.
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "String::is_empty")]
    pub creation_timestamp: String,
}

impl ObjectMeta {
    /// Oldest first (Istio's order where objects compete), then by namespace and name;
    /// without creation times (manifests from files), by namespace and name.
    pub fn age_order(&self, other: &Self) -> std::cmp::Ordering {
        (&self.creation_timestamp, &self.namespace, &self.name).cmp(&(
            &other.creation_timestamp,
            &other.namespace,
            &other.name,
        ))
    }
}

/// Istio's `WorkloadSelector` (and the `matchLabels` half of a Kubernetes
/// `LabelSelector`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: Labels,
}

/// Istio's `networking.istio.io` `WorkloadSelector` (of a `ServiceEntry`, `Sidecar`,
/// `EnvoyFilter`): the labels sit directly under `labels`, not under `matchLabels` as in
/// the `security.istio.io` kinds' [`WorkloadSelector`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelsSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub labels: Labels,
}

/// Istio's `PolicyTargetReference` / Gateway API's `ParentReference`-like target.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    #[serde(default, deserialize_with = "nullable")]
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(default, deserialize_with = "nullable", skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

/// Kubernetes' `IntOrString` (a Service's `targetPort`: `8080` or `http`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i64::try_from(v).map(IntOrString::Int).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.into()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Self::Int(n) => write!(f, "{n}"),
            Self::String(s) => f.write_str(s),
        }
    }
}

/// Istio's `Percent` (`{value: 12.5}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Percent {
    pub value: f64,
}

/// Reads an explicit `null` (an empty YAML key: `labels:`) as the default, the way
/// Kubernetes treats it, instead of failing with "invalid type: null".
pub(crate) fn nullable<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Option::<T>::deserialize(deserializer).map(Option::unwrap_or_default)
}

/// Reads a map keyed by port number whose keys may be integers (`8080:` in YAML) or
/// strings (`"8080":`, which is how the Kubernetes API and `kubectl get -o yaml` write
/// the keys of a protobuf `map<uint32, ...>`).
pub(crate) fn port_keyed<'de, D, V>(deserializer: D) -> Result<BTreeMap<u32, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    let map = Option::<BTreeMap<PortKey, V>>::deserialize(deserializer)?.unwrap_or_default();
    Ok(map.into_iter().map(|(k, v)| (k.0, v)).collect())
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct PortKey(u32);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = PortKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortKey, E> {
                u32::try_from(v).map(PortKey).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortKey, E> {
                u32::try_from(v).map(PortKey).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortKey, E> {
                v.parse().map(PortKey).map_err(|_| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}
