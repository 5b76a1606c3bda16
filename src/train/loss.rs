//! The lm_head and next-token cross-entropy fused, computed in row chunks with its gradient.
//!
//! Over GPT-J's 50400-word vocabulary the logits of a micro-batch (2048 tokens) are 400 MB in
//! fp32, and candle's autograd would hold them, their softmax, and several same-size gradient
//! buffers at once. Here the logits exist one chunk of rows at a time: each chunk's loss and
//! its gradient `softmax - onehot` are computed, pushed through the head's matmuls at once, and
//! dropped. What autograd sees is a *surrogate*: `sum(h * dh)` with the precomputed gradient
//! as a constant, whose backward delivers exactly `dh` into the transformer below `h`. The head's
//! own gradients are returned as fp32 tensors for the caller to use as the master weights'
//! gradients directly (the head in the compute dtype is a plain cast of them, so the cast's
//! backward would only convert back), which spares autograd three passes over a 50 MB weight.

use candle_core::{DType, Result, Tensor, D};
use rayon::prelude::*;

/// Rows of logits materialised at once: 128 × 50400 fp32 is 26 MB, below glibc's largest mmap
/// threshold, so chunk buffers are reused from the heap instead of freshly mapped and faulted in.
const CHUNK_ROWS: usize = 128;

/// Positions that have a label (not HF's -100) and their labels.
fn labelled_positions(labels: &[i64]) -> (Vec<u32>, Vec<u32>) {
    labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l >= 0)
        .map(|(i, &l)| (i as u32, l as u32))
        .unzip()
}

pub struct LmLoss {
    /// Sum of the cross-entropy over rows with a label.
    pub nll_sum: f64,
    /// A scalar whose gradient with respect to the hidden states is `grad_scale ×` that of
    /// `nll_sum` (when asked for).
    pub surrogate: Option<Tensor>,
    /// `grad_scale ×` the gradient of `nll_sum` for the head's weight and bias, fp32.
    pub head_grads: Option<(Tensor, Option<Tensor>)>,
}

/// Cross-entropy summed over rows of `hidden` (`[..., n_embd]`, flattened) whose label is not
/// negative, through the head `weight` `[vocab, n_embd]` and `bias`. With `grad_scale`, also the
/// surrogate for backward.
pub fn lm_head_loss(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    labels: &[i64],
    grad_scale: Option<f64>,
) -> Result<LmLoss> {
    let (vocab, n_embd) = weight.dims2()?;
    let hidden = hidden.reshape(((), n_embd))?;
    if hidden.dim(0)? != labels.len() {
        candle_core::bail!("{} labels for {} positions", labels.len(), hidden.dim(0)?);
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= vocab as i64) {
        candle_core::bail!("label {bad} is outside the vocabulary of {vocab}");
    }
    let (rows, targets) = labelled_positions(labels);
    let device = hidden.device();
    let dtype = hidden.dtype();
    let n = rows.len();
    let row_index = Tensor::from_vec(rows, n, device)?;
    let picked = hidden.detach().index_select(&row_index, 0)?;
    let w = weight.detach();
    // The bias is added while each row of logits is read anyway, instead of as a broadcast op.
    let bias_values: Option<Vec<f32>> = bias
        .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
        .transpose()?;
    let mut nll_sum = 0f64;
    let mut grad_hidden = Vec::new();
    let mut grad_w: Option<Tensor> = None;
    let mut grad_b: Option<Tensor> = None;
    for start in (0..n).step_by(CHUNK_ROWS) {
        let len = CHUNK_ROWS.min(n - start);
        let h = picked.narrow(0, start, len)?;
        let logits = h.matmul(&w.t()?)?;
        let mut values = logits
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        drop(logits);
        let chunk_targets = &targets[start..start + len];
        let scale = grad_scale.unwrap_or(0.0) as f32;
        let want_grad = grad_scale.is_some();
        nll_sum += values
            .par_chunks_mut(vocab)
            .zip(chunk_targets.par_iter())
            .map(|(row, &target)| {
                if let Some(bias) = &bias_values {
                    row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
                }
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let target_logit = row[target as usize];
                // The row becomes exp(x - max) in place, so the gradient needs no second exp.
                let mut sum = 0f32;
                for x in row.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let nll = (max + sum.ln() - target_logit) as f64;
                if want_grad {
                    let factor = scale / sum;
                    row.iter_mut().for_each(|x| *x *= factor);
                    row[target as usize] -= scale;
                }
                nll
            })
            .sum::<f64>();
        if !want_grad {
            continue;
        }
        let g = Tensor::from_vec(values, (len, vocab), device)?.to_dtype(dtype)?;
        grad_hidden.push(g.matmul(&w)?);
        let gw = g.t()?.matmul(&h)?.to_dtype(DType::F32)?;
        grad_w = Some(match grad_w {
            Some(acc) => (acc + gw)?,
            None => gw,
        });
        if bias.is_some() {
            // Column sums as a matmul: a reduction over the leading dim is slow in candle.
            let ones = Tensor::ones((1, len), dtype, device)?;
            let gb = ones.matmul(&g)?.squeeze(0)?.to_dtype(DType::F32)?;
            grad_b = Some(match grad_b {
                Some(acc) => (acc + gb)?,
                None => gb,
            });
        }
    }
    if grad_scale.is_none() || n == 0 {
        return Ok(LmLoss {
            nll_sum,
            surrogate: None,
            head_grads: None,
        });
    }
    let grad_picked = Tensor::cat(&grad_hidden, 0)?;
    // Scatter the picked rows' gradients back to their positions.
    let grad_h = hidden
        .zeros_like()?
        .detach()
        .index_add(&row_index, &grad_picked, 0)?;
    let surrogate = (hidden * grad_h)?.sum_all()?.to_dtype(DType::F32)?;
    let grad_w = grad_w.expect("chunks ran");
    Ok(LmLoss {
        nll_sum,
        surrogate: Some(surrogate),
        head_grads: Some((grad_w, grad_b)),
    })
}

