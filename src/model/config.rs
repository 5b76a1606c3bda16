//! A model's `config.json` by its family, read and written as HF does.

use serde::{Deserialize, Serialize};

use super::{gpt2, gpt_neo, gpt_neox, gptj, sizes};
use crate::ops::DropoutRates;

/// The `model_type`s Kiln implements.
pub const MODEL_TYPES: &[&str] = &["gptj", "gpt2", "gpt_neo", "gpt_neox"];

const PREFIX_LM_KEY: &str = "prefix_lm";

/// The defaults HF's config classes share, for the families' `#[serde(default = ...)]`.
pub(super) mod defaults {
    pub fn gelu_new() -> String {
        "gelu_new".into()
    }
    pub fn layer_norm_epsilon() -> f64 {
        1e-5
    }
    pub fn yes() -> bool {
        true
    }
    pub fn initializer_range() -> f64 {
        0.02
    }
}

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

    pub(super) fn extra(&self) -> &serde_json::Map<String, serde_json::Value> {
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

    /// The HF name of the token embedding.
    pub fn embedding_parameter_name(&self) -> &'static str {
        match self {
            Config::GptNeoX(_) => "gpt_neox.embed_in.weight",
            _ => "transformer.wte.weight",
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
pub(super) fn hf_json(config: &impl Serialize, architecture: &str) -> serde_json::Value {
    let mut value = serde_json::to_value(config).expect("config serialises");
    let object = value.as_object_mut().expect("config is an object");
    object
        .entry("architectures")
        .or_insert_with(|| serde_json::json!([architecture]));
    value
}

/// Checks the sizes every family has, under the family's own field names: all positive, and
/// the `width` a multiple of the `heads`.
pub(super) fn check_sizes(
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
