//! The mesh's controller: reads configuration (a directory of YAML manifests, or
//! the Kubernetes API), validates it, computes each node's view and streams it
//! to the agents over mutual TLS, and is the certificate authority that signs the
//! workload identities of the pods on each agent's node.
pub mod ca;
pub mod jwks;
pub mod kube_source;
pub mod lease;
pub mod manifest;
pub mod node_auth;
pub mod replicas;
pub mod server;
pub mod settings;
pub mod source;
pub mod status;
pub mod validate;
pub mod view;
pub mod waypoint;
