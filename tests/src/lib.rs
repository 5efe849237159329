//! The lab: a mesh of nodes and pods on one machine, made of network namespaces.
//!
//! ```text
//!   {prefix}-fabric: bridge br0 ── veth ── {prefix}-node1 (10.99.0.1, fd00:99::1)
//!                               └─ veth ── {prefix}-node2 ...
//!   {prefix}-node<i>: bridge pods (10.98.<i>.1/24, fd00:98:<i>::1/64), runs mesh-agent
//!        └─ veth ── {prefix}-n<i>-p<j>: eth0 10.98.<i>.<10+j>, fd00:98:<i>::<10+j>, runs mesh-echo
//! ```
//! Every pod process runs in its own cgroup v2 group below its node's group, which is
//! where that node's agent attaches its capture programs. Pods in namespace `shop`
//! (labelled `istio.io/dataplane-mode=ambient`) are enrolled; the last pod of each
//! node lives in `legacy` and is not. Only addresses inside the lab's namespaces are
//! used. [`down`] removes everything a lab made, by name, also after a crash.
use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::{net::UnixStream, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

pub mod probe;
pub mod prometheus;
pub mod waypoint;

/// Where labs keep their state (logs, pids, sockets, description).
pub const STATE_ROOT: &str = "/run/mesh-lab";
/// The echo server's HTTP and raw-echo ports in every pod.
pub const HTTP_PORT: u16 = 8080;
pub const ECHO_PORT: u16 = 9000;
/// The echo server's sink (reads to the end, answers the byte count and SHA-256).
pub const SINK_PORT: u16 = 9001;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabSpec {
    /// Prefix of every namespace, cgroup and pin the lab makes; starts with `mesh-`
    /// or is `mesh`.
    pub prefix: String,
    pub nodes: usize,
    pub pods_per_node: usize,
    pub agent_bin: PathBuf,
    pub echo_bin: PathBuf,
    /// Extra arguments for every agent (`--exclude-port 22`, `--log-format json`).
    #[serde(default)]
    pub agent_args: Vec<String>,
    /// Runs a `mesh-controller` (in the fabric namespace, at [`CONTROLLER_IP`]) serving
    /// the lab's YAML directory, and connects every agent to it.
    #[serde(default)]
    pub controller_bin: Option<PathBuf>,
    /// Extra arguments for the controller (`--cert-lifetime-seconds 6`).
    #[serde(default)]
    pub controller_args: Vec<String>,
    /// Kubernetes mode: the controller watches an API server (the test double in
    /// `tests/fake-apiserver.py`, serving recorded API objects rewritten to the lab's
    /// pods) instead of a YAML directory; agents authenticate with tokens and enroll
    /// the meshed pods of their node by themselves. Needs `controller_bin`.
    #[serde(default)]
    pub kubernetes: bool,
    /// A directory with `root-cert.pem` and `root-key.pem` the controller's CA starts
    /// from instead of a new root (copied into the lab's CA directory), e.g. to share a
    /// root with another mesh.
    #[serde(default)]
    pub ca_root: Option<PathBuf>,
    /// Runs this `mesh-waypoint` as the waypoint `waypoint` of namespace `shop` (its
    /// Gateway and the namespace's `istio.io/use-waypoint` label are in the lab's
    /// config), in a pod of node 1 that the mesh does not capture. Needs
    /// `controller_bin` (not with `kubernetes`).
    #[serde(default)]
    pub waypoint_bin: Option<PathBuf>,
}

/// The lab's waypoint: its name, namespace, and admin/metrics/readiness ports.
pub const WAYPOINT: &str = "waypoint";

/// The API server test double's address, inside the fabric namespace.
pub const API_SERVER: &str = "127.0.0.1:16443";

/// A recorded API object (`mesh-controller/tests/recorded/<name>`).
pub fn recorded(name: &str) -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-controller/tests/recorded").join(name);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
}

/// The controller's address on the fabric.
pub const CONTROLLER_IP: &str = "10.99.0.254";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub netns: String,
    pub ip4: String,
    pub ip6: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub state_dir: PathBuf,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pod {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub node: usize,
    pub netns: String,
    pub ip4: String,
    pub ip6: String,
    pub cgroup: PathBuf,
    /// Whether its namespace is labelled for the mesh.
    pub meshed: bool,
}

/// A running lab. Dropping it tears it down unless [`Lab::keep`] was called.
#[derive(Debug, Serialize, Deserialize)]
pub struct Lab {
    pub spec: LabSpec,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// The waypoint's pod, when the lab runs one.
    #[serde(default)]
    pub waypoint: Option<Pod>,
    pub dir: PathBuf,
    #[serde(skip)]
    keep: bool,
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!("{:?} failed ({}): {}", cmd, out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

/// A new network namespace with loopback up and IPv6 duplicate-address detection off
/// for every link made in it later (link-local addresses included): while an address
/// is tentative, the first IPv6 connection through it waited about 2 s.
fn netns_add(ns: &str) -> anyhow::Result<()> {
    ip(&["netns", "add", ns])?;
    run(Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw"])
        .args(["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"]))?;
    ip(&["-n", ns, "link", "set", "lo", "up"])
}

fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
    mesh_common::host::find_cgroup2_mount(&mountinfo).context("no cgroup2 filesystem mounted")
}

/// Whether this process runs with effective uid 0 (read from /proc, no libc call).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines().find(|l| l.starts_with("Uid:")).is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
    })
}

/// Why this machine cannot run the lab, if it cannot.
pub fn unsupported_reason() -> Option<String> {
    if !is_root() {
        return Some("the lab needs root (network namespaces, cgroups, eBPF)".into());
    }
    for tool in ["ip", "nsenter", "curl"] {
        if Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().map_or(true, |o| !o.status.success())
        {
            return Some(format!("{tool} is not installed (run `cargo xtask setup`)"));
        }
    }
    if cgroup2_root().is_err() {
        return Some("no cgroup v2 filesystem is mounted".into());
    }
    None
}

