//! AdamW exactly as `torch.optim.AdamW` computes it, on fp32 master weights.

use std::collections::HashMap;
use std::sync::Mutex;

use anyhow::{Context, Result};
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor, Var};
use rayon::prelude::*;

use crate::model::fused::zeroed;
use crate::model::vmath::simd_kernel;
use crate::recipe::OptimizerSpec;

/// Adam moments of one parameter, always fp32.
#[derive(Debug)]
pub struct Moments {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// AdamW over a fixed list of named fp32 parameters (HF `state_dict()` order).
#[derive(Debug)]
pub struct AdamW {
    spec: OptimizerSpec,
    /// Optimizer steps taken so far; torch's `state["step"]`, shared by all parameters because
    /// every parameter is updated on every step.
    pub step: u64,
    pub moments: Vec<Moments>,
    /// Per parameter: whether weight decay applies (false where `optimizer.no_decay` matches).
    decays: Vec<bool>,
}

impl AdamW {
    /// Fails when an `optimizer.no_decay` pattern matches no parameter (a typo would otherwise
    /// decay everything silently).
    pub fn new(spec: &OptimizerSpec, params: &[(String, Var)]) -> Result<Self> {
        let exempt = |name: &str| spec.no_decay.iter().any(|p| name.contains(p.as_str()));
        for (i, pattern) in spec.no_decay.iter().enumerate() {
            anyhow::ensure!(
                params
                    .iter()
                    .any(|(name, _)| name.contains(pattern.as_str())),
                "optimizer.no_decay[{i}]: `{pattern}` is in no parameter name (names look like {})",
                params
                    .iter()
                    .take(3)
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let decays = params.iter().map(|(name, _)| !exempt(name)).collect();
        let moments = params
            .iter()
            .map(|(_, p)| {
                Ok(Moments {
                    exp_avg: p.zeros_like()?.to_dtype(DType::F32)?,
                    exp_avg_sq: p.zeros_like()?.to_dtype(DType::F32)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            spec: spec.clone(),
            step: 0,
            moments,
            decays,
        })
    }

    /// One update with learning rate `lr`; `grads[i]` (fp32, already unscaled and clipped)
    /// belongs to `params[i]`. Follows torch's single-tensor `_single_tensor_adamw`:
    /// `p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
    /// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
    pub fn update(&mut self, params: &[(String, Var)], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let [b1, b2] = self.spec.betas;
        let t = self.step as i32;
        let bias1 = 1.0 - b1.powi(t);
        let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = lr / bias1;
        let constants = |decay: f64| StepConstants {
            b1: b1 as f32,
            b2: b2 as f32,
            step_size: step_size as f32,
            bias2_sqrt: bias2_sqrt as f32,
            eps: self.spec.eps as f32,
            decay: decay as f32,
        };
        let decayed = constants(1.0 - lr * self.spec.weight_decay);
        let exempt = constants(1.0);
        let updates = params.iter().zip(grads).zip(&mut self.moments);
        for ((((name, param), grad), moments), &decays) in updates.zip(&self.decays) {
            let constants = if decays { &decayed } else { &exempt };
            let updated = if param.device().is_cpu() {
                fused_cpu_update(param, grad, moments, constants)
            } else {
                tensor_update(param, grad, moments, constants)
            };
            updated.with_context(|| format!("AdamW update of {name}"))?;
        }
        Ok(())
    }

    /// The moments as `exp_avg.<param>` / `exp_avg_sq.<param>`, for `optimizer.safetensors`.
    pub fn state_tensors(&self, params: &[(String, Var)]) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for ((name, _), m) in params.iter().zip(&self.moments) {
            out.insert(format!("exp_avg.{name}"), m.exp_avg.clone());
            out.insert(format!("exp_avg_sq.{name}"), m.exp_avg_sq.clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`]; every tensor must be present with
    /// its parameter's shape.
    pub fn load_state(
        &mut self,
        params: &[(String, Var)],
        mut saved: HashMap<String, Tensor>,
        step: u64,
        source: &std::path::Path,
    ) -> Result<()> {
        for ((name, param), m) in params.iter().zip(&mut self.moments) {
            for (key, slot) in [
                (format!("exp_avg.{name}"), &mut m.exp_avg),
                (format!("exp_avg_sq.{name}"), &mut m.exp_avg_sq),
            ] {
                let tensor = saved
                    .remove(&key)
                    .with_context(|| format!("{}: tensor {key} is missing", source.display()))?;
                anyhow::ensure!(
                    tensor.dims() == param.dims(),
                    "{}: tensor {key} has shape {:?}, expected {:?}",
                    source.display(),
                    tensor.dims(),
                    param.dims()
                );
                *slot = tensor.to_dtype(DType::F32)?.to_device(param.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// `acc += g`; on the CPU in `acc`'s own storage, in parallel (summing workers' gradients).
pub fn add_in_place(acc: &mut Tensor, g: &Tensor) -> candle_core::Result<()> {
    let fused = acc.device().is_cpu()
        && acc.dtype() == DType::F32
        && g.dtype() == DType::F32
        && acc.is_contiguous()
        && acc.dims() == g.dims();
    if !fused {
        *acc = (&*acc + g)?;
        return Ok(());
    }
    let g = g.contiguous()?;
    let (storage, layout) = g.storage_and_layout();
    acc.inplace_op1(&AddInPlace(cpu_f32(&storage, layout)?))
}

struct AddInPlace<'a>(&'a [f32]);

impl InplaceOp1 for AddInPlace<'_> {
    fn name(&self) -> &'static str {
        "add-in-place"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let acc = cpu_f32_mut(storage, layout)?;
        const CHUNK: usize = 1 << 14;
        acc.par_chunks_mut(CHUNK)
            .zip(self.0.par_chunks(CHUNK))
            .for_each(|(acc, g)| acc.iter_mut().zip(g).for_each(|(a, g)| *a += g));
        Ok(())
    }
}

/// L2 norm over all gradients together (torch's `clip_grad_norm_` total norm), in f64.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads {
        sum += if g.device().is_cpu() && g.dtype() == DType::F32 {
            let g = g.contiguous()?;
            let (storage, layout) = g.storage_and_layout();
            let values = cpu_f32(&storage, layout)?;
            // Fixed chunks summed in order: the same value whatever the thread scheduling.
            let partials: Vec<f64> = values
                .par_chunks(1 << 14)
                .map(|chunk| sum_of_squares(chunk) as f64)
                .collect();
            partials.iter().sum::<f64>()
        } else {
            g.sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?
        };
    }
    Ok(sum.sqrt())
}

simd_kernel! {
    fn sum_of_squares(xs: &[f32]) -> f32 {
        let mut lanes = [0f32; 16];
        let mut chunks = xs.chunks_exact(16);
        for chunk in &mut chunks {
            for (l, x) in lanes.iter_mut().zip(chunk) {
                *l += x * x;
            }
        }
        chunks.remainder().iter().map(|x| x * x).sum::<f32>() + lanes.iter().sum::<f32>()
    }
}

/// Scales gradients as `clip_grad_norm_` does: by `max_norm / (norm + 1e-6)` when that is
/// below 1.
pub fn clip(grads: &mut [Tensor], norm: f64, max_norm: f64) -> Result<()> {
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(())
}

/// Per-step scalars of the update, in the fp32 the arithmetic runs in.
struct StepConstants {
    b1: f32,
    b2: f32,
    step_size: f32,
    bias2_sqrt: f32,
    eps: f32,
    decay: f32,
}

/// The update in one parallel pass over each tensor (a dozen tensor ops would each read and
/// write the whole parameter).
fn fused_cpu_update(
    param: &Var,
    grad: &Tensor,
    moments: &mut Moments,
    c: &StepConstants,
) -> candle_core::Result<()> {
    let grad = grad.contiguous()?;
    let n = param.elem_count();
    let (mut new_m, mut new_v) = (zeroed(n), zeroed(n));
    {
        let guards = [
            grad.storage_and_layout(),
            moments.exp_avg.storage_and_layout(),
            moments.exp_avg_sq.storage_and_layout(),
        ];
        let mut slices = Vec::with_capacity(3);
        for (storage, layout) in &guards {
            slices.push(cpu_f32(storage, layout)?);
        }
        // The parameter is updated in its own storage: a new tensor would cost a serial copy
        // back into the variable (51 MB for GPT-J's embedding) on top of the update.
        param.as_tensor().inplace_op1(&InPlaceAdamW {
            grad: slices[0],
            moments: [slices[1], slices[2]],
            new_moments: Mutex::new([&mut new_m, &mut new_v]),
            constants: c,
        })?;
    }
    let shape = param.shape().clone();
    let device = param.device().clone();
    moments.exp_avg = Tensor::from_vec(new_m, shape.clone(), &device)?;
    moments.exp_avg_sq = Tensor::from_vec(new_v, shape, &device)?;
    Ok(())
}

fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("the fused optimizer kernels run on CPU tensors");
    };
    crate::model::fused::contiguous_f32(cpu, layout)
}

fn cpu_f32_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a mut [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::msg("in-place update of a non-contiguous tensor"))?;
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("in-place update of a tensor that is not fp32");
    };
    Ok(&mut values[start..end])
}

/// One parameter's AdamW step, applied to the parameter's storage in place.
struct InPlaceAdamW<'a> {
    grad: &'a [f32],
    moments: [&'a [f32]; 2],
    /// Behind a lock only because candle hands the op over by shared reference.
    new_moments: Mutex<[&'a mut Vec<f32>; 2]>,
    constants: &'a StepConstants,
}

impl InplaceOp1 for InPlaceAdamW<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let p = cpu_f32_mut(storage, layout)?;
        let [m, v] = self.moments;
        let g = self.grad;
        if [g.len(), m.len(), v.len()] != [p.len(); 3] {
            candle_core::bail!("AdamW: parameter, gradient and moments differ in size");
        }
        let mut new_moments = self.new_moments.lock().expect("not poisoned");
        let [new_m, new_v] = &mut *new_moments;
        const CHUNK: usize = 1 << 14;
        p.par_chunks_mut(CHUNK)
            .zip(new_m.par_chunks_mut(CHUNK))
            .zip(new_v.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(chunk, ((p, out_m), out_v))| {
                let range = chunk * CHUNK..chunk * CHUNK + p.len();
                adamw_chunk(
                    p,
                    [&g[range.clone()], &m[range.clone()], &v[range]],
                    [out_m, out_v],
                    self.constants,
                );
            });
        Ok(())
    }
}

simd_kernel! {
    /// AdamW on one chunk: `p` updated in place from `[g, m, v]`, the new moments to `[m, v]`.
    fn adamw_chunk(p: &mut [f32], inputs: [&[f32]; 3], outputs: [&mut [f32]; 2], c: &StepConstants) {
        let [g, m, v] = inputs;
        let [out_m, out_v] = outputs;
        for i in 0..p.len() {
            let m = c.b1 * m[i] + (1.0 - c.b1) * g[i];
            let v = c.b2 * v[i] + (1.0 - c.b2) * g[i] * g[i];
            let denom = v.sqrt() / c.bias2_sqrt + c.eps;
            p[i] = p[i] * c.decay - c.step_size * (m / denom);
            out_m[i] = m;
            out_v[i] = v;
        }
    }
}

/// The same update from tensor ops, for devices other than the CPU.
fn tensor_update(
    param: &Var,
    grad: &Tensor,
    moments: &mut Moments,
    c: &StepConstants,
) -> candle_core::Result<()> {
    let (b1, b2) = (c.b1 as f64, c.b2 as f64);
    moments.exp_avg = ((&moments.exp_avg * b1)? + (grad * (1.0 - b1))?)?;
    moments.exp_avg_sq = ((&moments.exp_avg_sq * b2)? + (grad.sqr()? * (1.0 - b2))?)?;
    let denom = ((moments.exp_avg_sq.sqrt()? / c.bias2_sqrt as f64)? + c.eps as f64)?;
    let decayed = (param.as_tensor() * c.decay as f64)?;
    let new = (decayed - ((&moments.exp_avg / denom)? * c.step_size as f64)?)?;
    param.set(&new)
}

#[cfg(test)]
mod kernel_variants {
    use super::*;
    use crate::model::vmath::variants::{check_variants, random, with_edges, LENGTHS};

    #[test]
    fn optimizer_kernel_variants_agree() {
        let cases: Vec<Vec<f32>> = LENGTHS
            .iter()
            .flat_map(|&len| {
                let plain = random(len, len as u64, 3.0);
                let edged = with_edges(random(len, 100 + len as u64, 3.0), len % 5);
                [plain, edged]
            })
            .collect();
        check_variants("sum_of_squares", &cases, |xs| sum_of_squares(xs));
        let c = StepConstants {
            b1: 0.9,
            b2: 0.999,
            step_size: 1e-3,
            bias2_sqrt: 0.03,
            eps: 1e-8,
            decay: 0.999,
        };
        check_variants("adamw_chunk", &cases, |g| {
            let n = g.len();
            let (mut p, m) = (random(n, 1, 1.0), random(n, 2, 0.1));
            let v: Vec<f32> = random(n, 3, 0.01).iter().map(|x| x.abs()).collect();
            let (mut out_m, mut out_v) = (vec![0f32; n], vec![0f32; n]);
            adamw_chunk(&mut p, [g, &m, &v], [&mut out_m, &mut out_v], &c);
            (p, out_m, out_v)
        });
    }
}
