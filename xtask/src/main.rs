//! Project automation. `cargo xtask setup | build | lab | demo | test | vm-test | bench | interop | fuzz`.
//! Every command that needs tools runs `setup` first, which installs what is missing
//! and is a quick no-op otherwise.
mod bench;
mod demo;
mod fuzz;
mod interop;
mod setup;
mod ztunnel;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use mesh_lab::{Lab, LabSpec};

#[derive(Parser)]
#[command(name = "xtask", about = "Build, run and test the mesh")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing prerequisites (Debian packages, nightly rust-src, bpf-linker, virtme-ng,
    /// cargo-fuzz).
    Setup,
    /// Build the eBPF object and the release binaries.
    Build,
    /// Manage the local lab of network namespaces.
    Lab {
        #[command(subcommand)]
        command: LabCmd,
    },
    /// Build everything, run the mesh in the lab and show what it does.
    Demo,
    /// fmt, clippy, unit and end-to-end tests, a short run of each fuzz target, then the
    /// kernel VM tests.
    Test {
        /// Skip the VM run (for a quick local loop; CI always runs it).
        #[arg(long)]
        no_vm: bool,
    },
    /// Run the capture tests inside a VM booted on Debian's 6.1 kernel.
    VmTest,
    /// Benchmarks: throughput and latency with and without the mesh (`bench`; `bench l4`
    /// or `bench waypoint` for one section), or the control plane at scale (`bench control`).
    Bench {
        /// `l4` or `waypoint` for one section of the data-plane benchmark, `control` for the control-plane
        /// benchmark, `micro` for the in-process ones.
        what: Option<String>,
        /// Shorter runs (for a quick look).
        #[arg(long)]
        quick: bool,
        /// Also write the medians as JSON to this file (data-plane benchmark).
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
        /// Add a third leg: this ztunnel binary (built with `--features testing`), one per
        /// pod in its dedicated mode, same pods, same lab (data-plane benchmark).
        #[arg(long, value_name = "PATH")]
        ztunnel: Option<PathBuf>,
        /// `bench l4`: the server pod is on the client's node (n1-p2 instead of n2-p1).
        #[arg(long)]
        same_node: bool,
    },
    /// Our agents against Istio's ztunnel in the lab, both directions: IPv4, IPv6,
    /// half-closed bulk transfers, policies on each side, ztunnel's `COMPLIANCE_POLICY=pqc`.
    /// One line per case; fails if any case failed.
    Interop {
        /// The ztunnel binary (built with `--features testing`, for its fake CA).
        #[arg(long, value_name = "PATH")]
        ztunnel: PathBuf,
        /// Also write `{"cases": {"<case>": "ok" | "failed: <reason>"}}` to this file.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// Run the fuzz targets of fuzz/ (all, or one) for longer; the corpus they grow is
    /// kept in fuzz/target/corpus between runs.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// One target (its file name in `fuzz/fuzz_targets/`, without `.rs`).
        target: Option<String>,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build the lab and start its agents and workloads.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        /// Also run a waypoint for namespace `shop` (its Gateway and the namespace's
        /// `istio.io/use-waypoint` label are in the lab's config).
        #[arg(long)]
        waypoint: bool,
    },
    /// Show nodes, pods and agents.
    Status,
    /// Run a command in a pod or node: `cargo xtask lab exec n1-p1 -- curl ...`.
    Exec {
        target: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Remove everything the lab made.
    Down,
}

pub const LAB_PREFIX: &str = "mesh";

