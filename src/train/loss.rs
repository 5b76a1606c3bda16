//! Summed next-token cross-entropy as one fused CPU op with its own backward.
//!
//! Over GPT-J's 50400-word vocabulary the logits of a training micro-batch are hundreds of MB;
//! the composite log-softmax/gather graph makes about ten full-size temporaries forward and
//! backward. This op reads the logits once forward (per-row log-sum-exp) and writes the
//! gradient `softmax - onehot` in a single pass backward, parallel over rows.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

/// Sum over rows with a label (>= 0) of `logsumexp(row) - row[label]`; logits `[rows, vocab]`
/// f32, labels one per row, -100 (any negative) for rows that do not count.
pub fn cross_entropy_sum(logits: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let vocab = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), vocab))?.to_dtype(DType::F32)?;
    if logits.dim(0)? != labels.len() {
        candle_core::bail!("{} labels for {} logit rows", labels.len(), logits.dim(0)?);
    }
    if labels.iter().any(|&l| l >= vocab as i64) {
        candle_core::bail!("a label is outside the vocabulary of {vocab}");
    }
    if !logits.device().is_cpu() {
        return composite(&logits, labels);
    }
    logits.contiguous()?.apply_op1(CrossEntropySum {
        labels: labels.to_vec(),
        log_sum_exp: Mutex::new(Vec::new()),
    })
}

/// The same loss from differentiable primitives, for devices the fused op does not cover.
fn composite(logits: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let (rows, targets): (Vec<u32>, Vec<u32>) = labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l >= 0)
        .map(|(i, &l)| (i as u32, l as u32))
        .unzip();
    let device = logits.device();
    let n = rows.len();
    let picked = logits.index_select(&Tensor::from_vec(rows, n, device)?, 0)?;
    let log_probs = candle_nn::ops::log_softmax(&picked, D::Minus1)?;
    let targets = Tensor::from_vec(targets, (n, 1), device)?;
    log_probs.gather(&targets, 1)?.neg()?.sum_all()
}

struct CrossEntropySum {
    labels: Vec<i64>,
    /// Per-row log-sum-exp from the forward pass, reused by the backward pass.
    log_sum_exp: Mutex<Vec<f32>>,
}

fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    max + sum.ln()
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("cross_entropy_sum needs contiguous logits"),
    }
}

impl CustomOp1 for CrossEntropySum {
    fn name(&self) -> &'static str {
        "cross-entropy-sum"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let logits = contiguous_f32(storage, layout)?;
        let vocab = layout.dims()[1];
        let lse: Vec<f32> = logits
            .par_chunks(vocab)
            .zip(&self.labels)
            .map(|(row, &label)| if label >= 0 { log_sum_exp(row) } else { 0.0 })
            .collect();
        let total: f64 = logits
            .chunks(vocab)
            .zip(&self.labels)
            .zip(&lse)
            .filter(|((_, &label), _)| label >= 0)
            .map(|((row, &label), &lse)| (lse - row[label as usize]) as f64)
            .sum();
        *self.log_sum_exp.lock().expect("not poisoned") = lse;
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let scale = grad_res.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let lse = self.log_sum_exp.lock().expect("not poisoned");
        let (storage, layout) = arg.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("cross_entropy_sum runs on the CPU only");
        };
        let logits = contiguous_f32(cpu, layout)?;
        let vocab = layout.dims()[1];
        let mut grad = vec![0f32; logits.len()];
        grad.par_chunks_mut(vocab)
            .zip(logits.par_chunks(vocab))
            .zip(self.labels.par_iter().zip(lse.par_iter()))
            .for_each(|((out, row), (&label, &lse))| {
                if label < 0 {
                    return;
                }
                for (o, &x) in out.iter_mut().zip(row) {
                    *o = (x - lse).exp() * scale;
                }
                out[label as usize] -= scale;
            });
        Ok(Some(Tensor::from_vec(grad, layout.dims(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn fused_loss_and_gradient_match_the_composite() -> Result<()> {
        let device = Device::Cpu;
        let logits = Var::from_tensor(&(Tensor::randn(0f32, 3.0, (6, 37), &device)?))?;
        let labels = [3, -100, 36, 0, -100, 17];
        let fused = cross_entropy_sum(logits.as_tensor(), &labels)?;
        let reference = composite(logits.as_tensor(), &labels)?;
        let (a, b) = (fused.to_scalar::<f32>()?, reference.to_scalar::<f32>()?);
        assert!((a - b).abs() < 1e-5 * b.abs(), "{a} vs {b}");
        let g_fused = (fused * 0.5)?.backward()?.get(&logits).unwrap().clone();
        let g_ref = (reference * 0.5)?.backward()?.get(&logits).unwrap().clone();
        let diff = (g_fused - g_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "gradients differ by {diff}");
        Ok(())
    }
}
