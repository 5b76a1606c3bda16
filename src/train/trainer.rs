//! The [`Trainer`]: set up from a recipe and the starting weights ([`Trainer::new`]), then
//! [`Trainer::train`], one [`Trainer::step`] at a time, with its evaluations, checkpoints and
//! stops; its state is its fields.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};

use super::claim::{RunClaim, Start};
use super::distributed::{Collective, SingleProcess};
use super::examples::{Batch, EvalData, TrainData};
use super::layout::BatchLayout;
use super::memory::MemoryEstimate;
use super::optimizer::AdamW;
use super::precision::LossScaler;
use super::preference::{PreferenceSetup, Reference};
use super::resume::{resume_from, ResumeInto};
use super::run_log::RunLog;
use super::schedule::Schedule;
use super::selection::EvalWatch;
use super::step::{StepAt, StepOutcome, StepPlan, StepRows, Workers};
use super::trainable::Trainable;
use super::{CheckpointHook, EvalHook, EvalPoint, ModelInit, TrainOptions, TrainSummary};
use crate::checkpoint::{self, TrainerState};
use crate::data::SourceFingerprint;
use crate::eval::preference::{self, PairLoss};
use crate::hub::{UploadEvent, Uploader};
use crate::model::{self, Config};
use crate::ops;
use crate::recipe::{Compute, Recipe};
use crate::tokenizer::TextTokenizer;
use crate::track::{Progress, RunStatus, Tracker};

/// One training run: the model, its optimizer and data, and where its numbers and checkpoints
/// go. Rank 0 of a job writes; the other ranks train and follow.
pub struct Trainer<'a> {
    recipe: Recipe,
    config: Config,
    tokenizer: Option<TextTokenizer>,
    /// Where the weights came from, for the model card.
    base_model: String,
    device: Device,
    collective: &'a dyn Collective,

    trainable: Trainable,
    adamw: AdamW,
    scaler: LossScaler,
    schedule: Schedule,
    data: TrainData,
    eval_data: Option<EvalData>,
    plan: StepPlan,
    /// A preference objective's formula and where its reference comes from.
    preference: Option<(PairLoss, Reference)>,

    /// Rank 0's only: the run's lock and what it replaced.
    claim: Option<RunClaim>,
    /// The dtype checkpoints store the weights in.
    checkpoint_dtype: DType,
    /// The training files, recorded in every checkpoint.
    data_fingerprint: Vec<SourceFingerprint>,
    watch: EvalWatch,
    log: RunLog,
    eval_hook: Option<EvalHook<'a>>,
    checkpoint_hook: Option<CheckpointHook<'a>>,
    /// Pushes each checkpoint to the Hub (`checkpoint.push_to_hub`; rank 0).
    uploader: Option<Uploader>,

    stop: Arc<AtomicBool>,
    _signals: Option<SignalGuard>,
    /// The newest checkpoint known to be complete, named when training has to stop.
    last_good: Option<PathBuf>,
    start_step: u64,
    total_steps: u64,
}

/// Why [`Trainer::train`] ended before its last step.
enum Stop {
    Requested,
    EarlyStopping,
}

