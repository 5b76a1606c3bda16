//! The model families Kiln trains (GPT-J, GPT-2, GPT-Neo, GPT-NeoX/Pythia), one file each, and the
//! Hugging Face model directory they live in.
//!
//! A family's file holds its `config.json`, its weight names and its forward pass down to the
//! final hidden states ([`CausalLm`]); the loss head, generation and the rest are shared here.

pub mod gpt2;
pub mod gpt_neo;
pub mod gpt_neox;
pub mod gptj;
pub mod init;
pub mod lora;
pub mod sizes;
pub mod weights;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, TensorId, Var, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

pub use crate::ops::KvCache;
use crate::ops::{
    self, AttentionMask, Dropout, DropoutRates, Linear, Operands, PrefixLayout, Site,
};
pub use gpt2::Gpt2;
pub use gpt_neo::GptNeo;
pub use gpt_neox::GptNeoX;
pub use gptj::GptJ;
pub use weights::{TensorSpec, WeightStore};

/// HF's default `max_shard_size` for `save_pretrained`.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// The `model_type`s Kiln implements.
pub const MODEL_TYPES: &[&str] = &["gptj", "gpt2", "gpt_neo", "gpt_neox"];

const PREFIX_LM_KEY: &str = "prefix_lm";

/// A model's `config.json`, read as is, by its `model_type`.
#[derive(Debug, Clone, PartialEq)]
pub enum Config {
    GptJ(gptj::Config),
    Gpt2(gpt2::Config),
    GptNeo(gpt_neo::Config),
    GptNeoX(gpt_neox::Config),
}

impl Config {
    /// Reads a `config.json` value; an unknown `model_type` names the ones Kiln implements.
    pub fn from_json(value: serde_json::Value) -> std::result::Result<Self, String> {
        let model_type = value
            .get("model_type")
            .and_then(|t| t.as_str())
            .ok_or("model_type is missing")?
            .to_string();
        // serde_path_to_error names the field a bad value is in (`n_head: invalid type`).
        let parsed = match model_type.as_str() {
            "gptj" => serde_path_to_error::deserialize(value).map(Config::GptJ),
            "gpt2" => serde_path_to_error::deserialize(value).map(Config::Gpt2),
            "gpt_neo" => serde_path_to_error::deserialize(value).map(Config::GptNeo),
            "gpt_neox" => serde_path_to_error::deserialize(value).map(Config::GptNeoX),
            other => {
                return Err(format!(
                    "model_type {other:?} is not implemented: Kiln implements {}",
                    MODEL_TYPES.join(", ")
                ))
            }
        };
        parsed.map_err(|e| format!("not a valid {model_type} config: {e}"))
    }

    /// The `config.json` HF writes for this model.
    pub fn to_hf_json(&self) -> serde_json::Value {
        match self {
            Config::GptJ(c) => c.to_hf_json(),
            Config::Gpt2(c) => c.to_hf_json(),
            Config::GptNeo(c) => c.to_hf_json(),
            Config::GptNeoX(c) => c.to_hf_json(),
        }
    }

