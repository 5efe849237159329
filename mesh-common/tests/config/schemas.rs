//! Istio's and Gateway API's published CRD schemas (pinned in `deploy/`, refreshed by
//! `deploy/refresh-crds.py`) are the reference for fields: every field of every kind
//! the mesh models is either decoded by the model, or listed in
//! `config::NOT_ENFORCED` and then accepted with a warning. A field that is neither
//! would turn a valid manifest into an "unknown field" error.
use std::{
    fs,
    path::{Path, PathBuf},
};

use mesh_common::config::{self, Source};
use serde_json::{Map, Value, json};

fn deploy(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(dir)
}

/// The CRD files: Istio's served kinds and Gateway API's modelled ones.
fn crds() -> Vec<(PathBuf, Value)> {
    let mut files: Vec<PathBuf> = ["crds", "gateway-api"]
        .iter()
        .flat_map(|d| fs::read_dir(deploy(d)).expect("deploy dir").map(|e| e.expect("entry").path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = fs::read_to_string(&p).expect("CRD file");
            let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("CRD YAML");
            (p, serde_json::to_value(yaml).expect("CRD as JSON"))
        })
        .collect()
}

/// A value the schema accepts for a leaf.
fn sample(schema: &Value) -> Value {
    if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
        return first.clone();
    }
    if schema["x-kubernetes-int-or-string"] == true {
        return json!(1);
    }
    match schema["type"].as_str() {
        Some("string") => match schema["format"].as_str() {
            Some("duration") => json!("1s"),
            _ => json!("x"),
        },
        Some("integer" | "number") => json!(1),
        Some("boolean") => json!(true),
        Some("array") => json!([]),
        _ => json!({}),
    }
}

/// Every field path under `schema` (`spec.a[].b.*.c`: `[]` a list item, `*` a map
/// value), each with a `spec` that sets just that field.
fn paths(schema: &Value, path: &str, wrap: &dyn Fn(Value) -> Value, out: &mut Vec<(String, Value)>) {
    if let Some(properties) = schema["properties"].as_object() {
        for (name, property) in properties {
            let child = format!("{path}.{name}");
            let name = name.clone();
            let wrap_child = move |v: Value| {
                let mut m = Map::new();
                m.insert(name.clone(), v);
                Value::Object(m)
            };
            out.push((child.clone(), wrap(wrap_child(sample(property)))));
            let wrap_deeper = |v: Value| wrap(wrap_child(v));
            descend(property, &child, &wrap_deeper, out);
        }
    }
}

fn descend(schema: &Value, path: &str, wrap: &dyn Fn(Value) -> Value, out: &mut Vec<(String, Value)>) {
    match schema["type"].as_str() {
        Some("array") => {
            let items = &schema["items"];
            let wrap_item = |v: Value| wrap(json!([v]));
            if items["properties"].is_object() {
                paths(items, &format!("{path}[]"), &wrap_item, out);
            }
        }
        Some("object") if schema["additionalProperties"].is_object() => {
            let values = &schema["additionalProperties"];
            let wrap_value = |v: Value| wrap(json!({ "k": v }));
            if values["properties"].is_object() {
                paths(values, &format!("{path}.*"), &wrap_value, out);
            }
        }
        _ => paths(schema, path, wrap, out),
    }
}

#[test]
fn every_schema_field_is_modelled_or_accepted_with_a_warning() {
    let mut unknown = Vec::new();
    let mut unwarned = Vec::new();
    let mut probed = 0;
    for (file, crd) in crds() {
        let kind = crd["spec"]["names"]["kind"].as_str().expect("kind");
        let group = crd["spec"]["group"].as_str().expect("group");
        let versions = crd["spec"]["versions"].as_array().expect("versions");
        // The newest served version: `v1` where there is one.
        let version = versions.iter().find(|v| v["name"] == "v1").or_else(|| versions.first()).expect("a version");
        let schema = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let api_version = format!("{group}/{}", version["name"].as_str().expect("name"));
        let mut fields = Vec::new();
        paths(schema, "spec", &|v| v, &mut fields);
        assert!(!fields.is_empty(), "{}: no spec fields", file.display());
        for (path, spec) in fields {
            probed += 1;
            let doc = json!({"apiVersion": api_version, "kind": kind,
                "metadata": {"name": "probe", "namespace": "default"}, "spec": spec});
            let not_enforced = config::NOT_ENFORCED.iter().any(|(k, p)| *k == kind && covers(p, &path));
            let result = config::load(&[Source::new("probe.json", doc.to_string())]);
            let problems = match &result {
                Ok(_) => Vec::new(),
                Err(report) => report.0.clone(),
            };
            if problems.iter().any(|p| p.reason.starts_with("unknown field")) {
                unknown.push(format!("{kind} {path}"));
            } else if not_enforced {
                let warned = match &result {
                    Ok(c) => c.warnings.iter().any(|w| w.reason.contains("not enforced")),
                    // Other problems (values the probe made up) say nothing about warnings.
                    Err(_) => true,
                };
                if !warned {
                    unwarned.push(format!("{kind} {path}"));
                }
            }
        }
    }
    assert!(probed > 500, "only {probed} fields probed");
    assert!(
        unknown.is_empty(),
        "fields of the pinned CRD schemas the model rejects as unknown (model them, or list them in NOT_ENFORCED):\n{}",
        unknown.join("\n")
    );
    assert!(unwarned.is_empty(), "not-enforced fields accepted without a warning:\n{}", unwarned.join("\n"));
}

/// `pattern` (a `NOT_ENFORCED` path) covers `path` when it is the path or an ancestor.
fn covers(pattern: &str, path: &str) -> bool {
    path.strip_prefix(pattern).is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

#[test]
fn every_not_enforced_entry_is_a_field_of_the_schemas() {
    let mut all = Vec::new();
    for (_, crd) in crds() {
        let kind = crd["spec"]["names"]["kind"].as_str().expect("kind").to_owned();
        let versions = crd["spec"]["versions"].as_array().expect("versions");
        let version = versions.iter().find(|v| v["name"] == "v1").or_else(|| versions.first()).expect("a version");
        let mut fields = Vec::new();
        paths(&version["schema"]["openAPIV3Schema"]["properties"]["spec"], "spec", &|v| v, &mut fields);
        all.extend(fields.into_iter().map(|(p, _)| (kind.clone(), p)));
    }
    for (kind, path) in config::NOT_ENFORCED {
        assert!(
            all.iter().any(|(k, p)| k == kind && p == path),
            "NOT_ENFORCED entry {kind} {path} is not in the schemas"
        );
    }
}
