//! `meshctl`: the mesh's command-line tool. `meshctl validate PATH...` checks manifests
//! (files, or directories read recursively) with the same validation the controller
//! applies, prints every problem and exits 0 (valid), 1 (problems) or 2 (usage).
use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use mesh_controller::validate;

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
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    // clap exits with status 2 on a usage error (a missing PATH, an unknown flag).
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { paths } => match validate::validate(&paths) {
            Ok(outcome) => {
                print!("{}", outcome.render());
                ExitCode::from(outcome.exit_code())
            }
            Err(e) => {
                eprintln!("meshctl validate: {e}");
                ExitCode::from(2)
            }
        },
    }
}
