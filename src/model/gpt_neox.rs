//! GPT-NeoX (EleutherAI's Pythia, GPT-NeoX-20B), as Hugging Face's `GPTNeoXForCausalLM`
//! computes it.
//!
//! Differences from GPT-J: one fused `query_key_value` projection whose output is laid out per
//! head (`[q | k | v]` for head 0, then head 1, ...); the rotary embedding turns the two halves
//! of its dims (`rotate_half`) on the first `rotary_pct` of each head; two LayerNorms per block,
//! whose branches run in parallel (`use_parallel_residual`, Pythia) or one after the other; the
//! exact erf `gelu`; an untied, bias-free `embed_out` head.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::block::{Activation, Block, Mlp, Qkv, Reach, SelfAttention};
use super::{Batch, CausalLm, Pass};
use crate::ops::{self, LayerNorm, Linear, Operands, Rotary, RotaryPairs, Site};

/// `config.json` of a HF `gpt_neox` model, read as is; unknown keys are kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Fraction of each head's dims that rotate (older spelling; transformers 5 writes
    /// `rope_parameters.partial_rotary_factor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotary_pct: Option<f64>,
    /// The rotary base (older spelling of `rope_parameters.rope_theta`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotary_emb_base: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "super::config::defaults::layer_norm_epsilon")]
    pub layer_norm_eps: f64,
    #[serde(default = "super::config::defaults::yes")]
    pub use_parallel_residual: bool,
    #[serde(default = "super::config::defaults::yes")]
    pub attention_bias: bool,
    #[serde(default)]
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

/// transformers 5's spelling of the rotary settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RopeParameters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_max_positions() -> usize {
    2048
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Rotated dims per head: `int(head_dim × rotary_pct)`, as HF truncates it.
    pub fn rotary_dim(&self) -> usize {
        let pct = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.partial_rotary_factor)
            .or(self.rotary_pct)
            .unwrap_or(0.25);
        (self.head_dim() as f64 * pct) as usize
    }

    pub fn rotary_base(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rotary_emb_base)
            .unwrap_or(10_000.0)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.hidden_act != "gelu" {
            return Err(format!(
                "hidden_act is {:?}, expected \"gelu\"",
                self.hidden_act
            ));
        }
        if self.tie_word_embeddings {
            return Err("tie_word_embeddings is true, but GPT-NeoX has an untied embed_out".into());
        }
        if let Some(kind) = self
            .rope_parameters
            .as_ref()
            .and_then(|r| r.rope_type.as_ref())
        {
            if kind != "default" {
                return Err(format!(
                    "rope_parameters.rope_type is {kind:?}; Kiln implements \"default\" only"
                ));
            }
        }
        super::check_sizes(
            &[
                ("vocab_size", self.vocab_size),
                ("num_hidden_layers", self.num_hidden_layers),
                ("intermediate_size", self.intermediate_size),
                ("max_position_embeddings", self.max_position_embeddings),
            ],
            ("hidden_size", self.hidden_size),
            ("num_attention_heads", self.num_attention_heads),
        )?;
        if !self.rotary_dim().is_multiple_of(2) {
            return Err(format!(
                "the rotary fraction gives {} dims of a {}-dim head; it must be even",
                self.rotary_dim(),
                self.head_dim()
            ));
        }
        Ok(())
    }

    /// Every parameter, in the order of HF's `state_dict()`, with its shape.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (e, v, inner) = (self.hidden_size, self.vocab_size, self.intermediate_size);
        let mut params = vec![("gpt_neox.embed_in.weight".to_string(), vec![v, e])];
        for i in 0..self.num_hidden_layers {
            let p = format!("gpt_neox.layers.{i}");
            params.extend([
                (format!("{p}.input_layernorm.weight"), vec![e]),
                (format!("{p}.input_layernorm.bias"), vec![e]),
                (format!("{p}.post_attention_layernorm.weight"), vec![e]),
                (format!("{p}.post_attention_layernorm.bias"), vec![e]),
                (
                    format!("{p}.attention.query_key_value.weight"),
                    vec![3 * e, e],
                ),
            ]);
            if self.attention_bias {
                params.push((format!("{p}.attention.query_key_value.bias"), vec![3 * e]));
            }
            params.push((format!("{p}.attention.dense.weight"), vec![e, e]));
            if self.attention_bias {
                params.push((format!("{p}.attention.dense.bias"), vec![e]));
            }
            params.extend([
                (format!("{p}.mlp.dense_h_to_4h.weight"), vec![inner, e]),
                (format!("{p}.mlp.dense_h_to_4h.bias"), vec![inner]),
                (format!("{p}.mlp.dense_4h_to_h.weight"), vec![e, inner]),
                (format!("{p}.mlp.dense_4h_to_h.bias"), vec![e]),
            ]);
        }
        params.extend([
            ("gpt_neox.final_layer_norm.weight".to_string(), vec![e]),
            ("gpt_neox.final_layer_norm.bias".to_string(), vec![e]),
            ("embed_out.weight".to_string(), vec![v, e]),
        ]);
        params
    }

    pub fn to_hf_json(&self) -> serde_json::Value {
        super::hf_json(self, "GPTNeoXForCausalLM")
    }
}

