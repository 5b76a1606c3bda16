//! What a run trains and what it only reads: every weight (a full fine-tune, from fp32 master
//! copies), or a LoRA adapter beside the frozen base model.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};

use crate::checkpoint;
use crate::model::lora::{self, Adapter, LoraSpec};
use crate::model::quantized::{self, Quantization, QuantizedWeight};
use crate::model::{self, Config};
use crate::ops;
use crate::recipe::Recipe;

pub struct Trainable {
    /// What the optimizer updates, by name: fp32 master weights (HF names), or the adapter's
    /// `<module>.lora_A.weight` / `.lora_B.weight`.
    pub params: Vec<(String, Var)>,
    /// The base model's weights in the dtype the layers compute with; empty in a full fine-tune.
    /// They get no gradient, no master copy and no optimizer state.
    frozen: HashMap<String, Tensor>,
    lora: Option<LoraRun>,
}

struct LoraRun {
    spec: LoraSpec,
    /// The recipe's target modules, or the family's default.
    targets: Vec<String>,
    /// `base_model_name_or_path` of the adapters this run writes.
    base_model: String,
}

impl Trainable {
    /// The run's weights from the model's initial ones (consumed: a LoRA run keeps only the
    /// frozen copies).
    pub fn new(
        recipe: &Recipe,
        config: &Config,
        initial: HashMap<String, Tensor>,
        base_model: &str,
        device: &Device,
    ) -> Result<Self> {
        let weights = split(recipe, config, initial, device)?;
        let Some(spec) = &recipe.lora else {
            return Ok(weights);
        };
        let targets = spec.targets(config);
        let layers = lora::select_layers(config, &targets)?;
        let params = lora::init_adapter(&layers, spec.r, recipe.seed, device)?
            .into_iter()
            .map(|(name, tensor)| Ok((name, Var::from_tensor(&tensor)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            frozen: weights.frozen,
            lora: Some(LoraRun {
                spec: spec.clone(),
                targets,
                base_model: base_model.to_string(),
            }),
        })
    }

    /// The model's tensors by name as the layers read them: differentiable with respect to the
    /// trained parameters, or `detached` from them (evaluation must not extend a step's graph).
    pub fn model_tensors(&self, detached: bool) -> Result<HashMap<String, Tensor>> {
        let trained = self.params.iter().map(|(name, var)| {
            let tensor = match detached {
                true => var.as_tensor().detach(),
                false => var.as_tensor().clone(),
            };
            (name.clone(), tensor)
        });
        let mut tensors = self.frozen.clone();
        match &self.lora {
            None => tensors.extend(trained),
            Some(run) => {
                lora::attach(&mut tensors, &trained.collect::<Vec<_>>(), run.spec.scale())?
            }
        }
        Ok(tensors)
    }

    /// A LoRA run's base model, the adapter off: the frozen tensors the policy computes with too
    /// (shared, not copied); `None` in a full fine-tune.
    pub fn base_tensors(&self) -> Option<HashMap<String, Tensor>> {
        self.lora.as_ref().map(|_| self.frozen.clone())
    }

    /// The adapter of LoRA run `run` as it stands.
    fn adapter(&self, run: &LoraRun) -> Adapter {
        Adapter {
            spec: run.spec.clone(),
            tensors: (self.params.iter())
                .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
                .collect(),
            base_model: Some(run.base_model.clone()),
        }
    }

    /// Runs `write` with the checkpoint's weights: the whole model in `dtype`, or the adapter.
    pub fn with_checkpoint_weights<T>(
        &self,
        dtype: DType,
        write: impl FnOnce(checkpoint::Weights) -> Result<T>,
    ) -> Result<T> {
        match &self.lora {
            Some(run) => write(checkpoint::Weights::Adapter {
                adapter: self.adapter(run),
                targets: run.targets.clone(),
            }),
            None => {
                let mut params = model::parameter_tensors(&self.params);
                params.extend(self.frozen.iter().map(|(n, t)| (n.clone(), t.clone())));
                write(checkpoint::Weights::Model {
                    params: &params,
                    dtype,
                })
            }
        }
    }

    /// The sha256 `eval::mnli::weights_sha256` gives for the weights a checkpoint now would hold.
    pub fn weights_sha256(&self, config: &Config, dtype: DType) -> Result<String> {
        match &self.lora {
            Some(run) => self.adapter(run).sha256(),
            None => model::weights_sha256(
                config,
                &self.model_tensors(true)?,
                dtype,
                model::DEFAULT_MAX_SHARD_BYTES,
            ),
        }
    }

    /// Sets the trained parameters from checkpoint `dir`: the fp32 masters (from the optimizer
    /// state where the model files are rounded, else from the model files) or the adapter.
    pub fn restore_params(
        &self,
        dir: &Path,
        config: &Config,
        masters: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<()> {
        let weights = if self.lora.is_some() {
            let adapter = Adapter::load(dir, device)?;
            adapter.layers(config)?;
            adapter.tensors.into_iter().collect()
        } else if masters.is_empty() {
            model::load_parameters(dir, config, DType::F32, device)?
        } else {
            masters
        };
        for (name, var) in &self.params {
            let tensor = weights
                .get(name)
                .with_context(|| format!("{}: weight {name} is missing", dir.display()))?;
            ensure!(
                tensor.dims() == var.dims(),
                "{}: weight {name} has shape {:?}, the run's is {:?} (was lora.r or \
                 lora.target_modules changed?)",
                dir.display(),
                tensor.dims(),
                var.dims()
            );
            var.set(&tensor.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }

    pub fn is_lora(&self) -> bool {
        self.lora.is_some()
    }
}

/// Whether parameter `name` of the base model trains: nothing does in a LoRA run (its adapter
/// does), and `train.trainable` picks what does in a partial fine-tune.
fn trains(recipe: &Recipe, name: &str) -> bool {
    recipe.lora.is_none() && recipe.train.trains(name)
}

/// The dtype a run holds parameter `name` in as it starts: fp32 for what trains (master weights);
/// frozen matrices (a LoRA base, what `train.trainable` leaves out) in the compute dtype, read
/// straight into it so a half-precision base never exists whole in fp32; a frozen block matrix
/// of a run with `model.quantize` in fp32, to be quantised exactly as it arrives
/// ([`InitialWeights`]). Frozen vectors (LayerNorm, biases) are tiny and become the dtype the
/// layers compute in (see [`split`]).
pub fn initial_dtype(recipe: &Recipe, name: &str, shape: &[usize]) -> DType {
    let quantized = recipe.model.quantize.is_some() && lora::is_block_linear(name, shape);
    if !trains(recipe, name) && shape.len() == 2 && !quantized {
        recipe.precision.compute.dtype()
    } else {
        DType::F32
    }
}

/// Quantises the frozen linear weights of a run with `model.quantize` as they are read, one at
/// a time (each arrives in fp32, see [`initial_dtype`]).
pub struct InitialWeights {
    quantization: Option<(Quantization, HashMap<String, bool>)>,
}

impl InitialWeights {
    pub fn new(recipe: &Recipe, config: &Config) -> Self {
        let quantization = recipe.model.quantization().map(|q| {
            let weights = quantized::quantized_weights(config)
                .into_iter()
                .filter(|(name, _)| !trains(recipe, name))
                .collect();
            (q, weights)
        });
        Self { quantization }
    }

    /// Parameter `name` as the run starts holding it: as read, or quantised into its parts.
    pub fn convert(&self, name: &str, tensor: Tensor) -> Result<Vec<(String, Tensor)>> {
        match &self.quantization {
            Some((q, weights)) => quantized::quantize_parameter(weights, name, tensor, *q),
            None => Ok(vec![(name.to_string(), tensor)]),
        }
    }
}

/// The base model's parameters as the run holds them (a full or partial fine-tune; a LoRA run
/// then adds its adapter): fp32 masters of what trains, and the rest frozen (no gradient, no
/// master copy, no optimizer state). Frozen matrices stay in the compute
/// dtype (the CPU's layers widen one matrix at a time); frozen vectors take the dtype the layers
/// compute in.
fn split(
    recipe: &Recipe,
    config: &Config,
    mut initial: HashMap<String, Tensor>,
    device: &Device,
) -> Result<Trainable> {
    let shapes = model::parameter_shapes(config);
    if let Some(patterns) = &recipe.train.trainable {
        for pattern in patterns {
            ensure!(
                shapes
                    .iter()
                    .any(|(name, _)| crate::recipe::pattern_matches(pattern, name)),
                "train.trainable: {pattern:?} matches no parameter of this {} model (names are \
                 HF's, e.g. {})",
                config.model_type(),
                shapes
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .filter(|n| n.contains(".0."))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let compute = recipe.precision.compute.dtype();
    let (vector_dtype, _) = ops::weight_dtype_and_operands(device, compute);
    let mut params = Vec::new();
    let mut frozen = HashMap::new();
    for (name, shape) in shapes {
        let parts = quantized_parts(&initial, &name);
        if !parts.is_empty() {
            for part in parts {
                let tensor = initial.remove(&part).expect("listed above");
                frozen.insert(part, tensor.to_device(device)?);
            }
            continue;
        }
        let tensor = checked(&mut initial, &name, &shape)?;
        if trains(recipe, &name) {
            let master = tensor.to_dtype(DType::F32)?.to_device(device)?;
            params.push((name, Var::from_tensor(&master)?));
        } else {
            let dtype = match shape.len() {
                2 => initial_dtype(recipe, &name, &shape),
                _ => vector_dtype,
            };
            frozen.insert(name, tensor.to_dtype(dtype)?.to_device(device)?);
        }
    }
    Ok(Trainable {
        params,
        frozen,
        lora: None,
    })
}

/// The names of weight `name`'s quantised parts in `initial` (none if it is held as it is).
fn quantized_parts(initial: &HashMap<String, Tensor>, name: &str) -> Vec<String> {
    (initial.keys())
        .filter(|key| {
            key.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('.') && QuantizedWeight::is_part(key))
        })
        .cloned()
        .collect()
}

/// `initial[name]`, taken out, after checking its shape.
fn checked(initial: &mut HashMap<String, Tensor>, name: &str, shape: &[usize]) -> Result<Tensor> {
    let tensor = initial
        .remove(name)
        .with_context(|| format!("initial weights lack {name}"))?;
    ensure!(
        tensor.dims() == shape,
        "initial weight {name} has shape {:?}, expected {shape:?}",
        tensor.dims()
    );
    Ok(tensor)
}
