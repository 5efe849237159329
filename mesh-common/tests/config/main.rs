//! The configuration model's integration tests, one binary: the manifest corpora and
//! the CRD schemas.
mod corpus;
mod schemas;
