//! The training loop: one readable function, [`run`], from initial weights to the last checkpoint.
//!
//! Loss normalisation: every optimizer step minimises the token-weighted mean next-token
//! cross-entropy over its whole global batch, `sum(nll over trained tokens) / trained tokens`.
//! Each micro-batch shard backpropagates `its nll sum / tokens of the global batch`, so the
//! summed gradients are the same however the batch is cut into micro-batches, accumulation steps
//! and replicas, padded or packed. (HF Trainer instead averages per-micro-batch means, which
//! weights tokens of short micro-batches more; with packed, unpadded rows both agree.)

pub mod claim;
pub mod distributed;
pub mod launch;
pub mod memory;
pub mod optimizer;
pub mod precision;
pub mod schedule;
mod selection;
pub mod step;
mod trainable;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use crate::checkpoint::{self, TrainerState};
use crate::data::fingerprint::first_difference;
use crate::data::{Sequence, SequenceStream, SourceFingerprint};
use crate::model::{self, Config, Model};
use crate::ops;
use crate::recipe::{Compute, Recipe};
use crate::tokenizer::TextTokenizer;
use crate::track::{Progress, RunStatus, Tracker, TrackerStart};

use claim::{RunClaim, Start};
use distributed::{Collective, SingleProcess};
use memory::MemoryEstimate;
pub use optimizer::AdamW;
pub use precision::{LossScaler, StepVerdict};
pub use schedule::Schedule;
use selection::EvalWatch;
use step::{train_step, StepOutcome, StepSetup, Workers};
pub use trainable::initial_dtype;
use trainable::Trainable;

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
    /// Receives the run's claim (rank 0), for a caller that still changes the run's checkpoints
    /// after `run` returns (`kiln train` prunes once its Hub uploads are done); without it the
    /// claim, and the run's lock, end with `run`.
    pub run_claim: Option<&'a mut Option<RunClaim>>,
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

