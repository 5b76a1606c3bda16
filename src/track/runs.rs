//! `kiln runs`: what the run directories of a log dir hold, summarised, sorted and compared.
//!
//! Everything here reads what training wrote (`run.json`, `metrics.jsonl`, `recipe.yaml`) and
//! tolerates what older Kiln versions or a killed run leave behind: absent `run.json` fields, a
//! metrics line cut short by a crash, a directory with no metrics yet.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::MetricRecord;

/// A "running" run whose heartbeat is older than this is shown as died: training rewrites it at
/// least every ~10 s, so ten minutes of silence is a hung or vanished process, not a slow step.
pub const HEARTBEAT_STALE_SECS: f64 = 600.0;

/// The files whose presence makes a directory a run directory (see [`find_runs`]).
const RUN_MARKERS: [&str; 3] = ["run.json", "metrics.jsonl", "recipe.yaml"];

/// What `run.json` says about a run. Every field is optional: older runs lack most of them, and
/// a field of the wrong type is treated as absent rather than hiding the whole run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunMeta {
    pub name: Option<String>,
    pub status: Option<String>,
    pub started_at: Option<f64>,
    pub heartbeat_at: Option<f64>,
    pub ended_at: Option<f64>,
    pub wall_seconds: Option<f64>,
    pub steps_done: Option<u64>,
    pub total_steps: Option<u64>,
    pub pid: Option<u32>,
    pub host: Option<String>,
    pub git_commit: Option<String>,
    pub recipe_sha256: Option<String>,
    pub kiln_version: Option<String>,
}

impl RunMeta {
    fn from_json(value: &serde_json::Value) -> Self {
        let string = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_string);
        let float = |key: &str| value.get(key).and_then(|v| v.as_f64());
        let unsigned = |key: &str| value.get(key).and_then(|v| v.as_u64());
        Self {
            name: string("name"),
            status: string("status"),
            started_at: float("started_at"),
            heartbeat_at: float("heartbeat_at"),
            ended_at: float("ended_at"),
            wall_seconds: float("wall_seconds"),
            steps_done: unsigned("steps_done"),
            total_steps: unsigned("total_steps"),
            pid: unsigned("pid").and_then(|p| u32::try_from(p).ok()),
            host: string("host"),
            git_commit: string("git_commit"),
            recipe_sha256: string("recipe_sha256"),
            kiln_version: string("kiln_version"),
        }
    }
}

/// One run directory, read.
#[derive(Debug, Clone)]
pub struct Run {
    /// The directory's name: what `kiln runs compare` and `plot` accept.
    pub name: String,
    pub dir: PathBuf,
    pub meta: RunMeta,
    pub metrics: Vec<MetricRecord>,
    /// The resolved recipe's text, if the run wrote one.
    pub recipe_yaml: Option<String>,
}

impl Run {
    /// Reads a run directory. Absent files are not errors (an empty run); unreadable ones are.
    pub fn load(dir: &Path) -> Result<Self> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        let run_json = dir.join("run.json");
        let meta = match read_optional(&run_json)? {
            Some(text) => {
                let value: serde_json::Value = serde_json::from_str(&text).with_context(|| {
                    format!(
                        "{}: not JSON (expected Kiln's run metadata)",
                        run_json.display()
                    )
                })?;
                RunMeta::from_json(&value)
            }
            None => RunMeta::default(),
        };
        let metrics_path = dir.join("metrics.jsonl");
        let metrics = if metrics_path.exists() {
            crate::track::read_metrics_allowing_a_cut_last_line(&metrics_path)?
        } else {
            Vec::new()
        };
        let recipe_yaml = read_optional(&dir.join("recipe.yaml"))?;
        Ok(Self {
            name,
            dir: dir.to_path_buf(),
            meta,
            metrics,
            recipe_yaml,
        })
    }

    /// The finite points of one metric, in step order.
    pub fn series(&self, tag: &str) -> Vec<(u64, f64)> {
        let mut points: Vec<(u64, f64)> = self
            .metrics
            .iter()
            .filter(|r| r.tag == tag && r.value.is_finite())
            .map(|r| (r.step, r.value))
            .collect();
        points.sort_by_key(|&(step, _)| step);
        points
    }

    /// Every metric tag the run logged, sorted.
    pub fn tags(&self) -> BTreeSet<&str> {
        self.metrics.iter().map(|r| r.tag.as_str()).collect()
    }

    fn tag_stats(&self) -> BTreeMap<String, TagStats> {
        let mut stats: BTreeMap<String, TagStats> = BTreeMap::new();
        for record in &self.metrics {
            stats
                .entry(record.tag.clone())
                .or_insert_with(|| TagStats::new(&record.tag))
                .add(record.step, record.value);
        }
        stats
    }
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow!(e).context(format!("{}: cannot read", path.display()))),
    }
}

