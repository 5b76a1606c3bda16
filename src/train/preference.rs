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

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, Var};

use crate::data::{PreferencePair, Sequence};
use crate::eval::preference::{
    pair_logps, reference_logps, row_logps, rows_of, PairLoss, PairTotals, ReferenceModel,
};
use crate::model::Model;
use crate::ops;

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
    let reference = match objective.needs_reference() {
        true => reference_logps(pairs, reference, pad_id)?,
        false => vec![None; pairs.len()],
    };
    ensure!(
        !objective.needs_reference() || reference.iter().all(Option::is_some),
        "the pairs carry no reference log-probabilities and no reference model runs"
    );
    let (mut batch, labels) = crate::data::batch_of(&rows, pad_id, model.device())?;
    batch.dropout = dropout;
    let counts: Vec<usize> = rows.iter().map(Sequence::target_count).collect();
    let mut totals: PairTotals = [0.0; 7];
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
    let grads = params
        .iter()
        .map(|(name, v)| match loss.get(name, v.as_tensor())? {
            Some(g) => Ok(g.to_dtype(DType::F32)?),
            None => Ok(v.zeros_like()?),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some((totals, grads)))
}