/// Trains `init` on `train` as `recipe` says; see the module docs for the loss.
pub fn run(
    recipe: &Recipe,
    init: ModelInit,
    mut train: SequenceStream,
    eval: Option<Vec<Sequence>>,
    mut options: TrainOptions,
) -> Result<TrainSummary> {
    let device = model::parse_device(&recipe.device)?;
    let collective = options.collective.unwrap_or(&SingleProcess);
    let (rank, ranks) = (collective.rank(), collective.size());
    // Rank 0 writes and reports; the others train and follow.
    let writer = rank == 0;
    model::keep_freed_memory();
    if let Some(note) = ops::training_attention_note(&device) {
        println!("{note}");
    }
    let compute_dtype = recipe.precision.compute.dtype();
    let weights_dtype = recipe.checkpoint.dtype.unwrap_or(Compute::Fp32).dtype();
    let total_steps = check_geometry(recipe, &train, ranks)?;
    let schedule = Schedule::new(&recipe.schedule, recipe.optimizer.lr, total_steps);
    let run_checkpoints = recipe.checkpoint.dir.join(&recipe.name);

    let trainable = Trainable::new(recipe, &init.config, init.params, &init.base_model, &device)?;
    let params = &trainable.params;
    let mut adamw = match recipe.distributed.shard_optimizer {
        true => AdamW::sharded(&recipe.optimizer, params, rank, ranks)?,
        false => AdamW::new(&recipe.optimizer, params)?,
    };
    let mut scaler = LossScaler::new(&recipe.precision);
    // Rank 0 alone writes the run, so it alone locks it, once the recipe has passed its checks.
    let start = Start::new(options.resume.is_some(), options.overwrite)?;
    let mut own_claim = None;
    let claim_slot = options.run_claim.take().unwrap_or(&mut own_claim);
    if writer {
        *claim_slot = Some(RunClaim::take(recipe, start)?);
    }
    if ranks > 1 {
        // Taking the lock finishes what a crash left in the checkpoints, which the other ranks
        // are about to read.
        collective.barrier("rank 0's locking of the run")?;
    }
    let claim = claim_slot.as_ref();
    let resumed = (options.resume.as_ref())
        .map(|resume| {
            let model = (&init.config, &trainable, &device);
            let state = (&mut adamw, &mut scaler, &mut train);
            resume_from(
                resume,
                recipe,
                &run_checkpoints,
                &options,
                model,
                state,
                ranks,
            )
        })
        .transpose()?;
    let start_step = resumed.as_ref().map_or(0, |r| r.state.step);
    let mut watch = EvalWatch::new(recipe, resumed.as_ref().map(|r| &r.state));
    // The newest checkpoint known to be complete, named when training has to stop.
    let mut last_good: Option<PathBuf> = resumed.as_ref().map(|r| r.dir.clone());
    let resumed_workers = resumed.as_ref().and_then(|r| r.state.cpu_workers);
    let threads = options
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let memory =
        MemoryEstimate::new(recipe, &init.config, threads).per_rank(ranks, adamw.is_sharded());
    println!("{}", memory.table());
    if let Some(replaced) = claim
        .map(RunClaim::replace_earlier_run)
        .transpose()?
        .flatten()
    {
        println!("overwrite: deleted the earlier run ({replaced})");
    }
    if ranks > 1 {
        let sharding = match adamw.is_sharded() {
            true => "optimizer state sharded (ZeRO-1)",
            false => "optimizer state replicated",
        };
        println!(
            "distributed: {ranks} ranks over {}, {} replica(s) each, {sharding}; rank 0 writes",
            collective.engine(),
            recipe.batch.replicas / ranks
        );
    }
    let mut log = RunLog::open(
        recipe,
        (start_step, total_steps),
        resumed,
        options.quiet,
        &memory,
        writer,
    )?;

    let stop = options.stop.clone().unwrap_or_default();
    let _signals = match options.handle_signals {
        true => Some(SignalGuard::install(&stop)?),
        false => None,
    };
    let workers = workers(threads, recipe, ranks, params, &device, resumed_workers)?;
    let pad_id = init.tokenizer.as_ref().map_or(0, |t| t.pad_id());
    let setup = StepSetup {
        config: &init.config,
        compute_dtype,
        device: &device,
        micro: recipe.batch.micro,
        replicas: recipe.batch.replicas,
        pad_id,
        grad_clip: recipe.optimizer.grad_clip,
        workers: &workers,
        dropout: dropout_rates(recipe, &init.config),
        seed: recipe.seed,
        activation_checkpointing: recipe.memory.activation_checkpointing,
    };
    // Rank 0's only: the other ranks write no checkpoints.
    let checkpoints = claim.map(|claim| CheckpointTarget {
        lock: claim.lock(),
        recipe,
        config: &init.config,
        tokenizer: init.tokenizer.as_ref(),
        base_model: &init.base_model,
        weights_dtype,
        cpu_workers: workers.per_replica,
        data: &options.data_fingerprint,
        world_size: ranks,
    });

    for step in start_step + 1..=total_steps {
        let started = Instant::now();
        // The schedule follows applied updates: a step fp16 skipped on overflow does not advance
        // it (as HF Trainer / accelerate skip `scheduler.step()` then).
        let lr = schedule.lr_at(adamw.step + 1);
        let sequences = train.next_batch(recipe.batch.global);
        let outcome = train_step(
            &setup,
            collective,
            &trainable,
            (&mut adamw, &mut scaler),
            &sequences,
            (step, lr, stop.load(Ordering::SeqCst)),
        )
        .with_context(|| format!("step {step}"))?;
        if !outcome.applied {
            ensure!(
                scaler.enabled,
                non_finite_stop(step, &outcome, recipe, last_good.as_deref())
            );
            log.progress.println(&format!(
                "step {step}: non-finite gradients, update skipped, loss scale now {}",
                scaler.scale
            ));
        }
        let tokens = sequences.iter().map(Sequence::len).sum();
        let scalars = [("train/lr", lr), ("train/loss_scale", scaler.scale)];
        let epoch = train.epoch_progress();
        log.step(step, &outcome, started.elapsed(), tokens, epoch, &scalars)?;

        let last = step == total_steps;
        let evaluating = (recipe.eval.every > 0 && step % recipe.eval.every == 0) || last;
        let mut evaluation = None;
        if evaluating && writer {
            let results = evaluate(
                &init.config,
                &trainable,
                (compute_dtype, weights_dtype),
                &device,
                eval.as_deref(),
                recipe.eval.batch_size,
                pad_id,
                step,
                options.eval_hook.as_mut(),
            )?
            .unwrap_or_default();
            log.eval(step, results.clone())?;
            evaluation = Some(results);
        }
        let mut stop_early = match &evaluation {
            Some(results) => watch.evaluated(step, results)?,
            None => false,
        };
        if ranks > 1 && evaluating && watch.stops_early() {
            // Rank 0 alone evaluates: its decision is every rank's.
            let mut decision = [if stop_early { 1.0 } else { 0.0 }];
            collective.all_reduce_sum_f64(&mut decision, "the early-stopping decision")?;
            stop_early = decision[0] > 0.0;
        }
        log.flush(step)?;

        // Alone, a stop request is seen as late as possible; together, the ranks stop after
        // the step they agreed on at its check-in.
        let stop_requested = match ranks {
            1 => stop.load(Ordering::SeqCst),
            _ => outcome.stop_requested,
        };
        let stopping = (stop_requested || stop_early) && !last;
        let every = recipe.checkpoint.every;
        let saving = (every > 0 && step % every == 0) || last || stopping;
        if saving {
            // Every rank sends its share of a sharded optimizer state; rank 0 writes.
            let optimizer = adamw.state_tensors(params, collective)?;
            if let Some(checkpoints) = &checkpoints {
                let best = match &evaluation {
                    Some(results) => {
                        let dir = checkpoint::step_dir(checkpoints.lock.dir(), step);
                        watch.saving(&dir, results)?
                    }
                    None => false,
                };
                let state = (&adamw, &scaler, &train);
                let dir = checkpoints.save(step, &trainable, state, optimizer, &log, &watch)?;
                if best {
                    checkpoint::mark_best(checkpoints.lock, &dir)?;
                }
                let hook = options.checkpoint_hook.as_mut();
                checkpoints.after_save(&dir, step, hook, &mut log)?;
                last_good = Some(dir);
            }
        }
        if ranks > 1 && (saving || evaluating) {
            // No rank goes on (or ends) before rank 0's checkpoint is complete.
            let what = format!("the evaluation and checkpoint of step {step}");
            collective.barrier(&what)?;
        }
        if stopping {
            log.progress.finish();
            report_rank_memory(collective, &adamw);
            log.summary.stopped_early = true;
            if stop_early {
                println!("stopped early at step {step} of {total_steps} (eval.early_stopping)");
                return log.finish(RunStatus::Finished);
            }
            println!(
                "stopped at step {step} of {total_steps} on request; resume with --resume latest"
            );
            return log.finish(RunStatus::Stopped);
        }
    }
    report_rank_memory(collective, &adamw);
    log.finish(RunStatus::Finished)
}

