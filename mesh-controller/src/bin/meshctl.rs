//! `meshctl`: the mesh's command-line tool. `meshctl validate PATH...` checks manifests
//! (files, or directories read recursively) with the same validation the controller
//! applies, prints every problem and warning and exits 0 (valid, warnings allowed
//! unless `--strict`), 1 (problems) or 2 (usage).
//! `meshctl status` shows the controllers' configuration versions and, for every
//! agent and every waypoint, the version it was sent and the one it acknowledged
//! (`--kubernetes`: every controller replica of the cluster, merged).
//! `meshctl waypoint generate|apply|list` declares waypoints as `istioctl waypoint` does.
//! `meshctl manifest generate [--set KEY=VALUE]...` prints the Kubernetes manifests of
//! an install (exit 2 on a bad `--set`), for `| kubectl apply -f -` or `| kubectl delete -f -`.
use std::{fmt::Write as _, net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use mesh_controller::{manifest, validate, waypoint};

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Command-line tool of the mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check Istio/Gateway API/Kubernetes manifests offline, as the controller would.
    Validate {
        /// Manifest files, or directories searched recursively for *.yaml, *.yml, *.json.
        #[arg(required_unless_present = "kubernetes", value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// Check the objects of the live cluster instead ($KUBECONFIG or in-cluster
        /// credentials): each problem names `Kind/namespace/name` and the field.
        #[arg(long, conflicts_with = "paths")]
        kubernetes: bool,
        /// Fail (exit 1) on warnings too: references to objects that are not among the
        /// manifests (a subset without its `DestinationRule`), fields not enforced yet.
        #[arg(long)]
        strict: bool,
    },
    /// Show the controllers' configuration versions and every agent's and waypoint's sync state.
    Status {
        /// A controller replica's status endpoint; repeat (or separate by commas) to ask
        /// several and merge what they say. 127.0.0.1:15014 when none is given.
        #[arg(long, env = "MESH_CONTROLLER_ADMIN", value_delimiter = ',')]
        controller: Vec<SocketAddr>,
        /// Ask every controller pod of the cluster instead ($KUBECONFIG or in-cluster
        /// credentials), each through the API server's port-forward (RBAC in the
        /// controllers' namespace: list pods; get and create pods/portforward).
        #[arg(long)]
        kubernetes: bool,
        /// The controllers' namespace, with --kubernetes.
        #[arg(long, short = 'n', default_value = "mesh-system")]
        namespace: String,
    },
    /// Kubernetes manifests of an install.
    Manifest {
        #[command(subcommand)]
        command: ManifestCommand,
    },
    /// Declare a namespace's waypoint (a Gateway of class istio-waypoint), as `istioctl waypoint` does.
    Waypoint {
        #[command(subcommand)]
        command: WaypointCommand,
    },
}

#[derive(Subcommand)]
enum WaypointCommand {
    /// Print the waypoint's Gateway as YAML.
    Generate {
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// The Gateway's name (its pods run as the `ServiceAccount` of that name).
        #[arg(long, default_value = "waypoint")]
        name: String,
        /// Which traffic it takes (label istio.io/waypoint-for).
        #[arg(long = "for", value_enum, default_value_t)]
        waypoint_for: waypoint::WaypointFor,
    },
    /// Create or update the waypoint's Gateway in the cluster.
    Apply {
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "waypoint")]
        name: String,
        #[arg(long = "for", value_enum, default_value_t)]
        waypoint_for: waypoint::WaypointFor,
        /// Also label the namespace istio.io/use-waypoint=<name>: its services then use it.
        #[arg(long)]
        enroll_namespace: bool,
    },
    /// List the Gateways of class istio-waypoint.
    List {
        /// One namespace (all namespaces when absent).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
}