/// The run directories of a log dir: its subdirectories holding `run.json`, `metrics.jsonl` or
/// `recipe.yaml`, and empty ones (a run stopped before writing anything), sorted by name. Other
/// directories (anything a user keeps beside the runs) are not runs.
pub fn find_runs(log_dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(log_dir).with_context(|| {
        format!(
            "{}: cannot read the log dir (a recipe's `tracking.log_dir`, `runs` by default)",
            log_dir.display()
        )
    })?;
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("{}: cannot read", log_dir.display()))?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if hidden || !path.is_dir() {
            continue;
        }
        let has_marker = RUN_MARKERS.iter().any(|f| path.join(f).exists());
        let is_empty = std::fs::read_dir(&path).is_ok_and(|mut d| d.next().is_none());
        if has_marker || is_empty {
            dirs.push(path);
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Whether `dir` looks like a run directory itself (so a user who passed one where a log dir was
/// expected can be told).
pub fn is_run_dir(dir: &Path) -> bool {
    RUN_MARKERS.iter().any(|f| dir.join(f).is_file())
}

/// Finds the runs named on a command line: a name inside `log_dir`, or a path to a run
/// directory. Every name that is neither is reported in one error.
pub fn resolve_runs(names: &[String], log_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for name in names {
        let in_log_dir = log_dir.join(name);
        if in_log_dir.is_dir() {
            found.push(in_log_dir);
        } else if Path::new(name).is_dir() {
            found.push(PathBuf::from(name));
        } else {
            missing.push(name.as_str());
        }
    }
    match missing.as_slice() {
        [] => Ok(found),
        [one] => bail!(
            "no run `{one}`: neither {} nor ./{one} is a directory (runs are looked up in the log \
             dir {}; pass --log-dir DIR or a path to the run directory)",
            log_dir.join(one).display(),
            log_dir.display()
        ),
        several => bail!(
            "no runs {} in the log dir {} (nor as paths; pass --log-dir DIR or paths to the run \
             directories)",
            several
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", "),
            log_dir.display()
        ),
    }
}

/// Where a run stands, as shown in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Standing {
    Running,
    /// `run.json` says running, but the process is gone or its heartbeat stopped.
    Died,
    Failed,
    /// Ctrl-C or SIGTERM: a checkpoint was saved and the run can be resumed.
    Stopped,
    Finished,
    /// No metrics and nothing in `run.json` that says otherwise.
    Empty,
    /// An older run with metrics but no status in `run.json`.
    Unknown,
    /// `run.json` or `metrics.jsonl` could not be read (the table's warning says why).
    Unreadable,
}

impl Standing {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Died => "died",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
            Self::Finished => "finished",
            Self::Empty => "empty",
            Self::Unknown => "unknown",
            Self::Unreadable => "unreadable",
        }
    }
}

/// The rule for a run whose `run.json` says "running": it has died when its heartbeat is older
/// than [`HEARTBEAT_STALE_SECS`], or when it ran on this host and its process is gone. A run on
/// another host is judged by its heartbeat alone; without a heartbeat, its start time stands in.
pub fn has_died(
    meta: &RunMeta,
    now: f64,
    this_host: Option<&str>,
    process_exists: impl Fn(u32) -> bool,
) -> bool {
    let last_sign_of_life = meta.heartbeat_at.or(meta.started_at);
    let stale = last_sign_of_life.is_some_and(|t| now - t > HEARTBEAT_STALE_SECS);
    let same_host = matches!((meta.host.as_deref(), this_host), (Some(a), Some(b)) if a == b);
    let gone = same_host && meta.pid.is_some_and(|pid| !process_exists(pid));
    stale || gone
}

