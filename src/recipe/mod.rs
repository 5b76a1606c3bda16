//! Recipes: a whole experiment in one YAML file.
//!
//! Every key is typed and unknown keys are rejected, so a typo fails at `kiln recipe check`
//! instead of being silently ignored. Defaults are documented in `recipes/README.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::init::Preset;
pub use crate::model::lora::LoraSpec;
use crate::ops::quant::{QuantFormat, Quantization};
use crate::tokenizer::TextTokenizer;

mod load;
pub mod objective;
pub mod template;

pub use load::{apply_override, load, parse};
pub use objective::{ObjectiveKind, ObjectiveSpec, PreferenceLoss};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Run name: checkpoints go to `<checkpoint.dir>/<name>`, logs to `<tracking.log_dir>/<name>`.
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    pub model: ModelSpec,
    /// Tokenizer directory or Hub id; default: the model's own.
    #[serde(default)]
    pub tokenizer: Option<String>,
    pub data: DataSpec,
    /// Trading compute for memory.
    #[serde(default, skip_serializing_if = "MemorySpec::is_default")]
    pub memory: MemorySpec,
    /// What trains (absent: every weight).
    #[serde(default, skip_serializing_if = "TrainSpec::is_default")]
    pub train: TrainSpec,
    /// Train a LoRA adapter (PEFT's format) instead of every weight; absent: full fine-tune.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    /// What training minimises (absent: next-token cross-entropy). Left out of the serialized
    /// recipe when it is, so older checkpoints' recipes still match.
    #[serde(default, skip_serializing_if = "ObjectiveSpec::is_sft")]
    pub objective: ObjectiveSpec,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub schedule: ScheduleSpec,
    #[serde(default)]
    pub precision: PrecisionSpec,
    pub batch: BatchSpec,
    #[serde(default)]
    pub steps: Option<u64>,
    #[serde(default)]
    pub epochs: Option<f64>,
    /// cpu, cuda or cuda:N.
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    #[serde(default)]
    pub eval: EvalSpec,
    #[serde(default)]
    pub tracking: TrackingSpec,
    /// Training across processes (`mpirun`, `srun`, torchrun-style launches); ignored by a
    /// single process.
    #[serde(default, skip_serializing_if = "DistributedSpec::is_default")]
    pub distributed: DistributedSpec,
}

fn default_device() -> String {
    "cpu".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A local HF model directory or a Hub repo id. Exactly one of `from` and `init`.
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub init: Option<InitSpec>,
    /// Dropout in training, overriding the model config's (`resid_pdrop`, `embd_pdrop`,
    /// `attn_pdrop` or the family's spelling); a rate left out keeps the config's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout: Option<DropoutSpec>,
    /// The frozen base's linear weights stored in 4-bit NF4 or int8 (bitsandbytes' formats) as
    /// they load: QLoRA, with a `lora` section. The embeddings and the head stay in the compute
    /// dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize: Option<QuantFormat>,
    /// With `quantize: nf4`, each block's absmax quantised again to 8 bits (QLoRA's double
    /// quantisation, bitsandbytes' `bnb_4bit_use_double_quant`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub double_quant: bool,
}

