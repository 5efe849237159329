//! The waypoint: an L7 proxy that Istio ambient's HBONE reaches for the services that
//! opt in (`istio.io/use-waypoint`). Pure logic (matching, weights, balancing, retry
//! decisions, ejection) lives in modules that take values and return values; the
//! proxy phases follow the packet walk: request filter (`normalize`) -> route ->
//! authorize (`authz`) -> upstream peer -> upstream request -> response -> log.

pub mod authz;
pub mod balance;
pub mod custom;
pub mod forwarded;
pub mod jwt;
pub mod limits;
pub mod normalize;
pub mod outlier;
pub mod policy;
pub mod ratelimit;
pub mod retry;
pub mod route;
pub mod sniff;
pub mod telemetry_api;
pub mod trace;
