//! The optimizer's passes over whole parameters: gradient accumulation, the global gradient
//! norm and the AdamW update, fused on the CPU and from candle tensor ops elsewhere.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Storage, Tensor, Var};
use rayon::prelude::*;

use super::use_fused;
use crate::cpu::fused::zeroed;
use crate::cpu::vmath::simd_kernel;

/// `acc += g`; on the CPU in `acc`'s own storage, in parallel (summing workers' gradients).
pub fn add_in_place(acc: &mut Tensor, g: &Tensor) -> Result<()> {
    let fused =
        use_fused(acc) && g.dtype() == DType::F32 && acc.is_contiguous() && acc.dims() == g.dims();
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

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let acc = cpu_f32_mut(storage, layout)?;
        const CHUNK: usize = 1 << 14;
        acc.par_chunks_mut(CHUNK)
            .zip(self.0.par_chunks(CHUNK))
            .for_each(|(acc, g)| acc.iter_mut().zip(g).for_each(|(a, g)| *a += g));
        Ok(())
    }
}

/// L2 norm over all gradients together (torch's `clip_grad_norm_` total norm), accumulated in
/// f64 over fp32 partial sums.
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads {
        sum += if use_fused(g) {
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

/// One AdamW step's scalars for one parameter, in the fp32 the arithmetic runs in (see
/// `train::optimizer::AdamW::update` for how they follow torch's).
pub struct AdamWStep {
    pub b1: f32,
    pub b2: f32,
    /// `lr / (1 - b1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - b2^t)`.
    pub bias2_sqrt: f32,
    pub eps: f32,
    /// `1 - lr × weight_decay` (1 for a parameter exempt from decay).
    pub decay: f32,
}

/// AdamW on `param` in place from its fp32 gradient, updating the moments `exp_avg` and
/// `exp_avg_sq`: `p *= decay; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²;
/// p -= step_size · m / (sqrt(v) / bias2_sqrt + eps)`.
pub fn adamw_step(
    param: &Var,
    grad: &Tensor,
    exp_avg: &mut Tensor,
    exp_avg_sq: &mut Tensor,
    c: &AdamWStep,
) -> Result<()> {
    if use_fused(param.as_tensor()) {
        fused_cpu_update(param, grad, exp_avg, exp_avg_sq, c)
    } else {
        tensor_update(param, grad, exp_avg, exp_avg_sq, c)
    }
}

/// The update in one parallel pass over each tensor (a dozen tensor ops would each read and
/// write the whole parameter).
fn fused_cpu_update(
    param: &Var,
    grad: &Tensor,
    exp_avg: &mut Tensor,
    exp_avg_sq: &mut Tensor,
    c: &AdamWStep,
) -> Result<()> {
    let grad = grad.contiguous()?;
    let n = param.elem_count();
    let (mut new_m, mut new_v) = (zeroed(n), zeroed(n));
    {
        let guards = [
            grad.storage_and_layout(),
            exp_avg.storage_and_layout(),
            exp_avg_sq.storage_and_layout(),
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
    *exp_avg = Tensor::from_vec(new_m, shape.clone(), &device)?;
    *exp_avg_sq = Tensor::from_vec(new_v, shape, &device)?;
    Ok(())
}

fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("the fused optimizer kernels run on CPU tensors");
    };
    crate::cpu::fused::contiguous_f32(cpu, layout)
}

fn cpu_f32_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
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
    constants: &'a AdamWStep,
}

impl InplaceOp1 for InPlaceAdamW<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
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
    fn adamw_chunk(p: &mut [f32], inputs: [&[f32]; 3], outputs: [&mut [f32]; 2], c: &AdamWStep) {
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
    exp_avg: &mut Tensor,
    exp_avg_sq: &mut Tensor,
    c: &AdamWStep,
) -> Result<()> {
    let (b1, b2) = (c.b1 as f64, c.b2 as f64);
    *exp_avg = ((&*exp_avg * b1)? + (grad * (1.0 - b1))?)?;
    *exp_avg_sq = ((&*exp_avg_sq * b2)? + (grad.sqr()? * (1.0 - b2))?)?;
    let denom = ((exp_avg_sq.sqrt()? / c.bias2_sqrt as f64)? + c.eps as f64)?;
    let decayed = (param.as_tensor() * c.decay as f64)?;
    let new = (decayed - ((&*exp_avg / denom)? * c.step_size as f64)?)?;
    param.set(&new)
}

#[cfg(test)]
mod kernel_variants {
    use super::*;
    use crate::cpu::vmath::variants::{check_variants, random, variant_tests, with_edges, LENGTHS};

    variant_tests! {
        fn optimizer_kernel_variants_agree(isa) {
            let cases: Vec<Vec<f32>> = LENGTHS
                .iter()
                .flat_map(|&len| {
                    let plain = random(len, len as u64, 3.0);
                    let edged = with_edges(random(len, 100 + len as u64, 3.0), len % 5);
                    [plain, edged]
                })
                .collect();
            check_variants("sum_of_squares", isa, &cases, |xs| sum_of_squares(xs));
            let c = AdamWStep {
                b1: 0.9,
                b2: 0.999,
                step_size: 1e-3,
                bias2_sqrt: 0.03,
                eps: 1e-8,
                decay: 0.999,
            };
            check_variants("adamw_chunk", isa, &cases, |g| {
                let n = g.len();
                let (mut p, m) = (random(n, 1, 1.0), random(n, 2, 0.1));
                let v: Vec<f32> = random(n, 3, 0.01).iter().map(|x| x.abs()).collect();
                let (mut out_m, mut out_v) = (vec![0f32; n], vec![0f32; n]);
                adamw_chunk(&mut p, [g, &m, &v], [&mut out_m, &mut out_v], &c);
                (p, out_m, out_v)
            });
        }
    }
}
