//! GPT-J, as Hugging Face's `GPTJForCausalLM` computes it.
//!
//! Weight names are HF's own (`transformer.h.0.attn.q_proj.weight`, ...), so loading is a plain
//! `VarBuilder` walk over a HF model directory. Every block runs attention and the MLP in parallel
//! on the output of a single LayerNorm and adds both to the residual stream.
//!
//! Precision follows HF: the matmuls run in the compute dtype, while LayerNorm statistics, the
//! rotary embedding, the attention scores and their softmax are computed in fp32 (HF upcasts query
//! and key before `q @ k^T`), and the final logits are returned in fp32.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::{Batch, BlockFn, CausalLm, Stages};
use crate::ops::{
    self, AttentionKind, AttentionMask, LayerCache, LayerNorm, Linear, Operands, Rotary,
    RotaryPairs, Site,
};

/// `config.json` of a HF `gptj` model, read as is. Unknown keys are kept so that a config we
/// rewrite (e.g. in a checkpoint) loses nothing HF or the user put there.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Config {
    pub model_type: String,
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub rotary_dim: Option<usize>,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_activation() -> String {
    "gelu_new".into()
}
fn default_layer_norm_epsilon() -> f64 {
    1e-5
}
fn default_initializer_range() -> f64 {
    0.02
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// GPT-J rotates only the first `rotary_dim` dimensions of each head; HF treats a missing
    /// value as "rotate the whole head".
    pub fn rotary_dim(&self) -> usize {
        self.rotary_dim.unwrap_or(self.head_dim())
    }

    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Checks what the HF implementation silently assumes, so that a bad config fails here with
    /// the field named instead of as a shape error deep inside a forward pass.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.activation_function != "gelu_new" {
            return Err(format!(
                "activation_function is {:?}, expected \"gelu_new\"",
                self.activation_function
            ));
        }
        if self.tie_word_embeddings {
            return Err("tie_word_embeddings is true, but GPT-J has an untied lm_head".into());
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
        let rotary = self.rotary_dim();
        if rotary == 0 || !rotary.is_multiple_of(2) || rotary > self.head_dim() {
            return Err(format!(
                "rotary_dim ({rotary}) must be even, positive and at most the head dim ({})",
                self.head_dim()
            ));
        }
        Ok(())
    }

    /// Every parameter, in the order of HF's `state_dict()`, with its shape.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let e = self.n_embd;
        let inner = self.inner_dim();
        let v = self.vocab_size;
        let mut params = vec![("transformer.wte.weight".to_string(), vec![v, e])];
        for i in 0..self.n_layer {
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

    /// The `config.json` HF writes for this model, with our fields in its vocabulary.
    pub fn to_hf_json(&self) -> serde_json::Value {
        super::hf_json(self, "GPTJForCausalLM")
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    n_head: usize,
    head_dim: usize,
    layer: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Config, layer: usize, operands: Operands) -> Result<Self> {
        let e = cfg.n_embd;
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), e, e, false, operands)?,
            k_proj: Linear::load(vb.pp("k_proj"), e, e, false, operands)?,
            v_proj: Linear::load(vb.pp("v_proj"), e, e, false, operands)?,
            out_proj: Linear::load(vb.pp("out_proj"), e, e, false, operands)?,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            layer,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        batch: &Batch,
        mask: &AttentionMask,
        cache: Option<(&mut LayerCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, e) = xs.dims3()?;
        let heads = |ys: Tensor| ys.reshape((b, t, self.n_head, self.head_dim));
        let q = heads(batch.linear(&self.q_proj, xs)?)?;
        let k = heads(batch.linear(&self.k_proj, xs)?)?;
        let v = heads(batch.linear(&self.v_proj, xs)?)?;
        let kind = AttentionKind {
            rotary: Some(rotary),
            score_divisor: (self.head_dim as f64).sqrt(),
            dropout: batch.attention_dropout(self.layer),
        };
        let out = ops::causal_attention(&q, &k, &v, kind, &batch.position_ids, mask, cache)?;
        let out = batch.linear(&self.out_proj, &out.reshape((b, t, e))?)?;
        batch.drop(out, Site::AttentionOutput(self.layer))
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    fc_in: Linear,
    fc_out: Linear,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &Config, operands: Operands) -> Result<Self> {
        let (e, inner) = (cfg.n_embd, cfg.inner_dim());
        Ok(Self {
            fc_in: Linear::load(vb.pp("fc_in"), e, inner, true, operands)?,
            fc_out: Linear::load(vb.pp("fc_out"), inner, e, true, operands)?,
        })
    }

    fn forward(&self, xs: &Tensor, batch: &Batch) -> Result<Tensor> {
        let hidden = ops::gelu_new(&batch.linear(&self.fc_in, xs)?)?;
        batch.linear(&self.fc_out, &hidden)
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    mlp: Mlp,
    layer: usize,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config, layer: usize, operands: Operands) -> Result<Self> {
        Ok(Self {
            ln_1: LayerNorm::load(vb.pp("ln_1"), cfg.n_embd, cfg.layer_norm_epsilon)?,
            attn: Attention::load(vb.pp("attn"), cfg, layer, operands)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, operands)?,
            layer,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        batch: &Batch,
        mask: &AttentionMask,
        cache: Option<(&mut LayerCache, usize)>,
    ) -> Result<Tensor> {
        let normed = self.ln_1.forward(xs)?;
        let attn = self.attn.forward(&normed, rotary, batch, mask, cache)?;
        let mlp = batch.drop(
            self.mlp.forward(&normed, batch)?,
            Site::MlpOutput(self.layer),
        )?;
        (attn + mlp)? + xs
    }
}

