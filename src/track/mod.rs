//! Experiment tracking: TensorBoard events, `metrics.jsonl`, run metadata and the progress display.
//!
//! A run directory `<tracking.log_dir>/<run>/` holds:
//! - `events.out.tfevents.*`: TensorBoard scalars (`train/*`, `eval/*`) and the resolved recipe
//!   as a text summary (`recipe`) at step 0; a resumed run adds a new event file.
//! - `metrics.jsonl`: every scalar again, one `{"step": N, "tag": "train/loss", "value": x}`
//!   object a line, flushed at the end of each step. A resumed run first truncates it back to
//!   the checkpoint's step, so the file reads as if the run had never stopped.
//! - `recipe.yaml` (resolved) and `run.json`: Kiln version, git commit, hardware, and how the run
//!   stands (status, a heartbeat, steps done, wall time, the MLflow run) for `kiln runs`.
//! - TensorBoard HParams summaries ([`hparams`]) so its HParams tab compares runs in one table.
//!
//! With `tracking.mlflow` (or `MLFLOW_TRACKING_URI`) the run is mirrored to an MLflow server
//! ([`mlflow`]): params, metrics, artifacts and the final status.

pub mod hparams;
pub mod mlflow;
pub mod plot;
pub mod runs;
pub mod tensorboard;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::recipe::Recipe;
pub use mlflow::{EndStatus, MlflowRun, RunRef};
pub use tensorboard::EventWriter;

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRecord {
    pub step: u64,
    pub tag: String,
    pub value: f64,
}

pub struct Tracker {
    run_dir: PathBuf,
    events: EventWriter,
    metrics: BufWriter<File>,
    /// `run.json` as last written.
    info: RunInfo,
    /// Wall time of the run's earlier sessions (before a resume).
    wall_before: f64,
    session_started: Instant,
    last_heartbeat: Instant,
    mlflow: Option<MlflowRun>,
    finished: bool,
    /// What opening the run has to tell the user (MLflow's address, or why it is not used),
    /// until [`Tracker::take_notes`].
    notes: Vec<String>,
}

/// What [`Tracker::open`] needs to know about the run.
pub struct TrackerStart<'a> {
    pub recipe: &'a Recipe,
    /// "cpu", "cuda:0", ...
    pub device: &'a str,
    pub total_steps: u64,
    /// The checkpoint a resumed run continues: its step, and the MLflow run it logged to.
    pub resumed: Option<(u64, Option<RunRef>)>,
    /// The run's memory estimate, term by term (bytes), recorded beside the measured peak.
    pub memory_estimate: BTreeMap<String, u64>,
}

/// How a run stands, as `run.json` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    #[default]
    Running,
    Finished,
    Failed,
    /// Stopped on request (Ctrl-C, SIGTERM) after a checkpoint: `--resume latest` continues it.
    Stopped,
}

/// `run.json` is rewritten at most this often while training (and at every status change).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);

impl Tracker {
    /// Opens (creating) the run directory and, when the recipe or environment asks for it, the
    /// MLflow run. A resumed run drops the interrupted run's metrics after the checkpoint's step
    /// and continues its MLflow run.
    pub fn open(run_dir: &Path, start: TrackerStart<'_>) -> Result<Self> {
        let recipe = start.recipe;
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("{}: cannot create the run directory", run_dir.display()))?;
        let recipe_yaml = serde_norway::to_string(recipe)?;
        crate::atomic_file::write(&run_dir.join("recipe.yaml"), recipe_yaml.as_bytes())?;
        let resumed_from = start.resumed.as_ref().map(|(step, _)| *step);
        let info_path = run_dir.join("run.json");
        // A resumed run is the same run: it keeps its start time and adds to its wall time.
        let earlier = match resumed_from {
            Some(_) => std::fs::read(&info_path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<RunInfo>(&bytes).ok()),
            None => None,
        };
        let mut info = RunInfo::collect(start.device);
        info.name = recipe.name.clone();
        info.recipe_sha256 = hex::encode(Sha256::digest(recipe_yaml.as_bytes()));
        info.started_at = earlier.as_ref().map_or_else(unix_now, |e| e.started_at);
        info.sessions = earlier.as_ref().map_or(1, |e| e.sessions + 1);
        info.steps_done = resumed_from.unwrap_or(0);
        info.total_steps = start.total_steps;
        info.memory = Some(MemoryRecord {
            estimate: start.memory_estimate.clone(),
            peak_rss_bytes: peak_rss_bytes(),
        });
        let wall_before = earlier.as_ref().map_or(0.0, |e| e.wall_seconds);

