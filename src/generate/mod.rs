//! Text generation with a KV cache, batched, with Hugging Face `generate` semantics.
//!
//! Prompts of different lengths are left-padded into one batch: every row keeps its own
//! positions (0 at its first real token) and its padding is masked out of attention, so a row
//! generates exactly what it would generate alone. Rows that finish leave the batch, so the
//! remaining decode steps do not pay for them.

use anyhow::{bail, ensure, Result};
use candle_core::Tensor;
use rand::distributions::Distribution;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::model::{Batch, KvCache, Model};
use crate::tokenizer::TextTokenizer;

/// Decoding parameters, named and defaulted as in HF's `GenerationConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    /// HF's `max_length`: prompt + new tokens; the tighter of this and `max_new_tokens` wins.
    pub max_length: Option<usize>,
    /// HF's `min_length` (counted over prompt + new tokens): eos is suppressed before it.
    pub min_length: usize,
    pub min_new_tokens: usize,
    pub do_sample: bool,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub repetition_penalty: f64,
    /// Sampling seed; row i of a call samples from its own RNG seeded with (seed, i).
    pub seed: u64,
    /// Generation stops when the decoded completion contains one of these (it is cut off).
    pub stop: Vec<String>,
    /// Prompts longer than the model's context keep their last tokens instead of failing.
    pub truncate_left: bool,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            max_length: None,
            min_length: 0,
            min_new_tokens: 0,
            do_sample: false,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 0,
            stop: Vec::new(),
            truncate_left: false,
        }
    }
}

impl GenerationParams {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.temperature >= 0.0 && self.temperature.is_finite(),
            "temperature must be >= 0 (0 means greedy), got {}",
            self.temperature
        );
        if let Some(p) = self.top_p {
            ensure!(p > 0.0 && p <= 1.0, "top_p must be in (0, 1], got {p}");
        }
        ensure!(
            self.top_k != Some(0),
            "top_k must be at least 1 (leave it unset to disable)"
        );
        ensure!(
            self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite(),
            "repetition_penalty must be > 0, got {}",
            self.repetition_penalty
        );
        ensure!(
            self.stop.iter().all(|s| !s.is_empty()),
            "stop strings must not be empty"
        );
        Ok(())
    }

    fn samples(&self) -> bool {
        self.do_sample && self.temperature > 0.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model produced eos (included in `ids`).
    Eos,
    /// A stop string appeared (cut from `text`).
    Stop,
    /// max_new_tokens, max_length or the model's context was reached.
    Length,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generated {
    /// The prompt as the model saw it (after any left truncation).
    pub prompt_ids: Vec<u32>,
    /// New tokens only.
    pub ids: Vec<u32>,
    /// Decoded new tokens (special tokens skipped, stop string removed); empty without a tokenizer.
    pub text: String,
    pub finish_reason: FinishReason,
}

/// Where each unfinished row stands.
struct Row {
    index: usize,
    prompt: Vec<u32>,
    new: Vec<u32>,
    budget: usize,
    rng: rand::rngs::StdRng,
}

/// Generates a continuation for every prompt. `on_token(row, token)` sees each new token as it
/// is produced (for streaming).
pub fn generate(
    model: &Model,
    tokenizer: Option<&TextTokenizer>,
    prompts: &[Vec<u32>],
    params: &GenerationParams,
    on_token: &mut dyn FnMut(usize, u32),
) -> Result<Vec<Generated>> {
    params.validate()?;
    let config = model.config();
    let n_positions = config.max_positions();
    let eos = config.eos_token_id().or(tokenizer.map(|t| t.eos_id()));
    ensure!(
        params.stop.is_empty() || tokenizer.is_some(),
        "stop strings need a tokenizer to decode with"
    );
    let mut rows = Vec::with_capacity(prompts.len());
    for (index, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            bail!("prompt {index} is empty: there is nothing to continue from");
        }
        if let Some(bad) = prompt
            .iter()
            .find(|&&id| id as usize >= config.vocab_size())
        {
            bail!(
                "prompt {index}: token id {bad} is outside the vocabulary ({})",
                config.vocab_size()
            );
        }
        let mut prompt = prompt.clone();
        if prompt.len() > n_positions {
            if !params.truncate_left {
                bail!(
                    "prompt {index} has {} tokens, more than the model's context (n_positions {n_positions}); \
                     shorten it or allow left truncation",
                    prompt.len()
                );
            }
            let keep = n_positions.saturating_sub(params.max_new_tokens).max(1);
            prompt.drain(..prompt.len() - keep);
        }
        let mut budget = params.max_new_tokens.min(n_positions - prompt.len());
        if let Some(max_length) = params.max_length {
            budget = budget.min(max_length.saturating_sub(prompt.len()));
        }
        let seed = params.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        rows.push(Row {
            index,
            prompt,
            new: Vec::new(),
            budget,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        });
    }
    let mut results: Vec<Option<Generated>> = vec![None; prompts.len()];
    let mut finish = |row: Row, reason: FinishReason, text: String| {
        results[row.index] = Some(Generated {
            prompt_ids: row.prompt,
            ids: row.new,
            text,
            finish_reason: reason,
        });
    };
    let (mut active, done): (Vec<Row>, Vec<Row>) = rows.into_iter().partition(|r| r.budget > 0);
    for row in done {
        finish(row, FinishReason::Length, String::new());
    }
    if active.is_empty() {
        return Ok(results.into_iter().map(|r| r.expect("finished")).collect());
    }

    let device = model.device();
    let longest_budget = active.iter().map(|r| r.budget).max().unwrap_or(0);
    let mut cache = KvCache::with_capacity(
        config.n_layer(),
        active.iter().map(|r| r.prompt.len()).max().unwrap_or(0) + longest_budget,
    );
    let longest = active.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
    let prompts: Vec<Vec<u32>> = active.iter().map(|r| r.prompt.clone()).collect();
    let pad = config.eos_token_id().unwrap_or(0);
    let prefill = Batch::left_padded(&prompts, pad, config.prefix_lm(), device)?;
    let mut key_mask = prefill
        .key_mask
        .clone()
        .expect("left-padded rows carry a key mask");
    let n = active.len();
    crate::model::keep_freed_memory();
    let mut logits = forward_on_pool(model, &prefill, &vec![longest - 1; n], &mut cache)?;

    loop {
        let mut next = Vec::with_capacity(active.len());
        for (i, row) in active.iter_mut().enumerate() {
            let row_logits = logits.get(i)?;
            next.push(choose_token(&row_logits, row, params, eos)?);
        }
        // Decide, row by row, whether it carries on.
        let mut keep = Vec::with_capacity(active.len());
        let mut still_active = Vec::with_capacity(active.len());
        for (i, (mut row, token)) in active.into_iter().zip(next).enumerate() {
            row.new.push(token);
            on_token(row.index, token);
            // Decoding every step is only needed to look for stop strings; otherwise a row's
            // text is decoded once, when it finishes.
            let text = match tokenizer {
                Some(t) if !params.stop.is_empty() => Some(t.decode(&row.new, true)?),
                _ => None,
            };
            let final_text = |row: &Row, text: Option<String>| -> Result<String> {
                match (text, tokenizer) {
                    (Some(text), _) => Ok(text),
                    (None, Some(t)) => t.decode(&row.new, true),
                    (None, None) => Ok(String::new()),
                }
            };
            let stop_at = text.as_deref().and_then(|t| first_stop(t, &params.stop));
            if Some(token) == eos {
                let text = final_text(&row, text)?;
                finish(row, FinishReason::Eos, text);
            } else if let (Some(cut), Some(text)) = (stop_at, &text) {
                let text = text[..cut].to_string();
                finish(row, FinishReason::Stop, text);
            } else if row.new.len() >= row.budget {
                let text = final_text(&row, text)?;
                finish(row, FinishReason::Length, text);
            } else {
                keep.push(i as u32);
                still_active.push(row);
            }
        }
        if still_active.is_empty() {
            break;
        }
        if keep.len() < key_mask.len() {
            let rows = Tensor::new(keep.as_slice(), device)?;
            cache.select_rows(&rows)?;
            key_mask = keep.iter().map(|&i| key_mask[i as usize].clone()).collect();
        }
        active = still_active;
        for mask in key_mask.iter_mut() {
            mask.push(1);
        }
        let n = active.len();
        let step = Batch {
            input_ids: Tensor::from_vec(
                active
                    .iter()
                    .map(|r| *r.new.last().expect("a token"))
                    .collect::<Vec<u32>>(),
                (n, 1),
                device,
            )?,
            position_ids: Tensor::from_vec(
                active
                    .iter()
                    .map(|r| (r.prompt.len() + r.new.len() - 1) as u32)
                    .collect::<Vec<u32>>(),
                (n, 1),
                device,
            )?,
            key_mask: Some(key_mask.clone()),
            layout: None,
            dropout: None,
        };
        logits = forward_on_pool(model, &step, &vec![0; n], &mut cache)?;
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every row finished"))
        .collect())
}

