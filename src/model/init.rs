//! Randomly initialised GPT-J models, written straight to a HF model directory.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use sha2::{Digest, Sha256};

use super::{parameter_specs, weights, write_config, Config};

/// The presets users ask for by name.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// 2 layers, d 128, 4 heads, rotary 16: tests and the quickstart.
    Tiny,
    /// 4 layers, d 256, 8 heads, rotary 16, vocab 50400: benchmarks.
    Small,
    /// The real GPT-J-6B shape.
    #[value(name = "gptj-6b")]
    #[serde(rename = "gptj-6b")]
    Gptj6b,
}

impl Preset {
    pub fn config(self) -> Config {
        let (n_layer, n_embd, n_head, rotary_dim) = match self {
            Preset::Tiny => (2, 128, 4, 16),
            Preset::Small => (4, 256, 8, 16),
            Preset::Gptj6b => (28, 4096, 16, 64),
        };
        Config {
            model_type: "gptj".into(),
            vocab_size: 50400,
            n_positions: 2048,
            n_embd,
            n_layer,
            n_head,
            rotary_dim: Some(rotary_dim),
            n_inner: None,
            activation_function: "gelu_new".into(),
            layer_norm_epsilon: 1e-5,
            bos_token_id: Some(50256),
            eos_token_id: Some(50256),
            pad_token_id: None,
            tie_word_embeddings: false,
            initializer_range: 0.02,
            extra: Default::default(),
        }
    }
}

/// GPT-J's initialisation (HF `_init_weights`): weights and embeddings normal(0, 0.02), biases 0,
/// LayerNorm scale 1. Each tensor has its own RNG seeded from (seed, name), so a tensor's values
/// do not depend on the order tensors are generated in or on how the model is sharded.
pub fn init_parameter(cfg: &Config, name: &str, shape: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let device = Device::Cpu;
    if name.ends_with(".bias") {
        return Ok(Tensor::zeros(shape, DType::F32, &device)?);
    }
    if name.contains(".ln_") || name.contains("ln_f.") {
        return Ok(Tensor::ones(shape, DType::F32, &device)?);
    }
    let digest = Sha256::new()
        .chain_update(seed.to_le_bytes())
        .chain_update(name.as_bytes())
        .finalize();
    let tensor_seed = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
    let normal = Normal::new(0.0f32, cfg.initializer_range as f32)?;
    // Chunks with their own seeds let rayon fill a 6B model's 800 MB embedding in parallel while
    // staying deterministic.
    const CHUNK: usize = 1 << 20;
    let mut values = vec![0f32; n];
    use rayon::prelude::*;
    values
        .par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                tensor_seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            );
            for v in chunk.iter_mut() {
                *v = normal.sample(&mut rng);
            }
        });
    Ok(Tensor::from_vec(values, shape, &device)?)
}

/// Writes a randomly initialised model (config.json + safetensors) into `out`, one tensor at a
/// time, so even the 6B preset needs only its largest tensor in memory.
pub fn write_random_model(
    out: &Path,
    cfg: &Config,
    seed: u64,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<Vec<String>> {
    if let Err(e) = cfg.validate() {
        bail!("invalid model config: {e}");
    }
    std::fs::create_dir_all(out)?;
    write_config(out, cfg, dtype)?;
    let specs = parameter_specs(cfg, dtype);
    let mut files = weights::write_weights(out, &specs, max_shard_bytes, |spec| {
        Ok(init_parameter(cfg, &spec.name, &spec.shape, seed)?.to_dtype(dtype)?)
    })?;
    files.insert(0, "config.json".into());
    Ok(files)
}