impl<'a> Trainer<'a> {
    /// Everything a run needs before its first step: the fp32 master weights and the optimizer,
    /// the run's lock (rank 0), the checkpoint it resumes from, the worker threads and the
    /// tracking. Everything that can be wrong with them is found here.
    pub fn new(
        recipe: &Recipe,
        init: ModelInit,
        data: impl Into<TrainData>,
        mut eval_data: Option<EvalData>,
        options: TrainOptions<'a>,
    ) -> Result<Self> {
        let mut data = data.into();
        ensure!(
            data.is_pairs() == recipe.objective.is_preference(),
            "objective.kind {} trains on {}",
            recipe.objective.kind.name(),
            match data.is_pairs() {
                true => "training rows, not preference pairs",
                false => "preference pairs, not training rows",
            }
        );
        let progress = options
            .progress
            .unwrap_or_else(|| Progress::new(options.quiet));
        let device = ops::parse_device(&recipe.device)?;
        let collective = options.collective.unwrap_or(&SingleProcess);
        let (rank, ranks) = (collective.rank(), collective.size());
        crate::process::keep_freed_memory();
        if let Some(note) = ops::training_attention_note(&device) {
            progress.println(note);
        }
        let layout = BatchLayout::new(recipe, data.per_epoch(), rank, ranks)?;
        let total_steps = recipe.total_steps(data.per_epoch());
        ensure!(
            total_steps > 0,
            "the recipe needs a positive `steps` or `epochs`"
        );
        let schedule = Schedule::new(&recipe.schedule, recipe.optimizer.lr, total_steps);
        // A full fine-tune's reference is its starting weights, kept before they become the
        // masters (shared tensors until then).
        let starting = (recipe.objective.needs_reference() && recipe.lora.is_none())
            .then(|| init.params.clone());
        let trainable =
            Trainable::new(recipe, &init.config, init.params, &init.base_model, &device)?;
        let params = &trainable.params;
        let mut adamw = match recipe.distributed.shard_optimizer {
            true => AdamW::sharded(&recipe.optimizer, params, rank, ranks)?,
            false => AdamW::new(&recipe.optimizer, params)?,
        };
        let mut scaler = LossScaler::new(&recipe.precision);

        // Rank 0 alone writes the run, so it alone locks it, once the recipe has passed its
        // checks.
        let start = Start::new(options.resume.is_some(), options.overwrite)?;
        let claim = (rank == 0)
            .then(|| RunClaim::take(recipe, start))
            .transpose()?;
        if ranks > 1 {
            // Taking the lock finishes what a crash left in the checkpoints, which the other
            // ranks are about to read.
            collective.barrier("rank 0's locking of the run")?;
        }
        let run_checkpoints = recipe.checkpoint.dir.join(&recipe.name);
        let resumed = (options.resume.as_ref())
            .map(|resume| {
                let into = ResumeInto {
                    recipe,
                    config: &init.config,
                    device: &device,
                    trainable: &trainable,
                    adamw: &mut adamw,
                    scaler: &mut scaler,
                    stream: &mut data,
                    data: &options.data_fingerprint,
                    allow_data_change: options.allow_data_change,
                    ranks,
                };
                resume_from(resume, &run_checkpoints, into, &progress)
            })
            .transpose()?;
        let start_step = resumed.as_ref().map_or(0, |r| r.state.step);
        let watch = EvalWatch::new(recipe, resumed.as_ref().map(|r| &r.state));
        let last_good = resumed.as_ref().map(|r| r.dir.clone());
        let resumed_workers = resumed.as_ref().and_then(|r| r.state.cpu_workers);

        let threads = options
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let memory =
            MemoryEstimate::new(recipe, &init.config, threads).per_rank(ranks, adamw.is_sharded());
        announce(
            &progress,
            &memory,
            claim.as_ref(),
            collective,
            &adamw,
            &layout,
        )?;
        let pad_id = init.tokenizer.as_ref().map_or(0, |t| t.pad_id());
        let preference = match recipe.objective.is_preference() {
            false => None,
            true => {
                let setup = PreferenceSetup {
                    recipe,
                    config: &init.config,
                    device: &device,
                    trainable: &trainable,
                    starting,
                    base_model: &init.base_model,
                    pad_id,
                    run_checkpoints: &run_checkpoints,
                    resuming: start_step > 0,
                    collective,
                };
                Some(setup.reference(&mut data, eval_data.as_mut(), &progress)?)
            }
        };
        let (layout, workers, note) =
            workers(layout, threads, &trainable, &device, resumed_workers)?;
        if let Some(note) = note {
            progress.println(&note);
        }
        let log = RunLog::open(
            recipe,
            (start_step, total_steps),
            resumed,
            progress,
            &memory,
            rank == 0,
        )?;
        let stop = options.stop.unwrap_or_default();
        let signals = match options.handle_signals {
            true => Some(SignalGuard::install(&stop)?),
            false => None,
        };
        let plan = StepPlan::new(recipe, &init.config, &device, (layout, workers), pad_id);
        Ok(Self {
            recipe: recipe.clone(),
            config: init.config,
            tokenizer: init.tokenizer,
            base_model: init.base_model,
            device,
            collective,
            trainable,
            adamw,
            scaler,
            schedule,
            data,
            eval_data,
            plan,
            preference,
            claim,
            checkpoint_dtype: recipe.checkpoint.dtype.unwrap_or(Compute::Fp32).dtype(),
            data_fingerprint: options.data_fingerprint,
            watch,
            log,
            eval_hook: options.eval_hook,
            checkpoint_hook: options.checkpoint_hook,
            uploader: None,
            stop,
            _signals: signals,
            last_good,
            start_step,
            total_steps,
        })
    }