    /// Checks what the HF implementation silently assumes, that the special tokens are rows of
    /// the vocabulary, and that this machine can hold a model of these sizes, naming the field
    /// at fault; nothing is allocated from the sizes before this passes.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self {
            Config::GptJ(c) => c.validate(),
            Config::Gpt2(c) => c.validate(),
            Config::GptNeo(c) => c.validate(),
            Config::GptNeoX(c) => c.validate(),
        }?;
        let vocab_size = self.vocab_size();
        if let Some((field, id)) = self
            .special_token_ids()
            .into_iter()
            .find(|&(_, id)| id >= vocab_size as u64)
        {
            return Err(format!(
                "{field} {id} is outside the vocabulary (vocab_size {vocab_size})"
            ));
        }
        sizes::check_fits(self, sizes::physical_memory())
    }

    /// The special-token ids the config sets, by field: `pad_token_id` is a field of GPT-J's
    /// config and an extra key of the others'.
    fn special_token_ids(&self) -> Vec<(&'static str, u64)> {
        let (bos, eos, pad) = match self {
            Config::GptJ(c) => (c.bos_token_id, c.eos_token_id, c.pad_token_id),
            Config::Gpt2(c) => (c.bos_token_id, c.eos_token_id, None),
            Config::GptNeo(c) => (c.bos_token_id, c.eos_token_id, None),
            Config::GptNeoX(c) => (c.bos_token_id, c.eos_token_id, None),
        };
        let pad = pad
            .map(u64::from)
            .or_else(|| self.extra().get("pad_token_id")?.as_u64());
        [
            ("bos_token_id", bos.map(u64::from)),
            ("eos_token_id", eos.map(u64::from)),
            ("pad_token_id", pad),
        ]
        .into_iter()
        .filter_map(|(field, id)| Some((field, id?)))
        .collect()
    }

    pub fn model_type(&self) -> &'static str {
        match self {
            Config::GptJ(_) => "gptj",
            Config::Gpt2(_) => "gpt2",
            Config::GptNeo(_) => "gpt_neo",
            Config::GptNeoX(_) => "gpt_neox",
        }
    }

    /// The model's width (`n_embd`, `hidden_size`).
    pub fn hidden_size(&self) -> usize {
        match self {
            Config::GptJ(c) => c.n_embd,
            Config::Gpt2(c) => c.n_embd,
            Config::GptNeo(c) => c.hidden_size,
            Config::GptNeoX(c) => c.hidden_size,
        }
    }

    pub fn n_layer(&self) -> usize {
        match self {
            Config::GptJ(c) => c.n_layer,
            Config::Gpt2(c) => c.n_layer,
            Config::GptNeo(c) => c.num_layers,
            Config::GptNeoX(c) => c.num_hidden_layers,
        }
    }

    pub fn n_head(&self) -> usize {
        match self {
            Config::GptJ(c) => c.n_head,
            Config::Gpt2(c) => c.n_head,
            Config::GptNeo(c) => c.num_heads,
            Config::GptNeoX(c) => c.num_attention_heads,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Config::GptJ(c) => c.vocab_size,
            Config::Gpt2(c) => c.vocab_size,
            Config::GptNeo(c) => c.vocab_size,
            Config::GptNeoX(c) => c.vocab_size,
        }
    }

    /// The longest sequence the model's positions cover.
    pub fn max_positions(&self) -> usize {
        match self {
            Config::GptJ(c) => c.n_positions,
            Config::Gpt2(c) => c.n_positions,
            Config::GptNeo(c) => c.max_position_embeddings,
            Config::GptNeoX(c) => c.max_position_embeddings,
        }
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        match self {
            Config::GptJ(c) => c.eos_token_id,
            Config::Gpt2(c) => c.eos_token_id,
            Config::GptNeo(c) => c.eos_token_id,
            Config::GptNeoX(c) => c.eos_token_id,
        }
    }

    pub fn initializer_range(&self) -> f64 {
        match self {
            Config::GptJ(c) => c.initializer_range,
            Config::Gpt2(c) => c.initializer_range,
            Config::GptNeo(c) => c.initializer_range,
            Config::GptNeoX(c) => c.initializer_range,
        }
    }

    /// Resizes the vocabulary (embedding and head rows) to `vocab_size`; a special token the
    /// smaller vocabulary no longer has is unset (a preset's 50256 in a 1000-row model), since
    /// an id outside the vocabulary is an invalid config.
    pub fn set_vocab_size(&mut self, vocab_size: usize) {
        let (size, ids) = match self {
            Config::GptJ(c) => (
                &mut c.vocab_size,
                vec![
                    &mut c.bos_token_id,
                    &mut c.eos_token_id,
                    &mut c.pad_token_id,
                ],
            ),
            Config::Gpt2(c) => (
                &mut c.vocab_size,
                vec![&mut c.bos_token_id, &mut c.eos_token_id],
            ),
            Config::GptNeo(c) => (
                &mut c.vocab_size,
                vec![&mut c.bos_token_id, &mut c.eos_token_id],
            ),
            Config::GptNeoX(c) => (
                &mut c.vocab_size,
                vec![&mut c.bos_token_id, &mut c.eos_token_id],
            ),
        };
        *size = vocab_size;
        for id in ids {
            if id.is_some_and(|id| id as usize >= vocab_size) {
                *id = None;
            }
        }
        let pad_outside = self
            .extra()
            .get("pad_token_id")
            .and_then(|v| v.as_u64())
            .is_some_and(|id| id >= vocab_size as u64);
        if pad_outside {
            self.extra_mut().remove("pad_token_id");
        }
    }

    /// Makes `eos` the begin- and end-of-text token, as GPT-2's tokenizer has it.
    pub fn set_eos_and_bos(&mut self, eos: u32) {
        let (bos_slot, eos_slot) = match self {
            Config::GptJ(c) => (&mut c.bos_token_id, &mut c.eos_token_id),
            Config::Gpt2(c) => (&mut c.bos_token_id, &mut c.eos_token_id),
            Config::GptNeo(c) => (&mut c.bos_token_id, &mut c.eos_token_id),
            Config::GptNeoX(c) => (&mut c.bos_token_id, &mut c.eos_token_id),
        };
        *bos_slot = Some(eos);
        *eos_slot = Some(eos);
    }

    fn extra(&self) -> &serde_json::Map<String, serde_json::Value> {
        match self {
            Config::GptJ(c) => &c.extra,
            Config::Gpt2(c) => &c.extra,
            Config::GptNeo(c) => &c.extra,
            Config::GptNeoX(c) => &c.extra,
        }
    }

    fn extra_mut(&mut self) -> &mut serde_json::Map<String, serde_json::Value> {
        match self {
            Config::GptJ(c) => &mut c.extra,
            Config::Gpt2(c) => &mut c.extra,
            Config::GptNeo(c) => &mut c.extra,
            Config::GptNeoX(c) => &mut c.extra,
        }
    }

    /// The dropout HF applies in training, from the config's own keys (`resid_pdrop`,
    /// `embd_pdrop`, `attn_pdrop`; GPT-Neo's `*_dropout`; GPT-NeoX's `hidden_dropout` and
    /// `attention_dropout`), with HF's defaults where a key is missing (0.1 for GPT-2, else 0).
    pub fn dropout_rates(&self) -> DropoutRates {
        let extra = self.extra();
        let rate =
            |key: &str, default: f64| extra.get(key).and_then(|v| v.as_f64()).unwrap_or(default);
        match self {
            Config::GptJ(_) => DropoutRates {
                resid: rate("resid_pdrop", 0.0),
                embd: rate("embd_pdrop", 0.0),
                attn: rate("attn_pdrop", 0.0),
                ..DropoutRates::default()
            },
            Config::Gpt2(_) => DropoutRates {
                resid: rate("resid_pdrop", 0.1),
                embd: rate("embd_pdrop", 0.1),
                attn: rate("attn_pdrop", 0.1),
                ..DropoutRates::default()
            },
            Config::GptNeo(_) => DropoutRates {
                resid: rate("resid_dropout", 0.0),
                embd: rate("embed_dropout", 0.0),
                attn: rate("attention_dropout", 0.0),
                ..DropoutRates::default()
            },
            Config::GptNeoX(_) => {
                let hidden = rate("hidden_dropout", 0.0);
                DropoutRates {
                    resid: hidden,
                    embd: hidden,
                    attn: rate("attention_dropout", 0.0),
                    ..DropoutRates::default()
                }
            }
        }
    }

    /// Whether the model was trained as a prefix LM (`data.attention: prefix`), so that its
    /// prompts are read both ways at inference too. Kiln records it in `config.json` as
    /// `"prefix_lm": true`; transformers keeps the key as an attribute and ignores it.
    pub fn prefix_lm(&self) -> bool {
        self.extra()
            .get(PREFIX_LM_KEY)
            .and_then(|v| v.as_bool())
            .unwrap_or(false)
    }

    pub fn set_prefix_lm(&mut self, prefix_lm: bool) {
        if prefix_lm {
            self.extra_mut()
                .insert(PREFIX_LM_KEY.into(), serde_json::Value::Bool(true));
        } else {
            self.extra_mut().remove(PREFIX_LM_KEY);
        }
    }

    /// The HF names of the output head's weight and bias (a tied head's weight is the token
    /// embedding).
    pub fn head_parameter_names(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Config::GptJ(_) => ("lm_head.weight", Some("lm_head.bias")),
            Config::Gpt2(_) | Config::GptNeo(_) => ("transformer.wte.weight", None),
            Config::GptNeoX(_) => ("embed_out.weight", None),
        }
    }

    /// Every parameter, in the order of HF's `state_dict()`, with its shape (a tied head is the
    /// embedding and is listed once, as `save_pretrained` writes it).
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Config::GptJ(c) => c.parameter_shapes(),
            Config::Gpt2(c) => c.parameter_shapes(),
            Config::GptNeo(c) => c.parameter_shapes(),
            Config::GptNeoX(c) => c.parameter_shapes(),
        }
    }
}

