//! The Kubernetes manifests of an install, as `meshctl manifest generate` renders them:
//! the CRDs of the Istio kinds the mesh serves, the namespace, RBAC, the controller
//! Deployment and Service, the agent `DaemonSet` and, when asked, a waypoint, in the
//! order `kubectl apply -f -` needs (CRDs, Namespace, RBAC, config, workloads).
//!
//! The manifests are YAML files under `deploy/` embedded with `include_str!`, not
//! objects built in Rust: they are what platform teams read and review, each RBAC rule
//! and privilege carries its justification as a comment (a serializer would drop it),
//! and the CRDs apply on their own with `kubectl`. The templating is deliberately
//! tiny: `{{key}}` placeholders filled with values whose character sets cannot break
//! the YAML they land in (every value is validated here), and lists (container args)
//! rendered here as JSON-quoted YAML items. There is no control flow in the
//! templates: the profile decides which files are rendered.
use std::{collections::BTreeMap, fmt::Write as _};

/// The `CustomResourceDefinition`s, one file per kind, as the pinned Istio release
/// generates them (`deploy/refresh-crds.py`); Gateway API's kinds come from the
/// upstream Gateway API release instead.
pub const CRDS: &[(&str, &str)] = &[
    (
        "authorizationpolicies.security.istio.io.yaml",
        include_str!("../../deploy/crds/authorizationpolicies.security.istio.io.yaml"),
    ),
    (
        "peerauthentications.security.istio.io.yaml",
        include_str!("../../deploy/crds/peerauthentications.security.istio.io.yaml"),
    ),
    (
        "requestauthentications.security.istio.io.yaml",
        include_str!("../../deploy/crds/requestauthentications.security.istio.io.yaml"),
    ),
    (
        "virtualservices.networking.istio.io.yaml",
        include_str!("../../deploy/crds/virtualservices.networking.istio.io.yaml"),
    ),
    (
        "destinationrules.networking.istio.io.yaml",
        include_str!("../../deploy/crds/destinationrules.networking.istio.io.yaml"),
    ),
    (
        "serviceentries.networking.istio.io.yaml",
        include_str!("../../deploy/crds/serviceentries.networking.istio.io.yaml"),
    ),
    (
        "workloadentries.networking.istio.io.yaml",
        include_str!("../../deploy/crds/workloadentries.networking.istio.io.yaml"),
    ),
    ("telemetries.telemetry.istio.io.yaml", include_str!("../../deploy/crds/telemetries.telemetry.istio.io.yaml")),
];

/// A template file of `deploy/templates/`.
#[derive(Clone, Copy, Debug)]
struct Template {
    name: &'static str,
    text: &'static str,
}

macro_rules! template {
    ($file:literal) => {
        Template { name: $file, text: include_str!(concat!("../../deploy/templates/", $file)) }
    };
}

const NAMESPACE: Template = template!("namespace.yaml");
const RBAC_CONTROLLER: Template = template!("rbac-controller.yaml");
const RBAC_AGENT: Template = template!("rbac-agent.yaml");
const CONFIG: Template = template!("config.yaml");
const CONTROLLER: Template = template!("controller.yaml");
const AGENT: Template = template!("agent.yaml");
const WAYPOINT: Template = template!("waypoint.yaml");

/// A bad `--set` argument (or, for `Template`, a bug in a template file).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("--set {arg}: expected KEY=VALUE")]
    Syntax { arg: String },
    #[error("--set {key}={value}: unknown key '{key}'; accepted keys: {accepted}")]
    UnknownKey { key: String, value: String, accepted: String },
    #[error("--set {key}={value}: bad value for '{key}': expected {expected}")]
    BadValue { key: &'static str, value: String, expected: &'static str },
    #[error("template {template}: unknown placeholder '{placeholder}'")]
    Template { template: &'static str, placeholder: String },
}