/// Each rank's measured peak and optimizer share, on its standard error (the other ranks'
/// standard output is quiet): what ZeRO-1 saves is seen per rank.
fn report_rank_memory(collective: &dyn Collective, adamw: &AdamW) {
    if collective.size() == 1 {
        return;
    }
    let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;
    let peak = crate::track::peak_rss_bytes()
        .map_or("unknown".to_string(), |b| format!("{:.0} MiB", mib(b)));
    eprintln!(
        "rank {} of {}: peak RSS {peak}, optimizer state {:.1} MiB{}",
        collective.rank(),
        collective.size(),
        mib(adamw.state_bytes()),
        if adamw.is_sharded() {
            " (its ZeRO-1 share)"
        } else {
            ""
        }
    );
}

/// The dropout training applies: the model config's, with the recipe's `model.dropout` in its
/// place.
fn dropout_rates(recipe: &Recipe, config: &Config) -> ops::DropoutRates {
    let rates = config.dropout_rates();
    let rates = match &recipe.model.dropout {
        Some(spec) => spec.over(rates),
        None => rates,
    };
    ops::DropoutRates {
        lora: recipe.lora.as_ref().map_or(0.0, |lora| lora.dropout),
        ..rates
    }
}

/// The run's worker threads: `threads` (default: all cores) shared out over the replicas, each
/// replica's rows split over workers (see [`ops::workers_per_replica`]). A resume whose checkpoint
/// split rows over another number of workers is told it is no longer bit-exact.
fn workers(
    threads: usize,
    recipe: &Recipe,
    ranks: usize,
    params: &[(String, Var)],
    device: &Device,
    resumed_workers: Option<usize>,
) -> Result<Workers> {
    // This process's replicas.
    let replicas = recipe.batch.replicas / ranks;
    let threads_per_replica = (threads / replicas).max(1);
    let gradient_bytes: usize = params.iter().map(|(_, v)| v.elem_count() * 4).sum();
    let workers = ops::workers_per_replica(device, threads_per_replica, gradient_bytes);
    if let Some(before) = resumed_workers.filter(|&before| before != workers) {
        println!(
            "resume: the micro-batch rows were split over {before} CPU workers per replica and now \
             over {workers} ({threads} threads): updates stay the same up to float rounding but are \
             no longer bit-identical to an uninterrupted run (use --threads to match)"
        );
    }
    Workers::new(threads_per_replica, replicas, workers)
}

