//! The node-local enrollment protocol: what an enroller (CNI plugin, node watcher,
//! the lab harness) sends the agent on its Unix socket, one JSON object per line.
//!
//! Requests: `{"op":"add","pod":{...}}`, `{"op":"remove","uid":"..."}`, `{"op":"list"}`.
//! Responses: `{"ok":true,...}` or `{"ok":false,"error":"..."}`, one line each.
use std::{
    borrow::ToOwned,
    net::IpAddr,
    path::PathBuf,
    string::{String, ToString},
    vec::Vec,
};

use serde::{Deserialize, Serialize};

/// What the enroller tells the agent about a pod.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Path of the pod's network namespace (`/var/run/netns/...` or `/proc/PID/ns/net`).
    pub netns: PathBuf,
}

fn default_service_account() -> String {
    "default".to_owned()
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Add { pod: PodSpec },
    Remove { uid: String },
    List,
}

/// Reads one request line; the error says what is wrong with it.
pub fn parse_request(line: &str) -> Result<Request, String> {
    let request: Request = serde_json::from_str(line).map_err(|e| e.to_string())?;
    if let Request::Add { pod } = &request {
        check_fields(pod).map_err(|field| std::format!("field pod.{field} must not be empty"))?;
    }
    Ok(request)
}

/// The first required field of `spec` that is empty (or only blanks), if any.
pub fn check_fields(spec: &PodSpec) -> Result<(), &'static str> {
    for (field, value) in [("uid", &spec.uid), ("name", &spec.name), ("namespace", &spec.namespace)] {
        if value.trim().is_empty() {
            return Err(field);
        }
    }
    if spec.netns.as_os_str().is_empty() {
        return Err("netns");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_reject_unknown_fields() {
        let add = r#"{"op":"add","pod":{"uid":"u1","name":"p","namespace":"shop","netns":"/run/netns/x"}}"#;
        match parse_request(add).unwrap() {
            Request::Add { pod } => assert_eq!(pod.service_account, "default"),
            other => panic!("unexpected {other:?}"),
        }
        let typo = r#"{"op":"add","pod":{"uid":"u1","name":"p","namespace":"shop","netns":"/x","ip":"1.2.3.4"}}"#;
        assert!(parse_request(typo).unwrap_err().contains("unknown field `ip`"));
        assert!(parse_request(r#"{"op":"explode"}"#).is_err());
        let blank = r#"{"op":"add","pod":{"uid":" ","name":"p","namespace":"shop","netns":"/x"}}"#;
        assert_eq!(parse_request(blank).unwrap_err(), "field pod.uid must not be empty");
    }
}
