//! GPT-J and the Hugging Face model directory it lives in.

pub mod gptj;
pub mod init;
pub mod weights;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use crate::ops::KvCache;
pub use gptj::{Batch, Config, GptJ};
pub use weights::{TensorSpec, WeightStore};

/// HF's default `max_shard_size` for `save_pretrained`.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Every parameter of a GPT-J, in the order of HF's `state_dict()`, with its shape.
pub fn parameter_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let e = cfg.n_embd;
    let inner = cfg.inner_dim();
    let v = cfg.vocab_size;
    let mut params = vec![("transformer.wte.weight".to_string(), vec![v, e])];
    for i in 0..cfg.n_layer {
        let p = format!("transformer.h.{i}");
        params.extend([
            (format!("{p}.ln_1.weight"), vec![e]),
            (format!("{p}.ln_1.bias"), vec![e]),
            (format!("{p}.attn.k_proj.weight"), vec![e, e]),
            (format!("{p}.attn.v_proj.weight"), vec![e, e]),
            (format!("{p}.attn.q_proj.weight"), vec![e, e]),
            (format!("{p}.attn.out_proj.weight"), vec![e, e]),
            (format!("{p}.mlp.fc_in.weight"), vec![inner, e]),
            (format!("{p}.mlp.fc_in.bias"), vec![inner]),
            (format!("{p}.mlp.fc_out.weight"), vec![e, inner]),
            (format!("{p}.mlp.fc_out.bias"), vec![e]),
        ]);
    }
    params.extend([
        ("transformer.ln_f.weight".to_string(), vec![e]),
        ("transformer.ln_f.bias".to_string(), vec![e]),
        ("lm_head.weight".to_string(), vec![v, e]),
        ("lm_head.bias".to_string(), vec![v]),
    ]);
    params
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
    let config: Config = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid GPT-J config", path.display()))?;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(config)
}

/// Loads a HF GPT-J model directory for inference in `dtype`.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<GptJ> {
    let config = load_config(dir)?;
    let store = Arc::new(WeightStore::open(dir)?);
    let vb = VarBuilder::from_backend(
        Box::new(weights::StoreBackend(store)),
        dtype,
        device.clone(),
    );
    GptJ::load(vb, &config).map_err(|e| anyhow::anyhow!("loading {}: {e}", dir.display()))
}

/// Loads every parameter of a model directory as named tensors (fp32 master copies for training).
pub fn load_parameters(
    dir: &Path,
    config: &Config,
    dtype: DType,
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
        params.insert(name.clone(), store.load(&name, dtype, device)?);
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
) -> Result<GptJ> {
    let vb = VarBuilder::from_backend(
        Box::new(weights::TensorsBackend(params.clone())),
        compute_dtype,
        device.clone(),
    );
    Ok(GptJ::load(vb, config)?)
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
    let mut files = weights::write_weights(dir, &specs, max_shard_bytes, |spec| {
        let tensor = params
            .get(&spec.name)
            .with_context(|| format!("parameter {} is missing", spec.name))?;
        Ok(tensor.to_dtype(dtype)?)
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
    weights::weights_digest(&parameter_specs(config, dtype), max_shard_bytes, |spec| {
        let tensor = params
            .get(&spec.name)
            .with_context(|| format!("parameter {} is missing", spec.name))?;
        Ok(tensor.to_dtype(dtype)?)
    })
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

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map(|n| n.parse::<usize>())
                .transpose()
                .with_context(|| format!("device {s:?}: expected cuda:N"))?
                .unwrap_or(0);
            Device::new_cuda(ordinal).with_context(|| {
                format!("device {s:?} is not available (was Kiln built with --features cuda?)")
            })
        }
        other => bail!("unknown device {other:?}: expected cpu, cuda or cuda:N"),
    }
}

/// Process-wide CPU settings for Kiln's workloads; call first thing in `main`, before any other
/// thread exists (it sets an environment variable). candle's element-wise ops run on candle's
/// own spinning thread pool, which serialises concurrent callers (data-parallel replicas) and
/// spins between ops while Kiln's kernels run on rayon; Kiln's heavy ops are its own, so that
/// pool gets no workers unless `CANDLE_NUM_THREADS` says otherwise. Measured on the `small`
/// preset: replicas=2 × 1 thread 1,750 → 2,030 tokens/s; one replica unchanged.
pub fn configure_process() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    keep_freed_memory();
}

/// Every training or decoding step allocates and frees the same large buffers (activations,
/// gradients, 50 MB logits chunks and embedding-sized gradients). glibc serves blocks above its
/// mmap threshold (at most 32 MB) with fresh mmaps and unmaps them on free, so each step would
/// page-fault its working set back in (over 10% of a CPU training step). Serving everything
/// from one heap arena that is never trimmed keeps freed blocks for reuse: the steps' identical
/// allocation pattern then finds them again, and RSS stays flat from step 20 to step 200.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; it is called before the heavy allocations start.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
