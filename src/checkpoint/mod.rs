//! Checkpoints: `<checkpoint.dir>/<run>/step-<N>/`, each a complete HF model directory plus the
//! trainer's state, written atomically and verified before a resume trusts it.
//!
//! Layout of one checkpoint:
//! - `config.json`, `model*.safetensors`, tokenizer files: loadable by HF `from_pretrained`.
//! - `optimizer.safetensors`: fp32 Adam moments `exp_avg.<param>` / `exp_avg_sq.<param>`, and
//!   `master.<param>` fp32 master weights when the model weights were saved in a lower precision.
//! - `trainer_state.json`: [`TrainerState`], including the size and sha256 of every other file.
//! - `README.md`: a model card.
//!
//! A checkpoint is built in `.tmp-step-<N>`, every file and the directory are fsynced, and only
//! then is it renamed into place and the `latest` pointer (a file naming the step directory)
//! replaced through its own rename. A checkpoint of the same step that already exists (a resumed
//! run passing it again) is first moved aside to `.old-step-<N>` and removed only once the new
//! one is in place; [`recover`] puts it back if a crash came in between. Pruning by `keep_last`
//! ([`prune`]) is a separate call, made once the caller knows which checkpoints are still in use.
//!
//! Writing, recovering and pruning all go through the run's [`RunLock`], so only the process that
//! holds it changes a run's checkpoints.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::atomic_file::sync_dir;
use crate::data::fingerprint::file_digest;
use crate::data::{FileDigest, SourceFingerprint, StreamState};
use crate::model::{self, lora, Config};
use crate::recipe::Recipe;
use crate::tokenizer::TextTokenizer;

pub mod lock;
pub use lock::RunLock;

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const LATEST: &str = "latest";
/// Names the checkpoint of the best evaluation (`checkpoint.keep_best`), which pruning keeps.
pub const BEST: &str = "best";

/// Size and sha256 of one checkpoint file.
pub type FileEntry = FileDigest;

/// `trainer_state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// Epochs of the training data consumed, fractional.
    pub epoch: f64,
    /// Where the training stream continues. The stream's shuffle is a pure function of
    /// (recipe seed, epoch), so this is all the randomness a resume needs: the model has no
    /// dropout and the trainer draws no other random numbers.
    pub stream: StreamState,
    /// AdamW's own step count (lower than `step` when fp16 overflow skipped updates).
    pub optimizer_steps: u64,
    pub loss_scaler: LossScaler,
    /// sha256 of the recipe parts a resume must not change (see [`compatibility_hash`]).
    pub recipe_hash: String,
    pub recipe: Recipe,
    /// Last value of every logged metric, for the model card and the user.
    pub metrics: BTreeMap<String, f64>,
    /// Every file of the checkpoint except this one.
    pub files: BTreeMap<String, FileEntry>,
    /// CPU workers per replica the micro-batches' rows were split over (absent from older
    /// checkpoints). Resuming with another count gives the same updates up to float rounding,
    /// not bit-identical ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_workers: Option<usize>,
    /// Every file the training data was read from (empty in older checkpoints and when the
    /// caller trained on data held in memory): a resume over changed files is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<SourceFingerprint>,
    /// The MLflow run the training logs to: a resumed run continues it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlflow: Option<crate::track::RunRef>,
    /// Processes that trained together (absent: one). A resume with another number that
    /// divides batch.replicas continues the same run, equal up to float rounding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
    /// Hugging Face Trainer's fields beside Kiln's own (`epoch` is both), so that scripts
    /// written for HF checkpoints read Kiln's; absent from older checkpoints.
    #[serde(flatten)]
    pub hf: HfTrainerState,
    /// `eval.early_stopping`'s progress: the best value so far and the evaluations since it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStoppingState>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct EarlyStoppingState {
    pub best: f64,
    pub evaluations_without_improvement: u32,
}

/// Points [`BEST`] at `dir`, a checkpoint of the run `lock` holds.
pub fn mark_best(lock: &RunLock, dir: &Path) -> Result<()> {
    let name = dir
        .file_name()
        .with_context(|| format!("{}: not a checkpoint directory", dir.display()))?;
    let pointer = format!("{}\n", name.to_string_lossy());
    crate::atomic_file::write(&lock.dir().join(BEST), pointer.as_bytes())
}

