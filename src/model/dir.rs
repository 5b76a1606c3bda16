//! Hugging Face model directories: `config.json`, safetensors weights (sharded as HF shards
//! them), the companion tokenizer files, and adapters merged into their base.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::quantized::{Quantization, QuantizedWeight};
use super::{lora, weights, Config, Model, TensorSpec, WeightStore};

/// HF's default `max_shard_size` for `save_pretrained`.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Every parameter of `cfg`'s model, in the order of HF's `state_dict()`, with its shape.
pub fn parameter_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    cfg.parameter_shapes()
}

pub fn parameter_specs(cfg: &Config, dtype: DType) -> Vec<TensorSpec> {
    parameter_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| TensorSpec { name, dtype, shape })
        .collect()
}

/// Reads and validates `DIR/config.json`.
pub fn load_config(dir: &Path) -> Result<Config> {
    let path = dir.join("config.json");
    if !dir.is_dir() {
        bail!("{}: model directory does not exist", dir.display());
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read the model config", path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let config =
        Config::from_json(value).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(config)
}

/// Loads a HF model directory for inference in `dtype`.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<Model> {
    load_model_with_adapter(dir, None, dtype, device)
}

/// Loads a HF model directory for inference in `dtype`, with a PEFT LoRA `adapter` merged into
/// its weights as they load (nothing is written).
pub fn load_model_with_adapter(
    dir: &Path,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<Model> {
    let config = load_config(dir)?;
    let store = Arc::new(WeightStore::open(dir)?);
    let mut backend: Box<dyn candle_nn::var_builder::SimpleBackend> =
        Box::new(weights::StoreBackend(store));
    if let Some(adapter_dir) = adapter {
        let deltas = lora::Adapter::load(adapter_dir, device)
            .and_then(|a| a.deltas(&config))
            .with_context(|| {
                format!(
                    "applying adapter {} to {}",
                    adapter_dir.display(),
                    dir.display()
                )
            })?;
        backend = Box::new(lora::MergedBackend {
            base: backend,
            deltas,
        });
    }
    let vb = VarBuilder::from_backend(backend, dtype, device.clone());
    Model::load(vb, &config).map_err(|e| anyhow::anyhow!("loading {}: {e}", dir.display()))
}

/// The model of `dir` with the adapter of `adapter_dir` beside its layers, unmerged: it runs
/// with the adapter on, or off (`Batch::adapters_off`) as its base — one model for both. With
/// `quantization`, the base's linear weights are quantised as they load.
pub fn load_model_with_attached_adapter(
    dir: &Path,
    adapter_dir: &Path,
    dtype: DType,
    device: &Device,
    quantization: Option<Quantization>,
) -> Result<Model> {
    let config = load_config(dir)?;
    let base = base_backend(dir, &config, quantization)?;
    let context = || {
        format!(
            "attaching adapter {} to {}",
            adapter_dir.display(),
            dir.display()
        )
    };
    let adapter = lora::Adapter::load(adapter_dir, device).with_context(context)?;
    let backend = lora::AttachedBackend::new(base, &adapter, &config).with_context(context)?;
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    Model::load(vb, &config).map_err(|e| anyhow::anyhow!("loading {}: {e}", dir.display()))
}

/// Loads `dir` for inference in `dtype` (the `--quantize` of `generate`, `eval`, `score`,
/// `serve` and `bench`): with `quantization`, the linear weights are quantised one at a time as
/// they load, and an adapter stays beside them unmerged, as a QLoRA adapter was trained; without,
/// as [`load_model_with_adapter`].
pub fn load_model_quantized(
    dir: &Path,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
    quantization: Option<Quantization>,
) -> Result<Model> {
    match (quantization, adapter) {
        (None, _) => load_model_with_adapter(dir, adapter, dtype, device),
        (Some(_), Some(adapter)) => {
            load_model_with_attached_adapter(dir, adapter, dtype, device, quantization)
        }
        (Some(_), None) => {
            let config = load_config(dir)?;
            let backend = base_backend(dir, &config, quantization)?;
            let vb = VarBuilder::from_backend(backend, dtype, device.clone());
            Model::load(vb, &config).map_err(|e| anyhow::anyhow!("loading {}: {e}", dir.display()))
        }
    }
}

/// The weights of `dir`, memory-mapped, their linear weights quantised if asked.
fn base_backend(
    dir: &Path,
    config: &Config,
    quantization: Option<Quantization>,
) -> Result<Box<dyn candle_nn::var_builder::SimpleBackend>> {
    let store = Box::new(weights::StoreBackend(Arc::new(WeightStore::open(dir)?)));
    Ok(match quantization {
        Some(q) => Box::new(super::quantized::QuantizingBackend::new(store, config, q)),
        None => store,
    })
}

/// Files of a model directory besides its config and weights that a merged copy keeps.
const COMPANION_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

/// Writes `base` with `adapter` merged into it as a HF model directory `out`, one tensor at a
/// time (a 6B model needs about one weight matrix of memory besides the memory-mapped base),
/// in the base's dtype. Returns the files written.
pub fn merge_adapter(base: &Path, adapter_dir: &Path, out: &Path) -> Result<Vec<String>> {
    let config = load_config(base)?;
    let adapter = lora::Adapter::load(adapter_dir, &Device::Cpu)?;
    let deltas = adapter.deltas(&config).with_context(|| {
        format!(
            "adapter {} does not fit base model {}",
            adapter_dir.display(),
            base.display()
        )
    })?;
    let store = WeightStore::open(base)?;
    let dtype = config_dtype(&config);
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    write_config(out, &config, dtype)?;
    let specs = parameter_specs(&config, dtype);
    let mut files = weights::write_weights(out, &specs, DEFAULT_MAX_SHARD_BYTES, |spec| {
        let tensor = store.load(&spec.name, DType::F32, &Device::Cpu)?;
        let merged = match deltas.get(&spec.name) {
            Some(delta) => (tensor + delta)?,
            None => tensor,
        };
        Ok(merged.to_dtype(dtype)?)
    })?;
    files.insert(0, "config.json".into());
    for name in COMPANION_FILES {
        let from = [base, adapter_dir]
            .into_iter()
            .map(|dir| dir.join(name))
            .find(|path| path.is_file());
        if let Some(from) = from {
            std::fs::copy(&from, out.join(name))
                .with_context(|| format!("copying {} into {}", from.display(), out.display()))?;
            files.push(name.to_string());
        }
    }
    Ok(files)
}

/// The dtype `config.json` says the weights are stored in (`dtype`, or transformers 4's
/// `torch_dtype`); fp32 when it says nothing.
fn config_dtype(config: &Config) -> DType {
    let extra = config.extra();
    ["dtype", "torch_dtype"]
        .iter()
        .find_map(|key| extra.get(*key).and_then(|v| v.as_str()))
        .and_then(|name| parse_dtype(name).ok())
        .unwrap_or(DType::F32)
}

/// Loads every parameter of a model directory as named tensors (fp32 master copies for training).
pub fn load_parameters(
    dir: &Path,
    config: &Config,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    load_parameters_as(dir, config, |_, _| dtype, device)
}

/// [`load_parameters`] with each tensor converted to `dtype_of(name, shape)` as it is read from the
/// memory-mapped file: a half-precision copy of a model never passes through fp32 whole.
pub fn load_parameters_as(
    dir: &Path,
    config: &Config,
    dtype_of: impl Fn(&str, &[usize]) -> DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    load_parameters_converted(
        dir,
        config,
        dtype_of,
        |name, t| Ok(vec![(name.into(), t)]),
        device,
    )
}

/// [`load_parameters_as`] with each tensor handed to `convert` as it is read, which gives the
/// tensors to hold for it (a quantised weight's parts, see [`super::quantized`]).
pub fn load_parameters_converted(
    dir: &Path,
    config: &Config,
    dtype_of: impl Fn(&str, &[usize]) -> DType,
    convert: impl Fn(&str, Tensor) -> Result<Vec<(String, Tensor)>>,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let store = WeightStore::open(dir)?;
    let mut params = HashMap::new();
    for (name, shape) in parameter_shapes(config) {
        let found = store.shape(&name).with_context(|| {
            format!(
                "{}: tensor {name} is missing from the weights",
                dir.display()
            )
        })?;
        if found != shape.as_slice() {
            bail!(
                "{}: tensor {name} has shape {found:?}, but config.json implies {shape:?}",
                dir.display()
            );
        }
        let tensor = store.load(&name, dtype_of(&name, &shape), device)?;
        params.extend(convert(&name, tensor)?);
    }
    Ok(params)
}

/// Builds a model from named tensors; the forward runs in `compute_dtype` and, for tensors that
/// are autograd variables, stays differentiable with respect to them.
/// Variables by name as the tensors they hold (the current values, still tracked by autograd).
pub fn parameter_tensors(params: &[(String, candle_core::Var)]) -> HashMap<String, Tensor> {
    params
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
        .collect()
}

pub fn model_from_parameters(
    config: &Config,
    params: &HashMap<String, Tensor>,
    compute_dtype: DType,
    device: &Device,
) -> Result<Model> {
    let vb = VarBuilder::from_backend(
        Box::new(weights::TensorsBackend(params.clone())),
        compute_dtype,
        device.clone(),
    );
    Ok(Model::load(vb, config)?)
}

/// Writes `config.json` and the weights (converted to `dtype`) as a HF model directory.
pub fn save_model(
    dir: &Path,
    config: &Config,
    params: &HashMap<String, Tensor>,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    write_config(dir, config, dtype)?;
    let specs = parameter_specs(config, dtype);
    let quantized = QuantizedParams::new(config, params);
    let mut files = weights::write_weights(dir, &specs, max_shard_bytes, |spec| {
        Ok(quantized.dense(&spec.name)?.to_dtype(dtype)?)
    })?;
    files.insert(0, "config.json".into());
    Ok(files)
}

/// sha256 over the weight files [`save_model`] would write for `params` in `dtype` (what
/// `eval::mnli::weights_sha256` reads back from the directory), without writing them.
pub fn weights_sha256(
    config: &Config,
    params: &HashMap<String, Tensor>,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<String> {
    let quantized = QuantizedParams::new(config, params);
    weights::weights_digest(&parameter_specs(config, dtype), max_shard_bytes, |spec| {
        Ok(quantized.dense(&spec.name)?.to_dtype(dtype)?)
    })
}

/// Named tensors in which some weights may be quantised (a partial fine-tune with
/// `model.quantize`), read back as dense tensors one at a time: a quantised frozen weight as
/// its dequantised values, in its HF layout — the weights the run computed with.
struct QuantizedParams<'a> {
    params: &'a HashMap<String, Tensor>,
    layers: HashMap<String, bool>,
    shapes: HashMap<String, Vec<usize>>,
    vb: VarBuilder<'a>,
}

impl<'a> QuantizedParams<'a> {
    fn new(config: &Config, params: &'a HashMap<String, Tensor>) -> Self {
        let any_quantized = params.keys().any(|name| QuantizedWeight::is_part(name));
        let vb = VarBuilder::from_backend(
            Box::new(weights::TensorsBackend(match any_quantized {
                true => params.clone(),
                false => HashMap::new(),
            })),
            DType::F32,
            Device::Cpu,
        );
        Self {
            params,
            layers: super::quantized::quantized_weights(config),
            shapes: parameter_shapes(config).into_iter().collect(),
            vb,
        }
    }

    fn dense(&self, name: &str) -> Result<Tensor> {
        if let Some(tensor) = self.params.get(name) {
            return Ok(tensor.clone());
        }
        let missing = || format!("parameter {name} is missing");
        let conv1d = *self.layers.get(name).with_context(missing)?;
        let shape = self.shapes.get(name).with_context(missing)?;
        let (rows, cols) = match conv1d {
            true => (shape[1], shape[0]),
            false => (shape[0], shape[1]),
        };
        let weight = QuantizedWeight::load(&self.vb, name, rows, cols)?.with_context(missing)?;
        let dense = weight.dequantize(DType::F32)?;
        Ok(match conv1d {
            true => dense.t()?.contiguous()?,
            false => dense,
        })
    }
}

pub fn write_config(dir: &Path, config: &Config, dtype: DType) -> Result<()> {
    let mut json = config.to_hf_json();
    json["dtype"] = serde_json::json!(dtype_name_hf(dtype));
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("{}: cannot write", path.display()))
}

fn dtype_name_hf(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Parses the user's spelling of a dtype (`fp32`, `float16`, `bf16`, ...).
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "fp32" | "f32" | "float32" | "float" => DType::F32,
        "fp16" | "f16" | "float16" | "half" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("unknown dtype {other:?}: expected fp32, fp16 or bf16"),
    })
}
