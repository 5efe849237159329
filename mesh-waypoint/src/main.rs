//! `mesh-waypoint`: the L7 proxy of the services and namespaces that opt in with
//! `istio.io/use-waypoint`. Source agents tunnel to it (HBONE on 15008, `:authority`
//! = the service VIP and port); it routes each request and tunnels on to the chosen
//! endpoint's agent. It needs no privileges: no eBPF, no capture, no API access.
mod destination;
mod ext_authz;
mod flood;
mod inbound;
mod keepalive;
mod proxy;
mod replay;
mod requests;
mod tee;
mod upstream;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser;
use mesh_proxy::{admin, control, drain, identity, metrics, shard};
use tracing::{error, info, warn};

#[derive(Parser, Debug, serde::Serialize)]
#[command(name = "mesh-waypoint", version, about = "L7 waypoint proxy of the mesh")]
struct Cli {
    /// The waypoint's namespace (its Gateway's).
    #[arg(long, env = "MESH_WAYPOINT_NAMESPACE")]
    namespace: String,
    /// The waypoint's name: its Gateway's `metadata.name`.
    #[arg(long, env = "MESH_WAYPOINT_NAME")]
    name: String,
    /// The service account whose SPIFFE identity the waypoint presents (default: the
    /// waypoint's name, as `istioctl waypoint` deploys it).
    #[arg(long, env = "MESH_WAYPOINT_SERVICE_ACCOUNT")]
    service_account: Option<String>,
    /// This pod's name (downward API `metadata.name`): its labels in the view give the
    /// waypoint's locality. Default: the first pod of the waypoint's Gateway.
    #[arg(long, env = "MESH_POD_NAME")]
    pod_name: Option<String>,
    /// Controller's control endpoint, `host:port` (TLS).
    #[arg(long, env = "MESH_CONTROLLER_ADDR")]
    controller: String,
    /// Directory with the bootstrap credential of the node the waypoint runs on:
    /// node-cert.pem, node-key.pem, root-cert.pem.
    #[arg(long, env = "MESH_CREDENTIAL_DIR", conflicts_with = "token_file")]
    credential_dir: Option<PathBuf>,
    /// Kubernetes: the projected `ServiceAccount` token (audience mesh-controller).
    #[arg(long, env = "MESH_TOKEN_FILE", requires = "root_cert")]
    token_file: Option<PathBuf>,
    /// The mesh's root certificate, to verify the controller with (with --token-file).
    #[arg(long, env = "MESH_ROOT_CERT", requires = "token_file")]
    root_cert: Option<PathBuf>,
    /// Where the last view and certificate are kept across restarts.
    #[arg(long, env = "MESH_STATE_DIR", default_value = "/var/run/mesh-waypoint")]
    state_dir: PathBuf,
    /// HBONE listener.
    #[arg(long, env = "MESH_HBONE_ADDR", default_value = "[::]:15008")]
    hbone_addr: SocketAddr,
    #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    #[arg(long, env = "MESH_METRICS_ADDR", default_value = "[::]:15020")]
    metrics_addr: SocketAddr,
    #[arg(long, env = "MESH_READINESS_ADDR", default_value = "[::]:15021")]
    readiness_addr: SocketAddr,
    /// Serving threads, each with its own HBONE listener and upstream pools.
    #[arg(long, env = "MESH_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
    /// Upstream connect timeout (TCP and tunnel), in milliseconds (a `DestinationRule`'s
    /// `connectTimeout` overrides it).
    #[arg(long, env = "MESH_CONNECT_TIMEOUT_MS", default_value_t = 10_000)]
    connect_timeout_ms: u64,
    /// How long requests in flight may finish after SIGTERM, in seconds.
    #[arg(long, env = "MESH_DRAIN_SECONDS", default_value_t = 30)]
    drain_seconds: u64,
    #[arg(long, env = "MESH_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[arg(long, env = "MESH_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Dropped last: writes out what is still buffered.
    let _log_writer = match mesh_proxy::logs::init(&cli.log, cli.log_format == "json") {
        Ok(logging) => logging.guard,
        Err(e) => {
            eprintln!("mesh-waypoint: {e:#}");
            return ExitCode::from(2);
        }
    };
    // One arena per shard thread and one for the control runtime.
    control::limit_arenas(cli.worker_threads + 1);
    // Control, admin and signals; the requests are served by the shards' threads.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("mesh-waypoint: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Shard `index`'s thread: a runtime of its own serving the connections its listener
/// accepts, until the process exits (after the drain, connections still open are cut).
fn serve_shard(
    index: usize,
    listener: std::net::TcpListener,
    server: &Arc<mesh_proxy::tunnel::server::Server<inbound::Waypoint>>,
    drain: drain::Watch,
    name: &str,
) {
    shard::enter(index);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    runtime.block_on(async move {
        tokio::spawn(shard::keep_timers_near());
        drain::accept_until_drained(listener, drain.clone(), name, "hbone", |tcp, peer| {
            let server = server.clone();
            // One watch holds the drain open until the connection ends (its streams
            // finish after GOAWAY); the other tells it the drain began, and is gone
            // once it has.
            let (held, mut told) = (drain.clone(), drain.clone());
            tokio::spawn(async move {
                server.serve(tcp, peer, async move { told.signaled().await }).await;
                drop(held);
            });
        })
        .await;
        drop(drain);
        // Connections in flight go on until the drain ends the process.
        std::future::pending::<()>().await;
    });
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    info!(config = %serde_json::to_value(&cli).expect("serializes"), "starting mesh-waypoint");
    let ready = admin::Readiness::default();
    let startup = ready.register("startup");
    std::fs::create_dir_all(&cli.state_dir).with_context(|| format!("create state dir {}", cli.state_dir.display()))?;
    let tls =
        control::client_tls(cli.credential_dir.as_deref(), cli.root_cert.as_deref()).map_err(anyhow::Error::msg)?;
    let service_account = cli.service_account.clone().unwrap_or_else(|| cli.name.clone());
    let client = Arc::new(
        control::ControlClient::new(
            cli.controller.clone(),
            tls,
            cli.token_file.clone(),
            Some(cli.state_dir.join("view.json")),
            control::all_kinds,
        )
        .with_waypoint(&cli.namespace, &cli.name, &service_account),
    );
    match client.restore_view() {
        Ok((version, age)) => info!(version, age_seconds = age, "view restored from the state directory"),
        Err(error) => info!(%error, "no view restored; waiting for the controller"),
    }
    tokio::spawn(client.clone().run());
    let certs = Arc::new(identity::CertStore::new(client.clone(), Some(cli.state_dir.join("certs"))));
    let metrics = Arc::new(metrics::Metrics::default());
    metrics.register_collector(admin::ControlMetrics { client: client.clone(), certs: certs.clone() });

    let waypoint = inbound::Waypoint::new(inbound::Settings {
        namespace: cli.namespace.clone(),
        name: cli.name.clone(),
        service_account,
        client: client.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        connect_timeout: Duration::from_millis(cli.connect_timeout_ms),
        pod_name: cli.pod_name.clone(),
        shards: cli.worker_threads.max(1),
    });
    metrics.register_collector(inbound::SpanMetrics(waypoint.clone()));
    // Ready with a view and a certificate: until then every stream is refused.
    let waiting = ready.register("config");
    tokio::spawn(waypoint.clone().follow_config(waiting));
    // Idle upstream connections go even when no request comes to sweep them.
    let weak = Arc::downgrade(&waypoint);
    tokio::spawn(async move {
        let every = upstream::RELEASE_EVERY;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tick.tick().await;
            let Some(waypoint) = weak.upgrade() else { return };
            waypoint.release_idle();
        }
    });

