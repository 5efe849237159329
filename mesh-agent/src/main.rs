//! `mesh-agent`: the mesh's node agent. One runs on every node: it loads the eBPF
//! capture programs, enrolls the node's pods through a local Unix-socket API, opens
//! its listeners inside each enrolled pod's network namespace and forwards the
//! connections the kernel hands it.
mod admin;
mod deliver;
mod discover;
mod enroll;
mod handover;
mod hbone;
mod inbound;
mod mesh;
mod netns;
mod outbound;
mod own;
mod redirect;

// The shared data path (tunnel, relay, certificates, control client, telemetry):
// the agent composes it with capture, enrollment and discovery.
use mesh_proxy::{control, drain, identity, metrics, relay, state, telemetry, workloads};

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(name = "mesh-agent", version, about = "Node agent of the mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent.
    Run(Box<RunConfig>),
    /// Remove the pinned programs and maps of an agent, which stops its capture.
    Uninstall {
        /// The agent's bpffs directory.
        #[arg(long, env = "MESH_BPFFS_DIR")]
        bpffs_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug, serde::Serialize)]
struct RunConfig {
    /// Name of this node (used for the default paths and in logs).
    #[arg(long, env = "MESH_NODE_NAME")]
    node_name: String,
    /// cgroup v2 directory whose processes are captured (default: the cgroup2 mount).
    #[arg(long, env = "MESH_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// bpffs directory for pinned programs and maps (default: /sys/fs/bpf/mesh/NODE).
    #[arg(long, env = "MESH_BPFFS_DIR")]
    bpffs_dir: Option<PathBuf>,
    /// eBPF object to load instead of the embedded one.
    #[arg(long, env = "MESH_BPF_OBJECT")]
    bpf_object: Option<PathBuf>,
    /// Directory for the enrollment socket and the state file (default: /run/mesh/NODE).
    #[arg(long, env = "MESH_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Enrollment API socket (default: `STATE_DIR/enroll.sock`).
    #[arg(long, env = "MESH_ENROLL_SOCKET")]
    enroll_socket: Option<PathBuf>,
    /// Admin endpoint (pods, counters, config dump, log level).
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Readiness endpoint (`/healthz/ready`).
    #[arg(long, env = "MESH_READINESS_ADDR", default_value = "[::]:15021")]
    readiness_addr: SocketAddr,
    /// Controller's control endpoint, `host:port` (TLS; the agent authenticates with
    /// --credential-dir or --token-file). Without it the agent runs standalone: no
    /// configuration, no certificates.
    #[arg(long, env = "MESH_CONTROLLER_ADDR")]
    controller: Option<String>,
    /// Directory with this node's bootstrap credential: node-cert.pem, node-key.pem,
    /// root-cert.pem (`mesh-controller node-credential` writes them).
    #[arg(long, env = "MESH_CREDENTIAL_DIR", requires = "controller", conflicts_with = "token_file")]
    credential_dir: Option<PathBuf>,
    /// Kubernetes: the projected `ServiceAccount` token (audience mesh-controller) the
    /// agent authenticates to the controller with; re-read on every connection.
    #[arg(long, env = "MESH_TOKEN_FILE", requires_all = ["controller", "root_cert"])]
    token_file: Option<PathBuf>,
    /// The mesh's root certificate, to verify the controller with (with --token-file).
    #[arg(long, env = "MESH_ROOT_CERT", requires = "token_file")]
    root_cert: Option<PathBuf>,
    /// Enroll the meshed pods of this node by itself: the pods come from the
    /// controller's view of the node, their network namespaces from the process tree
    /// (a process whose cgroup path carries the pod's UID). Without it pods are
    /// enrolled through the enrollment socket.
    #[arg(long, env = "MESH_KUBERNETES", requires = "controller")]
    kubernetes: bool,
    /// With --kubernetes: the node's own network namespace, whose addresses kubelet's
    /// health probes come from (probes to a pod's probe ports from there skip capture).
    #[arg(long, env = "MESH_HOST_NETNS", default_value = "/proc/1/ns/net")]
    host_netns: PathBuf,
    /// With --kubernetes: where the node's processes are listed (the host's /proc;
    /// the agent runs with hostPID).
    #[arg(long, env = "MESH_PROC_ROOT", default_value = "/proc")]
    proc_root: PathBuf,
    /// With --kubernetes: where the container runtime pins pod network namespaces
    /// (a pod's namespace is opened from its pin when there is one).
    #[arg(long, env = "MESH_NETNS_DIR", default_value = "/var/run/netns")]
    netns_dir: PathBuf,
    /// Prometheus metrics endpoint.
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = "[::]:15020")]
    metrics_addr: SocketAddr,
    /// Destination port never captured (repeatable).
    #[arg(long = "exclude-port", env = "MESH_EXCLUDE_PORTS", value_delimiter = ',')]
    exclude_ports: Vec<u16>,
    /// Destination CIDR never captured, e.g. 10.0.0.0/8 (repeatable).
    #[arg(long = "exclude-cidr", env = "MESH_EXCLUDE_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    exclude_cidrs: Vec<(IpAddr, u8)>,
    /// Pod port never steered to the inbound plaintext listener, such as a kubelet
    /// health-probe port (repeatable). Traffic to it reaches the application directly
    /// even under `PeerAuthentication` STRICT.
    #[arg(long = "inbound-exclude-port", env = "MESH_INBOUND_EXCLUDE_PORTS", value_delimiter = ',')]
    inbound_exclude_ports: Vec<u16>,
    /// Data-path threads (shards): each serves the connections handed to it from start
    /// to end, so a proxied message wakes no other thread; more shards let one agent
    /// use more cores.
    #[arg(long, env = "MESH_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
    /// Another trust domain whose workload identities are accepted on the tunnel
    /// (repeatable), e.g. during a migration between meshes.
    #[arg(long = "trust-domain-alias", env = "MESH_TRUST_DOMAIN_ALIASES", value_delimiter = ',')]
    trust_domain_aliases: Vec<String>,
    /// Carry connections between two meshed pods of this node through the HBONE
    /// tunnel (TLS and HTTP/2 over the pods' addresses) like cross-node ones. By
    /// default the agent delivers them itself, after the same identity and policy
    /// checks: their bytes never leave the two pods' network namespaces.
    #[arg(long, env = "MESH_TUNNEL_SAME_NODE")]
    tunnel_same_node: bool,
    /// Upstream connect timeout, in milliseconds.
    #[arg(long, env = "MESH_CONNECT_TIMEOUT_MS", default_value_t = 10_000)]
    connect_timeout_ms: u64,
    /// Most connections relayed at once for one pod (both directions); more are
    /// refused and counted.
    #[arg(long, env = "MESH_MAX_CONNECTIONS_PER_POD", default_value_t = 20_000)]
    max_connections_per_pod: u64,
    /// Most connections relayed at once by the agent.
    #[arg(long, env = "MESH_MAX_CONNECTIONS", default_value_t = 100_000)]
    max_connections: u64,
    /// How long open connections may finish after SIGTERM or after handing the node
    /// over to a new agent, in seconds (new connections go to the new agent).
    #[arg(long, env = "MESH_DRAIN_SECONDS", default_value_t = 300)]
    drain_seconds: u64,
    /// Log format.
    #[arg(long, env = "MESH_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Log filter (tracing's `EnvFilter` syntax).
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    log: String,
}

