//! End-to-end tests on the lab: real agents, real eBPF programs in the running kernel,
//! real network namespaces, curl as the client. Tests whose names start with
//! `capture` also run inside the 6.1 kernel VM (`cargo xtask vm-test`).
//!
//! They need root; without it they print a loud SKIPPED line and pass.
use std::{path::PathBuf, sync::Mutex, time::Duration};

use mesh_lab::{HTTP_PORT, Lab, LabSpec, leftovers, unsupported_reason, wait_for};

/// One lab at a time: the machine has two cores and the labs share the kernel.
static SERIAL: Mutex<()> = Mutex::new(());

fn agent_bin() -> PathBuf {
    let path = std::env::var_os("MESH_AGENT_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/mesh-agent"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "mesh-agent binary {} not found: run `cargo xtask build` first",
        path.display()
    );
    path
}

/// Runs `body` on a fresh 2-node lab, then tears the lab down and checks that
/// nothing of it is left (namespaces, links, cgroups, pins, processes, state).
fn with_lab(prefix: &str, agent_args: &[&str], body: impl FnOnce(&Lab)) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(reason) = unsupported_reason() {
        eprintln!("\n!!!!! SKIPPED {prefix}: {reason} !!!!!\n");
        return;
    }
    let spec = LabSpec {
        prefix: prefix.into(),
        nodes: 2,
        pods_per_node: 2,
        agent_bin: agent_bin(),
        echo_bin: PathBuf::from(env!("CARGO_BIN_EXE_mesh-echo")),
        agent_args: agent_args.iter().map(|s| (*s).to_owned()).collect(),
    };
    let lab = Lab::up(spec).expect("lab up");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&lab)));
    if result.is_err() {
        for n in 1..=lab.nodes.len() {
            eprintln!("--- agent log node{n} ---\n{}", lab.agent_log(n));
        }
    }
    drop(lab);
    let left = leftovers(prefix);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    assert!(left.is_empty(), "lab {prefix} left behind: {left:?}");
}

fn stat(lab: &Lab, node: usize, section: &str, key: &str) -> u64 {
    let stats = lab.agent_stats(node).expect("agent stats");
    stats[section][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {section}.{key} in {stats}"))
}

fn url(ip: &str) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]:{HTTP_PORT}/")
    } else {
        format!("http://{ip}:{HTTP_PORT}/")
    }
}

