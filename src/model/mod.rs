//! The model families Kiln trains (GPT-J, GPT-2, GPT-Neo, GPT-NeoX/Pythia), one file each, over
//! the [`block`] they share, and the Hugging Face model directory they live in.
//!
//! A family's file holds its `config.json`, its weight names and its forward pass down to the
//! final hidden states ([`CausalLm`]). Here: which family a model is and its logits; in
//! [`config`] the family's `config.json`; in [`batch`] what a forward pass reads; in [`loss`]
//! the loss head and the gradients (activation checkpointing included); in [`dir`] HF model
//! directories.

pub mod batch;
pub mod block;
pub mod config;
pub mod dir;
pub mod gpt2;
pub mod gpt_neo;
pub mod gpt_neox;
pub mod gptj;
pub mod init;
pub mod lora;
pub mod loss;
pub mod pass;
pub mod quantized;
pub mod sizes;
pub mod weights;

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, TensorId};
use candle_nn::VarBuilder;

pub use crate::ops::KvCache;
use crate::ops::{self, Linear, Operands};
pub use batch::Batch;
use config::{check_sizes, hf_json};
pub use config::{Config, MODEL_TYPES};
pub use dir::{
    load_config, load_model, load_model_quantized, load_model_with_adapter,
    load_model_with_attached_adapter, load_parameters, load_parameters_as,
    load_parameters_converted, merge_adapter, model_from_parameters, parameter_shapes,
    parameter_specs, parameter_tensors, parse_dtype, save_model, weights_sha256, write_config,
    DEFAULT_MAX_SHARD_BYTES,
};
pub use gpt2::Gpt2;
pub use gpt_neo::GptNeo;
pub use gpt_neox::GptNeoX;
pub use gptj::GptJ;
pub use loss::{causal_lm_loss, shifted_labels, LossGrads};
pub use pass::Pass;
pub use weights::{TensorSpec, WeightStore};

/// What a family's model file provides: its forward pass up to the final hidden states, each
/// stage handed to the [`Pass`] (which runs it plainly, against a KV cache, or checkpointed),
/// and the head that maps them to the vocabulary. Everything downstream (logits, the fused loss
/// head, generation, activation checkpointing) is shared by [`Model`].
pub trait CausalLm {
    /// Embeddings → blocks → final norm over `batch`.
    fn forward(&self, batch: &Batch, pass: &mut Pass) -> candle_core::Result<Tensor>;
    /// The output projection (for a tied model, the token embedding).
    fn lm_head(&self) -> &Linear;
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
        cache: Option<&mut KvCache>,
    ) -> candle_core::Result<Tensor> {
        let mut pass = match cache {
            Some(cache) => Pass::cached(cache),
            None => Pass::plain(),
        };
        self.body().forward(batch, &mut pass)
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
}
