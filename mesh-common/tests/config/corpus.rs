//! The configuration corpora: every manifest under `tests/corpus/` is broken in one
//! way (or, with `# warn:`, accepted with a warning) and says, in its header, what the
//! report must say about it; everything under `tests/valid/` (the seed manifests
//! included) must load without a problem. `tests/corpus/README.md` names the source
//! of each case.
//!
//! Header of a case (a file, or the one file of a directory case that has it):
//! ```text
//! # expect: <a substring of the problem's message>     (rejected)
//! # warn: <a substring of the warning's message>       (accepted, with this warning)
//! # field: <the field path the problem names, or - when it names none>
//! ```
use std::{
    fs,
    path::{Path, PathBuf},
};

use mesh_common::config::{self, Config, Problem, Report};

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(name)
}

struct Expectation {
    file: PathBuf,
    message: String,
    field: String,
    /// Accepted with a warning, not rejected.
    warning: bool,
}

fn expectation(case: &Path) -> Expectation {
    let files: Vec<PathBuf> = if case.is_dir() {
        let mut files: Vec<PathBuf> = fs::read_dir(case).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
    } else {
        vec![case.to_path_buf()]
    };
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        let header = |key: &str| text.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string());
        let (message, warning) = match (header("# expect:"), header("# warn:")) {
            (Some(message), _) => (message, false),
            (None, Some(message)) => (message, true),
            (None, None) => continue,
        };
        let field = header("# field:").unwrap_or_else(|| panic!("{}: no `# field:` line", file.display()));
        let field = if field == "-" { String::new() } else { field };
        return Expectation { file, message, field, warning };
    }
    panic!("{}: no `# expect:` or `# warn:` line", case.display());
}