/// A family config as `config.json`: its fields, plus HF's class under `architectures` when the
/// file did not name one.
fn hf_json(config: &impl Serialize, architecture: &str) -> serde_json::Value {
    let mut value = serde_json::to_value(config).expect("config serialises");
    let object = value.as_object_mut().expect("config is an object");
    object
        .entry("architectures")
        .or_insert_with(|| serde_json::json!([architecture]));
    value
}

/// Checks the sizes every family has, under the family's own field names: all positive, and
/// the `width` a multiple of the `heads`.
fn check_sizes(
    sizes: &[(&str, usize)],
    (width_name, width): (&str, usize),
    (heads_name, heads): (&str, usize),
) -> std::result::Result<(), String> {
    let mut all = sizes
        .iter()
        .copied()
        .chain([(width_name, width), (heads_name, heads)]);
    if let Some((field, _)) = all.find(|(_, value)| *value == 0) {
        return Err(format!("{field} must be positive"));
    }
    if !width.is_multiple_of(heads) {
        return Err(format!(
            "{width_name} ({width}) is not divisible by {heads_name} ({heads})"
        ));
    }
    Ok(())
}

impl Serialize for Config {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        self.to_hf_json().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Config {
    fn deserialize<D2: serde::Deserializer<'de>>(
        deserializer: D2,
    ) -> std::result::Result<Self, D2::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        Config::from_json(value).map_err(serde::de::Error::custom)
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
    /// Packed examples and bidirectional prompts (prefix LM), per row over the cached positions
    /// plus this step's; `None` for plain causal attention.
    pub layout: Option<Vec<PrefixLayout>>,
    /// Training-time dropout; `None` (evaluation, generation) runs without.
    pub dropout: Option<Dropout>,
}

