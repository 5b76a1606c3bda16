//! `kiln score`: per-token log-probabilities of given texts under a model.
//!
//! Rows are batched by length to waste little on padding, but every row's numbers are computed
//! from its own positions only, so they do not depend on the batch size or on the other rows.

use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::model::{Batch, KvCache, Model};
use crate::ops::PrefixLayout;
use crate::tokenizer::TextTokenizer;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreInput {
    text: Option<String>,
    ids: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScoredRow {
    pub ids: Vec<u32>,
    /// `logprobs[i]` is log p(ids[i] | ids[..i]); the first token has no context, hence `None`.
    pub logprobs: Vec<Option<f32>>,
    pub total: f32,
    /// When asked for (OpenAI's `logprobs: N`): per position, the N most likely tokens and their
    /// log-probabilities, most likely first (ties: the lower id first); `None` where `logprobs`
    /// is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top_logprobs: Vec<Option<Vec<(u32, f32)>>>,
}

/// Reads `{"text": ...}` / `{"ids": [...]}` lines and tokenises them, with errors naming the line.
pub fn read_score_inputs(
    path: &Path,
    tokenizer: Option<&TextTokenizer>,
    vocab_size: usize,
    max_len: usize,
) -> Result<Vec<Vec<u32>>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("{}: cannot open the input", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line_no = i + 1;
        let line = line.with_context(|| format!("{}:{line_no}: cannot read", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let input: ScoreInput = serde_json::from_str(&line).with_context(|| {
            format!(
                "{}:{line_no}: expected {{\"text\": \"...\"}} or {{\"ids\": [...]}}",
                path.display()
            )
        })?;
        let ids = match (input.text, input.ids) {
            (Some(text), None) => {
                let tokenizer = tokenizer.with_context(|| {
                    format!(
                        "{}:{line_no}: a text row needs a tokenizer, and the model directory has none",
                        path.display()
                    )
                })?;
                tokenizer.encode(&text)?
            }
            (None, Some(ids)) => ids,
            _ => bail!(
                "{}:{line_no}: give exactly one of \"text\" and \"ids\"",
                path.display()
            ),
        };
        if ids.is_empty() {
            bail!("{}:{line_no}: the row has no tokens", path.display());
        }
        if ids.len() > max_len {
            bail!(
                "{}:{line_no}: the row has {} tokens, more than the model's n_positions ({max_len})",
                path.display(),
                ids.len()
            );
        }
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            bail!(
                "{}:{line_no}: token id {bad} is outside the model's vocabulary (vocab_size {vocab_size})",
                path.display()
            );
        }
        rows.push(ids);
    }
    Ok(rows)
}

/// Scores every row; the result is in input order. `prompt_lens` (one per row) are the leading
/// tokens a prefix-LM model reads both ways, as it was trained to; causal models ignore them.
pub fn score_rows(
    model: &Model,
    rows: &[Vec<u32>],
    prompt_lens: Option<&[usize]>,
    batch_size: usize,
) -> Result<Vec<ScoredRow>> {
    score_rows_with_top(model, rows, prompt_lens, batch_size, 0)
}

/// [`score_rows`], with the `top` most likely tokens at every position as well.
pub fn score_rows_with_top(
    model: &Model,
    rows: &[Vec<u32>],
    prompt_lens: Option<&[usize]>,
    batch_size: usize,
    top: usize,
) -> Result<Vec<ScoredRow>> {
    let batch_size = batch_size.max(1);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(rows[i].len()));
    let mut results: Vec<Option<ScoredRow>> = vec![None; rows.len()];
    let pad = model.config().eos_token_id().unwrap_or(0);
    for chunk in order.chunks(batch_size) {
        let batch_rows: Vec<Vec<u32>> = chunk.iter().map(|&i| rows[i].clone()).collect();
        let batch = match prompt_lens.filter(|_| model.config().prefix_lm()) {
            Some(lens) => {
                let layouts: Vec<PrefixLayout> = chunk
                    .iter()
                    .map(|&i| PrefixLayout {
                        segment: vec![0; rows[i].len()],
                        prefix: (0..rows[i].len()).map(|p| p < lens[i]).collect(),
                    })
                    .collect();
                Batch::prefix_lm(&batch_rows, &layouts, pad, model.device())?
            }
            None => Batch::right_padded(&batch_rows, pad, model.device())?,
        };
        let logits = model.forward(&batch, None)?;
        for (row_in_batch, &row_index) in chunk.iter().enumerate() {
            let ids = &rows[row_index];
            let row_logits = logits.get(row_in_batch)?.narrow(0, 0, ids.len())?;
            results[row_index] = Some(score_one(&row_logits, ids, top)?);
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.expect("every row scored"))
        .collect())
}