        let metrics_path = run_dir.join("metrics.jsonl");
        match resumed_from {
            Some(step) => truncate_metrics(&metrics_path, step)?,
            None => crate::atomic_file::write(&metrics_path, b"")?,
        }
        let metrics = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&metrics_path)
            .with_context(|| format!("{}: cannot open", metrics_path.display()))?;
        let mut events = EventWriter::create(run_dir)?;
        match resumed_from {
            Some(step) => events.session_start(step + 1)?,
            None => {
                // TensorBoard's server takes a run's first restart marker as its start; without
                // one here, a resume's marker would not drop the interrupted session's tail.
                events.session_start(0)?;
                events.text("recipe", 0, &format!("```yaml\n{recipe_yaml}```"))?;
                hparams::write_start(&mut events, recipe, info.started_at)?;
            }
        }
        events.flush()?;

        let resume_mlflow = start.resumed.as_ref().and_then(|(_, r)| r.as_ref());
        // An older checkpoint without the MLflow run still has it in run.json.
        let resume_mlflow = resume_mlflow.or(earlier.as_ref().and_then(|e| e.mlflow.as_ref()));
        let mut notes = Vec::new();
        let mlflow = start_mlflow(recipe, &info, resume_mlflow, &mut notes);
        if let Some(run) = &mlflow {
            info.mlflow = Some(run.reference().clone());
            if resumed_from.is_none() {
                run.artifact(run_dir.join("recipe.yaml"), "recipe.yaml".into());
            }
        }
        let mut tracker = Self {
            run_dir: run_dir.to_path_buf(),
            events,
            metrics: BufWriter::new(metrics),
            info,
            wall_before,
            session_started: Instant::now(),
            last_heartbeat: Instant::now(),
            mlflow,
            finished: false,
            notes,
        };
        tracker.write_info()?;
        Ok(tracker)
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The lines opening the run left for the user, once.
    pub fn take_notes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notes)
    }

    /// The MLflow run this run logs to, if any (a checkpoint keeps it for resume).
    pub fn mlflow_run(&self) -> Option<&RunRef> {
        self.mlflow.as_ref().map(MlflowRun::reference)
    }

    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        self.events.scalar(tag, step, value as f32)?;
        if let Some(mlflow) = &self.mlflow {
            mlflow.metric(tag, step, value);
        }
        let record = MetricRecord {
            step,
            tag: tag.to_string(),
            value,
        };
        // serde_json refuses NaN; a diverged loss is logged as null rather than lost.
        let line = if value.is_finite() {
            serde_json::to_string(&record)?
        } else {
            format!(
                "{{\"step\":{step},\"tag\":{},\"value\":null}}",
                serde_json::to_string(tag)?
            )
        };
        writeln!(self.metrics, "{line}").context("cannot write metrics.jsonl")
    }

    /// Makes everything logged so far visible to readers (and to a resumed run after a crash),
    /// and says in `run.json` that the run is alive at `step`.
    pub fn flush(&mut self, step: u64) -> Result<()> {
        self.metrics.flush().context("cannot write metrics.jsonl")?;
        self.events.flush()?;
        self.info.steps_done = step;
        if self.last_heartbeat.elapsed() >= HEARTBEAT_EVERY {
            self.heartbeat()?;
        }
        Ok(())
    }

    /// Rewrites `run.json` now (a checkpoint was saved, say), not at the next 10 s mark.
    pub fn heartbeat(&mut self) -> Result<()> {
        self.write_info()
    }

    /// Uploads every file under `run_dir/<relative>` as artifacts of the same path (MLflow only).
    pub fn artifacts(&self, relative: &str) {
        let Some(mlflow) = &self.mlflow else {
            return;
        };
        for entry in walk_files(&self.run_dir.join(relative)) {
            if let Ok(inner) = entry.strip_prefix(&self.run_dir) {
                let path = inner.to_string_lossy().replace('\\', "/");
                mlflow.artifact(entry.clone(), path);
            }
        }
    }

    /// Uploads one file as artifact `path` (MLflow only).
    pub fn artifact(&self, local: &Path, path: &str) {
        if let Some(mlflow) = &self.mlflow {
            mlflow.artifact(local.to_path_buf(), path.to_string());
        }
    }

    /// Ends the run: its status in `run.json`, TensorBoard's HParams session and MLflow (which
    /// gets up to `tracking.mlflow.flush_timeout_secs` to receive what is still queued).
    pub fn finish(mut self, status: RunStatus) -> Result<()> {
        self.end(status)
    }

    fn end(&mut self, status: RunStatus) -> Result<()> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        let ended_at = unix_now();
        // TensorBoard keeps the first session end a run directory holds, so only the final
        // outcome is written: a failed or stopped run may still be resumed to the end.
        if status == RunStatus::Finished {
            hparams::write_end(&mut self.events, hparams::SessionStatus::Success, ended_at)?;
        }
        self.metrics.flush().context("cannot write metrics.jsonl")?;
        self.events.flush()?;
        self.info.status = status;
        self.info.ended_at = Some(ended_at);
        self.write_info()?;
        if let Some(mlflow) = self.mlflow.take() {
            mlflow.finish(match status {
                RunStatus::Finished => EndStatus::Finished,
                RunStatus::Stopped => EndStatus::Killed,
                RunStatus::Failed | RunStatus::Running => EndStatus::Failed,
            });
        }
        Ok(())
    }

    fn write_info(&mut self) -> Result<()> {
        self.last_heartbeat = Instant::now();
        self.info.heartbeat_at = unix_now();
        self.info.wall_seconds = self.wall_before + self.session_started.elapsed().as_secs_f64();
        if let Some(memory) = self.info.memory.as_mut() {
            memory.peak_rss_bytes = peak_rss_bytes();
        }
        crate::atomic_file::write(
            &self.run_dir.join("run.json"),
            (serde_json::to_string_pretty(&self.info)? + "\n").as_bytes(),
        )
    }
}

