//! AdamW exactly as `torch.optim.AdamW` computes it, on fp32 master weights.

use std::collections::HashMap;
use std::ops::Range;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor, Var};

use super::distributed::{self, Collective};
use crate::ops::{self, AdamWStep};
use crate::recipe::OptimizerSpec;

/// Adam moments of one parameter, always fp32.
#[derive(Debug)]
pub struct Moments {
    pub exp_avg: Tensor,
    pub exp_avg_sq: Tensor,
}

/// AdamW over a fixed list of named fp32 parameters (HF `state_dict()` order), or over one
/// rank's share of them (ZeRO-1, [`AdamW::sharded`]).
#[derive(Debug)]
pub struct AdamW {
    spec: OptimizerSpec,
    /// Optimizer steps taken so far; torch's `state["step"]`, shared by all parameters because
    /// every parameter is updated on every step.
    pub step: u64,
    /// The moments of the parameters this rank updates (`shards[rank]`).
    pub moments: Vec<Moments>,
    /// Per parameter: whether weight decay applies (false where `optimizer.no_decay` matches).
    decays: Vec<bool>,
    /// Which parameters each rank updates: one range of all of them when unsharded.
    shards: Vec<Range<usize>>,
    rank: usize,
}

impl AdamW {
    /// Fails when an `optimizer.no_decay` pattern matches no parameter (a typo would otherwise
    /// decay everything silently).
    pub fn new(spec: &OptimizerSpec, params: &[(String, Var)]) -> Result<Self> {
        Self::sharded(spec, params, 0, 1)
    }

    /// ZeRO-1: rank `rank` of `size` keeps the moments of, and updates, only its share of the
    /// parameters (see [`distributed::optimizer_shards`]); `size` 1 is plain AdamW.
    pub fn sharded(
        spec: &OptimizerSpec,
        params: &[(String, Var)],
        rank: usize,
        size: usize,
    ) -> Result<Self> {
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
        let sizes: Vec<usize> = params.iter().map(|(_, v)| v.elem_count()).collect();
        let shards = distributed::optimizer_shards(&sizes, size);
        let moments = params[shards[rank].clone()]
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
            shards,
            rank,
        })
    }

    /// Sends every parameter updated by its owner (ZeRO-1) to the other ranks: after this, all
    /// ranks hold the same weights again.
    pub fn share_updated(
        &self,
        params: &[(String, Var)],
        collective: &dyn Collective,
    ) -> Result<()> {
        if !self.is_sharded() {
            return Ok(());
        }
        for (owner, shard) in self.shards.iter().enumerate() {
            let vars = &params[shard.clone()];
            let mut tensors: Vec<Tensor> =
                vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
            collective.broadcast(owner, &mut tensors, "the updated weights")?;
            if owner != self.rank {
                for ((name, var), tensor) in vars.iter().zip(&tensors) {
                    var.set(tensor)
                        .with_context(|| format!("receiving {name} from rank {owner}"))?;
                }
            }
        }
        Ok(())
    }

    /// The parameters this rank updates.
    pub fn owned(&self) -> Range<usize> {
        self.shards[self.rank].clone()
    }

    pub fn is_sharded(&self) -> bool {
        self.shards.len() > 1
    }

    /// Bytes of optimizer state this rank holds.
    pub fn state_bytes(&self) -> u64 {
        (self.moments.iter())
            .map(|m| (m.exp_avg.elem_count() + m.exp_avg_sq.elem_count()) as u64 * 4)
            .sum()
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
        let owned = self.owned();
        let updates = (params[owned.clone()].iter())
            .zip(&grads[owned.clone()])
            .zip(&mut self.moments);
        for ((((name, param), grad), moments), &decays) in updates.zip(&self.decays[owned]) {
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
    /// Sharded, every rank takes part and rank 0 receives all of them (one parameter's at a
    /// time: the other ranks never hold more than their share and one parameter's moments);
    /// the other ranks get an empty map.
    pub fn state_tensors(
        &self,
        params: &[(String, Var)],
        collective: &dyn Collective,
    ) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (owner, shard) in self.shards.iter().enumerate() {
            for i in shard.clone() {
                let name = &params[i].0;
                let mut pair = match owner == self.rank {
                    true => {
                        let m = &self.moments[i - shard.start];
                        vec![m.exp_avg.clone(), m.exp_avg_sq.clone()]
                    }
                    false => {
                        let zeros = params[i].1.zeros_like()?.to_dtype(DType::F32)?;
                        vec![zeros.clone(), zeros]
                    }
                };
                if self.is_sharded() {
                    collective.broadcast(
                        owner,
                        &mut pair,
                        "the optimizer state for a checkpoint",
                    )?;
                }
                if collective.rank() == 0 {
                    let [exp_avg, exp_avg_sq]: [Tensor; 2] = pair.try_into().expect("two moments");
                    out.insert(format!("exp_avg.{name}"), exp_avg);
                    out.insert(format!("exp_avg_sq.{name}"), exp_avg_sq);
                }
            }
        }
        Ok(out)
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
        let owned = self.owned();
        for (i, (name, param)) in params.iter().enumerate() {
            let keys = [format!("exp_avg.{name}"), format!("exp_avg_sq.{name}")];
            if !owned.contains(&i) {
                // Another rank's share: only checked to be there.
                for key in keys {
                    anyhow::ensure!(
                        saved.remove(&key).is_some(),
                        "{}: tensor {key} is missing",
                        source.display()
                    );
                }
                continue;
            }
            let m = &mut self.moments[i - owned.start];
            let [avg_key, avg_sq_key] = keys;
            for (key, slot) in [(avg_key, &mut m.exp_avg), (avg_sq_key, &mut m.exp_avg_sq)] {
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