/// Whether a process with this id exists (signal 0 checks without sending anything; EPERM means
/// it exists but belongs to someone else).
pub fn process_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if pid <= 0 {
        // 0 and negative ids address process groups, not a process: no answer about the run.
        return true;
    }
    // SAFETY: kill with signal 0 has no effect beyond the permission and existence check.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// This machine's name as training records it in `run.json`.
pub fn this_host() -> Option<String> {
    Some(super::host_name()).filter(|h| h != "localhost")
}

/// Metrics whose larger values are better: these sort highest first and their "best" is the
/// maximum. Every other metric (losses, learning rate, ...) sorts lowest first.
pub fn higher_is_better(tag: &str) -> bool {
    let last = tag.rsplit('/').next().unwrap_or(tag).to_ascii_lowercase();
    last.contains("accuracy")
        || last.ends_with("_per_sec")
        || [
            "acc",
            "f1",
            "bleu",
            "rouge",
            "exact_match",
            "precision",
            "recall",
            "auc",
        ]
        .iter()
        .any(|word| last == *word || last.starts_with(&format!("{word}_")))
}

/// Last and best value of one metric of one run (non-finite values are never "best").
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TagStats {
    /// `null` when the last value logged was NaN or infinite.
    #[serde(serialize_with = "finite_or_null")]
    pub last: f64,
    pub last_step: u64,
    /// The maximum for metrics where higher is better, else the minimum.
    pub best: Option<f64>,
    pub best_step: Option<u64>,
    /// Mean of the finite values.
    pub mean: Option<f64>,
    pub points: usize,
    #[serde(skip)]
    higher_is_better: bool,
    #[serde(skip)]
    finite_sum: f64,
    #[serde(skip)]
    finite_count: usize,
}

fn finite_or_null<S: serde::Serializer>(value: &f64, serializer: S) -> Result<S::Ok, S::Error> {
    if value.is_finite() {
        serializer.serialize_f64(*value)
    } else {
        serializer.serialize_none()
    }
}

impl TagStats {
    fn new(tag: &str) -> Self {
        Self {
            last: f64::NAN,
            last_step: 0,
            best: None,
            best_step: None,
            mean: None,
            points: 0,
            higher_is_better: higher_is_better(tag),
            finite_sum: 0.0,
            finite_count: 0,
        }
    }

    fn add(&mut self, step: u64, value: f64) {
        self.points += 1;
        if step >= self.last_step || self.points == 1 {
            self.last = value;
            self.last_step = step;
        }
        if !value.is_finite() {
            return;
        }
        self.finite_sum += value;
        self.finite_count += 1;
        self.mean = Some(self.finite_sum / self.finite_count as f64);
        let better = match self.best {
            None => true,
            Some(best) if self.higher_is_better => value > best,
            Some(best) => value < best,
        };
        if better {
            self.best = Some(value);
            self.best_step = Some(step);
        }
    }

    /// The value a table shows and sorts by: best for higher-is-better metrics, else last.
    fn headline(&self) -> Option<f64> {
        if self.higher_is_better {
            self.best
        } else {
            Some(self.last).filter(|v| v.is_finite())
        }
    }
}

/// One row of `kiln runs`; with `--json`, these field names are the stable interface.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub name: String,
    pub path: PathBuf,
    pub status: Standing,
    /// Unix seconds: `run.json`'s `started_at`, else when the run directory was created.
    pub started_at: Option<f64>,
    pub ended_at: Option<f64>,
    pub steps_done: Option<u64>,
    pub total_steps: Option<u64>,
    pub last_train_loss: Option<f64>,
    pub best_eval_accuracy: Option<f64>,
    pub best_eval_accuracy_step: Option<u64>,
    /// Mean of `train/tokens_per_sec`.
    pub tokens_per_sec: Option<f64>,
    pub wall_seconds: Option<f64>,
    pub git_commit: Option<String>,
    /// sha256 of `recipe.yaml` (from `run.json`, else computed from the file).
    pub recipe_sha256: Option<String>,
    pub kiln_version: Option<String>,
    pub host: Option<String>,
    pub metrics: BTreeMap<String, TagStats>,
    /// Why the run could not be read (status `unreadable`).
    pub error: Option<String>,
}