/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_SECONDS: u64 = 20;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::setup(),
        Cmd::Build => setup::setup().and_then(|()| build()),
        Cmd::Lab { command } => lab(command),
        Cmd::Demo => setup::setup().and_then(|()| build()).and_then(|()| demo::demo()),
        Cmd::Test { no_vm } => test(!no_vm),
        Cmd::VmTest => setup::setup().and_then(|()| build()).and_then(|()| vm_test()),
        Cmd::Bench { what, quick, json, ztunnel, same_node } => match what.as_deref() {
            None | Some("data" | "l4" | "waypoint") => {
                let sections = match what.as_deref() {
                    Some("l4") => bench::Sections::L4,
                    Some("waypoint") => bench::Sections::Waypoint,
                    _ => bench::Sections::Both,
                };
                bench::Options::new(quick, json, ztunnel, sections, same_node)
                    .and_then(|options| setup::setup().and_then(|()| build()).and_then(|()| bench::bench(&options)))
            }
            Some("control" | "micro") if same_node => {
                Err(anyhow::anyhow!("--same-node belongs to the L4 legs: use `bench l4 --same-node`"))
            }
            Some("control") if json.is_some() || ztunnel.is_some() => {
                Err(anyhow::anyhow!("--json and --ztunnel belong to the data-plane benchmark, not `bench control`"))
            }
            Some("control") => setup::setup().and_then(|()| build()).and_then(|()| {
                if quick {
                    bench::control::bench(20, 2_000, 10_000)
                } else {
                    bench::control::bench(100, 10_000, 50_000)
                }
            }),
            Some("micro") if json.is_some() || ztunnel.is_some() => {
                Err(anyhow::anyhow!("--json and --ztunnel belong to the data-plane benchmark, not `bench micro`"))
            }
            Some("micro") => bench::micro::bench(quick),
            Some(other) => Err(anyhow::anyhow!(
                "unknown benchmark {other}: expected `l4`, `waypoint`, `control`, `micro` or nothing"
            )),
        },
        Cmd::Interop { ztunnel, json } => interop::Options::new(&ztunnel, json)
            .and_then(|options| setup::setup().and_then(|()| build()).and_then(|()| interop::interop(&options))),
        Cmd::Fuzz { seconds, target } => {
            setup::setup().and_then(|()| fuzz::fuzz(seconds, target.as_deref(), fuzz::Corpus::Kept))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

pub fn ebpf_object() -> PathBuf {
    root().join("mesh-ebpf/target/bpfel-unknown-none/release/mesh-ebpf")
}

pub fn release_bin(name: &str) -> PathBuf {
    root().join("target/release").join(name)
}

/// Runs a command from the workspace root, failing with its name on a non-zero exit.
pub fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .current_dir(cmd.get_current_dir().map_or_else(root, Path::to_owned))
        .status()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// `cargo` with the environment of the outer `cargo xtask` removed, so the nested
/// build picks its own toolchain.
pub fn cargo(toolchain: Option<&str>) -> Command {
    let mut cmd = Command::new("cargo");
    if let Some(toolchain) = toolchain {
        cmd.arg(format!("+{toolchain}"));
    }
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key == "RUSTUP_TOOLCHAIN"
            || key == "RUSTC"
            || key == "RUSTC_WRAPPER"
            || key == "RUSTFLAGS"
            || key == "CARGO"
            || (key.starts_with("CARGO_") && key != "CARGO_HOME")
        {
            cmd.env_remove(key);
        }
    }
    cmd
}

pub fn build() -> anyhow::Result<()> {
    println!("==> building the eBPF programs (nightly, bpfel-unknown-none)");
    sh(cargo(Some("nightly")).args(["build", "--release"]).current_dir(root().join("mesh-ebpf")))?;
    println!("==> building the release binaries");
    sh(cargo(None).args(["build", "--release", "--workspace", "--bins"]).env("MESH_EBPF_OBJECT", ebpf_object()))?;
    Ok(())
}

pub fn lab_spec(nodes: usize, pods_per_node: usize) -> LabSpec {
    LabSpec {
        prefix: LAB_PREFIX.into(),
        nodes,
        pods_per_node,
        // Another agent build for an A/B run, e.g. MESH_AGENT_BIN=/tmp/old/mesh-agent.
        agent_bin: std::env::var_os("MESH_AGENT_BIN").map_or_else(|| release_bin("mesh-agent"), PathBuf::from),
        echo_bin: release_bin("mesh-echo"),
        agent_args: Vec::new(),
        controller_bin: Some(release_bin("mesh-controller")),
        controller_args: Vec::new(),
        kubernetes: false,
        ca_root: None,
        waypoint_bin: None,
    }
}