/// Where a run's numbers go: TensorBoard and metrics.jsonl, the progress display, the summary
/// returned to the caller, and the last value of every metric (for checkpoints' model cards).
struct RunLog {
    /// Rank 0's only: the other ranks of a job write nothing.
    tracker: Option<Tracker>,
    progress: Progress,
    metrics: BTreeMap<String, f64>,
    /// HF Trainer's `log_history`: every logged step and evaluation, carried across resumes.
    history: Vec<serde_json::Map<String, serde_json::Value>>,
    summary: TrainSummary,
    log_every: u64,
}

impl RunLog {
    /// Opens the run's tracking directory (`<tracking.log_dir>/<name>`); a resumed run continues
    /// its metrics from the checkpoint's.
    fn open(
        recipe: &Recipe,
        (start_step, total_steps): (u64, u64),
        resumed: Option<Resumed>,
        quiet: bool,
        memory: &MemoryEstimate,
        writer: bool,
    ) -> Result<Self> {
        let run_dir = recipe.tracking.log_dir.join(&recipe.name);
        let (metrics, history, resumed) = match resumed {
            Some(r) => (
                r.state.metrics,
                r.state.hf.log_history,
                Some((start_step, r.state.mlflow)),
            ),
            None => (BTreeMap::new(), Vec::new(), None),
        };
        let start = TrackerStart {
            recipe,
            device: &recipe.device,
            total_steps,
            resumed,
            memory_estimate: memory.terms(),
        };
        Ok(Self {
            tracker: writer.then(|| Tracker::open(&run_dir, start)).transpose()?,
            progress: Progress::new(total_steps, start_step, quiet),
            metrics,
            history,
            log_every: recipe.tracking.log_every.max(1),
            summary: TrainSummary {
                step: start_step,
                total_steps,
                stopped_early: false,
                losses: Vec::new(),
                grad_norms: Vec::new(),
                step_seconds: Vec::new(),
                eval: BTreeMap::new(),
                last_checkpoint: None,
                run_dir,
                checkpoint_dir: recipe.checkpoint.dir.join(&recipe.name),
            },
        })
    }

    /// A finished training step; `extra` are scalars the step itself does not know (lr, scale).
    fn step(
        &mut self,
        step: u64,
        outcome: &StepOutcome,
        elapsed: std::time::Duration,
        tokens: usize,
        epoch: f64,
        extra: &[(&str, f64)],
    ) -> Result<()> {
        let elapsed = elapsed.as_secs_f64();
        let tokens_per_sec = tokens as f64 / elapsed.max(1e-9);
        let summary = &mut self.summary;
        summary.losses.push(outcome.loss);
        summary.grad_norms.push(outcome.grad_norm);
        summary.step_seconds.push(elapsed);
        summary.step = step;
        let log_now = step.is_multiple_of(self.log_every) || step == summary.total_steps;
        let scalars = [
            ("train/loss", outcome.loss),
            ("train/grad_norm", outcome.grad_norm),
            ("train/tokens_per_sec", tokens_per_sec),
            ("train/epoch", epoch),
        ];
        for &(tag, value) in scalars.iter().chain(extra) {
            if let Some(tracker) = self.tracker.as_mut().filter(|_| log_now) {
                tracker.scalar(tag, step, value)?;
            }
            self.metrics.insert(tag.to_string(), value);
        }
        let lr = self.metrics.get("train/lr").copied().unwrap_or_default();
        if log_now {
            self.history.push(history_entry(
                step,
                epoch,
                [
                    ("loss", outcome.loss),
                    ("grad_norm", outcome.grad_norm),
                    ("learning_rate", lr),
                ],
            ));
        }
        let total = self.summary.total_steps;
        self.progress
            .step(step, total, outcome.loss, lr, tokens_per_sec, log_now);
        Ok(())
    }

