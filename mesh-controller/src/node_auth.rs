//! Node identity from a projected `ServiceAccount` token (Kubernetes mode).
//!
//! An agent without a node certificate sends `authorization: Bearer <token>`: the
//! token kubelet projects into the agent pod with audience `mesh-controller` (useless
//! against the API server, bound to the pod, rotated by kubelet). The controller asks
//! the API server about it (a `TokenReview`) and accepts it only when it is valid for
//! that audience, belongs to the agent's `ServiceAccount`, and is bound to a pod on a
//! node: that node is the agent's identity, and the controller signs workload
//! certificates only for pods scheduled there. Reviews are cached for a minute, so a
//! reconnecting fleet does not flood the API server.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use futures_util::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};

/// The `extra` key under which a bound token names its node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The `extra` key under which a token bound to a pod names it (a token bound to a
/// Node object names a node too, but no agent pod runs with it).
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const CACHE_FOR: Duration = Duration::from_mins(1);
/// How long a refused token stays refused without asking again (a client sending
/// random tokens must not turn into a `TokenReview` per request).
const REFUSED_FOR: Duration = Duration::from_secs(10);
const CACHE_MAX: usize = 10_000;
/// Reviews in flight at once; more requests wait.
const MAX_REVIEWS: usize = 8;

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the API server does not accept the token: {0}")]
    NotAuthenticated(String),
    #[error("the token is not for audience {expected} (it is for {actual:?})")]
    WrongAudience { expected: String, actual: Vec<String> },
    #[error("the token belongs to {actual}, not to the agent's service account {expected}")]
    WrongAccount { expected: String, actual: String },
    #[error("the token of {0} is not bound to a pod on a node (no {NODE_NAME_EXTRA} and {POD_NAME_EXTRA})")]
    NoNode(String),
    #[error("cannot ask the API server (TokenReview): {0}")]
    Review(String),
}

/// Asks whether a token is valid: the Kubernetes API in production.
pub trait Reviewer: Send + Sync {
    fn review<'a>(&'a self, token: &'a str, audience: &'a str) -> BoxFuture<'a, Result<TokenReviewStatus, String>>;
}

impl Reviewer for Client {
    fn review<'a>(&'a self, token: &'a str, audience: &'a str) -> BoxFuture<'a, Result<TokenReviewStatus, String>> {
        Box::pin(async move {
            let api: Api<TokenReview> = Api::all(self.clone());
            let review = TokenReview {
                spec: TokenReviewSpec { token: token.to_owned(), audiences: Some(vec![audience.to_owned()]) },
                ..TokenReview::default()
            };
            let reviewed = api.create(&PostParams::default(), &review).await.map_err(|e| e.to_string())?;
            reviewed.status.ok_or_else(|| "the TokenReview came back without a status".to_owned())
        })
    }
}

/// The node a reviewed token speaks for.
pub fn node_of(status: &TokenReviewStatus, audience: &str, account: &str) -> Result<String, AuthError> {
    if status.authenticated != Some(true) {
        return Err(AuthError::NotAuthenticated(status.error.clone().unwrap_or_else(|| "not authenticated".into())));
    }
    // The API server checked the token against the audiences asked for and lists the
    // ones it is valid for; an empty list would mean "the API server's own".
    let audiences = status.audiences.clone().unwrap_or_default();
    if !audiences.iter().any(|a| a == audience) {
        return Err(AuthError::WrongAudience { expected: audience.to_owned(), actual: audiences });
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.clone()).unwrap_or_default();
    if username != account {
        return Err(AuthError::WrongAccount { expected: account.to_owned(), actual: username });
    }
    let extra = user.and_then(|u| u.extra.as_ref());
    let first = |key: &str| extra.and_then(|e| e.get(key)).and_then(|v| v.first()).filter(|v| !v.is_empty()).cloned();
    match (first(NODE_NAME_EXTRA), first(POD_NAME_EXTRA)) {
        (Some(node), Some(_pod)) => Ok(node),
        _ => Err(AuthError::NoNode(username)),
    }
}

/// Token -> outcome of its review, and when it was reviewed.
type ReviewCache = HashMap<String, (Result<String, AuthError>, Instant)>;

/// Token -> node, with the cache.
pub struct NodeAuthenticator {
    reviewer: Box<dyn Reviewer>,
    audience: String,
    /// `system:serviceaccount:<namespace>:<name>` of the agents.
    account: String,
    cache: Mutex<ReviewCache>,
    reviews: tokio::sync::Semaphore,
}

impl NodeAuthenticator {
    pub fn new(reviewer: Box<dyn Reviewer>, audience: String, agent_namespace: &str, agent_account: &str) -> Self {
        Self {
            reviewer,
            audience,
            account: format!("system:serviceaccount:{agent_namespace}:{agent_account}"),
            cache: Mutex::new(HashMap::new()),
            reviews: tokio::sync::Semaphore::new(MAX_REVIEWS),
        }
    }

    pub async fn node(&self, token: &str) -> Result<String, AuthError> {
        let cached = |cache: &ReviewCache| {
            cache.get(token).and_then(|(outcome, at)| {
                let valid_for = if outcome.is_ok() { CACHE_FOR } else { REFUSED_FOR };
                (at.elapsed() < valid_for).then(|| outcome.clone())
            })
        };
        if let Some(outcome) = cached(&self.cache.lock().expect("lock")) {
            return outcome;
        }
        let _permit = self.reviews.acquire().await.map_err(|_| AuthError::Review("shutting down".into()))?;
        // Another request may have reviewed the same token while this one waited.
        if let Some(outcome) = cached(&self.cache.lock().expect("lock")) {
            return outcome;
        }
        let outcome = match self.reviewer.review(token, &self.audience).await {
            Ok(status) => node_of(&status, &self.audience, &self.account),
            // The API server could not answer: not the token's fault, not cached.
            Err(error) => return Err(AuthError::Review(error)),
        };
        let mut cache = self.cache.lock().expect("lock");
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (outcome, at)| at.elapsed() < if outcome.is_ok() { CACHE_FOR } else { REFUSED_FOR });
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(token.to_owned(), (outcome.clone(), Instant::now()));
        outcome
    }
}
