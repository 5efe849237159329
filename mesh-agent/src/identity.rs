//! Workload certificates of the pods enrolled on this node: requested from the
//! controller when the first pod with an identity is enrolled, renewed at half
//! life, kept when a renewal fails (until they expire), dropped when the last pod
//! with that identity leaves.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::task::AbortHandle;
use tracing::{error, info, warn};

use crate::control::ControlClient;

#[derive(Debug, Serialize)]
pub struct WorkloadCert {
    pub identity: String,
    /// Leaf first.
    pub chain_pem: Vec<String>,
    #[serde(skip)]
    #[allow(dead_code, reason = "the HBONE tunnel serves and connects with it (secure data plane)")]
    pub key_pem: String,
    pub root_pem: String,
    pub issued_at: i64,
    pub not_after: i64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct CertStatus {
    pub not_after: Option<i64>,
    pub renewals: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

struct Entry {
    cert: Option<Arc<WorkloadCert>>,
    status: CertStatus,
    pods: usize,
    task: Option<AbortHandle>,
}

pub struct CertStore {
    client: Arc<ControlClient>,
    entries: Mutex<BTreeMap<String, Entry>>,
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl CertStore {
    pub fn new(client: Arc<ControlClient>) -> Self {
        Self { client, entries: Mutex::new(BTreeMap::new()) }
    }

    /// A pod with `identity` was enrolled.
    pub fn acquire(self: &Arc<Self>, identity: &str) {
        let mut entries = self.entries.lock().expect("lock");
        let entry = entries.entry(identity.to_owned()).or_insert_with(|| Entry {
            cert: None,
            status: CertStatus::default(),
            pods: 0,
            task: None,
        });
        entry.pods += 1;
        if entry.task.is_none() {
            let store = self.clone();
            let id = identity.to_owned();
            entry.task = Some(tokio::spawn(async move { store.maintain(id).await }).abort_handle());
        }
    }

    /// A pod with `identity` went away.
    pub fn release(&self, identity: &str) {
        let mut entries = self.entries.lock().expect("lock");
        if let Some(entry) = entries.get_mut(identity) {
            entry.pods = entry.pods.saturating_sub(1);
            if entry.pods == 0 {
                if let Some(task) = entry.task.take() {
                    task.abort();
                }
                entries.remove(identity);
                info!(identity, "certificate dropped: no pod uses it any more");
            }
        }
    }

    pub fn get(&self, identity: &str) -> Option<Arc<WorkloadCert>> {
        self.entries.lock().expect("lock").get(identity).and_then(|e| e.cert.clone())
    }

    pub fn status(&self) -> BTreeMap<String, CertStatus> {
        self.entries.lock().expect("lock").iter().map(|(k, e)| (k.clone(), e.status.clone())).collect()
    }

    fn update(&self, identity: &str, f: impl FnOnce(&mut Entry)) {
        if let Some(entry) = self.entries.lock().expect("lock").get_mut(identity) {
            f(entry);
        }
    }

    async fn maintain(self: Arc<Self>, identity: String) {
        let mut retry = Duration::from_millis(500);
        loop {
            match self.client.certificate(&identity).await {
                Ok((issued, key_pem)) => {
                    let issued_at = now();
                    let cert = Arc::new(WorkloadCert {
                        identity: identity.clone(),
                        chain_pem: issued.chain_pem,
                        key_pem,
                        root_pem: issued.root_pem,
                        issued_at,
                        not_after: issued.not_after,
                    });
                    let renew_in = Duration::from_secs(((issued.not_after - issued_at).max(2) / 2) as u64);
                    info!(identity, not_after = issued.not_after, ?renew_in, "certificate installed");
                    self.update(&identity, |e| {
                        e.cert = Some(cert);
                        e.status.not_after = Some(issued.not_after);
                        e.status.renewals += 1;
                        e.status.last_error = None;
                    });
                    retry = Duration::from_millis(500);
                    tokio::time::sleep(renew_in).await;
                }
                Err(failure) => {
                    let mut expired = false;
                    self.update(&identity, |e| {
                        e.status.failures += 1;
                        e.status.last_error = Some(failure.to_string());
                        if e.cert.as_ref().is_some_and(|c| c.not_after <= now()) {
                            e.cert = None;
                            e.status.not_after = None;
                            expired = true;
                        }
                    });
                    if expired {
                        error!(identity, error = %failure, "certificate expired and could not be renewed");
                    } else {
                        warn!(identity, error = %failure, retry_in = ?retry, "certificate request failed; keeping the current certificate");
                    }
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}
