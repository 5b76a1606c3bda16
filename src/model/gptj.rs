//! GPT-J, as Hugging Face's `GPTJForCausalLM` computes it.
//!
//! Weight names are HF's own (`transformer.h.0.attn.q_proj.weight`, ...), so loading is a plain
//! `VarBuilder` walk over a HF model directory. Every block runs attention and the MLP in parallel
//! on the output of a single LayerNorm and adds both to the residual stream.
//!
//! Precision follows HF: the matmuls run in the compute dtype, while LayerNorm statistics, the
//! rotary embedding, the attention scores and their softmax are computed in fp32 (HF upcasts query
//! and key before `q @ k^T`), and the final logits are returned in fp32.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::ops::{self, AttentionMask, KvCache, LayerCache, LayerNorm, Linear, Operands, Rotary};

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
        if self.model_type != "gptj" {
            return Err(format!(
                "model_type is {:?}, expected \"gptj\" (Kiln implements GPT-J)",
                self.model_type
            ));
        }
        if self.activation_function != "gelu_new" {
            return Err(format!(
                "activation_function is {:?}, expected \"gelu_new\"",
                self.activation_function
            ));
        }
        if self.tie_word_embeddings {
            return Err("tie_word_embeddings is true, but GPT-J has an untied lm_head".into());
        }
        for (field, value) in [
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_embd", self.n_embd),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
        ] {
            if value == 0 {
                return Err(format!("{field} must be positive"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd ({}) is not divisible by n_head ({})",
                self.n_embd, self.n_head
            ));
        }
        let rotary = self.rotary_dim();
        if rotary == 0 || !rotary.is_multiple_of(2) || rotary > self.head_dim() {
            return Err(format!(
                "rotary_dim ({rotary}) must be even, positive and at most the head dim ({})",
                self.head_dim()
            ));
        }
        Ok(())
    }

    /// The `config.json` HF writes for this model, with our fields in its vocabulary.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).expect("config serialises");
        let object = value.as_object_mut().expect("config is an object");
        object
            .entry("architectures")
            .or_insert_with(|| serde_json::json!(["GPTJForCausalLM"]));
        value
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
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Config, operands: Operands) -> Result<Self> {
        let e = cfg.n_embd;
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), e, e, false, operands)?,
            k_proj: Linear::load(vb.pp("k_proj"), e, e, false, operands)?,
            v_proj: Linear::load(vb.pp("v_proj"), e, e, false, operands)?,
            out_proj: Linear::load(vb.pp("out_proj"), e, e, false, operands)?,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        position_ids: &Tensor,
        mask: &AttentionMask,
        cache: Option<(&mut LayerCache, usize)>,
    ) -> Result<Tensor> {
        let (b, t, e) = xs.dims3()?;
        let heads = |ys: Tensor| ys.reshape((b, t, self.n_head, self.head_dim));
        let q = heads(self.q_proj.forward(xs)?)?;
        let k = heads(self.k_proj.forward(xs)?)?;
        let v = heads(self.v_proj.forward(xs)?)?;
        let out = ops::causal_attention(&q, &k, &v, rotary, position_ids, mask, cache)?;
        self.out_proj.forward(&out.reshape((b, t, e))?)
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
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc_out
            .forward(&ops::gelu_new(&self.fc_in.forward(xs)?)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    mlp: Mlp,
}

impl Block {
    fn load(vb: VarBuilder, cfg: &Config, operands: Operands) -> Result<Self> {
        Ok(Self {
            ln_1: LayerNorm::load(vb.pp("ln_1"), cfg.n_embd, cfg.layer_norm_epsilon)?,
            attn: Attention::load(vb.pp("attn"), cfg, operands)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg, operands)?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rotary: &Rotary,
        position_ids: &Tensor,
        mask: &AttentionMask,
        cache: Option<(&mut LayerCache, usize)>,
    ) -> Result<Tensor> {
        let normed = self.ln_1.forward(xs)?;
        let attn = self
            .attn
            .forward(&normed, rotary, position_ids, mask, cache)?;
        let mlp = self.mlp.forward(&normed)?;
        (attn + mlp)? + xs
    }
}

/// What one forward pass sees: token ids, where each row's real tokens are, and their positions.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, seq]`, u32.
    pub input_ids: Tensor,
    /// `[batch, seq]` positions of these tokens (per row, so padded rows keep their own).
    pub position_ids: Tensor,
    /// 1 for real tokens, 0 for padding, over the cached positions plus this step's
    /// (`[batch, cached + seq]`); `None` when no row is padded.
    pub key_mask: Option<Vec<Vec<u8>>>,
}

impl Batch {
    /// Right-padded rows of token ids; positions count from 0 in every row.
    pub fn right_padded(rows: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        let seq = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut key_mask = Vec::with_capacity(rows.len());
        for row in rows {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(pad_id, seq - row.len()));
            let mut mask = vec![1u8; row.len()];
            mask.resize(seq, 0);
            key_mask.push(mask);
        }
        let padded = rows.iter().any(|r| r.len() != seq);
        let positions: Vec<u32> = (0..rows.len()).flat_map(|_| 0..seq as u32).collect();
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (rows.len(), seq), device)?,
            position_ids: Tensor::from_vec(positions, (rows.len(), seq), device)?,
            key_mask: padded.then_some(key_mask),
        })
    }
}