    /// Pushes every checkpoint to the Hub with `uploader` as it is written; training never waits
    /// for an upload (see [`Self::finish_uploads`]).
    pub fn upload_checkpoints(&mut self, uploader: Uploader) {
        self.uploader = Some(uploader);
    }

    /// Trains to the recipe's last step, or until a stop request (saving a checkpoint to resume
    /// from) or `eval.early_stopping` ends the run.
    pub fn train(&mut self) -> Result<TrainSummary> {
        let writer = self.collective.rank() == 0;
        for step in self.start_step + 1..=self.total_steps {
            let outcome = self.step(step)?;
            let last = step == self.total_steps;
            let every = self.recipe.eval.every;
            let evaluating = (every > 0 && step.is_multiple_of(every)) || last;
            let evaluation = match evaluating && writer {
                true => Some(self.evaluate(step)?),
                false => None,
            };
            let stop = self.stop_after(step, &outcome, evaluating, evaluation.as_deref())?;
            let every = self.recipe.checkpoint.every;
            let saving = (every > 0 && step.is_multiple_of(every)) || last || stop.is_some();
            if saving {
                self.save_checkpoint(step, evaluation.as_deref())?;
            }
            if self.collective.size() > 1 && (saving || evaluating) {
                // No rank goes on (or ends) before rank 0's checkpoint is complete.
                let what = format!("the evaluation and checkpoint of step {step}");
                self.collective.barrier(&what)?;
            }
            match stop {
                Some(stop) if !last => return self.finish(Some((step, stop))),
                _ => {}
            }
        }
        self.finish(None)
    }

    /// One optimizer step over the next global batch, logged.
    pub fn step(&mut self, step: u64) -> Result<StepOutcome> {
        let started = Instant::now();
        // The schedule follows applied updates: a step fp16 skipped on overflow does not advance
        // it (as HF Trainer / accelerate skip `scheduler.step()` then).
        let lr = self.schedule.lr_at(self.adamw.step + 1);
        let batch = self.data.next_batch(self.recipe.batch.global);
        let at = StepAt {
            step,
            lr,
            stop: self.stop.load(Ordering::SeqCst),
        };
        let rows = match (&batch, &self.preference) {
            (Batch::Sequences(sequences), _) => StepRows::Sequences(sequences),
            (Batch::Pairs(pairs), Some((objective, reference))) => StepRows::Pairs {
                pairs,
                objective,
                reference,
            },
            (Batch::Pairs(_), None) => unreachable!("pairs train with a preference objective"),
        };
        let (adamw, scaler) = (&mut self.adamw, &mut self.scaler);
        let outcome = (self.plan)
            .run(self.collective, &self.trainable, adamw, scaler, rows, at)
            .with_context(|| format!("step {step}"))?;
        if !outcome.applied {
            ensure!(self.scaler.enabled, self.non_finite_stop(step, &outcome));
            self.log.progress.println(&format!(
                "step {step}: non-finite gradients, update skipped, loss scale now {}",
                self.scaler.scale
            ));
        }
        let tokens = batch.tokens();
        let metrics: Vec<(String, f64)> = (outcome.metrics.iter())
            .map(|(name, value)| (format!("train/{name}"), *value))
            .collect();
        let mut scalars = vec![("train/lr", lr), ("train/loss_scale", self.scaler.scale)];
        scalars.extend(metrics.iter().map(|(name, value)| (name.as_str(), *value)));
        let epoch = self.data.epoch_progress();
        let elapsed = started.elapsed();
        (self.log).step(step, &outcome, elapsed, tokens, epoch, &scalars)?;
        Ok(outcome)
    }

