//! Leader election among controller replicas with a `coordination.k8s.io/v1` Lease.
//!
//! Every replica serves agents; only the leader writes to the API (validation Events
//! and status conditions), so two replicas never fight over an object's status. The
//! Lease is created by the install (RBAC allows `get` and `update` of that one object,
//! nothing else); a replica takes it when it is free or expired, and keeps it by
//! renewing it every [`RENEW_EVERY`]. Optimistic concurrency (`resourceVersion`) makes
//! a takeover race safe: the loser's update fails with a conflict. A replica that
//! stops (SIGTERM) gives the Lease up, as client-go's `ReleaseOnCancel` does, so that
//! another takes over at its next try (followers try every [`RETRY_EVERY`]) instead
//! of when the lease runs out.
use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{Api, Client, api::PostParams};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

/// How long a lease holds without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How often a follower tries to take the Lease (client-go's default retry period), so
/// that a Lease given up is taken within that; and how soon a failed renewal is tried
/// again.
pub const RETRY_EVERY: Duration = Duration::from_secs(2);
/// How long a stopping replica tries to give the Lease up: a step under way ends
/// first (at most [`RENEW_EVERY`]), then the release.
pub const RELEASE_WITHIN: Duration = Duration::from_secs(8);
/// How long one request of the release may take.
const RELEASE_REQUEST: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// We hold it: renew.
    Renew,
    /// Free or expired: take it.
    Acquire,
    /// Someone else holds it, valid until the given time.
    Follow { holder: String },
}

/// What a replica called `me` does with the Lease as it is at `now`.
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else { return Decision::Acquire };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_DURATION.as_secs() as i32));
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).map(|t| t.0);
    match renewed {
        Some(renewed) if renewed.saturating_add(SignedDuration::from_secs(seconds)).is_ok_and(|end| end > now) => {
            Decision::Follow { holder: holder.to_owned() }
        }
        _ => Decision::Acquire,
    }
}

/// The Lease after `decision` by `me` at `now` (for [`Decision::Renew`] and
/// [`Decision::Acquire`]).
pub fn updated(mut lease: Lease, me: &str, now: Timestamp, decision: &Decision) -> Lease {
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if *decision == Decision::Acquire {
        // Every change of holder counts, from a released (empty) holder too, as
        // client-go counts `leaderTransitions`.
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        spec.holder_identity = Some(me.to_owned());
        spec.acquire_time = Some(MicroTime(now));
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
    lease
}

/// The Lease as a replica that gives it up at `now` leaves it: free (no holder, as
/// client-go leaves it), its duration one second for electors that look at the time
/// only. `None` when `me` does not hold it.
pub fn released(mut lease: Lease, me: &str, now: Timestamp) -> Option<Lease> {
    let spec = lease.spec.as_mut()?;
    if spec.holder_identity.as_deref() != Some(me) {
        return None;
    }
    spec.holder_identity = Some(String::new());
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(now));
    Some(lease)
}

/// A replica's part in the election, running until [`Election::step_down`].
pub struct Election {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// What writes as leader, stopped before the Lease goes.
    writer: Option<JoinHandle<()>>,
}

impl Election {
    /// Starts trying to lead; `leader` tells whether this replica leads.
    pub fn start(client: Client, namespace: String, name: String, me: String, leader: watch::Sender<bool>) -> Self {
        let (stop, stopped) = watch::channel(false);
        Self { stop, task: tokio::spawn(run(client, namespace, name, me, leader, stopped)), writer: None }
    }

    /// `writer` writes while this replica leads (status, Events): it is stopped
    /// before the Lease is given up, so that no write of a round it had begun lands
    /// after another replica took over (whose own writes it would undo).
    #[must_use]
    pub fn with_writer(mut self, writer: JoinHandle<()>) -> Self {
        self.writer = Some(writer);
        self
    }

    /// Stops trying and gives the Lease up if this replica holds it (within
    /// [`RELEASE_WITHIN`]; past that it expires on its own).
    pub async fn step_down(self) {
        if let Some(writer) = self.writer {
            writer.abort();
            let _ = writer.await;
        }
        self.stop.send_replace(true);
        if tokio::time::timeout(RELEASE_WITHIN, self.task).await.is_err() {
            warn!("the Lease was not given up in time: it expires on its own");
        }
    }
}

