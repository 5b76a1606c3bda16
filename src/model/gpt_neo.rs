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

use super::{Batch, BlockFn, CausalLm, Stages};
use crate::ops::{
    self, AttentionKind, AttentionMask, LayerCache, LayerNorm, Linear, Operands, Site,
};

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
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_initializer_range")]
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
fn default_activation() -> String {
    "gelu_new".into()
}
fn default_layer_norm_epsilon() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_initializer_range() -> f64 {
    0.02
}

/// Which positions a layer attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    Global,
    Local,
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

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    n_head: usize,
    head_dim: usize,
    reach: Reach,
    layer: usize,
}

impl Attention {
    fn load(
        vb: VarBuilder,
        cfg: &Config,
        (layer, reach): (usize, Reach),
        operands: Operands,
    ) -> Result<Self> {
        let e = cfg.hidden_size;
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), e, e, false, operands)?,
            k_proj: Linear::load(vb.pp("k_proj"), e, e, false, operands)?,
            v_proj: Linear::load(vb.pp("v_proj"), e, e, false, operands)?,
            out_proj: Linear::load(vb.pp("out_proj"), e, e, true, operands)?,
            n_head: cfg.num_heads,
            head_dim: cfg.head_dim(),
            reach,
            layer,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        batch: &Batch,
        masks: &Masks,
        cache: Option<(&mut LayerCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, e) = xs.dims3()?;
        let heads = |ys: Tensor| ys.reshape((b, t, self.n_head, self.head_dim));
        let q = heads(batch.linear(&self.q_proj, xs)?)?;
        let k = heads(batch.linear(&self.k_proj, xs)?)?;
        let v = heads(batch.linear(&self.v_proj, xs)?)?;
        // GPT-Neo does not scale its scores (HF's GPTNeoSelfAttention has no division).
        let kind = AttentionKind {
            rotary: None,
            score_divisor: 1.0,
            dropout: batch.attention_dropout(self.layer),
        };
        let mask = match self.reach {
            Reach::Global => &masks.global,
            Reach::Local => &masks.local,
        };
        let out = ops::causal_attention(&q, &k, &v, kind, &batch.position_ids, mask, cache)?;
        let out = batch.linear(&self.out_proj, &out.reshape((b, t, e))?)?;
        batch.drop(out, Site::AttentionOutput(self.layer))
    }
}

/// The two masks a forward pass needs, built once for all layers.
struct Masks {
    global: AttentionMask,
    local: AttentionMask,
}

#[derive(Debug, Clone)]
struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
}

impl Mlp {
    fn forward(&self, xs: &Tensor, batch: &Batch) -> Result<Tensor> {
        let hidden = ops::gelu_new(&batch.linear(&self.c_fc, xs)?)?;
        batch.linear(&self.c_proj, &hidden)
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
    layer: usize,
}

impl Block {
    fn load(
        vb: VarBuilder,
        cfg: &Config,
        (layer, reach): (usize, Reach),
        operands: Operands,
    ) -> Result<Self> {
        let (e, inner, eps) = (cfg.hidden_size, cfg.inner_dim(), cfg.layer_norm_epsilon);
        let mlp = vb.pp("mlp");
        Ok(Self {
            ln_1: LayerNorm::load(vb.pp("ln_1"), e, eps)?,
            attn: Attention::load(vb.pp("attn").pp("attention"), cfg, (layer, reach), operands)?,
            ln_2: LayerNorm::load(vb.pp("ln_2"), e, eps)?,
            mlp: Mlp {
                c_fc: Linear::load(mlp.pp("c_fc"), e, inner, true, operands)?,
                c_proj: Linear::load(mlp.pp("c_proj"), inner, e, true, operands)?,
            },
            layer,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        batch: &Batch,
        masks: &Masks,
        cache: Option<(&mut LayerCache, usize)>,
    ) -> Result<Tensor> {
        let attn = self
            .attn
            .forward(&self.ln_1.forward(xs)?, batch, masks, cache)?;
        let xs = (attn + xs)?;
        let mlp = self.mlp.forward(&self.ln_2.forward(&xs)?, batch)?;
        batch.drop(mlp, Site::MlpOutput(self.layer))? + xs
    }
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
            .map(|(i, &reach)| Block::load(t.pp("h").pp(i), config, (i, reach), operands))
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
    fn stages<'a>(&'a self, batch: &'a Batch, cached: usize) -> Result<Stages<'a>> {
        let device = self.wte.device();
        let masks = std::rc::Rc::new(Masks {
            global: batch.attention_mask(cached, None, device)?,
            local: batch.attention_mask(cached, Some(self.window_size), device)?,
        });
        let blocks = (self.blocks.iter())
            .map(|block| {
                let masks = masks.clone();
                Box::new(move |xs: &Tensor, slot: Option<(&mut LayerCache, usize)>| {
                    block.forward(xs, batch, &masks, slot)
                }) as BlockFn<'a>
            })
            .collect();
        Ok(Stages {
            embed: Box::new(move || {
                let tokens = ops::embedding(&self.wte, &batch.input_ids)?.to_dtype(self.dtype)?;
                let positions =
                    ops::embedding(&self.wpe, &batch.position_ids)?.to_dtype(self.dtype)?;
                batch.drop((tokens + positions)?, Site::Embeddings)
            }),
            blocks,
            finish: Box::new(move |xs| self.ln_f.forward(xs)),
        })
    }

    fn lm_head(&self) -> &Linear {
        &self.lm_head
    }
}