/// Every key `--set` accepts, with what it accepts.
pub const KEYS: &[(&str, &str)] = &[
    ("profile", "one of default, demo, minimal"),
    (
        "hub",
        "an image registry and path such as ghcr.io/acme or localhost:5000/mesh (a-z, 0-9, '.', '_', '-', '/', ':')",
    ),
    ("image", "an image name such as mesh (a-z, 0-9, '.', '_', '-', '/')"),
    ("tag", "an image tag: 1 to 128 of A-Z, a-z, 0-9, '_', '.', '-', not starting with '.' or '-'"),
    ("namespace", "a namespace name (DNS label: 1 to 63 of a-z, 0-9, '-', starting and ending alphanumeric)"),
    ("controller.replicas", "an integer from 1 to 100"),
    ("controller.logLevel", "one of trace, debug, info, warn, error"),
    ("agent.logLevel", "one of trace, debug, info, warn, error"),
    ("agent.excludePorts", "a comma-separated list of ports from 1 to 65535, such as 22,2379 (empty for none)"),
    ("trustDomain", "a DNS name such as cluster.local"),
    ("rootNamespace", "a namespace name (DNS label: 1 to 63 of a-z, 0-9, '-', starting and ending alphanumeric)"),
    ("waypoint.enabled", "true or false"),
    ("waypoint.name", "a DNS label: 1 to 63 of a-z, 0-9, '-', starting and ending alphanumeric"),
    ("waypoint.namespace", "a namespace name (DNS label: 1 to 63 of a-z, 0-9, '-', starting and ending alphanumeric)"),
];

/// An install profile: which components are rendered and how they are sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Everything: controller (2 replicas), agent on every node.
    Default,
    /// For trying the mesh: 1 controller replica, debug logs, small requests, and a
    /// waypoint (L7 routing and policy are much of what one tries a mesh for; it
    /// needs the Gateway API CRDs and the root certificate in its namespace, which
    /// `deploy/kind/try-on-kind.sh` provides).
    Demo,
    /// The controller, CRDs and RBAC; no agent.
    Minimal,
}

impl Profile {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Demo => "demo",
            Self::Minimal => "minimal",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        match value {
            "default" => Some(Self::Default),
            "demo" => Some(Self::Demo),
            "minimal" => Some(Self::Minimal),
            _ => None,
        }
    }
}

/// Requests and limits of one container (set by the profile).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resources {
    pub requests_cpu: &'static str,
    pub requests_memory: &'static str,
    pub limits_cpu: &'static str,
    pub limits_memory: &'static str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerValues {
    pub replicas: u32,
    pub log_level: &'static str,
    pub resources: Resources,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentValues {
    /// Whether the agent `DaemonSet` (and its RBAC) is rendered; only the profile decides.
    pub enabled: bool,
    pub log_level: &'static str,
    pub log_format: &'static str,
    pub exclude_ports: Vec<u16>,
    pub resources: Resources,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointValues {
    pub enabled: bool,
    pub name: String,
    pub namespace: String,
    pub resources: Resources,
}

/// The values an install is rendered with: a profile's, then each `--set`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Values {
    pub profile: Profile,
    pub hub: String,
    pub image: String,
    pub tag: String,
    pub namespace: String,
    pub trust_domain: String,
    pub root_namespace: String,
    pub controller: ControllerValues,
    pub agent: AgentValues,
    pub waypoint: WaypointValues,
}

const LOG_LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error"];

impl Values {
    /// A profile's values.
    pub fn for_profile(profile: Profile) -> Self {
        let demo = profile == Profile::Demo;
        let small = |cpu_limit, memory_limit| Resources {
            requests_cpu: "20m",
            requests_memory: "64Mi",
            limits_cpu: cpu_limit,
            limits_memory: memory_limit,
        };
        let normal = |cpu_limit, memory_limit| Resources {
            requests_cpu: "100m",
            requests_memory: "128Mi",
            limits_cpu: cpu_limit,
            limits_memory: memory_limit,
        };
        Self {
            profile,
            hub: "localhost".into(),
            image: "mesh".into(),
            tag: env!("CARGO_PKG_VERSION").into(),
            namespace: "mesh-system".into(),
            trust_domain: "cluster.local".into(),
            root_namespace: "istio-system".into(),
            controller: ControllerValues {
                replicas: if demo { 1 } else { 2 },
                log_level: if demo { "debug" } else { "info" },
                resources: if demo { small("500m", "256Mi") } else { normal("1", "512Mi") },
            },
            agent: AgentValues {
                enabled: profile != Profile::Minimal,
                log_level: if demo { "debug" } else { "info" },
                log_format: if demo { "text" } else { "json" },
                exclude_ports: Vec::new(),
                resources: if demo { small("1", "512Mi") } else { normal("2", "1Gi") },
            },
            waypoint: WaypointValues {
                // Only the demo renders one: elsewhere waypoints are per namespace and
                // come from `meshctl waypoint apply` or `--set waypoint.enabled=true`
                // (and the Gateway kind needs the Gateway API CRDs, not installed here).
                enabled: demo,
                name: "waypoint".into(),
                namespace: "default".into(),
                // An idle waypoint holds a view and a few pooled connections.
                resources: Resources {
                    requests_cpu: "50m",
                    requests_memory: "32Mi",
                    limits_cpu: if demo { "1" } else { "2" },
                    limits_memory: if demo { "256Mi" } else { "1Gi" },
                },
            },
        }
    }

