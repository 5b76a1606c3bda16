//! The training loss over a model's hidden states: the fused loss head (the logits never exist
//! whole), its gradients with autograd's through the blocks, and activation checkpointing.

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var, D};

use super::{Batch, Model, Pass};
use crate::ops;

impl Model {
    /// The summed next-token cross-entropy over the positions whose label is not negative (HF's
    /// -100), through the fused loss head (the logits never exist whole).
    pub fn loss_sum(&self, batch: &Batch, labels: &[i64]) -> candle_core::Result<f64> {
        let hidden = self.hidden_states(batch, None)?;
        Ok(self.head_loss(&hidden, labels, None)?.nll_sum)
    }

    /// The cross-entropy of each labelled position, in position order (a sequence's
    /// log-probability is minus the sum of its positions').
    pub fn label_nll(&self, batch: &Batch, labels: &[i64]) -> candle_core::Result<Vec<f64>> {
        let hidden = self.hidden_states(batch, None)?;
        Ok(self.head_loss(&hidden, labels, None)?.label_nll)
    }

    /// [`Self::loss_sum`] and the gradients of `grad_scale ×` it for every parameter; `None`
    /// when no position has a label.
    pub fn loss_and_grads(
        &self,
        batch: &Batch,
        labels: &[i64],
        grad_scale: f64,
    ) -> candle_core::Result<Option<LossGrads>> {
        self.weighted_loss_and_grads(batch, labels, &mut Weighting::Uniform(grad_scale))
    }

    /// The gradients of `Σ weight × nll` over the labelled positions, the weights chosen by
    /// `weigh` from every position's cross-entropy once the forward has found them (a preference
    /// objective's: how much each sequence counts depends on its pair's log-probabilities). The
    /// blocks run once; a trained head twice (see [`ops::lm_head_loss_weighted_by`]).
    pub fn loss_and_grads_weighted_by(
        &self,
        batch: &Batch,
        labels: &[i64],
        weigh: &mut dyn FnMut(&[f64]) -> candle_core::Result<Vec<f64>>,
    ) -> candle_core::Result<Option<LossGrads>> {
        self.weighted_loss_and_grads(batch, labels, &mut Weighting::FromNll(weigh))
    }

    fn weighted_loss_and_grads(
        &self,
        batch: &Batch,
        labels: &[i64],
        weighting: &mut Weighting,
    ) -> candle_core::Result<Option<LossGrads>> {
        if labels.iter().all(|&l| l < 0) {
            return Ok(None);
        }
        if let Some(trained) = &self.checkpointing {
            return self.checkpointed_loss_and_grads(batch, labels, weighting, trained);
        }
        let hidden = self.hidden_states(batch, None)?;
        let loss = self.weighted_head_loss(&hidden, labels, weighting)?;
        let Some(surrogate) = loss.surrogate else {
            return Ok(None);
        };
        let head_grads = self.head_grads(loss.head_grads);
        let store = surrogate.backward()?;
        let store = store
            .get_ids()
            .map(|id| (*id, store.get_id(*id).expect("listed").clone()))
            .collect();
        Ok(Some(LossGrads {
            nll_sum: loss.nll_sum,
            label_nll: loss.label_nll,
            store,
            head_grads,
        }))
    }

    /// [`Self::loss_and_grads`] keeping only each block's input through the forward: the backward
    /// runs block by block from the last, recomputing the block's graph from its input and
    /// backpropagating the gradient that reached its output. Every op and dropout mask is the
    /// same as without checkpointing; only the order some gradient sums are added in differs.
    fn checkpointed_loss_and_grads(
        &self,
        batch: &Batch,
        labels: &[i64],
        weighting: &mut Weighting,
        trained: &HashSet<TensorId>,
    ) -> candle_core::Result<Option<LossGrads>> {
        let mut pass = Pass::checkpointed();
        let hidden = self.body().forward(batch, &mut pass)?;
        let kept = pass.into_checkpointed();
        // Only the trained tensors' gradients are kept from each block's backward: the rest of
        // its store is the block's activation gradients, freed with it.
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        let keep = |grads: &mut HashMap<TensorId, Tensor>, store: GradStore| {
            for id in store.get_ids() {
                if trained.contains(id) {
                    let grad = store.get_id(*id).expect("listed").clone();
                    let sum = match grads.remove(id) {
                        Some(before) => (before + grad)?,
                        None => grad,
                    };
                    grads.insert(*id, sum);
                }
            }
            candle_core::Result::Ok(())
        };

        // The head and the final norm, from the last block's output.
        let loss = self.weighted_head_loss(&hidden, labels, weighting)?;
        let Some(surrogate) = loss.surrogate else {
            return Ok(None);
        };
        let store = surrogate.backward()?;
        let last = kept
            .last
            .as_ref()
            .expect("a checkpointed pass keeps its last output");
        let mut upstream = store.get(last.as_tensor()).cloned();
        keep(&mut grads, store)?;

        for (layer, input) in kept.inputs.iter().enumerate().rev() {
            let Some(grad_out) = upstream.take() else {
                break;
            };
            let input = Var::from_tensor(input)?;
            let mut pass = Pass::recompute(layer, input.clone());
            self.body().forward(batch, &mut pass)?;
            let output = pass.into_output().expect("the block was recomputed");
            let store = (output * grad_out.detach())?.sum_all()?.backward()?;
            upstream = store.get(input.as_tensor()).cloned();
            keep(&mut grads, store)?;
        }
        if let (Some(grad_embedded), Some(embedded)) = (upstream, kept.embedded) {
            if embedded.track_op() {
                let store = (embedded * grad_embedded.detach())?.sum_all()?.backward()?;
                keep(&mut grads, store)?;
            }
        }
        Ok(Some(LossGrads {
            nll_sum: loss.nll_sum,
            label_nll: loss.label_nll,
            store: grads,
            head_grads: self.head_grads(loss.head_grads),
        }))
    }

