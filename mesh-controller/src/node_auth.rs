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
//!
//! A waypoint authenticates the same way with its own pod's token. Its account is
//! accepted when it is the `ServiceAccount` of a declared waypoint: the token's pod is
//! labelled `gateway.networking.k8s.io/gateway-name: <gateway>`, in the account's
//! namespace, running with that account, where `<gateway>` is a `Gateway` of class
//! `istio-waypoint` in that namespace (a pod the watch has not seen yet is refused
//! until it has: the waypoint retries). Such a client gets the view of the node its pod
//! runs on (as the lab's waypoint, which connects with that node's credential) and a
//! certificate for its own identity only ([`Client::may_issue`]). The cache keeps the
//! API server's answer, not the decision: whether an account is a waypoint's follows
//! the configuration, which can change within the minute.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use futures_util::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client as KubeClient, api::PostParams};
use mesh_common::config::{
    Config,
    gateway::{GATEWAY_NAME_LABEL, WAYPOINT_CLASS},
};

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
    #[error(
        "the token belongs to {actual}, which is neither the agent's service account {agent} nor the service \
         account of a declared waypoint: its pod {namespace}/{pod} is not known as a pod labelled \
         {GATEWAY_NAME_LABEL} of a Gateway of class {WAYPOINT_CLASS} in namespace {namespace} running as \
         {service_account}"
    )]
    NotAWaypoint { agent: String, actual: String, namespace: String, service_account: String, pod: String },
}

/// Who a control client is, once authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Client {
    /// A node's agent: the view of its node, certificates for its node's pods.
    Agent { node: String },
    /// A waypoint: the view of the node it runs on, a certificate for its own identity.
    Waypoint(Waypoint),
}

/// A waypoint client: its Gateway, the account it runs as, the node it runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waypoint {
    pub namespace: String,
    /// The `Gateway`'s name.
    pub name: String,
    pub service_account: String,
    /// Whose view it gets.
    pub node: String,
}

