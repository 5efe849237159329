//! `cargo xtask bench control`: the control plane at scale. A generated configuration
//! (10,000 services, 50,000 workloads, 100 nodes) is loaded and validated in process
//! (load + view computation times, per-node view size); then a real `mesh-controller`
//! serves it on loopback to 100 streaming clients (`curl --http2` with node
//! certificates, one per node) and one real `mesh-agent`, and one change is pushed to
//! all of them.
use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;
use mesh_common::control::{all_objects, node_identity};
use mesh_controller::{
    ca::Ca,
    source,
    view::{ViewIndex, encode_snapshot, node_view_keys},
};

const DIR: &str = "/tmp/mesh-bench-control";
const CONTROL: &str = "127.0.0.1:25012";
const ADMIN: &str = "127.0.0.1:25014";

/// Stops every process the benchmark started and removes what it made, also on error.
struct Cleanup(Vec<Child>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all("/sys/fs/bpf/mesh-bench");
        let _ = fs::remove_dir(cgroup());
        let _ = fs::remove_dir_all(DIR);
    }
}

fn cgroup() -> PathBuf {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mesh_common::host::find_cgroup2_mount(&mountinfo).unwrap_or_else(|| "/sys/fs/cgroup".into()).join("mesh-bench")
}

pub(crate) fn generate(dir: &Path, nodes: usize, services: usize, workloads: usize) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    let namespaces = 100;
    let mut yaml = String::new();
    for ns in 0..namespaces {
        let _ = write!(
            yaml,
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns-{ns}\n  labels:\n    istio.io/dataplane-mode: ambient\n---\n"
        );
    }
    for s in 0..services {
        let _ = write!(
            yaml,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{s}\n  namespace: ns-{}\nspec:\n  clusterIP: 10.96.{}.{}\n  selector:\n    app: app-{s}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n---\n",
            s % namespaces,
            s / 250,
            s % 250 + 1
        );
    }
    fs::write(dir.join("services.yaml"), &yaml)?;
    yaml.clear();
    for w in 0..workloads {
        let _ = write!(
            yaml,
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pod-{w}\n  namespace: ns-{}\n  labels:\n    app: app-{}\nspec:\n  nodeName: node{}\n  serviceAccountName: sa-{}\nstatus:\n  podIP: 10.{}.{}.{}\n---\n",
            w % namespaces,
            w % services,
            w % nodes + 1,
            w % 20,
            100 + w / 65536,
            (w / 256) % 256,
            w % 256
        );
    }
    fs::write(dir.join("pods.yaml"), &yaml)?;
    Ok(())
}

fn status_version() -> Option<u64> {
    let out = Command::new("curl").args(["-sf", "--max-time", "2", &format!("http://{ADMIN}/status")]).output().ok()?;
    serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()?["version"].as_u64()
}