    /// The fused loss head with the gradient `weighting` asks for (see
    /// [`ops::lm_head_loss_weighted_by`]).
    fn weighted_head_loss(
        &self,
        hidden: &Tensor,
        labels: &[i64],
        weighting: &mut Weighting,
    ) -> candle_core::Result<ops::LmLoss> {
        match weighting {
            Weighting::Uniform(scale) => {
                self.head_loss(hidden, labels, Some(ops::GradScale::Uniform(*scale)))
            }
            Weighting::FromNll(weigh) => {
                let head = self.body().lm_head();
                ops::lm_head_loss_weighted_by(
                    hidden,
                    head_weight(head)?,
                    head.bias.as_ref(),
                    labels,
                    *weigh,
                    self.operands,
                )
            }
        }
    }

    /// The fused loss head over `hidden` (see [`ops::lm_head_loss`]).
    fn head_loss(
        &self,
        hidden: &Tensor,
        labels: &[i64],
        grad_scale: Option<ops::GradScale>,
    ) -> candle_core::Result<ops::LmLoss> {
        let head = self.body().lm_head();
        ops::lm_head_loss(
            hidden,
            head_weight(head)?,
            head.bias.as_ref(),
            labels,
            grad_scale,
            self.operands,
        )
    }

    /// The fused loss head's gradients, by the head's HF parameter names.
    fn head_grads(&self, grads: Option<(Tensor, Option<Tensor>)>) -> Vec<(&'static str, Tensor)> {
        let mut head_grads = Vec::new();
        if let Some((weight_grad, bias_grad)) = grads {
            let (weight_name, bias_name) = self.config.head_parameter_names();
            head_grads.push((weight_name, weight_grad));
            if let (Some(name), Some(grad)) = (bias_name, bias_grad) {
                head_grads.push((name, grad));
            }
        }
        head_grads
    }
}

/// How the gradient of a backward weighs the labelled positions.
enum Weighting<'a> {
    /// `scale ×` the summed cross-entropy.
    Uniform(f64),
    /// Per position, from every position's cross-entropy.
    FromNll(&'a mut dyn FnMut(&[f64]) -> candle_core::Result<Vec<f64>>),
}

/// The gradients of one backward of the training loss, by parameter: the head's come from the
/// fused loss head, the rest from autograd through the hidden states.
pub struct LossGrads {
    /// Cross-entropy summed over the labelled positions.
    pub nll_sum: f64,
    /// The cross-entropy of each labelled position, in position order.
    pub label_nll: Vec<f64>,
    /// By tensor.
    store: HashMap<TensorId, Tensor>,
    /// By HF name: the head is found by name because the model may compute with a converted
    /// copy (fp16/bf16) of the parameter the caller holds.
    head_grads: Vec<(&'static str, Tensor)>,
}

impl LossGrads {
    /// The gradient of parameter `name` (HF's name) whose tensor is `param`, in `param`'s dtype;
    /// `None` where no gradient reached it. A head tied to the embedding gets both: what the
    /// embedding lookup passed back and what the head's products did.
    pub fn get(&self, name: &str, param: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let head = self.head_grads.iter().find(|(n, _)| *n == name);
        let graph = self.store.get(&param.id());
        Ok(match (head, graph) {
            (Some((_, head)), Some(graph)) => Some((graph + head.to_dtype(graph.dtype())?)?),
            (Some((_, head)), None) => Some(head.to_dtype(param.dtype())?),
            (None, graph) => graph.cloned(),
        })
    }
}

/// Mean next-token cross-entropy over the positions whose label is not `ignore` (HF's -100),
/// with labels already aligned to the logits (shifted by the caller). Computed in fp32.
pub fn causal_lm_loss(logits: &Tensor, labels: &[i64]) -> candle_core::Result<Tensor> {
    let vocab = logits.dim(D::Minus1)?;
    let flat = logits.reshape(((), vocab))?;
    let (rows, targets): (Vec<u32>, Vec<u32>) = labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l >= 0)
        .map(|(i, &l)| (i as u32, l as u32))
        .unzip();
    if rows.is_empty() {
        candle_core::bail!("no position has a label: the loss is undefined");
    }
    let device = logits.device();
    let n = rows.len();
    let picked = flat.index_select(&Tensor::from_vec(rows, n, device)?, 0)?;
    let log_probs = candle_nn::ops::log_softmax(&picked.to_dtype(DType::F32)?, D::Minus1)?;
    let targets = Tensor::from_vec(targets, (n, 1), device)?;
    let nll = log_probs.gather(&targets, 1)?.neg()?;
    nll.mean_all()
}

/// Labels for next-token prediction: position i is trained to predict token i+1 of the same row;
/// positions whose next token is padding (or that end a row) get -100.
pub fn shifted_labels(rows: &[Vec<u32>], seq: usize) -> Vec<i64> {
    let mut labels = Vec::with_capacity(rows.len() * seq);
    for row in rows {
        for i in 0..seq {
            labels.push(if i + 1 < row.len() {
                row[i + 1] as i64
            } else {
                -100
            });
        }
    }
    labels
}

/// The head's weight: never quantised (see `model::quantized`).
fn head_weight(head: &ops::Linear) -> candle_core::Result<&Tensor> {
    head.dense_weight().ok_or_else(|| {
        candle_core::Error::msg("the lm_head is quantised; only block layers may be")
    })
}