/// `<run dir>/step-<step>`, where [`save`] puts the checkpoint of `step`.
pub fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join(step_dir_name(step))
}

/// The part of `trainer_state.json` HF Trainer writes and tools around it read.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HfTrainerState {
    /// Optimizer steps completed (Kiln's `step`).
    #[serde(default)]
    pub global_step: u64,
    /// The run's optimizer steps.
    #[serde(default)]
    pub max_steps: u64,
    /// Every logged training step (`loss`, `learning_rate`, `grad_norm`) and evaluation
    /// (`eval_<metric>`), each with its `step` and `epoch`, oldest first.
    #[serde(default)]
    pub log_history: Vec<serde_json::Map<String, serde_json::Value>>,
    /// The best evaluation so far and the checkpoint it belongs to (`null` without
    /// `checkpoint.keep_best`, as HF writes them without `metric_for_best_model`).
    #[serde(default)]
    pub best_metric: Option<f64>,
    #[serde(default)]
    pub best_model_checkpoint: Option<String>,
    /// Sequences per device and micro-batch (HF's `per_device_train_batch_size`).
    #[serde(default)]
    pub train_batch_size: usize,
    #[serde(default)]
    pub logging_steps: u64,
    #[serde(default)]
    pub eval_steps: u64,
    #[serde(default)]
    pub save_steps: u64,
}

/// The recipe parts whose change would make a resumed run a different experiment: the model,
/// the tokenizer, the data (and its order, via the seed) and the batch geometry.
pub fn compatibility_hash(recipe: &Recipe) -> String {
    let parts = serde_json::json!({
        "model": recipe.model,
        "tokenizer": recipe.tokenizer,
        "data": recipe.data,
        "batch": recipe.batch,
        "seed": recipe.seed,
    });
    hex::encode(Sha256::digest(parts.to_string().as_bytes()))
}

/// Explains why `new` cannot resume a run started with `old`, or lists the safe changes.
pub fn check_compatible(old: &Recipe, new: &Recipe) -> Result<Vec<String>> {
    let old_json = serde_json::to_value(old)?;
    let new_json = serde_json::to_value(new)?;
    let mut unsafe_changes = Vec::new();
    let mut safe_changes = Vec::new();
    for (key, old_value) in old_json.as_object().expect("recipe is an object") {
        let new_value = &new_json[key];
        if old_value == new_value {
            continue;
        }
        let change = format!("{key}: {old_value} -> {new_value}");
        match key.as_str() {
            "model" | "tokenizer" | "data" | "batch" | "seed" => unsafe_changes.push(change),
            _ => safe_changes.push(change),
        }
    }
    if !unsafe_changes.is_empty() {
        bail!(
            "the recipe differs from the checkpoint's in what a resume must keep (model, tokenizer, \
             data, batch, seed): {}. Start a new run (another `name`) instead",
            unsafe_changes.join("; ")
        );
    }
    Ok(safe_changes)
}

/// The fp16 loss scaler's state as a checkpoint keeps it (`train::precision` gives it its
/// behaviour: `new`, `update`, `resumed`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// Multiplier applied to the loss before backward; 1 when scaling is off.
    pub scale: f64,
    /// Clean (finite-gradient) steps since the scale last changed.
    pub growth_tracker: u64,
    pub growth_interval: u64,
    /// Absent from older checkpoints, which always doubled and halved.
    #[serde(default = "two")]
    pub growth_factor: f64,
    #[serde(default = "half")]
    pub backoff_factor: f64,
    pub enabled: bool,
}

fn two() -> f64 {
    2.0
}
fn half() -> f64 {
    0.5
}

/// What goes into one checkpoint.
pub struct Contents<'a> {
    pub config: &'a Config,
    pub weights: Weights<'a>,
    pub tokenizer: Option<&'a TextTokenizer>,
    pub optimizer: HashMap<String, Tensor>,
    pub state: TrainerState,
    pub base_model: &'a str,
}