#[derive(Debug, Clone)]
pub struct GptJ {
    wte: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    rotary: Rotary,
    config: Config,
    dtype: DType,
    operands: Operands,
}

impl GptJ {
    /// Builds the model from HF-named weights. The `VarBuilder`'s dtype is the compute dtype
    /// (see [`ops::weight_dtype_and_operands`] for what bf16 means on the CPU).
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let (weight_dtype, operands) = ops::weight_dtype_and_operands(vb.device(), vb.dtype());
        let vb = vb.set_dtype(weight_dtype);
        let t = vb.pp("transformer");
        let blocks = (0..config.n_layer)
            .map(|i| Block::load(t.pp("h").pp(i), config, operands))
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
                vb.device(),
            )?,
            config: config.clone(),
            dtype: vb.dtype(),
            operands,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.wte.device()
    }

    /// Final hidden states `[batch, seq, n_embd]` in the compute dtype.
    pub fn hidden_states(&self, batch: &Batch, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let cached = cache.as_ref().map_or(0, |c| c.len());
        let (b, t) = batch.input_ids.dims2()?;
        let mask = AttentionMask::causal(b, t, cached, batch.key_mask.as_deref(), self.device())?;
        let mut xs = self
            .wte
            .index_select(&batch.input_ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.n_embd))?
            .to_dtype(self.dtype)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| c.layer(i));
            xs = block.forward(&xs, &self.rotary, &batch.position_ids, &mask, slot)?;
        }
        self.ln_f.forward(&xs)
    }

    /// Logits `[batch, seq, vocab]` in fp32.
    pub fn forward(&self, batch: &Batch, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let hidden = self.hidden_states(batch, cache)?;
        self.lm_head.forward(&hidden)?.to_dtype(DType::F32)
    }

    /// Logits for the last position of each row only, `[batch, vocab]` in fp32: generation needs
    /// nothing else, and the lm_head over the whole prompt is the largest matmul of a prefill.
    pub fn forward_last(
        &self,
        batch: &Batch,
        last_index: &[usize],
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let hidden = self.hidden_states(batch, cache)?;
        let rows = last_index
            .iter()
            .enumerate()
            .map(|(row, &i)| hidden.get(row)?.get(i))
            .collect::<Result<Vec<_>>>()?;
        let last = Tensor::stack(&rows, 0)?;
        self.lm_head.forward(&last)?.to_dtype(DType::F32)
    }
}

