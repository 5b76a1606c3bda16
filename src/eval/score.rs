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
            results[row_index] = Some(score_one(&row_logits, ids)?);
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
/// for the context with the longest candidate loses its oldest tokens.
pub fn score_continuations(
    model: &Model,
    prompts: &[Vec<u32>],
    candidates: &[Vec<u32>],
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
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
    let prompts: Vec<&[u32]> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            ensure!(
                !p.is_empty(),
                "prompt {i} is empty: there is nothing to score after"
            );
            Ok(&p[p.len().saturating_sub(keep)..])
        })
        .collect::<Result<_>>()?;
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
    let mut scores = vec![Vec::new(); prompts.len()];
    for chunk in order.chunks(batch_size.max(1)) {
        let rows: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].to_vec()).collect();
        for (&i, row_scores) in chunk.iter().zip(score_batch(model, &rows, candidates)?) {
            scores[i] = row_scores;
        }
    }
    Ok(scores)
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
fn score_one(logits: &Tensor, ids: &[u32]) -> Result<ScoredRow> {
    let mut logprobs = vec![None];
    if ids.len() > 1 {
        let n = ids.len() - 1;
        let logits = logits.narrow(0, 0, n)?.to_dtype(DType::F32)?;
        let log_norm = logits.log_sum_exp(D::Minus1)?;
        let targets = Tensor::from_vec(ids[1..].to_vec(), (n, 1), logits.device())?;
        let picked = logits.gather(&targets, 1)?.squeeze(1)?;
        let values = (picked - log_norm)?.to_vec1::<f32>()?;
        logprobs.extend(values.into_iter().map(Some));
    }
    let total = logprobs.iter().flatten().sum();
    Ok(ScoredRow {
        ids: ids.to_vec(),
        logprobs,
        total,
    })
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