/// Writes `step-<N>` atomically into the locked run directory and points `latest` at it. Does not
/// prune: see [`prune`].
pub fn save(lock: &RunLock, contents: Contents) -> Result<PathBuf> {
    let run_dir = lock.dir();
    let step = contents.state.step;
    let name = step_dir_name(step);
    let final_dir = run_dir.join(&name);
    let tmp = run_dir.join(format!(".tmp-{name}"));
    recover(lock)?;
    std::fs::create_dir_all(&tmp)?;
    write_contents(&tmp, contents)
        .with_context(|| format!("writing checkpoint {}", tmp.display()))?;
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to)
            .with_context(|| format!("renaming {} to {}", from.display(), to.display()))
    };
    if final_dir.exists() {
        // A complete checkpoint of this step exists at every moment: the old one is only moved
        // aside (and put back by `recover` after a crash) until the new one has its name.
        let aside = run_dir.join(format!("{REPLACED_PREFIX}{name}"));
        rename(&final_dir, &aside)?;
        sync_dir(run_dir)?;
        rename(&tmp, &final_dir)?;
        sync_dir(run_dir)?;
        std::fs::remove_dir_all(&aside).with_context(|| {
            format!("{}: cannot remove the replaced checkpoint", aside.display())
        })?;
    } else {
        rename(&tmp, &final_dir)?;
    }
    sync_dir(run_dir)?;
    crate::atomic_file::write(&run_dir.join(LATEST), format!("{name}\n").as_bytes())?;
    Ok(final_dir)
}

/// Where a checkpoint being replaced by one of the same step waits until the new one is in place.
const REPLACED_PREFIX: &str = ".old-";

/// Finishes a replacement a crash interrupted: a `.old-step-<N>` whose `step-<N>` is missing is
/// renamed back (it is the complete checkpoint); one whose successor is in place is removed; and
/// partial `.tmp-step-<N>` directories of a write that never finished are removed. Only the lock's
/// holder may: another process's `.tmp-step-<N>` may be a write in progress.
fn recover(lock: &RunLock) -> Result<()> {
    let run_dir = lock.dir();
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let file_name = entry.file_name().to_string_lossy().to_string();
        if file_name.starts_with(".tmp-step-") {
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("{}: cannot remove", entry.path().display()))?;
            continue;
        }
        let Some(name) = file_name.strip_prefix(REPLACED_PREFIX) else {
            continue;
        };
        if !name.starts_with("step-") {
            continue;
        }
        let (aside, target) = (entry.path(), run_dir.join(name));
        if target.exists() {
            std::fs::remove_dir_all(&aside)
                .with_context(|| format!("{}: cannot remove", aside.display()))?;
        } else {
            std::fs::rename(&aside, &target).with_context(|| {
                format!("restoring {} to {}", aside.display(), target.display())
            })?;
            tracing::warn!(
                "{}: restored the checkpoint a crash left moved aside",
                target.display()
            );
        }
    }
    sync_dir(run_dir)
}

/// The trained weights of a checkpoint.
pub enum Weights<'a> {
    /// A whole model, written as a HF model directory in `dtype` (the fp32 masters go with the
    /// optimizer state when that rounds them).
    Model {
        params: &'a HashMap<String, Tensor>,
        dtype: DType,
    },
    /// A LoRA adapter, written as PEFT's directory; `targets` as the recipe resolved them.
    Adapter {
        adapter: lora::Adapter,
        targets: Vec<String>,
    },
}

