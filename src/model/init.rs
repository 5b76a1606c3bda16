//! Randomly initialised GPT-J models, written straight to a HF model directory.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};
use sha2::{Digest, Sha256};

use super::{parameter_specs, weights, write_config, Config};

/// The presets users ask for by name: tiny shapes per family for tests and quick runs, and the
/// published shapes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// GPT-J, 2 layers, d 128, 4 heads, rotary 16: tests and the quickstart.
    Tiny,
    /// GPT-J, 4 layers, d 256, 8 heads, rotary 16, vocab 50400: benchmarks.
    Small,
    /// The real GPT-J-6B shape.
    #[value(name = "gptj-6b")]
    #[serde(rename = "gptj-6b")]
    Gptj6b,
    /// GPT-2, 2 layers, d 128, 4 heads.
    #[value(name = "gpt2-tiny")]
    #[serde(rename = "gpt2-tiny")]
    Gpt2Tiny,
    /// GPT-2 small (124M).
    Gpt2,
    /// GPT-2 medium (355M).
    Gpt2Medium,
    /// GPT-2 large (774M).
    Gpt2Large,
    /// GPT-2 XL (1.5B).
    Gpt2Xl,
    /// GPT-Neo, 2 layers (one global, one local attention over 16 positions), d 128, 4 heads.
    NeoTiny,
    /// GPT-Neo 125M.
    #[value(name = "gpt-neo-125m")]
    #[serde(rename = "gpt-neo-125m")]
    GptNeo125m,
    /// GPT-Neo 1.3B.
    #[value(name = "gpt-neo-1.3b")]
    #[serde(rename = "gpt-neo-1.3b")]
    GptNeo1_3b,
    /// GPT-Neo 2.7B.
    #[value(name = "gpt-neo-2.7b")]
    #[serde(rename = "gpt-neo-2.7b")]
    GptNeo2_7b,
    /// GPT-NeoX, 2 layers, d 128, 4 heads, a quarter of each head rotating (as Pythia).
    NeoxTiny,
    /// Pythia-70M.
    #[value(name = "pythia-70m")]
    #[serde(rename = "pythia-70m")]
    Pythia70m,
    /// Pythia-160M.
    #[value(name = "pythia-160m")]
    #[serde(rename = "pythia-160m")]
    Pythia160m,
    /// Pythia-410M.
    #[value(name = "pythia-410m")]
    #[serde(rename = "pythia-410m")]
    Pythia410m,
    /// Pythia-1B.
    #[value(name = "pythia-1b")]
    #[serde(rename = "pythia-1b")]
    Pythia1b,
}

impl Preset {
    pub fn config(self) -> Config {
        match self {
            Preset::Tiny => gptj(2, 128, 4, 16),
            Preset::Small => gptj(4, 256, 8, 16),
            Preset::Gptj6b => gptj(28, 4096, 16, 64),
            Preset::Gpt2Tiny => gpt2(2, 128, 4),
            Preset::Gpt2 => gpt2(12, 768, 12),
            Preset::Gpt2Medium => gpt2(24, 1024, 16),
            Preset::Gpt2Large => gpt2(36, 1280, 20),
            Preset::Gpt2Xl => gpt2(48, 1600, 25),
            Preset::NeoTiny => gpt_neo(2, 128, 4, 16),
            Preset::GptNeo125m => gpt_neo(12, 768, 12, 256),
            Preset::GptNeo1_3b => gpt_neo(24, 2048, 16, 256),
            Preset::GptNeo2_7b => gpt_neo(32, 2560, 20, 256),
            Preset::NeoxTiny => pythia(2, 128, 4),
            Preset::Pythia70m => pythia(6, 512, 8),
            Preset::Pythia160m => pythia(12, 768, 12),
            Preset::Pythia410m => pythia(24, 1024, 16),
            Preset::Pythia1b => pythia(16, 2048, 8),
        }
    }
}

fn gptj(n_layer: usize, n_embd: usize, n_head: usize, rotary_dim: usize) -> Config {
    Config::GptJ(super::gptj::Config {
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
    })
}

/// GPT-2's published configs: vocabulary 50257, 1024 positions.
fn gpt2(n_layer: usize, n_embd: usize, n_head: usize) -> Config {
    Config::Gpt2(super::gpt2::Config {
        model_type: "gpt2".into(),
        vocab_size: 50257,
        n_positions: 1024,
        n_embd,
        n_layer,
        n_head,
        n_inner: None,
        activation_function: "gelu_new".into(),
        layer_norm_epsilon: 1e-5,
        scale_attn_weights: true,
        scale_attn_by_inverse_layer_idx: false,
        reorder_and_upcast_attn: false,
        tie_word_embeddings: true,
        initializer_range: 0.02,
        bos_token_id: Some(50256),
        eos_token_id: Some(50256),
        extra: Default::default(),
    })
}

