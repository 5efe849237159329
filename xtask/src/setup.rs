//! `cargo xtask setup`: installs what a fresh Debian machine lacks. Idempotent; a
//! quick no-op when everything is present.
use std::{fs, process::Command};

use anyhow::{Context, bail};

use crate::{cargo, root};

/// Debian packages: (package, what needs it).
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "the lab's namespaces and links"),
    ("util-linux", "nsenter"),
    ("curl", "tests and demo"),
    ("openssl", "tests (CSRs from a foreign client)"),
    ("iperf3", "throughput benchmark"),
    ("nftables", "the ztunnel leg of the benchmark (redirect in the client pod)"),
    ("tcpdump", "packet captures"),
    ("socat", "tests"),
    ("python3", "the Kubernetes API server test double (tests/fake-apiserver.py)"),
    ("prometheus", "promtool, and the server the dashboards test runs (not the packaged service)"),
    ("nghttp2-client", "h2load"),
    ("llvm-22-dev", "bpf-linker"),
    ("libpolly-22-dev", "bpf-linker"),
    ("libzstd-dev", "bpf-linker"),
    ("zlib1g-dev", "bpf-linker"),
    ("libxml2-dev", "bpf-linker"),
    ("qemu-system-x86", "kernel VM tests"),
    ("linux-image-amd64", "kernel VM tests (Debian's 6.1 kernel)"),
    ("busybox-static", "kernel VM tests (virtme-ng init)"),
];

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

pub fn setup() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).filter(|p| !installed(p)).collect();
    let need_rust_src = !Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"));
    let need_linker = !have("bpf-linker");
    let need_vng = !have("vng");
    let need_fuzz = !have("cargo-fuzz");
    let need_python = !python_peers_present();
    if missing.is_empty() && !need_rust_src && !need_linker && !need_vng && !need_fuzz && !need_python {
        return Ok(());
    }
    if !mesh_lab::is_root() {
        bail!(
            "setup must install {} and needs root; run it as root",
            describe(
                &missing,
                &[
                    (need_rust_src, "nightly rust-src"),
                    (need_linker, "bpf-linker"),
                    (need_vng, "virtme-ng"),
                    (need_fuzz, "cargo-fuzz"),
                    (
                        need_python,
                        "the Python test peers (httpbin, gunicorn, grpcio, websockets, h2, pyjwt, opentelemetry-proto)"
                    )
                ]
            )
        );
    }
    if !missing.is_empty() {
        println!("setup: installing Debian packages: {}", missing.join(" "));
        logged("apt-update", Command::new("apt-get").args(["update", "-qq"])).context("apt-get update")?;
        logged(
            "apt-install",
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .context("install Debian packages")?;
        if missing.contains(&"prometheus") {
            stop_packaged_prometheus()?;
        }
    }
    if need_rust_src {
        println!("setup: adding rust-src to the nightly toolchain");
        logged(
            "rustup-rust-src",
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        )
        .context("add rust-src")?;
    }
    if need_linker {
        println!("setup: building bpf-linker 0.13 against LLVM 22 (about a minute)");
        logged(
            "bpf-linker",
            Command::new("cargo")
                .args(["install", "bpf-linker", "--version", "^0.13", "--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .env_remove("RUSTUP_TOOLCHAIN"),
        )
        .context("install bpf-linker")?;
    }
    if need_fuzz {
        println!("setup: building cargo-fuzz (about a minute)");
        logged("cargo-fuzz", cargo(None).args(["install", "cargo-fuzz", "--locked"])).context("install cargo-fuzz")?;
    }
    if need_vng {
        println!("setup: installing virtme-ng from PyPI");
        logged(
            "pip-virtme-ng",
            Command::new("python3").args(["-m", "pip", "install", "--quiet", "--break-system-packages", "virtme-ng"]),
        )
        .context("install virtme-ng")?;
    }
    if need_python {
        println!("setup: installing the test peers from PyPI: {}", PYTHON_PEERS.join(" "));
        logged(
            "pip-peers",
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--break-system-packages"])
                .args(PYTHON_PEERS),
        )
        .context("install the Python test peers")?;
    }
    println!("setup: done");
    Ok(())
}

/// Debian's `prometheus` package starts a server on :9090 scraping the machine; the
/// tests run their own (`mesh_lab::prometheus`), so the packaged service is stopped
/// and disabled, through systemd when it runs, else through the init script.
fn stop_packaged_prometheus() -> anyhow::Result<()> {
    println!("setup: stopping and disabling the packaged prometheus service (the tests run their own)");
    if std::path::Path::new("/run/systemd/system").exists() {
        return logged(
            "prometheus-disable",
            Command::new("systemctl").args(["disable", "--now", "prometheus.service"]),
        )
        .context("disable the prometheus service");
    }
    if std::path::Path::new("/etc/init.d/prometheus").exists() {
        logged("prometheus-stop", Command::new("/etc/init.d/prometheus").arg("stop"))
            .context("stop the prometheus service")?;
        logged("prometheus-disable", Command::new("update-rc.d").args(["prometheus", "disable"]))
            .context("disable the prometheus service")?;
    }
    Ok(())
}

/// Servers and clients from `PyPI` the waypoint's end-to-end tests run against: Istio's
/// own sample app (httpbin, served by gunicorn), gRPC's health service, WebSocket, the
/// HTTP/2 protocol library the flood tests speak with, JWTs signed with keys the tests
/// make, and OpenTelemetry's protocol definitions for the trace receiver.
const PYTHON_PEERS: &[&str] = &[
    "httpbin",
    "gunicorn",
    "websockets",
    "grpcio",
    "grpcio-health-checking",
    "h2",
    "pyjwt[crypto]",
    "opentelemetry-proto",
];

fn python_peers_present() -> bool {
    Command::new("python3")
        .args(["-c", "import httpbin, gunicorn, websockets, grpc, grpc_health.v1, h2.connection, jwt, cryptography, opentelemetry.proto"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs a step with its output in `target/logs/<name>.log`, shown only when it fails.
fn logged(name: &str, cmd: &mut Command) -> anyhow::Result<()> {
    let path = root().join("target/logs").join(format!("{name}.log"));
    fs::create_dir_all(path.parent().expect("a log file has a directory"))?;
    let log = fs::File::create(&path).with_context(|| format!("create {}", path.display()))?;
    let status = cmd
        .current_dir(root())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !status.success() {
        eprint!("{}", fs::read_to_string(&path).unwrap_or_default());
        bail!("{cmd:?} failed ({status}); output above and in {}", path.display());
    }
    Ok(())
}

/// The Debian packages and the other tools (those whose flag is set) in one list.
fn describe(missing: &[&str], tools: &[(bool, &str)]) -> String {
    missing
        .iter()
        .copied()
        .chain(tools.iter().filter(|(needed, _)| *needed).map(|(_, tool)| *tool))
        .collect::<Vec<_>>()
        .join(", ")
}