fn parse_cidr(value: &str) -> Result<(IpAddr, u8), String> {
    let (ip, prefix) = value.split_once('/').unwrap_or((value, ""));
    let ip: IpAddr = ip.parse().map_err(|_| format!("'{value}' is not a CIDR: bad address '{ip}'"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = if prefix.is_empty() {
        max
    } else {
        prefix
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("'{value}' is not a CIDR: prefix length must be 0..={max}"))?
    };
    Ok((ip, prefix))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Uninstall { bpffs_dir } => match std::fs::remove_dir_all(&bpffs_dir) {
            Ok(()) => {
                println!("removed {}", bpffs_dir.display());
                ExitCode::SUCCESS
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mesh-agent: cannot remove {}: {e}", bpffs_dir.display());
                ExitCode::FAILURE
            }
        },
        Command::Run(config) => {
            // Dropped last: writes out what is still queued.
            let mesh_proxy::logs::Logging { set_level: set_log_level, guard: _log_writer, dropped: dropped_lines } =
                match mesh_proxy::logs::init(&config.log, config.log_format == "json") {
                    Ok(logging) => logging,
                    Err(e) => {
                        eprintln!("mesh-agent: {e:#}");
                        return ExitCode::from(2);
                    }
                };
            // One arena per shard and one for the control runtime.
            control::limit_arenas(config.worker_threads + 1);
            // Connections are served by the shards (`mesh_proxy::shard`); this runtime
            // accepts them and runs enrollment, control, admin and signals.
            if let Err(e) = mesh_proxy::shard::start(config.worker_threads) {
                eprintln!("mesh-agent: cannot start the data-path threads: {e}");
                return ExitCode::FAILURE;
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("tokio runtime");
            match runtime.block_on(run(*config, set_log_level, dropped_lines)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    eprintln!("mesh-agent: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Raises the open-file limit to its hard maximum: every relayed connection holds
/// one or two descriptors.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        warn!(%error, soft, hard, "cannot raise the open-file limit");
    }
}

async fn run(
    config: RunConfig,
    set_log_level: admin::SetLogLevel,
    dropped_lines: admin::DroppedLines,
) -> anyhow::Result<()> {
    raise_fd_limit();
    let ready = admin::Readiness::default();
    let startup = ready.register("startup");
    let node = config.node_name.clone();
    let cgroup_root = if let Some(path) = &config.cgroup_root {
        path.clone()
    } else {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
        mesh_common::host::find_cgroup2_mount(&mountinfo)
            .context("no cgroup2 filesystem is mounted; pass --cgroup-root")?
    };
    let bpffs_dir = config.bpffs_dir.clone().unwrap_or_else(|| PathBuf::from("/sys/fs/bpf/mesh").join(&node));
    let state_dir = config.state_dir.clone().unwrap_or_else(|| PathBuf::from("/run/mesh").join(&node));
    let enroll_socket = config.enroll_socket.clone().unwrap_or_else(|| state_dir.join("enroll.sock"));
    std::fs::create_dir_all(&state_dir).with_context(|| format!("create state dir {}", state_dir.display()))?;
    // One agent owns a node's kernel state and state directory. A second one (an
    // upgrade, a DaemonSet surge, a double start) takes the node over from the
    // running one, or stops here without touching anything the running one owns.
    redirect::ensure_bpffs(&bpffs_dir).context("cannot set up eBPF capture")?;
    let (locks, successor) = take_node(&state_dir, &bpffs_dir).await?;
    let locks = Arc::new(std::sync::Mutex::new(Some(locks)));
    let inherited: Arc<handover::Inherited> = successor.as_ref().map_or_else(Arc::default, |s| s.inherited.clone());

    let mut effective = serde_json::to_value(&config).expect("config serializes");
    effective["cgroup_root"] = cgroup_root.display().to_string().into();
    effective["bpffs_dir"] = bpffs_dir.display().to_string().into();
    effective["state_dir"] = state_dir.display().to_string().into();
    effective["enroll_socket"] = enroll_socket.display().to_string().into();
    info!(config = %effective, "starting mesh-agent");

    let redirect = Arc::new(
        redirect::Redirect::load(&redirect::RedirectConfig {
            object: config.bpf_object.clone(),
            cgroup_root: cgroup_root.clone(),
            pin_dir: bpffs_dir.clone(),
            exclude_ports: config.exclude_ports.clone(),
            exclude_cidrs: config.exclude_cidrs.clone(),
        })
        .context("cannot set up eBPF capture")?,
    );
    redirect.set_inbound_excluded_ports(&config.inbound_exclude_ports).context("set the inbound exempt ports")?;
    info!(cgroup = %cgroup_root.display(), pins = %bpffs_dir.display(), "capture programs attached");

    let counters = Arc::new(telemetry::Counters::default());
    let control = match &config.controller {
        Some(addr) => {
            let tls = control::client_tls(config.credential_dir.as_deref(), config.root_cert.as_deref())
                .map_err(|e| anyhow::anyhow!("--controller: {e}"))?;
            let client = Arc::new(control::ControlClient::new(
                addr.clone(),
                tls,
                config.token_file.clone(),
                Some(state_dir.join("view.json")),
                control::node_kinds,
            ));
            // The view an earlier run saved: with it the agent serves at once and
            // keeps mTLS if the controller is away (static stability); the
            // controller's snapshot replaces it as soon as it arrives.
            match client.restore_view() {
                Ok((version, age)) => info!(version, age_seconds = age, "view restored from the state directory"),
                Err(error) => info!(%error, "no view restored; waiting for the controller"),
            }
            tokio::spawn(client.clone().run());
            let certs = Arc::new(identity::CertStore::new(client.clone(), Some(state_dir.join("certs"))));
            if client.current().version == 0 {
                // Without a view, restored pods would get identities from nothing: wait
                // briefly for the controller.
                let mut updates = client.subscribe();
                let _ = tokio::time::timeout(Duration::from_secs(3), updates.wait_for(|s| s.version > 0)).await;
            }
            Some((client, certs))
        }
        _ => None,
    };
    let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
    let metrics = Arc::new(metrics::Metrics::default());
    metrics.register_collector(admin::AgentMetrics {
        redirect: redirect.clone(),
        counters: counters.clone(),
        dropped_lines,
    });
    if let Some((client, certs)) = &control {
        metrics.register_collector(mesh_proxy::admin::ControlMetrics { client: client.clone(), certs: certs.clone() });
    }
    let limits = telemetry::Limits { per_pod: config.max_connections_per_pod, per_agent: config.max_connections };
    let mesh = control.as_ref().map(|(client, certs)| {
        mesh::Mesh::start(
            client.clone(),
            certs.clone(),
            metrics.clone(),
            counters.clone(),
            mesh::Settings {
                connect_timeout,
                limits,
                trust_domain_aliases: config.trust_domain_aliases.clone(),
                tunnel_same_node: config.tunnel_same_node,
            },
        )
    });
    // Without a controller there is nothing to label connections with: their TCP
    // metrics go to a set that is not exported.
    let outbound_metrics = if mesh.is_some() { metrics.clone() } else { Arc::default() };
    let own = Arc::new(own::OwnAddrs::default());
    own.set_node(&redirect::local_addresses().unwrap_or_default());
    let forwarder = Arc::new(outbound::Forwarder {
        redirect: redirect.clone(),
        counters: counters.clone(),
        connect_timeout,
        mesh: mesh.clone(),
        metrics: outbound_metrics,
        own: own.clone(),
        limits,
    });
    let (trigger, drain) = drain::channel();
    let registry = Arc::new(enroll::Registry::new(
        redirect.clone(),
        forwarder,
        &state_dir,
        drain,
        control.clone(),
        inherited.clone(),
    ));
    registry.restore().await;

    let api = enroll::EnrollApi::new(&enroll_socket, registry.clone())
        .with_context(|| format!("cannot listen on enrollment socket {}", enroll_socket.display()))?;
    tokio::spawn(api.run());

    let admin_state = Arc::new(admin::AdminState {
        registry: registry.clone(),
        redirect: redirect.clone(),
        counters,
        metrics,
        mesh,
        config: effective,
        set_log_level,
        control,
    });
    let (stop_serving, stop) = tokio::sync::watch::channel(false);
    let mut node_sockets: Vec<(handover::ListenerId, std::os::fd::OwnedFd)> = Vec::new();
    let mut bind = |name: &'static str, addr: SocketAddr| -> anyhow::Result<admin::HttpServer> {
        let server = admin::HttpServer::bind(name, addr, inherited.take_node(name, addr), stop.clone())
            .with_context(|| format!("cannot listen on {name} address {addr}"))?;
        if let Ok(copy) = server.socket.try_clone() {
            node_sockets
                .push((handover::ListenerId { owner: String::new(), kind: name.to_owned(), addr, index: 0 }, copy));
        }
        Ok(server)
    };
    let admin_server = bind("admin", config.admin_addr)?;
    let metrics_server = bind("metrics", config.metrics_addr)?;
    let ready_server = bind("readiness", config.readiness_addr)?;
    let admin_view = admin_state.clone();
    tokio::spawn(admin_server.run(move |req| admin::admin(admin_view.clone(), req)));
    let metrics_state = admin_state.clone();
    tokio::spawn(metrics_server.run(move |req| std::future::ready(admin::metrics(&metrics_state, &req))));
    let ready_view = ready.clone();
    tokio::spawn(ready_server.run(move |req| std::future::ready(admin::readiness(&ready_view, &req))));
    if inherited.left() > 0 {
        warn!(sockets = inherited.left(), "inherited listening sockets of pods that are gone; closing them");
    }

    if config.kubernetes
        && let Some((client, _)) = &admin_state.control
    {
        let discovery = discover::Discovery {
            registry: registry.clone(),
            redirect: redirect.clone(),
            client: client.clone(),
            node: node.clone(),
            proc_root: config.proc_root.clone(),
            host_netns: config.host_netns.clone(),
            netns_dir: config.netns_dir.clone(),
        };
        tokio::spawn(discovery.run());
    }

    let gc_registry = registry.clone();
    let gc_counters = admin_state.counters.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let (mut high, mut seen, mut quiet) = (0, 0, 0);
        loop {
            tick.tick().await;
            // Give the memory of closed connections back to the kernel (the allocator
            // keeps freed memory otherwise): once many of them have ended, and a few
            // seconds after a busy spell (pooled tunnels are released a little later).
            let active = gc_counters.active.load(std::sync::atomic::Ordering::Relaxed);
            let snapshot = gc_counters.snapshot();
            let accepted = snapshot.accepted + snapshot.inbound_accepted;
            high = high.max(active);
            quiet = if accepted == seen { quiet + 1 } else { 0 };
            seen = accepted;
            if (high >= 64 && active <= high / 2) || quiet == 12 || quiet == 25 {
                tokio::task::spawn_blocking(control::trim_heap);
                high = active;
            }
            gc_registry.collect_garbage().await;
            if let Ok(addrs) = redirect::local_addresses() {
                own.set_node(&addrs);
            }
        }
    });

    if let Some(mesh) = &admin_state.mesh {
        // Ready only with a view: until then every captured connection is refused.
        let waiting = ready.register("config");
        let mut updates = mesh.subscribe_index();
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut waiting = Some(waiting);
            loop {
                if updates.borrow_and_update().version > 0 {
                    if waiting.take().is_some() {
                        info!("view applied; ready");
                    }
                    registry.reconcile_identities().await;
                    registry.apply_strict().await;
                }
                if updates.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    drop(startup);
    info!(node, "mesh-agent started");

    // A later agent may take the node over from this one.
    handover::serve(
        &state_dir,
        NodeOwner {
            registry: registry.clone(),
            node_sockets,
            locks: locks.clone(),
            dirs: (state_dir.clone(), bpffs_dir.clone()),
            stop_serving,
            runtime: tokio::runtime::Handle::current(),
        },
    )
    .context("cannot offer a handover")?;
    if let Some(successor) = successor {
        // Every inherited socket is served now: the previous agent may stop.
        tokio::task::spawn_blocking(move || successor.ready()).await?.context("handover")?;
        info!("took the node over from the previous agent");
    }

    let mut signals = mesh_proxy::drain::StopSignals::install().context("install the SIGTERM and SIGINT handlers")?;
    let mut handed_over = stop.clone();
    tokio::select! {
        signal = signals.recv() => info!("{signal}: draining"),
        _ = handed_over.wait_for(|stop| *stop) => info!("handed the node over to a new agent: draining"),
    }
    let _not_ready = ready.register("draining");
    registry.close().await;
    let deadline = Duration::from_secs(config.drain_seconds);
    if trigger.drain(deadline).await {
        info!("drained; exiting");
    } else {
        warn!(?deadline, "drain deadline passed with connections open; closing them");
    }
    drop(locks);
    Ok(())
}

type Locks = (state::DirLock, state::DirLock);

/// Takes the node: its state-directory and pin-directory locks at once when no agent
/// runs; else by a handover from the running agent (its listening sockets first,
/// then its locks). Fails, having touched nothing, when the running agent does not
/// hand over.
async fn take_node(state_dir: &Path, bpffs_dir: &Path) -> anyhow::Result<(Locks, Option<handover::Successor>)> {
    let successor = match lock_node(state_dir, bpffs_dir) {
        Ok(locks) => return Ok((locks, None)),
        Err(held @ state::LockError::Held { .. }) if held.path() == state_dir => {
            info!(%held, "taking the node over from the running agent");
            let dir = state_dir.to_owned();
            tokio::task::spawn_blocking(move || handover::Successor::take_over(&dir))
                .await?
                .with_context(|| format!("{held}, and it did not hand the node over"))?
        }
        Err(held @ state::LockError::Held { .. }) => {
            return Err(held).context("another agent owns this node's eBPF state");
        }
        Err(error) => return Err(error).context("cannot lock the node's state and pin directories"),
    };
    info!(sockets = successor.inherited.left(), "received the running agent's listening sockets");
    let successor = tokio::task::spawn_blocking(move || successor.got().map(|()| successor)).await??;
    let state_lock = state::DirLock::lock_within(state_dir, HANDOVER_LOCK_WAIT).await.context("handover")?;
    let pins = state::DirLock::lock_within(bpffs_dir, HANDOVER_LOCK_WAIT).await.context("handover")?;
    state_lock.record_holder();
    Ok(((state_lock, pins), Some(successor)))
}

/// Both of the node's locks at once (the state directory's first), without waiting.
fn lock_node(state_dir: &Path, bpffs_dir: &Path) -> Result<Locks, state::LockError> {
    let state_lock = state::DirLock::try_lock(state_dir)?;
    let pins = state::DirLock::try_lock(bpffs_dir)?;
    state_lock.record_holder();
    Ok((state_lock, pins))
}

/// How long a successor waits for the running agent to let go of its locks.
const HANDOVER_LOCK_WAIT: Duration = Duration::from_secs(30);

/// This agent as the owner of the node, for a successor's handover.
struct NodeOwner {
    registry: Arc<enroll::Registry>,
    node_sockets: Vec<(handover::ListenerId, std::os::fd::OwnedFd)>,
    locks: Arc<std::sync::Mutex<Option<Locks>>>,
    dirs: (PathBuf, PathBuf),
    stop_serving: tokio::sync::watch::Sender<bool>,
    runtime: tokio::runtime::Handle,
}

impl handover::Owner for NodeOwner {
    fn freeze(&self) -> Vec<(handover::ListenerId, std::os::fd::OwnedFd)> {
        let mut sockets = self.runtime.block_on(self.registry.freeze());
        sockets.extend(self.node_sockets.iter().filter_map(|(id, fd)| Some((id.clone(), fd.try_clone().ok()?))));
        sockets
    }

    fn thaw(&self) {
        self.runtime.block_on(self.registry.thaw());
    }

    fn release_locks(&self) {
        drop(self.locks.lock().expect("locks").take());
    }

    fn retake_locks(&self) -> bool {
        let Ok(locks) = lock_node(&self.dirs.0, &self.dirs.1) else { return false };
        *self.locks.lock().expect("locks") = Some(locks);
        true
    }

    fn hand_over(&self) {
        self.stop_serving.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_names_the_problem() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap(), ("10.0.0.0".parse().unwrap(), 8));
        assert_eq!(parse_cidr("fd00::1").unwrap(), ("fd00::1".parse().unwrap(), 128));
        assert!(parse_cidr("10.0.0.0/33").unwrap_err().contains("prefix length must be 0..=32"));
        assert!(parse_cidr("10.0.0/8").unwrap_err().contains("bad address"));
    }
}