impl Drop for Tracker {
    /// A run that ends without [`Tracker::finish`] ended with an error (or a panic).
    fn drop(&mut self) {
        if let Err(e) = self.end(RunStatus::Failed) {
            tracing::warn!(
                "{}: cannot record the failed run: {e:#}",
                self.run_dir.display()
            );
        }
    }
}

/// The MLflow run for this training run, or `None` (with a warning when MLflow was asked for but
/// cannot be used: training goes on without it).
fn start_mlflow(
    recipe: &Recipe,
    info: &RunInfo,
    resume: Option<&RunRef>,
    notes: &mut Vec<String>,
) -> Option<MlflowRun> {
    let settings = match mlflow::Settings::resolve(recipe.tracking.mlflow.as_ref(), &recipe.name) {
        Ok(Some(settings)) => settings,
        Ok(None) => return None,
        Err(warning) => {
            notes.push(format!(
                "warning: {warning}; training goes on without MLflow"
            ));
            return None;
        }
    };
    let commit = info.git_commit.clone().unwrap_or_default();
    let user = std::env::var("USER").unwrap_or_default();
    let tags = [
        (
            "mlflow.source.name",
            format!("kiln train ({})", recipe.name),
        ),
        ("mlflow.source.type", "LOCAL".to_string()),
        ("mlflow.source.git.commit", commit.clone()),
        ("mlflow.user", user),
        ("kiln.version", info.kiln_version.clone()),
        ("kiln.git_commit", commit),
        ("kiln.host", info.host.clone()),
        ("kiln.recipe_sha256", info.recipe_sha256.clone()),
    ]
    .into_iter()
    .filter(|(_, value)| !value.is_empty())
    .map(|(key, value)| (key.to_string(), value))
    .collect();
    // The same `section.key` names `kiln runs compare` and `--set` use.
    let params = serde_norway::to_string(recipe)
        .ok()
        .and_then(|yaml| runs::flatten_recipe(&yaml, Path::new("recipe.yaml")).ok())
        .map(|flat| flat.into_iter().collect())
        .unwrap_or_default();
    let start = mlflow::RunStart {
        tags,
        params,
        resume,
    };
    match MlflowRun::start(&settings, start) {
        Ok(run) => {
            notes.extend(run.notes.iter().cloned());
            let reference = run.reference();
            notes.push(format!(
                "MLflow: logging to {}/#/experiments/{}/runs/{}",
                reference.uri, reference.experiment_id, reference.run_id
            ));
            Some(run)
        }
        Err(warning) => {
            notes.push(format!(
                "warning: {warning}; training goes on without MLflow (metrics.jsonl keeps every \
                 metric)"
            ));
            None
        }
    }
}