/// Reference: the same loss from candle's differentiable primitives over full logits.
pub fn composite_nll_sum(logits: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let vocab = logits.dim(D::Minus1)?;
    let flat = logits.reshape(((), vocab))?.to_dtype(DType::F32)?;
    let (rows, targets) = labelled_positions(labels);
    let device = logits.device();
    let n = rows.len();
    let picked = flat.index_select(&Tensor::from_vec(rows, n, device)?, 0)?;
    let log_probs = candle_nn::ops::log_softmax(&picked, D::Minus1)?;
    let targets = Tensor::from_vec(targets, (n, 1), device)?;
    log_probs.gather(&targets, 1)?.neg()?.sum_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_loss_and_gradients_match_the_composite() -> Result<()> {
        let device = Device::Cpu;
        // More rows than one chunk, so chunk accumulation is exercised.
        let rows = CHUNK_ROWS + 37;
        let hidden = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, 16), &device)?)?;
        let weight = Var::from_tensor(&Tensor::randn(0f32, 0.5, (29, 16), &device)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.5, 29, &device)?)?;
        let labels: Vec<i64> = (0..rows as i64)
            .map(|i| if i % 5 == 0 { -100 } else { i % 29 })
            .collect();
        let fused = lm_head_loss(&hidden, &weight, Some(&bias), &labels, Some(0.25))?;
        let logits = hidden.matmul(&weight.t()?)?.broadcast_add(&bias)?;
        let reference = composite_nll_sum(&logits, &labels)?;
        let expected = reference.to_scalar::<f32>()? as f64;
        assert!(
            (fused.nll_sum - expected).abs() < 1e-5 * expected,
            "{} vs {expected}",
            fused.nll_sum
        );
        let ours = fused.surrogate.unwrap().backward()?;
        let (grad_w, grad_b) = fused.head_grads.unwrap();
        let theirs = (reference * 0.25)?.backward()?;
        for (var, a) in [
            (&hidden, ours.get(&hidden).unwrap()),
            (&weight, &grad_w),
            (&bias, &grad_b.unwrap()),
        ] {
            assert!(
                ours.get(&weight).is_none(),
                "the head is outside the surrogate"
            );
            let b = theirs.get(var).unwrap();
            let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "gradients differ by {diff}");
        }
        Ok(())
    }
}
