//! `meshctl validate` as a user runs it: the built binary on the configuration corpora
//! of `mesh-common` (valid manifests and seeds, one broken manifest per file).
use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

fn meshctl(args: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl")).arg("validate").args(args).output().expect("run meshctl")
}

fn corpus(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().join("mesh-common/tests").join(name)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn valid_manifests_exit_0_with_a_summary() {
    let out = meshctl(&[&corpus("valid")]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with("✔ "), "{stdout}");
    assert!(stdout.contains(" files are valid; not checked: "), "{stdout}");
    // What was not checked is named with its group, never counted as valid.
    assert!(stdout.contains(" Deployment (apps), 1 ServiceAccount (core)"), "{stdout}");
    assert!(stdout.contains(" Deployment (?)"), "{stdout}");
}

#[test]
fn the_seed_virtual_service_is_valid_with_its_destination_rule() {
    let out = meshctl(&[&corpus("valid/004-virtualservice.yaml"), &corpus("valid/004-destinationrule.yaml")]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert_eq!(text(&out.stdout), "✔ 2 objects in 2 files are valid\n");
}

#[test]
fn a_route_to_a_subset_defined_elsewhere_is_a_warning_and_fails_only_with_strict() {
    let file = corpus("valid/004-virtualservice.yaml");
    let out = meshctl(&[&file]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let warnings: Vec<&str> = stdout.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 2, "{stdout}");
    assert!(warnings[0].contains("spec.http[0].route[0].destination.subset: subset `v1` is not defined"), "{stdout}");
    assert!(warnings[0].contains("503 (response flag NR)"), "{stdout}");
    assert_eq!(stdout.lines().last(), Some("✔ 1 object in 1 file is valid with 2 warnings"));

    let strict =
        Command::new(env!("CARGO_BIN_EXE_meshctl")).args(["validate", "--strict"]).arg(&file).output().unwrap();
    assert_eq!(strict.status.code(), Some(1), "{}", text(&strict.stdout));
}

#[test]
fn a_broken_manifest_exits_1_naming_file_object_field_and_reason() {
    let file = corpus("corpus/weight-negative.yaml");
    let out = meshctl(&[&file]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let first = stdout.lines().next().unwrap();
    assert_eq!(
        first,
        format!(
            "{}: VirtualService/default/my-service: spec.http[0].route[0].weight: weight -20 is negative",
            file.display()
        )
    );
    assert_eq!(stdout.lines().last(), Some("✘ 1 problem in 1 file"));
}

#[test]
fn every_problem_of_a_directory_is_listed() {
    let out = meshctl(&[&corpus("corpus")]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let problems = stdout.lines().filter(|l| !l.starts_with('✘')).count();
    assert!(problems >= 30, "{stdout}");
    // One directory: objects of the same name in several cases are duplicates too.
    for needle in [
        "spec.http[0].fault.delay.fixedDelay: invalid duration",
        "spec.rules[0].from[0].source.ipBlocks[2]",
        "yaml-syntax.yaml: YAML syntax error",
        "duplicate object: VirtualService/default/reviews is already defined in",
    ] {
        assert!(stdout.contains(needle), "{needle} missing from:\n{stdout}");
    }
}

#[test]
fn usage_errors_exit_2() {
    let none = Command::new(env!("CARGO_BIN_EXE_meshctl")).arg("validate").output().unwrap();
    assert_eq!(none.status.code(), Some(2));
    assert!(text(&none.stderr).contains("<PATH>"), "{}", text(&none.stderr));

    let missing = corpus("no-such-dir");
    let out = meshctl(&[&missing]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(text(&out.stderr), format!("meshctl validate: {}: no such file or directory\n", missing.display()));
    assert!(out.stdout.is_empty());

    let empty = Path::new(env!("CARGO_TARGET_TMPDIR")).join("meshctl-empty-dir");
    std::fs::create_dir_all(&empty).unwrap();
    let out = meshctl(&[&empty]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no manifests"), "{}", text(&out.stderr));

    let unknown = Command::new(env!("CARGO_BIN_EXE_meshctl")).arg("frobnicate").output().unwrap();
    assert_eq!(unknown.status.code(), Some(2));
}

fn meshctl_args(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        // No cluster: no kubeconfig, no in-cluster service account.
        .env("KUBECONFIG", "/nonexistent/meshctl-test/kubeconfig")
        .env("HOME", "/nonexistent/meshctl-test")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .expect("run meshctl")
}

#[test]
fn waypoint_generate_prints_the_gateway_the_mesh_reads_as_a_waypoint() {
    let out = meshctl_args(&["waypoint", "generate", "-n", "shop", "--name", "shop-wp", "--for", "workload"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let yaml = text(&out.stdout);
    let config =
        mesh_common::config::load(&[mesh_common::config::Source { name: "stdout".into(), text: yaml.clone() }])
            .unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let gateway = &config.gateways[..];
    assert_eq!(gateway.len(), 1, "{yaml}");
    assert!(gateway[0].is_waypoint());
    assert_eq!((gateway[0].metadata.namespace.as_str(), gateway[0].metadata.name.as_str()), ("shop", "shop-wp"));
    assert_eq!(gateway[0].waypoint_for(), "workload");
    let listener = &gateway[0].spec.listeners[0];
    assert_eq!((listener.name.as_str(), listener.port, listener.protocol.as_str()), ("mesh", 15008, "HBONE"));
    // Defaults: namespace default, name waypoint, for service.
    let out = meshctl_args(&["waypoint", "generate"]);
    let yaml = text(&out.stdout);
    assert!(yaml.contains("  name: waypoint\n  namespace: default\n"), "{yaml}");
    assert!(yaml.contains("istio.io/waypoint-for: service\n"), "{yaml}");
}

#[test]
fn waypoint_commands_fail_with_one_line_on_bad_names_and_without_a_cluster() {
    let out = meshctl_args(&["waypoint", "generate", "--name", "Not_A_Name"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("meshctl waypoint generate: --name Not_A_Name: not a valid name"), "{stderr}");
    for args in [&["waypoint", "apply", "-n", "shop", "--enroll-namespace"][..], &["waypoint", "list"]] {
        let out = meshctl_args(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains("no cluster to talk to"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty());
    }
}