/// The log-likelihood of every candidate continuation after every prompt, `[prompt][candidate]`
/// (MNLI's rank mode, classification). The prompts are read once, by length so that batches
/// hold little padding, into a KV cache the candidates then share; the head and log-softmax
/// run only at the positions scored, not over every position of every row. A prompt too long
/// for the context with the longest candidate loses its oldest tokens. Work is split into
/// chunks of at most `batch_size` prompts whose temporaries stay within
/// [`DEFAULT_SCORE_BUDGET_BYTES`] (see [`ScorePlan`]).
pub fn score_continuations(
    model: &Model,
    prompts: &[Vec<u32>],
    candidates: &[Vec<u32>],
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut plan = ScorePlan::new(
        model,
        prompts.to_vec(),
        candidates.to_vec(),
        batch_size,
        DEFAULT_SCORE_BUDGET_BYTES,
    )?;
    while !plan.run_next_chunk(model)? {}
    Ok(plan.into_scores())
}

/// What one chunk of scoring may hold in temporaries (its KV cache, activations and logits).
pub const DEFAULT_SCORE_BUDGET_BYTES: usize = 256 << 20;

/// Some prompts (indexes) against a range of the candidates.
#[derive(Debug, Clone, PartialEq)]
struct ScoreChunk {
    prompts: Vec<usize>,
    candidates: std::ops::Range<usize>,
}

/// A [`score_continuations`] job cut into chunks that each fit a memory budget, run one at a time
/// so a caller (the server's scheduler) can interleave other work, check deadlines and stop
/// between them. Thousands of labels after a batch of prompts would otherwise ask for one
/// `[prompts × labels × tokens, vocab]` logits tensor at once.
pub struct ScorePlan {
    prompts: Vec<Vec<u32>>,
    candidates: Vec<Vec<u32>>,
    chunks: Vec<ScoreChunk>,
    done: usize,
    scores: Vec<Vec<f32>>,
}

impl ScorePlan {
    pub fn new(
        model: &Model,
        prompts: Vec<Vec<u32>>,
        candidates: Vec<Vec<u32>>,
        batch_size: usize,
        budget_bytes: usize,
    ) -> Result<Self> {
        let config = model.config();
        ensure!(
            !candidates.is_empty() && candidates.iter().all(|c| !c.is_empty()),
            "every candidate continuation needs at least one token"
        );
        let longest_candidate = candidates.iter().map(Vec::len).max().unwrap_or(0);
        let context = config.max_positions();
        ensure!(
            longest_candidate < context,
            "a candidate of {longest_candidate} tokens leaves no room for a prompt in the model's \
             context of {context}"
        );
        let keep = context - longest_candidate;
        let prompts: Vec<Vec<u32>> = prompts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                ensure!(
                    !p.is_empty(),
                    "prompt {i} is empty: there is nothing to score after"
                );
                Ok(p[p.len().saturating_sub(keep)..].to_vec())
            })
            .collect::<Result<_>>()?;
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
        let cost = ChunkCost::of(model);
        let mut chunks = Vec::new();
        for group in order.chunks(batch_size.max(1)) {
            let planner = Planner {
                cost: &cost,
                prompts: &prompts,
                candidates: &candidates,
                budget_bytes,
            };
            planner.plan(group, 0..candidates.len(), &mut chunks);
        }
        let scores = vec![vec![0.0; candidates.len()]; prompts.len()];
        Ok(Self {
            prompts,
            candidates,
            chunks,
            done: 0,
            scores,
        })
    }

    /// How many chunks the job has, and how many have run.
    pub fn progress(&self) -> (usize, usize) {
        (self.done, self.chunks.len())
    }

    /// Runs the next chunk; true once every chunk has run.
    pub fn run_next_chunk(&mut self, model: &Model) -> Result<bool> {
        if let Some(chunk) = self.chunks.get(self.done) {
            let rows: Vec<Vec<u32>> = chunk
                .prompts
                .iter()
                .map(|&i| self.prompts[i].clone())
                .collect();
            let candidates = &self.candidates[chunk.candidates.clone()];
            let scored = score_batch(model, &rows, candidates)?;
            for (&i, row_scores) in chunk.prompts.iter().zip(scored) {
                self.scores[i][chunk.candidates.clone()].copy_from_slice(&row_scores);
            }
            self.done += 1;
        }
        Ok(self.done == self.chunks.len())
    }

    /// `[prompt][candidate]` log-likelihoods, once every chunk has run.
    pub fn into_scores(self) -> Vec<Vec<f32>> {
        self.scores
    }
}