/// GPT-Neo's published configs: global and local layers alternating, vocabulary 50257, 2048
/// positions.
fn gpt_neo(num_layers: usize, hidden_size: usize, num_heads: usize, window_size: usize) -> Config {
    Config::GptNeo(super::gpt_neo::Config {
        model_type: "gpt_neo".into(),
        vocab_size: 50257,
        max_position_embeddings: 2048,
        hidden_size,
        num_layers,
        num_heads,
        attention_types: vec![(vec!["global".into(), "local".into()], num_layers / 2)],
        intermediate_size: None,
        window_size,
        activation_function: "gelu_new".into(),
        layer_norm_epsilon: 1e-5,
        tie_word_embeddings: true,
        initializer_range: 0.02,
        bos_token_id: Some(50256),
        eos_token_id: Some(50256),
        extra: Default::default(),
    })
}

/// Pythia's configs: vocabulary 50304, 2048 positions, 4x MLP, rotary on a quarter of each
/// head, parallel residual, token 0 as bos/eos.
fn pythia(num_hidden_layers: usize, hidden_size: usize, num_attention_heads: usize) -> Config {
    Config::GptNeoX(super::gpt_neox::Config {
        model_type: "gpt_neox".into(),
        vocab_size: 50304,
        hidden_size,
        num_hidden_layers,
        num_attention_heads,
        intermediate_size: 4 * hidden_size,
        hidden_act: "gelu".into(),
        rotary_pct: Some(0.25),
        rotary_emb_base: Some(10_000.0),
        rope_parameters: None,
        max_position_embeddings: 2048,
        layer_norm_eps: 1e-5,
        use_parallel_residual: true,
        attention_bias: true,
        tie_word_embeddings: false,
        initializer_range: 0.02,
        bos_token_id: Some(0),
        eos_token_id: Some(0),
        extra: Default::default(),
    })
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
    let is_norm = ["ln_", "layernorm", "layer_norm"]
        .iter()
        .any(|n| name.contains(n));
    if is_norm {
        return Ok(Tensor::ones(shape, DType::F32, &device)?);
    }
    let digest = Sha256::new()
        .chain_update(seed.to_le_bytes())
        .chain_update(name.as_bytes())
        .finalize();
    let tensor_seed = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
    let mut std = cfg.initializer_range();
    // GPT-2's scheme (HF `_init_weights`): the projections back into the residual stream
    // shrink with depth so the stream's variance stays put.
    if let Config::Gpt2(c) = cfg {
        if name.ends_with("c_proj.weight") {
            std /= (2.0 * c.n_layer as f64).sqrt();
        }
    }
    let normal = Normal::new(0.0f32, std as f32)?;
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

/// Grows the vocabulary of `params` (HF names) to `rows` as transformers'
/// `resize_token_embeddings` does by default (`mean_resizing`): each new row of the embedding
/// and of an untied head is the mean of the old rows, a new head bias the mean of the old bias.
/// (transformers samples the new rows around that mean with covariance 1e-9 × the rows'
/// covariance, a perturbation of about 3e-5 of their spread; Kiln takes the mean itself.)
pub fn resize_vocabulary(
    config: &mut Config,
    params: &mut std::collections::HashMap<String, Tensor>,
    rows: usize,
) -> Result<()> {
    let old = config.vocab_size();
    if rows <= old {
        return Ok(());
    }
    let (head, head_bias) = config.head_parameter_names();
    let mut names = vec![config.embedding_parameter_name(), head];
    names.dedup();
    names.extend(head_bias);
    for name in names {
        let Some(tensor) = params.get(name) else {
            continue;
        };
        let dtype = tensor.dtype();
        let wide = tensor.to_dtype(DType::F32)?;
        let mean = wide.mean_keepdim(0)?;
        let grown = match wide.rank() {
            1 => Tensor::cat(&[&wide, &mean.broadcast_as(rows - old)?], 0)?,
            _ => {
                let new_rows = mean.broadcast_as((rows - old, wide.dim(1)?))?;
                Tensor::cat(&[&wide, &new_rows.contiguous()?], 0)?
            }
        };
        params.insert(name.to_string(), grown.to_dtype(dtype)?);
    }
    config.set_vocab_size(rows);
    Ok(())
}