    let (stop_serving, stop) = tokio::sync::watch::channel(false);
    let admin_server = admin::HttpServer::bind("admin", cli.admin_addr, None, stop.clone())
        .with_context(|| format!("cannot listen on admin address {}", cli.admin_addr))?;
    let metrics_server = admin::HttpServer::bind("metrics", cli.metrics_addr, None, stop.clone())
        .with_context(|| format!("cannot listen on metrics address {}", cli.metrics_addr))?;
    let ready_server = admin::HttpServer::bind("readiness", cli.readiness_addr, None, stop.clone())
        .with_context(|| format!("cannot listen on readiness address {}", cli.readiness_addr))?;
    let dump = waypoint.clone();
    tokio::spawn(admin_server.run(move |req| std::future::ready(dump.admin(&req))));
    let scrape = metrics.clone();
    tokio::spawn(metrics_server.run(move |req| {
        let accept = req.headers().get("accept").and_then(|v| v.to_str().ok());
        let (content_type, body) = scrape.render(accept);
        std::future::ready(admin::reply(http::StatusCode::OK, content_type, body))
    }));
    let ready_view = ready.clone();
    tokio::spawn(ready_server.run(move |req| std::future::ready(admin::readiness(&ready_view, &req))));

    let (trigger, drain) = drain::channel();
    let server = mesh_proxy::tunnel::server::Server::new(waypoint.clone());
    for index in 0..cli.worker_threads.max(1) {
        let listener = shard::listener(cli.hbone_addr)
            .with_context(|| format!("cannot listen on HBONE address {}", cli.hbone_addr))?;
        let (server, drain, name) = (server.clone(), drain.clone(), cli.name.clone());
        std::thread::Builder::new()
            .name(format!("shard-{index}"))
            .spawn(move || serve_shard(index, listener, &server, drain, &name))
            .context("cannot start a shard thread")?;
    }
    drop(drain);
    drop(startup);
    info!(addr = %cli.hbone_addr, "waypoint listening");

    let mut signals = mesh_proxy::drain::StopSignals::install().context("install the SIGTERM and SIGINT handlers")?;
    info!("{}: draining", signals.recv().await);
    let _ = stop_serving.send(true);
    waypoint.drain();
    if !trigger.drain(Duration::from_secs(cli.drain_seconds)).await {
        warn!("drain deadline passed with requests still open");
    }
    Ok(())
}
