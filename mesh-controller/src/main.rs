//! `mesh-controller`: serves validated configuration to the agents and signs their
//! workload certificates.
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_common::control::{CONTROLLER_NAME, node_identity};
use mesh_controller::{ca::Ca, server, source};
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
    /// Trust domain of the mesh's SPIFFE identities.
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

#[derive(Subcommand)]
enum Command {
    /// Serve configuration and certificates to agents.
    Serve {
        /// Directory of YAML manifests (watched; changes apply within a second).
        #[arg(long, env = "MESH_CONFIG_DIR")]
        config_dir: PathBuf,
        #[command(flatten)]
        ca: CaArgs,
        /// Other trust domains whose identities are accepted (migration).
        #[arg(long = "trust-domain-alias", env = "MESH_TRUST_DOMAIN_ALIASES", value_delimiter = ',')]
        trust_domain_aliases: Vec<String>,
        /// The mesh-wide root namespace.
        #[arg(long, env = "MESH_ROOT_NAMESPACE", default_value = "istio-system")]
        root_namespace: String,
        /// Control endpoint for agents (mTLS, HTTP/2).
        #[arg(long, env = "MESH_LISTEN", default_value = "0.0.0.0:15012")]
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

async fn serve(
    config_dir: PathBuf,
    ca: &CaArgs,
    trust_domain_aliases: Vec<String>,
    root_namespace: String,
    listen: SocketAddr,
    admin: SocketAddr,
    cert_lifetime: Duration,
) -> anyhow::Result<()> {
    let authority = ca.load().context("certificate authority")?;
    let fingerprint = source::fingerprint(&config_dir);
    let config = source::load(&config_dir, &ca.trust_domain, &root_namespace)
        .map_err(|report| anyhow::anyhow!("the configuration in {} is invalid:\n{report}", config_dir.display()))?;
    let san_uri = format!("spiffe://{}/ns/{root_namespace}/sa/mesh-controller", ca.trust_domain);
    let (serving, key) = authority.issue_with_key(
        vec![SanType::DnsName(CONTROLLER_NAME.try_into()?), SanType::URI(san_uri.as_str().try_into()?)],
        Duration::from_hours(365 * 24),
    )?;
    let chain = format!("{}{}", serving.cert_pem, serving.chain_pem.join(""));
    let tls = mesh_common::tls::server_config(&chain, &key, &[authority.root_pem().to_owned()])?;
    let controller = Arc::new(server::Controller::new(config, authority, cert_lifetime, trust_domain_aliases));
    let control = server::ControlServer::bind(listen, tls, controller.clone())
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let admin_listener =
        tokio::net::TcpListener::bind(admin).await.with_context(|| format!("cannot listen on {admin}"))?;
    info!(%listen, %admin, config_dir = %config_dir.display(), version = controller.current().version, "mesh-controller serving");
    tokio::spawn(server::serve_admin(admin_listener, controller.clone()));
    tokio::spawn(source::watch(config_dir, ca.trust_domain.clone(), root_namespace, controller.clone(), fingerprint));
    control.run().await;
    Ok(())
}
