//! Experiment tracking: TensorBoard events, `metrics.jsonl`, run metadata and the progress display.
//!
//! A run directory `<tracking.log_dir>/<run>/` holds:
//! - `events.out.tfevents.*`: TensorBoard scalars (`train/*`, `eval/*`) and the resolved recipe
//!   as a text summary (`recipe`) at step 0; a resumed run adds a new event file.
//! - `metrics.jsonl`: every scalar again, one `{"step": N, "tag": "train/loss", "value": x}`
//!   object a line, flushed at the end of each step. A resumed run first truncates it back to
//!   the checkpoint's step, so the file reads as if the run had never stopped.
//! - `recipe.yaml` (resolved) and `run.json` (Kiln version, git commit, hardware).

pub mod tensorboard;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

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
}

impl Tracker {
    /// Opens (creating) the run directory. `resumed_from` is the step of the checkpoint a
    /// resumed run continues from: later metrics of the interrupted run are dropped.
    pub fn open(
        run_dir: &Path,
        recipe_yaml: &str,
        device: &str,
        resumed_from: Option<u64>,
    ) -> Result<Self> {
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("{}: cannot create the run directory", run_dir.display()))?;
        crate::atomic_file::write(&run_dir.join("recipe.yaml"), recipe_yaml.as_bytes())?;
        let info = RunInfo::collect(device);
        crate::atomic_file::write(
            &run_dir.join("run.json"),
            (serde_json::to_string_pretty(&info)? + "\n").as_bytes(),
        )?;
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
            None => events.text("recipe", 0, &format!("```yaml\n{recipe_yaml}```"))?,
        }
        events.flush()?;
        Ok(Self {
            run_dir: run_dir.to_path_buf(),
            events,
            metrics: BufWriter::new(metrics),
        })
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<()> {
        self.events.scalar(tag, step, value as f32)?;
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

    /// Makes everything logged so far visible to readers (and to a resumed run after a crash).
    pub fn flush(&mut self) -> Result<()> {
        self.metrics.flush().context("cannot write metrics.jsonl")?;
        self.events.flush()
    }
}

/// Reads `metrics.jsonl` (null values come back as NaN).
pub fn read_metrics(path: &Path) -> Result<Vec<MetricRecord>> {
    let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut records = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
        let parsed = (|| {
            Some(MetricRecord {
                step: value.get("step")?.as_u64()?,
                tag: value.get("tag")?.as_str()?.to_string(),
                value: value.get("value")?.as_f64().unwrap_or(f64::NAN),
            })
        })();
        records.push(parsed.with_context(|| {
            format!(
                "{}:{}: expected {{\"step\", \"tag\", \"value\"}}",
                path.display(),
                i + 1
            )
        })?);
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

/// What produced a run: `run.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub kiln_version: String,
    pub git_commit: Option<String>,
    pub hardware: Hardware,
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
        }
    }
}

/// A progress bar on a terminal; plain log lines otherwise (or when asked to be quiet).
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(total_steps: u64, start_step: u64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stdout().is_terminal()).then(|| {
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
        Self { bar }
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

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
