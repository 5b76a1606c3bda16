//! Frozen linear weights stored quantised (`model.quantize`, `--quantize`): every linear layer
//! inside the blocks, each quantised as it is read so that the model never exists whole in a
//! wider dtype. The embeddings and the head stay in the compute dtype, as transformers keeps
//! them with bitsandbytes (`llm_int8_skip_modules` defaults to the head): the embedding is a
//! lookup, not a product, and the head's precision shows directly in every logit. GPT-2's
//! `Conv1D` weights are quantised in the `[out, in]` layout every other layer has, as
//! transformers does.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

use super::{lora, Config};
pub use crate::ops::quant::{QuantFormat, Quantization, QuantizedWeight};

/// The weights a quantisation applies to, by HF name, each with whether it is a `Conv1D`
/// (stored `[in, out]`).
pub fn quantized_weights(config: &Config) -> HashMap<String, bool> {
    lora::linear_layers(config)
        .into_iter()
        .map(|layer| (layer.weight_name(), layer.conv1d))
        .collect()
}

/// Parameter `name` as a run or a loaded model holds it: quantised into its parts if it is one
/// of `weights` (see [`quantized_weights`]), else as it is.
pub fn quantize_parameter(
    weights: &HashMap<String, bool>,
    name: &str,
    tensor: Tensor,
    quantization: Quantization,
) -> anyhow::Result<Vec<(String, Tensor)>> {
    let Some(&conv1d) = weights.get(name) else {
        return Ok(vec![(name.to_string(), tensor)]);
    };
    let matrix = match conv1d {
        true => tensor.t()?.contiguous()?,
        false => tensor,
    };
    Ok(QuantizedWeight::quantize(&matrix, quantization)?.named_tensors(name)?)
}

/// A `VarBuilder` backend that hands out the linear weights of `inner` quantised: a layer asks
/// for `<weight>.nf4` (or `.int8`) and the rest, the dense weight is read once, in fp32, and
/// quantised; its parts wait here until the layer takes them.
pub struct QuantizingBackend {
    inner: Box<dyn SimpleBackend>,
    quantization: Quantization,
    weights: HashMap<String, bool>,
    pending: Mutex<HashMap<String, Tensor>>,
}

impl QuantizingBackend {
    pub fn new(inner: Box<dyn SimpleBackend>, config: &Config, quantization: Quantization) -> Self {
        Self {
            inner,
            quantization,
            weights: quantized_weights(config),
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// The quantised weight `name` is a part of, if any.
    fn weight_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        let (weight, _) = name.rsplit_once('.')?;
        (QuantizedWeight::is_part(name) && self.weights.contains_key(weight)).then_some(weight)
    }

    fn part(&self, name: &str, weight: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let mut pending = self
            .pending
            .lock()
            .expect("no panic while holding the lock");
        if let Some(tensor) = pending.remove(name) {
            return Ok(tensor);
        }
        let dense = self.inner.get_unchecked(weight, DType::F32, dev)?;
        let parts = quantize_parameter(&self.weights, weight, dense, self.quantization)
            .map_err(|e| candle_core::Error::msg(format!("quantising {weight}: {e:#}")))?;
        pending.extend(parts);
        pending
            .remove(name)
            .ok_or_else(|| candle_core::Error::msg(format!("{name}: not a part of {weight}")))
    }
}

impl SimpleBackend for QuantizingBackend {
    fn get(
        &self,
        expected: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.weight_of(name) {
            Some(weight) => self.part(name, weight, dev),
            None => self.inner.get(expected, name, init, dtype, dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.weight_of(name) {
            Some(weight) => self.part(name, weight, dev),
            None => self.inner.get_unchecked(name, dtype, dev),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        if self.weights.contains_key(name) {
            // The dense weight is hidden: the layer loads its quantised parts instead.
            return false;
        }
        let Some(weight) = self.weight_of(name) else {
            return self.inner.contains_tensor(name);
        };
        let (_, suffix) = name.rsplit_once('.').expect("a part's name has a suffix");
        let wanted: &[&str] = match (self.quantization.format, self.quantization.double_quant) {
            (QuantFormat::Int8, _) => &["int8", "scales"],
            (QuantFormat::Nf4, false) => &["nf4", "absmax"],
            (QuantFormat::Nf4, true) => &["nf4", "absmax", "nested_absmax", "nested_offset"],
        };
        wanted.contains(&suffix) && self.inner.contains_tensor(weight)
    }
}
