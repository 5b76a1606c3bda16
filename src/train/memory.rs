//! What a training run will hold in memory, worked out from the recipe and the model's shape
//! before anything is loaded: printed by `kiln recipe check` and at the start of `kiln train`,
//! and recorded in `run.json` beside what the run then measured.
//!
//! The terms follow what the step keeps alive at its peak (the end of a micro-batch's backward):
//! the weights as held (fp32 masters, or LoRA's frozen base in the compute dtype plus the
//! adapter), each worker's fp32 gradient and the running sum, AdamW's two moments, the autograd
//! graph's activations for the rows being trained at once, and the largest temporary of one
//! product. Activations are counted per layer from the tensors the backward reads.

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::model::{lora, quantized, Config};
use crate::ops;
use crate::ops::quant;
use crate::recipe::Recipe;

/// Bytes, by what holds them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryEstimate {
    /// The model as the run holds it (and the compute-dtype working copy where one is made).
    pub weights: u64,
    /// Each worker's gradient, one of which takes the sum (fp32, trained parameters only).
    pub gradients: u64,
    /// AdamW's first and second moments (fp32, trained parameters only).
    pub optimizer: u64,
    /// The autograd graph of the rows trained at once, per replica.
    pub activations: u64,
    /// The same with activation checkpointing (block inputs, plus one block's graph).
    pub activations_checkpointed: u64,
    /// The largest temporary of one product (a widened half-precision matrix, a gradient).
    pub workspace: u64,
    /// The process itself: code, tokenizer, data and allocator slack.
    pub runtime: u64,
    /// A preference objective's reference model: a frozen copy of the starting weights in the
    /// compute dtype (full fine-tune DPO); nothing with LoRA (the base with the adapter off),
    /// with precomputed log-probabilities, or without a reference (SimPO).
    #[serde(default)]
    pub reference: u64,
    /// Replicas train in one process, each with its own activations.
    pub replicas: usize,
    /// Trained parameters (all of them, or the adapter's).
    pub trained_parameters: u64,
    pub total_parameters: u64,
}

/// What the process needs besides the model: code, the tokenizer, the tokenized data, thread
/// stacks (measured: tiny-preset runs peak at 37 MiB with LoRA and 48 MiB fully fine-tuned,
/// of which the model accounts for 9 and 20).
const RUNTIME_BYTES: u64 = 28 << 20;