impl Lab {
    /// Builds the lab and starts its agents and workloads. Anything left by an
    /// earlier lab with the same prefix is removed first; a failure half way removes
    /// what was made.
    pub fn up(spec: LabSpec) -> anyhow::Result<Self> {
        if !(spec.prefix == "mesh" || spec.prefix.starts_with("mesh-")) {
            bail!("lab prefix '{}' must be 'mesh' or start with 'mesh-'", spec.prefix);
        }
        if spec.nodes == 0 || spec.nodes > 50 || spec.pods_per_node == 0 || spec.pods_per_node > 50 {
            bail!("a lab has 1..=50 nodes and 1..=50 pods per node");
        }
        down(&spec.prefix)?;
        let cg = cgroup2_root()?.join(&spec.prefix);
        let dir = Path::new(STATE_ROOT).join(&spec.prefix);
        fs::create_dir_all(&dir)?;
        let mut lab = Self { nodes: Vec::new(), pods: Vec::new(), waypoint: None, dir, spec, keep: false };
        let p = lab.spec.prefix.clone();
        for i in 1..=lab.spec.nodes {
            lab.nodes.push(Node {
                name: format!("node{i}"),
                netns: format!("{p}-node{i}"),
                ip4: format!("10.99.0.{i}"),
                ip6: format!("fd00:99::{i}"),
                cgroup: cg.join(format!("node{i}")),
                bpffs: Path::new("/sys/fs/bpf").join(&p).join(format!("node{i}")),
                state_dir: lab.dir.join(format!("node{i}")),
            });
            for j in 1..=lab.spec.pods_per_node {
                let meshed = lab.spec.pods_per_node == 1 || j < lab.spec.pods_per_node;
                let name = format!("n{i}-p{j}");
                lab.pods.push(Pod {
                    uid: format!("uid-{p}-{name}"),
                    netns: format!("{p}-{name}"),
                    ip4: format!("10.98.{i}.{}", 10 + j),
                    ip6: format!("fd00:98:{i}::{}", 10 + j),
                    // The path carries the pod's UID, as kubelet's cgroups do: that is
                    // how an agent in Kubernetes mode finds the pod's processes.
                    cgroup: cg.join(format!("node{i}")).join("kubepods").join(format!("poduid-{p}-{name}")),
                    namespace: if meshed { "shop" } else { "legacy" }.into(),
                    node: i,
                    meshed,
                    name,
                });
            }
        }
        if lab.spec.waypoint_bin.is_some() {
            if lab.spec.controller_bin.is_none() || lab.spec.kubernetes {
                bail!("a lab waypoint needs a controller serving the lab's YAML (not Kubernetes mode)");
            }
            lab.waypoint = Some(Pod {
                name: WAYPOINT.into(),
                uid: format!("uid-{p}-{WAYPOINT}"),
                namespace: "shop".into(),
                node: 1,
                netns: format!("{p}-{WAYPOINT}"),
                ip4: "10.98.1.250".into(),
                ip6: "fd00:98:1::250".into(),
                cgroup: cg.join("node1").join("kubepods").join(format!("poduid-{p}-{WAYPOINT}")),
                meshed: false,
            });
        }
        if let Err(e) = lab.build() {
            let _ = down(&lab.spec.prefix);
            return Err(e.context("lab up failed; everything it made was removed"));
        }
        Ok(lab)
    }

    /// Re-opens a lab started by another process (`lab status`, `lab exec`).
    pub fn attach(prefix: &str) -> anyhow::Result<Self> {
        let path = Path::new(STATE_ROOT).join(prefix).join("lab.json");
        let text =
            fs::read_to_string(&path).with_context(|| format!("no lab '{prefix}' is up ({})", path.display()))?;
        let mut lab: Self = serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        lab.keep = true;
        Ok(lab)
    }