struct Planner<'a> {
    cost: &'a ChunkCost,
    prompts: &'a [Vec<u32>],
    candidates: &'a [Vec<u32>],
    budget_bytes: usize,
}

impl Planner<'_> {
    /// Chunks for `group` (prompt indexes, longest first) against `range` of the candidates: as
    /// many candidates a chunk as fit the budget; when not even one fits with the whole group,
    /// the group is halved. One prompt with one candidate always makes a chunk.
    fn plan(&self, group: &[usize], range: std::ops::Range<usize>, chunks: &mut Vec<ScoreChunk>) {
        let width = self.prompts[group[0]].len();
        let fits = |candidates: std::ops::Range<usize>| {
            self.cost
                .bytes(group.len(), width, &self.candidates[candidates])
                <= self.budget_bytes
        };
        let mut start = range.start;
        while start < range.end {
            if group.len() > 1 && !fits(start..start + 1) {
                let (first, second) = group.split_at(group.len() / 2);
                self.plan(first, start..range.end, chunks);
                self.plan(second, start..range.end, chunks);
                return;
            }
            let mut end = start + 1;
            while end < range.end && fits(start..end + 1) {
                end += 1;
            }
            chunks.push(ScoreChunk {
                prompts: group.to_vec(),
                candidates: start..end,
            });
            start = end;
        }
    }
}

/// The memory a scoring chunk's temporaries take, estimated from the model's shape: the KV
/// cache its rows share, the activations of the continuation pass, and the logits of the head
/// at the positions scored.
struct ChunkCost {
    kv_bytes_per_position: usize,
    activation_bytes_per_position: usize,
    attention_bytes_per_pair: usize,
    logits_bytes_per_position: usize,
}

impl ChunkCost {
    fn of(model: &Model) -> Self {
        let config = model.config();
        let hidden = config.hidden_size();
        // fp32 whatever the compute dtype: attention and the head work in fp32 on the CPU.
        let f32_bytes = 4;
        Self {
            kv_bytes_per_position: config.n_layer() * 2 * hidden * f32_bytes,
            // The residual stream, q/k/v, the 4x MLP and their temporaries.
            activation_bytes_per_position: 16 * hidden * f32_bytes,
            attention_bytes_per_pair: 2 * config.n_head() * f32_bytes,
            // The logits and the temporaries of their log-softmax (shifted, exponentials, and
            // the allocator's slack between chunks): 4x, calibrated on the tiny preset's 50,257
            // words, where 3x let a chunk grow 35% past its budget.
            logits_bytes_per_position: 4 * config.vocab_size() * f32_bytes,
        }
    }

