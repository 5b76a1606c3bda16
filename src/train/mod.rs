//! Training: a [`Trainer`] set up from a recipe and the starting weights
//! ([`Trainer::new`], or [`launch`] from a recipe file) trains to the last checkpoint
//! ([`Trainer::train`]), one optimizer step ([`step`]) at a time.
//!
//! Loss normalisation: every optimizer step minimises the token-weighted mean next-token
//! cross-entropy over its whole global batch, `sum(nll over trained tokens) / trained tokens`.
//! Each micro-batch shard backpropagates `its nll sum / tokens of the global batch`, so the
//! summed gradients are the same however the batch is cut into micro-batches, accumulation steps
//! and replicas, padded or packed. (HF Trainer instead averages per-micro-batch means, which
//! weights tokens of short micro-batches more; with packed, unpadded rows both agree.)

pub mod claim;
pub mod distributed;
mod examples;
pub mod launch;
mod layout;
pub mod memory;
pub mod optimizer;
pub mod precision;
pub mod preference;
mod resume;
mod run_log;
pub mod schedule;
mod selection;
pub mod step;
mod trainable;
mod trainer;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use candle_core::Tensor;

use crate::data::SourceFingerprint;
use crate::model::{Config, Model};
use crate::tokenizer::TextTokenizer;
use crate::track::Progress;

use distributed::Collective;
pub use examples::{EvalData, TrainData};
pub use layout::BatchLayout;
pub use optimizer::AdamW;
pub use precision::{LossScaler, StepVerdict};
pub use schedule::Schedule;
pub use trainable::{initial_dtype, InitialWeights};
pub use trainer::Trainer;

/// The model a run starts from.
pub struct ModelInit {
    pub config: Config,
    /// Every parameter by HF name, any dtype (converted to fp32 master weights).
    pub params: HashMap<String, Tensor>,
    /// Saved into every checkpoint so that it is a complete HF model directory.
    pub tokenizer: Option<TextTokenizer>,
    /// Where the weights came from (a path, a Hub id or `init:<preset>`), for the model card.
    pub base_model: String,
}

pub enum Resume {
    /// The newest checkpoint of this run that passes verification.
    Latest,
    /// This checkpoint directory.
    Dir(PathBuf),
}

/// Metrics from the caller's evaluator (e.g. `("accuracy", 0.81)`), logged as `eval/<name>`.
pub type EvalHook<'a> = Box<dyn FnMut(&Model, &EvalPoint) -> Result<Vec<(String, f64)>> + 'a>;
/// Called with each completed checkpoint directory and its step (e.g. to upload it); returns the
/// checkpoint directories it still uses (e.g. uploads not finished), which pruning must keep.
pub type CheckpointHook<'a> = Box<dyn FnMut(&Path, u64) -> Result<Vec<PathBuf>> + 'a>;

/// The weights an [`EvalHook`] is handed, for its report.
pub struct EvalPoint {
    /// Optimizer steps completed.
    pub step: u64,
    /// The eval split's loss just logged as `eval/loss` (none without eval sequences).
    pub loss: Option<crate::eval::perplexity::LossTotals>,
    /// sha256 over the weight files a checkpoint of these weights holds (what
    /// `eval::mnli::weights_sha256` gives for that checkpoint's directory).
    pub weights_sha256: String,
}

#[derive(Default)]
pub struct TrainOptions<'a> {
    /// No progress bar; plain log lines.
    pub quiet: bool,
    /// Where the run's lines go (default: a new [`Progress`] honouring `quiet`).
    pub progress: Option<Progress>,
    pub resume: Option<Resume>,
    /// When set (by the caller, or by SIGINT/SIGTERM if `handle_signals`), the run finishes the
    /// current step, saves a checkpoint and returns with `stopped_early`.
    pub stop: Option<Arc<AtomicBool>>,
    pub handle_signals: bool,
    /// CPU threads for the whole run, shared out among replicas (default: all cores).
    pub threads: Option<usize>,
    pub eval_hook: Option<EvalHook<'a>>,
    pub checkpoint_hook: Option<CheckpointHook<'a>>,
    /// The files the training data was read from, recorded in every checkpoint; a resume whose
    /// files differ from the checkpoint's is refused unless `allow_data_change`. Empty when the
    /// caller trains on data it holds in memory (nothing to compare).
    pub data_fingerprint: Vec<SourceFingerprint>,
    pub allow_data_change: bool,
    /// Start afresh over an earlier run of this name, deleting its checkpoints and logs once
    /// training is about to start (without it such a start is refused; see [`claim`]).
    pub overwrite: bool,
    /// The job's other processes (`None`: this process alone). Every rank trains its share of
    /// `batch.replicas`; rank 0 alone writes checkpoints, metrics and tracking, and evaluates.
    pub collective: Option<&'a dyn Collective>,
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Last completed optimizer step.
    pub step: u64,
    pub total_steps: u64,
    /// True when a stop request or `eval.early_stopping` ended the run before `total_steps`.
    pub stopped_early: bool,
    /// Training loss of each step this call ran (a resumed run starts after the checkpoint).
    pub losses: Vec<f64>,
    /// Pre-clip gradient norm of each step this call ran.
    pub grad_norms: Vec<f64>,
    /// Wall-clock seconds of each step this call ran (forward, backward and update; not
    /// evaluation or checkpointing).
    pub step_seconds: Vec<f64>,
    /// Metrics of the last evaluation.
    pub eval: BTreeMap<String, f64>,
    pub last_checkpoint: Option<PathBuf>,
    pub run_dir: PathBuf,
    pub checkpoint_dir: PathBuf,
}