impl MemoryEstimate {
    /// The estimate for `recipe` training `config` on its `device` (a GPU need not be present)
    /// with `threads` CPU threads.
    pub fn new(recipe: &Recipe, config: &Config, threads: usize) -> Self {
        let on_cpu = recipe.device.trim() == "cpu";
        let shapes = config.parameter_shapes();
        let count = |shape: &[usize]| shape.iter().product::<usize>() as u64;
        let total_parameters: u64 = shapes.iter().map(|(_, s)| count(s)).sum();
        let compute = recipe.precision.compute.dtype();
        let (weight_dtype, _) = ops::weight_dtype_and_operands_on(on_cpu, compute);
        let half = compute != DType::F32;

        let quantization = recipe.model.quantization();
        let quantized = quantized::quantized_weights(config);
        // The fused CPU kernels dequantise a quantised matrix a slab at a time; elsewhere (a
        // GPU, fp16 on the CPU) each is dequantised whole into the compute dtype, and the
        // autograd graph keeps it until the backward.
        let fused = on_cpu && weight_dtype == DType::F32;
        let adapter: u64 = match &recipe.lora {
            None => 0,
            Some(spec) => lora::select_layers(config, &spec.targets(config))
                .map(|layers| {
                    (layers.iter())
                        .map(|l| (spec.r * (l.in_dim + l.out_dim)) as u64)
                        .sum()
                })
                .unwrap_or(0),
        };
        let (mut weights, mut trained) = (adapter * 4, adapter);
        let (mut widest_half, mut widest_quantized, mut dequantized_total) = (0u64, 0u64, 0u64);
        for (name, shape) in &shapes {
            let n = count(shape);
            if recipe.lora.is_none() && recipe.train.trains(name) {
                // An fp32 master, plus the compute-dtype copy each step makes where it differs.
                trained += n;
                weights += n * 4;
                if weight_dtype != DType::F32 {
                    weights += n * weight_dtype.size_in_bytes() as u64;
                }
            } else if let Some(q) = quantization.filter(|_| quantized.contains_key(name)) {
                weights += q.bytes(shape[0], shape[1]);
                widest_quantized = widest_quantized.max(n);
                dequantized_total += n * compute.size_in_bytes() as u64;
            } else if shape.len() == 2 {
                weights += n * compute.size_in_bytes() as u64;
                widest_half = widest_half.max(n);
            } else {
                weights += n * weight_dtype.size_in_bytes() as u64;
            }
        }
        // The CPU widens a half matrix for each product: fp32, and once more rounded.
        let widened = if half && on_cpu {
            2 * 4 * widest_half
        } else {
            0
        };
        let dequantized = match (quantization.is_some(), fused) {
            (false, _) => 0,
            (true, true) => quant::SLAB_BYTES as u64,
            // fp32 codes and products on the way, then the compute-dtype matrix.
            (true, false) => widest_quantized * (3 * 4 + compute.size_in_bytes() as u64),
        };
        let widest_frozen = widened.max(dequantized);
        // What the graph keeps of each block's dequantised matrices off the fused kernels.
        let kept_per_block = match fused {
            true => 0,
            false => dequantized_total / config.n_layer().max(1) as u64,
        };
        let gradient_bytes = trained * 4;
        let workers =
            ops::workers_per_replica_on(on_cpu, threads.max(1), gradient_bytes as usize) as u64;
        let replicas = recipe.batch.replicas.max(1) as u64;
        // The sum accumulates into the first shard's gradient.
        let gradients = gradient_bytes * workers * replicas;
        let optimizer = trained * 8;

        // A preference pair is two sequences, trained at once.
        let sequences_per_row = if recipe.objective.is_preference() {
            2
        } else {
            1
        };
        let rows = (recipe.batch.micro * sequences_per_row) as u64;
        let seq = recipe.data.seq_len as u64;
        let (per_layer, block_input) = activation_bytes(config, rows, seq, weight_dtype);
        let layers = config.n_layer() as u64;
        let head = head_bytes(config, rows, seq);
        let per_layer = per_layer + kept_per_block;
        let activations = (per_layer * layers + head) * replicas;
        let activations_checkpointed = (block_input * layers + per_layer + head) * replicas;

        let largest = shapes.iter().map(|(_, s)| count(s)).max().unwrap_or(0);
        let workspace = widest_frozen.max(if recipe.lora.is_none() {
            largest * 4
        } else {
            0
        });
        Self {
            weights,
            gradients,
            optimizer,
            activations,
            activations_checkpointed,
            workspace,
            runtime: RUNTIME_BYTES,
            reference: reference_bytes(recipe, total_parameters, weight_dtype),
            replicas: replicas as usize,
            trained_parameters: trained,
            total_parameters,
        }
    }

    /// One rank's share of a job of `ranks` processes: its own replicas' gradients and
    /// activations, and with ZeRO-1 (`shard_optimizer`) 1/N of the moments.
    pub fn per_rank(mut self, ranks: usize, shard_optimizer: bool) -> Self {
        let ranks = ranks.max(1);
        if ranks == 1 {
            return self;
        }
        let local = (self.replicas / ranks).max(1);
        let share = |bytes: u64| bytes / self.replicas.max(1) as u64 * local as u64;
        self.gradients = share(self.gradients);
        self.activations = share(self.activations);
        self.activations_checkpointed = share(self.activations_checkpointed);
        if shard_optimizer {
            self.optimizer /= ranks as u64;
        }
        self.replicas = local;
        self
    }

    /// The peak of a run without activation checkpointing.
    pub fn total(&self) -> u64 {
        self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.workspace
            + self.runtime
            + self.reference
    }

    /// The peak with activation checkpointing.
    pub fn total_checkpointed(&self) -> u64 {
        self.total() - self.activations + self.activations_checkpointed
    }

