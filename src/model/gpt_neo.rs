//! GPT-Neo (EleutherAI's 125M–2.7B), as Hugging Face's `GPTNeoForCausalLM` computes it.
//!
//! GPT-2's layout (learned positions, LayerNorm before attention and before the MLP, tied head)
//! with three differences: separate `q_proj`/`k_proj`/`v_proj` without bias (plain `Linear`s, not
//! `Conv1D`s); attention scores that are **not** divided by `sqrt(head_dim)`; and layers that
//! alternate between global attention and local attention over the last `window_size`
//! positions, as `attention_types` lists them.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::block::{Activation, Block, Mlp, Qkv, Reach, SelfAttention};
use super::{Batch, CausalLm, Pass};
use crate::ops::{self, LayerNorm, Linear, Operands, Site};

/// `config.json` of a HF `gpt_neo` model, read as is; unknown keys are kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// `[[["global", "local"], 12]]`: the pattern and how many times it repeats.
    pub attention_types: Vec<(Vec<String>, usize)>,
    #[serde(default)]
    pub intermediate_size: Option<usize>,
    #[serde(default = "default_window_size")]
    pub window_size: usize,
    #[serde(default = "super::config::defaults::gelu_new")]
    pub activation_function: String,
    #[serde(default = "super::config::defaults::layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "super::config::defaults::yes")]
    pub tie_word_embeddings: bool,
    #[serde(default = "super::config::defaults::initializer_range")]
    pub initializer_range: f64,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_window_size() -> usize {
    256
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    pub fn inner_dim(&self) -> usize {
        self.intermediate_size.unwrap_or(4 * self.hidden_size)
    }

    /// `attention_types` expanded to one entry per layer.
    fn layer_reach(&self) -> std::result::Result<Vec<Reach>, String> {
        let mut layers = Vec::new();
        for (pattern, repeats) in &self.attention_types {
            for _ in 0..*repeats {
                for kind in pattern {
                    layers.push(match kind.as_str() {
                        "global" => Reach::Global,
                        "local" => Reach::Local,
                        other => {
                            return Err(format!(
                                "attention_types names {other:?}; expected \"global\" or \"local\""
                            ))
                        }
                    });
                }
            }
        }
        Ok(layers)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.activation_function != "gelu_new" {
            return Err(format!(
                "activation_function is {:?}, expected \"gelu_new\"",
                self.activation_function
            ));
        }
        if !self.tie_word_embeddings {
            return Err(
                "tie_word_embeddings is false, but GPT-Neo's lm_head is the token \
                        embedding (Kiln implements the tied head only)"
                    .into(),
            );
        }
        super::check_sizes(
            &[
                ("vocab_size", self.vocab_size),
                ("max_position_embeddings", self.max_position_embeddings),
                ("num_layers", self.num_layers),
                ("window_size", self.window_size),
            ],
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
        )?;
        // Counted, not expanded: the repeats are the config's to choose, and expanding a
        // pattern repeated 1e15 times would allocate before the sizes are checked.
        let layers = self
            .attention_types
            .iter()
            .try_fold(0usize, |total, (pattern, repeats)| {
                total.checked_add(pattern.len().checked_mul(*repeats)?)
            });
        if layers != Some(self.num_layers) {
            let layers = layers.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string());
            return Err(format!(
                "attention_types expands to {layers} layers, but num_layers is {}",
                self.num_layers
            ));
        }
        let kinds = self.attention_types.iter().flat_map(|(pattern, _)| pattern);
        if let Some(other) = kinds
            .map(String::as_str)
            .find(|k| !["global", "local"].contains(k))
        {
            return Err(format!(
                "attention_types names {other:?}; expected \"global\" or \"local\""
            ));
        }
        Ok(())
    }

    /// Every parameter, in the order of HF's `state_dict()`, with its shape; the tied head is
    /// `transformer.wte.weight` and is not listed again.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (e, v, inner) = (self.hidden_size, self.vocab_size, self.inner_dim());
        let mut params = vec![
            ("transformer.wte.weight".to_string(), vec![v, e]),
            (
                "transformer.wpe.weight".to_string(),
                vec![self.max_position_embeddings, e],
            ),
        ];
        for i in 0..self.num_layers {
            let p = format!("transformer.h.{i}");
            params.extend([
                (format!("{p}.ln_1.weight"), vec![e]),
                (format!("{p}.ln_1.bias"), vec![e]),
                (format!("{p}.attn.attention.k_proj.weight"), vec![e, e]),
                (format!("{p}.attn.attention.v_proj.weight"), vec![e, e]),
                (format!("{p}.attn.attention.q_proj.weight"), vec![e, e]),
                (format!("{p}.attn.attention.out_proj.weight"), vec![e, e]),
                (format!("{p}.attn.attention.out_proj.bias"), vec![e]),
                (format!("{p}.ln_2.weight"), vec![e]),
                (format!("{p}.ln_2.bias"), vec![e]),
                (format!("{p}.mlp.c_fc.weight"), vec![inner, e]),
                (format!("{p}.mlp.c_fc.bias"), vec![inner]),
                (format!("{p}.mlp.c_proj.weight"), vec![e, inner]),
                (format!("{p}.mlp.c_proj.bias"), vec![e]),
            ]);
        }
        params.extend([
            ("transformer.ln_f.weight".to_string(), vec![e]),
            ("transformer.ln_f.bias".to_string(), vec![e]),
        ]);
        params
    }

    pub fn to_hf_json(&self) -> serde_json::Value {
        super::hf_json(self, "GPTNeoForCausalLM")
    }
}