/// Every file under `dir`, sorted; nothing when it does not exist.
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    let mut entries: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            files.extend(walk_files(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Seconds since 1970, as `run.json` stores times.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Reads `metrics.jsonl` (null values come back as NaN).
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRecord>> {
    parse_metrics(path, false)
}

/// Reads `metrics.jsonl` like [`read_metrics`], except that a last line that does not parse is
/// dropped: it is a write cut short by a crash or a run still writing, and the complete lines
/// before it are all there is to show (`kiln runs`).
pub fn read_metrics_allowing_a_cut_last_line(path: &Path) -> Result<Vec<MetricRecord>> {
    parse_metrics(path, true)
}

fn parse_metrics(path: &Path, last_line_may_be_cut: bool) -> Result<Vec<MetricRecord>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .collect();
    let mut records = Vec::with_capacity(lines.len());
    for (position, &(index, line)) in lines.iter().enumerate() {
        let parsed = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|value| {
                Some(MetricRecord {
                    step: value.get("step")?.as_u64()?,
                    tag: value.get("tag")?.as_str()?.to_string(),
                    value: value.get("value")?.as_f64().unwrap_or(f64::NAN),
                })
            });
        match parsed {
            Some(record) => records.push(record),
            None if last_line_may_be_cut && position + 1 == lines.len() => {}
            None => bail!(
                "{}:{}: expected {{\"step\": N, \"tag\": \"...\", \"value\": x}}",
                path.display(),
                index + 1
            ),
        }
    }
    Ok(records)
}

/// Keeps only records up to `step`. A line cut short by a crash (the last one) is dropped too.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return crate::atomic_file::write(path, b"");
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let mut kept = String::new();
    for line in text.lines() {
        let keep = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
            .is_some_and(|s| s <= step);
        if keep {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    crate::atomic_file::write(path, kept.as_bytes())
}

/// `run.json`: what produced a run and how it stands. Fields after `hardware` are absent from
/// runs of older Kiln versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub kiln_version: String,
    pub git_commit: Option<String>,
    pub hardware: Hardware,
    #[serde(default)]
    pub name: String,
    /// sha256 of `recipe.yaml` (the resolved recipe).
    #[serde(default)]
    pub recipe_sha256: String,
    #[serde(default)]
    pub status: RunStatus,
    /// Unix seconds.
    #[serde(default)]
    pub started_at: f64,
    /// Unix seconds of the last sign of life; a `running` run whose heartbeat stopped died.
    #[serde(default)]
    pub heartbeat_at: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<f64>,
    /// Training wall time over all sessions (a resumed run adds to it).
    #[serde(default)]
    pub wall_seconds: f64,
    #[serde(default)]
    pub steps_done: u64,
    #[serde(default)]
    pub total_steps: u64,
    /// Sessions the run took: 1, plus one per resume.
    #[serde(default)]
    pub sessions: u32,
    /// The training process, to tell a live run from a dead one on the same host.
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlflow: Option<RunRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryRecord>,
}

