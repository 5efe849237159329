//! `mesh-controller`: serves validated configuration to the agents and signs their
//! workload certificates.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_common::control::{CONTROLLER_NAME, node_identity};
use mesh_controller::{ca::Ca, kube_source, lease, node_auth, server, source};
use rcgen::SanType;
use tracing::info;

#[derive(Parser)]
#[command(name = "mesh-controller", version, about = "Controller of the mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct CaArgs {
    /// Directory holding the generated root (created on first start).
    #[arg(long, env = "MESH_CA_DIR", default_value = "/var/lib/mesh/ca")]
    ca_dir: PathBuf,
    /// Plug in a CA certificate instead (with --ca-key; optional --ca-chain).
    #[arg(long, env = "MESH_CA_CERT", requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    #[arg(long, env = "MESH_CA_KEY", requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Intermediates and root above --ca-cert, PEM.
    #[arg(long, env = "MESH_CA_CHAIN", requires = "ca_cert")]
    ca_chain: Option<PathBuf>,
    /// Trust domain of the mesh's SPIFFE identities, when the mesh config names none
    /// (its `trustDomain` wins).
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
}

impl CaArgs {
    fn load(&self) -> anyhow::Result<Ca> {
        Ok(match (&self.ca_cert, &self.ca_key) {
            (Some(cert), Some(key)) => Ca::from_files(cert, key, self.ca_chain.as_deref())?,
            _ => Ca::load_or_create(&self.ca_dir, &self.trust_domain)?,
        })
    }
}

