//! LoRA adapters, as Hugging Face PEFT defines and stores them.
//!
//! A layer `y = x·Wᵀ` gains a low-rank path `y += scale · (drop(x)·Aᵀ)·Bᵀ` with `A` `[r, in]`
//! (Kaiming-uniform, as PEFT initialises it) and `B` `[out, r]` (zero), `scale = alpha / r`
//! (`alpha / √r` with rsLoRA). Only `A` and `B` train. On disk an adapter is PEFT's directory:
//! `adapter_config.json` and `adapter_model.safetensors` with keys
//! `base_model.model.<module path>.lora_A.weight`, so `PeftModel.from_pretrained` loads it as is.
//!
//! Training runs the low-rank path beside the frozen weight (see [`crate::ops::Linear`]); for
//! inference the adapter is merged into the weights as they load ([`MergedBackend`]), the way
//! `kiln merge` writes them.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::weights::{write_safetensors_streaming, TensorSpec};
use super::Config;

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's prefix of every saved key: the wrapper (`base_model`) around the HF model (`model`).
const PEFT_PREFIX: &str = "base_model.model.";
/// The names Kiln gives an adapter's tensors in memory, after the adapted layer's HF path.
pub const A_SUFFIX: &str = "lora_A.weight";
pub const B_SUFFIX: &str = "lora_B.weight";
/// `B × scale`, the form the model multiplies by (the scale folded in once, not per product).
pub const SCALED_B_SUFFIX: &str = "lora_B.scaled";

/// The recipe's `lora:` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    /// Rank of the low-rank update.
    pub r: usize,
    /// The update is scaled by `alpha / r`.
    pub alpha: f64,
    /// Dropout on the adapter's input in training.
    #[serde(default)]
    pub dropout: f64,
    /// Layers to adapt, by HF module name (`q_proj`) or path suffix (`attn.q_proj`), as PEFT
    /// matches them; default: PEFT's for the family (GPT-J and GPT-Neo `q_proj`, `v_proj`;
    /// GPT-2 `c_attn`; GPT-NeoX `query_key_value`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<Vec<String>>,
    /// Which biases train; Kiln trains none, as PEFT's default.
    #[serde(default)]
    pub bias: LoraBias,
    /// Scale by `alpha / √r` (rsLoRA) instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    #[default]
    None,
}

impl LoraSpec {
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// What is wrong with the numbers, each naming its key under `lora.`.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.r == 0 {
            problems.push("lora.r: must be at least 1".to_string());
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            problems.push(format!(
                "lora.alpha: must be a positive number, found {}",
                self.alpha
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            problems.push(format!(
                "lora.dropout: {} is not a probability in [0, 1)",
                self.dropout
            ));
        }
        if self.target_modules.as_ref().is_some_and(|t| t.is_empty()) {
            problems.push(
                "lora.target_modules: must name at least one layer (remove it for the family's \
                 default)"
                    .to_string(),
            );
        }
        problems
    }

    /// The target modules, or PEFT's default for the family.
    pub fn targets(&self, config: &Config) -> Vec<String> {
        match &self.target_modules {
            Some(targets) => targets.clone(),
            None => default_targets(config)
                .iter()
                .map(|t| t.to_string())
                .collect(),
        }
    }
}

/// PEFT's default target modules per model type.
pub fn default_targets(config: &Config) -> &'static [&'static str] {
    match config {
        Config::GptJ(_) | Config::GptNeo(_) => &["q_proj", "v_proj"],
        Config::Gpt2(_) => &["c_attn"],
        Config::GptNeoX(_) => &["query_key_value"],
    }
}

/// A linear layer of the model an adapter can attach to.
#[derive(Debug, Clone, PartialEq)]
pub struct Layer {
    /// HF module path, e.g. `transformer.h.0.attn.q_proj`.
    pub module: String,
    pub in_dim: usize,
    pub out_dim: usize,
    /// GPT-2's `Conv1D`, which stores its weight `[in, out]`.
    pub conv1d: bool,
}

impl Layer {
    pub fn weight_name(&self) -> String {
        format!("{}.weight", self.module)
    }
}