impl Waypoint {
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`: the only identity it may obtain.
    pub fn identity(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{}/sa/{}", self.namespace, self.service_account)
    }
}

impl Client {
    /// The node whose view the client gets.
    pub fn node(&self) -> &str {
        match self {
            Self::Agent { node } | Self::Waypoint(Waypoint { node, .. }) => node,
        }
    }

    /// May this client obtain a certificate for `identity`? An agent: for the pods of
    /// its node ([`crate::view::may_issue`]). A waypoint: for its own identity only,
    /// never a pod's, even one on its node (and, like an agent, only where a pod with
    /// that identity runs on its node: in the lab the claim to be a waypoint is not
    /// authenticated, so it only ever narrows what the node credential allows).
    pub fn may_issue(&self, config: &Config, identity: &str) -> bool {
        match self {
            Self::Agent { node } => crate::view::may_issue(config, node, identity),
            Self::Waypoint(waypoint) => {
                identity == waypoint.identity(&config.trust_domain)
                    && crate::view::may_issue(config, &waypoint.node, identity)
            }
        }
    }

    /// A client authenticated by its node certificate (the lab): the node's agent, or a
    /// waypoint on that node when it says so with [`mesh_common::control::WAYPOINT_HEADER`].
    pub fn from_node(node: &str, waypoint_header: Option<&str>) -> Self {
        match waypoint_header.and_then(mesh_common::control::parse_waypoint_header) {
            Some((namespace, name, service_account)) => Self::Waypoint(Waypoint {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                service_account: service_account.to_owned(),
                node: node.to_owned(),
            }),
            None => Self::Agent { node: node.to_owned() },
        }
    }
}

/// What the API server says about a token: whose it is and where its pod runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reviewed {
    /// `system:serviceaccount:<namespace>:<name>`, or another user name.
    pub username: String,
    pub node: Option<String>,
    pub pod: Option<String>,
}

/// The account of a valid token for `audience`.
pub fn reviewed(status: &TokenReviewStatus, audience: &str) -> Result<Reviewed, AuthError> {
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
    let extra = user.and_then(|u| u.extra.as_ref());
    let first = |key: &str| extra.and_then(|e| e.get(key)).and_then(|v| v.first()).filter(|v| !v.is_empty()).cloned();
    Ok(Reviewed { username, node: first(NODE_NAME_EXTRA), pod: first(POD_NAME_EXTRA) })
}

/// Who a reviewed token speaks for: the agent of a node (the agents' account, bound to
/// a pod on a node) or a declared waypoint (see the module's documentation).
pub fn classify(reviewed: &Reviewed, agent_account: &str, config: &Config) -> Result<Client, AuthError> {
    if reviewed.username == agent_account {
        return match (&reviewed.node, &reviewed.pod) {
            (Some(node), Some(_pod)) => Ok(Client::Agent { node: node.clone() }),
            _ => Err(AuthError::NoNode(reviewed.username.clone())),
        };
    }
    let Some((namespace, service_account)) = reviewed
        .username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
    else {
        return Err(AuthError::WrongAccount { expected: agent_account.to_owned(), actual: reviewed.username.clone() });
    };
    let waypoint_gateway = |name: &str| {
        config.gateways.iter().any(|g| g.metadata.namespace == namespace && g.metadata.name == name && g.is_waypoint())
    };
    // The token must be bound to a pod (kubelet's projected tokens are), and that pod
    // must be one of a declared waypoint's, running with the account.
    let Some(pod_name) = reviewed.pod.as_deref() else {
        return Err(AuthError::NoNode(reviewed.username.clone()));
    };
    let found = config.pods.iter().find_map(|p| {
        let gateway = p.metadata.labels.get(GATEWAY_NAME_LABEL)?;
        (p.metadata.namespace == namespace
            && p.metadata.name == pod_name
            && p.spec.service_account() == service_account
            && !p.has_ended()
            && waypoint_gateway(gateway))
        .then_some((p, gateway))
    });
    let Some((pod, gateway)) = found else {
        return Err(AuthError::NotAWaypoint {
            agent: agent_account.to_owned(),
            actual: reviewed.username.clone(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            pod: pod_name.to_owned(),
        });
    };
    // The token's node (kubelet binds it); the pod's when the API server does not say.
    let Some(node) = reviewed.node.clone().or_else(|| pod.spec.node_name.clone()) else {
        return Err(AuthError::NoNode(reviewed.username.clone()));
    };
    Ok(Client::Waypoint(Waypoint {
        namespace: namespace.to_owned(),
        name: gateway.clone(),
        service_account: service_account.to_owned(),
        node,
    }))
}

/// Who a reviewed token speaks for, in one step (see [`reviewed`] and [`classify`]).
pub fn client_of(
    status: &TokenReviewStatus,
    audience: &str,
    agent_account: &str,
    config: &Config,
) -> Result<Client, AuthError> {
    classify(&reviewed(status, audience)?, agent_account, config)
}

/// Asks whether a token is valid: the Kubernetes API in production.
pub trait Reviewer: Send + Sync {
    fn review<'a>(&'a self, token: &'a str, audience: &'a str) -> BoxFuture<'a, Result<TokenReviewStatus, String>>;
}

impl Reviewer for KubeClient {
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

/// The node a reviewed token of the agents' `account` speaks for.
pub fn node_of(status: &TokenReviewStatus, audience: &str, account: &str) -> Result<String, AuthError> {
    let reviewed = reviewed(status, audience)?;
    if reviewed.username != account {
        return Err(AuthError::WrongAccount { expected: account.to_owned(), actual: reviewed.username });
    }
    match (reviewed.node, reviewed.pod) {
        (Some(node), Some(_pod)) => Ok(node),
        _ => Err(AuthError::NoNode(reviewed.username)),
    }
}

/// Token -> outcome of its review, and when it was reviewed.
type ReviewCache = HashMap<String, (Result<Reviewed, AuthError>, Instant)>;

/// Token -> client, with the cache.
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

    /// Who `token` speaks for under `config` (the running one: it declares the waypoints).
    pub async fn client(&self, token: &str, config: &Config) -> Result<Client, AuthError> {
        classify(&self.review(token).await?, &self.account, config)
    }

    /// The API server's answer about `token`, from the cache when fresh.
    async fn review(&self, token: &str) -> Result<Reviewed, AuthError> {
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
            Ok(status) => reviewed(&status, &self.audience),
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