/// Kubernetes mode: configuration from the API server, agents authenticated by token.
#[derive(clap::Args, Debug)]
struct KubeArgs {
    /// Watch the Kubernetes API (in-cluster credentials, or $KUBECONFIG) instead of a
    /// directory.
    #[arg(long, env = "MESH_KUBERNETES")]
    kubernetes: bool,
    /// Audience the agents' projected `ServiceAccount` tokens must carry.
    #[arg(long, env = "MESH_TOKEN_AUDIENCE", default_value = "mesh-controller", requires = "kubernetes")]
    token_audience: String,
    /// The agents' `ServiceAccount`, `namespace/name` (namespace defaults to the Lease's).
    #[arg(long, env = "MESH_AGENT_SERVICE_ACCOUNT", default_value = "mesh-agent", requires = "kubernetes")]
    agent_service_account: String,
    /// The Lease that elects the replica writing status and Events.
    #[arg(long, env = "MESH_LEASE_NAME", default_value = "mesh-controller", requires = "kubernetes")]
    lease_name: String,
    #[arg(long, env = "MESH_LEASE_NAMESPACE", default_value = "istio-system", requires = "kubernetes")]
    lease_namespace: String,
    /// This replica's name in the Lease (the pod name).
    #[arg(long, env = "MESH_POD_NAME", requires = "kubernetes")]
    pod_name: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve configuration and certificates to agents.
    Serve {
        /// Directory of YAML manifests (watched; changes apply within a second).
        #[arg(long, env = "MESH_CONFIG_DIR", required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
        config_dir: Option<PathBuf>,
        #[command(flatten)]
        kube: Box<KubeArgs>,
        #[command(flatten)]
        ca: CaArgs,
        /// Other trust domains whose identities are accepted (migration).
        #[arg(long = "trust-domain-alias", env = "MESH_TRUST_DOMAIN_ALIASES", value_delimiter = ',')]
        trust_domain_aliases: Vec<String>,
        /// The mesh-wide root namespace, when the mesh config names none (its
        /// `rootNamespace` wins).
        #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = "istio-system")]
        root_namespace: String,
        /// Control endpoint for agents (mTLS, HTTP/2).
        #[arg(long, env = "MESH_LISTEN", default_value = "[::]:15012")]
        listen: SocketAddr,
        /// Status and metrics endpoint.
        #[arg(long, env = "MESH_ADMIN_ADDR", default_value = "127.0.0.1:15014")]
        admin: SocketAddr,
        /// Lifetime of workload certificates, seconds.
        #[arg(long, env = "MESH_CERT_LIFETIME_SECONDS", default_value_t = 24 * 3600)]
        cert_lifetime_seconds: u64,
        /// Log filter.
        #[arg(long, env = "MESH_LOG", default_value = "info")]
        log: String,
    },
    /// Write a node's bootstrap credential (certificate, key, root) for its agent.
    NodeCredential {
        #[command(flatten)]
        ca: CaArgs,
        /// The node's name.
        #[arg(long)]
        node: String,
        /// Output directory (node-cert.pem, node-key.pem, root-cert.pem).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, seconds.
        #[arg(long, default_value_t = 365 * 24 * 3600)]
        lifetime_seconds: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::NodeCredential { ca, node, out, lifetime_seconds } => {
            node_credential(&ca, &node, &out, lifetime_seconds)
        }
        Command::Serve {
            config_dir,
            kube,
            ca,
            trust_domain_aliases,
            root_namespace,
            listen,
            admin,
            cert_lifetime_seconds,
            log,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_new(&log).unwrap_or_else(|_| "info".into()))
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
                .init();
            tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime").block_on(serve(
                config_dir,
                &kube,
                &ca,
                trust_domain_aliases,
                root_namespace,
                listen,
                admin,
                Duration::from_secs(cert_lifetime_seconds),
            ))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn node_credential(ca: &CaArgs, node: &str, out: &std::path::Path, lifetime: u64) -> anyhow::Result<()> {
    let authority = ca.load()?;
    let uri = node_identity(&ca.trust_domain, node);
    let (issued, key) =
        authority.issue_with_key(vec![SanType::URI(uri.as_str().try_into()?)], Duration::from_secs(lifetime))?;
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("node-cert.pem"), &issued.cert_pem)?;
    std::fs::write(out.join("node-key.pem"), key)?;
    std::fs::write(out.join("root-cert.pem"), authority.root_pem())?;
    println!("wrote the credential of {uri} to {}", out.display());
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    config_dir: Option<PathBuf>,
    kube: &KubeArgs,
    ca: &CaArgs,
    trust_domain_aliases: Vec<String>,
    root_namespace: String,
    listen: SocketAddr,
    admin: SocketAddr,
    cert_lifetime: Duration,
) -> anyhow::Result<()> {
    // Stop at SIGTERM (as PID 1 of a container, nothing else would) or SIGINT: the
    // agents reconnect to another replica and keep serving on their last view.
    // Installed first, so that a signal during the start-up waits is kept.
    let mut signals = mesh_proxy::drain::StopSignals::install().context("install the SIGTERM and SIGINT handlers")?;
    let authority = ca.load().context("certificate authority")?;
    let config = match &config_dir {
        Some(dir) => source::load(dir, &ca.trust_domain, &root_namespace)
            .map_err(|report| anyhow::anyhow!("the configuration in {} is invalid:\n{report}", dir.display()))?,
        // Filled from the API server before any agent is served.
        None => mesh_common::config::Config {
            trust_domain: ca.trust_domain.clone(),
            root_namespace: root_namespace.clone(),
            ..Default::default()
        },
    };
    // The mesh config's trust domain and root namespace win over the flags (which
    // fill in where it is silent); in Kubernetes mode it is read from the API server
    // before any agent is served, and the first configuration read settles the trust
    // domain ([`mesh_controller::settings`]).
    let san_uri = format!("spiffe://{}/ns/{}/sa/mesh-controller", config.trust_domain, config.root_namespace);
    let (serving, key) = authority.issue_with_key(
        vec![SanType::DnsName(CONTROLLER_NAME.try_into()?), SanType::URI(san_uri.as_str().try_into()?)],
        Duration::from_hours(365 * 24),
    )?;
    let chain = format!("{}{}", serving.cert_pem, serving.chain_pem.join(""));
    let roots = [authority.root_pem().to_owned()];
    let flags = mesh_controller::settings::Flags {
        trust_domain: ca.trust_domain.clone(),
        root_namespace: root_namespace.clone(),
    };
    let controller = Arc::new(
        server::Controller::new(config, authority, cert_lifetime, trust_domain_aliases)
            .with_flags(flags, config_dir.is_none()),
    );
    // `jwksUri` key sets: fetched here and pushed inline to the waypoints; those of the
    // initial configuration before any agent is served (bounded wait).
    controller.fetch_running_jwks().await;
    tokio::spawn(mesh_controller::jwks::run(controller.clone()));
    let admin_listener = mesh_proxy::socket::listen(admin, false)
        .and_then(tokio::net::TcpListener::from_std)
        .with_context(|| format!("cannot listen on {admin}"))?;
    let mut election = None;
    let control = if let Some(dir) = config_dir {
        let tls = mesh_common::tls::server_config(&chain, &key, &roots)?;
        let control = server::ControlServer::bind(listen, tls, controller.clone())
            .with_context(|| format!("cannot listen on {listen}"))?;
        info!(%listen, %admin, config_dir = %dir.display(), version = controller.current().version, "mesh-controller serving");
        tokio::spawn(server::serve_admin(admin_listener, controller.clone()));
        let fingerprint = source::fingerprint(&dir);
        tokio::spawn(source::watch(dir, ca.trust_domain.clone(), root_namespace, controller.clone(), fingerprint));
        control
    } else {
        let client = ::kube::Client::try_default()
            .await
            .context("no Kubernetes API credentials (in-cluster ServiceAccount or $KUBECONFIG)")?;
        tokio::spawn(server::serve_admin(admin_listener, controller.clone()));
        let (problems_tx, problems_rx) = tokio::sync::watch::channel(kube_source::Reported::default());
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
        let settings = kube_source::Settings {
            trust_domain: ca.trust_domain.clone(),
            root_namespace,
            debounce: Duration::from_millis(200),
        };
        tokio::spawn(kube_source::run(client.clone(), controller.clone(), settings, problems_tx, Some(synced_tx)));
        let me = kube.pod_name.clone().unwrap_or_else(|| format!("mesh-controller-{}", std::process::id()));
        let (leader_tx, leader_rx) = tokio::sync::watch::channel(false);
        election = Some(
            lease::Election::start(
                client.clone(),
                kube.lease_namespace.clone(),
                kube.lease_name.clone(),
                me.clone(),
                leader_tx,
            )
            .with_writer(tokio::spawn(kube_source::report(client.clone(), me, problems_rx, leader_rx))),
        );
        // Agents are served only once the cluster has been listed: an empty view would
        // make them release every pod.
        info!("listing the cluster");
        tokio::select! {
            synced = synced_rx => if synced.is_err() {
                step_down(election).await;
                anyhow::bail!("the Kubernetes source stopped");
            },
            signal = signals.recv() => {
                info!("{signal} while listing the cluster: stopping");
                step_down(election).await;
                return Ok(());
            }
        }
        let (agent_ns, agent_sa) = kube
            .agent_service_account
            .split_once('/')
            .unwrap_or((kube.lease_namespace.as_str(), kube.agent_service_account.as_str()));
        let tokens = Arc::new(node_auth::NodeAuthenticator::new(
            Box::new(client),
            kube.token_audience.clone(),
            agent_ns,
            agent_sa,
        ));
        let tls = mesh_common::tls::server_config_optional_client(&chain, &key, &roots)?;
        let control = match server::ControlServer::bind(listen, tls, controller.clone()) {
            Ok(control) => control.with_tokens(tokens),
            Err(error) => {
                step_down(election).await;
                return Err(error).with_context(|| format!("cannot listen on {listen}"));
            }
        };
        info!(%listen, %admin, version = controller.current().version, "mesh-controller serving (Kubernetes)");
        control
    };
    tokio::select! {
        () = control.run() => {}
        signal = signals.recv() => info!("{signal}: stopping"),
    }
    step_down(election).await;
    Ok(())
}

/// Gives the Lease up on the way out, if this replica takes part in an election.
async fn step_down(election: Option<lease::Election>) {
    if let Some(election) = election {
        election.step_down().await;
    }
}