impl RunSummary {
    pub fn of(run: &Run, now: f64, this_host: Option<&str>) -> Self {
        let meta = &run.meta;
        let metrics = run.tag_stats();
        let status = match meta.status.as_deref() {
            Some("running") if has_died(meta, now, this_host, process_exists) => Standing::Died,
            Some("running") => Standing::Running,
            Some("failed") => Standing::Failed,
            Some("stopped") => Standing::Stopped,
            _ if run.metrics.is_empty() => Standing::Empty,
            Some("finished") => Standing::Finished,
            _ => Standing::Unknown,
        };
        let steps_logged = run
            .metrics
            .iter()
            .filter(|r| r.tag.starts_with("train/"))
            .map(|r| r.step)
            .max();
        let accuracy = metrics.get("eval/accuracy");
        Self {
            name: run.name.clone(),
            path: run.dir.clone(),
            status,
            started_at: meta.started_at.or_else(|| created_at(&run.dir)),
            ended_at: meta.ended_at,
            steps_done: meta.steps_done.or(steps_logged),
            total_steps: meta.total_steps,
            last_train_loss: metrics
                .get("train/loss")
                .map(|s| s.last)
                .filter(|v| v.is_finite()),
            best_eval_accuracy: accuracy.and_then(|s| s.best),
            best_eval_accuracy_step: accuracy.and_then(|s| s.best_step),
            tokens_per_sec: metrics.get("train/tokens_per_sec").and_then(|s| s.mean),
            wall_seconds: meta.wall_seconds,
            git_commit: meta.git_commit.clone(),
            recipe_sha256: meta.recipe_sha256.clone().or_else(|| {
                run.recipe_yaml
                    .as_ref()
                    .map(|text| hex::encode(Sha256::digest(text.as_bytes())))
            }),
            kiln_version: meta.kiln_version.clone(),
            host: meta.host.clone(),
            metrics,
            error: None,
        }
    }

    /// A row for a directory whose files could not be read.
    pub fn unreadable(dir: &Path, error: &anyhow::Error) -> Self {
        Self {
            name: dir
                .file_name()
                .map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into()),
            path: dir.to_path_buf(),
            status: Standing::Unreadable,
            started_at: created_at(dir),
            ended_at: None,
            steps_done: None,
            total_steps: None,
            last_train_loss: None,
            best_eval_accuracy: None,
            best_eval_accuracy_step: None,
            tokens_per_sec: None,
            wall_seconds: None,
            git_commit: None,
            recipe_sha256: None,
            kiln_version: None,
            host: None,
            metrics: BTreeMap::new(),
            error: Some(format!("{error:#}")),
        }
    }
}

fn created_at(dir: &Path) -> Option<f64> {
    let created = std::fs::metadata(dir).and_then(|m| m.created()).ok()?;
    created
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs_f64())
}

/// Summaries of every run in a log dir; a run that cannot be read is a row saying so, never the
/// end of the listing.
pub fn summarize_log_dir(log_dir: &Path) -> Result<Vec<RunSummary>> {
    let now = super::unix_now();
    let host = this_host();
    Ok(find_runs(log_dir)?
        .iter()
        .map(|dir| match Run::load(dir) {
            Ok(run) => RunSummary::of(&run, now, host.as_deref()),
            Err(e) => RunSummary::unreadable(dir, &e),
        })
        .collect())
}

/// What `kiln runs --sort` orders by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SortKey {
    Name,
    Started,
    Status,
    Steps,
    Wall,
    TokensPerSec,
    Commit,
    Recipe,
    Metric(String),
}

/// The column names `--sort` accepts (besides metric tags).
pub const SORT_COLUMNS: &str =
    "name, started, status, steps, wall, tokens_per_sec, commit, recipe, loss, accuracy";

impl FromStr for SortKey {
    type Err = anyhow::Error;

