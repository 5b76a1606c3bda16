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

use super::block::{Activation, Block, Mlp, Qkv, Reach, SelfAttention};
use super::{Batch, CausalLm, Pass};
use crate::ops::{self, LayerNorm, Linear, Operands, Rotary, RotaryPairs, Site};

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
    #[serde(default = "super::config::defaults::gelu_new")]
    pub activation_function: String,
    #[serde(default = "super::config::defaults::layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "super::config::defaults::initializer_range")]
    pub initializer_range: f64,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
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

/// GPT-J's block: attention and the MLP side by side on one LayerNorm's output.
fn block(
    vb: VarBuilder,
    cfg: &Config,
    layer: usize,
    rotary: &Rotary,
    operands: Operands,
) -> Result<Block> {
    let (e, inner) = (cfg.n_embd, cfg.inner_dim());
    let (attn, mlp) = (vb.pp("attn"), vb.pp("mlp"));
    let projection = |name: &str| Linear::load(attn.pp(name), e, e, false, operands);
    Ok(Block {
        norm_1: LayerNorm::load(vb.pp("ln_1"), e, cfg.layer_norm_epsilon)?,
        norm_2: None,
        attn: SelfAttention {
            qkv: Qkv::Separate {
                q: projection("q_proj")?,
                k: projection("k_proj")?,
                v: projection("v_proj")?,
            },
            out: projection("out_proj")?,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            rotary: Some(rotary.clone()),
            score_divisor: (cfg.head_dim() as f64).sqrt(),
            reach: Reach::Global,
            layer,
        },
        mlp: Mlp {
            up: Linear::load(mlp.pp("fc_in"), e, inner, true, operands)?,
            down: Linear::load(mlp.pp("fc_out"), inner, e, true, operands)?,
            activation: Activation::GeluNew,
        },
        parallel_residual: true,
        layer,
    })
}

#[derive(Debug, Clone)]
pub struct GptJ {
    wte: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    dtype: DType,
}

impl GptJ {
    /// Builds the model from HF-named weights stored in the `VarBuilder`'s dtype, computing in
    /// `dtype` with matmul `operands`.
    pub fn load(vb: VarBuilder, config: &Config, dtype: DType, operands: Operands) -> Result<Self> {
        let t = vb.pp("transformer");
        let rotary = Rotary::new(
            config.rotary_dim(),
            config.n_positions,
            10_000.0,
            RotaryPairs::Interleaved,
            vb.device(),
        )?;
        let blocks = (0..config.n_layer)
            .map(|i| block(t.pp("h").pp(i), config, i, &rotary, operands))
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
            dtype,
        })
    }
}

impl CausalLm for GptJ {
    /// Token embeddings → blocks → `ln_f`.
    fn forward(&self, batch: &Batch, pass: &mut Pass) -> Result<Tensor> {
        let masks = pass.masks(batch, None, self.wte.device())?;
        let mut xs = pass.embed(|| {
            let embedded = ops::embedding(&self.wte, &batch.input_ids)?.to_dtype(self.dtype)?;
            batch.drop(embedded, Site::Embeddings)
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