    /// `prompts` prompts `width` tokens wide against `candidates`.
    fn bytes(&self, prompts: usize, width: usize, candidates: &[Vec<u32>]) -> usize {
        let steps = candidates.iter().map(Vec::len).max().unwrap_or(1) - 1;
        let scored: usize = candidates.iter().map(|c| c.len() - 1).sum();
        let rows = prompts.saturating_mul(candidates.len());
        let positions = width + steps;
        let prefill = prompts.saturating_mul(
            width * (self.kv_bytes_per_position + self.activation_bytes_per_position)
                + width * width * self.attention_bytes_per_pair,
        );
        let continuation = rows.saturating_mul(
            positions * self.kv_bytes_per_position
                + steps * self.activation_bytes_per_position
                + steps * positions * self.attention_bytes_per_pair,
        );
        let logits = prompts.saturating_mul(1 + scored) * self.logits_bytes_per_position;
        prefill.saturating_add(continuation).saturating_add(logits)
    }
}

/// [`score_continuations`] for one batch of prompts.
fn score_batch(
    model: &Model,
    prompts: &[Vec<u32>],
    candidates: &[Vec<u32>],
) -> Result<Vec<Vec<f32>>> {
    let config = model.config();
    let device = model.device();
    let pad = config.eos_token_id().unwrap_or(0);
    let (n, k) = (prompts.len(), candidates.len());
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let longest_candidate = candidates.iter().map(Vec::len).max().unwrap_or(0);
    let prefill = Batch::left_padded(prompts, pad, config.prefix_lm(), device)?;
    let mut cache = KvCache::with_capacity(config.n_layer(), width + longest_candidate);
    let hidden = model.hidden_states(&prefill, Some(&mut cache))?;
    // Every candidate's first token is scored from the prompt's last position.
    let last = hidden.narrow(1, width - 1, 1)?.squeeze(1)?;
    let first: Vec<u32> = (0..n)
        .flat_map(|_| candidates.iter().map(|c| c[0]))
        .collect();
    let first = Tensor::from_vec(first, (n, k), device)?;
    let mut scores = log_probs(&model.head(&last)?, &first)?;
    if longest_candidate == 1 {
        return Ok(scores);
    }

    // The candidates' later tokens: each prompt's cache is shared by its k candidates, fed their
    // tokens but the last (right-padded: padding only follows what is scored).
    let steps = longest_candidate - 1;
    let repeated: Vec<u32> = (0..n as u32)
        .flat_map(|r| std::iter::repeat_n(r, k))
        .collect();
    cache.select_rows(&Tensor::new(repeated.as_slice(), device)?)?;
    let key_mask = prefill.key_mask.expect("left-padded rows carry a key mask");
    let (mut ids, mut positions, mut masks) = (Vec::new(), Vec::new(), Vec::new());
    let (mut scored_rows, mut targets) = (Vec::new(), Vec::new());
    for (r, prompt) in prompts.iter().enumerate() {
        for (c, candidate) in candidates.iter().enumerate() {
            let fed = &candidate[..candidate.len() - 1];
            ids.extend_from_slice(fed);
            ids.extend(std::iter::repeat_n(pad, steps - fed.len()));
            positions.extend((0..steps).map(|j| (prompt.len() + j) as u32));
            let mut mask = key_mask[r].clone();
            mask.resize(width + steps, 1);
            masks.push(mask);
            let row = r * k + c;
            for (j, &target) in candidate[1..].iter().enumerate() {
                scored_rows.push((row * steps + j) as u32);
                targets.push(target);
            }
        }
    }
    let continuation = Batch {
        input_ids: Tensor::from_vec(ids, (n * k, steps), device)?,
        position_ids: Tensor::from_vec(positions, (n * k, steps), device)?,
        key_mask: Some(masks),
        layout: None,
        dropout: None,
        adapters_off: false,
    };
    let hidden = model.hidden_states(&continuation, Some(&mut cache))?;
    let hidden = hidden.reshape((n * k * steps, hidden.dim(2)?))?;
    let picked = hidden.index_select(&Tensor::new(scored_rows.as_slice(), device)?, 0)?;
    let m = targets.len();
    let later = log_probs(
        &model.head(&picked)?,
        &Tensor::from_vec(targets, (m, 1), device)?,
    )?;
    let mut later = later.into_iter().map(|row| row[0]);
    for row_scores in scores.iter_mut() {
        for (c, candidate) in candidates.iter().enumerate() {
            for _ in 1..candidate.len() {
                row_scores[c] += later.next().expect("one score per scored token");
            }
        }
    }
    Ok(scores)
}