    fn from_str(key: &str) -> Result<Self> {
        Ok(match key {
            "name" => Self::Name,
            "started" => Self::Started,
            "status" => Self::Status,
            "steps" => Self::Steps,
            "wall" => Self::Wall,
            "tokens_per_sec" | "tokens/s" => Self::TokensPerSec,
            "commit" => Self::Commit,
            "recipe" => Self::Recipe,
            "loss" => Self::Metric("train/loss".into()),
            "accuracy" => Self::Metric("eval/accuracy".into()),
            tag if tag.contains('/') => Self::Metric(tag.into()),
            other => bail!(
                "--sort {other}: expected a column ({SORT_COLUMNS}) or a metric tag such as \
                 eval/accuracy"
            ),
        })
    }
}

/// Orders runs by `key`: columns ascending, except tokens/s and higher-is-better metrics
/// (accuracy, f1, ...: by their best value) which go highest first; other metrics sort by their
/// last value, lowest first. Runs without a value go last; ties keep name order.
pub fn sort_runs(runs: &mut [RunSummary], key: &SortKey, reverse: bool) -> Result<()> {
    if let SortKey::Metric(tag) = key {
        if !runs.iter().any(|r| r.metrics.contains_key(tag)) {
            let mut known: BTreeSet<&str> = BTreeSet::new();
            for run in runs.iter() {
                known.extend(run.metrics.keys().map(String::as_str));
            }
            bail!(
                "--sort {tag}: no run logged that metric (metrics present: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.into_iter().collect::<Vec<_>>().join(", ")
                }
            );
        }
    }
    runs.sort_by(|a, b| a.name.cmp(&b.name));
    let number = |run: &RunSummary| -> Option<f64> {
        match key {
            SortKey::Started => run.started_at,
            SortKey::Steps => run.steps_done.map(|s| s as f64),
            SortKey::Wall => run.wall_seconds,
            SortKey::TokensPerSec => run.tokens_per_sec,
            SortKey::Metric(tag) => run.metrics.get(tag).and_then(TagStats::headline),
            _ => None,
        }
    };
    let text = |run: &RunSummary| -> Option<String> {
        match key {
            SortKey::Name => Some(run.name.clone()),
            SortKey::Status => Some(run.status.as_str().to_string()),
            SortKey::Commit => run.git_commit.clone(),
            SortKey::Recipe => run.recipe_sha256.clone(),
            _ => None,
        }
    };
    let descending = match key {
        SortKey::TokensPerSec => true,
        SortKey::Metric(tag) => higher_is_better(tag),
        _ => false,
    } != reverse;
    runs.sort_by(|a, b| {
        use std::cmp::Ordering;
        let ordered = |o: Ordering| if descending { o.reverse() } else { o };
        match (number(a), number(b), text(a), text(b)) {
            (Some(x), Some(y), ..) => ordered(x.total_cmp(&y)),
            (_, _, Some(x), Some(y)) => ordered(x.cmp(&y)),
            (Some(_), None, ..) | (_, _, Some(_), None) => Ordering::Less,
            (None, Some(_), ..) | (_, _, None, Some(_)) => Ordering::Greater,
            _ => Ordering::Equal,
        }
    });
    Ok(())
}

