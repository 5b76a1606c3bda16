//! What the evaluations decide: which checkpoint is the best (`checkpoint.keep_best`) and when
//! training stops because they no longer improve (`eval.early_stopping`). Both carry across a
//! resume through `trainer_state.json`, so an interrupted run stops where an uninterrupted one
//! does.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::checkpoint::{EarlyStoppingState, TrainerState};
use crate::recipe::{BestSpec, EarlyStoppingSpec, Recipe};

pub struct EvalWatch {
    early: Option<(EarlyStoppingSpec, Option<EarlyStoppingState>)>,
    keep_best: Option<BestSpec>,
    /// The best value of `keep_best`'s metric so far and its checkpoint.
    best: Option<(f64, PathBuf)>,
}

impl EvalWatch {
    /// As the recipe asks, continuing what `resumed` recorded.
    pub fn new(recipe: &Recipe, resumed: Option<&TrainerState>) -> Self {
        let early = recipe.eval.early_stopping.clone().map(|spec| {
            let state = resumed.and_then(|state| state.early_stopping);
            (spec, state)
        });
        let keep_best = recipe.checkpoint.keep_best.clone();
        let best = resumed.and_then(|state| {
            let value = state.hf.best_metric?;
            let dir = state.hf.best_model_checkpoint.as_ref()?;
            Some((value, PathBuf::from(dir)))
        });
        Self {
            early,
            keep_best,
            best,
        }
    }

    pub fn stops_early(&self) -> bool {
        self.early.is_some()
    }

    /// After an evaluation: when it is the `patience`-th in a row that has not improved on the
    /// best, training stops, and this says why.
    pub fn evaluated(&mut self, step: u64, results: &[(String, f64)]) -> Result<Option<String>> {
        let Some((spec, state)) = &mut self.early else {
            return Ok(None);
        };
        let value = metric(results, spec.metric(), "eval.early_stopping.metric")?;
        let next = match *state {
            Some(s) if !spec.mode().improves(value, s.best, spec.min_delta) => EarlyStoppingState {
                evaluations_without_improvement: s.evaluations_without_improvement + 1,
                ..s
            },
            _ => EarlyStoppingState {
                best: value,
                evaluations_without_improvement: 0,
            },
        };
        *state = Some(next);
        let stop = next.evaluations_without_improvement >= spec.patience;
        Ok(stop.then(|| {
            format!(
                "step {step}: eval/{} has not improved on {} for {} evaluations: stopping early \
                 (eval.early_stopping)",
                spec.metric(),
                next.best,
                next.evaluations_without_improvement
            )
        }))
    }

    /// Before the checkpoint of an evaluated step is saved at `dir`: whether it is the best one
    /// so far (`checkpoint.keep_best`).
    pub fn saving(&mut self, dir: &Path, results: &[(String, f64)]) -> Result<bool> {
        let Some(spec) = &self.keep_best else {
            return Ok(false);
        };
        let value = metric(results, spec.metric(), "checkpoint.keep_best")?;
        let better = match &self.best {
            Some((best, _)) => spec.mode().improves(value, *best, 0.0),
            None => true,
        };
        if better {
            self.best = Some((value, dir.to_path_buf()));
        }
        Ok(better)
    }

    /// What the next checkpoint records: the best metric and its checkpoint (HF's
    /// `best_metric`, `best_model_checkpoint`) and early stopping's progress.
    pub fn record(&self) -> (Option<f64>, Option<String>, Option<EarlyStoppingState>) {
        let (value, dir) = match &self.best {
            Some((value, dir)) => (Some(*value), Some(dir.display().to_string())),
            None => (None, None),
        };
        (
            value,
            dir,
            self.early.as_ref().and_then(|(_, state)| *state),
        )
    }
}

/// `name`'s value among an evaluation's results, or an error naming the recipe key and what the
/// evaluation did report.
fn metric(results: &[(String, f64)], name: &str, key: &str) -> Result<f64> {
    match results.iter().find(|(n, _)| n == name) {
        Some((_, value)) => Ok(*value),
        None => {
            let reported: Vec<&str> = results.iter().map(|(n, _)| n.as_str()).collect();
            bail!(
                "{key}: the evaluation reported no {name:?} (it reported: {})",
                if reported.is_empty() {
                    "nothing".to_string()
                } else {
                    reported.join(", ")
                }
            )
        }
    }
}
