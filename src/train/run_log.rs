//! Where a run's numbers go while it trains.

use std::collections::BTreeMap;

use anyhow::Result;

use super::memory::MemoryEstimate;
use super::resume::Resumed;
use super::step::StepOutcome;
use super::TrainSummary;
use crate::recipe::Recipe;
use crate::track::{Progress, RunStatus, Tracker, TrackerStart};

/// Where a run's numbers go: TensorBoard and metrics.jsonl, the progress display, the summary
/// returned to the caller, and the last value of every metric (for checkpoints' model cards).
pub struct RunLog {
    /// Rank 0's only: the other ranks of a job write nothing.
    pub tracker: Option<Tracker>,
    pub progress: Progress,
    pub metrics: BTreeMap<String, f64>,
    /// HF Trainer's `log_history`: every logged step and evaluation, carried across resumes.
    pub history: Vec<serde_json::Map<String, serde_json::Value>>,
    pub summary: TrainSummary,
    log_every: u64,
}

impl RunLog {
    /// Opens the run's tracking directory (`<tracking.log_dir>/<name>`); a resumed run continues
    /// its metrics from the checkpoint's.
    pub fn open(
        recipe: &Recipe,
        (start_step, total_steps): (u64, u64),
        resumed: Option<Resumed>,
        mut progress: Progress,
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
        let mut tracker = writer.then(|| Tracker::open(&run_dir, start)).transpose()?;
        for note in tracker
            .as_mut()
            .map(Tracker::take_notes)
            .unwrap_or_default()
        {
            progress.println(&note);
        }
        progress.start(total_steps, start_step);
        Ok(Self {
            tracker,
            progress,
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
    pub fn step(
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
    pub fn eval(&mut self, step: u64, results: Vec<(String, f64)>) -> Result<()> {
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
    pub fn flush(&mut self, step: u64) -> Result<()> {
        match self.tracker.as_mut() {
            Some(tracker) => tracker.flush(step),
            None => Ok(()),
        }
    }

    /// Ends the run's tracking (`run.json`, HParams, MLflow) with the training curves and the
    /// last checkpoint's model card as artifacts.
    pub fn finish(&mut self, status: RunStatus) -> Result<TrainSummary> {
        self.progress.finish();
        let Some(tracker) = self.tracker.take() else {
            return Ok(self.summary.clone());
        };
        let run_dir = tracker.run_dir().to_path_buf();
        match crate::track::plot::write_curves(&run_dir) {
            Ok(Some(curves)) => tracker.artifact(&curves, "curves.svg"),
            Ok(None) => {}
            Err(e) => {
                (self.progress).warn(&format!("{}: curves not drawn: {e:#}", run_dir.display()))
            }
        }
        if let Some(card) = (self.summary.last_checkpoint.as_ref()).map(|c| c.join("README.md")) {
            if card.is_file() {
                tracker.artifact(&card, "model/README.md");
            }
        }
        tracker.finish(status)?;
        Ok(self.summary.clone())
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