fn lab(command: LabCmd) -> anyhow::Result<()> {
    match command {
        LabCmd::Up { nodes, pods_per_node, waypoint } => {
            setup::setup()?;
            build()?;
            let mut spec = lab_spec(nodes, pods_per_node);
            if waypoint {
                spec.waypoint_bin = Some(release_bin("mesh-waypoint"));
            }
            let mut lab = Lab::up(spec)?;
            lab.keep();
            print!("{}", lab.status());
            println!(
                "try: cargo xtask lab exec n1-p1 -- curl -s http://{}:8080/",
                lab.pods.last().map_or("10.98.2.11", |p| p.ip4.as_str())
            );
            Ok(())
        }
        LabCmd::Status => {
            print!("{}", Lab::attach(LAB_PREFIX)?.status());
            Ok(())
        }
        LabCmd::Exec { target, command } => {
            let lab = Lab::attach(LAB_PREFIX)?;
            let argv: Vec<&str> = command.iter().map(String::as_str).collect();
            let code = lab.exec_interactive(&target, &argv)?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        LabCmd::Down => {
            let report = mesh_lab::down(LAB_PREFIX)?;
            println!(
                "lab down: {} processes stopped, {} namespaces, {} cgroups removed, pins {}",
                report.processes,
                report.netns,
                report.cgroups,
                if report.pins { "removed" } else { "none" }
            );
            let left = mesh_lab::leftovers(LAB_PREFIX);
            if !left.is_empty() {
                bail!("left over: {}", left.join(", "));
            }
            Ok(())
        }
    }
}

fn test(vm: bool) -> anyhow::Result<()> {
    setup::setup()?;
    build()?;
    println!("==> cargo fmt --check");
    sh(cargo(None).args(["fmt", "--all", "--check"]))?;
    sh(cargo(Some("nightly")).args(["fmt", "--check"]).current_dir(root().join("mesh-ebpf")))?;
    sh(cargo(None).args(["fmt", "--check"]).current_dir(root().join("fuzz")))?;
    println!("==> cargo clippy -D warnings");
    sh(cargo(None)
        .args(["clippy", "--release", "--workspace", "--all-targets", "--", "-D", "warnings"])
        .env("MESH_EBPF_OBJECT", ebpf_object()))?;
    println!("==> unit and end-to-end tests");
    sh(cargo(None)
        .args(["test", "--workspace", "--", "--test-threads=1"])
        .env("MESH_EBPF_OBJECT", ebpf_object())
        .env("MESH_AGENT_BIN", release_bin("mesh-agent"))
        .env("MESH_CONTROLLER_BIN", release_bin("mesh-controller"))
        .env("MESH_WAYPOINT_BIN", release_bin("mesh-waypoint"))
        .env("MESHCTL_BIN", release_bin("meshctl")))?;
    // Briefly, on the committed seeds: a regression check, not a search (`cargo xtask
    // fuzz` is for that).
    fuzz::fuzz(FUZZ_SECONDS, None, fuzz::Corpus::Fresh)?;
    if vm {
        vm_test()?;
    }
    Ok(())
}

fn vm_test() -> anyhow::Result<()> {
    let kernel = std::fs::read_dir("/boot")?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with("vmlinuz-6.1.") && n.to_string_lossy().ends_with("-amd64")
            })
        })
        .max()
        .context("no Debian 6.1 kernel in /boot (cargo xtask setup installs linux-image-amd64)")?;
    println!("==> building the end-to-end test binary");
    let out = cargo(None)
        .args(["test", "-p", "mesh-lab", "--test", "e2e", "--no-run", "--message-format=json"])
        .env("MESH_EBPF_OBJECT", ebpf_object())
        .current_dir(root())
        .output()?;
    if !out.status.success() {
        bail!("building the e2e test binary failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let binary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == "e2e")
        .find_map(|v| v["executable"].as_str().map(str::to_owned))
        .context("cargo did not report the e2e test binary")?;
    println!("==> booting {} (TCG, this takes a minute) to run the capture tests", kernel.display());
    let script = format!(
        "cd {root} && MESH_AGENT_BIN={agent} MESH_IN_VM=1 {binary} capture --test-threads=1; echo \"vm-test exit: $?\"",
        root = root().display(),
        agent = release_bin("mesh-agent").display(),
    );
    let output = Command::new("vng")
        .args([
            "--run",
            &kernel.display().to_string(),
            "--disable-kvm",
            "--force-9p",
            "--memory",
            "2G",
            "--cpus",
            "2",
            "--exec",
            &script,
        ])
        .current_dir(root())
        .output()
        .context("run vng (cargo xtask setup installs virtme-ng)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    if !stdout.contains("vm-test exit: 0") {
        bail!("capture tests failed inside the 6.1 VM");
    }
    if stdout.contains("SKIPPED") {
        bail!("capture tests were skipped inside the VM; they must run there");
    }
    println!("==> vm-test: capture tests passed on {}", kernel.display());
    Ok(())
}
