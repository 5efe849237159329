//! The agent's state directory: the lock that makes one agent the owner of a node's
//! kernel state, and atomic writes of what a restart needs (the enrolled pods, the
//! last applied view, the workload certificates).
use std::{
    fs::File,
    io::{self, Write as _},
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

/// Version of the files written here; a file of another version is not read.
pub const FORMAT: u32 = 1;

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Writes `bytes` to `path` so that a reader sees the old file or the new one, never
/// a part: a temporary file beside it, flushed to disk, then renamed over it. `mode`
/// applies to the new file (0600 for anything holding keys).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open {path} to lock it")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is locked by another running agent (pid {holder})")]
    Held { path: PathBuf, holder: String },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An exclusive `flock` on a directory, held for as long as the value lives. The
/// kernel releases it when the process dies, however it dies, so a lock is never
/// left stale: "state of an earlier run" is exactly what no live agent holds.
#[derive(Debug)]
pub struct DirLock {
    file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the lock on `dir` (created if missing) without waiting.
    pub fn try_lock(dir: &Path) -> Result<Self, LockError> {
        std::fs::create_dir_all(dir).map_err(|source| LockError::Open { path: dir.to_owned(), source })?;
        let file = File::open(dir).map_err(|source| LockError::Open { path: dir.to_owned(), source })?;
        match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => Ok(Self { file, path: dir.to_owned() }),
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                let holder = std::fs::read_to_string(dir.join(PID_FILE))
                    .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
                Err(LockError::Held { path: dir.to_owned(), holder })
            }
            Err(source) => Err(LockError::Lock { path: dir.to_owned(), source }),
        }
    }

    /// Takes the lock, waiting up to `timeout` for the holder to let it go.
    pub async fn lock_within(dir: &Path, timeout: std::time::Duration) -> Result<Self, LockError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match Self::try_lock(dir) {
                Err(LockError::Held { .. }) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// Records this process as the holder (for the error a second agent prints).
    pub fn record_holder(&self) {
        let _ = std::fs::write(self.path.join(PID_FILE), format!("{}\n", std::process::id()));
    }
}

impl LockError {
    /// The directory the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Open { path, .. } | Self::Held { path, .. } | Self::Lock { path, .. } => path,
        }
    }
}

/// Where a lock holder writes its pid. Only in the state directory: bpffs takes no
/// regular files.
const PID_FILE: &str = "agent.pid";

#[allow(unsafe_code)]
fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock takes a valid open descriptor (borrowed for the call) and flags.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = flock(&self.file, libc::LOCK_UN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_until_the_first_is_dropped() {
        let dir = std::env::temp_dir().join(format!("mesh-lock-test-{}", std::process::id()));
        let first = DirLock::try_lock(&dir).expect("first lock");
        first.record_holder();
        let error = DirLock::try_lock(&dir).expect_err("second lock");
        assert!(error.to_string().contains(&format!("pid {}", std::process::id())), "{error}");
        drop(first);
        DirLock::try_lock(&dir).expect("lock after release");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn atomic_write_replaces_the_file_with_the_mode_asked_for() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("mesh-write-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secret.json");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
