//! One optimizer step, in the order it happens: the model in the compute dtype from the fp32
//! master weights, forward and backward of every micro-batch shard with the gradients summed,
//! unscale, the global gradient norm, the fp16 scaler's verdict, clipping, and AdamW.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::distributed::Collective;
use super::layout::BatchLayout;
use super::optimizer::{self, AdamW};
use super::precision::{LossScaler, StepVerdict};
use super::preference;
use super::trainable::Trainable;
use crate::data::{PreferencePair, Sequence};
use crate::eval::preference::{PairLoss, PairTotals, TOTALS};
use crate::model::{self, Config, LossGrads, Model};
use crate::ops::{self, DropoutRates};
use crate::recipe::Recipe;

/// What a step needs that does not change between steps.
pub struct StepPlan {
    pub config: Config,
    pub compute_dtype: DType,
    pub device: Device,
    pub layout: BatchLayout,
    pub pad_id: u32,
    pub grad_clip: Option<f64>,
    pub workers: Workers,
    /// Dropout in training, its masks drawn from `seed`, the step and each row's place in the
    /// global batch (see [`ops::Dropout`]).
    pub dropout: DropoutRates,
    pub seed: u64,
    /// Recompute each block in the backward (`memory.activation_checkpointing`).
    pub activation_checkpointing: bool,
}

/// Which step this is: its number, learning rate, and whether this rank was asked to stop.
#[derive(Debug, Clone, Copy)]
pub struct StepAt {
    pub step: u64,
    pub lr: f64,
    pub stop: bool,
}

/// What one step did.
pub struct StepOutcome {
    /// Mean cross-entropy over the batch's trained tokens (preference pairs: the mean of the
    /// pairs' losses).
    pub loss: f64,
    /// Global gradient norm before clipping (unscaled; not finite on overflow).
    pub grad_norm: f64,
    /// False when non-finite gradients skipped the update.
    pub applied: bool,
    /// Whether any rank was asked to stop by the time it reached this step's check-in.
    pub stop_requested: bool,
    /// The objective's own metrics (preference pairs: TRL's `rewards/*` and `logps/*`), means
    /// over the batch.
    pub metrics: Vec<(String, f64)>,
}

impl StepPlan {
    /// The recipe's step on `device`, its rows laid out by `layout` over `workers`.
    pub fn new(
        recipe: &Recipe,
        config: &Config,
        device: &Device,
        (layout, workers): (BatchLayout, Workers),
        pad_id: u32,
    ) -> Self {
        Self {
            config: config.clone(),
            compute_dtype: recipe.precision.compute.dtype(),
            device: device.clone(),
            layout,
            pad_id,
            grad_clip: recipe.optimizer.grad_clip,
            workers,
            dropout: dropout_rates(recipe, config),
            seed: recipe.seed,
            activation_checkpointing: recipe.memory.activation_checkpointing,
        }
    }