#[derive(Subcommand)]
enum ManifestCommand {
    /// Print the manifests (CRDs, namespace, RBAC, controller, agent, waypoint) as
    /// multi-document YAML: `meshctl manifest generate | kubectl apply -f -` installs,
    /// `| kubectl delete -f -` removes.
    #[command(after_help = set_keys_help())]
    Generate {
        /// A value, repeatable: profile=default|demo|minimal, hub, image, tag, namespace,
        /// controller.replicas, controller.logLevel, agent.logLevel, agent.excludePorts,
        /// trustDomain, rootNamespace, waypoint.enabled, waypoint.name, waypoint.namespace.
        #[arg(long = "set", short = 's', value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
}

fn set_keys_help() -> String {
    manifest::KEYS.iter().fold(String::from("Keys accepted by --set:\n"), |mut help, (key, expected)| {
        let _ = writeln!(help, "  {key:<20} {expected}");
        help
    })
}

/// `meshctl status`: exit 0 when every connected agent and waypoint is in sync with its
/// replica, 1 when one is not or a replica could not be read, 2 when none could be found.
fn status(addresses: Vec<SocketAddr>, kubernetes: bool, namespace: &str) -> ExitCode {
    if kubernetes && !addresses.is_empty() {
        eprintln!("meshctl status: --kubernetes asks the cluster's controller pods; --controller is ignored");
    }
    let asked = block_on(async {
        if kubernetes {
            let client = kube::Client::try_default().await.map_err(|e| format!("no cluster credentials: {e}"))?;
            mesh_controller::replicas::in_cluster(client, namespace).await
        } else {
            let addresses =
                if addresses.is_empty() { vec![SocketAddr::from(([127, 0, 0, 1], 15014))] } else { addresses };
            let replicas = addresses.into_iter().map(mesh_controller::replicas::at_address);
            Ok((futures_util::future::join_all(replicas).await, Vec::new()))
        }
    });
    let (mut replicas, notes) = match asked {
        Ok(asked) => asked,
        Err(e) => {
            eprintln!("meshctl status: {e}");
            return ExitCode::from(2);
        }
    };
    // One controller asked by address: its own words, as before replicas were merged.
    if let [only] = replicas.as_mut_slice()
        && !kubernetes
    {
        match &only.status {
            Ok(_) => only.name.clear(),
            Err(e) => {
                eprintln!("meshctl status: {e}");
                return ExitCode::from(1);
            }
        }
    }
    for note in notes {
        println!("controller {note}");
    }
    let rendered = mesh_controller::status::render_replicas(&replicas);
    print!("{}", rendered.text);
    if rendered.in_sync { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// `meshctl waypoint ...`: bad names exit 2, cluster failures 1, each with one line.
fn waypoint_command(command: WaypointCommand) -> ExitCode {
    let spec = |namespace: &str, name: &str, waypoint_for| waypoint::Spec::new(namespace, name, waypoint_for);
    let (verb, outcome) = match command {
        WaypointCommand::Generate { namespace, name, waypoint_for } => match spec(&namespace, &name, waypoint_for) {
            Ok(spec) => {
                print!("{}", waypoint::generate_yaml(&spec));
                return ExitCode::SUCCESS;
            }
            Err(e) => ("generate", Err((2, e))),
        },
        WaypointCommand::Apply { namespace, name, waypoint_for, enroll_namespace } => {
            let outcome = match spec(&namespace, &name, waypoint_for) {
                Err(e) => Err((2, e)),
                Ok(spec) => block_on(async {
                    let client = waypoint::client().await?;
                    waypoint::apply(&client, &spec, enroll_namespace).await?;
                    println!("waypoint {}/{} applied", spec.namespace, spec.name);
                    if enroll_namespace {
                        println!("namespace {} labelled istio.io/use-waypoint={}", spec.namespace, spec.name);
                    }
                    Ok(())
                })
                .map_err(|e| (1, e)),
            };
            ("apply", outcome)
        }
        WaypointCommand::List { namespace } => {
            let outcome = block_on(async {
                let client = waypoint::client().await?;
                let gateways = waypoint::list(&client, namespace.as_deref()).await?;
                print!("{}", waypoint::render_rows(&waypoint::waypoint_rows(&gateways)));
                Ok(())
            });
            ("list", outcome.map_err(|e| (1, e)))
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, error)) => {
            // One line: the error and its causes (kube's errors repeat their sources
            // in their own text; a cause already said is not said again).
            let mut line = error.to_string();
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                let text = cause.to_string();
                if !line.contains(&text) {
                    line.push_str(": ");
                    line.push_str(&text);
                }
                source = cause.source();
            }
            eprintln!("meshctl waypoint {verb}: {}", line.replace('\n', " "));
            ExitCode::from(code)
        }
    }
}

fn block_on<T>(future: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime").block_on(future)
}

/// `meshctl validate --kubernetes`: lists the cluster with the controller's own code.
fn validate_cluster(strict: bool) -> ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let listed = runtime.block_on(async {
        let client = kube::Client::try_default().await.map_err(|e| format!("no cluster credentials: {e}"))?;
        mesh_controller::kube_source::list_cluster(&client).await.map_err(|e| format!("cannot list the cluster: {e}"))
    });
    match listed {
        Ok(store) => {
            let outcome = validate::validate_documents(store.documents());
            match &outcome {
                validate::Outcome::Valid { files, config } => {
                    for warning in &config.warnings {
                        println!("warning: {warning}");
                    }
                    let warnings = config.warnings.len();
                    let with = match warnings {
                        0 => String::new(),
                        1 => " with 1 warning".to_owned(),
                        n => format!(" with {n} warnings"),
                    };
                    println!("✔ the cluster's {files} mesh objects are valid{with}");
                }
                validate::Outcome::Invalid { files, report } => {
                    for problem in &report.0 {
                        println!("{problem}");
                    }
                    let n = report.0.len();
                    println!("✘ {n} problem{} in the cluster's {files} mesh objects", if n == 1 { "" } else { "s" });
                }
            }
            ExitCode::from(outcome.exit_code(strict))
        }
        Err(e) => {
            eprintln!("meshctl validate --kubernetes: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    // clap exits with status 2 on a usage error (a missing PATH, an unknown flag).
    let cli = Cli::parse();
    match cli.command {
        Command::Manifest { command: ManifestCommand::Generate { set } } => match manifest::generate(&set) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshctl manifest generate: {e}");
                ExitCode::from(2)
            }
        },
        Command::Status { controller, kubernetes, namespace } => status(controller, kubernetes, &namespace),
        Command::Waypoint { command } => waypoint_command(command),
        Command::Validate { kubernetes: true, strict, .. } => validate_cluster(strict),
        Command::Validate { paths, strict, .. } => match validate::validate(&paths) {
            Ok(outcome) => {
                print!("{}", outcome.render());
                ExitCode::from(outcome.exit_code(strict))
            }
            Err(e) => {
                eprintln!("meshctl validate: {e}");
                ExitCode::from(2)
            }
        },
    }
}
