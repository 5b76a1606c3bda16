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

use super::{is_half, use_fused};
use crate::cpu::fused::{add_column_sums, zeroed};
use crate::cpu::gemm::{self, MatRef, Operands, Rhs};
use crate::cpu::vmath::{exp_shifted_in_place, lane_max, simd_kernel};

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

/// How the loss's gradient weighs each labelled position.
#[derive(Debug, Clone, Copy)]
pub enum GradScale<'a> {
    /// Every position the same: the gradient of `scale × nll sum`.
    Uniform(f64),
    /// One weight per labelled position, in position order: the gradient of
    /// `Σ weight × nll` (a preference objective's share of each sequence in its pair's loss).
    PerLabel(&'a [f64]),
}

impl GradScale<'_> {
    /// The weight of the `i`-th labelled position.
    fn at(&self, i: usize) -> f64 {
        match self {
            GradScale::Uniform(scale) => *scale,
            GradScale::PerLabel(weights) => weights[i],
        }
    }
}

pub struct LmLoss {
    /// Sum of the cross-entropy over rows with a label.
    pub nll_sum: f64,
    /// The cross-entropy of each labelled position, in position order.
    pub label_nll: Vec<f64>,
    /// A scalar whose gradient with respect to the hidden states is `grad_scale ×` that of
    /// `nll_sum` (when asked for).
    pub surrogate: Option<Tensor>,
    /// `grad_scale ×` the gradient of `nll_sum` for the head's weight and bias, fp32 (none for a
    /// head autograd does not track: a frozen one).
    pub head_grads: Option<(Tensor, Option<Tensor>)>,
}

/// Cross-entropy summed over rows of `hidden` (`[..., n_embd]`, flattened) whose label is not
/// negative, through the head `weight` `[vocab, n_embd]` and `bias`. With `grad_scale`, also the
/// surrogate for backward, whose gradient weighs each position as `grad_scale` says.
/// `operands` is the head matmuls' precision when the tensors are fp32 on the CPU (the model's
/// [`crate::model::Model::matmul_operands`]); otherwise the tensors' dtype decides.
pub fn lm_head_loss(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    labels: &[i64],
    grad_scale: Option<GradScale>,
    operands: Operands,
) -> Result<LmLoss> {
    fused_loss(hidden, (weight, bias), labels, grad_scale, operands, None)
}

/// How much each labelled position's gradient weighs, chosen from every position's
/// cross-entropy.
pub type Weigh<'a> = &'a mut dyn FnMut(&[f64]) -> Result<Vec<f64>>;

/// [`lm_head_loss`] with the gradient of `Σ weight × nll`, the weights chosen by `weigh` from
/// the positions' cross-entropies once they are known (a preference objective's: how much each
/// sequence counts depends on its pair's log-probabilities). A frozen head (LoRA) on the CPU needs
/// one pass: each position's hidden-state gradient is its unweighted one times its weight. A
/// trained head needs two, the first to find the cross-entropies, since its weight's gradient
/// sums the positions' weighted ones (and so does any head on a GPU, whose gradients are rounded
/// to the compute dtype as they are made).
pub fn lm_head_loss_weighted_by(
    hidden: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    labels: &[i64],
    weigh: Weigh,
    operands: Operands,
) -> Result<LmLoss> {
    let head = (weight, bias);
    // One pass scales fp32 gradients on the CPU; elsewhere they would be rounded to half
    // precision before the weights (and the fp16 loss scale) reach them.
    let frozen = !weight.track_op() && !bias.is_some_and(Tensor::track_op);
    if !(frozen && use_fused(hidden)) {
        let found = fused_loss(hidden, head, labels, None, operands, None)?;
        let weights = weigh(&found.label_nll)?;
        let scale = Some(GradScale::PerLabel(&weights));
        return fused_loss(hidden, head, labels, scale, operands, None);
    }
    let unit = Some(GradScale::Uniform(1.0));
    fused_loss(hidden, head, labels, unit, operands, Some(weigh))
}