/// One forward pass run on a rayon worker: the dozens of small parallel operations of a decode
/// step then start from inside the pool instead of each waking it from outside, which at batch
/// 16 on the `small` preset made a step about a fifth slower.
fn forward_on_pool(
    model: &Model,
    batch: &Batch,
    last_index: &[usize],
    cache: &mut KvCache,
) -> Result<Tensor> {
    rayon::scope(|_| model.forward_last(batch, last_index, Some(cache))).map_err(Into::into)
}

fn first_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

/// HF's logits processors then warpers: repetition penalty, min-length eos suppression, then
/// (sampling only) temperature, top-k, top-p.
fn choose_token(
    logits: &Tensor,
    row: &mut Row,
    params: &GenerationParams,
    eos: Option<u32>,
) -> Result<u32> {
    let mut scores = logits.to_vec1::<f32>()?;
    if params.repetition_penalty != 1.0 {
        let penalty = params.repetition_penalty as f32;
        let mut seen: Vec<u32> = row.prompt.iter().chain(&row.new).copied().collect();
        seen.sort_unstable();
        seen.dedup();
        for id in seen {
            let s = &mut scores[id as usize];
            *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
        }
    }
    if let Some(eos) = eos {
        let total = row.prompt.len() + row.new.len();
        if total < params.min_length || row.new.len() < params.min_new_tokens {
            scores[eos as usize] = f32::NEG_INFINITY;
        }
    }
    if !params.samples() {
        return Ok(argmax(&scores));
    }
    let temperature = params.temperature as f32;
    for s in scores.iter_mut() {
        *s /= temperature;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    if let Some(k) = params.top_k {
        order.truncate(k.max(1));
    }
    let max = scores[order[0]];
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((scores[i] - max) as f64).exp())
        .collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if let Some(top_p) = params.top_p {
        // Keep the smallest prefix of the sorted tokens whose mass reaches top_p (at least one).
        let mut mass = 0.0;
        let mut keep = 0;
        for p in &probs {
            keep += 1;
            mass += p;
            if mass >= top_p {
                break;
            }
        }
        order.truncate(keep);
        probs.truncate(keep);
    }
    let dist = rand::distributions::WeightedIndex::new(&probs)?;
    Ok(order[dist.sample(&mut row.rng)] as u32)
}

fn argmax(scores: &[f32]) -> u32 {
    // Ties go to the lowest id, as torch.argmax does.
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best as u32
}