/// A metric value with five significant digits, in scientific notation when very small or large.
pub fn format_metric(value: f64) -> String {
    if !value.is_finite() {
        return if value.is_nan() {
            "NaN".into()
        } else {
            value.to_string()
        };
    }
    if value == 0.0 {
        return "0".into();
    }
    let magnitude = value.abs().log10().floor() as i32;
    if !(-4..6).contains(&magnitude) {
        return format!("{value:.4e}");
    }
    let decimals = (4 - magnitude).max(0) as usize;
    let text = format!("{value:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

/// A resolved recipe as `dotted.key → value` pairs. Lists of plain values stay whole
/// (`optimizer.betas → [0.9, 0.98]`); lists holding mappings are indexed the way `--set`
/// addresses them (`data.train.0.source.path`).
pub fn flatten_recipe(yaml: &str, origin: &Path) -> Result<BTreeMap<String, String>> {
    let tree: serde_norway::Value =
        serde_norway::from_str(yaml).with_context(|| format!("{}: not YAML", origin.display()))?;
    let mut flat = BTreeMap::new();
    match &tree {
        serde_norway::Value::Mapping(_) | serde_norway::Value::Null => {
            flatten_into("", &tree, &mut flat)
        }
        _ => bail!(
            "{}: expected a YAML mapping (the resolved recipe)",
            origin.display()
        ),
    }
    Ok(flat)
}

fn flatten_into(prefix: &str, value: &serde_norway::Value, flat: &mut BTreeMap<String, String>) {
    use serde_norway::Value;
    let join = |key: &str| {
        if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match value {
        Value::Mapping(map) if !map.is_empty() => {
            for (key, child) in map {
                flatten_into(&join(&inline_yaml(key)), child, flat);
            }
        }
        Value::Sequence(items) if items.iter().any(|i| !is_scalar(i)) => {
            for (index, child) in items.iter().enumerate() {
                flatten_into(&join(&index.to_string()), child, flat);
            }
        }
        Value::Tagged(tagged) => flatten_into(prefix, &tagged.value, flat),
        Value::Null if prefix.is_empty() => {}
        _ => {
            flat.insert(prefix.to_string(), inline_yaml(value));
        }
    }
}

fn is_scalar(value: &serde_norway::Value) -> bool {
    !matches!(
        value,
        serde_norway::Value::Mapping(_) | serde_norway::Value::Sequence(_)
    )
}

/// One-line YAML for a value: `0.001`, `cosine`, `[0.9, 0.98]`, `null`, `{}`.
fn inline_yaml(value: &serde_norway::Value) -> String {
    use serde_norway::Value;
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        Value::Sequence(items) => format!(
            "[{}]",
            items.iter().map(inline_yaml).collect::<Vec<_>>().join(", ")
        ),
        Value::Mapping(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", inline_yaml(k), inline_yaml(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Tagged(tagged) => format!("{} {}", tagged.tag, inline_yaml(&tagged.value)),
    }
}

/// `kiln runs compare`: recipe keys whose values differ, and metrics side by side.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub runs: Vec<RunSummary>,
    /// How many distinct recipe keys the runs have between them.
    pub recipe_keys: usize,
    pub recipe_differences: Vec<RecipeDifference>,
    /// Every metric tag any run logged, with each run's last value (in `runs` order).
    pub metrics: Vec<MetricSideBySide>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecipeDifference {
    pub key: String,
    /// Each run's value as one-line YAML (in `runs` order); `null` where the key is absent.
    pub values: Vec<Option<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MetricSideBySide {
    pub tag: String,
    /// `null` where the run did not log the tag or its last value was not finite.
    pub last: Vec<Option<f64>>,
}

impl Comparison {
    pub fn of(runs: &[Run]) -> Result<Self> {
        let now = super::unix_now();
        let host = this_host();
        let mut recipes = Vec::with_capacity(runs.len());
        for run in runs {
            recipes.push(match &run.recipe_yaml {
                Some(text) => flatten_recipe(text, &run.dir.join("recipe.yaml"))?,
                None => BTreeMap::new(),
            });
        }
        let keys: BTreeSet<&String> = recipes.iter().flat_map(|r| r.keys()).collect();
        let recipe_differences = keys
            .iter()
            .filter_map(|key| {
                let values: Vec<Option<String>> =
                    recipes.iter().map(|r| r.get(*key).cloned()).collect();
                let differ = values.iter().any(|v| v != &values[0]);
                differ.then(|| RecipeDifference {
                    key: (*key).clone(),
                    values,
                })
            })
            .collect();
        let summaries: Vec<RunSummary> = runs
            .iter()
            .map(|run| RunSummary::of(run, now, host.as_deref()))
            .collect();
        let tags: BTreeSet<&String> = summaries.iter().flat_map(|s| s.metrics.keys()).collect();
        let metrics = tags
            .into_iter()
            .map(|tag| MetricSideBySide {
                tag: tag.clone(),
                last: summaries
                    .iter()
                    .map(|s| s.metrics.get(tag).map(|m| m.last).filter(|v| v.is_finite()))
                    .collect(),
            })
            .collect();
        Ok(Self {
            recipe_keys: keys.len(),
            recipe_differences,
            metrics,
            runs: summaries,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(host: &str, pid: u32, heartbeat_at: f64) -> RunMeta {
        RunMeta {
            status: Some("running".into()),
            host: Some(host.into()),
            pid: Some(pid),
            heartbeat_at: Some(heartbeat_at),
            ..RunMeta::default()
        }
    }

    #[test]
    fn a_running_run_dies_when_its_process_is_gone_or_its_heartbeat_stops() {
        let now = 10_000.0;
        let alive = |_| true;
        let gone = |_| false;
        // Fresh heartbeat, process there: running.
        assert!(!has_died(
            &running("a", 7, now - 5.0),
            now,
            Some("a"),
            alive
        ));
        // Same host, process gone: died at once, however fresh the heartbeat.
        assert!(has_died(&running("a", 7, now - 5.0), now, Some("a"), gone));
        // Another host: its pid means nothing here; only the heartbeat counts.
        assert!(!has_died(&running("b", 7, now - 5.0), now, Some("a"), gone));
        assert!(has_died(
            &running("b", 7, now - 601.0),
            now,
            Some("a"),
            alive
        ));
        // Exactly at the limit is still alive.
        assert!(!has_died(
            &running("b", 7, now - 600.0),
            now,
            Some("a"),
            alive
        ));
        // No heartbeat (an older writer): the start time stands in; neither means no verdict.
        let started_long_ago = RunMeta {
            status: Some("running".into()),
            started_at: Some(now - 3600.0),
            ..RunMeta::default()
        };
        assert!(has_died(&started_long_ago, now, None, alive));
        let nothing = RunMeta {
            status: Some("running".into()),
            ..RunMeta::default()
        };
        assert!(!has_died(&nothing, now, Some("a"), gone));
    }

    #[test]
    fn this_process_exists_and_a_reaped_child_does_not() {
        assert!(process_exists(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_exists(pid));
    }

    #[test]
    fn a_cut_short_last_line_is_dropped_but_a_bad_middle_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"step\":1,\"tag\":\"train/loss\",\"value\":2.5}\n\
             {\"step\":2,\"tag\":\"train/loss\",\"value\":null}\n\
             {\"step\":3,\"tag\":\"train/lo",
        )
        .unwrap();
        let records = crate::track::read_metrics_allowing_a_cut_last_line(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert!(records[1].value.is_nan());
        std::fs::write(
            &path,
            "{\"step\":1,\"tag\":\"train/loss\",\"value\":2.5}\n\
             garbage\n\
             {\"step\":3,\"tag\":\"train/loss\",\"value\":2.0}\n",
        )
        .unwrap();
        let error = format!(
            "{:#}",
            crate::track::read_metrics_allowing_a_cut_last_line(&path).unwrap_err()
        );
        assert!(error.contains("metrics.jsonl:2"), "{error}");
    }

    #[test]
    fn recipes_flatten_to_the_keys_set_addresses() {
        let flat = flatten_recipe(
            "name: a\noptimizer: {lr: 0.001, betas: [0.9, 0.98]}\n\
             data:\n  train:\n    - source: {path: x.jsonl}\n      template: mnli\n\
             eval: {}\ntokenizer: null\n",
            Path::new("recipe.yaml"),
        )
        .unwrap();
        let pairs: Vec<(&str, &str)> = flat.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            pairs,
            [
                ("data.train.0.source.path", "x.jsonl"),
                ("data.train.0.template", "mnli"),
                ("eval", "{}"),
                ("name", "a"),
                ("optimizer.betas", "[0.9, 0.98]"),
                ("optimizer.lr", "0.001"),
                ("tokenizer", "null"),
            ]
        );
    }

    #[test]
    fn metric_values_read_well() {
        assert_eq!(format_metric(0.97333333), "0.97333");
        assert_eq!(format_metric(2.0e-3), "0.002");
        assert_eq!(format_metric(1.5e-5), "1.5000e-5");
        assert_eq!(format_metric(12345.678), "12346");
        assert_eq!(format_metric(f64::NAN), "NaN");
    }

    #[test]
    fn accuracy_like_metrics_are_better_higher() {
        for tag in [
            "eval/accuracy",
            "eval/acc",
            "eval/f1",
            "train/tokens_per_sec",
        ] {
            assert!(higher_is_better(tag), "{tag}");
        }
        for tag in ["train/loss", "eval/loss", "train/lr", "train/grad_accum"] {
            assert!(!higher_is_better(tag), "{tag}");
        }
    }
}