/// The fused head's loss; with `reweigh`, the picked rows' gradients are scaled afterwards by
/// the weights it gives (a frozen head only: its weight gets no gradient to scale).
fn fused_loss(
    hidden: &Tensor,
    (weight, bias): (&Tensor, Option<&Tensor>),
    labels: &[i64],
    grad_scale: Option<GradScale>,
    operands: Operands,
    reweigh: Option<Weigh>,
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
    let n = rows.len();
    if let Some(GradScale::PerLabel(weights)) = grad_scale {
        check_weights(weights.len(), n)?;
    }
    let row_index = Tensor::from_vec(rows, n, device)?;
    let picked = hidden.detach().index_select(&row_index, 0)?;
    let head_trains = weight.track_op();
    // A frozen half-precision head (LoRA on the CPU) is widened for this loss only.
    let widened;
    let weight = if use_fused(&hidden) && is_half(weight) {
        widened = weight.to_dtype(DType::F32)?;
        &widened
    } else {
        weight
    };
    let (label_nll, grad_picked, head_grads) = if use_fused(&hidden) && weight.dtype() == DType::F32
    {
        cpu_chunks(
            &picked,
            weight,
            bias,
            &targets,
            grad_scale,
            operands,
            head_trains,
        )?
    } else {
        generic_chunks(&picked, weight, bias, &targets, grad_scale)?
    };
    // In position order, one after the other: the same sum however the chunks were split.
    let nll_sum = label_nll.iter().sum();
    let grad_picked = match (grad_picked, reweigh) {
        (Some(grad), Some(reweigh)) => {
            let weights: Vec<f32> = (reweigh(&label_nll)?.iter()).map(|&w| w as f32).collect();
            check_weights(weights.len(), n)?;
            let column = Tensor::from_vec(weights, (n, 1), device)?.to_dtype(grad.dtype())?;
            Some(grad.broadcast_mul(&column)?)
        }
        (grad, _) => grad,
    };
    let Some(grad_picked) = grad_picked else {
        return Ok(LmLoss {
            nll_sum,
            label_nll,
            surrogate: None,
            head_grads: None,
        });
    };
    // Scatter the picked rows' gradients back to their positions.
    let grad_h = hidden
        .zeros_like()?
        .detach()
        .index_add(&row_index, &grad_picked, 0)?;
    let surrogate = (hidden * grad_h)?.sum_all()?.to_dtype(DType::F32)?;
    Ok(LmLoss {
        nll_sum,
        label_nll,
        surrogate: Some(surrogate),
        head_grads,
    })
}

/// One gradient weight for each of the `n` labelled positions.
fn check_weights(weights: usize, n: usize) -> Result<()> {
    if weights != n {
        candle_core::bail!("{weights} gradient weights for {n} labelled positions");
    }
    Ok(())
}

/// Each picked row's loss, the gradient of the picked rows (in their dtype) and the head's fp32
/// gradients.
type ChunkResults = (Vec<f64>, Option<Tensor>, Option<(Tensor, Option<Tensor>)>);

