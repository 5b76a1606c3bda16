//! Text generation with a KV cache, batched, with Hugging Face `generate` semantics.
//!
//! Prompts of different lengths are left-padded into one batch: every row keeps its own
//! positions (0 at its first real token) and its padding is masked out of attention, so a row
//! generates exactly what it would generate alone. Rows that finish leave the batch, so the
//! remaining decode steps do not pay for them.

use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use rand::distributions::Distribution;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::model::{Batch, Config, KvCache, Model};
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
    /// Tokens that end generation as eos does (a chat template's end-of-turn token; vLLM's
    /// `stop_token_ids`), kept in `ids` as eos is.
    pub stop_token_ids: Vec<u32>,
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
            stop_token_ids: Vec::new(),
            truncate_left: false,
        }
    }
}

/// Below this temperature sampling is numerically greedy, and it decodes greedily (as vLLM does):
/// dividing logits by a vanishing temperature would only turn them into infinities.
pub const GREEDY_BELOW_TEMPERATURE: f64 = 1e-5;

/// Repetition penalties outside this range would push logits past what f32 can hold.
pub const REPETITION_PENALTY_RANGE: (f64, f64) = (1e-6, 1e6);

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
        let (low, high) = REPETITION_PENALTY_RANGE;
        ensure!(
            (low..=high).contains(&self.repetition_penalty),
            "repetition_penalty must be in [{low:e}, {high:e}] (1 is no penalty), got {:e}",
            self.repetition_penalty
        );
        ensure!(
            self.stop.iter().all(|s| !s.is_empty()),
            "stop strings must not be empty"
        );
        Ok(())
    }

    fn samples(&self) -> bool {
        self.do_sample && self.temperature >= GREEDY_BELOW_TEMPERATURE
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model produced eos or a stop token (included in `ids`).
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

/// One prompt being continued: what it was asked and what it has produced so far.
pub struct Sequence {
    prompt: Vec<u32>,
    new: Vec<u32>,
    budget: usize,
    rng: rand::rngs::StdRng,
    params: Arc<GenerationParams>,
}

impl Sequence {
    /// Checks `prompt` against the model (and truncates it on the left when `params` allow) and
    /// sizes its budget. `index` is its place in its request: row i of a request samples from
    /// its own RNG seeded with (seed, i), whatever else is decoded beside it.
    pub fn new(
        config: &Config,
        prompt: &[u32],
        index: usize,
        params: Arc<GenerationParams>,
    ) -> Result<Self> {
        let n_positions = config.max_positions();
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
        let mut prompt = prompt.to_vec();
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
        Ok(Self {
            prompt,
            new: Vec::new(),
            budget,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            params,
        })
    }

    /// The prompt as the model sees it (after any left truncation).
    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// Positions this sequence can take at most: prompt plus new tokens.
    pub fn max_positions(&self) -> usize {
        self.prompt.len() + self.budget
    }

    fn into_generated(self, finish_reason: FinishReason, text: String) -> Generated {
        Generated {
            prompt_ids: self.prompt,
            ids: self.new,
            text,
            finish_reason,
        }
    }
}

/// Sequences decoding together, one forward pass a token for all of them. Sequences join at
/// token boundaries (their prompts are read in one pass, then their cache rows are left-padded
/// to the batch's) and leave when they finish, so a row's tokens do not depend on what else is
/// in the batch: `generate` is one join and a loop, and `kiln serve` joins requests as they
/// come. `T` tags a row for the caller.
pub struct DecodeBatch<'m, T> {
    model: &'m Model,
    tokenizer: Option<&'m TextTokenizer>,
    eos: Option<u32>,
    rows: Vec<(T, Sequence)>,
    cache: KvCache,
    /// Per row, 1 for each cached position that is a real token, 0 for padding.
    key_mask: Vec<Vec<u8>>,
    /// Each row's next-token logits, `[rows, vocab]`; `None` when the batch is empty.
    logits: Option<Tensor>,
}