impl Batch {
    /// Right-padded rows of token ids; positions count from 0 in every row.
    pub fn right_padded(
        rows: &[Vec<u32>],
        pad_id: u32,
        device: &Device,
    ) -> candle_core::Result<Self> {
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
            layout: None,
            dropout: None,
        })
    }

    /// Left-padded prompts for a prefill that later steps continue from a KV cache: every row's
    /// last token sits in the last column, so the tokens that follow line up across rows, and
    /// positions count from 0 at each row's first real token. The key mask is always present
    /// (later steps extend it). A model trained as a prefix LM reads each prompt both ways.
    pub fn left_padded(
        rows: &[Vec<u32>],
        pad_id: u32,
        prefix_lm: bool,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let longest = rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * longest);
        let mut positions = Vec::with_capacity(rows.len() * longest);
        let mut key_mask = Vec::with_capacity(rows.len());
        for row in rows {
            let pad = longest - row.len();
            ids.extend(std::iter::repeat_n(pad_id, pad));
            ids.extend_from_slice(row);
            positions.extend(std::iter::repeat_n(0u32, pad));
            positions.extend(0..row.len() as u32);
            let mut mask = vec![0u8; pad];
            mask.resize(longest, 1);
            key_mask.push(mask);
        }
        let layout = prefix_lm.then(|| {
            key_mask
                .iter()
                .map(|mask| PrefixLayout {
                    segment: vec![0; mask.len()],
                    prefix: mask.iter().map(|&m| m == 1).collect(),
                })
                .collect()
        });
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (rows.len(), longest), device)?,
            position_ids: Tensor::from_vec(positions, (rows.len(), longest), device)?,
            key_mask: Some(key_mask),
            layout,
            dropout: None,
        })
    }

    /// Right-padded rows laid out as prefix-LM examples (`layouts[r]` covers row `r`'s tokens):
    /// positions restart at 0 with each example of a packed row, as each was its own sequence.
    pub fn prefix_lm(
        rows: &[Vec<u32>],
        layouts: &[PrefixLayout],
        pad_id: u32,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let mut batch = Self::right_padded(rows, pad_id, device)?;
        let (b, seq) = batch.dims()?;
        let mut positions = Vec::with_capacity(b * seq);
        let mut padded_layouts = Vec::with_capacity(b);
        for layout in layouts {
            let mut layout = layout.clone();
            let last = layout.segment.last().copied().unwrap_or(0);
            layout.segment.resize(seq, last);
            layout.prefix.resize(seq, false);
            let mut position = 0u32;
            for i in 0..seq {
                if i > 0 && layout.segment[i] != layout.segment[i - 1] {
                    position = 0;
                }
                positions.push(position);
                position += 1;
            }
            padded_layouts.push(layout);
        }
        batch.position_ids = Tensor::from_vec(positions, (b, seq), device)?;
        batch.layout = Some(padded_layouts);
        Ok(batch)
    }

    /// `[batch, seq]`.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        self.input_ids.dims2()
    }

    /// `xs` after this batch's dropout at `site` (unchanged without dropout).
    pub fn drop(&self, xs: Tensor, site: Site) -> candle_core::Result<Tensor> {
        match &self.dropout {
            Some(dropout) => dropout.apply(&xs, site),
            None => Ok(xs),
        }
    }

    /// `layer` applied to `xs`, its LoRA adapter's input under this batch's dropout.
    pub fn linear(&self, layer: &Linear, xs: &Tensor) -> candle_core::Result<Tensor> {
        layer.forward_dropped(xs, self.dropout.as_ref())
    }

    /// The dropout of the attention probabilities of `layer`, for [`AttentionKind`].
    pub fn attention_dropout(&self, layer: usize) -> Option<(&Dropout, usize)> {
        self.dropout.as_ref().map(|d| (d, layer))
    }

    /// The mask of this batch's `seq` positions after `cached` ones (see
    /// [`AttentionMask::causal`]); `window` limits how far back a position sees.
    pub fn attention_mask(
        &self,
        cached: usize,
        window: Option<usize>,
        device: &Device,
    ) -> candle_core::Result<AttentionMask> {
        let (b, t) = self.dims()?;
        let key_mask = self.key_mask.as_deref();
        AttentionMask::causal(
            b,
            t,
            cached,
            key_mask,
            self.layout.as_deref(),
            window,
            device,
        )
    }
}

