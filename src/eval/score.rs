//! `kiln score`: per-token log-probabilities of given texts under a model.
//!
//! Rows are batched by length to waste little on padding, but every row's numbers are computed
//! from its own positions only, so they do not depend on the batch size or on the other rows.

use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::model::{Batch, Model};
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
