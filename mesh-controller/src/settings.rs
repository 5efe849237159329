//! The two mesh-wide settings both the mesh config and the controller's flags name:
//! the trust domain and the root namespace. As in Istio, the mesh config (`trustDomain`
//! and `rootNamespace` of `ConfigMap` `istio-system/istio`) is authoritative; the flags
//! (`--trust-domain`, `--root-namespace`) are the defaults used when it is silent.
//!
//! The trust domain is also fixed for as long as the controller runs: identities are
//! issued in it, agents verify peers against it, and the controller authenticates node
//! credentials with it. It is settled by the first configuration the controller serves
//! (in Kubernetes mode, the first one read from the API server); a later mesh config
//! naming another trust domain does not move it (fail closed on identity: nothing is
//! issued or trusted in a domain the running mesh does not use). That configuration is
//! served with the running trust domain and the controller says, once, that a restart
//! is needed. The root namespace only scopes configuration, and follows the mesh
//! config at any time.
//!
//! Pure: values in, values out; the controller logs what [`resolve`] reports.
use mesh_common::config::Config;

/// The flags' values: the defaults where the mesh config is silent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flags {
    pub trust_domain: String,
    pub root_namespace: String,
}

/// A disagreement the controller reports (once each).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub enum Conflict {
    #[error(
        "the mesh config's trustDomain {mesh:?} differs from --trust-domain {flag:?}: the mesh config's applies \
         (node credentials issued with {flag:?} are still accepted)"
    )]
    TrustDomainFlag { mesh: String, flag: String },
    #[error(
        "the mesh config's rootNamespace {mesh:?} differs from --root-namespace {flag:?}: the mesh config's applies"
    )]
    RootNamespaceFlag { mesh: String, flag: String },
    #[error(
        "the mesh config names trust domain {wanted:?} but the controller runs with {running:?}: identities stay in \
         {running:?} (the configuration is served with it) until the controller is restarted"
    )]
    TrustDomainChanged { wanted: String, running: String },
}

/// Fills in the flags where `config`'s mesh config is silent (a loaded configuration
/// already holds the mesh config's values where it names them).
pub fn fill_defaults(config: &mut Config, flags: &Flags) {
    if config.mesh.trust_domain.is_none() {
        flags.trust_domain.clone_into(&mut config.trust_domain);
    }
    if config.mesh.root_namespace.is_none() {
        flags.root_namespace.clone_into(&mut config.root_namespace);
    }
}

/// Settles `config`'s trust domain and root namespace: the mesh config's values when it
/// names them, else the flags'; then the trust domain pinned to `running` when the
/// controller already runs with one. Returns what disagreed.
pub fn resolve(config: &mut Config, flags: &Flags, running: Option<&str>) -> Vec<Conflict> {
    fill_defaults(config, flags);
    let mut conflicts = Vec::new();
    if let Some(mesh) = config.mesh.trust_domain.as_ref().filter(|td| **td != flags.trust_domain) {
        conflicts.push(Conflict::TrustDomainFlag { mesh: mesh.clone(), flag: flags.trust_domain.clone() });
    }
    if let Some(mesh) = config.mesh.root_namespace.as_ref().filter(|ns| **ns != flags.root_namespace) {
        conflicts.push(Conflict::RootNamespaceFlag { mesh: mesh.clone(), flag: flags.root_namespace.clone() });
    }
    if let Some(running) = running.filter(|running| *running != config.trust_domain) {
        let wanted = std::mem::replace(&mut config.trust_domain, running.to_owned());
        conflicts.push(Conflict::TrustDomainChanged { wanted, running: running.to_owned() });
    }
    conflicts
}

#[cfg(test)]
mod tests {
    use mesh_common::config::mesh::MeshConfig;

    use super::*;

    fn flags() -> Flags {
        Flags { trust_domain: "flag.example".into(), root_namespace: "flag-root".into() }
    }

    fn with_mesh(trust_domain: Option<&str>, root_namespace: Option<&str>) -> Config {
        // As a load leaves it: the mesh config's values copied into the config's.
        let mut config = Config {
            mesh: MeshConfig {
                trust_domain: trust_domain.map(Into::into),
                root_namespace: root_namespace.map(Into::into),
                ..MeshConfig::default()
            },
            ..Config::default()
        };
        if let Some(td) = trust_domain {
            config.trust_domain = td.into();
        }
        if let Some(ns) = root_namespace {
            config.root_namespace = ns.into();
        }
        config
    }

    #[test]
    fn flags_apply_when_the_mesh_config_is_silent() {
        let mut config = with_mesh(None, None);
        assert_eq!(resolve(&mut config, &flags(), None), []);
        assert_eq!((config.trust_domain.as_str(), config.root_namespace.as_str()), ("flag.example", "flag-root"));
    }

    #[test]
    fn the_mesh_config_wins_and_a_conflict_names_both_values() {
        let mut config = with_mesh(Some("mesh.example"), Some("mesh-root"));
        let conflicts = resolve(&mut config, &flags(), None);
        assert_eq!((config.trust_domain.as_str(), config.root_namespace.as_str()), ("mesh.example", "mesh-root"));
        assert_eq!(
            conflicts,
            [
                Conflict::TrustDomainFlag { mesh: "mesh.example".into(), flag: "flag.example".into() },
                Conflict::RootNamespaceFlag { mesh: "mesh-root".into(), flag: "flag-root".into() },
            ]
        );
        let text = conflicts[0].to_string();
        assert!(text.contains("\"mesh.example\"") && text.contains("\"flag.example\""), "{text}");
        // Equal values are no conflict.
        let mut config = with_mesh(Some("flag.example"), Some("flag-root"));
        assert_eq!(resolve(&mut config, &flags(), None), []);
    }

    #[test]
    fn a_running_trust_domain_is_never_moved() {
        let mut config = with_mesh(Some("new.example"), Some("mesh-root"));
        let conflicts = resolve(&mut config, &flags(), Some("old.example"));
        assert_eq!(config.trust_domain, "old.example", "identities stay where they are");
        assert_eq!(config.root_namespace, "mesh-root", "the root namespace follows the mesh config");
        assert!(
            conflicts.contains(&Conflict::TrustDomainChanged {
                wanted: "new.example".into(),
                running: "old.example".into()
            })
        );
        // The mesh config going silent falls back to the flag, which is pinned too.
        let mut config = with_mesh(None, None);
        let conflicts = resolve(&mut config, &flags(), Some("old.example"));
        assert_eq!(config.trust_domain, "old.example");
        assert_eq!(
            conflicts,
            [Conflict::TrustDomainChanged { wanted: "flag.example".into(), running: "old.example".into() }]
        );
        // The same trust domain: nothing to say.
        let mut config = with_mesh(Some("old.example"), None);
        assert_eq!(
            resolve(&mut config, &Flags { trust_domain: "old.example".into(), ..flags() }, Some("old.example")),
            []
        );
    }
}