/// What a family's model file provides: its forward pass up to the final hidden states, as
/// [`Stages`], and the head that maps them to the vocabulary. Everything downstream (logits, the
/// fused loss head, generation, activation checkpointing) is shared by [`Model`].
pub trait CausalLm {
    /// The forward pass over `batch` (after `cached` positions already in a KV cache).
    fn stages<'a>(&'a self, batch: &'a Batch, cached: usize) -> candle_core::Result<Stages<'a>>;
    /// The output projection (for a tied model, the token embedding).
    fn lm_head(&self) -> &Linear;
}

/// One block of a forward pass: hidden states in, hidden states out, appending this step's keys
/// and values to its KV-cache slot when decoding.
pub type BlockFn<'a> =
    Box<dyn Fn(&Tensor, Option<(&mut ops::LayerCache, usize)>) -> candle_core::Result<Tensor> + 'a>;

/// The final norm of a forward pass: the last block's output to the final hidden states.
pub type FinishFn<'a> = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + 'a>;

/// A forward pass cut where activation checkpointing cuts it: the embeddings, each block, and
/// the final norm, in the compute dtype.
pub struct Stages<'a> {
    pub embed: Box<dyn Fn() -> candle_core::Result<Tensor> + 'a>,
    pub blocks: Vec<BlockFn<'a>>,
    pub finish: FinishFn<'a>,
}

#[derive(Debug, Clone)]
enum Family {
    GptJ(GptJ),
    Gpt2(Gpt2),
    GptNeo(GptNeo),
    GptNeoX(GptNeoX),
}

/// A loaded model of any family, with the operations every verb needs.
#[derive(Debug, Clone)]
pub struct Model {
    family: Family,
    config: Config,
    dtype: DType,
    device: Device,
    operands: Operands,
    /// Activation checkpointing, and the tensors whose gradients it keeps.
    checkpointing: Option<Arc<HashSet<TensorId>>>,
}

impl Model {
    /// Builds the model from HF-named weights. The `VarBuilder`'s dtype is the compute dtype
    /// (see [`ops::weight_dtype_and_operands`] for what bf16 means on the CPU).
    pub fn load(vb: VarBuilder, config: &Config) -> candle_core::Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let device = vb.device().clone();
        // Activations are in the weights' dtype: fp32 for bf16 on the CPU, where only the
        // matmul operands are rounded.
        let (dtype, operands) = ops::weight_dtype_and_operands(&device, vb.dtype());
        let vb = vb.set_dtype(dtype);
        let family = match config {
            Config::GptJ(c) => Family::GptJ(GptJ::load(vb, c, dtype, operands)?),
            Config::Gpt2(c) => Family::Gpt2(Gpt2::load(vb, c, dtype, operands)?),
            Config::GptNeo(c) => Family::GptNeo(GptNeo::load(vb, c, dtype, operands)?),
            Config::GptNeoX(c) => Family::GptNeoX(GptNeoX::load(vb, c, dtype, operands)?),
        };
        Ok(Self {
            family,
            config: config.clone(),
            dtype,
            device,
            operands,
            checkpointing: None,
        })
    }

    fn body(&self) -> &dyn CausalLm {
        match &self.family {
            Family::GptJ(m) => m,
            Family::Gpt2(m) => m,
            Family::GptNeo(m) => m,
            Family::GptNeoX(m) => m,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Final hidden states `[batch, seq, hidden]` in the compute dtype; with a `cache`, this
    /// step's keys and values are appended to it.
    pub fn hidden_states(
        &self,
        batch: &Batch,
        mut cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let cached = cache.as_ref().map_or(0, |c| c.len());
        let stages = self.body().stages(batch, cached)?;
        let mut xs = (stages.embed)()?;
        for (i, block) in stages.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| c.layer(i));
            xs = block(&xs, slot)?;
        }
        (stages.finish)(&xs)
    }

    /// Recompute each block in the backward instead of keeping its activations (activation
    /// checkpointing), for training `trained`: the gradients [`Self::loss_and_grads`] then holds
    /// are those of these tensors only.
    pub fn checkpoint_activations(&mut self, trained: HashSet<TensorId>) {
        self.checkpointing = Some(Arc::new(trained));
    }

    /// Logits `[batch, seq, vocab]` in fp32.
    pub fn forward(
        &self,
        batch: &Batch,
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let hidden = self.hidden_states(batch, cache)?;
        self.body().lm_head().forward(&hidden)?.to_dtype(DType::F32)
    }

    /// Logits for the last position of each row only, `[batch, vocab]` in fp32: generation needs
    /// nothing else, and the lm_head over the whole prompt is the largest matmul of a prefill.
    pub fn forward_last(
        &self,
        batch: &Batch,
        last_index: &[usize],
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let hidden = self.hidden_states(batch, cache)?;
        let rows = last_index
            .iter()
            .enumerate()
            .map(|(row, &i)| hidden.get(row)?.get(i))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.head(&Tensor::stack(&rows, 0)?)
    }

    /// Logits in fp32 for hidden states of any shape `[..., hidden]`: the head applied only
    /// where a caller needs it (scoring reads a few positions of each row).
    pub fn head(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        self.body().lm_head().forward(hidden)?.to_dtype(DType::F32)
    }

    /// The summed next-token cross-entropy over the positions whose label is not negative (HF's
    /// -100), through the fused loss head (the logits never exist whole).
    pub fn loss_sum(&self, batch: &Batch, labels: &[i64]) -> candle_core::Result<f64> {
        let hidden = self.hidden_states(batch, None)?;
        Ok(self.head_loss(&hidden, labels, None)?.nll_sum)
    }

    /// [`Self::loss_sum`] and the gradients of `grad_scale ×` it for every parameter; `None`
    /// when no position has a label.
    pub fn loss_and_grads(
        &self,
        batch: &Batch,
        labels: &[i64],
        grad_scale: f64,
    ) -> candle_core::Result<Option<LossGrads>> {
        if labels.iter().all(|&l| l < 0) {
            return Ok(None);
        }
        if let Some(trained) = &self.checkpointing {
            return self.checkpointed_loss_and_grads(batch, labels, grad_scale, trained);
        }
        let hidden = self.hidden_states(batch, None)?;
        let loss = self.head_loss(&hidden, labels, Some(grad_scale))?;
        let Some(surrogate) = loss.surrogate else {
            return Ok(None);
        };
        let head_grads = self.head_grads(loss.head_grads);
        let store = surrogate.backward()?;
        let store = store
            .get_ids()
            .map(|id| (*id, store.get_id(*id).expect("listed").clone()))
            .collect();
        Ok(Some(LossGrads {
            nll_sum: loss.nll_sum,
            store,
            head_grads,
        }))
    }
}