/// Any device and dtype, from candle ops on the tensors' device: the logits of a chunk are
/// upcast to fp32 (as HF does), and the only value that leaves the device is the loss sum.
fn generic_chunks(
    picked: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &[u32],
    grad_scale: Option<GradScale>,
) -> Result<ChunkResults> {
    let (vocab, _) = weight.dims2()?;
    let (device, dtype, n) = (picked.device(), picked.dtype(), picked.dim(0)?);
    let w = weight.detach();
    let bias = bias.map(|b| b.detach().to_dtype(DType::F32)).transpose()?;
    let targets = Tensor::from_slice(targets, n, device)?;
    let mut chunk_nll = Vec::new();
    let mut grad_hidden = Vec::new();
    let mut grad_w: Option<Tensor> = None;
    let mut grad_b: Option<Tensor> = None;
    for start in (0..n).step_by(CHUNK_ROWS) {
        let len = CHUNK_ROWS.min(n - start);
        let h = picked.narrow(0, start, len)?;
        let logits = h.matmul(&w.t()?)?.to_dtype(DType::F32)?;
        let logits = match &bias {
            Some(b) => logits.broadcast_add(b)?,
            None => logits,
        };
        let chunk_targets = targets.narrow(0, start, len)?.unsqueeze(1)?;
        let shifted = logits.broadcast_sub(&logits.max_keepdim(1)?)?;
        let exp = shifted.exp()?;
        let sum = exp.sum_keepdim(1)?;
        // nll = log Σ exp(x - max) - (x_target - max)
        let nll = (sum.log()? - shifted.gather(&chunk_targets, 1)?)?;
        chunk_nll.push(nll.flatten_all()?);
        let Some(scale) = grad_scale else { continue };
        let onehot = Tensor::zeros((len, vocab), DType::F32, device)?.scatter_add(
            &chunk_targets,
            &Tensor::ones((len, 1), DType::F32, device)?,
            1,
        )?;
        let g32 = (exp.broadcast_div(&sum)? - onehot)?;
        let g32 = match scale {
            GradScale::Uniform(scale) => (g32 * scale)?,
            GradScale::PerLabel(weights) => {
                let weights: Vec<f32> = weights[start..start + len]
                    .iter()
                    .map(|&w| w as f32)
                    .collect();
                g32.broadcast_mul(&Tensor::from_vec(weights, (len, 1), device)?)?
            }
        };
        let g = g32.to_dtype(dtype)?;
        grad_hidden.push(g.matmul(&w)?);
        let gw = g.t()?.matmul(&h)?.to_dtype(DType::F32)?;
        grad_w = Some(match grad_w {
            Some(acc) => (acc + gw)?,
            None => gw,
        });
        if bias.is_some() {
            // Column sums as a matmul: a reduction over the leading dim is slow in candle.
            let ones = Tensor::ones((1, len), DType::F32, device)?;
            let gb = ones.matmul(&g32)?.squeeze(0)?;
            grad_b = Some(match grad_b {
                Some(acc) => (acc + gb)?,
                None => gb,
            });
        }
    }
    // The only values that leave the device: one per labelled position.
    let label_nll: Vec<f64> = match chunk_nll.is_empty() {
        true => Vec::new(),
        false => Tensor::cat(&chunk_nll, 0)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?,
    };
    if grad_scale.is_none() || n == 0 {
        return Ok((label_nll, None, None));
    }
    let grad_picked = Tensor::cat(&grad_hidden, 0)?;
    let grad_w = grad_w.expect("chunks ran");
    Ok((label_nll, Some(grad_picked), Some((grad_w, grad_b))))
}