    /// The eval loss (token-weighted mean over the eval sequences; preference pairs: the
    /// objective's mean and TRL's metrics) and whatever the evaluation hook reports, logged as
    /// `eval/<name>`.
    fn evaluate(&mut self, step: u64) -> Result<Vec<(String, f64)>> {
        let eval_data = self.eval_data.as_ref().filter(|d| !d.is_empty());
        let (sequences, pairs) = match eval_data {
            Some(EvalData::Sequences(sequences)) => (Some(sequences.as_slice()), None),
            Some(EvalData::Pairs(pairs)) => (None, Some(pairs.as_slice())),
            None => (None, None),
        };
        let mut results = Vec::new();
        if eval_data.is_some() || self.eval_hook.is_some() {
            let tensors = self.trainable.model_tensors(true)?;
            let compute = self.recipe.precision.compute.dtype();
            let model =
                model::model_from_parameters(&self.config, &tensors, compute, &self.device)?;
            let mut loss = None;
            if let (Some(pairs), Some((objective, reference))) = (pairs, &self.preference) {
                let reference = reference.for_policy(&model);
                let (batch_size, pad_id) = (self.recipe.eval.batch_size, self.plan.pad_id);
                results.extend(preference::evaluate(
                    objective, &model, reference, pairs, batch_size, pad_id,
                )?);
            }
            if let Some(sequences) = sequences {
                let (batch_size, pad_id) = (self.recipe.eval.batch_size, self.plan.pad_id);
                let totals = crate::eval::perplexity::loss_totals(
                    &model,
                    sequences,
                    batch_size,
                    pad_id,
                    &self.device,
                )?;
                if totals.tokens > 0 {
                    results.push(("loss".to_string(), totals.mean()));
                    loss = Some(totals);
                }
            }
            if let Some(hook) = self.eval_hook.as_mut() {
                let point = EvalPoint {
                    step,
                    loss,
                    weights_sha256: (self.trainable)
                        .weights_sha256(&self.config, self.checkpoint_dtype)?,
                };
                let reported = hook(&model, &point)
                    .with_context(|| format!("evaluation hook at step {step}"))?;
                results.extend(reported);
            }
        }
        self.log.eval(step, results.clone())?;
        Ok(results)
    }

    /// Whether the run stops after `step`: on request, or because its evaluations stopped
    /// improving. Every rank decides the same.
    fn stop_after(
        &mut self,
        step: u64,
        outcome: &StepOutcome,
        evaluating: bool,
        evaluation: Option<&[(String, f64)]>,
    ) -> Result<Option<Stop>> {
        let mut stop_early = false;
        if let Some(results) = evaluation {
            if let Some(note) = self.watch.evaluated(step, results)? {
                self.log.progress.println(&note);
                stop_early = true;
            }
        }
        let ranks = self.collective.size();
        if ranks > 1 && evaluating && self.watch.stops_early() {
            // Rank 0 alone evaluates: its decision is every rank's.
            let mut decision = [if stop_early { 1.0 } else { 0.0 }];
            let what = "the early-stopping decision";
            self.collective.all_reduce_sum_f64(&mut decision, what)?;
            stop_early = decision[0] > 0.0;
        }
        self.log.flush(step)?;
        // Alone, a stop request is seen as late as possible; together, the ranks stop after
        // the step they agreed on at its check-in.
        let requested = match ranks {
            1 => self.stop.load(Ordering::SeqCst),
            _ => outcome.stop_requested,
        };
        Ok(match (stop_early, requested) {
            (true, _) => Some(Stop::EarlyStopping),
            (false, true) => Some(Stop::Requested),
            (false, false) => None,
        })
    }

    /// Writes `step-<step>` (rank 0; every rank sends its share of a sharded optimizer state),
    /// marks it `best` when its evaluation is, hands it to the checkpoint hook and the uploader,
    /// and prunes the older checkpoints nothing still uses.
    fn save_checkpoint(&mut self, step: u64, evaluation: Option<&[(String, f64)]>) -> Result<()> {
        let optimizer = (self.adamw).state_tensors(&self.trainable.params, self.collective)?;
        let Some(claim) = &self.claim else {
            return Ok(());
        };
        let lock = claim.lock();
        let best = match evaluation {
            Some(results) => {
                let dir = checkpoint::step_dir(lock.dir(), step);
                self.watch.saving(&dir, results)?
            }
            None => false,
        };
        let state = self.trainer_state(step);
        let (config, tokenizer, base_model) =
            (&self.config, self.tokenizer.as_ref(), &self.base_model);
        let dir = (self.trainable).with_checkpoint_weights(self.checkpoint_dtype, |weights| {
            let contents = checkpoint::Contents {
                config,
                weights,
                tokenizer,
                optimizer,
                state,
                base_model,
            };
            checkpoint::save(lock, contents)
        })?;
        if best {
            checkpoint::mark_best(lock, &dir)?;
        }
        let progress = &self.log.progress;
        progress.println(&format!("saved checkpoint {}", dir.display()));
        let mut in_use = match self.checkpoint_hook.as_mut() {
            Some(hook) => hook(&dir, step)
                .with_context(|| format!("checkpoint hook for {}", dir.display()))?,
            None => Vec::new(),
        };
        if let Some(uploader) = &self.uploader {
            // Outcomes of earlier pushes are reported as they arrive; training never waits.
            report_uploads(progress, uploader.poll());
            let name = &self.recipe.name;
            uploader.submit(&dir, &format!("kiln: {name} step {step}"));
            in_use.extend(uploader.pending());
        }
        let keep_last = self.recipe.checkpoint.keep_last;
        for note in checkpoint::prune(lock, keep_last, &dir, &in_use)? {
            progress.println(&note);
        }
        self.log.summary.last_checkpoint = Some(dir.clone());
        self.last_good = Some(dir);
        match self.log.tracker.as_mut() {
            Some(tracker) => tracker.heartbeat(),
            None => Ok(()),
        }
    }