/// What a run expected to hold in memory, and what this session of it held.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryRecord {
    /// The estimate's terms (`weights`, `gradients`, ..., `total`), bytes.
    pub estimate: BTreeMap<String, u64>,
    /// The training process's peak resident set so far (Linux VmHWM), bytes.
    pub peak_rss_bytes: Option<u64>,
}

/// This process's peak resident set size (Linux `VmHWM`), bytes; `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hardware {
    pub cpu: Option<String>,
    pub cores: usize,
    pub memory_bytes: Option<u64>,
    pub device: String,
}

impl RunInfo {
    pub fn collect(device: &str) -> Self {
        let git_commit = std::process::Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string());
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<u64>().ok())
            })
            .map(|kb| kb * 1024);
        Self {
            kiln_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit,
            hardware: Hardware {
                cpu,
                cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
                memory_bytes,
                device: device.to_string(),
            },
            name: String::new(),
            recipe_sha256: String::new(),
            status: RunStatus::Running,
            started_at: unix_now(),
            heartbeat_at: unix_now(),
            ended_at: None,
            wall_seconds: 0.0,
            steps_done: 0,
            total_steps: 0,
            sessions: 1,
            pid: std::process::id(),
            host: host_name(),
            mlflow: None,
            memory: None,
        }
    }
}

/// This machine's name, as `hostname` prints it.
pub fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer outlives the call and its length is passed along.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    match ok {
        true if end > 0 => String::from_utf8_lossy(&buffer[..end]).into_owned(),
        _ => "localhost".into(),
    }
}

/// A progress bar on a terminal; plain log lines otherwise (or when asked to be quiet).
pub struct Progress {
    quiet: bool,
    bar: Option<ProgressBar>,
}

impl Progress {
    /// Lines only, until [`Self::start`] (a bar on a terminal unless `quiet`).
    pub fn new(quiet: bool) -> Self {
        Self { quiet, bar: None }
    }

    /// The steps begin: from here a terminal shows a bar that the lines print above.
    pub fn start(&mut self, total_steps: u64, start_step: u64) {
        self.bar = (!self.quiet && std::io::stdout().is_terminal()).then(|| {
            let bar = ProgressBar::new(total_steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .expect("valid template"),
            );
            bar.set_position(start_step);
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
    }

    pub fn step(
        &self,
        step: u64,
        total: u64,
        loss: f64,
        lr: f64,
        tokens_per_sec: f64,
        log_line: bool,
    ) {
        let msg = format!("loss {loss:.4} lr {lr:.3e} {tokens_per_sec:.0} tok/s");
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(msg);
            }
            None if log_line => println!("step {step}/{total} {msg}"),
            None => {}
        }
    }

    /// A line that must not be overwritten by the bar (eval results, checkpoints).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }

    /// A warning, on standard error (where every rank's warnings reach the user).
    pub fn warn(&self, line: &str) {
        self.eprintln(&format!("warning: {line}"));
    }

    /// A line on standard error, which every rank of a job keeps.
    pub fn eprintln(&self, line: &str) {
        let write = || eprintln!("{line}");
        match &self.bar {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    }

    /// Clears the bar: the lines after it print as plain lines (a finished bar would drop them).
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}