/// The gradients of one backward of the training loss, by parameter: the head's come from the
/// fused loss head, the rest from autograd through the hidden states.
pub struct LossGrads {
    /// Cross-entropy summed over the labelled positions.
    pub nll_sum: f64,
    store: GradStore,
    head_weight: Tensor,
    head_bias: Option<Tensor>,
}

impl LossGrads {
    /// The gradient of parameter `name` (HF's name) whose tensor is `param`; `None` where no
    /// gradient reached it.
    pub fn get(&self, name: &str, param: &Tensor) -> Option<&Tensor> {
        match name {
            "lm_head.weight" => Some(&self.head_weight),
            "lm_head.bias" => self.head_bias.as_ref(),
            _ => self.store.get(param),
        }
    }
}

impl GptJ {
    /// The summed next-token cross-entropy over the positions whose label is not negative (HF's
    /// -100), through the fused loss head (the logits never exist whole).
    pub fn loss_sum(&self, batch: &Batch, labels: &[i64]) -> Result<f64> {
        let hidden = self.hidden_states(batch, None)?;
        let head = (&self.lm_head.weight, self.lm_head.bias.as_ref());
        Ok(ops::lm_head_loss(&hidden, head.0, head.1, labels, None, self.operands)?.nll_sum)
    }

    /// [`Self::loss_sum`] and the gradients of `grad_scale ×` it for every parameter; `None`
    /// when no position has a label.
    pub fn loss_and_grads(
        &self,
        batch: &Batch,
        labels: &[i64],
        grad_scale: f64,
    ) -> Result<Option<LossGrads>> {
        if labels.iter().all(|&l| l < 0) {
            return Ok(None);
        }
        let hidden = self.hidden_states(batch, None)?;
        let head = (&self.lm_head.weight, self.lm_head.bias.as_ref());
        let loss = ops::lm_head_loss(
            &hidden,
            head.0,
            head.1,
            labels,
            Some(grad_scale),
            self.operands,
        )?;
        let (Some(surrogate), Some((head_weight, head_bias))) = (loss.surrogate, loss.head_grads)
        else {
            return Ok(None);
        };
        Ok(Some(LossGrads {
            nll_sum: loss.nll_sum,
            store: surrogate.backward()?,
            head_weight,
            head_bias,
        }))
    }
}

/// Mean next-token cross-entropy over the positions whose label is not `ignore` (HF's -100),
/// with labels already aligned to the logits (shifted by the caller). Computed in fp32.
pub fn causal_lm_loss(logits: &Tensor, labels: &[i64]) -> Result<Tensor> {
    let vocab = logits.dim(D::Minus1)?;
    let flat = logits.reshape(((), vocab))?;
    let (rows, targets): (Vec<u32>, Vec<u32>) = labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l >= 0)
        .map(|(i, &l)| (i as u32, l as u32))
        .unzip();
    if rows.is_empty() {
        candle_core::bail!("no position has a label: the loss is undefined");
    }
    let device = logits.device();
    let n = rows.len();
    let picked = flat.index_select(&Tensor::from_vec(rows, n, device)?, 0)?;
    let log_probs = candle_nn::ops::log_softmax(&picked.to_dtype(DType::F32)?, D::Minus1)?;
    let targets = Tensor::from_vec(targets, (n, 1), device)?;
    let nll = log_probs.gather(&targets, 1)?.neg()?;
    nll.mean_all()
}

/// Labels for next-token prediction: position i is trained to predict token i+1 of the same row;
/// positions whose next token is padding (or that end a row) get -100.
pub fn shifted_labels(rows: &[Vec<u32>], seq: usize) -> Vec<i64> {
    let mut labels = Vec::with_capacity(rows.len() * seq);
    for row in rows {
        for i in 0..seq {
            labels.push(if i + 1 < row.len() {
                row[i + 1] as i64
            } else {
                -100
            });
        }
    }
    labels
}