impl ModelSpec {
    /// How the frozen linear weights are stored, if quantised.
    pub fn quantization(&self) -> Option<Quantization> {
        self.quantize.map(|format| Quantization {
            format,
            double_quant: self.double_quant,
        })
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DropoutSpec {
    #[serde(default)]
    pub resid: Option<f64>,
    #[serde(default)]
    pub embd: Option<f64>,
    #[serde(default)]
    pub attn: Option<f64>,
}

impl DropoutSpec {
    /// `config`'s rates with this spec's in their place.
    pub fn over(&self, config: crate::ops::DropoutRates) -> crate::ops::DropoutRates {
        crate::ops::DropoutRates {
            resid: self.resid.unwrap_or(config.resid),
            embd: self.embd.unwrap_or(config.embd),
            attn: self.attn.unwrap_or(config.attn),
            ..config
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemorySpec {
    /// Keep only each block's input through the forward and recompute the block in the
    /// backward: activations shrink from every block's graph to one block's, for about a third
    /// more compute. Results equal those without it up to the order of some gradient sums.
    #[serde(default)]
    pub activation_checkpointing: bool,
}

impl MemorySpec {
    pub fn is_default(&self) -> bool {
        self == &MemorySpec::default()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DistributedSpec {
    /// ZeRO stage 1: each rank keeps the AdamW moments of 1/N of the parameters, updates its
    /// share and sends the updated weights to the others. Results equal unsharded training.
    #[serde(default)]
    pub shard_optimizer: bool,
    /// Seconds a rank waits for the others (at each step's check-in and at the barriers after
    /// rank 0's evaluation and checkpoints) before it stops the whole job naming who is late.
    /// Must exceed the longest evaluation or checkpoint save.
    #[serde(default = "default_distributed_timeout")]
    pub timeout_secs: u64,
    /// Gradients are all-reduced in buckets of about this many MiB (fewer, larger messages).
    #[serde(default = "default_bucket_mib")]
    pub bucket_mib: usize,
}

fn default_distributed_timeout() -> u64 {
    1800
}

fn default_bucket_mib() -> usize {
    25
}

impl Default for DistributedSpec {
    fn default() -> Self {
        Self {
            shard_optimizer: false,
            timeout_secs: default_distributed_timeout(),
            bucket_mib: default_bucket_mib(),
        }
    }
}

impl DistributedSpec {
    pub fn is_default(&self) -> bool {
        self == &DistributedSpec::default()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Partial fine-tuning: only the parameters these patterns match train (HF names or module
    /// paths, `*` matching any run of characters, e.g. `[transformer.h.27, lm_head]` or
    /// `["transformer.h.2*.mlp"]`); the rest stay frozen, in the compute dtype, with no
    /// gradient or optimizer state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable: Option<Vec<String>>,
}

impl TrainSpec {
    pub fn is_default(&self) -> bool {
        self == &TrainSpec::default()
    }

    /// Whether parameter `name` trains.
    pub fn trains(&self, name: &str) -> bool {
        match &self.trainable {
            None => true,
            Some(patterns) => patterns.iter().any(|p| pattern_matches(p, name)),
        }
    }
}

/// A `train.trainable` pattern against a parameter name: the whole name, or a module path
/// followed by `.`, with `*` standing for any run of characters.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    fn glob(p: &[u8], s: &[u8]) -> bool {
        match p.split_first() {
            None => s.is_empty(),
            Some((b'*', rest)) => (0..=s.len()).any(|i| glob(rest, &s[i..])),
            Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
        }
    }
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    glob(p, n) || (0..n.len()).any(|i| n[i] == b'.' && glob(p, &n[..i]))
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    pub preset: Preset,
    #[serde(default)]
    pub seed: u64,
    /// Embedding rows; default: the tokenizer's size rounded up to a multiple of 64.
    #[serde(default)]
    pub vocab_size: Option<usize>,
    /// The precision the random weights are made in, as if read from a checkpoint stored so
    /// (fp32, fp16 or bf16).
    #[serde(default, skip_serializing_if = "Compute::is_fp32")]
    pub dtype: Compute,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    pub train: Vec<DatasetSpec>,
    #[serde(default)]
    pub eval: Vec<DatasetSpec>,
    pub seq_len: usize,
    #[serde(default)]
    pub mode: BatchMode,
    #[serde(default)]
    pub loss_on: LossOn,
    #[serde(default)]
    pub truncation: Truncation,
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// `prefix`: each example's prompt attends to itself both ways and its target causally
    /// (a prefix LM, as UL2 and GPT-JT), and a packed row's examples do not see each other.
    /// Left out of the serialized recipe when causal, so older checkpoints' recipes still match.
    #[serde(default, skip_serializing_if = "Attention::is_causal")]
    pub attention: Attention,
    /// How `mode: pack` fills rows (left out when `concatenate`, as above).
    #[serde(default, skip_serializing_if = "Packing::is_concatenate")]
    pub packing: Packing,
    /// The chat template of `template: chat` datasets: a preset (`chatml`, `openassistant`,
    /// `dolly`, which add their special tokens), a Jinja template, or a `.jinja` file relative
    /// to the recipe; default: the tokenizer's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Attention {
    #[default]
    Causal,
    Prefix,
}

impl Attention {
    pub fn is_causal(&self) -> bool {
        *self == Attention::Causal
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    pub source: SourceSpec,
    pub template: TemplateSpec,
    /// Label value (as written in the data, e.g. `0`) → label word. Default: the preset's
    /// (mnli: 0/1/2 → entailment/neutral/contradiction; sentiment: 0/1 → negative/positive),
    /// else the dataset's ClassLabel names (Parquet from the Hub), else the value as written.
    #[serde(default)]
    pub label_map: Option<BTreeMap<String, String>>,
    /// Template field → source column, for data whose columns are named differently
    /// (e.g. `{text: sentence}` for SST-2 with the sentiment preset).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub columns: BTreeMap<String, String>,
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default)]
    pub few_shot: Option<FewShotSpec>,
}

/// Where examples come from: a local file, or a Hub dataset.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Local file (relative paths are relative to the recipe file).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// jsonl, json, csv, tsv, glue-tsv, parquet, arrow; default from the file extension.
    #[serde(default)]
    pub format: Option<String>,
    /// Hub dataset repo id, e.g. `nyu-mll/glue`.
    #[serde(default)]
    pub hub: Option<String>,
    #[serde(default)]
    pub config: Option<String>,
    #[serde(default)]
    pub split: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
}

/// A preset name (`mnli`, `sentiment`, `prompt-completion`, `text`, `chat`) or a custom template.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum TemplateSpec {
    Preset(String),
    Custom {
        /// Text before the split point, with `{field}` placeholders.
        prompt: String,
        /// Text after the split point (what `loss_on: target` trains on).
        target: String,
    },
}

/// The template name of conversation datasets.
pub const CHAT_TEMPLATE: &str = "chat";
/// The template name of preference pairs (`prompt`, `chosen`, `rejected`).
pub const PREFERENCE_TEMPLATE: &str = "preference";

impl TemplateSpec {
    /// `template: chat`: conversations rendered with the chat template.
    pub fn is_chat(&self) -> bool {
        matches!(self, TemplateSpec::Preset(name) if name == CHAT_TEMPLATE)
    }

    /// `template: preference`: rows of `prompt`, `chosen` and `rejected` (TRL's format).
    pub fn is_preference(&self) -> bool {
        matches!(self, TemplateSpec::Preset(name) if name == PREFERENCE_TEMPLATE)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomTemplate {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    target: String,
}

// By hand rather than `untagged`, so that a typo inside a custom template is reported as such
// instead of "data did not match any variant".
impl<'de> Deserialize<'de> for TemplateSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = TemplateSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a preset name (mnli, sentiment, prompt-completion, text) or a mapping with prompt and target")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<TemplateSpec, E> {
                Ok(TemplateSpec::Preset(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<TemplateSpec, A::Error> {
                let custom =
                    CustomTemplate::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(TemplateSpec::Custom {
                    prompt: custom.prompt,
                    target: custom.target,
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FewShotSpec {
    pub k: usize,
    #[serde(default)]
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BatchMode {
    /// Concatenate examples and cut into `seq_len` blocks (HF `run_clm`, Graphcore).
    #[default]
    Pack,
    /// One example a row, right-padded.
    Pad,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LossOn {
    #[default]
    All,
    Target,
    /// Conversations (`template: chat`): every assistant turn, its end-of-turn token included.
    Assistant,
    /// Conversations: the last assistant turn only.
    #[serde(alias = "last_assistant")]
    LastAssistant,
}

impl LossOn {
    /// Whether it selects the assistant's turns of conversations.
    pub fn is_assistant(self) -> bool {
        matches!(self, LossOn::Assistant | LossOn::LastAssistant)
    }

    pub fn name(self) -> &'static str {
        match self {
            LossOn::All => "all",
            LossOn::Target => "target",
            LossOn::Assistant => "assistant",
            LossOn::LastAssistant => "last-assistant",
        }
    }
}

/// How `mode: pack` fills rows.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Packing {
    /// Concatenate and cut into `seq_len` blocks; examples see each other (HF `run_clm`).
    #[default]
    Concatenate,
    /// Whole examples fitted into rows of at most `seq_len` (best-fit decreasing), each
    /// attending only to itself with its positions restarting: the same loss and gradients as
    /// alone.
    Isolated,
}

impl Packing {
    pub fn is_concatenate(&self) -> bool {
        *self == Packing::Concatenate
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Truncation {
    #[default]
    Error,
    Left,
    Right,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Parameters exempt from weight decay: those whose HF name contains one of these strings.
    /// Empty (the default) decays every parameter, as `torch.optim.AdamW` does; `[bias, ln_]`
    /// reproduces HF Trainer (no decay for biases and LayerNorm weights).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_decay: Vec<String>,
    /// Clip the global gradient norm to this; `null` disables clipping.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: Option<f64>,
}

fn default_lr() -> f64 {
    1e-4
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_grad_clip() -> Option<f64> {
    Some(1.0)
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: 0.0,
            no_decay: Vec::new(),
            grad_clip: default_grad_clip(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    #[default]
    Constant,
    Linear,
    Cosine,
}

/// Warmup given as a number of steps (an integer) or a fraction of all steps (below 1).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Warmup {
    Steps(u64),
    Fraction(f64),
}

impl Warmup {
    /// Warmup steps of a run of `total_steps`: as given, or `ceil(fraction × total)` (as HF
    /// `TrainingArguments.get_warmup_steps`). The one definition `kiln recipe check` reports and
    /// the trainer's schedule uses.
    pub fn steps(self, total_steps: u64) -> u64 {
        match self {
            Warmup::Steps(steps) => steps,
            Warmup::Fraction(f) => (f * total_steps as f64).ceil() as u64,
        }
    }
}

impl<'de> Deserialize<'de> for Warmup {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Warmup;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of steps (integer) or a fraction of all steps in [0, 1)")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Warmup, E> {
                Ok(Warmup::Steps(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Warmup, E> {
                u64::try_from(v)
                    .map(Warmup::Steps)
                    .map_err(|_| E::custom(format!("warmup must not be negative, found {v}")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Warmup, E> {
                Ok(Warmup::Fraction(v))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    #[serde(default)]
    pub kind: ScheduleKind,
    #[serde(default = "no_warmup")]
    pub warmup: Warmup,
    /// Learning rate at step 0 of the warmup (Graphcore warms up from 1e-7).
    #[serde(default)]
    pub warmup_from: f64,
    /// Learning rate the decay ends at.
    #[serde(default)]
    pub min_lr: f64,
}

fn no_warmup() -> Warmup {
    Warmup::Steps(0)
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Constant,
            warmup: no_warmup(),
            warmup_from: 0.0,
            min_lr: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Compute {
    #[default]
    Fp32,
    Fp16,
    Bf16,
}

impl Compute {
    pub fn is_fp32(&self) -> bool {
        *self == Compute::Fp32
    }

    pub fn dtype(self) -> candle_core::DType {
        match self {
            Compute::Fp32 => candle_core::DType::F32,
            Compute::Fp16 => candle_core::DType::F16,
            Compute::Bf16 => candle_core::DType::BF16,
        }
    }

    /// As written in a recipe.
    pub fn name(self) -> &'static str {
        match self {
            Compute::Fp32 => "fp32",
            Compute::Fp16 => "fp16",
            Compute::Bf16 => "bf16",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrecisionSpec {
    /// dtype of forward/backward; master weights and optimizer states are always fp32.
    #[serde(default)]
    pub compute: Compute,
    /// fp16 only: dynamic loss scaling.
    #[serde(default = "default_initial_scale")]
    pub initial_loss_scale: f64,
    #[serde(default = "default_growth_interval")]
    pub growth_interval: u64,
    /// fp16 only: the scale is multiplied by this after `growth_interval` clean steps (torch's
    /// `GradScaler(growth_factor=2.0)`).
    #[serde(default = "default_growth_factor")]
    pub growth_factor: f64,
    /// fp16 only: the scale is multiplied by this when gradients overflow (torch's
    /// `backoff_factor=0.5`).
    #[serde(default = "default_backoff_factor")]
    pub backoff_factor: f64,
}

fn default_growth_factor() -> f64 {
    2.0
}
fn default_backoff_factor() -> f64 {
    0.5
}

fn default_initial_scale() -> f64 {
    65536.0
}
fn default_growth_interval() -> u64 {
    2000
}

impl Default for PrecisionSpec {
    fn default() -> Self {
        Self {
            compute: Compute::Fp32,
            initial_loss_scale: default_initial_scale(),
            growth_interval: default_growth_interval(),
            growth_factor: default_growth_factor(),
            backoff_factor: default_backoff_factor(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchSpec {
    /// Sequences per optimizer step.
    pub global: usize,
    /// Sequences per forward/backward on one replica.
    pub micro: usize,
    #[serde(default = "one")]
    pub replicas: usize,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Save every N steps (0: only at the end).
    #[serde(default)]
    pub every: u64,
    /// Keep this many most recent checkpoints (0: keep all).
    #[serde(default)]
    pub keep_last: usize,
    #[serde(default = "default_checkpoint_dir")]
    pub dir: PathBuf,
    /// dtype of saved model weights (optimizer states are always fp32).
    #[serde(default)]
    pub dtype: Option<Compute>,
    #[serde(default)]
    pub push_to_hub: Option<PushSpec>,
    /// The checkpoint of the best evaluation by this metric is never pruned and `best` names it
    /// (HF Trainer's `metric_for_best_model`). Left out of the serialized recipe when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_best: Option<BestSpec>,
}

/// A metric an evaluation reports (`loss`, `accuracy`, ...: the name after `eval/`), and whether
/// lower or higher is better.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum BestSpec {
    /// The mode follows the name: `min` for losses and perplexities, `max` otherwise.
    Metric(String),
    Full {
        metric: String,
        mode: MetricMode,
    },
}

impl BestSpec {
    pub fn metric(&self) -> &str {
        match self {
            BestSpec::Metric(metric) | BestSpec::Full { metric, .. } => {
                metric.strip_prefix("eval/").unwrap_or(metric)
            }
        }
    }

    pub fn mode(&self) -> MetricMode {
        match self {
            BestSpec::Full { mode, .. } => *mode,
            BestSpec::Metric(_) => MetricMode::natural(self.metric()),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MetricMode {
    Min,
    Max,
}

impl MetricMode {
    /// `min` for a loss or perplexity, `max` for anything else (accuracy, F1, ...).
    pub fn natural(metric: &str) -> Self {
        match metric.ends_with("loss") || metric.ends_with("perplexity") {
            true => MetricMode::Min,
            false => MetricMode::Max,
        }
    }

    /// Whether `value` improves on `best` by more than `min_delta`.
    pub fn improves(self, value: f64, best: f64, min_delta: f64) -> bool {
        match self {
            MetricMode::Min => value < best - min_delta,
            MetricMode::Max => value > best + min_delta,
        }
    }
}

/// `eval.early_stopping`: training ends once `patience` evaluations in a row have not improved
/// `metric` by more than `min_delta` (HF's `EarlyStoppingCallback`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EarlyStoppingSpec {
    pub metric: String,
    /// Default: `min` for losses and perplexities, `max` otherwise.
    #[serde(default)]
    pub mode: Option<MetricMode>,
    pub patience: u32,
    #[serde(default)]
    pub min_delta: f64,
}

impl EarlyStoppingSpec {
    pub fn metric(&self) -> &str {
        self.metric.strip_prefix("eval/").unwrap_or(&self.metric)
    }

    pub fn mode(&self) -> MetricMode {
        self.mode
            .unwrap_or_else(|| MetricMode::natural(self.metric()))
    }
}

fn default_checkpoint_dir() -> PathBuf {
    "checkpoints".into()
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            every: 0,
            keep_last: 0,
            dir: default_checkpoint_dir(),
            dtype: None,
            push_to_hub: None,
            keep_best: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PushSpec {
    pub repo: String,
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub private: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EvalTask {
    /// Loss on the eval split only.
    #[default]
    Loss,
    /// Loss and MNLI accuracy (Graphcore's protocol).
    Mnli,
    /// Loss and accuracy of ranking each eval template's fixed set of answers.
    Classify,
    /// Loss and its exp, with a report.
    Perplexity,
    /// A preference objective's loss on held-out pairs with TRL's metrics, preference accuracy
    /// (`rewards/accuracies`) among them.
    Preference,
}

impl EvalTask {
    /// As written in a recipe.
    pub fn name(self) -> &'static str {
        match self {
            EvalTask::Loss => "loss",
            EvalTask::Mnli => "mnli",
            EvalTask::Classify => "classify",
            EvalTask::Perplexity => "perplexity",
            EvalTask::Preference => "preference",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum EvalMode {
    #[default]
    Generate,
    Rank,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Evaluate every N steps (0: only at the end, if there is an eval split).
    #[serde(default)]
    pub every: u64,
    #[serde(default)]
    pub task: EvalTask,
    #[serde(default)]
    pub mode: EvalMode,
    /// At most this many eval examples (all when absent).
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// `classify`: also report accuracy per value of this column of the eval data. Left out of
    /// the serialized recipe when unset, so older checkpoints' recipes still match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_by: Option<String>,
    /// Stop training when the evaluations stop improving. Left out of the serialized recipe
    /// when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early_stopping: Option<EarlyStoppingSpec>,
}

fn default_eval_batch() -> usize {
    8
}

impl Default for EvalSpec {
    fn default() -> Self {
        Self {
            every: 0,
            task: EvalTask::Loss,
            mode: EvalMode::Generate,
            limit: None,
            batch_size: default_eval_batch(),
            group_by: None,
            early_stopping: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrackingSpec {
    #[serde(default = "default_log_dir")]
    pub log_dir: PathBuf,
    #[serde(default = "one_u64")]
    pub log_every: u64,
    /// Also log to an MLflow tracking server. Without this section, MLflow is on when
    /// `MLFLOW_TRACKING_URI` is set (as MLflow's own clients do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlflow: Option<MlflowSpec>,
}

/// `tracking.mlflow`: where a run is mirrored in MLflow. `metrics.jsonl` stays the record; the
/// server gets a copy and can be slow or away without holding up training.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MlflowSpec {
    /// `false` turns MLflow off even when `MLFLOW_TRACKING_URI` is set.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Server URL, e.g. `http://127.0.0.1:5000`; default `$MLFLOW_TRACKING_URI`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Experiment, created when missing; default `$MLFLOW_EXPERIMENT_NAME`, else `kiln`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<String>,
    /// MLflow run name; default the recipe's `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_name: Option<String>,
    /// Extra run tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Seconds the end of a run waits for unsent metrics and artifacts.
    #[serde(default = "default_mlflow_flush_secs")]
    pub flush_timeout_secs: u64,
}

fn default_mlflow_flush_secs() -> u64 {
    30
}

fn default_log_dir() -> PathBuf {
    "runs".into()
}
fn one_u64() -> u64 {
    1
}

impl Default for TrackingSpec {
    fn default() -> Self {
        Self {
            log_dir: default_log_dir(),
            log_every: 1,
            mlflow: None,
        }
    }
}

impl Recipe {
    /// Micro-batches each replica runs per optimizer step.
    pub fn accumulation_steps(&self) -> usize {
        self.batch.global / (self.batch.micro * self.batch.replicas).max(1)
    }

    pub fn tokens_per_step(&self) -> usize {
        // A preference pair is two sequences.
        let sequences = if self.objective.is_preference() { 2 } else { 1 };
        self.batch.global * sequences * self.data.seq_len
    }

    /// Optimizer steps of the run: `steps`, or `ceil(epochs × sequences per epoch / global)`.
    pub fn total_steps(&self, sequences_per_epoch: usize) -> u64 {
        match (self.steps, self.epochs) {
            (Some(steps), _) => steps,
            (None, Some(epochs)) => {
                let sequences = epochs * sequences_per_epoch as f64;
                ((sequences / self.batch.global as f64).ceil() as u64).max(1)
            }
            (None, None) => 0,
        }
    }

    /// Warmup steps of a run of `total_steps`; see [`Warmup::steps`].
    pub fn warmup_steps(&self, total_steps: u64) -> u64 {
        self.schedule.warmup.steps(total_steps)
    }
}

/// The directory relative paths in a recipe are relative to.
pub fn recipe_dir(recipe_path: &Path) -> PathBuf {
    match recipe_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The recipe's tokenizer when it is on this machine: `tokenizer:` (a directory relative to the
/// recipe), else the `model.from` directory's own. `None` for Hub ids (downloaded by the trainer)
/// and for `model.init` without `tokenizer:`.
pub fn tokenizer_for(recipe: &Recipe, recipe_dir: &Path) -> Result<Option<TextTokenizer>> {
    let candidate = match (&recipe.tokenizer, &recipe.model.from) {
        (Some(t), _) => Some(recipe_dir.join(t)),
        (None, Some(from)) => Some(recipe_dir.join(from)),
        (None, None) => None,
    };
    match candidate {
        Some(dir) if dir.is_dir() => TextTokenizer::from_dir(&dir)
            .map(Some)
            .with_context(|| format!("tokenizer of recipe {}", recipe.name)),
        _ => Ok(None),
    }
}

/// File formats a local source can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Json,
    Csv,
    Tsv,
    /// GLUE's MNLI TSV: sentence1 / sentence2 / gold_label become premise / hypothesis / label,
    /// rows without a gold label (`-`) are dropped.
    GlueTsv,
    Parquet,
    /// Arrow IPC, file or stream format (HF `datasets` cache files are streams).
    Arrow,
}

impl Format {
    pub const NAMES: &'static str = "jsonl, json, csv, tsv, glue-tsv, parquet, arrow";

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "jsonl" | "ndjson" => Format::Jsonl,
            "json" => Format::Json,
            "csv" => Format::Csv,
            "tsv" => Format::Tsv,
            "glue-tsv" => Format::GlueTsv,
            "parquet" => Format::Parquet,
            "arrow" | "ipc" | "feather" => Format::Arrow,
            other => bail!("unknown format {other:?} (expected one of {})", Self::NAMES),
        })
    }

    /// The format a source names, else the one its file extension implies.
    pub fn for_source(spec: &SourceSpec, path: &Path) -> Result<Self> {
        if let Some(name) = &spec.format {
            return Self::parse(name);
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        Self::parse(&ext).map_err(|_| {
            anyhow!(
                "cannot tell the format of {} from its extension; set `format:` to one of {}",
                path.display(),
                Self::NAMES
            )
        })
    }
}
