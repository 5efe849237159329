//! The YAML directory source: polls the directory (2 Hz, so a change applies within a
//! second), loads and validates the whole set on any change, and hands a valid result
//! to the controller. An invalid change is rejected as a whole; the last good
//! configuration stays in force.
use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use mesh_common::config::{Config, Report, load_paths};

use crate::{
    server::Controller,
    settings::{Flags, fill_defaults},
};

/// A fingerprint of every manifest file (names and contents) below `dir`, the files
/// [`load`] reads.
pub fn fingerprint(dir: &Path) -> u64 {
    let (files, _) = mesh_common::config::manifest_files(&[dir.to_owned()]);
    let mut hasher = DefaultHasher::new();
    for file in files {
        file.hash(&mut hasher);
        std::fs::read(&file).unwrap_or_default().hash(&mut hasher);
    }
    hasher.finish()
}

/// Loads `dir`; `trust_domain` and `root_namespace` (the flags) apply where its mesh
/// config is silent ([`crate::settings`]).
pub fn load(dir: &Path, trust_domain: &str, root_namespace: &str) -> Result<Config, Report> {
    let mut config = load_paths(&[dir.to_owned()])?;
    let flags = Flags { trust_domain: trust_domain.to_owned(), root_namespace: root_namespace.to_owned() };
    fill_defaults(&mut config, &flags);
    Ok(config)
}

pub async fn watch(
    dir: PathBuf,
    trust_domain: String,
    root_namespace: String,
    controller: Arc<Controller>,
    mut last: u64,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let dir2 = dir.clone();
        let Ok(current) = tokio::task::spawn_blocking(move || fingerprint(&dir2)).await else { continue };
        if current == last {
            continue;
        }
        last = current;
        let (dir2, td, root) = (dir.clone(), trust_domain.clone(), root_namespace.clone());
        match tokio::task::spawn_blocking(move || load(&dir2, &td, &root)).await {
            Ok(Ok(config)) => {
                controller.apply_fetching(config).await;
            }
            Ok(Err(report)) => controller.reject(&report.to_string()),
            Err(_) => {}
        }
    }
}