fn write_contents(dir: &Path, contents: Contents) -> Result<()> {
    let adapter = matches!(contents.weights, Weights::Adapter { .. });
    let card = ModelCard {
        base_model: contents.base_model,
        model_type: contents.config.model_type(),
        adapter,
    };
    let mut optimizer = contents.optimizer;
    match contents.weights {
        Weights::Model { params, dtype } => {
            if dtype != DType::F32 {
                // fp32 masters only: frozen half-precision weights (`train.trainable`) are
                // stored as they are and come back from the base model on resume.
                let masters = (params.iter()).filter(|(name, t)| {
                    t.dtype() == DType::F32 && !crate::ops::quant::QuantizedWeight::is_part(name)
                });
                for (name, tensor) in masters {
                    optimizer.insert(format!("master.{name}"), tensor.clone());
                }
            }
            model::save_model(
                dir,
                contents.config,
                params,
                dtype,
                model::DEFAULT_MAX_SHARD_BYTES,
            )?;
        }
        Weights::Adapter { adapter, targets } => adapter.save(dir, contents.config, &targets)?,
    }
    if let Some(tokenizer) = contents.tokenizer {
        tokenizer.save_to(dir)?;
    }
    candle_core::safetensors::save(&optimizer, dir.join(OPTIMIZER_FILE))?;
    std::fs::write(dir.join("README.md"), card.render(&contents.state)?)?;
    let mut state = contents.state;
    state.files = hash_files(dir)?;
    let path = dir.join(STATE_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(&state)? + "\n")?;
    for entry in std::fs::read_dir(dir)? {
        File::open(entry?.path())?.sync_all()?;
    }
    sync_dir(dir)
}

/// What a checkpoint's `README.md` says about where it comes from.
struct ModelCard<'a> {
    /// A Hub id, a local path or `init:<preset>`.
    base_model: &'a str,
    model_type: &'a str,
    adapter: bool,
}

impl ModelCard<'_> {
    /// The card, its YAML front matter as the Hub reads it: `base_model` (a Hub id only),
    /// `library_name` (`peft` for an adapter, which PEFT loads, else `transformers`) and tags.
    fn render(&self, state: &TrainerState) -> Result<String> {
        let recipe = serde_norway::to_string(&state.recipe)?;
        let metrics: String = state
            .metrics
            .iter()
            .map(|(k, v)| format!("| {k} | {v:.6} |\n"))
            .collect();
        let on_hub = crate::hub::validate_repo_id(self.base_model).is_ok()
            && !Path::new(self.base_model).exists();
        let base = match on_hub {
            true => format!("base_model: {}\n", self.base_model),
            false => String::new(),
        };
        let (library, extra_tags) = match self.adapter {
            true => ("peft", "- lora\n"),
            false => ("transformers", ""),
        };
        Ok(format!(
            "---\n{base}library_name: {library}\ntags:\n- {model_type}\n{extra_tags}- kiln\n---\n\n\
             # {name} (step {step})\n\n\
             Fine-tuned with Kiln {version} from `{base_model}`: {step} optimizer steps, {epoch:.3} \
             epochs of the training data.\n\n## Metrics so far\n\n| metric | value |\n|---|---|\n{metrics}\n\
             ## Recipe\n\n```yaml\n{recipe}```\n",
            model_type = self.model_type,
            base_model = self.base_model,
            name = state.recipe.name,
            step = state.step,
            epoch = state.epoch,
            version = env!("CARGO_PKG_VERSION"),
        ))
    }
}

fn hash_files(dir: &Path) -> Result<BTreeMap<String, FileEntry>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name == STATE_FILE || !entry.file_type()?.is_file() {
            continue;
        }
        files.insert(name, file_digest(&entry.path())?);
    }
    Ok(files)
}

fn step_dir_name(step: u64) -> String {
    format!("step-{step}")
}

/// Reads a checkpoint's state and checks every file it lists (presence, size, sha256).
pub fn verify(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid trainer state", path.display()))?;
    // The state file is the one file the digests cannot cover; its step must at least be the
    // step the directory was written for, or a resume would skip (or repeat) the steps between.
    if let Some(dir_step) = step_of(dir).filter(|&s| s != state.step) {
        bail!(
            "{}: step is {}, but the checkpoint directory is {}",
            path.display(),
            state.step,
            step_dir_name(dir_step)
        );
    }
    for (name, expected) in &state.files {
        let file = dir.join(name);
        if !file.is_file() {
            bail!("{}: file is missing", file.display());
        }
        let found = file_digest(&file)?;
        if found.size != expected.size {
            bail!(
                "{}: size is {} bytes, trainer_state.json says {}",
                file.display(),
                found.size,
                expected.size
            );
        }
        if found.sha256 != expected.sha256 {
            bail!(
                "{}: sha256 does not match trainer_state.json",
                file.display()
            );
        }
    }
    Ok(state)
}