/// Every linear layer inside the model's blocks (the embeddings and the head are not adapted).
pub fn linear_layers(config: &Config) -> Vec<Layer> {
    let conv1d = matches!(config, Config::Gpt2(_));
    config
        .parameter_shapes()
        .into_iter()
        .filter_map(|(name, shape)| {
            if !is_block_linear(&name, &shape) {
                return None;
            }
            let module = name.strip_suffix(".weight")?;
            let (in_dim, out_dim) = if conv1d {
                (shape[0], shape[1])
            } else {
                (shape[1], shape[0])
            };
            Some(Layer {
                module: module.to_string(),
                in_dim,
                out_dim,
                conv1d,
            })
        })
        .collect()
}

/// Whether parameter `name` is the weight of a linear layer inside the blocks (what LoRA adapts
/// and `model.quantize` quantises): a matrix named `....<layer number>....weight`.
pub fn is_block_linear(name: &str, shape: &[usize]) -> bool {
    let in_block = |module: &str| module.split('.').any(|part| part.parse::<usize>().is_ok());
    shape.len() == 2 && name.strip_suffix(".weight").is_some_and(in_block)
}

/// The layers `targets` select, matched as PEFT matches them: a module whose path is the target
/// or ends in `.<target>`. A target that selects nothing is an error listing the valid names.
pub fn select_layers(config: &Config, targets: &[String]) -> Result<Vec<Layer>> {
    let layers = linear_layers(config);
    let matches = |layer: &Layer, target: &str| {
        layer.module == target || layer.module.ends_with(&format!(".{target}"))
    };
    for target in targets {
        if !layers.iter().any(|l| matches(l, target)) {
            let mut names: Vec<&str> = Vec::new();
            for layer in &layers {
                let name = layer.module.rsplit('.').next().unwrap_or(&layer.module);
                if !names.contains(&name) {
                    names.push(name);
                }
            }
            bail!(
                "lora.target_modules: {} has no layer named {target:?}; the layers LoRA can adapt \
                 are: {}",
                config.model_type(),
                names.join(", ")
            );
        }
    }
    Ok(layers
        .into_iter()
        .filter(|l| targets.iter().any(|t| matches(l, t)))
        .collect())
}

/// Fresh adapter tensors for `layers`, PEFT's initialisation: `A` uniform in `±1/√in` (Kaiming
/// uniform with `a = √5`), `B` zero, so the adapted model starts as the base model. Named
/// `<module>.lora_A.weight` / `.lora_B.weight`, in the layers' order, fp32.
pub fn init_adapter(
    layers: &[Layer],
    r: usize,
    seed: u64,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6c6f_7261);
    let mut tensors = Vec::with_capacity(2 * layers.len());
    for layer in layers {
        let bound = 1.0 / (layer.in_dim as f32).sqrt();
        let a: Vec<f32> = (0..r * layer.in_dim)
            .map(|_| rng.gen_range(-bound..bound))
            .collect();
        tensors.push((
            format!("{}.{A_SUFFIX}", layer.module),
            Tensor::from_vec(a, (r, layer.in_dim), device)?,
        ));
        tensors.push((
            format!("{}.{B_SUFFIX}", layer.module),
            Tensor::zeros((layer.out_dim, r), DType::F32, device)?,
        ));
    }
    Ok(tensors)
}

/// Adds the adapter to a model's named tensors in the form the layers read: `A` as is and `B`
/// scaled (still differentiable with respect to the caller's `B`).
pub fn attach(
    tensors: &mut HashMap<String, Tensor>,
    adapter: &[(String, Tensor)],
    scale: f64,
) -> candle_core::Result<()> {
    for (name, tensor) in adapter {
        if let Some(module) = name.strip_suffix(B_SUFFIX) {
            tensors.insert(format!("{module}{SCALED_B_SUFFIX}"), (tensor * scale)?);
        } else {
            tensors.insert(name.clone(), tensor.clone());
        }
    }
    Ok(())
}