#[test]
fn every_broken_manifest_is_reported_with_file_object_field_and_reason() {
    let mut cases: Vec<PathBuf> = fs::read_dir(dir("corpus")).unwrap().map(|e| e.unwrap().path()).collect();
    cases.sort();
    assert!(cases.len() >= 15, "the corpus has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        if case.file_name().is_some_and(|n| n == "README.md") {
            continue;
        }
        let expect = expectation(case);
        let report = match config::load_paths(std::slice::from_ref(case)) {
            Ok(config) if expect.warning => Report(config.warnings),
            Ok(_) => {
                failures.push(format!("{}: accepted, expected `{}`", case.display(), expect.message));
                continue;
            }
            Err(report) if expect.warning => {
                failures.push(format!("{}: rejected, expected only a warning:\n{report}", case.display()));
                continue;
            }
            Err(report) => report,
        };
        let file = expect.file.display().to_string();
        let found = report.0.iter().find(|p: &&Problem| p.to_string().contains(&expect.message));
        let Some(problem) = found else {
            failures.push(format!("{}: no problem says `{}`; the report:\n{report}", case.display(), expect.message));
            continue;
        };
        let line = problem.to_string();
        if problem.file != file || !line.contains(&file) {
            failures.push(format!("{}: the problem names file `{}`: {line}", case.display(), problem.file));
        }
        if problem.field != expect.field || !line.contains(&expect.field) {
            failures.push(format!(
                "{}: the problem names field `{}`, expected `{}`: {line}",
                case.display(),
                problem.field,
                expect.field
            ));
        }
        if !expect.field.is_empty() && problem.object.is_none() {
            failures.push(format!("{}: the problem names no object: {line}", case.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_duplicate_names_both_files() {
    let case = dir("corpus").join("duplicate-object");
    let report = config::load_paths(std::slice::from_ref(&case)).unwrap_err();
    let line = report.to_string();
    assert!(line.contains(&case.join("1-first.yaml").display().to_string()), "{line}");
    assert!(line.contains(&case.join("2-second.yaml").display().to_string()), "{line}");
}

fn load_valid() -> Config {
    match config::load_paths(&[dir("valid")]) {
        Ok(config) => config,
        Err(report) => panic!("the valid corpus was rejected:\n{report}"),
    }
}

#[test]
fn the_valid_corpus_and_the_seeds_load_without_problems() {
    let config = load_valid();
    // The seed's 80/20 split, as written (no namespace: `default`).
    let vs = config.virtual_services.iter().find(|v| v.metadata.name == "my-service").unwrap();
    assert_eq!(vs.metadata.namespace, "default");
    let weights: Vec<i64> = vs.spec.http[0].route.iter().map(|r| r.weight).collect();
    assert_eq!(weights, [80, 20]);
    // The retries and the principals of seed 002.
    let retries = config.virtual_services.iter().find(|v| v.metadata.name == "backend-retries").unwrap();
    let retry = retries.spec.http[0].retries.as_ref().unwrap();
    assert_eq!((retry.attempts, retry.per_try_timeout.as_deref()), (3, Some("2s")));
    let policy = config.authorization_policies.iter().find(|p| p.metadata.name == "backend-allow-frontend").unwrap();
    let source = policy.spec.rules[0].from[0].source.as_ref().unwrap();
    assert_eq!(source.principals, ["cluster.local/ns/default/sa/frontend"]);
    // Seed 002's Istio components: served kinds loaded, the others recorded.
    assert!(config.namespaces.iter().any(|n| n.metadata.name == "istio-system"));
    assert!(config.services.iter().any(|s| s.metadata.name == "istio-ingressgateway"));
    let kinds = config.ignored_kinds();
    for kind in
        ["Deployment", "ServiceAccount", "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration", "ConfigMap"]
    {
        assert!(kinds.contains(&kind), "{kind} not in {kinds:?}");
    }
    // Istio's Gateway is validated now, not ignored.
    assert!(config.istio_gateways.iter().any(|g| g.spec.servers.iter().any(|s| s.port.number == 80)));
    let not_checked = config.not_checked();
    assert!(
        not_checked.iter().any(|(kind, group, n)| kind == "Deployment" && group == "apps" && *n >= 2),
        "{not_checked:?}"
    );
    assert!(
        config.ignored.iter().any(|i| i.starts_with("Deployment/istio-egressgateway (no apiVersion)")),
        "{:#?}",
        config.ignored
    );
    // Istio's mesh config, from the ConfigMap `istio` (not ignored, unlike others).
    assert_eq!(config.mesh.ext_authz_providers(), ["sample-ext-authz-grpc", "sample-ext-authz-http"]);
    assert_eq!(config.mesh.path_normalization(), config::mesh::PathNormalization::MergeSlashes);
    assert!(!config.ignored.iter().any(|i| i.starts_with("ConfigMap/istio-system/istio ")), "{:#?}", config.ignored);
    // A `kind: List` export.
    assert!(config.services.iter().any(|s| s.metadata.name == "ratings" && s.metadata.namespace == "shop"));
    assert!(config.ignored.iter().any(|i| i.starts_with("Deployment/shop/ratings-v1 (apps/v1)")));
}

#[test]
fn the_model_round_trips_through_json() {
    let config = load_valid();
    assert!(config.object_count() > 20);
    let json = serde_json::to_string(&config).unwrap();
    let back: Config = serde_json::from_str(&json).unwrap();
    assert_eq!(back, config);
}

#[test]
fn the_seed_virtual_service_warns_without_its_destination_rule() {
    let valid = dir("valid");
    // Alone, its subsets cannot be found: accepted (Istio admits it), with warnings.
    let alone = config::load_paths(&[valid.join("004-virtualservice.yaml")]).unwrap();
    let warnings = Report(alone.warnings).to_string();
    assert!(warnings.contains("no DestinationRule for host `my-service.default.svc.cluster.local`"), "{warnings}");
    let together =
        config::load_paths(&[valid.join("004-virtualservice.yaml"), valid.join("004-destinationrule.yaml")]).unwrap();
    assert!(together.warnings.is_empty(), "{:?}", together.warnings);
}

#[test]
fn a_mounted_config_map_is_read_once_and_links_do_not_loop() {
    // The layout kubelet gives a ConfigMap volume: the files in a timestamped
    // directory, `..data` linking to it, and a link per key through `..data`.
    let root = std::env::temp_dir().join(format!("mesh-configmap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let stamped = root.join("..2026_12_02_08_00_00.000000001");
    std::fs::create_dir_all(&stamped).unwrap();
    std::fs::copy(dir("valid").join("004-virtualservice.yaml"), stamped.join("vs.yaml")).unwrap();
    std::os::unix::fs::symlink("..2026_12_02_08_00_00.000000001", root.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/vs.yaml", root.join("vs.yaml")).unwrap();
    // A link back up the tree, and a hidden directory with YAML that is no manifest.
    std::os::unix::fs::symlink(".", root.join("again")).unwrap();
    std::fs::create_dir_all(root.join(".github/workflows")).unwrap();
    std::fs::write(root.join(".github/workflows/ci.yaml"), "on: push\njobs: {}\n").unwrap();
    let (files, problems) = config::manifest_files(std::slice::from_ref(&root));
    let loaded = config::load_paths(std::slice::from_ref(&root));
    std::fs::remove_dir_all(&root).unwrap();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(files, [root.join("vs.yaml")]);
    assert_eq!(loaded.unwrap_or_else(|r| panic!("{r}")).virtual_services.len(), 1);
}

#[test]
fn an_unreadable_path_is_a_problem() {
    let missing = dir("corpus").join("no-such-file.yaml");
    let report = config::load_paths(std::slice::from_ref(&missing)).unwrap_err();
    assert_eq!(report.0.len(), 1);
    assert!(report.0[0].file.contains("no-such-file.yaml"));
    assert!(report.0[0].reason.starts_with("cannot read"), "{report}");
}

fn upstream_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    for sub in ["istio", "istio-reference", "istio-testdata", "gateway-api", "gateway-api-conformance"] {
        let entries = fs::read_dir(dir("upstream-valid").join(sub)).expect("upstream-valid");
        files.extend(entries.map(|e| e.expect("entry").path()));
    }
    files.sort();
    files
}

/// Istio's samples and Gateway API's examples, each on its own (several define the
/// same objects in variants): accepted, as Istio and Gateway API accept them.
#[test]
fn upstream_samples_and_examples_load_each_on_its_own() {
    let files = upstream_files();
    assert!(files.len() >= 100, "{} upstream files", files.len());
    let rejected: Vec<String> =
        files.iter().filter_map(|f| config::load_paths(std::slice::from_ref(f)).err().map(|r| r.to_string())).collect();
    assert!(rejected.is_empty(), "rejected:\n{}", rejected.join("\n"));
}

/// apiVersion and kind of each list of the model, to write it back as manifests.
const KINDS: &[(&str, &str, &str)] = &[
    ("namespaces", "v1", "Namespace"),
    ("services", "v1", "Service"),
    ("endpointSlices", "discovery.k8s.io/v1", "EndpointSlice"),
    ("pods", "v1", "Pod"),
    ("workloadEntries", "networking.istio.io/v1", "WorkloadEntry"),
    ("authorizationPolicies", "security.istio.io/v1", "AuthorizationPolicy"),
    ("peerAuthentications", "security.istio.io/v1", "PeerAuthentication"),
    ("requestAuthentications", "security.istio.io/v1", "RequestAuthentication"),
    ("virtualServices", "networking.istio.io/v1", "VirtualService"),
    ("destinationRules", "networking.istio.io/v1", "DestinationRule"),
    ("serviceEntries", "networking.istio.io/v1", "ServiceEntry"),
    ("telemetries", "telemetry.istio.io/v1", "Telemetry"),
    ("httpRoutes", "gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("grpcRoutes", "gateway.networking.k8s.io/v1", "GRPCRoute"),
    ("gateways", "gateway.networking.k8s.io/v1", "Gateway"),
    ("gatewayClasses", "gateway.networking.k8s.io/v1", "GatewayClass"),
    ("referenceGrants", "gateway.networking.k8s.io/v1beta1", "ReferenceGrant"),
    ("tcpRoutes", "gateway.networking.k8s.io/v1", "TCPRoute"),
    ("tlsRoutes", "gateway.networking.k8s.io/v1", "TLSRoute"),
    ("istioGateways", "networking.istio.io/v1", "Gateway"),
    ("envoyFilters", "networking.istio.io/v1alpha3", "EnvoyFilter"),
];

/// The model written back as YAML manifests, one document per object.
fn to_yaml(config: &Config) -> String {
    let model = serde_json::to_value(config).expect("the model serializes");
    let mut documents = Vec::new();
    for (list, api_version, kind) in KINDS {
        for object in model[*list].as_array().into_iter().flatten() {
            let mut object = object.clone();
            object["apiVersion"] = (*api_version).into();
            object["kind"] = (*kind).into();
            documents.push(serde_yaml::to_string(&object).expect("YAML"));
        }
    }
    if !config.mesh.is_default() {
        let mesh = serde_yaml::to_string(&config.mesh).expect("YAML");
        let map = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "istio", "namespace": "istio-system"},
            "data": {"mesh": mesh},
        });
        documents.push(serde_yaml::to_string(&map).expect("YAML"));
    }
    let listed: usize = KINDS.iter().map(|(list, _, _)| model[*list].as_array().map_or(0, Vec::len)).sum();
    assert_eq!(listed, config.object_count(), "every list of the model is in KINDS");
    documents.join("---\n")
}

/// What a manifest means, without what depends on where it was read.
fn meaning(mut config: Config) -> Config {
    config.ignored.clear();
    config.warnings.clear();
    config
}

/// Any manifest the model accepts, written back as YAML, is accepted again and means
/// the same: the seeds together, every upstream file on its own.
#[test]
fn what_the_model_accepts_round_trips_through_yaml() {
    let mut inputs = vec![dir("valid")];
    inputs.extend(upstream_files());
    for input in inputs {
        let first = config::load_paths(std::slice::from_ref(&input)).expect("accepted");
        let yaml = to_yaml(&first);
        let again = config::load(&[config::Source::new("again.yaml", yaml.clone())])
            .unwrap_or_else(|report| panic!("{}: written back, rejected:\n{report}\n{yaml}", input.display()));
        assert_eq!(meaning(again), meaning(first), "{}: means something else written back", input.display());
    }
}