    /// Leaves the lab running when this value is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let p = &self.spec.prefix;
        let fabric = format!("{p}-fabric");
        netns_add(&fabric)?;
        ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
        for (i, node) in self.nodes.iter().enumerate() {
            let i = i + 1;
            let ns = &node.netns;
            netns_add(ns)?;
            let port = format!("n{i}");
            ip(&["link", "add", "fab", "netns", ns, "type", "veth", "peer", "name", &port, "netns", &fabric])?;
            ip(&["-n", &fabric, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{}/24", node.ip4), "dev", "fab"])?;
            ip(&["-n", ns, "addr", "add", &format!("{}/64", node.ip6), "dev", "fab", "nodad"])?;
            ip(&["-n", ns, "link", "set", "fab", "up"])?;
            ip(&["-n", ns, "link", "add", "pods", "type", "bridge"])?;
            ip(&["-n", ns, "addr", "add", &format!("10.98.{i}.1/24"), "dev", "pods"])?;
            ip(&["-n", ns, "addr", "add", &format!("fd00:98:{i}::1/64"), "dev", "pods", "nodad"])?;
            ip(&["-n", ns, "link", "set", "pods", "up"])?;
            sysctl(ns, "net.ipv4.ip_forward", "1")?;
            sysctl(ns, "net.ipv6.conf.all.forwarding", "1")?;
            for (k, other) in self.nodes.iter().enumerate() {
                let k = k + 1;
                if k != i {
                    ip(&["-n", ns, "route", "add", &format!("10.98.{k}.0/24"), "via", &other.ip4])?;
                    ip(&["-n", ns, "-6", "route", "add", &format!("fd00:98:{k}::/64"), "via", &other.ip6])?;
                }
            }
            fs::create_dir_all(node.cgroup.join("agent"))?;
            fs::create_dir_all(node.cgroup.join("host"))?;
            fs::create_dir_all(&node.state_dir)?;
        }
        for pod in self.pods.iter().chain(&self.waypoint) {
            self.plug(pod)?;
        }
        self.save()?;
        if self.spec.kubernetes {
            self.start_api_server()?;
            self.start_controller()?;
        } else if self.spec.controller_bin.is_some() {
            self.write_config()?;
            self.start_controller()?;
        }
        for pod in self.pods.clone() {
            let echo = self.spec.echo_bin.display().to_string();
            self.spawn(&pod.name, &pod.netns, &pod.cgroup, &[&echo, "serve", "--name", &pod.name])?;
        }
        for n in 1..=self.nodes.len() {
            self.start_agent(n)?;
        }
        for pod in self.pods.clone() {
            wait_for(Duration::from_secs(10), || {
                Self::exec_netns(
                    &pod.netns,
                    None,
                    &["curl", "-s", "-o", "/dev/null", &format!("http://127.0.0.1:{HTTP_PORT}/")],
                )
                .is_ok_and(|o| o.status.success())
            })
            .with_context(|| format!("echo server in {} did not come up", pod.name))?;
        }
        if self.spec.kubernetes {
            self.wait_discovered()?;
        } else {
            for pod in self.pods.clone() {
                if pod.meshed {
                    self.enroll(&pod.name)?;
                }
            }
        }
        if self.spec.controller_bin.is_some() {
            self.wait_certificates()?;
        }
        if self.waypoint.is_some() {
            self.start_waypoint()?;
        }
        Ok(())
    }

    /// Starts (or restarts) the lab's waypoint and waits until it is ready.
    pub fn start_waypoint(&self) -> anyhow::Result<()> {
        let (Some(pod), Some(bin)) = (&self.waypoint, &self.spec.waypoint_bin) else {
            bail!("this lab runs no waypoint");
        };
        let credential = self.node(pod.node).state_dir.join("credential");
        let state = self.dir.join(WAYPOINT);
        // The waypoint is a pod that talks to the controller: the fabric routes its
        // address back through its node.
        let fabric = format!("{}-fabric", self.spec.prefix);
        let via = &self.node(pod.node).ip4;
        let _ = ip(&["-n", &fabric, "route", "replace", &format!("{}/32", pod.ip4), "via", via]);
        // Its own `/etc/hosts` and `/etc/resolv.conf`, as kubelet writes them for
        // every pod (with the pod's `hostAliases`): the names the waypoint resolves are
        // the lab's ([`Lab::add_host`]), and any other name fails at once (its name
        // server is its own loopback, where nothing listens) instead of leaving the lab.
        let hosts = self.hosts_file();
        if !hosts.exists() {
            fs::write(&hosts, "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n")?;
        }
        let resolv = self.dir.join("waypoint-resolv.conf");
        fs::write(&resolv, "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")?;
        let nsswitch = self.dir.join("waypoint-nsswitch.conf");
        fs::write(&nsswitch, "hosts: files dns\n")?;
        let argv: Vec<String> = vec![
            "unshare".into(),
            "--mount".into(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-c".into(),
            r#"mount --bind "$0" /etc/hosts && mount --bind "$1" /etc/resolv.conf && mount --bind "$2" /etc/nsswitch.conf && shift 2 && exec "$@""#.into(),
            hosts.display().to_string(),
            resolv.display().to_string(),
            nsswitch.display().to_string(),
            bin.display().to_string(),
            "--namespace".into(),
            pod.namespace.clone(),
            "--name".into(),
            WAYPOINT.into(),
            "--controller".into(),
            format!("{CONTROLLER_IP}:15012"),
            "--credential-dir".into(),
            credential.display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
            "--drain-seconds".into(),
            "5".into(),
        ];
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.spawn(WAYPOINT, &pod.netns, &pod.cgroup, &argv)?;
        wait_for(Duration::from_secs(20), || {
            Self::exec_netns(&pod.netns, None, &["curl", "-sf", "http://127.0.0.1:15021/healthz/ready"])
                .is_ok_and(|o| o.status.success())
        })
        .with_context(|| format!("waypoint not ready; log:\n{}", self.log_of(WAYPOINT)))
    }

    /// The waypoint pod's `/etc/hosts`.
    fn hosts_file(&self) -> PathBuf {
        self.dir.join("waypoint-hosts")
    }

    /// Makes `name` resolve to `ip` in the waypoint pod (a line of its `/etc/hosts`,
    /// which the resolver reads on every lookup).
    pub fn add_host(&self, name: &str, ip: &str) -> anyhow::Result<()> {
        let mut hosts =
            fs::OpenOptions::new().append(true).open(self.hosts_file()).context("the waypoint's hosts file")?;
        writeln!(hosts, "{ip}\t{name}")?;
        Ok(())
    }

    /// A pod's network namespace, wired to its node's pod bridge, and its cgroup.
    fn plug(&self, pod: &Pod) -> anyhow::Result<()> {
        let ns = &pod.netns;
        let node = &self.nodes[pod.node - 1];
        let i = pod.node;
        netns_add(ns)?;
        let port = format!("p-{}", pod.name);
        ip(&["link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port, "netns", &node.netns])?;
        ip(&["-n", &node.netns, "link", "set", &port, "master", "pods", "up"])?;
        ip(&["-n", ns, "addr", "add", &format!("{}/24", pod.ip4), "dev", "eth0"])?;
        ip(&["-n", ns, "addr", "add", &format!("{}/64", pod.ip6), "dev", "eth0", "nodad"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", &format!("10.98.{i}.1")])?;
        ip(&["-n", ns, "-6", "route", "add", "default", "via", &format!("fd00:98:{i}::1")])?;
        fs::create_dir_all(&pod.cgroup)?;
        Ok(())
    }

    fn save(&self) -> anyhow::Result<()> {
        fs::write(self.dir.join("lab.json"), serde_json::to_vec_pretty(self)?)?;
        Ok(())
    }

    /// Starts a long-running process inside `netns` and `cgroup`, detached, logging
    /// to `<dir>/<name>.log`, its pid in `<dir>/<name>.pid`.
    fn spawn(&self, name: &str, netns: &str, cgroup: &Path, argv: &[&str]) -> anyhow::Result<u32> {
        let log = fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = Self::netns_command(netns, Some(cgroup), argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {name}"))?;
        fs::write(self.dir.join(format!("{name}.pid")), child.id().to_string())?;
        Ok(child.id())
    }

    pub fn node(&self, n: usize) -> &Node {
        &self.nodes[n - 1]
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name} in the lab"))
    }

    /// Starts (or restarts) node `n`'s agent and waits until it is ready.
    pub fn start_agent(&self, n: usize) -> anyhow::Result<()> {
        self.start_agent_with(n, &[])?;
        self.wait_agent_ready(n)
    }

    /// Starts node `n`'s agent with `extra` arguments, without waiting for it.
    pub fn start_agent_with(&self, n: usize, extra: &[&str]) -> anyhow::Result<()> {
        let node = self.node(n).clone();
        let argv = self.agent_argv(n, extra)?;
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let name = format!("agent-{}", node.name);
        // Append to the log across restarts. A renamed log keeps receiving what a
        // still-running previous agent writes (a handover drains in the background).
        let log = self.dir.join(format!("{name}.log"));
        let prev = self.dir.join(format!("{name}.prev.log"));
        if log.exists() {
            fs::rename(&log, &prev)?;
        }
        self.spawn(&name, &node.netns, &node.cgroup.join("agent"), &argv)?;
        Ok(())
    }

    /// Waits until node `n`'s agent reports ready.
    pub fn wait_agent_ready(&self, n: usize) -> anyhow::Result<()> {
        wait_for(Duration::from_secs(15), || {
            self.node_http(n, 15021, "/healthz/ready").is_ok_and(|body| body.trim() == "ready")
        })
        .with_context(|| format!("agent on node{n} not ready; log: {}", self.agent_log(n)))
    }

    /// The pid of node `n`'s (newest) agent.
    pub fn agent_pid(&self, n: usize) -> anyhow::Result<u32> {
        Ok(fs::read_to_string(self.dir.join(format!("agent-node{n}.pid")))?.trim().parse()?)
    }

    /// What node `n`'s previous agent wrote (before a restart or a handover).
    pub fn previous_agent_log(&self, n: usize) -> String {
        fs::read_to_string(self.dir.join(format!("agent-node{n}.prev.log"))).unwrap_or_default()
    }

    /// Starts a capture of TCP on the fabric side of node `n` (`tcpdump -w`); returns
    /// the file it writes. Stop it with `stop_process("tcpdump", "INT")`.
    pub fn capture_fabric(&self, n: usize) -> anyhow::Result<PathBuf> {
        let pcap = self.dir.join("fabric.pcap");
        let pcap_arg = pcap.display().to_string();
        let iface = format!("n{n}");
        self.spawn_in(
            "fabric",
            "tcpdump",
            &["tcpdump", "-i", &iface, "--immediate-mode", "-U", "-s", "0", "-w", &pcap_arg, "tcp"],
        )?;
        wait_for(Duration::from_secs(5), || self.log_of("tcpdump").contains("listening on"))
            .context("tcpdump did not start")?;
        Ok(pcap)
    }

    /// The command line of node `n`'s agent, with `extra` arguments.
    pub fn agent_argv(&self, n: usize, extra: &[&str]) -> anyhow::Result<Vec<String>> {
        let node = self.node(n).clone();
        let agent = self.spec.agent_bin.display().to_string();
        let mut argv: Vec<String> = vec![
            agent,
            "run".into(),
            "--node-name".into(),
            node.name.clone(),
            "--cgroup-root".into(),
            node.cgroup.display().to_string(),
            "--bpffs-dir".into(),
            node.bpffs.display().to_string(),
            "--state-dir".into(),
            node.state_dir.display().to_string(),
        ];
        // A short drain keeps restarts in tests quick, unless the test wants its own.
        if !self.spec.agent_args.iter().map(String::as_str).chain(extra.iter().copied()).any(|a| a == "--drain-seconds")
        {
            argv.extend(["--drain-seconds".into(), "2".into()]);
        }
        if self.spec.kubernetes {
            let token = node.state_dir.join("token");
            fs::write(&token, format!("token-{}\n", node.name))?;
            argv.extend([
                "--controller".into(),
                format!("{CONTROLLER_IP}:15012"),
                "--token-file".into(),
                token.display().to_string(),
                "--root-cert".into(),
                self.ca_dir().join("root-cert.pem").display().to_string(),
                "--kubernetes".into(),
                "--host-netns".into(),
                format!("/run/netns/{}", node.netns),
            ]);
        } else if self.spec.controller_bin.is_some() {
            argv.extend([
                "--controller".into(),
                format!("{CONTROLLER_IP}:15012"),
                "--credential-dir".into(),
                node.state_dir.join("credential").display().to_string(),
            ]);
        }
        argv.extend(self.spec.agent_args.iter().cloned());
        argv.extend(extra.iter().map(|a| (*a).to_owned()));
        Ok(argv)
    }

    /// Waits until every enrolled pod has its workload certificate (the tunnel needs
    /// them on both ends).
    pub fn wait_certificates(&self) -> anyhow::Result<()> {
        for n in 1..=self.nodes.len() {
            wait_for(Duration::from_secs(15), || {
                self.config_dump(n).is_ok_and(|dump| {
                    let certificates = &dump["control"]["certificates"];
                    dump["pods"].as_array().is_some_and(|pods| {
                        pods.iter()
                            .all(|p| p["identity"].as_str().is_some_and(|id| certificates[id]["not_after"].is_number()))
                    })
                })
            })
            .with_context(|| format!("workload certificates on node{n} not issued; log: {}", self.agent_log(n)))?;
        }
        Ok(())
    }

    /// The controller's CA directory (`root-cert.pem`, `root-key.pem`).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// The YAML directory the controller serves.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.join("config")
    }

    /// The lab's namespaces, pods and a service, as Kubernetes manifests.
    fn write_config(&self) -> anyhow::Result<()> {
        let dir = self.config_dir();
        fs::create_dir_all(&dir)?;
        let mut yaml = String::from(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    istio.io/dataplane-mode: ambient\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata:\n  name: legacy\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata:\n  name: istio-system\n---\n\
             apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: shop\nspec:\n  clusterIP: 10.96.0.10\n  selector:\n    app: echo\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n",
        );
        for pod in &self.pods {
            // The first pod of each node is `version: v1`, the others `v2`: the
            // subsets of the seed's canary. The pod-name label selects one pod (as a
            // StatefulSet's does).
            let version = if pod.name.ends_with("-p1") { "v1" } else { "v2" };
            let sa = if pod.meshed { format!("sa-{}", pod.name) } else { "default".into() };
            let _ = write!(
                yaml,
                "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  uid: {}\n  labels:\n    app: echo\n    version: {version}\n    statefulset.kubernetes.io/pod-name: {}\nspec:\n  nodeName: node{}\n  serviceAccountName: {sa}\n  containers:\n  - name: echo\n    image: mesh-echo\nstatus:\n  podIP: {}\n  podIPs:\n  - ip: {}\n  - ip: {}\n",
                pod.name, pod.namespace, pod.uid, pod.name, pod.node, pod.ip4, pod.ip4, pod.ip6
            );
        }
        if let Some(pod) = &self.waypoint {
            // What `istioctl waypoint apply -n shop` declares, its pod, and the
            // namespace's opt-in.
            yaml = yaml.replace(
                "name: shop\n  labels:\n    istio.io/dataplane-mode: ambient\n",
                "name: shop\n  labels:\n    istio.io/dataplane-mode: ambient\n    istio.io/use-waypoint: waypoint\n",
            );
            let _ = write!(
                yaml,
                "---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {WAYPOINT}\n  namespace: {ns}\n  labels:\n    istio.io/waypoint-for: service\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - name: mesh\n    port: 15008\n    protocol: HBONE\n\
                 ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {WAYPOINT}\n  namespace: {ns}\n  uid: {uid}\n  labels:\n    gateway.networking.k8s.io/gateway-name: {WAYPOINT}\n    istio.io/dataplane-mode: none\nspec:\n  nodeName: node{node}\n  serviceAccountName: {WAYPOINT}\n  containers:\n  - name: waypoint\n    image: mesh-waypoint\nstatus:\n  podIP: {ip4}\n  podIPs:\n  - ip: {ip4}\n  - ip: {ip6}\n",
                ns = pod.namespace,
                uid = pod.uid,
                node = pod.node,
                ip4 = pod.ip4,
                ip6 = pod.ip6,
            );
        }
        fs::write(dir.join("lab.yaml"), yaml)?;
        Ok(())
    }

    /// The API server test double's directory (objects, tokens, state, kubeconfig).
    pub fn api_dir(&self) -> PathBuf {
        self.dir.join("api")
    }

    /// The lab as the API objects a cluster would hold: recorded real objects (their
    /// shapes and fields) with the lab's names, UIDs, nodes and addresses.
    fn api_objects(&self) -> serde_json::Value {
        let list =
            |items: Vec<serde_json::Value>| serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
        let namespaces: Vec<serde_json::Value> = recorded("namespaces.json")["items"]
            .as_array()
            .expect("a list")
            .iter()
            .filter(|ns| {
                ["default", "kube-system", "istio-system", "shop", "legacy"]
                    .contains(&ns["metadata"]["name"].as_str().unwrap_or(""))
            })
            .cloned()
            .collect();
        let template = recorded("pods.json")["items"]
            .as_array()
            .expect("a list")
            .iter()
            .find(|p| p["metadata"]["name"] == "echo-7d9f8c6b5-abcde")
            .expect("the recorded echo pod")
            .clone();
        let mut pods = Vec::new();
        for pod in &self.pods {
            let node = self.node(pod.node);
            let mut object = template.clone();
            let meta = &mut object["metadata"];
            meta["name"] = pod.name.clone().into();
            meta["namespace"] = pod.namespace.clone().into();
            meta["uid"] = pod.uid.clone().into();
            meta["labels"] = serde_json::json!({"app": "echo"});
            let sa = if pod.meshed { format!("sa-{}", pod.name) } else { "default".into() };
            let spec = &mut object["spec"];
            spec["nodeName"] = node.name.clone().into();
            spec["serviceAccountName"] = sa.clone().into();
            spec["serviceAccount"] = sa.into();
            let container = &mut spec["containers"][0];
            container["ports"] = serde_json::json!([
                {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                {"name": "echo", "containerPort": ECHO_PORT, "protocol": "TCP"},
            ]);
            // kubelet's probes: HTTP on the named port, TCP on the same one.
            container["readinessProbe"]["httpGet"] = serde_json::json!({"path": "/", "port": "http", "scheme": "HTTP"});
            container["livenessProbe"]["tcpSocket"] = serde_json::json!({"port": HTTP_PORT});
            if let Some(c) = container.as_object_mut() {
                c.remove("startupProbe");
            }
            let status = &mut object["status"];
            status["podIP"] = pod.ip4.clone().into();
            status["podIPs"] = serde_json::json!([{"ip": pod.ip4}, {"ip": pod.ip6}]);
            status["hostIP"] = node.ip4.clone().into();
            status["hostIPs"] = serde_json::json!([{"ip": node.ip4}]);
            pods.push(object);
        }
        let services: Vec<serde_json::Value> = recorded("services.json")["items"]
            .as_array()
            .expect("a list")
            .iter()
            .filter(|s| s["metadata"]["name"] == "echo" && s["metadata"]["namespace"] == "shop")
            .cloned()
            .collect();
        // The echo Service's endpoints as the endpoint controller writes them.
        let mut slice = recorded("endpointslices.json")["items"]
            .as_array()
            .expect("a list")
            .iter()
            .find(|s| s["metadata"]["namespace"] == "shop")
            .expect("the recorded echo slice")
            .clone();
        let mut endpoints = Vec::new();
        for pod in self.pods.iter().filter(|p| p.namespace == "shop") {
            let mut endpoint = slice["endpoints"][0].clone();
            endpoint["addresses"] = serde_json::json!([pod.ip4]);
            endpoint["nodeName"] = self.node(pod.node).name.clone().into();
            endpoint["targetRef"]["name"] = pod.name.clone().into();
            endpoint["targetRef"]["uid"] = pod.uid.clone().into();
            endpoints.push(endpoint);
        }
        slice["endpoints"] = endpoints.into();
        serde_json::json!({
            "namespaces.json": list(namespaces),
            "pods.json": list(pods),
            "services.json": list(services),
            "endpointslices.json": list(vec![slice]),
            "lease.json": recorded("lease.json"),
        })
    }

    /// Starts the API server test double in the fabric namespace with the lab's
    /// objects, and writes the controller's kubeconfig.
    fn start_api_server(&self) -> anyhow::Result<()> {
        let dir = self.api_dir();
        let objects = dir.join("objects");
        fs::create_dir_all(&objects)?;
        if let serde_json::Value::Object(files) = self.api_objects() {
            for (name, content) in files {
                fs::write(objects.join(name), serde_json::to_vec_pretty(&content)?)?;
            }
        }
        // Each node's agent token, reviewed as the recorded TokenReview of an agent
        // pod, bound to that node.
        let review = recorded("tokenreview.json")["status"].clone();
        let mut tokens = serde_json::Map::new();
        for node in &self.nodes {
            let mut status = review.clone();
            status["user"]["extra"]["authentication.kubernetes.io/node-name"] = serde_json::json!([node.name]);
            tokens.insert(format!("token-{}", node.name), status);
        }
        fs::write(dir.join("tokens.json"), serde_json::to_vec_pretty(&tokens)?)?;
        fs::write(
            dir.join("kubeconfig"),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: http://{API_SERVER}\n\
                 users:\n- name: lab\n  user: {{}}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\n\
                 current-context: lab\n"
            ),
        )?;
        let cg = cgroup2_root()?.join(&self.spec.prefix).join("controller");
        fs::create_dir_all(&cg)?;
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fake-apiserver.py");
        let ready = dir.join("ready");
        let _ = fs::remove_file(&ready);
        let (script, objects, tokens, state, ready_arg) = (
            script.display().to_string(),
            objects.display().to_string(),
            dir.join("tokens.json").display().to_string(),
            dir.join("state.json").display().to_string(),
            ready.display().to_string(),
        );
        let fabric = format!("{}-fabric", self.spec.prefix);
        self.spawn(
            "apiserver",
            &fabric,
            &cg,
            &[
                "python3",
                &script,
                "--listen",
                API_SERVER,
                "--objects",
                &objects,
                "--tokens",
                &tokens,
                "--state",
                &state,
                "--ready",
                &ready_arg,
            ],
        )?;
        wait_for(Duration::from_secs(10), || ready.exists())
            .with_context(|| format!("API server test double not up; log: {}", self.log_of("apiserver")))
    }

    /// A request to the API server test double (`curl` in the fabric namespace), as
    /// `kubectl` would make it; returns the response body.
    pub fn api(&self, method: &str, path: &str, content_type: &str, body: &str) -> anyhow::Result<String> {
        let url = format!("http://{API_SERVER}{path}");
        let out = Self::exec_netns(
            &format!("{}-fabric", self.spec.prefix),
            None,
            &[
                "curl",
                "-sS",
                "--fail-with-body",
                "--max-time",
                "5",
                "-X",
                method,
                "-H",
                &format!("content-type: {content_type}"),
                "--data-binary",
                body,
                &url,
            ],
        )?;
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("{method} {path}: {} {body}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(body)
    }

    /// What the API server test double holds now (objects, and the writes it saw).
    pub fn api_state(&self) -> serde_json::Value {
        fs::read_to_string(self.api_dir().join("state.json"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// Kubernetes mode: waits until every agent has enrolled the meshed pods of its
    /// node by itself.
    pub fn wait_discovered(&self) -> anyhow::Result<()> {
        for n in 1..=self.nodes.len() {
            let expected = self.pods.iter().filter(|p| p.node == n && p.meshed).count();
            wait_for(Duration::from_secs(20), || {
                self.config_dump(n).is_ok_and(|d| d["pods"].as_array().is_some_and(|p| p.len() == expected))
            })
            .with_context(|| {
                format!(
                    "node{n}'s agent did not enroll its pods; log: {}\ncontroller log: {}\nAPI server log: {}",
                    self.agent_log(n),
                    self.controller_log(),
                    self.log_of("apiserver")
                )
            })?;
        }
        Ok(())
    }

    /// Starts (or restarts) the controller and waits until it serves.
    pub fn start_controller(&self) -> anyhow::Result<()> {
        let bin = self.spec.controller_bin.clone().context("this lab has no controller")?;
        let fabric = format!("{}-fabric", self.spec.prefix);
        if run(Command::new("ip").args(["-n", &fabric, "addr", "show", "dev", "br0"]))
            .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains(CONTROLLER_IP))
        {
            ip(&["-n", &fabric, "addr", "add", &format!("{CONTROLLER_IP}/24"), "dev", "br0"])?;
        }
        let ca_dir = self.dir.join("ca");
        if let Some(from) = &self.spec.ca_root {
            fs::create_dir_all(&ca_dir)?;
            for file in ["root-cert.pem", "root-key.pem"] {
                if !ca_dir.join(file).exists() {
                    fs::copy(from.join(file), ca_dir.join(file))
                        .with_context(|| format!("copy {} to the lab's CA", from.join(file).display()))?;
                }
            }
        }
        for node in &self.nodes {
            let out = node.state_dir.join("credential");
            if !out.join("node-cert.pem").exists() {
                run(Command::new(&bin)
                    .args(["node-credential", "--node", &node.name])
                    .arg("--ca-dir")
                    .arg(&ca_dir)
                    .arg("--out")
                    .arg(&out))?;
            }
        }
        let cg = cgroup2_root()?.join(&self.spec.prefix).join("controller");
        fs::create_dir_all(&cg)?;
        let mut argv: Vec<String> = if self.spec.kubernetes {
            vec![
                "env".into(),
                format!("KUBECONFIG={}", self.api_dir().join("kubeconfig").display()),
                "MESH_POD_NAME=mesh-controller-0".into(),
                bin.display().to_string(),
                "serve".into(),
                "--kubernetes".into(),
                "--lease-namespace".into(),
                "istio-system".into(),
            ]
        } else {
            vec![
                bin.display().to_string(),
                "serve".into(),
                "--config-dir".into(),
                self.config_dir().display().to_string(),
            ]
        };
        argv.extend(["--ca-dir".into(), ca_dir.display().to_string()]);
        argv.extend(self.spec.controller_args.iter().cloned());
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.spawn("controller", &fabric, &cg, &argv)?;
        wait_for(Duration::from_secs(10), || self.controller_ready())
            .with_context(|| format!("controller not serving; log: {}", self.controller_log()))
    }

    /// Whether the controller's readiness endpoint (`/ready`, its Kubernetes probe)
    /// says it serves agents.
    pub fn controller_ready(&self) -> bool {
        self.controller_get("/ready").is_ok_and(|body| body == b"ready\n")
    }

    /// The body of a GET of the controller's admin port (`path`), which must answer 2xx.
    fn controller_get(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let url = format!("http://127.0.0.1:15014{path}");
        let out =
            Self::exec_netns(&format!("{}-fabric", self.spec.prefix), None, &["curl", "-sf", "--max-time", "2", &url])?;
        if !out.status.success() {
            bail!("controller {path}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out.stdout)
    }

    /// Stops the controller (SIGKILL) and waits until it is gone.
    pub fn stop_controller(&self) -> anyhow::Result<()> {
        self.stop("controller", "KILL")
    }

    /// Signals the process the lab started as `name` and waits until it has exited.
    /// Signals a process started with [`Lab::spawn_in`] and waits until it has exited.
    pub fn stop_process(&self, name: &str, signal: &str) -> anyhow::Result<()> {
        self.stop(name, signal)
    }

    fn stop(&self, name: &str, signal: &str) -> anyhow::Result<()> {
        let pid = fs::read_to_string(self.dir.join(format!("{name}.pid")))?.trim().to_owned();
        run(Command::new("kill").args([&format!("-{signal}"), &pid]))?;
        wait_for(Duration::from_secs(10), || !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(&pid))
            .with_context(|| format!("{name} did not exit"))
    }

    pub fn controller_log(&self) -> String {
        fs::read_to_string(self.dir.join("controller.log")).unwrap_or_default()
    }

    /// The controller's `/status`.
    pub fn controller_status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_slice(&self.controller_get("/status")?)?)
    }

    /// The configuration version the controller runs.
    pub fn controller_version(&self) -> anyhow::Result<u64> {
        self.controller_status()?["version"].as_u64().context("no version in the controller status")
    }

    /// The configuration version node `n`'s agent runs (0 before its first one, or
    /// when its admin endpoint does not answer).
    pub fn agent_config_version(&self, n: usize) -> u64 {
        self.config_dump(n).ok().and_then(|d| d["control"]["version"].as_u64()).unwrap_or(0)
    }

    /// Node `n` agent's `/config_dump`.
    pub fn config_dump(&self, n: usize) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.node_http(n, 15000, "/config_dump")?)?)
    }

    /// Sends `signal` (e.g. "TERM", "KILL") to node `n`'s agent and waits until it exits.
    pub fn stop_agent(&self, n: usize, signal: &str) -> anyhow::Result<()> {
        self.stop(&format!("agent-{}", self.node(n).name), signal)
    }

    pub fn agent_log(&self, n: usize) -> String {
        fs::read_to_string(self.dir.join(format!("agent-{}.log", self.node(n).name))).unwrap_or_default()
    }

    /// GET on a port of node `n` (its netns' loopback); the body.
    pub fn node_http(&self, n: usize, port: u16, path: &str) -> anyhow::Result<String> {
        let out = Self::exec_netns(
            &self.node(n).netns,
            None,
            &["curl", "-sf", "--max-time", "2", &format!("http://127.0.0.1:{port}{path}")],
        )?;
        if !out.status.success() {
            bail!("GET {path} on {}: {}", self.node(n).name, String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The agent's `/stats` on node `n`.
    pub fn agent_stats(&self, n: usize) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&self.node_http(n, 15000, "/stats")?)?)
    }

    /// The network namespace (and, for a pod, the cgroup) of a pod, node or `fabric`.
    fn resolve(&self, target: &str) -> anyhow::Result<(String, Option<PathBuf>)> {
        if let Some(pod) = self.pods.iter().chain(&self.waypoint).find(|p| p.name == target) {
            return Ok((pod.netns.clone(), Some(pod.cgroup.clone())));
        }
        if let Some(node) = self.nodes.iter().find(|n| n.name == target) {
            // Below the node's cgroup, where its agent's programs are attached, as the
            // host's own processes (kubelet) are on a real node.
            return Ok((node.netns.clone(), Some(node.cgroup.join("host"))));
        }
        if target == "fabric" {
            return Ok((format!("{}-fabric", self.spec.prefix), None));
        }
        bail!(
            "no pod or node named {target} in lab {}; pods: {}",
            self.spec.prefix,
            self.pods.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(" ")
        )
    }

    /// `argv` run inside `netns`, after joining `cgroup` when given (so the capture
    /// programs see the process). `nsenter --net` rather than `ip netns exec`, which
    /// would remount /sys and hide the cgroup2 and bpffs mounts.
    fn netns_command(netns: &str, cgroup: Option<&Path>, argv: &[&str]) -> Command {
        let script = r#"ns=$1; shift
if [ "$0" != - ]; then echo $$ > "$0/cgroup.procs" || exit 1; fi
exec nsenter --net="/run/netns/$ns" -- "$@""#;
        let cg = cgroup.map_or_else(|| "-".to_owned(), |c| c.display().to_string());
        let mut command = Command::new("sh");
        command.args(["-c", script, &cg, netns]).args(argv);
        command
    }

    /// Runs a command in a pod (its netns and cgroup), a node (its netns) or `fabric`.
    /// Starts a background process in `target` (a pod or node), logging to
    /// `<lab dir>/<name>.log` (see [`Lab::log_of`]); `lab down` stops it.
    pub fn spawn_in(&self, target: &str, name: &str, argv: &[&str]) -> anyhow::Result<u32> {
        let (netns, cgroup) = self.resolve(target)?;
        // Processes outside pods go to a lab cgroup too, so `lab down` finds them.
        let cgroup = if let Some(cgroup) = cgroup {
            cgroup
        } else {
            let tools = cgroup2_root()?.join(&self.spec.prefix).join("tools");
            fs::create_dir_all(&tools)?;
            tools
        };
        self.spawn(name, &netns, &cgroup, argv)
    }

    /// The output of a process started with [`Lab::spawn_in`].
    pub fn log_of(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    pub fn exec(&self, target: &str, argv: &[&str]) -> anyhow::Result<Output> {
        let (netns, cgroup) = self.resolve(target)?;
        Self::exec_netns(&netns, cgroup.as_deref(), argv)
    }

    fn exec_netns(netns: &str, cgroup: Option<&Path>, argv: &[&str]) -> anyhow::Result<Output> {
        Self::netns_command(netns, cgroup, argv)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("exec {argv:?} in {netns}"))
    }

    /// Like [`Lab::exec`], with the terminal attached (for `lab exec`).
    pub fn exec_interactive(&self, target: &str, argv: &[&str]) -> anyhow::Result<i32> {
        let (netns, cgroup) = self.resolve(target)?;
        let status = Self::netns_command(&netns, cgroup.as_deref(), argv).status()?;
        Ok(status.code().unwrap_or(1))
    }

    /// HTTP GET from pod `from` to `url` with curl; the response body.
    pub fn curl(&self, from: &str, url: &str) -> anyhow::Result<String> {
        let out = self.exec(from, &["curl", "-sS", "--max-time", "5", url])?;
        if !out.status.success() {
            bail!("curl {url} from {from}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn enroll_request(&self, node: usize, request: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        self.enroll_raw(node, &request.to_string())
    }

    /// Sends a raw line to node `n`'s enrollment socket; the reply line.
    pub fn enroll_raw(&self, node: usize, line: &str) -> anyhow::Result<serde_json::Value> {
        let socket = self.node(node).state_dir.join("enroll.sock");
        let mut stream = UnixStream::connect(&socket).with_context(|| format!("connect {}", socket.display()))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(line.as_bytes())?;
        stream.write_all(b"\n")?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply)?;
        Ok(serde_json::from_str(&reply)?)
    }

    pub fn pod_request(&self, name: &str) -> serde_json::Value {
        let pod = self.pod(name);
        serde_json::json!({ "op": "add", "pod": {
            "uid": pod.uid, "name": pod.name, "namespace": pod.namespace,
            "service_account": "default", "ips": [pod.ip4, pod.ip6],
            "netns": format!("/run/netns/{}", pod.netns),
        }})
    }

    pub fn enroll(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        let reply = self.enroll_request(self.pod(name).node, &self.pod_request(name))?;
        if reply["ok"] != true {
            bail!("enroll {name}: {}", reply["error"]);
        }
        Ok(reply)
    }

    pub fn unenroll(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        let pod = self.pod(name);
        let reply = self.enroll_request(pod.node, &serde_json::json!({ "op": "remove", "uid": pod.uid }))?;
        if reply["ok"] != true {
            bail!("unenroll {name}: {}", reply["error"]);
        }
        Ok(reply)
    }

    /// A human-readable summary of the lab.
    pub fn status(&self) -> String {
        let mut out = format!("lab {} ({} nodes)\n", self.spec.prefix, self.nodes.len());
        for (i, node) in self.nodes.iter().enumerate() {
            let ready = self
                .node_http(i + 1, 15021, "/healthz/ready")
                .map_or_else(|e| format!("down ({e})"), |b| b.trim().to_owned());
            let _ = writeln!(out, "  {} {} / {}  agent: {ready}", node.name, node.ip4, node.ip6);
            for pod in self.pods.iter().filter(|p| p.node == i + 1) {
                let _ = writeln!(
                    out,
                    "    {:8} {:12} {:12} {:18} {}",
                    pod.name,
                    pod.namespace,
                    pod.ip4,
                    pod.ip6,
                    if pod.meshed { "meshed" } else { "not meshed" }
                );
            }
        }
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.keep
            && let Err(e) = down(&self.spec.prefix)
        {
            eprintln!("lab down {}: {e:#}", self.spec.prefix);
        }
    }
}

fn sysctl(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    run(Command::new("ip").args(["netns", "exec", netns, "sysctl", "-qw", &format!("{key}={value}")])).map(drop)
}

fn is_zombie(pid: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
}

/// A field of a process's `/proc/<pid>/status` given in KiB (`VmRSS`, `VmHWM`);
/// `None` when the process or the field is gone.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Polls `check` every 50 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?}")
}

/// Is `name` one of the namespaces a lab with this prefix makes?
fn is_lab_netns(prefix: &str, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    rest == "fabric"
        || rest == WAYPOINT
        || rest.strip_prefix("node").is_some_and(digits)
        || rest.strip_prefix('n').and_then(|r| r.split_once("-p")).is_some_and(|(a, b)| digits(a) && digits(b))
}

/// What [`down`] removed.
#[derive(Debug, Default)]
pub struct DownReport {
    pub processes: usize,
    pub netns: usize,
    pub cgroups: usize,
    pub pins: bool,
}

/// Removes every process, namespace (and with them every link), cgroup, bpffs pin and
/// state file of the lab with this prefix. Safe to run any time, also when nothing is
/// there or after a crash.
pub fn down(prefix: &str) -> anyhow::Result<DownReport> {
    let mut report = DownReport::default();
    let dir = Path::new(STATE_ROOT).join(prefix);
    let cg = cgroup2_root()?.join(prefix);
    let mut pids: Vec<i32> = Vec::new();
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "pid")
                && let Ok(pid) = fs::read_to_string(entry.path()).unwrap_or_default().trim().parse()
            {
                pids.push(pid);
            }
        }
    }
    pids.extend(cgroup_pids(&cg));
    let namespaces: Vec<String> = run(Command::new("ip").args(["netns", "list"]))
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let namespaces: Vec<String> = namespaces.into_iter().filter(|n| is_lab_netns(prefix, n)).collect();
    for ns in &namespaces {
        if let Ok(out) = run(Command::new("ip").args(["netns", "pids", ns])) {
            pids.extend(String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|p| *p > 1 && Path::new(&format!("/proc/{p}")).exists());
    for pid in &pids {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stderr(Stdio::null()).status();
    }
    report.processes = pids.len();
    let _ = wait_for(Duration::from_secs(5), || cgroup_pids(&cg).is_empty());
    for ns in &namespaces {
        if ip(&["netns", "del", ns]).is_ok() {
            report.netns += 1;
        }
    }
    report.cgroups = remove_cgroups(&cg);
    let pin_dir = Path::new("/sys/fs/bpf").join(prefix);
    if pin_dir.exists() {
        fs::remove_dir_all(&pin_dir).with_context(|| format!("remove {}", pin_dir.display()))?;
        report.pins = true;
    }
    let _ = fs::remove_dir_all(&dir);
    Ok(report)
}

fn cgroup_pids(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(cgroup_pids(&entry.path()));
            }
        }
    }
    pids
}

/// Removes a cgroup tree bottom-up; the number removed.
fn remove_cgroups(dir: &Path) -> usize {
    let mut removed = 0;
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                removed += remove_cgroups(&entry.path());
            }
        }
    }
    if fs::remove_dir(dir).is_ok() {
        removed += 1;
    }
    removed
}

