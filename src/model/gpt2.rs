//! GPT-2, as Hugging Face's `GPT2LMHeadModel` computes it.
//!
//! Differences from GPT-J: learned position embeddings (`wpe`) instead of rotary; each block
//! runs attention and then the MLP, each after its own LayerNorm (`ln_1`, `ln_2`); the
//! projections are `Conv1D`s, whose weights HF stores `[in, out]`; one fused `c_attn` gives
//! `[q | k | v]`; the head is tied to the token embedding. Options: `scale_attn_weights`
//! (divide scores by `sqrt(head_dim)`) and `scale_attn_by_inverse_layer_idx` (also by the layer
//! number); `reorder_and_upcast_attn` only changes how fp16 scores are computed, and Kiln's
//! scores are fp32 anyway.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::block::{Activation, Block, Mlp, Qkv, Reach, SelfAttention};
use super::{Batch, CausalLm, Pass};
use crate::ops::{self, LayerNorm, Linear, Operands, Site};

/// `config.json` of a HF `gpt2` model, read as is; unknown keys are kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "super::config::defaults::gelu_new")]
    pub activation_function: String,
    #[serde(default = "super::config::defaults::layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "super::config::defaults::yes")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    pub reorder_and_upcast_attn: bool,
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

impl Config {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
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
                "tie_word_embeddings is false, but GPT-2's lm_head is the token \
                        embedding (Kiln implements the tied head only)"
                    .into(),
            );
        }
        super::check_sizes(
            &[
                ("vocab_size", self.vocab_size),
                ("n_positions", self.n_positions),
                ("n_layer", self.n_layer),
            ],
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
        )?;
        Ok(())
    }

    /// Every parameter, in the order of HF's `state_dict()`, with its shape; the tied head is
    /// `transformer.wte.weight` and is not listed again.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (e, v, inner) = (self.n_embd, self.vocab_size, self.inner_dim());
        let mut params = vec![
            ("transformer.wte.weight".to_string(), vec![v, e]),
            (
                "transformer.wpe.weight".to_string(),
                vec![self.n_positions, e],
            ),
        ];
        for i in 0..self.n_layer {
            let p = format!("transformer.h.{i}");
            params.extend([
                (format!("{p}.ln_1.weight"), vec![e]),
                (format!("{p}.ln_1.bias"), vec![e]),
                (format!("{p}.attn.c_attn.weight"), vec![e, 3 * e]),
                (format!("{p}.attn.c_attn.bias"), vec![3 * e]),
                (format!("{p}.attn.c_proj.weight"), vec![e, e]),
                (format!("{p}.attn.c_proj.bias"), vec![e]),
                (format!("{p}.ln_2.weight"), vec![e]),
                (format!("{p}.ln_2.bias"), vec![e]),
                (format!("{p}.mlp.c_fc.weight"), vec![e, inner]),
                (format!("{p}.mlp.c_fc.bias"), vec![inner]),
                (format!("{p}.mlp.c_proj.weight"), vec![inner, e]),
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
        let mut value = serde_json::to_value(self).expect("config serialises");
        let object = value.as_object_mut().expect("config is an object");
        object
            .entry("architectures")
            .or_insert_with(|| serde_json::json!(["GPT2LMHeadModel"]));
        value
    }
}

/// GPT-2's block: attention, then the MLP, each after its own LayerNorm; `Conv1D` projections.
fn block(vb: VarBuilder, cfg: &Config, layer: usize, operands: Operands) -> Result<Block> {
    let (e, inner, eps) = (cfg.n_embd, cfg.inner_dim(), cfg.layer_norm_epsilon);
    let (attn, mlp) = (vb.pp("attn"), vb.pp("mlp"));
    let mut score_divisor = 1.0;
    if cfg.scale_attn_weights {
        score_divisor *= (cfg.head_dim() as f64).sqrt();
    }
    if cfg.scale_attn_by_inverse_layer_idx {
        score_divisor *= (layer + 1) as f64;
    }
    Ok(Block {
        norm_1: LayerNorm::load(vb.pp("ln_1"), e, eps)?,
        norm_2: Some(LayerNorm::load(vb.pp("ln_2"), e, eps)?),
        attn: SelfAttention {
            qkv: Qkv::Stacked(Linear::load_conv1d(attn.pp("c_attn"), e, 3 * e, operands)?),
            out: Linear::load_conv1d(attn.pp("c_proj"), e, e, operands)?,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            rotary: None,
            score_divisor,
            reach: Reach::Global,
            layer,
        },
        mlp: Mlp {
            up: Linear::load_conv1d(mlp.pp("c_fc"), e, inner, operands)?,
            down: Linear::load_conv1d(mlp.pp("c_proj"), inner, e, operands)?,
            activation: Activation::GeluNew,
        },
        parallel_residual: false,
        layer,
    })
}

#[derive(Debug, Clone)]
pub struct Gpt2 {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    dtype: DType,
}

impl Gpt2 {
    /// Builds the model from HF-named weights stored in the `VarBuilder`'s dtype, computing in
    /// `dtype` with matmul `operands`.
    pub fn load(vb: VarBuilder, config: &Config, dtype: DType, operands: Operands) -> Result<Self> {
        let e = config.n_embd;
        let t = vb.pp("transformer");
        let wte = t.pp("wte").get((config.vocab_size, e), "weight")?;
        let blocks = (0..config.n_layer)
            .map(|i| block(t.pp("h").pp(i), config, i, operands))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            lm_head: Linear::tied(wte.clone(), operands),
            wte,
            wpe: t.pp("wpe").get((config.n_positions, e), "weight")?,
            blocks,
            ln_f: LayerNorm::load(t.pp("ln_f"), e, config.layer_norm_epsilon)?,
            dtype,
        })
    }
}

impl CausalLm for Gpt2 {
    /// Token and position embeddings → blocks → `ln_f`.
    fn forward(&self, batch: &Batch, pass: &mut Pass) -> Result<Tensor> {
        let masks = pass.masks(batch, None, self.wte.device())?;
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