/// Keeps trying to lead until `stop`, then gives the Lease up if held.
async fn run(
    client: Client,
    namespace: String,
    name: String,
    me: String,
    leader: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let mut last_renewal: Option<std::time::Instant> = None;
    let mut announced = false;
    loop {
        // A hung request must not keep this replica acting as leader past the lease.
        // A stop does not cut a step short: an acquisition already sent could land
        // after the release and hold the Lease for a replica that is gone.
        let outcome = within(RENEW_EVERY, step(&api, &name, &me)).await;
        // Only a leader that just renewed waits the renewal period; a follower, and a
        // leader whose renewal failed, try again sooner.
        let pause = if matches!(outcome, Ok(true)) { RENEW_EVERY } else { RETRY_EVERY };
        let leading = match outcome {
            Ok(true) => {
                last_renewal = Some(std::time::Instant::now());
                true
            }
            Ok(false) => false,
            Err(error) => {
                warn!(lease = %format!("{namespace}/{name}"), %error, "cannot read or renew the Lease");
                // Without a successful renewal, another replica may take over once the
                // lease expires: stop acting as leader before that.
                last_renewal.is_some_and(|t| t.elapsed() < LEASE_DURATION.saturating_sub(RENEW_EVERY))
            }
        };
        if !leading {
            last_renewal = None;
        }
        if *leader.borrow() != leading || !announced {
            announced = true;
            if leading {
                info!(identity = %me, "leading: this replica writes status and events");
            } else {
                info!(identity = %me, "following: another replica writes status and events");
            }
            leader.send_replace(leading);
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|stop| *stop) => break,
        }
    }
    // Stopping: no more writes as leader, then the Lease back. A renewal still in
    // flight may land between our read and our write: the conflict makes us read again.
    leader.send_replace(false);
    let lease = format!("{namespace}/{name}");
    for _ in 0..3 {
        match within(RELEASE_REQUEST, release(&api, &name, &me)).await {
            Ok(true) => {
                info!(identity = %me, "the Lease is given up: another replica may lead now");
                return;
            }
            Ok(false) => return,
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => {
                warn!(%lease, %error, "cannot give the Lease up: it expires on its own");
                return;
            }
        }
    }
    warn!(%lease, "cannot give the Lease up (conflicts): it expires on its own");
}

/// `request`, or an error once `limit` has passed: a hung API call must hold neither
/// the election nor a stopping replica.
async fn within<T>(limit: Duration, request: impl Future<Output = Result<T, kube::Error>>) -> Result<T, kube::Error> {
    tokio::time::timeout(limit, request).await.unwrap_or_else(|_| {
        Err(kube::Error::Service(format!("the Lease request took over {} s", limit.as_secs()).into()))
    })
}

/// Gives the Lease up if `me` holds it; whether it did.
async fn release(api: &Api<Lease>, name: &str, me: &str) -> Result<bool, kube::Error> {
    let Some(lease) = released(api.get(name).await?, me, Timestamp::now()) else { return Ok(false) };
    let params = PostParams { field_manager: Some("mesh-controller".into()), ..PostParams::default() };
    api.replace(name, &params, &lease).await.map(|_| true)
}

async fn step(api: &Api<Lease>, name: &str, me: &str) -> Result<bool, kube::Error> {
    let lease = api.get(name).await?;
    let now = Timestamp::now();
    let decision = decide(lease.spec.as_ref(), me, now);
    if let Decision::Follow { .. } = decision {
        return Ok(false);
    }
    let params = PostParams { field_manager: Some("mesh-controller".into()), ..PostParams::default() };
    match api.replace(name, &params, &updated(lease, me, now, &decision)).await {
        Ok(_) => Ok(true),
        // Another replica updated it first.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(renewed.parse().unwrap())),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_valid_lease_of_another_replica_is_followed_an_expired_one_taken() {
        let now: Timestamp = "2026-11-20T10:15:10Z".parse().unwrap();
        let held = spec("b", "2026-11-20T10:15:03Z");
        assert_eq!(decide(Some(&held), "a", now), Decision::Follow { holder: "b".into() });
        assert_eq!(decide(Some(&held), "b", now), Decision::Renew);
        let expired = spec("b", "2026-11-20T10:14:50Z");
        assert_eq!(decide(Some(&expired), "a", now), Decision::Acquire);
        assert_eq!(decide(Some(&LeaseSpec::default()), "a", now), Decision::Acquire);
        assert_eq!(decide(None, "a", now), Decision::Acquire);
        let taken = updated(Lease { spec: Some(expired), ..Lease::default() }, "a", now, &Decision::Acquire);
        let spec = taken.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_transitions, Some(1));
        assert_eq!(spec.renew_time.unwrap().0, now);
    }

    #[test]
    fn a_released_lease_is_free_and_only_its_holder_releases_it() {
        let now: Timestamp = "2026-11-20T10:15:10Z".parse().unwrap();
        let held = Lease { spec: Some(spec("a", "2026-11-20T10:15:08Z")), ..Lease::default() };
        assert!(released(held.clone(), "b", now).is_none(), "not b's to give up");
        assert!(released(Lease::default(), "a", now).is_none());
        let free = released(held, "a", now).unwrap().spec.unwrap();
        assert_eq!(free.holder_identity.as_deref(), Some(""));
        assert_eq!(free.lease_duration_seconds, Some(1));
        // Another replica takes it at its next try, and that is a transition.
        assert_eq!(decide(Some(&free), "b", now), Decision::Acquire);
        let taken = updated(Lease { spec: Some(free), ..Lease::default() }, "b", now, &Decision::Acquire);
        assert_eq!(taken.spec.unwrap().lease_transitions, Some(1));
    }
}