    /// What `trainer_state.json` records at `step`: where to resume, and HF Trainer's fields.
    fn trainer_state(&self, step: u64) -> TrainerState {
        let (best_metric, best_model_checkpoint, early_stopping) = self.watch.record();
        let recipe = &self.recipe;
        let log = &self.log;
        TrainerState {
            step,
            epoch: self.data.epoch_progress(),
            stream: self.data.state(),
            optimizer_steps: self.adamw.step,
            loss_scaler: self.scaler,
            recipe_hash: checkpoint::compatibility_hash(recipe),
            recipe: recipe.clone(),
            metrics: log.metrics.clone(),
            files: BTreeMap::new(),
            cpu_workers: Some(self.plan.layout.workers_per_replica),
            data: self.data_fingerprint.clone(),
            mlflow: log.tracker.as_ref().and_then(Tracker::mlflow_run).cloned(),
            world_size: Some(self.collective.size()),
            hf: checkpoint::HfTrainerState {
                global_step: step,
                max_steps: self.total_steps,
                log_history: log.history.clone(),
                best_metric,
                best_model_checkpoint,
                train_batch_size: recipe.batch.micro,
                logging_steps: recipe.tracking.log_every.max(1),
                eval_steps: recipe.eval.every,
                save_steps: recipe.checkpoint.every,
            },
            early_stopping,
        }
    }

    /// Ends the run's tracking: finished, or stopped after `step` (said through the progress).
    fn finish(&mut self, stopped: Option<(u64, Stop)>) -> Result<TrainSummary> {
        self.log.progress.finish();
        report_rank_memory(&self.log.progress, self.collective, &self.adamw);
        let total = self.total_steps;
        let status = match stopped {
            None => RunStatus::Finished,
            Some((step, Stop::EarlyStopping)) => {
                self.log.summary.stopped_early = true;
                let line = format!("stopped early at step {step} of {total} (eval.early_stopping)");
                self.log.progress.println(&line);
                RunStatus::Finished
            }
            Some((step, Stop::Requested)) => {
                self.log.summary.stopped_early = true;
                self.log.progress.println(&format!(
                    "stopped at step {step} of {total} on request; resume with --resume latest"
                ));
                RunStatus::Stopped
            }
        };
        self.log.finish(status)
    }

    /// Waits for the Hub uploads to finish, reports their outcomes as the run's own (and returns
    /// them), and prunes the checkpoints that were kept only while they uploaded (after
    /// `summary`'s last one).
    pub fn finish_uploads(&mut self, summary: Option<&TrainSummary>) -> Result<Vec<UploadEvent>> {
        let Some(uploader) = self.uploader.take() else {
            return Ok(Vec::new());
        };
        let progress = &self.log.progress;
        progress.println("waiting for checkpoint uploads to finish…");
        let events = uploader.finish();
        report_uploads(progress, events.clone());
        let last = summary.and_then(|s| s.last_checkpoint.as_ref());
        if let (Some(claim), Some(last)) = (&self.claim, last) {
            checkpoint::prune(claim.lock(), self.recipe.checkpoint.keep_last, last, &[])?;
        }
        Ok(events)
    }