    /// Evaluation results, logged as `eval/<name>`.
    fn eval(&mut self, step: u64, results: Vec<(String, f64)>) -> Result<()> {
        if !results.is_empty() {
            let epoch = self.metrics.get("train/epoch").copied().unwrap_or_default();
            let named: Vec<(String, f64)> = results
                .iter()
                .map(|(name, value)| (format!("eval_{name}"), *value))
                .collect();
            self.history.push(history_entry(
                step,
                epoch,
                named.iter().map(|(n, v)| (n.as_str(), *v)),
            ));
            let line: Vec<String> = results.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
            self.progress
                .println(&format!("step {step}: {}", line.join(", ")));
        }
        for (name, value) in results {
            let tag = format!("eval/{name}");
            if let Some(tracker) = self.tracker.as_mut() {
                tracker.scalar(&tag, step, value)?;
            }
            self.metrics.insert(tag, value);
            self.summary.eval.insert(name, value);
        }
        if let Some(tracker) = &self.tracker {
            // The evaluator's reports (MNLI: report, confusion matrix) go to MLflow as well.
            tracker.artifacts(&format!("eval/step-{step}"));
        }
        Ok(())
    }

    /// Makes the step's records visible (rank 0).
    fn flush(&mut self, step: u64) -> Result<()> {
        match self.tracker.as_mut() {
            Some(tracker) => tracker.flush(step),
            None => Ok(()),
        }
    }

    /// Ends the run's tracking (`run.json`, HParams, MLflow) with the training curves and the
    /// last checkpoint's model card as artifacts.
    fn finish(self, status: RunStatus) -> Result<TrainSummary> {
        self.progress.finish();
        let Some(tracker) = &self.tracker else {
            return Ok(self.summary);
        };
        let run_dir = tracker.run_dir().to_path_buf();
        match crate::track::plot::write_curves(&run_dir) {
            Ok(Some(curves)) => tracker.artifact(&curves, "curves.svg"),
            Ok(None) => {}
            Err(e) => println!("warning: {}: curves not drawn: {e:#}", run_dir.display()),
        }
        if let Some(card) = (self.summary.last_checkpoint.as_ref()).map(|c| c.join("README.md")) {
            if card.is_file() {
                tracker.artifact(&card, "model/README.md");
            }
        }
        let RunLog {
            tracker, summary, ..
        } = self;
        if let Some(tracker) = tracker {
            tracker.finish(status)?;
        }
        Ok(summary)
    }
}

/// One entry of HF Trainer's `log_history`: the values (HF's names), then `epoch` and `step`.
fn history_entry<'n>(
    step: u64,
    epoch: f64,
    values: impl IntoIterator<Item = (&'n str, f64)>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut entry: serde_json::Map<String, serde_json::Value> = values
        .into_iter()
        .map(|(name, value)| (name.to_string(), serde_json::json!(value)))
        .collect();
    entry.insert("epoch".into(), serde_json::json!(epoch));
    entry.insert("step".into(), serde_json::json!(step));
    entry
}

/// What every checkpoint of a run shares.
struct CheckpointTarget<'a> {
    /// `<checkpoint.dir>/<name>`, locked for this process.
    lock: &'a checkpoint::RunLock,
    recipe: &'a Recipe,
    config: &'a Config,
    tokenizer: Option<&'a TextTokenizer>,
    base_model: &'a str,
    weights_dtype: DType,
    cpu_workers: usize,
    data: &'a [SourceFingerprint],
    world_size: usize,
}

