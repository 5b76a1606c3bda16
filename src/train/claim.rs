//! Which process may write a run, and over what. [`RunClaim::take`] locks the run for this
//! process ([`RunLock`]) and refuses to start a run afresh where an earlier run of the same name
//! left checkpoints or logs: the fresh start would empty its `metrics.jsonl`, prune its
//! checkpoints by `keep_last` and leave its TensorBoard events to mix with the new ones. A resume
//! continues that run instead; an overwrite replaces it, deleting it only once training is about
//! to start (so that a recipe or data error found before then leaves it as it was).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::checkpoint::lock::LOCK_FILE;
use crate::checkpoint::{RunLock, LATEST};
use crate::recipe::Recipe;
use crate::track::RunInfo;

/// How a run starts over what its directories hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// A new run: refused over an earlier run's checkpoints or logs.
    Fresh,
    /// Continues the run from one of its checkpoints (`--resume`).
    Resume,
    /// A new run that replaces an earlier one of the same name (`--overwrite`).
    Overwrite,
}

impl Start {
    pub fn new(resume: bool, overwrite: bool) -> Result<Self> {
        Ok(match (resume, overwrite) {
            (true, true) => bail!(
                "resume and overwrite exclude each other: a resume continues the earlier run, an \
                 overwrite deletes it"
            ),
            (true, false) => Self::Resume,
            (false, true) => Self::Overwrite,
            (false, false) => Self::Fresh,
        })
    }
}

/// This process's right to write a run: its lock, and what an overwrite replaces.
#[derive(Debug)]
pub struct RunClaim {
    lock: RunLock,
    /// `<tracking.log_dir>/<name>`.
    log_dir: PathBuf,
    /// The earlier run an overwrite replaces, described.
    replaces: Option<String>,
}

impl RunClaim {
    /// Locks the run named by `recipe` and checks that `start` may begin over what its checkpoint
    /// and log directories hold.
    pub fn take(recipe: &Recipe, start: Start) -> Result<Self> {
        let lock = RunLock::acquire(&recipe.checkpoint.dir.join(&recipe.name))?;
        let log_dir = recipe.tracking.log_dir.join(&recipe.name);
        let earlier = match start {
            Start::Resume => None,
            Start::Fresh | Start::Overwrite => earlier_run(lock.dir(), &log_dir)?,
        };
        if let (Start::Fresh, Some(found)) = (start, &earlier) {
            let name = &recipe.name;
            bail!(
                "run `{name}` was trained before: {found}. A fresh start would overwrite that \
                 work. Continue it with `--resume latest`, train under a new `name` (e.g. `--set \
                 name={name}-2`), or pass `--overwrite` to delete it and start over"
            );
        }
        Ok(Self {
            lock,
            log_dir,
            replaces: earlier,
        })
    }

    /// The run's checkpoint directory, locked.
    pub fn lock(&self) -> &RunLock {
        &self.lock
    }

    /// Deletes the earlier run an overwrite replaces: everything in the run's checkpoint and log
    /// directories except the lock file. Returns what it was, for the caller to report; `None`
    /// when there was nothing to replace.
    pub fn replace_earlier_run(&self) -> Result<Option<String>> {
        let Some(replaced) = &self.replaces else {
            return Ok(None);
        };
        for dir in [self.lock.dir(), &self.log_dir] {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries {
                let entry = entry.with_context(|| format!("{}: cannot read", dir.display()))?;
                if entry.file_name() == LOCK_FILE {
                    continue;
                }
                let path = entry.path();
                let removed = match entry.file_type()?.is_dir() {
                    true => std::fs::remove_dir_all(&path),
                    false => std::fs::remove_file(&path),
                };
                removed.with_context(|| {
                    format!("{}: cannot delete it to overwrite the run", path.display())
                })?;
            }
        }
        Ok(Some(replaced.clone()))
    }
}

/// What an earlier run left in the run's directories, as a sentence part naming each directory;
/// `None` when they hold nothing of a run.
fn earlier_run(checkpoint_dir: &Path, log_dir: &Path) -> Result<Option<String>> {
    let found: Vec<String> = [
        (checkpoint_dir, checkpoints_in(checkpoint_dir)?),
        (log_dir, logs_in(log_dir)?),
    ]
    .into_iter()
    .filter(|(_, what)| !what.is_empty())
    .map(|(dir, what)| format!("{} holds {}", dir.display(), what.join(", ")))
    .collect();
    Ok((!found.is_empty()).then(|| found.join("; ")))
}

/// The checkpoints and the `latest` pointer in a run's checkpoint directory.
fn checkpoints_in(dir: &Path) -> Result<Vec<String>> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read", dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    steps.sort_unstable();
    let mut found = Vec::new();
    let names: Vec<String> = steps.iter().map(|step| format!("step-{step}")).collect();
    match names.as_slice() {
        [] => {}
        [one] => found.push(format!("1 checkpoint ({one})")),
        [first, .., last] if names.len() > 4 => {
            found.push(format!("{} checkpoints ({first} … {last})", names.len()))
        }
        _ => found.push(format!(
            "{} checkpoints ({})",
            names.len(),
            names.join(", ")
        )),
    }
    if let Ok(pointer) = std::fs::read_to_string(dir.join(LATEST)) {
        found.push(format!("`{LATEST}` naming {}", pointer.trim()));
    }
    Ok(found)
}

/// The records of a run in its log directory: metrics, TensorBoard events and `run.json`.
fn logs_in(dir: &Path) -> Result<Vec<String>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let event_files = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .count();
    let mut found = Vec::new();
    let metrics = dir.join("metrics.jsonl");
    if metrics.is_file() {
        let text = std::fs::read_to_string(&metrics)
            .with_context(|| format!("{}: cannot read", metrics.display()))?;
        match text.lines().filter(|l| !l.trim().is_empty()).count() {
            0 => {}
            1 => found.push("metrics.jsonl (1 line)".to_string()),
            n => found.push(format!("metrics.jsonl ({n} lines)")),
        }
    }
    match event_files {
        0 => {}
        1 => found.push("1 TensorBoard event file".to_string()),
        n => found.push(format!("{n} TensorBoard event files")),
    }
    let info_path = dir.join("run.json");
    if info_path.is_file() {
        let info = std::fs::read(&info_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<RunInfo>(&bytes).ok());
        found.push(match info {
            Some(info) => {
                let status = serde_json::to_value(info.status)?;
                format!(
                    "run.json ({}, {} of {} steps)",
                    status.as_str().unwrap_or("unknown status"),
                    info.steps_done,
                    info.total_steps
                )
            }
            None => "run.json".to_string(),
        });
    }
    Ok(found)
}