    /// Why a run with unscaled (fp32/bf16) compute stops at non-finite gradients instead of
    /// skipping the step: without a loss scale to lower, the next step would meet the same
    /// weights and overflow again, skipping forever.
    fn non_finite_stop(&self, step: u64, outcome: &StepOutcome) -> String {
        let (loss, grad_norm) = (outcome.loss, outcome.grad_norm);
        let compute = self.recipe.precision.compute.name();
        let checkpoint = match &self.last_good {
            Some(dir) => format!(
                "the last good checkpoint is {} (`--resume latest` continues from it)",
                dir.display()
            ),
            None => "no checkpoint was written before it".to_string(),
        };
        format!(
            "step {step}: the gradients are not finite (loss {loss}, gradient norm {grad_norm}) \
             with {compute} compute, so the update was not applied and training stopped; \
             {checkpoint}. Lower optimizer.lr, keep optimizer.grad_clip on, or check the data of \
             this step"
        )
    }
}

/// What a run says as it starts: the memory estimate, the earlier run it replaced, and how a
/// job is spread over its ranks.
fn announce(
    progress: &Progress,
    memory: &MemoryEstimate,
    claim: Option<&RunClaim>,
    collective: &dyn Collective,
    adamw: &AdamW,
    layout: &BatchLayout,
) -> Result<()> {
    progress.println(&memory.table());
    if let Some(replaced) = claim
        .map(RunClaim::replace_earlier_run)
        .transpose()?
        .flatten()
    {
        progress.println(&format!("overwrite: deleted the earlier run ({replaced})"));
    }
    let ranks = collective.size();
    if ranks > 1 {
        let sharding = match adamw.is_sharded() {
            true => "optimizer state sharded (ZeRO-1)",
            false => "optimizer state replicated",
        };
        progress.println(&format!(
            "distributed: {ranks} ranks over {}, {} replica(s) each, {sharding}; rank 0 writes",
            collective.engine(),
            layout.local_replicas()
        ));
    }
    Ok(())
}

/// Upload outcomes as they arrive: a push on the progress, a failure as a warning.
fn report_uploads(progress: &Progress, events: Vec<UploadEvent>) {
    for event in events {
        match event.failed() {
            true => progress.warn(&event.to_string()),
            false => progress.println(&event.to_string()),
        }
    }
}

/// Each rank's measured peak and optimizer share, on its standard error (the other ranks'
/// standard output is quiet): what ZeRO-1 saves is seen per rank.
fn report_rank_memory(progress: &Progress, collective: &dyn Collective, adamw: &AdamW) {
    if collective.size() == 1 {
        return;
    }
    let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;
    let peak = crate::track::peak_rss_bytes()
        .map_or("unknown".to_string(), |b| format!("{:.0} MiB", mib(b)));
    let share = match adamw.is_sharded() {
        true => " (its ZeRO-1 share)",
        false => "",
    };
    let line = format!(
        "rank {} of {}: peak RSS {peak}, optimizer state {:.1} MiB{share}",
        collective.rank(),
        collective.size(),
        mib(adamw.state_bytes()),
    );
    progress.eprintln(&line);
}

/// The run's worker threads: `threads` (default: all cores) shared out over this rank's
/// replicas, each replica's rows split over workers (see [`ops::workers_per_replica`]); with a
/// note when a resumed checkpoint split its rows over another number of workers (the updates are
/// then no longer bit-exact).
fn workers(
    layout: BatchLayout,
    threads: usize,
    trainable: &Trainable,
    device: &Device,
    resumed_workers: Option<usize>,
) -> Result<(BatchLayout, Workers, Option<String>)> {
    let threads_per_replica = layout.threads_per_replica(threads);
    let gradient_bytes: usize = (trainable.params.iter())
        .map(|(_, v)| v.elem_count() * 4)
        .sum();
    let per_replica = ops::workers_per_replica(device, threads_per_replica, gradient_bytes);
    let note = resumed_workers
        .filter(|&before| before != per_replica)
        .map(|before| {
            format!(
            "resume: the micro-batch rows were split over {before} CPU workers per replica and \
             now over {per_replica} ({threads} threads): updates stay the same up to float \
             rounding but are no longer bit-identical to an uninterrupted run (use --threads to \
             match)"
        )
        });
    let workers = Workers::new(threads_per_replica, layout.local_replicas(), per_replica)?;
    Ok((layout.with_workers(per_replica), workers, note))
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
