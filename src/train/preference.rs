//! Preference objectives over `chosen` / `rejected` pairs: DPO with TRL's losses (`sigmoid`,
//! `hinge`, `ipo`, `robust`) against a frozen reference, and the reference-free SimPO, with TRL's
//! metrics (`rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`,
//! `logps/chosen`, `logps/rejected`).
//!
//! A pair's loss depends on its sequences only through their log-probabilities (the sums of
//! their completion tokens'), so its gradient is each sequence's log-probability gradient times
//! one number, `∂loss/∂logp`: the policy's forward finds the log-probabilities, those numbers
//! follow from the pair's formula (in f64, here), and one weighted backward of the tokens'
//! cross-entropies (see [`crate::model::Model::loss_and_grads_weighted_by`]) gives the
//! gradient. The reference is the base model with the LoRA adapter off (the same weights: no
//! memory), a frozen copy of the starting weights in the compute dtype (a full fine-tune), or
//! its log-probabilities computed once before training (`precompute_ref_log_probs`).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::distributed::Collective;
use super::examples::{EvalData, TrainData};
use super::trainable::Trainable;
use crate::data::{PreferencePair, Sequence};
use crate::eval::preference::{
    pair_logps, reference_logps, row_logps, rows_of, sequence_logps, PairLoss, PairTotals,
    ReferenceModel, TOTALS,
};
use crate::model::{Config, Model};
use crate::ops;
use crate::recipe::Recipe;
use crate::track::Progress;

/// Where the reference's log-probabilities come from.
pub enum Reference {
    /// SimPO: none.
    None,
    /// The policy with its LoRA adapter off: the base, the same weights (no memory).
    AdapterOff,
    /// A frozen copy of the starting weights in the compute dtype (full fine-tune).
    Frozen(Box<Model>),
    /// Carried by each pair (`precompute_ref_log_probs`).
    Precomputed,
}

impl Reference {
    /// The reference of a step whose policy is `policy`: the frozen copy, the policy with its
    /// adapter off, or none (the pairs carry it, or the objective needs none).
    pub fn for_policy<'m>(&'m self, policy: &'m Model) -> Option<ReferenceModel<'m>> {
        match self {
            Reference::Frozen(model) => Some(ReferenceModel::whole(model)),
            Reference::AdapterOff => Some(ReferenceModel {
                model: policy,
                adapters_off: true,
            }),
            Reference::None | Reference::Precomputed => None,
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Reference::None => "none (reference-free)",
            Reference::AdapterOff => "the base model with the adapter off (no extra memory)",
            Reference::Frozen(_) => "a frozen copy of the starting weights",
            Reference::Precomputed => "log-probabilities computed before training",
        }
    }
}

/// Forward and backward of one shard of pairs: its [`PairTotals`] and the fp32 gradients of
/// `weight × Σ loss` for every parameter; `None` when no sequence trains a token.
#[allow(clippy::too_many_arguments)]
pub fn shard_backward(
    objective: &PairLoss,
    model: &Model,
    reference: Option<ReferenceModel>,
    params: &[(String, Var)],
    pairs: &[PreferencePair],
    pad_id: u32,
    weight: f64,
    dropout: Option<ops::Dropout>,
) -> Result<Option<(PairTotals, Vec<Tensor>)>> {
    let rows = rows_of(pairs);
    let reference = reference_logps(objective, pairs, &rows, reference, pad_id)?;
    let (mut batch, labels) = crate::data::batch_of(&rows, pad_id, model.device())?;
    batch.dropout = dropout;
    let counts: Vec<usize> = rows.iter().map(Sequence::target_count).collect();
    let mut totals: PairTotals = [0.0; TOTALS];
    let mut weigh = |label_nll: &[f64]| -> candle_core::Result<Vec<f64>> {
        let policy = row_logps(label_nll, &counts);
        let mut weights = Vec::with_capacity(label_nll.len());
        for (i, logps) in pair_logps(pairs, &policy, &reference).iter().enumerate() {
            let terms = objective.terms(logps);
            terms.add_to(&mut totals);
            // nll = -logp: each position of a sequence weighs -∂loss/∂logp.
            for (row, grad) in [2 * i, 2 * i + 1].into_iter().zip(terms.grad) {
                weights.extend(std::iter::repeat_n(-grad * weight, counts[row]));
            }
        }
        Ok(weights)
    };
    let Some(loss) = model.loss_and_grads_weighted_by(&batch, &labels, &mut weigh)? else {
        return Ok(None);
    };
    Ok(Some((totals, super::step::fp32_grads(&loss, params)?)))
}