impl Model {
    /// [`Self::loss_and_grads`] keeping only each block's input through the forward: the backward
    /// runs block by block from the last, recomputing the block's graph from its input and
    /// backpropagating the gradient that reached its output. Every op and dropout mask is the
    /// same as without checkpointing; only the order some gradient sums are added in differs.
    fn checkpointed_loss_and_grads(
        &self,
        batch: &Batch,
        labels: &[i64],
        grad_scale: f64,
        trained: &HashSet<TensorId>,
    ) -> candle_core::Result<Option<LossGrads>> {
        let stages = self.body().stages(batch, 0)?;
        let embedded = (stages.embed)()?;
        let mut inputs = Vec::with_capacity(stages.blocks.len());
        let mut xs = embedded.detach();
        for block in &stages.blocks {
            inputs.push(xs.clone());
            xs = block(&xs, None)?.detach();
        }
        // Only the trained tensors' gradients are kept from each block's backward: the rest of
        // its store is the block's activation gradients, freed with it.
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        let keep = |grads: &mut HashMap<TensorId, Tensor>, store: GradStore| {
            for id in store.get_ids() {
                if trained.contains(id) {
                    let grad = store.get_id(*id).expect("listed").clone();
                    let sum = match grads.remove(id) {
                        Some(before) => (before + grad)?,
                        None => grad,
                    };
                    grads.insert(*id, sum);
                }
            }
            candle_core::Result::Ok(())
        };

        // The head and the final norm, from the last block's output.
        let last = Var::from_tensor(&xs)?;
        let hidden = (stages.finish)(last.as_tensor())?;
        let loss = self.head_loss(&hidden, labels, Some(grad_scale))?;
        let Some(surrogate) = loss.surrogate else {
            return Ok(None);
        };
        let store = surrogate.backward()?;
        let mut upstream = store.get(last.as_tensor()).cloned();
        keep(&mut grads, store)?;

        for (block, input) in stages.blocks.iter().zip(&inputs).rev() {
            let Some(grad_out) = upstream.take() else {
                break;
            };
            let input = Var::from_tensor(input)?;
            let output = block(input.as_tensor(), None)?;
            let store = (output * grad_out.detach())?.sum_all()?.backward()?;
            upstream = store.get(input.as_tensor()).cloned();
            keep(&mut grads, store)?;
        }
        if let Some(grad_embedded) = upstream {
            if embedded.track_op() {
                let store = (embedded * grad_embedded.detach())?.sum_all()?.backward()?;
                keep(&mut grads, store)?;
            }
        }
        Ok(Some(LossGrads {
            nll_sum: loss.nll_sum,
            store: grads,
            head_grads: self.head_grads(loss.head_grads),
        }))
    }