impl<'m, T> DecodeBatch<'m, T> {
    pub fn new(model: &'m Model, tokenizer: Option<&'m TextTokenizer>) -> Self {
        let config = model.config();
        Self {
            model,
            tokenizer,
            eos: config.eos_token_id().or(tokenizer.map(|t| t.eos_id())),
            rows: Vec::new(),
            cache: KvCache::new(config.n_layer()),
            key_mask: Vec::new(),
            logits: None,
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn rows(&self) -> impl Iterator<Item = &T> {
        self.rows.iter().map(|(tag, _)| tag)
    }

    /// The positions the batch's rows can take at most, together (prompts plus budgets).
    pub fn reserved_positions(&self) -> usize {
        self.rows.iter().map(|(_, s)| s.max_positions()).sum()
    }

    /// Reads the prompts of `sequences` in one forward pass and adds them to the batch. Those
    /// with no room for a single new token finish at once and are returned. An error in the
    /// prompts' forward pass leaves the batch as it was: it belongs to the joining rows only.
    pub fn join(&mut self, sequences: Vec<(T, Sequence)>) -> Result<Vec<(T, Generated)>> {
        ensure!(
            sequences
                .iter()
                .all(|(_, s)| s.params.stop.is_empty() || self.tokenizer.is_some()),
            "stop strings need a tokenizer to decode with"
        );
        let (joining, done): (Vec<_>, Vec<_>) =
            sequences.into_iter().partition(|(_, s)| s.budget > 0);
        let finished = done
            .into_iter()
            .map(|(tag, s)| (tag, s.into_generated(FinishReason::Length, String::new())))
            .collect();
        if joining.is_empty() {
            return Ok(finished);
        }
        let config = self.model.config();
        let device = self.model.device();
        let longest = joining
            .iter()
            .map(|(_, s)| s.prompt.len())
            .max()
            .unwrap_or(0);
        let room = joining
            .iter()
            .map(|(_, s)| s.max_positions())
            .max()
            .unwrap_or(0);
        let mut cache = KvCache::with_capacity(config.n_layer(), room);
        let prompts: Vec<Vec<u32>> = joining.iter().map(|(_, s)| s.prompt.clone()).collect();
        let pad = config.eos_token_id().unwrap_or(0);
        let prefill = Batch::left_padded(&prompts, pad, config.prefix_lm(), device)?;
        let key_mask = prefill
            .key_mask
            .clone()
            .expect("left-padded rows carry a key mask");
        let logits = forward_on_pool(
            self.model,
            &prefill,
            &vec![longest - 1; joining.len()],
            &mut cache,
        )?;
        match self.logits.take() {
            None => {
                self.cache = cache;
                self.key_mask = key_mask;
                self.logits = Some(logits);
            }
            Some(running) => {
                let len = self.cache.len().max(cache.len());
                let merged = Tensor::cat(&[&running, &logits], 0);
                self.logits = Some(running);
                let merged = merged?;
                self.cache.append_rows(&cache)?;
                let left_pad = |mask: Vec<u8>| -> Vec<u8> {
                    let mut padded = vec![0; len - mask.len()];
                    padded.extend(mask);
                    padded
                };
                self.key_mask = std::mem::take(&mut self.key_mask)
                    .into_iter()
                    .chain(key_mask)
                    .map(left_pad)
                    .collect();
                self.logits = Some(merged);
            }
        }
        self.rows.extend(joining);
        Ok(finished)
    }

    /// Chooses every row's next token (`on_token` sees each), retires the rows that finished
    /// (returned, with the error of a row whose token could not be chosen: it fails alone), and
    /// runs the forward pass that gives the others their next logits. An `Err` is that forward
    /// pass failing, which belongs to every row: the batch is then empty.
    pub fn advance(
        &mut self,
        on_token: &mut dyn FnMut(&T, u32),
    ) -> Result<Vec<(T, Result<Generated>)>> {
        let Some(logits) = self.logits.take() else {
            return Ok(Vec::new());
        };
        let tokenizer = self.tokenizer;
        let mut keep = Vec::with_capacity(self.rows.len());
        let mut finished = Vec::new();
        let mut still_active = Vec::with_capacity(self.rows.len());
        for (i, (tag, mut row)) in std::mem::take(&mut self.rows).into_iter().enumerate() {
            let token = match logits
                .get(i)
                .map_err(anyhow::Error::from)
                .and_then(|row_logits| choose_token(&row_logits, &mut row, self.eos))
            {
                Ok(token) => token,
                Err(e) => {
                    finished.push((tag, Err(e)));
                    continue;
                }
            };
            row.new.push(token);
            on_token(&tag, token);
            let stops = &row.params.stop;
            // Decoding every step is only needed to look for stop strings; otherwise a row's
            // text is decoded once, when it finishes.
            let text = match tokenizer {
                Some(t) if !stops.is_empty() => match t.decode(&row.new, true) {
                    Ok(text) => Some(text),
                    Err(e) => {
                        finished.push((tag, Err(e)));
                        continue;
                    }
                },
                _ => None,
            };
            let final_text = |row: &Sequence, text: Option<String>| -> Result<String> {
                match (text, tokenizer) {
                    (Some(text), _) => Ok(text),
                    (None, Some(t)) => t.decode(&row.new, true),
                    (None, None) => Ok(String::new()),
                }
            };
            let stop_at = text.as_deref().and_then(|t| first_stop(t, stops));
            if Some(token) == self.eos || row.params.stop_token_ids.contains(&token) {
                let generated =
                    final_text(&row, text).map(|text| row.into_generated(FinishReason::Eos, text));
                finished.push((tag, generated));
            } else if let (Some(cut), Some(text)) = (stop_at, &text) {
                let text = text[..cut].to_string();
                finished.push((tag, Ok(row.into_generated(FinishReason::Stop, text))));
            } else if row.new.len() >= row.budget {
                let generated = final_text(&row, text)
                    .map(|text| row.into_generated(FinishReason::Length, text));
                finished.push((tag, generated));
            } else {
                keep.push(i);
                still_active.push((tag, row));
            }
        }
        self.rows = still_active;
        if let Err(e) = self.keep_rows(&keep) {
            self.clear();
            return Err(e);
        }
        if self.rows.is_empty() {
            return Ok(finished);
        }
        for mask in self.key_mask.iter_mut() {
            mask.push(1);
        }
        let device = self.model.device();
        let n = self.rows.len();
        let step = Batch {
            input_ids: Tensor::from_vec(
                self.rows
                    .iter()
                    .map(|(_, r)| *r.new.last().expect("a token"))
                    .collect::<Vec<u32>>(),
                (n, 1),
                device,
            )?,
            position_ids: Tensor::from_vec(
                self.rows
                    .iter()
                    .map(|(_, r)| (r.prompt.len() + r.new.len() - 1) as u32)
                    .collect::<Vec<u32>>(),
                (n, 1),
                device,
            )?,
            key_mask: Some(self.key_mask.clone()),
            layout: None,
            dropout: None,
            adapters_off: false,
        };
        match forward_on_pool(self.model, &step, &vec![0; n], &mut self.cache) {
            Ok(logits) => self.logits = Some(logits),
            Err(e) => {
                self.clear();
                return Err(e);
            }
        }
        Ok(finished)
    }

    /// Drops every row (after a failure that leaves the cache in no state to continue from).
    pub fn clear(&mut self) {
        self.rows.clear();
        self.cache = KvCache::new(self.model.config().n_layer());
        self.key_mask.clear();
        self.logits = None;
    }

    /// Takes the rows `leave` picks out of the batch (a cancelled request, one past its
    /// deadline) and returns them with what they had produced.
    pub fn remove(&mut self, leave: impl Fn(&T) -> bool) -> Result<Vec<(T, Vec<u32>)>> {
        let mut keep = Vec::with_capacity(self.rows.len());
        let mut removed = Vec::new();
        let mut kept_rows = Vec::with_capacity(self.rows.len());
        for (i, (tag, row)) in std::mem::take(&mut self.rows).into_iter().enumerate() {
            if leave(&tag) {
                removed.push((tag, row.new));
            } else {
                keep.push(i);
                kept_rows.push((tag, row));
            }
        }
        self.rows = kept_rows;
        if !removed.is_empty() {
            if let Some(logits) = self.logits.take() {
                if !keep.is_empty() {
                    let index = index_tensor(&keep, self.model.device())?;
                    self.logits = Some(logits.index_select(&index, 0)?);
                }
            }
            self.keep_rows(&keep)?;
        }
        Ok(removed)
    }

    /// Keeps the cache rows and masks of `keep` (indexes into the rows as they were), and drops
    /// the leading positions that are padding in every remaining row.
    fn keep_rows(&mut self, keep: &[usize]) -> Result<()> {
        if keep.len() == self.key_mask.len() {
            return Ok(());
        }
        if keep.is_empty() {
            self.cache = KvCache::new(self.model.config().n_layer());
            self.key_mask.clear();
            self.logits = None;
            return Ok(());
        }
        self.cache
            .select_rows(&index_tensor(keep, self.model.device())?)?;
        let masks = std::mem::take(&mut self.key_mask);
        self.key_mask = keep.iter().map(|&i| masks[i].clone()).collect();
        let common_padding = self
            .key_mask
            .iter()
            .map(|m| m.iter().take_while(|&&k| k == 0).count())
            .min()
            .unwrap_or(0);
        if common_padding > 0 {
            self.cache.drop_front(common_padding)?;
            for mask in self.key_mask.iter_mut() {
                mask.drain(..common_padding);
            }
        }
        Ok(())
    }
}

fn index_tensor(rows: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    let rows: Vec<u32> = rows.iter().map(|&i| i as u32).collect();
    Ok(Tensor::new(rows.as_slice(), device)?)
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
    ensure!(
        params.stop.is_empty() || tokenizer.is_some(),
        "stop strings need a tokenizer to decode with"
    );
    let shared = Arc::new(params.clone());
    let sequences = prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| Ok((i, Sequence::new(model.config(), prompt, i, shared.clone())?)))
        .collect::<Result<Vec<_>>>()?;
    let mut results: Vec<Option<Generated>> = vec![None; prompts.len()];
    crate::process::keep_freed_memory();
    let mut batch = DecodeBatch::new(model, tokenizer);
    for (i, generated) in batch.join(sequences)? {
        results[i] = Some(generated);
    }
    while !batch.is_empty() {
        for (i, generated) in batch.advance(&mut |&i, token| on_token(i, token))? {
            results[i] = Some(generated.with_context(|| format!("prompt {i}"))?);
        }
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
fn choose_token(logits: &Tensor, row: &mut Sequence, eos: Option<u32>) -> Result<u32> {
    let params = row.params.clone();
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
    let total = row.prompt.len() + row.new.len();
    if total < params.min_length || row.new.len() < params.min_new_tokens {
        // Every token that would end the row, as HF suppresses each of its eos ids.
        for end in eos.iter().chain(&params.stop_token_ids) {
            if let Some(s) = scores.get_mut(*end as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
    if !params.samples() {
        let best = argmax(&scores);
        ensure!(
            !scores[best as usize].is_nan(),
            "the model's logits are NaN: cannot choose a token"
        );
        return Ok(best);
    }
    // In f64 and relative to the best logit, so that no temperature the parameters allow turns a
    // weight into an infinity or a NaN.
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    if let Some(k) = params.top_k {
        order.truncate(k.max(1));
    }
    let max = scores[order[0]] as f64;
    ensure!(
        max.is_finite(),
        "the model's best logit is {max}: cannot sample from it"
    );
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((scores[i] as f64 - max) / params.temperature).exp())
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
    let dist = rand::distributions::WeightedIndex::new(&probs)
        .map_err(|e| anyhow::anyhow!("cannot sample the next token: {e}"))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::{write_random_model, Preset};
    use candle_core::{DType, Device};

    fn tiny_model(dir: &std::path::Path) -> Model {
        let mut config = Preset::Tiny.config();
        config.set_vocab_size(300);
        config.set_eos_and_bos(299);
        write_random_model(dir, &config, 7, DType::F32, usize::MAX).unwrap();
        crate::model::load_model(dir, DType::F32, &Device::Cpu).unwrap()
    }

    /// A row whose token cannot be chosen fails alone: the row beside it decodes what it
    /// decodes by itself. (The parameters that cause it are refused by `validate` before any
    /// request reaches a batch; this is what happens to whatever error slips through.)
    #[test]
    fn a_row_that_cannot_choose_a_token_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path());
        let greedy = Arc::new(GenerationParams {
            max_new_tokens: 12,
            ..Default::default()
        });
        let broken = Arc::new(GenerationParams {
            do_sample: true,
            repetition_penalty: 1e-300,
            max_new_tokens: 12,
            ..Default::default()
        });
        assert!(broken.validate().is_err(), "validation refuses it first");
        let prompt = [5u32, 17, 42, 7];
        let alone = generate(&model, None, &[prompt.to_vec()], &greedy, &mut |_, _| {}).unwrap();

        let mut batch = DecodeBatch::new(&model, None);
        let rows = vec![
            (
                "greedy",
                Sequence::new(model.config(), &prompt, 0, greedy).unwrap(),
            ),
            (
                "broken",
                Sequence::new(model.config(), &[9, 8, 7], 0, broken).unwrap(),
            ),
        ];
        assert!(batch.join(rows).unwrap().is_empty());
        let mut outcomes = Vec::new();
        while !batch.is_empty() {
            outcomes.extend(batch.advance(&mut |_, _| {}).unwrap());
        }
        let (tag, error) = &outcomes[0];
        assert_eq!(*tag, "broken");
        let message = format!("{:#}", error.as_ref().unwrap_err());
        assert!(
            message.contains("the model's best logit is inf: cannot sample from it"),
            "{message}"
        );
        let (tag, generated) = &outcomes[1];
        assert_eq!(*tag, "greedy");
        assert_eq!(generated.as_ref().unwrap().ids, alone[0].ids);
        assert_eq!(outcomes.len(), 2);
    }

    #[test]
    fn parameters_that_cannot_give_a_distribution_are_refused_and_tiny_temperatures_are_greedy() {
        for (params, field) in [
            (
                GenerationParams {
                    repetition_penalty: 1e-300,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                GenerationParams {
                    repetition_penalty: 1e300,
                    ..Default::default()
                },
                "repetition_penalty",
            ),
            (
                GenerationParams {
                    temperature: f64::INFINITY,
                    ..Default::default()
                },
                "temperature",
            ),
        ] {
            let message = format!("{:#}", params.validate().unwrap_err());
            assert!(message.starts_with(field), "{message}");
        }
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path());
        let prompt = vec![vec![3u32, 1, 4, 1, 5]];
        let greedy = GenerationParams {
            max_new_tokens: 16,
            ..Default::default()
        };
        let cold = GenerationParams {
            do_sample: true,
            temperature: 1e-40,
            seed: 11,
            ..greedy.clone()
        };
        let expected = generate(&model, None, &prompt, &greedy, &mut |_, _| {}).unwrap();
        let got = generate(&model, None, &prompt, &cold, &mut |_, _| {}).unwrap();
        assert_eq!(got[0].ids, expected[0].ids);
        // Just above the greedy threshold, sampling works in f64 and stays finite.
        let barely = GenerationParams {
            temperature: GREEDY_BELOW_TEMPERATURE,
            ..cold
        };
        let got = generate(&model, None, &prompt, &barely, &mut |_, _| {}).unwrap();
        assert_eq!(got[0].ids.len(), 16);
    }
}