/// fp32 tensors on the CPU: the head's products straight into reused buffers, the weight's
/// gradient accumulated in place, softmax and its gradient in one vectorised pass per row.
fn cpu_chunks(
    picked: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    targets: &[u32],
    grad_scale: Option<GradScale>,
    operands: Operands,
    head_trains: bool,
) -> Result<ChunkResults> {
    let (vocab, d) = weight.dims2()?;
    let n = picked.dim(0)?;
    let device = picked.device();
    let h = picked.flatten_all()?.to_vec1::<f32>()?;
    let bias_values: Option<Vec<f32>> = bias
        .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
        .transpose()?;
    let (storage, layout) = weight.storage_and_layout();
    let candle_core::Storage::Cpu(storage) = &*storage else {
        candle_core::bail!("the CPU loss needs the head weight on the CPU");
    };
    let w = MatRef::row_major(
        crate::cpu::fused::contiguous_f32(storage, layout)?,
        vocab,
        d,
    );
    let head_t = Rhs::prepare(operands, w.t());
    // The backward's `g · W` reads the forward's operand the other way round: one copy serves
    // both (a 6B model's head is 0.8 GB of fp32 per copy).
    let head = grad_scale.map(|_| {
        head_t
            .transposed()
            .unwrap_or_else(|| Rhs::prepare(operands, w))
    });
    let want_grad = grad_scale.is_some();
    // A frozen head (LoRA) needs the hidden states' gradient only.
    let want_head_grad = want_grad && head_trains;
    // The head's weight gradient is accumulated as `[n_embd, vocab]` (`hᵀ · g` per chunk) and
    // transposed once at the end: that product has the same shape as the forward one, which the
    // SGEMM runs about 15% faster than `gᵀ · h` with its 50400-row output. The AMX kernel keeps
    // `gᵀ · h`, whose right-hand side (the chunk of `h`) is small to pack into tiles.
    let transposed_grad_w = !matches!(head_t, Rhs::Tiles(_));
    let mut label_nll = Vec::with_capacity(n);
    let mut grad_h = vec![0f32; if want_grad { n * d } else { 0 }];
    let mut grad_w = zeroed(if want_head_grad { vocab * d } else { 0 });
    let mut grad_b = vec![
        0f32;
        if want_head_grad && bias.is_some() {
            vocab
        } else {
            0
        }
    ];
    let mut logits = zeroed(CPU_CHUNK_ROWS.min(n) * vocab);
    for start in (0..n).step_by(CPU_CHUNK_ROWS) {
        let len = CPU_CHUNK_ROWS.min(n - start);
        let h_chunk = MatRef::row_major(&h[start * d..(start + len) * d], len, d);
        let values = &mut logits[..len * vocab];
        gemm::matmul_prepared(h_chunk, &head_t, values, false);
        let chunk_targets = &targets[start..start + len];
        let mut chunk_nll = Vec::with_capacity(len);
        values
            .par_chunks_mut(vocab)
            .zip(chunk_targets.par_iter())
            .enumerate()
            .map(|(i, (row, &target))| {
                let scale = grad_scale.map(|scale| scale.at(start + i) as f32);
                softmax_cross_entropy(row, bias_values.as_deref(), target as usize, scale)
            })
            .collect_into_vec(&mut chunk_nll);
        label_nll.extend(chunk_nll);
        let Some(head) = &head else { continue };
        let g = MatRef::row_major(values, len, vocab);
        gemm::matmul_prepared(g, head, &mut grad_h[start * d..(start + len) * d], false);
        if !want_head_grad {
            continue;
        }
        if transposed_grad_w {
            gemm::matmul(operands, h_chunk.t(), g, &mut grad_w, start > 0);
        } else {
            gemm::matmul(operands, g.t(), h_chunk, &mut grad_w, start > 0);
        }
        if !grad_b.is_empty() {
            add_column_sums(values, vocab, &mut grad_b);
        }
    }
    if !want_grad || n == 0 {
        return Ok((label_nll, None, None));
    }
    let grad_picked = Tensor::from_vec(grad_h, (n, d), device)?;
    if !want_head_grad {
        return Ok((label_nll, Some(grad_picked), None));
    }
    if transposed_grad_w {
        grad_w = transposed(&grad_w, d, vocab);
    }
    let grad_w = Tensor::from_vec(grad_w, (vocab, d), device)?;
    let grad_b = bias
        .map(|_| Tensor::from_vec(grad_b, vocab, device))
        .transpose()?;
    Ok((label_nll, Some(grad_picked), Some((grad_w, grad_b))))
}

/// The transpose of a row-major `rows × cols` matrix, in parallel over tiles of output rows.
fn transposed(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 64;
    let mut out = zeroed(rows * cols);
    out.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(tile, out_rows)| {
            let first_col = tile * TILE;
            let width = out_rows.len() / rows;
            for r0 in (0..rows).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    let src = &values[r * cols + first_col..r * cols + first_col + width];
                    for (j, &x) in src.iter().enumerate() {
                        out_rows[j * rows + r] = x;
                    }
                }
            }
        });
    out
}

/// Rows of logits per chunk on the CPU: 256 × 50400 fp32 is 52 MB, one buffer reused for every
/// chunk; larger chunks mean fewer passes over the 50 MB weight gradient.
pub const CPU_CHUNK_ROWS: usize = 256;