/// An adapter read from, or to be written as, a PEFT directory.
#[derive(Debug, Clone)]
pub struct Adapter {
    pub spec: LoraSpec,
    /// `<module>.lora_A.weight` / `.lora_B.weight` tensors, as [`init_adapter`] names them.
    pub tensors: Vec<(String, Tensor)>,
    /// `base_model_name_or_path` of the config.
    pub base_model: Option<String>,
}

/// The part of PEFT's `adapter_config.json` Kiln reads; other keys are PEFT's business.
#[derive(Debug, Deserialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: Option<serde_json::Value>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    rank_pattern: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    alpha_pattern: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Adapter {
    /// Reads a PEFT LoRA directory; what Kiln cannot apply exactly (DoRA, per-layer ranks,
    /// `modules_to_save`, trained biases) is refused by name rather than applied wrongly.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&config_path).with_context(|| {
            format!(
                "{}: cannot read (an adapter directory holds {ADAPTER_CONFIG} and \
                 {ADAPTER_WEIGHTS}, as PEFT's save_pretrained writes them)",
                config_path.display()
            )
        })?;
        let peft: PeftConfig = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a PEFT LoRA config", config_path.display()))?;
        let at = config_path.display();
        if let Some(kind) = peft.peft_type.as_deref().filter(|t| *t != "LORA") {
            bail!("{at}: peft_type is {kind:?}; Kiln applies LORA adapters");
        }
        ensure!(
            !peft.use_dora,
            "{at}: use_dora is true; Kiln applies plain LoRA"
        );
        if let Some(bias) = peft.bias.as_deref().filter(|b| *b != "none") {
            bail!("{at}: bias is {bias:?}; Kiln applies adapters with bias \"none\"");
        }
        if peft.modules_to_save.as_ref().is_some_and(|m| !m.is_null()) {
            bail!("{at}: modules_to_save is set; Kiln applies adapters without saved modules");
        }
        for (key, pattern) in [
            ("rank_pattern", &peft.rank_pattern),
            ("alpha_pattern", &peft.alpha_pattern),
        ] {
            if pattern.as_ref().is_some_and(|p| !p.is_empty()) {
                bail!("{at}: {key} is set; Kiln applies one rank and alpha to every layer");
            }
        }
        let target_modules = match peft.target_modules {
            Some(serde_json::Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|i| i.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .with_context(|| format!("{at}: target_modules must be a list of names"))?,
            ),
            Some(serde_json::Value::String(pattern)) => Some(vec![pattern]),
            _ => None,
        };
        let spec = LoraSpec {
            r: peft.r,
            alpha: peft.lora_alpha,
            dropout: peft.lora_dropout,
            target_modules,
            bias: LoraBias::None,
            use_rslora: peft.use_rslora,
        };
        if let Some(problem) = spec.problems().first() {
            bail!("{at}: {problem}");
        }
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        let stored = candle_core::safetensors::load(&weights_path, device).with_context(|| {
            format!(
                "{}: cannot read the adapter's weights (Kiln reads safetensors)",
                weights_path.display()
            )
        })?;
        let mut tensors = Vec::with_capacity(stored.len());
        for (key, tensor) in stored {
            let name = key.strip_prefix(PEFT_PREFIX).with_context(|| {
                format!(
                    "{}: tensor {key} does not start with {PEFT_PREFIX:?} (not a PEFT adapter for \
                     a causal LM)",
                    weights_path.display()
                )
            })?;
            // Older PEFT versions saved the adapter's name inside the key.
            let name = name.replace(".lora_A.default.", ".lora_A.");
            let name = name.replace(".lora_B.default.", ".lora_B.");
            ensure!(
                name.ends_with(A_SUFFIX) || name.ends_with(B_SUFFIX),
                "{}: tensor {key} is not a LoRA A or B matrix",
                weights_path.display()
            );
            super::weights::ensure_float(&tensor, &weights_path, &key)?;
            tensors.push((name, tensor.to_dtype(DType::F32)?));
        }
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Self {
            spec,
            tensors,
            base_model: peft.base_model_name_or_path,
        })
    }

    /// Checks that every tensor belongs to a layer of `config` and has its shape, naming the
    /// tensor that does not; returns the adapted layers with their `A` and `B`.
    pub fn layers(&self, config: &Config) -> Result<Vec<(Layer, Tensor, Tensor)>> {
        let layers: HashMap<String, Layer> = linear_layers(config)
            .into_iter()
            .map(|l| (l.module.clone(), l))
            .collect();
        let mut a_of = BTreeMap::new();
        let mut b_of = BTreeMap::new();
        for (name, tensor) in &self.tensors {
            let (module, is_a) = match name.strip_suffix(&format!(".{A_SUFFIX}")) {
                Some(module) => (module, true),
                None => (
                    name.strip_suffix(&format!(".{B_SUFFIX}")).unwrap_or(name),
                    false,
                ),
            };
            let key = format!("{PEFT_PREFIX}{name}");
            let layer = layers.get(module).with_context(|| {
                format!(
                    "adapter tensor {key}: the base model ({}, {} layers) has no layer {module}; \
                     the adapter was made for another architecture",
                    config.model_type(),
                    config.n_layer()
                )
            })?;
            let r = self.spec.r;
            let expected = if is_a {
                vec![r, layer.in_dim]
            } else {
                vec![layer.out_dim, r]
            };
            ensure!(
                tensor.dims() == expected.as_slice(),
                "adapter tensor {key} has shape {:?}, but r = {r} and the base model's {module} \
                 maps {} inputs to {} outputs, so it must be {expected:?}: the adapter was made \
                 for a base model of another shape",
                tensor.dims(),
                layer.in_dim,
                layer.out_dim
            );
            if is_a {
                a_of.insert(module.to_string(), tensor.clone());
            } else {
                b_of.insert(module.to_string(), tensor.clone());
            }
        }
        let mut adapted = Vec::new();
        for (module, a) in a_of {
            let b = b_of
                .remove(&module)
                .with_context(|| format!("adapter has {module}.{A_SUFFIX} but no {B_SUFFIX}"))?;
            adapted.push((layers[&module].clone(), a, b));
        }
        if let Some(module) = b_of.keys().next() {
            bail!("adapter has {module}.{B_SUFFIX} but no {A_SUFFIX}");
        }
        ensure!(!adapted.is_empty(), "the adapter has no LoRA tensors");
        Ok(adapted)
    }

    /// Writes PEFT's directory: `adapter_config.json` and `adapter_model.safetensors` (fp32).
    pub fn save(&self, dir: &Path, config: &Config, targets: &[String]) -> Result<()> {
        let conv1d = matches!(config, Config::Gpt2(_));
        let peft_config = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": self.base_model,
            "r": self.spec.r,
            // PEFT's field is an int; a whole alpha is written as one.
            "lora_alpha": whole_or_float(self.spec.alpha),
            "lora_dropout": self.spec.dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": conv1d,
            "use_rslora": self.spec.use_rslora,
            "use_dora": false,
            "init_lora_weights": true,
            "inference_mode": true,
            "modules_to_save": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "revision": null,
        });
        let config_path = dir.join(ADAPTER_CONFIG);
        std::fs::write(
            &config_path,
            serde_json::to_string_pretty(&peft_config)? + "\n",
        )
        .with_context(|| format!("{}: cannot write", config_path.display()))?;
        let (specs, by_name) = self.peft_tensors();
        let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        write_safetensors_streaming(&dir.join(ADAPTER_WEIGHTS), &specs, &metadata, |spec| {
            Ok(by_name[&spec.name].to_dtype(DType::F32)?)
        })
    }

    /// What `eval::mnli::weights_sha256` gives for the directory [`Self::save`] writes, without
    /// writing it.
    pub fn sha256(&self) -> Result<String> {
        let (specs, by_name) = self.peft_tensors();
        super::weights::weights_digest(&specs, usize::MAX, |spec| {
            Ok(by_name[&spec.name].to_dtype(DType::F32)?)
        })
    }

    /// The tensors as PEFT names them, with their fp32 specs in the file's order.
    fn peft_tensors(&self) -> (Vec<TensorSpec>, HashMap<String, &Tensor>) {
        let specs = self
            .tensors
            .iter()
            .map(|(name, t)| TensorSpec {
                name: format!("{PEFT_PREFIX}{name}"),
                dtype: DType::F32,
                shape: t.dims().to_vec(),
            })
            .collect();
        let by_name = self
            .tensors
            .iter()
            .map(|(n, t)| (format!("{PEFT_PREFIX}{n}"), t))
            .collect();
        (specs, by_name)
    }

    /// The adapter's update of each adapted weight, by weight name, in the weight's stored layout
    /// (`scale · B·A`, transposed for a `Conv1D`), fp32.
    pub fn deltas(&self, config: &Config) -> Result<HashMap<String, Tensor>> {
        let scale = self.spec.scale();
        let mut deltas = HashMap::new();
        for (layer, a, b) in self.layers(config)? {
            let delta = (b.matmul(&a)? * scale)?;
            let delta = if layer.conv1d {
                delta.t()?.contiguous()?
            } else {
                delta
            };
            deltas.insert(layer.weight_name(), delta);
        }
        Ok(deltas)
    }
}

