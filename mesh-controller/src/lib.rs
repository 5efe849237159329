//! The mesh's controller: it will read configuration (a YAML directory or the
//! Kubernetes API), validate it, compute each node's view, stream it to agents and act
//! as the certificate authority. This crate is intentionally empty until the
//! control-plane work lands; the workspace reserves its place.