    /// The fused loss head over `hidden` (see [`ops::lm_head_loss`]).
    fn head_loss(
        &self,
        hidden: &Tensor,
        labels: &[i64],
        grad_scale: Option<f64>,
    ) -> candle_core::Result<ops::LmLoss> {
        let head = self.body().lm_head();
        ops::lm_head_loss(
            hidden,
            &head.weight,
            head.bias.as_ref(),
            labels,
            grad_scale,
            self.operands,
        )
    }

    /// The fused loss head's gradients, by the head's HF parameter names.
    fn head_grads(&self, grads: Option<(Tensor, Option<Tensor>)>) -> Vec<(&'static str, Tensor)> {
        let mut head_grads = Vec::new();
        if let Some((weight_grad, bias_grad)) = grads {
            let (weight_name, bias_name) = self.config.head_parameter_names();
            head_grads.push((weight_name, weight_grad));
            if let (Some(name), Some(grad)) = (bias_name, bias_grad) {
                head_grads.push((name, grad));
            }
        }
        head_grads
    }
}

/// The gradients of one backward of the training loss, by parameter: the head's come from the
/// fused loss head, the rest from autograd through the hidden states.
pub struct LossGrads {
    /// Cross-entropy summed over the labelled positions.
    pub nll_sum: f64,
    /// By tensor.
    store: HashMap<TensorId, Tensor>,
    /// By HF name: the head is found by name because the model may compute with a converted
    /// copy (fp16/bf16) of the parameter the caller holds.
    head_grads: Vec<(&'static str, Tensor)>,
}

impl LossGrads {
    /// The gradient of parameter `name` (HF's name) whose tensor is `param`, in `param`'s dtype;
    /// `None` where no gradient reached it. A head tied to the embedding gets both: what the
    /// embedding lookup passed back and what the head's products did.
    pub fn get(&self, name: &str, param: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let head = self.head_grads.iter().find(|(n, _)| *n == name);
        let graph = self.store.get(&param.id());
        Ok(match (head, graph) {
            (Some((_, head)), Some(graph)) => Some((graph + head.to_dtype(graph.dtype())?)?),
            (Some((_, head)), None) => Some(head.to_dtype(param.dtype())?),
            (None, graph) => graph.cloned(),
        })
    }
}

/// Mean next-token cross-entropy over the positions whose label is not `ignore` (HF's -100),
/// with labels already aligned to the logits (shifted by the caller). Computed in fp32.
pub fn causal_lm_loss(logits: &Tensor, labels: &[i64]) -> candle_core::Result<Tensor> {
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

/// Every parameter of `cfg`'s model, in the order of HF's `state_dict()`, with its shape.
pub fn parameter_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    cfg.parameter_shapes()
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
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let config =
        Config::from_json(value).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(config)
}

/// Loads a HF model directory for inference in `dtype`.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<Model> {
    load_model_with_adapter(dir, None, dtype, device)
}

/// Loads a HF model directory for inference in `dtype`, with a PEFT LoRA `adapter` merged into
/// its weights as they load (nothing is written).
pub fn load_model_with_adapter(
    dir: &Path,
    adapter: Option<&Path>,
    dtype: DType,
    device: &Device,
) -> Result<Model> {
    let config = load_config(dir)?;
    let store = Arc::new(WeightStore::open(dir)?);
    let mut backend: Box<dyn candle_nn::var_builder::SimpleBackend> =
        Box::new(weights::StoreBackend(store));
    if let Some(adapter_dir) = adapter {
        let deltas = lora::Adapter::load(adapter_dir, device)
            .and_then(|a| a.deltas(&config))
            .with_context(|| {
                format!(
                    "applying adapter {} to {}",
                    adapter_dir.display(),
                    dir.display()
                )
            })?;
        backend = Box::new(lora::MergedBackend {
            base: backend,
            deltas,
        });
    }
    let vb = VarBuilder::from_backend(backend, dtype, device.clone());
    Model::load(vb, &config).map_err(|e| anyhow::anyhow!("loading {}: {e}", dir.display()))
}

