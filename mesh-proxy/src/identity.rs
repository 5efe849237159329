//! Workload certificates of the pods enrolled on this node: requested from the
//! controller when the first pod with an identity is enrolled, renewed at half
//! life, kept when a renewal fails (until they expire), dropped when the last pod
//! with that identity leaves. Each is also kept in the state directory (0600), so
//! that an agent restarted while the controller is away keeps serving mTLS with the
//! certificates it had.
pub mod testing;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use tokio::task::AbortHandle;
use tracing::{error, info, warn};

use crate::control::ControlClient;

/// A workload certificate with its key. It serializes only to the state directory
/// (`SavedCert`, 0600): nothing else may print it.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct WorkloadCert {
    pub identity: String,
    /// Leaf first.
    pub chain_pem: Vec<String>,
    pub key_pem: String,
    pub root_pem: String,
    pub issued_at: i64,
    pub not_after: i64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct CertStatus {
    pub not_after: Option<i64>,
    /// The certificate in use was read from the state directory (issued to an
    /// earlier run of this agent), not yet renewed by this one.
    pub restored: bool,
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
    /// Where certificates are kept across restarts.
    dir: Option<PathBuf>,
}

/// A certificate as the state directory keeps it (with its key): `C` is the
/// certificate, borrowed to save and owned when read back.
#[derive(Serialize, serde::Deserialize)]
struct SavedCert<C> {
    format: u32,
    #[serde(flatten)]
    cert: C,
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

impl CertStore {
    /// A store that keeps certificates in `dir` (created, 0700) when given.
    pub fn new(client: Arc<ControlClient>, dir: Option<PathBuf>) -> Self {
        if let Some(dir) = &dir {
            use std::os::unix::fs::DirBuilderExt as _;
            if let Err(error) = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
                warn!(dir = %dir.display(), %error, "cannot create the certificate directory");
            }
        }
        Self { client, entries: Mutex::new(BTreeMap::new()), dir }
    }

    /// The file of `identity`'s certificate (its name is the identity with every
    /// character that is not alphanumeric, `.` or `-` escaped).
    fn file_of(&self, identity: &str) -> Option<PathBuf> {
        let mut name = String::new();
        for byte in identity.bytes() {
            if byte.is_ascii_alphanumeric() || byte == b'.' || byte == b'-' {
                name.push(byte as char);
            } else {
                let _ = write!(name, "_{byte:02x}");
            }
        }
        self.dir.as_ref().map(|d| d.join(format!("{name}.json")))
    }

    /// A saved certificate of `identity` that has not expired.
    fn load(&self, identity: &str) -> Option<Arc<WorkloadCert>> {
        let path = self.file_of(identity)?;
        let bytes = std::fs::read(&path).ok()?;
        let saved: SavedCert<WorkloadCert> = match serde_json::from_slice(&bytes) {
            Ok(saved) => saved,
            Err(error) => {
                warn!(file = %path.display(), %error, "ignoring an unreadable saved certificate");
                return None;
            }
        };
        let c = saved.cert;
        if saved.format != crate::state::FORMAT || c.identity != identity || c.not_after <= now() {
            return None;
        }
        Some(Arc::new(c))
    }

    fn save(&self, cert: &WorkloadCert) {
        let Some(path) = self.file_of(&cert.identity) else { return };
        let saved = SavedCert { format: crate::state::FORMAT, cert };
        let bytes = serde_json::to_vec(&saved).expect("a certificate serializes");
        if let Err(error) = crate::state::write_atomic(&path, &bytes, 0o600) {
            warn!(file = %path.display(), %error, "cannot save the certificate");
        }
    }

    /// A pod with `identity` was enrolled.
    pub fn acquire(self: &Arc<Self>, identity: &str) {
        let mut entries = self.entries.lock().expect("lock");
        let entry = entries.entry(identity.to_owned()).or_insert_with(|| {
            // A certificate an earlier run of this agent was issued, while it is valid.
            let cert = self.load(identity);
            let status = CertStatus {
                not_after: cert.as_ref().map(|c| c.not_after),
                restored: cert.is_some(),
                ..CertStatus::default()
            };
            if let Some(cert) = &cert {
                info!(identity, not_after = cert.not_after, "certificate restored from the state directory");
            }
            Entry { cert, status, pods: 0, task: None }
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
                if let Some(path) = self.file_of(identity) {
                    let _ = std::fs::remove_file(path);
                }
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
        // A restored certificate is renewed at its half life, as if this run had
        // requested it.
        let restored = self.get(&identity).filter(|_| self.status().get(&identity).is_some_and(|s| s.restored));
        if let Some(cert) = restored {
            let half_life = cert.issued_at + (cert.not_after - cert.issued_at) / 2;
            tokio::time::sleep(Duration::from_secs((half_life - now()).max(0) as u64)).await;
        }
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
                    // Off the runtime's threads: the write is flushed to disk.
                    let (store, saved) = (self.clone(), cert.clone());
                    let _ = tokio::task::spawn_blocking(move || store.save(&saved)).await;
                    self.update(&identity, |e| {
                        e.status.restored = false;
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