impl CheckpointTarget<'_> {
    /// Writes `step-<step>` (see [`checkpoint::save`]); returns its directory.
    fn save(
        &self,
        step: u64,
        trainable: &Trainable,
        (adamw, scaler, stream): (&AdamW, &LossScaler, &SequenceStream),
        optimizer: HashMap<String, Tensor>,
        log: &RunLog,
        watch: &EvalWatch,
    ) -> Result<PathBuf> {
        let (best_metric, best_model_checkpoint, early_stopping) = watch.record();
        let (metrics, mlflow) = (
            &log.metrics,
            log.tracker.as_ref().and_then(Tracker::mlflow_run),
        );
        let recipe = self.recipe;
        let state = TrainerState {
            step,
            epoch: stream.epoch_progress(),
            stream: stream.state(),
            optimizer_steps: adamw.step,
            loss_scaler: *scaler,
            recipe_hash: checkpoint::compatibility_hash(self.recipe),
            recipe: self.recipe.clone(),
            metrics: metrics.clone(),
            files: BTreeMap::new(),
            cpu_workers: Some(self.cpu_workers),
            data: self.data.to_vec(),
            mlflow: mlflow.cloned(),
            world_size: Some(self.world_size),
            hf: checkpoint::HfTrainerState {
                global_step: step,
                max_steps: log.summary.total_steps,
                log_history: log.history.clone(),
                best_metric,
                best_model_checkpoint,
                train_batch_size: recipe.batch.micro,
                logging_steps: recipe.tracking.log_every.max(1),
                eval_steps: recipe.eval.every,
                save_steps: recipe.checkpoint.every,
            },
            early_stopping,
        };
        trainable.with_checkpoint_weights(self.weights_dtype, |weights| {
            checkpoint::save(
                self.lock,
                checkpoint::Contents {
                    config: self.config,
                    weights,
                    tokenizer: self.tokenizer,
                    optimizer,
                    state,
                    base_model: self.base_model,
                },
            )
        })
    }

    /// Reports the checkpoint `dir` just saved at `step`, hands it to the caller's `hook`, and
    /// prunes the run's older checkpoints, keeping what the hook still uses.
    fn after_save(
        &self,
        dir: &Path,
        step: u64,
        hook: Option<&mut CheckpointHook>,
        log: &mut RunLog,
    ) -> Result<()> {
        log.progress
            .println(&format!("saved checkpoint {}", dir.display()));
        let in_use = match hook {
            Some(hook) => {
                hook(dir, step).with_context(|| format!("checkpoint hook for {}", dir.display()))?
            }
            None => Vec::new(),
        };
        let keep_last = self.recipe.checkpoint.keep_last;
        for note in checkpoint::prune(self.lock, keep_last, dir, &in_use)? {
            log.progress.println(&note);
        }
        log.summary.last_checkpoint = Some(dir.to_path_buf());
        match log.tracker.as_mut() {
            Some(tracker) => tracker.heartbeat(),
            None => Ok(()),
        }
    }
}

/// Checks the batch geometry against the data and returns the run's optimizer steps.
fn check_geometry(recipe: &Recipe, train: &SequenceStream, ranks: usize) -> Result<u64> {
    let batch = &recipe.batch;
    ensure!(
        batch.micro > 0 && batch.replicas > 0,
        "batch.micro and batch.replicas must be positive"
    );
    ensure!(
        batch.replicas.is_multiple_of(ranks),
        "batch.replicas ({}) must be a multiple of the number of ranks ({ranks}): it counts the \
         replicas of the whole job, and each rank runs batch.replicas / ranks of them (set \
         batch.replicas to {}, say, and batch.global to a multiple of batch.micro × that)",
        batch.replicas,
        ranks * batch.replicas.div_ceil(ranks)
    );
    let per_micro_step = batch.micro * batch.replicas;
    ensure!(
        batch.global > 0 && batch.global.is_multiple_of(per_micro_step),
        "batch.global ({}) must be a positive multiple of batch.micro × batch.replicas ({} × {})",
        batch.global,
        batch.micro,
        batch.replicas
    );
    ensure!(
        train.sequences_per_epoch() > 0,
        "the training data has no sequences"
    );
    let total_steps = recipe.total_steps(train.sequences_per_epoch());
    ensure!(
        total_steps > 0,
        "the recipe needs a positive `steps` or `epochs`"
    );
    Ok(total_steps)
}