/// What a preference objective needs before the first step.
pub struct PreferenceSetup<'s> {
    pub recipe: &'s Recipe,
    pub config: &'s Config,
    pub device: &'s Device,
    pub trainable: &'s Trainable,
    /// A full fine-tune's starting weights (DPO), for its reference.
    pub starting: Option<HashMap<String, Tensor>>,
    /// Where the starting weights came from (part of what stored log-probabilities depend on).
    pub base_model: &'s str,
    pub pad_id: u32,
    pub run_checkpoints: &'s Path,
    pub resuming: bool,
    pub collective: &'s dyn Collective,
}

/// Where a run keeps its pairs' reference log-probabilities (`precompute_ref_log_probs`).
pub const REFERENCE_LOGPS_FILE: &str = "reference_logps.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredReference {
    /// sha256 of what the values depend on: every pair's tokens, the starting weights' source
    /// and the compute dtype.
    inputs_sha256: String,
    train: Vec<[f64; 2]>,
    eval: Vec<[f64; 2]>,
}

impl PreferenceSetup<'_> {
    /// The objective's formula and its reference: none (SimPO), the policy with its adapter off
    /// (LoRA), a frozen copy of the starting weights, or the log-probabilities of every train
    /// and eval pair computed once with the starting weights (see [`Self::precompute`]).
    pub fn reference(
        self,
        data: &mut TrainData,
        eval: Option<&mut EvalData>,
        progress: &Progress,
    ) -> Result<(PairLoss, Reference)> {
        let objective = &self.recipe.objective;
        let pair_loss = PairLoss::new(objective);
        if !objective.needs_reference() {
            return Ok((pair_loss, Reference::None));
        }
        if !objective.precompute_ref_log_probs {
            let reference = match self.starting.is_some() {
                true => Reference::Frozen(Box::new(self.starting_model()?)),
                false => Reference::AdapterOff,
            };
            progress.println(&format!("dpo: the reference is {}", reference.describe()));
            return Ok((pair_loss, reference));
        }
        let TrainData::Pairs(stream) = data else {
            anyhow::bail!("a preference objective trains on pairs");
        };
        let eval = match eval {
            Some(EvalData::Pairs(pairs)) => pairs.as_mut_slice(),
            _ => &mut [],
        };
        self.precompute(stream.examples_mut(), eval, progress)?;
        Ok((pair_loss, Reference::Precomputed))
    }

    /// The starting weights as a model in the compute dtype (a LoRA run's: its base).
    fn starting_model(&self) -> Result<Model> {
        let tensors = match &self.starting {
            Some(tensors) => tensors.clone(),
            None => (self.trainable.base_tensors()).context("a LoRA run has a base")?,
        };
        let compute = self.recipe.precision.compute.dtype();
        crate::model::model_from_parameters(self.config, &tensors, compute, self.device)
    }

    /// Gives every pair its reference log-probabilities. A resume reads them back from the run's
    /// checkpoint directory when they were computed for the same pairs, starting weights and
    /// compute dtype; otherwise the job computes them, `eval.batch_size` pairs at a time, the
    /// batches shared out over the ranks (each batch the same whichever rank computes it), and
    /// rank 0 keeps them there. Rank 0's values reach every rank through the all-reduce, so all
    /// of them train on the same numbers.
    fn precompute(
        &self,
        train: &mut [PreferencePair],
        eval: &mut [PreferencePair],
        progress: &Progress,
    ) -> Result<()> {
        let (rank, ranks) = (self.collective.rank(), self.collective.size());
        let compute = self.recipe.precision.compute.dtype();
        let inputs_sha256 = inputs_sha256(train, eval, self.base_model, compute);
        let path = self.run_checkpoints.join(REFERENCE_LOGPS_FILE);
        let stored = (rank == 0 && self.resuming)
            .then(|| -> Option<StoredReference> {
                let stored: StoredReference =
                    serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
                (stored.inputs_sha256 == inputs_sha256).then_some(stored)
            })
            .flatten();
        let mut reuse = [if stored.is_some() { 1.0 } else { 0.0 }];
        if ranks > 1 {
            (self.collective).all_reduce_sum_f64(&mut reuse, "whether to reuse the reference")?;
        }
        let started = Instant::now();
        let total = train.len() + eval.len();
        let mut values = vec![0f64; 2 * total];
        match (reuse[0] > 0.0, stored) {
            (true, Some(stored)) => {
                for (i, logps) in stored.train.iter().chain(&stored.eval).enumerate() {
                    values[2 * i..2 * i + 2].copy_from_slice(logps);
                }
            }
            (true, None) => {}
            (false, _) => {
                let model = self.starting_model()?;
                let model = ReferenceModel::whole(&model);
                let batch = self.recipe.eval.batch_size.max(1);
                let all: Vec<&PreferencePair> = train.iter().chain(eval.iter()).collect();
                let starts = (0..total).step_by(batch);
                for (_, start) in starts.enumerate().filter(|(i, _)| i % ranks == rank) {
                    let end = (start + batch).min(total);
                    let rows = rows_of(all[start..end].iter().copied());
                    let logps = sequence_logps(model, &rows, self.pad_id)?;
                    values[2 * start..2 * end].copy_from_slice(&logps);
                }
            }
        }
        if ranks > 1 {
            let what = "the reference log-probabilities";
            self.collective.all_reduce_sum_f64(&mut values, what)?;
        }
        for (i, pair) in train.iter_mut().chain(eval.iter_mut()).enumerate() {
            pair.reference = Some([values[2 * i], values[2 * i + 1]]);
        }
        if reuse[0] > 0.0 {
            progress.println(&format!(
                "dpo: reference log-probabilities of {} train and {} eval pairs read from {}",
                train.len(),
                eval.len(),
                path.display()
            ));
            return Ok(());
        }
        if rank == 0 {
            let logps = |pairs: &[PreferencePair]| -> Vec<[f64; 2]> {
                pairs.iter().map(|p| p.reference.expect("set")).collect()
            };
            let stored = StoredReference {
                inputs_sha256,
                train: logps(train),
                eval: logps(eval),
            };
            std::fs::create_dir_all(self.run_checkpoints)?;
            crate::atomic_file::write(&path, &serde_json::to_vec(&stored)?)?;
        }
        progress.println(&format!(
            "dpo: reference log-probabilities of {} train and {} eval pairs computed in {:.1} s \
             over {ranks} rank(s), kept in {}",
            train.len(),
            eval.len(),
            started.elapsed().as_secs_f64(),
            path.display()
        ));
        Ok(())
    }
}

/// sha256 over what precomputed reference log-probabilities depend on.
fn inputs_sha256(
    train: &[PreferencePair],
    eval: &[PreferencePair],
    base_model: &str,
    compute: DType,
) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(format!("{base_model}\n{compute:?}\n"));
    for (split, pairs) in [("train", train), ("eval", eval)] {
        hash.update(split);
        hash.update((pairs.len() as u64).to_le_bytes());
        for sequence in pairs.iter().flat_map(|p| [&p.chosen, &p.rejected]) {
            hash.update((sequence.ids.len() as u64).to_le_bytes());
            for (&id, &trained) in sequence.ids.iter().zip(&sequence.loss_mask) {
                hash.update(id.to_le_bytes());
                hash.update([u8::from(trained)]);
            }
        }
    }
    hex::encode(hash.finalize())
}
