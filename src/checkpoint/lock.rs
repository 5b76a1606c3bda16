//! One writer per run: an OS file lock on `<checkpoint.dir>/<name>/.lock`, held by the training
//! process for as long as it writes the run. Without it a second process on the same run name
//! would remove the first one's half-written `.tmp-step-N` (as [`super::recover`] does for a
//! crashed writer) and prune its checkpoints.
//!
//! The lock file also says who holds it (pid, host, since when), for the refusal message. The
//! OS drops the lock when its process ends, however it ends; a holder that ends normally also
//! removes the file, so a file naming another process of this host is what a killed or crashed
//! run left: it is taken over (with a warning). One naming another host is not: whether file
//! locks reach across machines depends on the file system, so that process may still be running.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::track::{host_name, unix_now};

/// The lock file inside a run's checkpoint directory.
pub const LOCK_FILE: &str = ".lock";

/// What the lock file says about its holder.
#[derive(Debug, Serialize, Deserialize)]
struct Holder {
    pid: u32,
    host: String,
    /// Unix seconds.
    since: f64,
}

impl Holder {
    fn describe(&self) -> String {
        format!(
            "pid {} on host {}, since {}",
            self.pid,
            self.host,
            self.since_text()
        )
    }

    fn since_text(&self) -> String {
        let since = UNIX_EPOCH + Duration::from_secs_f64(self.since.max(0.0));
        humantime::format_rfc3339_seconds(since).to_string()
    }
}

/// This process's hold on a run's checkpoint directory; released (and the lock file removed)
/// when dropped. Checkpoints are only written, recovered and pruned through one.
#[derive(Debug)]
pub struct RunLock {
    dir: PathBuf,
    path: PathBuf,
    file: File,
}

impl RunLock {
    /// Takes `run_dir` (created if missing) for this process, or says which process has it; then
    /// finishes what a crashed writer left half done there ([`super::recover`]).
    pub fn acquire(run_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("{}: cannot create", run_dir.display()))?;
        let path = run_dir.join(LOCK_FILE);
        let mut file = loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("{}: cannot open the run's lock file", path.display()))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let holder = match read_holder(&mut file) {
                        Some(Ok(holder)) => holder.describe(),
                        _ => "a process that has not yet written its pid".to_string(),
                    };
                    bail!(
                        "{}: this run is being trained by another process ({holder}; lock file \
                         {}). Two processes writing one run delete each other's checkpoints: \
                         wait for it to finish or stop it, or train under another `name`",
                        run_dir.display(),
                        path.display()
                    );
                }
                Err(TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("{}: cannot lock", path.display()))
                }
            }
            // A holder that ended between our open and our lock removed the file we opened: a
            // lock on it guards nothing, so lock the file that has the name now.
            if names_this_file(&path, &file)? {
                break file;
            }
        };
        match read_holder(&mut file) {
            None => {}
            Some(Ok(earlier)) if earlier.host != host_name() => bail!(
                "{}: the lock file {} says this run is being trained by another process ({}), \
                 and from this host ({}) it cannot be told whether that process still runs. If \
                 it has ended, delete {} and start again",
                run_dir.display(),
                path.display(),
                earlier.describe(),
                host_name(),
                path.display()
            ),
            Some(Ok(earlier)) => tracing::warn!(
                "{}: taking over the lock of pid {} on this host (held since {}), which ended \
                 without releasing it (killed or crashed)",
                run_dir.display(),
                earlier.pid,
                earlier.since_text()
            ),
            Some(Err(e)) => tracing::warn!(
                "{}: taking over an unreadable lock file ({e}); no process holds it",
                path.display()
            ),
        }
        let holder = Holder {
            pid: std::process::id(),
            host: host_name(),
            since: unix_now(),
        };
        let holder = serde_json::to_string(&holder)?;
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(holder.as_bytes()))
            .with_context(|| format!("{}: cannot write", path.display()))?;
        let lock = Self {
            dir: run_dir.to_path_buf(),
            path,
            file,
        };
        super::recover(&lock)?;
        Ok(lock)
    }

    /// The run's checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Removed while still locked, so that no one takes over a lock file this process left;
        // closing the file then releases the lock.
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("{}: cannot remove: {e}", self.path.display());
        }
        let _ = self.file.unlock();
    }
}

/// The holder the lock file names: `None` when it is empty (a new file).
fn read_holder(file: &mut File) -> Option<std::result::Result<Holder, String>> {
    let mut text = String::new();
    if let Err(e) = file
        .seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_string(&mut text))
    {
        return Some(Err(e.to_string()));
    }
    if text.trim().is_empty() {
        return None;
    }
    Some(serde_json::from_str(&text).map_err(|e| e.to_string()))
}

/// Whether `path` still names the open `file` (not removed, nor replaced by another file).
fn names_this_file(path: &Path, file: &File) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let opened = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(named) => Ok(named.dev() == opened.dev() && named.ino() == opened.ino()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_run_is_refused_naming_its_holder_and_its_writes_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let held = RunLock::acquire(&run).unwrap();
        // The holder's checkpoint in progress: what recovery removes for a crashed writer.
        std::fs::create_dir(run.join(".tmp-step-3")).unwrap();
        let err = format!("{:#}", RunLock::acquire(&run).unwrap_err());
        let holder = format!("pid {} on host {}", std::process::id(), host_name());
        assert!(
            err.contains("this run is being trained by another process") && err.contains(&holder),
            "{err}"
        );
        assert!(run.join(".tmp-step-3").is_dir());

        drop(held);
        assert!(
            !run.join(LOCK_FILE).exists(),
            "released locks leave no file"
        );
        let _again = RunLock::acquire(&run).unwrap();
        assert!(
            !run.join(".tmp-step-3").exists(),
            "the next holder recovers what the last one left"
        );
    }
}