#[derive(Debug, Clone)]
pub struct GptJ {
    wte: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    rotary: Rotary,
    dtype: DType,
}

impl GptJ {
    /// Builds the model from HF-named weights stored in the `VarBuilder`'s dtype, computing in
    /// `dtype` with matmul `operands`.
    pub fn load(vb: VarBuilder, config: &Config, dtype: DType, operands: Operands) -> Result<Self> {
        let t = vb.pp("transformer");
        let blocks = (0..config.n_layer)
            .map(|i| Block::load(t.pp("h").pp(i), config, i, operands))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            wte: t
                .pp("wte")
                .get((config.vocab_size, config.n_embd), "weight")?,
            blocks,
            ln_f: LayerNorm::load(t.pp("ln_f"), config.n_embd, config.layer_norm_epsilon)?,
            lm_head: Linear::load(
                vb.pp("lm_head"),
                config.n_embd,
                config.vocab_size,
                true,
                operands,
            )?,
            rotary: Rotary::new(
                config.rotary_dim(),
                config.n_positions,
                10_000.0,
                RotaryPairs::Interleaved,
                vb.device(),
            )?,
            dtype,
        })
    }
}

impl CausalLm for GptJ {
    fn stages<'a>(&'a self, batch: &'a Batch, cached: usize) -> Result<Stages<'a>> {
        let mask = std::rc::Rc::new(batch.attention_mask(cached, None, self.wte.device())?);
        let blocks = (self.blocks.iter())
            .map(|block| {
                let mask = mask.clone();
                Box::new(move |xs: &Tensor, slot: Option<(&mut LayerCache, usize)>| {
                    block.forward(xs, &self.rotary, batch, &mask, slot)
                }) as BlockFn<'a>
            })
            .collect();
        Ok(Stages {
            embed: Box::new(move || {
                let embedded = ops::embedding(&self.wte, &batch.input_ids)?.to_dtype(self.dtype)?;
                batch.drop(embedded, Site::Embeddings)
            }),
            blocks,
            finish: Box::new(move |xs| self.ln_f.forward(xs)),
        })
    }

    fn lm_head(&self) -> &Linear {
        &self.lm_head
    }
}