/// The checkpoint a run resumed from.
struct Resumed {
    dir: PathBuf,
    state: TrainerState,
}

/// Finds and verifies the checkpoint, checks that the recipe and data may continue it, and
/// restores the weights, the optimizer, the loss scaler and the data position from it.
fn resume_from(
    resume: &Resume,
    recipe: &Recipe,
    run_checkpoints: &Path,
    options: &TrainOptions,
    (config, trainable, device): (&Config, &Trainable, &Device),
    (adamw, scaler, train): (&mut AdamW, &mut LossScaler, &mut SequenceStream),
    ranks: usize,
) -> Result<Resumed> {
    let mut warnings = Vec::new();
    let (dir, state) = match resume {
        Resume::Latest => checkpoint::latest_good(run_checkpoints, &mut |w| warnings.push(w))?,
        Resume::Dir(dir) => (dir.clone(), checkpoint::verify(dir)?),
    };
    for w in warnings {
        eprintln!("warning: {w}");
    }
    let changes = checkpoint::check_compatible(&state.recipe, recipe)
        .with_context(|| format!("cannot resume from {}", dir.display()))?;
    for change in changes {
        println!("resume: recipe change allowed: {change}");
    }
    check_same_data(&dir, &state, options)?;
    let saved_ranks = state.world_size.unwrap_or(1);
    if saved_ranks != ranks {
        // The data position, the RNG and the optimizer state are the job's, not a rank's, so
        // any number of ranks that divides batch.replicas can continue.
        println!(
            "resume: the checkpoint was written by {saved_ranks} rank(s), this job has {ranks}: \
             the same replicas train the same rows, but the gradients are summed in another \
             order, so updates equal an uninterrupted run's up to float rounding"
        );
    }
    restore(&dir, &state, config, trainable, adamw, device)?;
    train.restore(state.stream);
    let (resumed_scaler, note) = LossScaler::resumed(state.loss_scaler, &recipe.precision);
    *scaler = resumed_scaler;
    if let Some(note) = note {
        println!("{note}");
    }
    println!("resumed from {} at step {}", dir.display(), state.step);
    Ok(Resumed { dir, state })
}

/// Refuses a resume whose training files differ from those the checkpoint recorded, unless the
/// caller allows it (then says so).
fn check_same_data(dir: &Path, state: &TrainerState, options: &TrainOptions) -> Result<()> {
    let now = &options.data_fingerprint;
    if now.is_empty() {
        return Ok(());
    }
    if state.data.is_empty() {
        println!(
            "resume: {} records no fingerprint of its training data (an older checkpoint), so a \
             change of the data cannot be detected",
            dir.display()
        );
        return Ok(());
    }
    let Some(difference) = first_difference(&state.data, now) else {
        return Ok(());
    };
    if options.allow_data_change {
        println!("resume: the training data changed, continuing as --allow-data-change asks: {difference}");
        return Ok(());
    }
    bail!(
        "cannot resume from {}: {difference}. The saved data position would continue over \
         other examples; start a new run (another `name`), or pass --allow-data-change to resume \
         over the changed data anyway",
        dir.display()
    )
}

/// Why a run with unscaled (fp32/bf16) compute stops at non-finite gradients instead of skipping
/// the step: without a loss scale to lower, the next step would meet the same weights and
/// overflow again, skipping forever.
fn non_finite_stop(
    step: u64,
    outcome: &StepOutcome,
    recipe: &Recipe,
    last_good: Option<&Path>,
) -> String {
    let (loss, grad_norm) = (outcome.loss, outcome.grad_norm);
    let compute = recipe.precision.compute.name();
    let checkpoint = match last_good {
        Some(dir) => format!(
            "the last good checkpoint is {} (`--resume latest` continues from it)",
            dir.display()
        ),
        None => "no checkpoint was written before it".to_string(),
    };
    format!(
        "step {step}: the gradients are not finite (loss {loss}, gradient norm {grad_norm}) with \
         {compute} compute, so the update was not applied and training stopped; {checkpoint}. \
         Lower optimizer.lr, keep optimizer.grad_clip on, or check the data of this step"
    )
}