/// Names of anything left over by labs with this prefix (for tests of cleanliness).
pub fn leftovers(prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(out) = run(Command::new("ip").args(["netns", "list"])) {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split_whitespace().next()
                && is_lab_netns(prefix, name)
            {
                found.push(format!("netns {name}"));
            }
        }
    }
    if let Ok(cg) = cgroup2_root()
        && cg.join(prefix).exists()
    {
        found.push(format!("cgroup {}", cg.join(prefix).display()));
    }
    for path in [Path::new("/sys/fs/bpf").join(prefix), Path::new(STATE_ROOT).join(prefix)] {
        if path.exists() {
            found.push(path.display().to_string());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::is_lab_netns;

    #[test]
    fn lab_netns_names_are_recognised_exactly() {
        assert!(is_lab_netns("mesh", "mesh-fabric"));
        assert!(is_lab_netns("mesh", "mesh-node12"));
        assert!(is_lab_netns("mesh", "mesh-n1-p2"));
        assert!(!is_lab_netns("mesh", "mesh-t1-node1"));
        assert!(!is_lab_netns("mesh", "meshy-node1"));
        assert!(!is_lab_netns("mesh", "mesh-node"));
        assert!(is_lab_netns("mesh-t1", "mesh-t1-n3-p1"));
    }
}
