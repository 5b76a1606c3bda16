//! AdamW exactly as `torch.optim.AdamW` computes it, on fp32 master weights.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};

use crate::ops::{self, AdamWStep};
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
        let constants = |decay: f64| AdamWStep {
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
            ops::adamw_step(
                param,
                grad,
                &mut moments.exp_avg,
                &mut moments.exp_avg_sq,
                constants,
            )
            .with_context(|| format!("AdamW update of {name}"))?;
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