    /// Trains `trainable` on `rows` (the whole global batch of step `at`).
    ///
    /// Every shard backpropagates `its loss sum × scale / loss units of the global batch` (the
    /// units being trained tokens, or pairs), so the summed gradients are the global batch's
    /// mean loss's however the batch is cut into micro-batches, replicas and workers. Each
    /// replica sums its own micro-batches, then the replicas are summed in replica order —
    /// within a rank, then over the ranks — so that 2 ranks of 1 replica each add exactly what 1
    /// process with 2 replicas adds.
    pub fn run(
        &self,
        collective: &dyn Collective,
        trainable: &Trainable,
        adamw: &mut AdamW,
        scaler: &mut LossScaler,
        rows: StepRows,
        at: StepAt,
    ) -> Result<StepOutcome> {
        let units = match rows {
            StepRows::Sequences(sequences) => {
                let targets: usize = sequences.iter().map(Sequence::target_count).sum();
                anyhow::ensure!(
                    targets > 0,
                    "no token of the batch is trained on (check data.loss_on and the templates)"
                );
                targets
            }
            StepRows::Pairs { pairs, .. } => pairs.len(),
        };
        let params = &trainable.params;
        // The working copy of the weights in the compute dtype, made once per step.
        let mut model = model::model_from_parameters(
            &self.config,
            &trainable.model_tensors(false)?,
            self.compute_dtype,
            &self.device,
        )?;
        if self.activation_checkpointing {
            model.checkpoint_activations(params.iter().map(|(_, var)| var.id()).collect());
        }
        let weight = scaler.scale / units as f64;
        let (mut totals, grads) = match rows {
            StepRows::Sequences(sequences) => {
                self.backward(sequences, at, (1, 1), |shard, dropout| {
                    shard_backward(&model, params, shard, self.pad_id, weight, dropout)
                        .map(|r| r.map(|(nll, grads)| (vec![nll], grads)))
                })?
            }
            StepRows::Pairs {
                pairs,
                objective,
                reference,
            } => self.backward(pairs, at, (2, TOTALS), |shard, dropout| {
                let result = preference::shard_backward(
                    objective,
                    &model,
                    reference.for_policy(&model),
                    params,
                    shard,
                    self.pad_id,
                    weight,
                    dropout,
                )?;
                Ok(result.map(|(totals, grads)| (totals.to_vec(), grads)))
            })?,
        };
        drop(model);
        // A rank whose rows train on no token still takes part in the sum.
        let mut grads = match grads {
            Some(grads) => grads,
            None => (params.iter())
                .map(|(_, v)| Ok(v.zeros_like()?))
                .collect::<Result<Vec<_>>>()?,
        };
        let stop_requested = collective.check_in(at.step, at.stop)?;
        let layout = &self.layout;
        if layout.ranks > 1 {
            collective.all_reduce_sum(&mut grads, "the gradients")?;
            collective.all_reduce_sum_f64(&mut totals, "the loss")?;
        }

        // Unscale (fp16), then the norm decides: apply, or skip on overflow.
        if scaler.scale != 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g / scaler.scale)?;
            }
        }
        let mut grad_norm = ops::global_norm(&grads)?;
        if layout.ranks > 1 {
            // Rank 0's norm on every rank (x + 0 + ... = x, NaN and inf included), so that the
            // overflow verdict and the clipping agree everywhere whatever the reduction did.
            let mut norm = [if layout.rank == 0 { grad_norm } else { 0.0 }];
            collective.all_reduce_sum_f64(&mut norm, "the gradient norm")?;
            grad_norm = norm[0];
        }
        let applied = scaler.update(grad_norm.is_finite()) == StepVerdict::Apply;
        if applied {
            if let Some(max_norm) = self.grad_clip {
                optimizer::clip(&mut grads, grad_norm, max_norm)?;
            }
            adamw.update(params, &grads, at.lr)?;
            adamw.share_updated(params, collective)?;
        }
        let metrics = match rows {
            StepRows::Sequences(_) => Vec::new(),
            StepRows::Pairs { .. } => {
                let totals = PairTotals::try_from(&totals[..]).expect("a pair step's totals");
                crate::eval::preference::means(&totals, units).split_off(1)
            }
        };
        Ok(StepOutcome {
            loss: totals[0] / units as f64,
            grad_norm,
            applied,
            stop_requested,
            metrics,
        })
    }

    /// Forward and backward of this rank's shards of `rows`, by `backward(shard, dropout)`:
    /// each replica's `width` totals and gradients accumulated over its micro-batches and
    /// workers, then the replicas' in replica order. A row stands for `sequences_per_row`
    /// sequences of the global batch (a pair: 2), which fixes each sequence's dropout.
    fn backward<T: Sync>(
        &self,
        rows: &[T],
        at: StepAt,
        (sequences_per_row, width): (usize, usize),
        backward: impl Fn(&[T], Option<ops::Dropout>) -> Result<Option<(Vec<f64>, Vec<Tensor>)>> + Sync,
    ) -> Result<(Vec<f64>, Option<Vec<Tensor>>)> {
        let layout = &self.layout;
        let mut replica_totals = vec![vec![0f64; width]; layout.local_replicas()];
        let mut replica_grads: Vec<Option<Vec<Tensor>>> = vec![None; layout.local_replicas()];
        for (micro_step, step_rows) in rows.chunks(layout.rows_per_micro_step()).enumerate() {
            let shards = layout.shards(micro_step, step_rows);
            let results = self.workers.run(&shards, |shard| {
                let dropout = (!self.dropout.is_off()).then(|| {
                    let first = shard.first_row * sequences_per_row;
                    let n = shard.rows.len() * sequences_per_row;
                    ops::Dropout::for_rows(self.dropout, self.seed, at.step, first, n)
                });
                backward(shard.rows, dropout)
            });
            // Summed in shard order, so the result does not depend on which thread finished
            // first.
            for (shard, result) in shards.iter().zip(results) {
                let Some((shard_totals, shard_grads)) = result? else {
                    continue;
                };
                add_totals(&mut replica_totals[shard.local_replica], &shard_totals);
                accumulate(&mut replica_grads[shard.local_replica], shard_grads)?;
            }
        }
        let mut totals = vec![0f64; width];
        let mut grads = None;
        for (replica, replica_grads) in replica_totals.into_iter().zip(replica_grads) {
            add_totals(&mut totals, &replica);
            if let Some(replica_grads) = replica_grads {
                accumulate(&mut grads, replica_grads)?;
            }
        }
        Ok((totals, grads))
    }
}