fn agent_version() -> u64 {
    Command::new("curl")
        .args(["-sf", "--max-time", "2", "http://127.0.0.1:25000/config_dump"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .and_then(|d| d["control"]["version"].as_u64())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    mesh_lab::proc_status_kib(pid, "VmRSS").unwrap_or(0)
}

/// How many of the clients' stream files end with a complete line carrying
/// `version` (only the tail is read: snapshots are megabytes).
fn received(dir: &Path, nodes: usize, version: u64) -> usize {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let needle = format!("\"version\":{version}");
    (1..=nodes)
        .filter(|n| {
            let Ok(mut file) = fs::File::open(dir.join(format!("stream-{n}.ndjson"))) else { return false };
            let len = file.metadata().map_or(0, |m| m.len());
            // The version field sits near the start of a line; a snapshot line can be
            // long, so look at its head through the file's start when it is the only line.
            let mut tail = Vec::new();
            let from = len.saturating_sub(256 * 1024);
            if file.seek(SeekFrom::Start(from)).is_err() || file.read_to_end(&mut tail).is_err() {
                return false;
            }
            let mut head = vec![0u8; 256];
            let head_ok = file.seek(SeekFrom::Start(0)).is_ok() && file.read(&mut head).is_ok();
            tail.ends_with(b"\n")
                && (tail.windows(needle.len()).any(|w| w == needle.as_bytes())
                    || (head_ok && head.windows(needle.len()).any(|w| w == needle.as_bytes())))
        })
        .count()
}

fn write_credentials(dir: &Path, nodes: usize) -> anyhow::Result<()> {
    let ca = Ca::load_or_create(&dir.join("ca"), "cluster.local")?;
    for n in 1..=nodes {
        let cred = dir.join(format!("node{n}"));
        let uri = node_identity("cluster.local", &format!("node{n}"));
        let (issued, key) =
            ca.issue_with_key(vec![rcgen::SanType::URI(uri.as_str().try_into()?)], Duration::from_hours(1))?;
        fs::create_dir_all(&cred)?;
        fs::write(cred.join("node-cert.pem"), issued.cert_pem)?;
        fs::write(cred.join("node-key.pem"), key)?;
        fs::write(cred.join("root-cert.pem"), ca.root_pem())?;
    }
    Ok(())
}

fn stream_client(dir: &Path, n: usize) -> anyhow::Result<Child> {
    let cred = dir.join(format!("node{n}"));
    let out = fs::File::create(dir.join(format!("stream-{n}.ndjson")))?;
    Ok(Command::new("curl")
        .args(["-sN", "--http2", "--resolve", "mesh-controller:25012:127.0.0.1"])
        .arg("--cert")
        .arg(cred.join("node-cert.pem"))
        .arg("--key")
        .arg(cred.join("node-key.pem"))
        .arg("--cacert")
        .arg(cred.join("root-cert.pem"))
        .arg("https://mesh-controller:25012/v1/config")
        .stdout(out)
        .stderr(Stdio::null())
        .spawn()?)
}

pub fn bench(nodes: usize, services: usize, workloads: usize) -> anyhow::Result<()> {
    let _ = fs::remove_dir_all(DIR);
    let dir = Path::new(DIR);
    let config_dir = dir.join("config");
    let mut cleanup = Cleanup(Vec::new());
    println!("==> bench control: {services} services, {workloads} workloads, {nodes} nodes");
    generate(&config_dir, nodes, services, workloads)?;

    let t = Instant::now();
    let config = source::load(&config_dir, "cluster.local", "istio-system").map_err(|r| anyhow::anyhow!("{r}"))?;
    let load = t.elapsed();
    let t = Instant::now();
    let all = all_objects(&config);
    let index = ViewIndex::new(&config);
    let view_objects = (1..=nodes).map(|n| node_view_keys(&index, &all, &format!("node{n}")).len()).max().unwrap_or(0);
    let compute = t.elapsed();
    let snapshot_bytes = encode_snapshot(&index, &all, "node1", 1).len();
    drop((config, all, index));
    write_credentials(dir, nodes)?;

    let t = Instant::now();
    let controller = Command::new(crate::release_bin("mesh-controller"))
        .args(["serve", "--listen", CONTROL, "--admin", ADMIN, "--log", "warn"])
        .arg("--config-dir")
        .arg(&config_dir)
        .arg("--ca-dir")
        .arg(dir.join("ca"))
        .stdout(Stdio::null())
        .spawn()?;
    let controller_pid = controller.id();
    cleanup.0.push(controller);
    mesh_lab::wait_for(Duration::from_mins(2), || status_version().is_some()).context("controller did not start")?;
    let startup = t.elapsed();

    let t = Instant::now();
    for n in 1..=nodes {
        cleanup.0.push(stream_client(dir, n)?);
    }
    let v1 = status_version().context("controller version")?;
    mesh_lab::wait_for(Duration::from_mins(5), || received(dir, nodes, v1) == nodes)
        .context("not every client got its snapshot")?;
    let snapshots = t.elapsed();

    // One real agent (node1), for its memory with the view.
    let cg = cgroup();
    fs::create_dir_all(&cg)?;
    let agent = Command::new(crate::release_bin("mesh-agent"))
        .args(["run", "--node-name", "node1", "--controller", CONTROL, "--log", "warn"])
        .args(["--admin-addr", "127.0.0.1:25000", "--readiness-addr", "127.0.0.1:25021"])
        .args(["--metrics-addr", "127.0.0.1:25020", "--bpffs-dir", "/sys/fs/bpf/mesh-bench"])
        .arg("--credential-dir")
        .arg(dir.join("node1"))
        .arg("--cgroup-root")
        .arg(&cg)
        .arg("--state-dir")
        .arg(dir.join("agent-state"))
        .stdout(Stdio::null())
        .spawn()?;
    let agent_pid = agent.id();
    cleanup.0.push(agent);
    mesh_lab::wait_for(Duration::from_mins(2), || agent_version() == v1).context("agent did not apply the snapshot")?;
    let agent_rss = rss_kib(agent_pid);

    // One change that every node's view holds: a mesh-wide PeerAuthentication.
    let t = Instant::now();
    fs::write(
        config_dir.join("policy.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n",
    )?;
    mesh_lab::wait_for(Duration::from_mins(2), || status_version().is_some_and(|v| v > v1))
        .context("change not applied")?;
    let applied = t.elapsed();
    let v2 = status_version().context("controller version")?;
    let t = Instant::now();
    mesh_lab::wait_for(Duration::from_mins(2), || received(dir, nodes, v2) == nodes && agent_version() == v2)
        .context("the change did not reach every client")?;
    let push = t.elapsed();
    let controller_rss = rss_kib(controller_pid);

    println!("\n{:<56} {:>12}", "metric", "value");
    let rows: [(String, String); 10] = [
        ("load + validate (in process)".into(), format!("{load:.2?}")),
        (format!("compute all {nodes} node views (in process)"), format!("{compute:.2?}")),
        ("objects in the largest node view".into(), view_objects.to_string()),
        ("snapshot size of one node".into(), format!("{:.1} MiB", snapshot_bytes as f64 / 1_048_576.0)),
        ("controller start (load, validate, serve)".into(), format!("{startup:.2?}")),
        (format!("snapshots streamed to {nodes} clients"), format!("{snapshots:.2?}")),
        ("change: file written -> controller applied it".into(), format!("{applied:.2?}")),
        (format!("push: applied -> {nodes} clients + agent have it"), format!("{push:.2?}")),
        ("controller RSS".into(), format!("{:.1} MiB", controller_rss as f64 / 1024.0)),
        ("agent RSS with its view".into(), format!("{:.1} MiB", agent_rss as f64 / 1024.0)),
    ];
    for (name, value) in rows {
        println!("{name:<56} {value:>12}");
    }
    drop(cleanup);
    Ok(())
}