/// `log p(token)` for each row's `tokens` (`[rows, t]`) under `logits` (`[rows, vocab]`, fp32).
fn log_probs(logits: &Tensor, tokens: &Tensor) -> Result<Vec<Vec<f32>>> {
    let log_norm = logits.log_sum_exp(D::Minus1)?.unsqueeze(1)?;
    let picked = logits.gather(tokens, 1)?;
    Ok(picked.broadcast_sub(&log_norm)?.to_vec2::<f32>()?)
}

/// Scores one row from its logits `[len, vocab]`.
fn score_one(logits: &Tensor, ids: &[u32], top: usize) -> Result<ScoredRow> {
    let mut logprobs = vec![None];
    let mut top_logprobs = Vec::new();
    if top > 0 {
        top_logprobs.push(None);
    }
    if ids.len() > 1 {
        let n = ids.len() - 1;
        let logits = logits.narrow(0, 0, n)?.to_dtype(DType::F32)?;
        let log_norm = logits.log_sum_exp(D::Minus1)?;
        let targets = Tensor::from_vec(ids[1..].to_vec(), (n, 1), logits.device())?;
        let picked = logits.gather(&targets, 1)?.squeeze(1)?;
        let values = (picked - &log_norm)?.to_vec1::<f32>()?;
        logprobs.extend(values.into_iter().map(Some));
        if top > 0 {
            let logits = logits.to_vec2::<f32>()?;
            let log_norm = log_norm.to_vec1::<f32>()?;
            // One buffer of candidate ids for every position, not a vocabulary-sized one each.
            let mut ids = Vec::new();
            for (row, norm) in logits.iter().zip(log_norm) {
                most_likely(row, top, &mut ids);
                top_logprobs.push(Some(
                    ids.iter()
                        .map(|&id| (id, row[id as usize] - norm))
                        .collect(),
                ));
            }
        }
    }
    let total = logprobs.iter().flatten().sum();
    Ok(ScoredRow {
        ids: ids.to_vec(),
        logprobs,
        total,
        top_logprobs,
    })
}

/// Leaves in `ids` the ids of the `k` largest logits, largest first, the lower id first among
/// equals.
fn most_likely(logits: &[f32], k: usize, ids: &mut Vec<u32>) {
    let order = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    ids.clear();
    ids.extend(0..logits.len() as u32);
    let k = k.min(ids.len());
    if k < ids.len() {
        ids.select_nth_unstable_by(k, order);
        ids.truncate(k);
    }
    ids.sort_by(order);
}

/// Every token's log-probability in whole rows, as [`score_rows`] computes it, with the `top`
/// most likely tokens at each position (the server's `echo` and `logprobs`), cut into chunks of
/// rows whose logits fit a memory budget and run one at a time like [`ScorePlan`], so the
/// server's scheduler can interleave other work between them. A row larger than the budget runs
/// alone.
pub struct TokenLogprobPlan {
    rows: Vec<Vec<u32>>,
    top: usize,
    chunks: Vec<Vec<usize>>,
    done: usize,
    scored: Vec<Option<ScoredRow>>,
}