#[test]
fn capture_cross_node_ipv4_ipv6_unenrolled_and_unenroll() {
    with_lab("mesh-ta", &[], |lab| {
        let client = lab.pod("n1-p1");
        let server = lab.pod("n2-p1");
        assert!(client.meshed && !lab.pod("n1-p2").meshed);

        // (a) A meshed pod's request to a pod on the other node goes through its agent,
        // and the server still sees the client pod's own address.
        let body = lab
            .curl("n1-p1", &url(&server.ip4))
            .expect("request through the agent");
        assert!(body.starts_with("pod=n2-p1 "), "wrong reply: {body}");
        assert!(
            body.contains(&format!("peer={}:", client.ip4)),
            "source address not preserved: {body}"
        );
        assert_eq!(stat(lab, 1, "agent", "forwarded"), 1);
        assert_eq!(stat(lab, 1, "kernel", "captured"), 1);

        // (c) The agent's own upstream connection passed the same hook and was left
        // alone because of its mark: one accepted connection, not a loop.
        assert_eq!(stat(lab, 1, "agent", "accepted"), 1);
        assert!(stat(lab, 1, "kernel", "skipped_bypass_mark") >= 1);
        let log = lab.agent_log(1);
        assert!(
            log.contains("connection complete")
                && log.contains(&format!("{}:{HTTP_PORT}", server.ip4)),
            "no access log: {log}"
        );

        // (d) IPv6 capture.
        let body = lab
            .curl("n1-p1", &url(&server.ip6))
            .expect("IPv6 request through the agent");
        assert!(
            body.contains(&format!("peer=[{}]:", client.ip6)),
            "wrong IPv6 reply: {body}"
        );
        assert_eq!(stat(lab, 1, "agent", "forwarded"), 2);

        // Loopback inside the pod is never captured.
        lab.curl("n1-p1", &format!("http://127.0.0.1:{HTTP_PORT}/"))
            .expect("loopback request");
        assert_eq!(stat(lab, 1, "agent", "accepted"), 2);
        assert!(stat(lab, 1, "kernel", "skipped_loopback") >= 1);

        // (b) An unenrolled pod on the same node is not captured.
        let body = lab
            .curl("n1-p2", &url(&server.ip4))
            .expect("request from the unmeshed pod");
        assert!(
            body.contains(&format!("peer={}:", lab.pod("n1-p2").ip4)),
            "{body}"
        );
        assert_eq!(stat(lab, 1, "agent", "accepted"), 2);
        assert_eq!(stat(lab, 1, "kernel", "captured"), 2);

        // (e) Un-enrolling stops capture at once; enrolling again restores it.
        lab.unenroll("n1-p1").expect("unenroll");
        lab.curl("n1-p1", &url(&server.ip4))
            .expect("request after unenroll");
        assert_eq!(
            stat(lab, 1, "agent", "accepted"),
            2,
            "captured after un-enrollment"
        );
        lab.enroll("n1-p1").expect("enroll again");
        lab.curl("n1-p1", &url(&server.ip4))
            .expect("request after re-enroll");
        assert_eq!(stat(lab, 1, "agent", "accepted"), 3);

        // Connections from node 2's meshed pod are captured by node 2's agent only.
        lab.curl("n2-p1", &url(&client.ip4))
            .expect("request from node 2");
        assert_eq!(stat(lab, 2, "agent", "forwarded"), 1);
        assert_eq!(stat(lab, 1, "agent", "accepted"), 3);

        // A destination that refuses: the client gets a refusal too, not a hang.
        let out = lab
            .exec(
                "n1-p1",
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    &format!("http://{}:1/", server.ip4),
                ],
            )
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("onnect"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stat(lab, 1, "agent", "connect_failed"), 1);
    });
}