    /// Values from `--set KEY=VALUE` arguments: the profile's (the last `profile=`
    /// wins, wherever it stands), then every other key in order.
    pub fn from_set_args<S: AsRef<str>>(args: &[S]) -> Result<Self, ManifestError> {
        let mut pairs = Vec::with_capacity(args.len());
        for arg in args {
            let arg = arg.as_ref();
            let (key, value) = arg.split_once('=').ok_or_else(|| ManifestError::Syntax { arg: arg.to_owned() })?;
            pairs.push((key.trim(), value.trim()));
        }
        let mut profile = Profile::Default;
        for (_, value) in pairs.iter().filter(|(key, _)| *key == "profile") {
            profile = Profile::parse(value).ok_or_else(|| bad("profile", value))?;
        }
        let mut values = Self::for_profile(profile);
        for (key, value) in pairs.into_iter().filter(|(key, _)| *key != "profile") {
            values.set(key, value)?;
        }
        Ok(values)
    }

    /// Sets one key (not `profile`, which chooses the starting values).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ManifestError> {
        match key {
            "hub" => self.hub = checked("hub", value, is_hub)?,
            "image" => self.image = checked("image", value, is_image)?,
            "tag" => self.tag = checked("tag", value, is_tag)?,
            "namespace" => self.namespace = checked("namespace", value, is_dns_label)?,
            "trustDomain" => self.trust_domain = checked("trustDomain", value, is_dns_name)?,
            "rootNamespace" => self.root_namespace = checked("rootNamespace", value, is_dns_label)?,
            "controller.replicas" => {
                self.controller.replicas = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| bad("controller.replicas", value))?;
            }
            "controller.logLevel" => self.controller.log_level = log_level("controller.logLevel", value)?,
            "agent.logLevel" => self.agent.log_level = log_level("agent.logLevel", value)?,
            "agent.excludePorts" => {
                self.agent.exclude_ports = value
                    .split(',')
                    .map(str::trim)
                    .filter(|port| !port.is_empty())
                    .map(|port| port.parse::<u16>().ok().filter(|p| *p != 0))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("agent.excludePorts", value))?;
            }
            "waypoint.enabled" => {
                self.waypoint.enabled = match value {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad("waypoint.enabled", value)),
                };
            }
            "waypoint.name" => self.waypoint.name = checked("waypoint.name", value, is_dns_label)?,
            "waypoint.namespace" => self.waypoint.namespace = checked("waypoint.namespace", value, is_dns_label)?,
            // Starts over from that profile's values (`from_set_args` applies it first).
            "profile" => *self = Self::for_profile(Profile::parse(value).ok_or_else(|| bad("profile", value))?),
            _ => {
                return Err(ManifestError::UnknownKey {
                    key: key.to_owned(),
                    value: value.to_owned(),
                    accepted: KEYS.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", "),
                });
            }
        }
        Ok(())
    }

    /// The image every component runs (one image holds all the binaries).
    pub fn image_ref(&self) -> String {
        format!("{}/{}:{}", self.hub, self.image, self.tag)
    }

    /// The controller's address as agents and waypoints dial it.
    pub fn controller_address(&self) -> String {
        format!("mesh-controller.{}.svc:15012", self.namespace)
    }

    /// The effective values as `KEY=VALUE` lines, the syntax `--set` takes.
    pub fn to_set_lines(&self) -> String {
        let ports = self.agent.exclude_ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let lines = [
            ("profile", self.profile.as_str().to_owned()),
            ("hub", self.hub.clone()),
            ("image", self.image.clone()),
            ("tag", self.tag.clone()),
            ("namespace", self.namespace.clone()),
            ("controller.replicas", self.controller.replicas.to_string()),
            ("controller.logLevel", self.controller.log_level.to_owned()),
            ("agent.logLevel", self.agent.log_level.to_owned()),
            ("agent.excludePorts", ports),
            ("trustDomain", self.trust_domain.clone()),
            ("rootNamespace", self.root_namespace.clone()),
            ("waypoint.enabled", self.waypoint.enabled.to_string()),
            ("waypoint.name", self.waypoint.name.clone()),
            ("waypoint.namespace", self.waypoint.namespace.clone()),
        ];
        lines.iter().fold(String::new(), |mut out, (key, value)| {
            let _ = writeln!(out, "{key}={value}");
            out
        })
    }

    fn controller_args(&self) -> Vec<String> {
        vec![
            "serve".into(),
            // Configuration from the Kubernetes API instead of --config-dir.
            "--kubernetes".into(),
            "--ca-cert=/etc/mesh/ca/root-cert.pem".into(),
            "--ca-key=/etc/mesh/ca/root-key.pem".into(),
            format!("--trust-domain={}", self.trust_domain),
            format!("--root-namespace={}", self.root_namespace),
            "--listen=[::]:15012".into(),
            // Not localhost: the kubelet's readiness probe and Prometheus read it.
            "--admin=[::]:15014".into(),
            "--token-audience=mesh-controller".into(),
            "--lease-name=mesh-controller".into(),
            format!("--lease-namespace={}", self.namespace),
            format!("--log={}", self.controller.log_level),
        ]
    }

    fn agent_args(&self) -> Vec<String> {
        let mut args = vec![
            "run".into(),
            // Enroll the node's meshed pods by itself (pods from the controller's view,
            // network namespaces from the host's process tree: hostPID).
            "--kubernetes".into(),
            format!("--controller={}", self.controller_address()),
            "--token-file=/var/run/secrets/mesh/token".into(),
            "--root-cert=/var/run/secrets/mesh/root-cert.pem".into(),
            "--cgroup-root=/host/sys/fs/cgroup".into(),
            format!("--log={}", self.agent.log_level),
            format!("--log-format={}", self.agent.log_format),
        ];
        if !self.agent.exclude_ports.is_empty() {
            let ports = self.agent.exclude_ports.iter().map(u16::to_string).collect::<Vec<_>>();
            args.push(format!("--exclude-port={}", ports.join(",")));
        }
        args
    }

    fn waypoint_args(&self) -> Vec<String> {
        vec![
            format!("--namespace={}", self.waypoint.namespace),
            format!("--name={}", self.waypoint.name),
            // Istio's convention, and what the controller checks the token against.
            format!("--service-account={}", self.waypoint.name),
            format!("--controller={}", self.controller_address()),
            "--token-file=/var/run/secrets/mesh/token".into(),
            "--root-cert=/var/run/secrets/mesh/root-cert.pem".into(),
            "--state-dir=/var/run/mesh-waypoint".into(),
            format!("--log={}", self.agent.log_level),
            format!("--log-format={}", self.agent.log_format),
        ]
    }

    /// The placeholders' values.
    fn variables(&self) -> BTreeMap<String, String> {
        let mut vars: BTreeMap<String, String> = [
            ("namespace", self.namespace.clone()),
            ("profile", self.profile.as_str().to_owned()),
            ("tag", self.tag.clone()),
            ("image", self.image_ref()),
            ("values", yaml_string(&self.to_set_lines())),
            ("controller.replicas", self.controller.replicas.to_string()),
            ("controller.args", yaml_list(&self.controller_args())),
            ("agent.args", yaml_list(&self.agent_args())),
            ("waypoint.args", yaml_list(&self.waypoint_args())),
            ("waypoint.name", self.waypoint.name.clone()),
            ("waypoint.namespace", self.waypoint.namespace.clone()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
        for (component, resources) in [
            ("controller", self.controller.resources),
            ("agent", self.agent.resources),
            ("waypoint", self.waypoint.resources),
        ] {
            vars.insert(format!("{component}.requests.cpu"), resources.requests_cpu.to_owned());
            vars.insert(format!("{component}.requests.memory"), resources.requests_memory.to_owned());
            vars.insert(format!("{component}.limits.cpu"), resources.limits_cpu.to_owned());
            vars.insert(format!("{component}.limits.memory"), resources.limits_memory.to_owned());
        }
        vars
    }

    /// The template files this install renders, in apply order after the CRDs.
    fn templates(&self) -> Vec<Template> {
        let mut templates = vec![NAMESPACE, RBAC_CONTROLLER];
        if self.agent.enabled {
            templates.push(RBAC_AGENT);
        }
        templates.extend([CONFIG, CONTROLLER]);
        if self.agent.enabled {
            templates.push(AGENT);
        }
        if self.waypoint.enabled {
            templates.push(WAYPOINT);
        }
        templates
    }
}

/// `meshctl manifest generate --set ...`: the multi-document YAML of an install.
pub fn generate<S: AsRef<str>>(set_args: &[S]) -> Result<String, ManifestError> {
    render(&Values::from_set_args(set_args)?)
}

/// Renders every document of an install: CRDs, Namespace, RBAC, config, workloads.
pub fn render(values: &Values) -> Result<String, ManifestError> {
    let vars = values.variables();
    let mut out = format!(
        "# The mesh {version}, profile {profile}, rendered by `meshctl manifest generate`.\n\
         # Install: meshctl manifest generate ... | kubectl apply -f -\n\
         # Remove:  meshctl manifest generate ... | kubectl delete -f -\n\
         #          (this deletes the CRDs too, and with them every Istio object of the cluster)\n",
        version = env!("CARGO_PKG_VERSION"),
        profile = values.profile.as_str(),
    );
    for (_, crd) in CRDS {
        push_document(&mut out, crd);
    }
    for template in values.templates() {
        push_document(&mut out, &fill(template, &vars)?);
    }
    Ok(out)
}

fn push_document(out: &mut String, text: &str) {
    out.push_str("---\n");
    out.push_str(text.trim_end());
    out.push('\n');
}

/// Replaces every `{{key}}` of a template. A multi-line value continues at the column
/// of its placeholder (that is how a list lands under `args:`).
fn fill(template: Template, vars: &BTreeMap<String, String>) -> Result<String, ManifestError> {
    let mut out = String::with_capacity(template.text.len() + 1024);
    let mut rest = template.text;
    while let Some(start) = rest.find("{{") {
        let (before, after) = rest.split_at(start);
        out.push_str(before);
        let end = after.find("}}").ok_or_else(|| ManifestError::Template {
            template: template.name,
            placeholder: after.lines().next().unwrap_or_default().to_owned(),
        })?;
        let key = after[2..end].trim();
        let value = vars
            .get(key)
            .ok_or_else(|| ManifestError::Template { template: template.name, placeholder: key.to_owned() })?;
        let line_start = out.rfind('\n').map_or(0, |i| i + 1);
        let indent = &out[line_start..];
        if indent.chars().all(|c| c == ' ') {
            let indent = indent.to_owned();
            out.push_str(&value.replace('\n', &format!("\n{indent}")));
        } else {
            out.push_str(value);
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A YAML block sequence of double-quoted strings (JSON string syntax is valid YAML).
fn yaml_list(items: &[String]) -> String {
    items.iter().map(|item| format!("- {}", yaml_string(item))).collect::<Vec<_>>().join("\n")
}

fn yaml_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

fn bad(key: &'static str, value: &str) -> ManifestError {
    let expected = KEYS.iter().find(|(k, _)| *k == key).map_or("a valid value", |(_, expected)| *expected);
    ManifestError::BadValue { key, value: value.to_owned(), expected }
}

fn checked(key: &'static str, value: &str, valid: fn(&str) -> bool) -> Result<String, ManifestError> {
    if valid(value) { Ok(value.to_owned()) } else { Err(bad(key, value)) }
}

fn log_level(key: &'static str, value: &str) -> Result<&'static str, ManifestError> {
    LOG_LEVELS.iter().copied().find(|level| *level == value).ok_or_else(|| bad(key, value))
}

fn is_dns_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

fn is_dns_name(value: &str) -> bool {
    value.len() <= 253 && value.split('.').all(is_dns_label)
}

fn is_hub(value: &str) -> bool {
    (1..=200).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:".contains(&b))
        && !value.starts_with(['/', ':', '.', '-'])
        && !value.ends_with(['/', ':'])
        && !value.contains("//")
}

fn is_image(value: &str) -> bool {
    (1..=128).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b))
        && !value.starts_with(['/', '.', '-'])
        && !value.ends_with('/')
        && !value.contains("//")
}

fn is_tag(value: &str) -> bool {
    (1..=128).contains(&value.len())
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        && !value.starts_with(['.', '-'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn a_multi_line_value_continues_at_the_placeholder_column() {
        let template = Template { name: "t.yaml", text: "args:\n  {{args}}\nname: \"{{name}}\"\n" };
        let filled = fill(template, &vars(&[("args", "- \"a\"\n- \"b\""), ("name", "x")])).unwrap();
        assert_eq!(filled, "args:\n  - \"a\"\n  - \"b\"\nname: \"x\"\n");
    }

    #[test]
    fn an_unknown_or_unterminated_placeholder_is_an_error_not_a_panic() {
        let unknown = Template { name: "t.yaml", text: "a: {{ nope }}\n" };
        assert_eq!(
            fill(unknown, &vars(&[])),
            Err(ManifestError::Template { template: "t.yaml", placeholder: "nope".into() })
        );
        let open = Template { name: "t.yaml", text: "a: {{nope\n" };
        assert!(matches!(fill(open, &vars(&[])), Err(ManifestError::Template { .. })));
    }

    #[test]
    fn list_items_are_json_quoted() {
        assert_eq!(yaml_list(&["run".into(), "--x=\"y\"".into()]), "- \"run\"\n- \"--x=\\\"y\\\"\"");
    }
}
