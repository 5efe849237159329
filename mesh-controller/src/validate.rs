//! `meshctl validate`: the controller's configuration checks, run offline on files and
//! directories, with a report a person reads (one problem per line, warnings too) and
//! an exit status a script reads (0 valid, 1 invalid, 2 usage error). Warnings (a
//! route to a subset whose `DestinationRule` is not among the files, a field accepted
//! but not enforced) leave the status at 0 unless `--strict`.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use mesh_common::config::{self, Config, Report};

#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("{}: no such file or directory", path.display())]
    NotFound { path: PathBuf },
    #[error("{}: no manifests (*.yaml, *.yml, *.json) found", path.display())]
    Empty { path: PathBuf },
}

/// What `validate` found.
#[derive(Debug)]
pub enum Outcome {
    Valid { files: usize, config: Box<Config> },
    Invalid { files: usize, report: Report },
}

impl Outcome {
    /// 0 valid, 1 invalid; with `strict`, a warning makes it invalid too.
    pub fn exit_code(&self, strict: bool) -> u8 {
        match self {
            Self::Valid { config, .. } if strict && !config.warnings.is_empty() => 1,
            Self::Valid { .. } => 0,
            Self::Invalid { .. } => 1,
        }
    }

    /// The report: every problem on its own line, then a summary line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        match self {
            Self::Valid { files, config } => {
                for warning in &config.warnings {
                    let _ = writeln!(out, "warning: {warning}");
                }
                // Only what was checked is called valid; the rest is named, with its group.
                let objects = config.object_count();
                let _ = write!(
                    out,
                    "✔ {} in {} {} valid",
                    plural(objects, "object", "objects"),
                    plural(*files, "file", "files"),
                    if objects == 1 { "is" } else { "are" },
                );
                if !config.warnings.is_empty() {
                    let _ = write!(out, " with {}", plural(config.warnings.len(), "warning", "warnings"));
                }
                if !config.ignored.is_empty() {
                    let _ = write!(out, "; not checked: {}", config.not_checked_summary());
                }
                out.push('\n');
            }
            Self::Invalid { files, report } => {
                for problem in &report.0 {
                    let _ = writeln!(out, "{problem}");
                }
                let with_problems = {
                    let mut names: Vec<&str> = report.0.iter().map(|p| p.file.as_str()).collect();
                    names.sort_unstable();
                    names.dedup();
                    names.len()
                };
                let problems = plural(report.0.len(), "problem", "problems");
                let _ = if with_problems == *files {
                    writeln!(out, "✘ {problems} in {}", plural(*files, "file", "files"))
                } else {
                    writeln!(out, "✘ {problems} in {with_problems} of {}", plural(*files, "file", "files"))
                };
            }
        }
        out
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Checks the objects of a cluster (documents as the Kubernetes source builds them,
/// named `Kind/namespace/name`): every problem of every object, as the controller
/// would report them on the objects.
pub fn validate_documents(docs: &std::collections::BTreeMap<String, serde_json::Value>) -> Outcome {
    let files = docs.len();
    match crate::kube_source::load_documents(docs, config::DEFAULT_TRUST_DOMAIN, config::DEFAULT_ROOT_NAMESPACE) {
        Ok(config) => Outcome::Valid { files, config: Box::new(config) },
        Err(report) => Outcome::Invalid { files, report },
    }
}

/// Reads and checks `paths` (files or directories). A path that does not exist, or a
/// directory without manifests, is a usage error; everything else is in the outcome.
pub fn validate(paths: &[PathBuf]) -> Result<Outcome, UsageError> {
    for path in paths {
        if !path.exists() {
            return Err(UsageError::NotFound { path: path.clone() });
        }
    }
    let (sources, mut problems) = config::read_sources(paths);
    // A directory that could not be read is reported as a problem, not as empty.
    let empty = paths.iter().find(|p| p.is_dir() && !sources.iter().any(|s| Path::new(&s.name).starts_with(p)));
    if let Some(empty) = empty
        && problems.is_empty()
    {
        return Err(UsageError::Empty { path: empty.clone() });
    }
    // What `read_sources` could not read are files (or directories) too.
    let files = sources.len() + problems.len();
    match config::load(&sources) {
        Ok(config) if problems.is_empty() => Ok(Outcome::Valid { files, config: Box::new(config) }),
        Ok(_) => Ok(Outcome::Invalid { files, report: Report(problems) }),
        Err(Report(more)) => {
            problems.extend(more);
            Ok(Outcome::Invalid { files, report: Report(problems) })
        }
    }
}