    /// The terms by name, bytes, with both totals (what `run.json` records).
    pub fn terms(&self) -> std::collections::BTreeMap<String, u64> {
        [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer", self.optimizer),
            ("activations", self.activations),
            ("activations_checkpointed", self.activations_checkpointed),
            ("workspace", self.workspace),
            ("runtime", self.runtime),
            ("reference", self.reference),
            ("total", self.total()),
            ("total_checkpointed", self.total_checkpointed()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// One line per term, for `kiln recipe check` and the start of a run.
    pub fn table(&self) -> String {
        let gib = |b: u64| format!("{:>10}", human_bytes(b));
        let replicas = self.replicas;
        let mut lines = vec![
            format!(
                "memory estimate ({} of {} parameters trained):",
                human_count(self.trained_parameters),
                human_count(self.total_parameters)
            ),
            format!("  weights      {}", gib(self.weights)),
            format!("  gradients    {}", gib(self.gradients)),
            format!("  optimizer    {}", gib(self.optimizer)),
            format!(
                "  activations  {}   ({} with activation checkpointing)",
                gib(self.activations),
                gib(self.activations_checkpointed).trim()
            ),
            format!("  workspace    {}", gib(self.workspace)),
            format!("  runtime      {}", gib(self.runtime)),
        ];
        if self.reference > 0 {
            lines.push(format!(
                "  reference    {}   (a frozen copy of the starting weights)",
                gib(self.reference)
            ));
        }
        lines.extend([format!(
            "  total        {}   ({} with activation checkpointing)",
            gib(self.total()),
            gib(self.total_checkpointed()).trim()
        )]);
        let per_replica = self.activations / replicas.max(1) as u64;
        lines.push(format!(
            "  (one device; {replicas} replica{} sharing the weights, each with {} of activations)",
            if replicas == 1 { "" } else { "s" },
            human_bytes(per_replica)
        ));
        lines.join("\n")
    }
}

/// The reference model a preference objective holds through training (see
/// [`MemoryEstimate::reference`]).
fn reference_bytes(recipe: &Recipe, parameters: u64, weight_dtype: DType) -> u64 {
    let objective = &recipe.objective;
    match objective.needs_reference()
        && recipe.lora.is_none()
        && !objective.precompute_ref_log_probs
    {
        true => parameters * weight_dtype.size_in_bytes() as u64,
        false => 0,
    }
}

/// Bytes the backward reads of one layer for `rows × seq` tokens, and of a block's input alone.
fn activation_bytes(config: &Config, rows: u64, seq: u64, dtype: DType) -> (u64, u64) {
    let tokens = rows * seq;
    let width = config.hidden_size() as u64;
    let heads = config.n_head() as u64;
    let inner = inner_size(config);
    let element = dtype.size_in_bytes() as u64;
    // Per token: the LayerNorm outputs, q/k/v and their rotated or split forms, the attention
    // output and its projection, the MLP's up-projection before and after the activation, the
    // residual sums; per query, the attention probabilities over the keys.
    let per_token = 12 * width + 2 * inner;
    let attention = rows * heads * seq * seq;
    (
        (tokens * per_token + attention) * element,
        tokens * width * element,
    )
}

/// The fused loss head's fp32 hidden-state gradient and its chunk of logits.
fn head_bytes(config: &Config, rows: u64, seq: u64) -> u64 {
    let vocab = config.vocab_size() as u64;
    let chunk = (rows * seq).min(ops::LOSS_CHUNK_ROWS as u64);
    (rows * seq * config.hidden_size() as u64 + chunk * vocab) * 4
}

/// The widest activation a block makes: its MLP's inner width (its widest linear layer).
fn inner_size(config: &Config) -> u64 {
    lora::linear_layers(config)
        .iter()
        .map(|layer| layer.in_dim.max(layer.out_dim) as u64)
        .max()
        .unwrap_or(4 * config.hidden_size() as u64)
}

fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

fn human_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} k", n as f64 / 1e3),
        n => n.to_string(),
    }
}