/// Adds `values` into `sum` element by element.
fn add_totals(sum: &mut [f64], values: &[f64]) {
    for (s, v) in sum.iter_mut().zip(values) {
        *s += v;
    }
}

/// A step's global batch: training rows, or preference pairs with their objective and where
/// their reference log-probabilities come from.
#[derive(Clone, Copy)]
pub enum StepRows<'r> {
    Sequences(&'r [Sequence]),
    Pairs {
        pairs: &'r [PreferencePair],
        objective: &'r PairLoss,
        reference: &'r preference::Reference,
    },
}

/// The dropout training applies: the model config's, with the recipe's `model.dropout` in its
/// place; none for a preference objective with `disable_dropout` (TRL's default).
fn dropout_rates(recipe: &Recipe, config: &Config) -> ops::DropoutRates {
    let objective = &recipe.objective;
    if objective.is_preference() && objective.disable_dropout {
        return ops::DropoutRates::default();
    }
    let rates = config.dropout_rates();
    let rates = match &recipe.model.dropout {
        Some(spec) => spec.over(rates),
        None => rates,
    };
    ops::DropoutRates {
        lora: recipe.lora.as_ref().map_or(0.0, |lora| lora.dropout),
        ..rates
    }
}

/// Adds `grads` into the running sum `sum` (which takes them as they are when empty).
fn accumulate(sum: &mut Option<Vec<Tensor>>, grads: Vec<Tensor>) -> Result<()> {
    match sum.as_mut() {
        None => *sum = Some(grads),
        Some(acc) => {
            for (a, g) in acc.iter_mut().zip(&grads) {
                ops::add_in_place(a, g)?;
            }
        }
    }
    Ok(())
}

/// Forward and backward of one shard: its nll sum and the fp32 gradients of `weight × nll sum`
/// for every parameter (zeros where none reached it); `None` when it trains on no token.
fn shard_backward(
    model: &Model,
    params: &[(String, Var)],
    shard: &[Sequence],
    pad_id: u32,
    weight: f64,
    dropout: Option<ops::Dropout>,
) -> Result<Option<(f64, Vec<Tensor>)>> {
    let (mut batch, labels) = crate::data::batch_of(shard, pad_id, model.device())?;
    batch.dropout = dropout;
    let Some(loss) = model.loss_and_grads(&batch, &labels, weight)? else {
        return Ok(None);
    };
    Ok(Some((loss.nll_sum, fp32_grads(&loss, params)?)))
}

/// Every parameter's gradient from one backward, fp32 (zeros where none reached it).
pub(super) fn fp32_grads(loss: &LossGrads, params: &[(String, Var)]) -> Result<Vec<Tensor>> {
    params
        .iter()
        .map(|(name, v)| match loss.get(name, v.as_tensor())? {
            Some(g) => Ok(g.to_dtype(DType::F32)?),
            None => Ok(v.zeros_like()?),
        })
        .collect()
}

/// The threads a run trains on: per replica, `per_replica` workers, each with its own
/// single-purpose rayon pool (see [`ops::workers_per_replica`]).
pub struct Workers {
    pub per_replica: usize,
    pools: Vec<rayon::ThreadPool>,
}

impl Workers {
    /// Each replica's `threads_per_replica` shared out over its `per_replica` pools.
    pub fn new(threads_per_replica: usize, replicas: usize, per_replica: usize) -> Result<Self> {
        let extra = threads_per_replica % per_replica;
        let pools = (0..replicas * per_replica)
            .map(|pool| {
                let worker = pool % per_replica;
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads_per_replica / per_replica + usize::from(worker < extra))
                    .build()
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self { per_replica, pools })
    }

    /// `work` on every shard, shard `i` in pool `i`, all at once; results in shard order.
    fn run<S: Sync, T: Send>(
        &self,
        shards: &[S],
        work: impl Fn(&S) -> Result<T> + Sync,
    ) -> Vec<Result<T>> {
        if shards.len() == 1 {
            return vec![self.pools[0].install(|| work(&shards[0]))];
        }
        std::thread::scope(|scope| {
            let handles: Vec<_> = shards
                .iter()
                .zip(&self.pools)
                .map(|(shard, pool)| {
                    let work = &work;
                    scope.spawn(move || pool.install(|| work(shard)))
                })
                .collect();
            handles
                .into_iter()
                .enumerate()
                .map(|(i, h)| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("worker thread {i} panicked")))
                        .with_context(|| format!("shard {i}"))
                })
                .collect()
        })
    }
}