/// GPT-NeoX's layer: a fused per-head `query_key_value`, two LayerNorms, the exact `gelu`, and
/// the branches side by side or one after the other (`use_parallel_residual`).
fn layer(
    vb: VarBuilder,
    cfg: &Config,
    layer: usize,
    rotary: &Rotary,
    operands: Operands,
) -> Result<Block> {
    let (e, inner, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
    let (attn, mlp) = (vb.pp("attention"), vb.pp("mlp"));
    let bias = cfg.attention_bias;
    let d = cfg.head_dim();
    Ok(Block {
        norm_1: LayerNorm::load(vb.pp("input_layernorm"), e, eps)?,
        norm_2: Some(LayerNorm::load(vb.pp("post_attention_layernorm"), e, eps)?),
        attn: SelfAttention {
            qkv: Qkv::PerHead(Linear::load(
                attn.pp("query_key_value"),
                e,
                3 * e,
                bias,
                operands,
            )?),
            out: Linear::load(attn.pp("dense"), e, e, bias, operands)?,
            n_head: cfg.num_attention_heads,
            head_dim: d,
            rotary: Some(rotary.clone()),
            score_divisor: (d as f64).sqrt(),
            reach: Reach::Global,
            layer,
        },
        mlp: Mlp {
            up: Linear::load(mlp.pp("dense_h_to_4h"), e, inner, true, operands)?,
            down: Linear::load(mlp.pp("dense_4h_to_h"), inner, e, true, operands)?,
            activation: Activation::Gelu,
        },
        parallel_residual: cfg.use_parallel_residual,
        layer,
    })
}

#[derive(Debug, Clone)]
pub struct GptNeoX {
    embed_in: Tensor,
    layers: Vec<Block>,
    final_layer_norm: LayerNorm,
    embed_out: Linear,
    dtype: DType,
}

impl GptNeoX {
    /// Builds the model from HF-named weights stored in the `VarBuilder`'s dtype, computing in
    /// `dtype` with matmul `operands`.
    pub fn load(vb: VarBuilder, config: &Config, dtype: DType, operands: Operands) -> Result<Self> {
        let (e, v) = (config.hidden_size, config.vocab_size);
        let base = vb.pp("gpt_neox");
        let rotary = Rotary::new(
            config.rotary_dim(),
            config.max_position_embeddings,
            config.rotary_base() as f32,
            RotaryPairs::Halves,
            vb.device(),
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| layer(base.pp("layers").pp(i), config, i, &rotary, operands))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embed_in: base.pp("embed_in").get((v, e), "weight")?,
            layers,
            final_layer_norm: LayerNorm::load(
                base.pp("final_layer_norm"),
                e,
                config.layer_norm_eps,
            )?,
            embed_out: Linear::load(vb.pp("embed_out"), e, v, false, operands)?,
            dtype,
        })
    }
}

impl CausalLm for GptNeoX {
    /// `embed_in` → layers → `final_layer_norm`.
    fn forward(&self, batch: &Batch, pass: &mut Pass) -> Result<Tensor> {
        let masks = pass.masks(batch, None, self.embed_in.device())?;
        let mut xs = pass.embed(|| {
            let embedded =
                ops::embedding(&self.embed_in, &batch.input_ids)?.to_dtype(self.dtype)?;
            batch.drop(embedded, Site::Embeddings)
        })?;
        for layer in &self.layers {
            xs = pass.block(xs, |xs, cache| layer.forward(xs, batch, &masks, cache))?;
        }
        pass.finish(xs, |xs| self.final_layer_norm.forward(xs))
    }

    fn lm_head(&self) -> &Linear {
        &self.embed_out
    }
}
