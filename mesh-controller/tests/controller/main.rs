//! The controller's integration tests, one binary (each links the Kubernetes client):
//! the Kubernetes source on recorded API objects, the install manifests, and
//! `meshctl` as a user runs it.
mod kube_recorded;
mod manifests;
mod meshctl;