/// Files of a model directory besides its config and weights that a merged copy keeps.
const COMPANION_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// Writes `base` with `adapter` merged into it as a HF model directory `out`, one tensor at a
/// time (a 6B model needs about one weight matrix of memory besides the memory-mapped base),
/// in the base's dtype. Returns the files written.
pub fn merge_adapter(base: &Path, adapter_dir: &Path, out: &Path) -> Result<Vec<String>> {
    let config = load_config(base)?;
    let adapter = lora::Adapter::load(adapter_dir, &Device::Cpu)?;
    let deltas = adapter.deltas(&config).with_context(|| {
        format!(
            "adapter {} does not fit base model {}",
            adapter_dir.display(),
            base.display()
        )
    })?;
    let store = WeightStore::open(base)?;
    let dtype = config_dtype(&config);
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    write_config(out, &config, dtype)?;
    let specs = parameter_specs(&config, dtype);
    let mut files = weights::write_weights(out, &specs, DEFAULT_MAX_SHARD_BYTES, |spec| {
        let tensor = store.load(&spec.name, DType::F32, &Device::Cpu)?;
        let merged = match deltas.get(&spec.name) {
            Some(delta) => (tensor + delta)?,
            None => tensor,
        };
        Ok(merged.to_dtype(dtype)?)
    })?;
    files.insert(0, "config.json".into());
    for name in COMPANION_FILES {
        let from = [base, adapter_dir]
            .into_iter()
            .map(|dir| dir.join(name))
            .find(|path| path.is_file());
        if let Some(from) = from {
            std::fs::copy(&from, out.join(name))
                .with_context(|| format!("copying {} into {}", from.display(), out.display()))?;
            files.push(name.to_string());
        }
    }
    Ok(files)
}

/// The dtype `config.json` says the weights are stored in (`dtype`, or transformers 4's
/// `torch_dtype`); fp32 when it says nothing.
fn config_dtype(config: &Config) -> DType {
    let extra = config.extra();
    ["dtype", "torch_dtype"]
        .iter()
        .find_map(|key| extra.get(*key).and_then(|v| v.as_str()))
        .and_then(|name| parse_dtype(name).ok())
        .unwrap_or(DType::F32)
}

/// Loads every parameter of a model directory as named tensors (fp32 master copies for training).
pub fn load_parameters(
    dir: &Path,
    config: &Config,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    load_parameters_as(dir, config, |_, _| dtype, device)
}

/// [`load_parameters`] with each tensor converted to `dtype_of(name, shape)` as it is read from the
/// memory-mapped file: a half-precision copy of a model never passes through fp32 whole.
pub fn load_parameters_as(
    dir: &Path,
    config: &Config,
    dtype_of: impl Fn(&str, &[usize]) -> DType,
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
        params.insert(
            name.clone(),
            store.load(&name, dtype_of(&name, &shape), device)?,
        );
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
) -> Result<Model> {
    let vb = VarBuilder::from_backend(
        Box::new(weights::TensorsBackend(params.clone())),
        compute_dtype,
        device.clone(),
    );
    Ok(Model::load(vb, config)?)
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
            Device::new_cuda(ordinal).map_err(|e| anyhow!(explain_cuda_failure(s, ordinal, &e)))
        }
        other => bail!("unknown device {other:?}: expected cpu, cuda or cuda:N"),
    }
}

/// Why `device` could not be opened, in the user's terms: the driver's error codes name the cause
/// (no driver, the link-time stub, no device, a driver older than the toolkit) far better than
/// the loader-level message candle passes up.
fn explain_cuda_failure(device: &str, ordinal: usize, err: &candle_core::Error) -> String {
    let detail = format!("{err:?}");
    let cause = if matches!(err, candle_core::Error::NotCompiledWithCudaSupport) {
        "this kiln binary was built without CUDA support (build with `--features cuda`, or use \
         the GPU bundle from scripts/gpu-bundle.sh)"
            .to_string()
    } else if detail.contains("CUDA_ERROR_STUB_LIBRARY") {
        "no NVIDIA driver was found: the libcuda.so.1 loaded is a link-time stub, not a driver \
         (install the NVIDIA driver, or run on a machine with a GPU)"
            .to_string()
    } else if detail.contains("CUDA_ERROR_NO_DEVICE") {
        "the NVIDIA driver is installed but sees no CUDA device".to_string()
    } else if detail.contains("CUDA_ERROR_INSUFFICIENT_DRIVER")
        || detail.contains("CUDA_ERROR_UNSUPPORTED_PTX_VERSION")
    {
        "the NVIDIA driver is older than the CUDA release this binary was built with (see \
         `nvidia-smi` for the driver's CUDA version and rebuild the bundle with \
         KILN_CUDA_RELEASE set to it)"
            .to_string()
    } else if detail.contains("CUDA_ERROR_INVALID_DEVICE") {
        format!("there is no CUDA device {ordinal} (`nvidia-smi -L` lists the devices)")
    } else {
        format!("the CUDA device could not be opened: {err}")
    };
    format!("device {device:?} is not available: {cause}")
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