simd_kernel! {
    /// One row of logits (plus `bias`) to its cross-entropy against `target`; with
    /// `grad_scale`, the row becomes `grad_scale × (softmax - onehot)`, the loss's gradient.
    fn softmax_cross_entropy(
        row: &mut [f32],
        bias: Option<&[f32]>,
        target: usize,
        grad_scale: Option<f32>,
    ) -> f64 {
        if let Some(bias) = bias {
            row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
        }
        let target_logit = row[target];
        let max = lane_max(row);
        let sum = exp_shifted_in_place(row, max);
        if let Some(scale) = grad_scale {
            let factor = scale / sum;
            row.iter_mut().for_each(|x| *x *= factor);
            row[target] -= scale;
        }
        (max as f64) + (sum as f64).ln() - target_logit as f64
    }
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
    fn transpose_and_column_sums_cross_their_blocks() {
        let (rows, cols) = (70, 4100);
        let values: Vec<f32> = (0..rows * cols).map(|i| (i % 1013) as f32 * 0.5).collect();
        let t = transposed(&values, rows, cols);
        for (r, c) in [(0, 0), (69, 4099), (5, 64), (64, 5), (33, 2048), (69, 0)] {
            assert_eq!(t[c * rows + r], values[r * cols + c], "({r}, {c})");
        }
        assert!((0..rows * cols).all(|i| t[(i % cols) * rows + i / cols] == values[i]));
        let mut sums = vec![1f32; cols];
        add_column_sums(&values, cols, &mut sums);
        for c in [0, 2047, 2048, 4099] {
            let expected = 1.0 + (0..rows).map(|r| values[r * cols + c]).sum::<f32>();
            assert_eq!(sums[c], expected, "column {c}");
        }
    }

    #[test]
    fn fused_loss_and_gradients_match_the_composite() -> Result<()> {
        let device = Device::Cpu;
        // More rows than one chunk, so chunk accumulation is exercised.
        let rows = CPU_CHUNK_ROWS + 37;
        let hidden = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, 16), &device)?)?;
        let weight = Var::from_tensor(&Tensor::randn(0f32, 0.5, (29, 16), &device)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.5, 29, &device)?)?;
        let labels: Vec<i64> = (0..rows as i64)
            .map(|i| if i % 5 == 0 { -100 } else { i % 29 })
            .collect();
        let fused = lm_head_loss(
            &hidden,
            &weight,
            Some(&bias),
            &labels,
            Some(GradScale::Uniform(0.25)),
            Operands::F32,
        )?;
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

    fn chunk_inputs(
        rows: usize,
        vocab: usize,
        d: usize,
    ) -> Result<(Tensor, Tensor, Tensor, Vec<u32>)> {
        let device = Device::Cpu;
        let picked = Tensor::randn(0f32, 1.0, (rows, d), &device)?;
        let weight = Tensor::randn(0f32, 0.5, (vocab, d), &device)?;
        let bias = Tensor::randn(0f32, 0.5, vocab, &device)?;
        let targets = (0..rows as u32).map(|i| (i * 7) % vocab as u32).collect();
        Ok((picked, weight, bias, targets))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn max_abs(a: &Tensor) -> f32 {
        a.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn cpu_and_generic_chunk_paths_agree() -> Result<()> {
        // Two CPU chunks and seven generic ones, with a ragged last chunk in both.
        let (picked, weight, bias, targets) = chunk_inputs(2 * CPU_CHUNK_ROWS + 5, 333, 24)?;
        let (nll_a, gh_a, heads_a) = cpu_chunks(
            &picked,
            &weight,
            Some(&bias),
            &targets,
            Some(GradScale::Uniform(0.5)),
            Operands::F32,
            true,
        )?;
        let (nll_b, gh_b, heads_b) = generic_chunks(
            &picked,
            &weight,
            Some(&bias),
            &targets,
            Some(GradScale::Uniform(0.5)),
        )?;
        assert_eq!(nll_a.len(), targets.len());
        for (a, b) in nll_a.iter().zip(&nll_b) {
            assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
        let nll_a: f64 = nll_a.iter().sum();
        let ((gw_a, gb_a), (gw_b, gb_b)) = (heads_a.unwrap(), heads_b.unwrap());
        for (a, b) in [
            (gh_a.unwrap(), gh_b.unwrap()),
            (gw_a, gw_b),
            (gb_a.unwrap(), gb_b.unwrap()),
        ] {
            assert!(
                max_diff(&a, &b) < 1e-5 * max_abs(&b).max(1.0),
                "gradients differ"
            );
        }
        // Without a gradient scale only the loss comes back.
        let (nll_c, none, no_heads) =
            cpu_chunks(&picked, &weight, None, &targets, None, Operands::F32, true)?;
        assert!(none.is_none() && no_heads.is_none());
        let nll_c: f64 = nll_c.iter().sum();
        assert!(
            (nll_c - nll_a).abs() > 1e-3,
            "the bias was left out, so the loss differs"
        );
        Ok(())
    }

    /// Per-position weights give the gradient of `Σ weight × nll`: the uniform gradient of each
    /// position alone, scaled and summed, on both paths.
    #[test]
    fn per_label_weights_scale_each_position() -> Result<()> {
        let (picked, weight, bias, targets) = chunk_inputs(CPU_CHUNK_ROWS + 3, 50, 12)?;
        let n = targets.len();
        let weights: Vec<f64> = (0..n).map(|i| (i % 7) as f64 * 0.3 - 0.9).collect();
        let scale = Some(GradScale::PerLabel(&weights));
        let cpu = cpu_chunks(
            &picked,
            &weight,
            Some(&bias),
            &targets,
            scale,
            Operands::F32,
            true,
        )?;
        let generic = generic_chunks(&picked, &weight, Some(&bias), &targets, scale)?;
        // Each row's gradient is its uniform one times its weight.
        let (_, uniform_h, _) = cpu_chunks(
            &picked,
            &weight,
            Some(&bias),
            &targets,
            Some(GradScale::Uniform(1.0)),
            Operands::F32,
            true,
        )?;
        let column = Tensor::from_vec(
            weights.iter().map(|&w| w as f32).collect::<Vec<_>>(),
            (n, 1),
            &Device::Cpu,
        )?;
        let expected_h = uniform_h.unwrap().broadcast_mul(&column)?;
        // The bias gradient is the column sums of the weighted softmax gradients: recomputed
        // here from the composite.
        let logits = picked.matmul(&weight.t()?)?.broadcast_add(&bias)?;
        let softmax = candle_nn::ops::softmax_last_dim(&logits)?;
        let onehot: Vec<f32> = (0..n * 50)
            .map(|k| f32::from(targets[k / 50] as usize == k % 50))
            .collect();
        let g =
            (softmax - Tensor::from_vec(onehot, (n, 50), &Device::Cpu)?)?.broadcast_mul(&column)?;
        let expected_b = g.sum(0)?;
        let expected_w = g.t()?.matmul(&picked)?;
        for (nll, grad_h, heads) in [cpu, generic] {
            assert_eq!(nll.len(), n);
            let (gw, gb) = heads.unwrap();
            for (a, b) in [
                (grad_h.unwrap(), &expected_h),
                (gw, &expected_w),
                (gb.unwrap(), &expected_b),
            ] {
                assert!(
                    max_diff(&a, b) < 1e-5 * max_abs(b).max(1.0),
                    "gradients differ"
                );
            }
        }
        Ok(())
    }

    /// Weights chosen from the cross-entropies: one pass for a frozen head, two for a trained
    /// one, the same gradients as weights known in advance.
    #[test]
    fn weights_chosen_after_the_forward_equal_weights_known_before() -> Result<()> {
        let (picked, weight, bias, targets) = chunk_inputs(CPU_CHUNK_ROWS + 11, 60, 16)?;
        let labels: Vec<i64> = targets.iter().map(|&t| t as i64).collect();
        let hidden = Var::from_tensor(&picked)?;
        let weights = |nll: &[f64]| -> Vec<f64> { nll.iter().map(|l| 0.5 - l * 0.1).collect() };
        for head_trains in [false, true] {
            let head = match head_trains {
                true => Var::from_tensor(&weight)?.as_tensor().clone(),
                false => weight.clone(),
            };
            let known = {
                let nll = lm_head_loss(&hidden, &head, Some(&bias), &labels, None, Operands::F32)?;
                weights(&nll.label_nll)
            };
            let before = lm_head_loss(
                &hidden,
                &head,
                Some(&bias),
                &labels,
                Some(GradScale::PerLabel(&known)),
                Operands::F32,
            )?;
            let mut weigh = |nll: &[f64]| Ok(weights(nll));
            let after = lm_head_loss_weighted_by(
                &hidden,
                &head,
                Some(&bias),
                &labels,
                &mut weigh,
                Operands::F32,
            )?;
            assert_eq!(before.label_nll, after.label_nll);
            let (a, b) = (
                before.surrogate.unwrap().backward()?,
                after.surrogate.unwrap().backward()?,
            );
            let (a, b) = (a.get(&hidden).unwrap(), b.get(&hidden).unwrap());
            assert!(
                max_diff(a, b) < 1e-6 * max_abs(a).max(1.0),
                "hidden gradients differ"
            );
            assert_eq!(before.head_grads.is_some(), head_trains);
            if let (Some((wa, _)), Some((wb, _))) = (before.head_grads, after.head_grads) {
                assert!(max_diff(&wa, &wb) < 1e-6 * max_abs(&wa).max(1.0));
            }
        }
        Ok(())
    }

    #[test]
    fn bf16_operands_round_the_head_products() -> Result<()> {
        let (picked, weight, bias, targets) = chunk_inputs(CPU_CHUNK_ROWS + 9, 300, 40)?;
        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let (nll, grad_h, heads) = cpu_chunks(
            &picked,
            &weight,
            Some(&bias),
            &targets,
            Some(GradScale::Uniform(1.0)),
            Operands::Bf16,
            true,
        )?;
        // The same loss as fp32 products of the rounded operands.
        let (nll_rounded, grad_h_rounded, heads_rounded) = cpu_chunks(
            &round(&picked)?,
            &round(&weight)?,
            Some(&bias),
            &targets,
            Some(GradScale::Uniform(1.0)),
            Operands::F32,
            true,
        )?;
        let (nll, nll_rounded): (f64, f64) = (nll.iter().sum(), nll_rounded.iter().sum());
        assert!(
            (nll - nll_rounded).abs() < 1e-5 * nll_rounded,
            "{nll} vs {nll_rounded}"
        );
        let (nll_fp32, _, _) = cpu_chunks(
            &picked,
            &weight,
            Some(&bias),
            &targets,
            None,
            Operands::F32,
            true,
        )?;
        // Per position (a sum over random rows can cancel its roundings out).
        let (nll_bf16, _, _) = cpu_chunks(
            &picked,
            &weight,
            Some(&bias),
            &targets,
            None,
            Operands::Bf16,
            true,
        )?;
        let largest = (nll_bf16.iter().zip(&nll_fp32))
            .map(|(a, b)| (a - b).abs())
            .fold(0f64, f64::max);
        let mean = nll_fp32.iter().sum::<f64>() / nll_fp32.len() as f64;
        assert!(
            largest > 1e-5 * mean,
            "bf16 products equal fp32 ones: not rounded? ({largest})"
        );
        // Gradients: the softmax gradient is rounded too before its products, 8 bits of it.
        let (gw, _) = heads.unwrap();
        let (gw_rounded, _) = heads_rounded.unwrap();
        for (a, b) in [(grad_h.unwrap(), grad_h_rounded.unwrap()), (gw, gw_rounded)] {
            let (diff, scale) = (max_diff(&a, &b), max_abs(&b));
            assert!(
                diff < 1e-2 * scale,
                "bf16 gradient off by {diff} (scale {scale})"
            );
        }
        Ok(())
    }

    #[test]
    fn a_nan_logit_makes_loss_and_gradient_nan() {
        // A NaN logit makes the loss and its gradient NaN, so fp16 loss scaling sees it.
        let mut row = vec![0.5f32, f32::NAN, 1.0];
        assert!(softmax_cross_entropy(&mut row, None, 0, Some(1.0)).is_nan());
        assert!(row.iter().all(|x| x.is_nan()));
    }
}

#[cfg(test)]
mod kernel_variants {
    use super::*;
    use crate::cpu::vmath::variants::{check_variants, random, variant_tests, with_edges};

    variant_tests! {
        fn softmax_cross_entropy_variants_agree(isa) {
            let widths = [1, 2, 15, 16, 17, 33, 100, 1029];
            let mut cases = Vec::new();
            for (i, &width) in widths.iter().enumerate() {
                let row = random(width, i as u64, 8.0);
                let bias = random(width, 50 + i as u64, 1.0);
                let target = (i * 7) % width;
                cases.push((row.clone(), None, target, None));
                cases.push((row.clone(), Some(bias.clone()), target, Some(0.25f32)));
                cases.push((with_edges(row, i), Some(bias), target, Some(1.0)));
            }
            check_variants(
                "softmax_cross_entropy",
                isa,
                &cases,
                |(row, bias, target, scale)| {
                    let mut row = row.clone();
                    let loss = softmax_cross_entropy(&mut row, bias.as_deref(), *target, *scale);
                    (row, loss)
                },
            );
        }
    }
}