fn whole_or_float(value: f64) -> serde_json::Value {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        serde_json::json!(value as i64)
    } else {
        serde_json::json!(value)
    }
}

/// A `VarBuilder` backend that adds adapters' updates to the weights it loads: a model loaded
/// through it is the merged model, built one tensor at a time from the base's files.
/// A base model's weights with an adapter beside them, unmerged: each adapted layer reads its
/// `lora_A.weight` and `lora_B.scaled` (see [`attach`]), so that the model can run with its
/// adapters on or off (`Batch::adapters_off`): the base and the adapted model in one.
pub struct AttachedBackend {
    pub base: Box<dyn SimpleBackend>,
    /// The adapter's tensors as the layers read them.
    pub adapter: HashMap<String, Tensor>,
}

impl AttachedBackend {
    /// `adapter`'s tensors, checked against `config`, to attach beside `base`.
    pub fn new(base: Box<dyn SimpleBackend>, adapter: &Adapter, config: &Config) -> Result<Self> {
        let tensors: Vec<(String, Tensor)> = adapter
            .layers(config)?
            .into_iter()
            .flat_map(|(layer, a, b)| {
                [
                    (format!("{}.{A_SUFFIX}", layer.module), a),
                    (format!("{}.{B_SUFFIX}", layer.module), b),
                ]
            })
            .collect();
        let mut attached = HashMap::new();
        attach(&mut attached, &tensors, adapter.spec.scale())?;
        Ok(Self {
            base,
            adapter: attached,
        })
    }
}