#[test]
fn capture_agent_restart_is_fail_closed_and_restores_pods() {
    with_lab("mesh-tb", &[], |lab| {
        let server = lab.pod("n2-p1");
        lab.curl("n1-p1", &url(&server.ip4))
            .expect("request before the restart");

        lab.stop_agent(1, "KILL").expect("kill agent");
        // Capture stays in force with nobody listening: the meshed pod's connection is
        // refused (never sent in clear past the mesh), the unmeshed pod is unaffected.
        let out = lab
            .exec(
                "n1-p1",
                &["curl", "-sS", "--max-time", "5", &url(&server.ip4)],
            )
            .unwrap();
        // curl's exit code 7: the connection was refused (not a timeout, 28).
        assert_eq!(
            out.status.code(),
            Some(7),
            "meshed pod with the agent down: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        lab.curl("n1-p2", &url(&server.ip4))
            .expect("unmeshed pod while the agent is down");

        lab.start_agent(1).expect("restart agent");
        let log = lab.agent_log(1);
        assert!(log.contains("pod restored from state file"), "{log}");
        let body = lab
            .curl("n1-p1", &url(&server.ip4))
            .expect("request after the restart");
        assert!(body.starts_with("pod=n2-p1 "), "{body}");
        assert_eq!(
            stat(lab, 1, "agent", "forwarded"),
            1,
            "the restarted agent forwards"
        );

        // A graceful stop (SIGTERM) drains and exits; capture still fails closed.
        lab.stop_agent(1, "TERM").expect("stop agent");
        assert!(lab.agent_log(1).contains("drained; exiting"));
        lab.start_agent(1).expect("restart agent again");
        lab.curl("n1-p1", &url(&server.ip4))
            .expect("request after the graceful restart");
    });
}

#[test]
fn capture_bad_enrollment_input_and_vanished_pods() {
    with_lab("mesh-tc", &["--exclude-port", "9000"], |lab| {
        let server = lab.pod("n2-p1");
        let cases: [(&str, &str); 6] = [
            ("this is not json", "invalid request"),
            (
                r#"{"op":"add","pod":{"uid":"x","name":"x","namespace":"shop","netns":"/run/netns/does-not-exist"}}"#,
                "netns path /run/netns/does-not-exist does not exist",
            ),
            (
                r#"{"op":"add","pod":{"uid":"","name":"x","namespace":"shop","netns":"/tmp"}}"#,
                "field pod.uid must not be empty",
            ),
            (
                r#"{"op":"add","pod":{"uid":"x","name":"x","namespace":"shop","netns":"/etc/hostname"}}"#,
                "is not a network namespace",
            ),
            (
                r#"{"op":"remove","uid":"nobody"}"#,
                "no enrolled pod has uid nobody",
            ),
            (
                r#"{"op":"add","pod":{"uid":"x","name":"x","namespace":"shop","netns":"/tmp","colour":"red"}}"#,
                "unknown field `colour`",
            ),
        ];
        for (request, expected) in cases {
            let reply = lab.enroll_raw(1, request).expect("a reply");
            assert_eq!(reply["ok"], false, "{request} was accepted");
            let error = reply["error"].as_str().unwrap_or_default();
            assert!(
                error.contains(expected),
                "{request}: error '{error}' does not say '{expected}'"
            );
        }
        let dup = lab.enroll("n1-p1").unwrap_err().to_string();
        assert!(dup.contains("already enrolled"), "{dup}");
        let mut other = lab.pod_request("n1-p1");
        other["pod"]["uid"] = "another-uid".into();
        let reply = lab.enroll_raw(1, &other.to_string()).unwrap();
        assert!(
            reply["error"]
                .as_str()
                .unwrap_or_default()
                .contains("already belongs to enrolled pod"),
            "{reply}"
        );
        // Garbage bytes do not take the agent down.
        lab.enroll_raw(1, "\u{0}\u{1}\u{2}\u{ff}").ok();

        // Still serving everything else.
        lab.curl("n1-p1", &url(&server.ip4))
            .expect("request after bad input");
        assert_eq!(stat(lab, 1, "agent", "forwarded"), 1);

        // An excluded port is not captured.
        let out = lab
            .exec(
                "n1-p1",
                &[
                    "sh",
                    "-c",
                    &format!("echo hi | socat -T2 - TCP:{}:9000", server.ip4),
                ],
            )
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hi");
        assert_eq!(stat(lab, 1, "agent", "accepted"), 1);
        assert!(stat(lab, 1, "kernel", "skipped_excluded") >= 1);

        // A pod whose network namespace disappears is cleaned up.
        let victim = lab.pod("n1-p1");
        std::process::Command::new("ip")
            .args(["netns", "del", &victim.netns])
            .status()
            .unwrap();
        wait_for(Duration::from_secs(5), || {
            lab.node_http(1, 15000, "/pods")
                .is_ok_and(|pods| !pods.contains(&victim.uid))
        })
        .expect("vanished pod removed");
        assert!(lab.agent_log(1).contains("pod network namespace is gone"));
    });
}

#[test]
fn agent_startup_errors_are_clear() {
    // Usage errors: one line, exit status 2.
    let out = std::process::Command::new(agent_bin())
        .arg("run")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--node-name"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(agent_bin())
        .args(["run", "--node-name", "x", "--exclude-cidr", "10.0.0.0/40"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prefix length must be 0..=32"));

    // A file that is not an eBPF object: refused with a message naming the problem,
    // before anything is attached.
    let dir = std::env::temp_dir().join(format!("mesh-bad-object-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let object = dir.join("not-bpf.o");
    std::fs::write(&object, b"this is not an ELF file").unwrap();
    let out = std::process::Command::new(agent_bin())
        .args(["run", "--node-name", "x", "--bpf-object"])
        .arg(&object)
        .args(["--state-dir"])
        .arg(dir.join("state"))
        .args(["--bpffs-dir"])
        .arg(dir.join("pins"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot set up eBPF capture: cannot load the eBPF object"),
        "{stderr}"
    );
}