/// SIGINT/SIGTERM/SIGUSR1 handlers for the duration of a run: the first signal sets the stop
/// flag (the run saves and returns); a second SIGINT or SIGTERM while it is set exits at once,
/// as users expect from a repeated Ctrl-C.
struct SignalGuard(Vec<signal_hook::SigId>);

impl SignalGuard {
    fn install(stop: &Arc<AtomicBool>) -> Result<Self> {
        let mut ids = Vec::new();
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            // Registered first, so it sees the flag before this signal's own handler sets it.
            ids.push(signal_hook::flag::register_conditional_shutdown(
                signal,
                130,
                stop.clone(),
            )?);
            ids.push(signal_hook::flag::register(signal, stop.clone())?);
        }
        // SIGUSR1 only ever asks for the stop: MPI launchers forward it to every rank (and
        // `scancel --signal=USR1` sends it), with none of the SIGKILL deadline they put on
        // SIGINT/SIGTERM.
        ids.push(signal_hook::flag::register(
            signal_hook::consts::SIGUSR1,
            stop.clone(),
        )?);
        Ok(Self(ids))
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for id in self.0.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}

fn restore(
    dir: &Path,
    state: &TrainerState,
    config: &Config,
    trainable: &Trainable,
    adamw: &mut AdamW,
    device: &Device,
) -> Result<()> {
    // An adapter checkpoint has no config.json: its tensors' shapes are checked against the
    // model's layers instead.
    let saved_config = match trainable.is_lora() {
        true => config.clone(),
        false => model::load_config(dir)?,
    };
    ensure!(
        saved_config.parameter_shapes() == config.parameter_shapes(),
        "{}: the checkpoint's model ({} with {} layers of width {}, vocabulary {}) differs from \
         the recipe's ({} with {} layers of width {}, vocabulary {})",
        dir.display(),
        saved_config.model_type(),
        saved_config.n_layer(),
        saved_config.hidden_size(),
        saved_config.vocab_size(),
        config.model_type(),
        config.n_layer(),
        config.hidden_size(),
        config.vocab_size(),
    );
    let optimizer_path = dir.join(checkpoint::OPTIMIZER_FILE);
    let mut optimizer_state = candle_core::safetensors::load(&optimizer_path, device)
        .with_context(|| format!("{}: cannot read", optimizer_path.display()))?;
    let masters: HashMap<String, Tensor> = optimizer_state
        .keys()
        .filter(|k| k.starts_with("master."))
        .cloned()
        .collect::<Vec<_>>()
        .into_iter()
        .filter_map(|k| {
            optimizer_state
                .remove(&k)
                .map(|t| (k["master.".len()..].to_string(), t))
        })
        .collect();
    trainable.restore_params(dir, config, masters, device)?;
    adamw.load_state(
        &trainable.params,
        optimizer_state,
        state.optimizer_steps,
        &optimizer_path,
    )
}

/// Eval loss (token-weighted mean over `sequences`) plus whatever the hook reports; `None` when
/// there is neither.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    config: &Config,
    trainable: &Trainable,
    (dtype, weights_dtype): (DType, DType),
    device: &Device,
    sequences: Option<&[Sequence]>,
    batch_size: usize,
    pad_id: u32,
    step: u64,
    hook: Option<&mut EvalHook>,
) -> Result<Option<Vec<(String, f64)>>> {
    let sequences = sequences.filter(|s| !s.is_empty());
    if sequences.is_none() && hook.is_none() {
        return Ok(None);
    }
    let tensors = trainable.model_tensors(true)?;
    let model = model::model_from_parameters(config, &tensors, dtype, device)?;
    let mut results = Vec::new();
    let mut loss = None;
    if let Some(sequences) = sequences {
        let totals =
            crate::eval::perplexity::loss_totals(&model, sequences, batch_size, pad_id, device)?;
        if totals.tokens > 0 {
            results.push(("loss".to_string(), totals.mean()));
            loss = Some(totals);
        }
    }
    if let Some(hook) = hook {
        let point = EvalPoint {
            step,
            loss,
            weights_sha256: trainable.weights_sha256(config, weights_dtype)?,
        };
        results.extend(
            hook(&model, &point).with_context(|| format!("evaluation hook at step {step}"))?,
        );
    }
    Ok(Some(results))
}