impl SimpleBackend for AttachedBackend {
    fn get(
        &self,
        expected: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        match self.adapter.get(name) {
            Some(tensor) => tensor.to_device(dev)?.to_dtype(dtype),
            None => self.base.get(expected, name, init, dtype, dev),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.adapter.get(name) {
            Some(tensor) => tensor.to_device(dev)?.to_dtype(dtype),
            None => self.base.get_unchecked(name, dtype, dev),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.adapter.contains_key(name) || self.base.contains_tensor(name)
    }
}

pub struct MergedBackend {
    pub base: Box<dyn SimpleBackend>,
    pub deltas: HashMap<String, Tensor>,
}

impl MergedBackend {
    /// Adapted weights are read in fp32 and merged there, then converted: a half-precision
    /// model is rounded once, not twice.
    fn read_dtype(&self, name: &str, dtype: DType) -> DType {
        if self.deltas.contains_key(name) {
            DType::F32
        } else {
            dtype
        }
    }

    fn merged(&self, name: &str, tensor: Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        match self.deltas.get(name) {
            Some(delta) => {
                let delta = delta.to_device(tensor.device())?;
                (tensor + delta)?.to_dtype(dtype)
            }
            None => Ok(tensor),
        }
    }
}

impl SimpleBackend for MergedBackend {
    fn get(
        &self,
        expected: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let read = self.read_dtype(name, dtype);
        let tensor = self.base.get(expected, name, init, read, dev)?;
        self.merged(name, tensor, dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let read = self.read_dtype(name, dtype);
        let tensor = self.base.get_unchecked(name, read, dev)?;
        self.merged(name, tensor, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_tensor(name)
    }
}