impl TokenLogprobPlan {
    pub fn new(
        model: &Model,
        rows: Vec<Vec<u32>>,
        top: usize,
        budget_bytes: usize,
    ) -> Result<Self> {
        let config = model.config();
        let (context, vocab) = (config.max_positions(), config.vocab_size());
        for (i, row) in rows.iter().enumerate() {
            ensure!(
                !row.is_empty(),
                "prompt {i} is empty: there is nothing to score"
            );
            ensure!(
                row.len() <= context,
                "prompt {i}: {} tokens with the completion, more than the model's context of \
                 {context}",
                row.len()
            );
            if let Some(bad) = row.iter().find(|&&id| id as usize >= vocab) {
                bail!("prompt {i}: token id {bad} is outside the vocabulary ({vocab})");
            }
        }
        // The logits of a padded chunk, and their copy when the top tokens are picked from them.
        let bytes_per_position = vocab * 4 * if top > 0 { 2 } else { 1 };
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(rows[i].len()));
        let mut chunks: Vec<Vec<usize>> = Vec::new();
        for i in order {
            match chunks.last_mut() {
                // Sorted longest first: the chunk's first row sets its padded length.
                Some(chunk)
                    if (chunk.len() + 1) * rows[chunk[0]].len() * bytes_per_position
                        <= budget_bytes =>
                {
                    chunk.push(i)
                }
                _ => chunks.push(vec![i]),
            }
        }
        let scored = vec![None; rows.len()];
        Ok(Self {
            rows,
            top,
            chunks,
            done: 0,
            scored,
        })
    }

    /// Runs the next chunk; true once every chunk has run.
    pub fn run_next_chunk(&mut self, model: &Model) -> Result<bool> {
        if let Some(chunk) = self.chunks.get(self.done) {
            let rows: Vec<Vec<u32>> = chunk.iter().map(|&i| self.rows[i].clone()).collect();
            let scored = score_rows_with_top(model, &rows, None, rows.len(), self.top)?;
            for (&i, row) in chunk.iter().zip(scored) {
                self.scored[i] = Some(row);
            }
            self.done += 1;
        }
        Ok(self.done == self.chunks.len())
    }

    /// The rows in their order, once every chunk has run.
    pub fn into_rows(self) -> Vec<ScoredRow> {
        self.scored
            .into_iter()
            .map(|row| row.expect("every chunk has run"))
            .collect()
    }
}

/// Writes rows as JSON lines into `path`, through a temporary file renamed into place so a
/// crash never leaves a half-written output behind.
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut out = Vec::new();
    for row in rows {
        serde_json::to_writer(&mut out, row)?;
        out.push(b'\n');
    }
    crate::atomic_file::write(path, &out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::{write_random_model, Preset};
    use candle_core::Device;

    /// However small the budget, every prompt meets every candidate exactly once and the
    /// log-likelihoods are those of one pass (to float rounding: the batches differ).
    #[test]
    fn a_plan_in_small_chunks_scores_what_one_chunk_scores() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Preset::Tiny.config();
        config.set_vocab_size(500);
        config.set_eos_and_bos(499);
        write_random_model(dir.path(), &config, 3, DType::F32, usize::MAX).unwrap();
        let model = crate::model::load_model(dir.path(), DType::F32, &Device::Cpu).unwrap();
        let prompts: Vec<Vec<u32>> = (0..11u32)
            .map(|i| (0..3 + i % 5).map(|t| (t * 7 + i) % 500).collect())
            .collect();
        let candidates: Vec<Vec<u32>> = (0..23u32)
            .map(|c| (0..1 + c % 4).map(|t| (c * 13 + t) % 500).collect())
            .collect();
        let whole =
            ScorePlan::new(&model, prompts.clone(), candidates.clone(), 64, usize::MAX).unwrap();
        assert_eq!(whole.progress(), (0, 1));
        let mut whole = whole;
        assert!(whole.run_next_chunk(&model).unwrap());
        let expected = whole.into_scores();

        let budget = ChunkCost::of(&model).bytes(2, 7, &candidates[..3]);
        let mut plan = ScorePlan::new(&model, prompts, candidates, 8, budget).unwrap();
        let mut covered = vec![vec![0; 23]; 11];
        for chunk in &plan.chunks {
            let width = plan.prompts[chunk.prompts[0]].len();
            let cost = ChunkCost::of(&model).bytes(
                chunk.prompts.len(),
                width,
                &plan.candidates[chunk.candidates.clone()],
            );
            assert!(
                cost <= budget || (chunk.prompts.len() == 1 && chunk.candidates.len() == 1),
                "{chunk:?} is over the budget"
            );
            for &p in &chunk.prompts {
                for c in chunk.candidates.clone() {
                    covered[p][c] += 1;
                }
            }
        }
        assert!(covered.iter().flatten().all(|&n| n == 1), "{covered:?}");
        let (_, chunks) = plan.progress();
        assert!(chunks > 10, "{chunks} chunks");
        while !plan.run_next_chunk(&model).unwrap() {}
        for (got, want) in plan
            .into_scores()
            .iter()
            .flatten()
            .zip(expected.iter().flatten())
        {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
    }
}