/// GPT-Neo's block: GPT-2's shape with plain `Linear`s, unscaled scores (HF's
/// `GPTNeoSelfAttention` has no division) and a global or local reach.
fn block(
    vb: VarBuilder,
    cfg: &Config,
    (layer, reach): (usize, Reach),
    operands: Operands,
) -> Result<Block> {
    let (e, inner, eps) = (cfg.hidden_size, cfg.inner_dim(), cfg.layer_norm_epsilon);
    let (attn, mlp) = (vb.pp("attn").pp("attention"), vb.pp("mlp"));
    let projection = |name: &str| Linear::load(attn.pp(name), e, e, false, operands);
    Ok(Block {
        norm_1: LayerNorm::load(vb.pp("ln_1"), e, eps)?,
        norm_2: Some(LayerNorm::load(vb.pp("ln_2"), e, eps)?),
        attn: SelfAttention {
            qkv: Qkv::Separate {
                q: projection("q_proj")?,
                k: projection("k_proj")?,
                v: projection("v_proj")?,
            },
            out: Linear::load(attn.pp("out_proj"), e, e, true, operands)?,
            n_head: cfg.num_heads,
            head_dim: cfg.head_dim(),
            rotary: None,
            score_divisor: 1.0,
            reach,
            layer,
        },
        mlp: Mlp {
            up: Linear::load(mlp.pp("c_fc"), e, inner, true, operands)?,
            down: Linear::load(mlp.pp("c_proj"), inner, e, true, operands)?,
            activation: Activation::GeluNew,
        },
        parallel_residual: false,
        layer,
    })
}

#[derive(Debug, Clone)]
pub struct GptNeo {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    window_size: usize,
    dtype: DType,
}

impl GptNeo {
    /// Builds the model from HF-named weights stored in the `VarBuilder`'s dtype, computing in
    /// `dtype` with matmul `operands`.
    pub fn load(vb: VarBuilder, config: &Config, dtype: DType, operands: Operands) -> Result<Self> {
        let e = config.hidden_size;
        let t = vb.pp("transformer");
        let wte = t.pp("wte").get((config.vocab_size, e), "weight")?;
        let reach = config.layer_reach().map_err(candle_core::Error::msg)?;
        let blocks = reach
            .iter()
            .enumerate()
            .map(|(i, &reach)| block(t.pp("h").pp(i), config, (i, reach), operands))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            lm_head: Linear::tied(wte.clone(), operands),
            wte,
            wpe: t
                .pp("wpe")
                .get((config.max_position_embeddings, e), "weight")?,
            blocks,
            ln_f: LayerNorm::load(t.pp("ln_f"), e, config.layer_norm_epsilon)?,
            window_size: config.window_size,
            dtype,
        })
    }
}

impl CausalLm for GptNeo {
    /// Token and position embeddings → blocks (global and local) → `ln_f`.
    fn forward(&self, batch: &Batch, pass: &mut Pass) -> Result<Tensor> {
        let masks = pass.masks(batch, Some(self.window_size), self.wte.device())?;
        let mut xs = pass.embed(|| {
            let tokens = ops::embedding(&self.wte, &batch.input_ids)?.to_dtype(self.dtype)?;
            let positions = ops::embedding(&self.wpe, &batch.position_ids)?.to_dtype(self.dtype)?;
            batch.drop((tokens + positions)?, Site::Embeddings)
        })?;
        for block in &self.blocks {
            xs = pass.block(xs, |xs, cache| block.forward(xs, batch, &masks, cache))?;
        }
        pass.finish(xs, |xs| self.ln_f.forward(xs))
    }

    fn lm_head(&self) -> &Linear {
        &self.lm_head
    }
}