/// The newest checkpoint of a run that passes verification: the one `latest` names, else the
/// next older `step-*` directory. Each rejected checkpoint is reported through `warn`. It only
/// reads: a replacement a crash interrupted is put right by [`RunLock::acquire`], which every rank
/// of a job waits for before it resumes.
pub fn latest_good(
    run_dir: &Path,
    warn: &mut dyn FnMut(String),
) -> Result<(PathBuf, TrainerState)> {
    let mut candidates: Vec<(u64, PathBuf)> = std::fs::read_dir(run_dir)
        .with_context(|| format!("{}: no checkpoints to resume from", run_dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            Some((step, e.path()))
        })
        .collect();
    candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
    // `latest` normally names the newest; a pointer to an older step (newer ones written by a
    // run that crashed before updating it) is honoured by starting there.
    if let Ok(pointer) = std::fs::read_to_string(run_dir.join(LATEST)) {
        let named = run_dir.join(pointer.trim());
        if let Some(i) = candidates.iter().position(|(_, p)| *p == named) {
            candidates.drain(..i);
        }
    }
    let mut rejected = Vec::new();
    for (_, dir) in &candidates {
        match verify(dir) {
            Ok(state) => return Ok((dir.clone(), state)),
            Err(e) => {
                warn(format!(
                    "checkpoint {} failed verification and is skipped: {e:#}",
                    dir.display()
                ));
                rejected.push(format!("{e:#}"));
            }
        }
    }
    // The warnings are printed only once a checkpoint is chosen, so the reasons go here too.
    let reasons = match rejected.is_empty() {
        true => String::new(),
        false => format!(" ({})", rejected.join("; ")),
    };
    bail!(
        "{}: no complete checkpoint to resume from{reasons}",
        run_dir.display()
    )
}

/// Removes step directories beyond `keep_last`, and says what it kept beyond that and why.
///
/// "Newest" follows the run's history, not the step numbers: the checkpoint just written
/// (`current`) comes first, so it always stays, then the steps below it, newest first, and last
/// the higher steps left by a run that was resumed from an earlier step (they would be
/// overwritten as training reaches them). The checkpoints `latest` and `best` name always stay
/// too, and so does any in `in_use` (e.g. a Hub upload still running: pruned by a later call once
/// it is done).
pub fn prune(
    lock: &RunLock,
    keep_last: usize,
    current: &Path,
    in_use: &[PathBuf],
) -> Result<Vec<String>> {
    if keep_last == 0 {
        return Ok(Vec::new());
    }
    let run_dir = lock.dir();
    let current_step = step_of(current).unwrap_or(u64::MAX);
    let pointed = |pointer: &str| {
        std::fs::read_to_string(run_dir.join(pointer))
            .ok()
            .map(|name| run_dir.join(name.trim()))
    };
    let (latest, best) = (pointed(LATEST), pointed(BEST));
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(run_dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((step_of(&e.path())?, e.path())))
        .collect();
    let rank = |step: u64| match step.cmp(&current_step) {
        std::cmp::Ordering::Equal => (0, 0),
        std::cmp::Ordering::Less => (1, u64::MAX - step),
        std::cmp::Ordering::Greater => (2, u64::MAX - step),
    };
    steps.sort_by_key(|(step, _)| rank(*step));
    let mut notes = Vec::new();
    for (_, dir) in steps.into_iter().skip(keep_last) {
        let same = |other: &Path| same_dir(other, &dir);
        if latest.as_deref().is_some_and(same) {
            continue;
        }
        if best.as_deref().is_some_and(same) {
            continue;
        }
        if in_use.iter().any(|d| same(d)) {
            notes.push(format!(
                "keeping {} beyond keep_last {keep_last}: its Hub upload has not finished (it is \
                 pruned once it has)",
                dir.display()
            ));
            continue;
        }
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("{}: cannot prune", dir.display()))?;
    }
    Ok(notes)
}

fn step_of(dir: &Path) -> Option<u64> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("step-")?
        .parse()
        .ok()
}

fn same_dir(a: &Path, b: &Path) -> bool {
    a == b
        || matches!(
            (a.canonicalize(), b.canonicalize()),
            (Ok(x), Ok(y)) if x == y
        )
}
