//! `perplexity`: the mean next-token loss over the target tokens of text data, and its exp.
//!
//! The loss is the one training reports as `eval/loss`, computed by the same code: the summed
//! cross-entropy (nats) of every token the sequences' loss masks mark (`data.loss_on: target`:
//! the template's target; `all`: every token but each row's first, which has no context),
//! divided by the number of those tokens. Perplexity is `exp` of that token mean.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::report::{md_cell, utc_now, write_files};
use crate::data::Sequence;
use crate::model::Model;
use crate::recipe::LossOn;

/// Summed loss and the number of tokens it covers.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossTotals {
    /// Summed next-token cross-entropy, nats.
    pub nll: f64,
    pub tokens: usize,
}

impl LossTotals {
    /// Nats per token.
    pub fn mean(&self) -> f64 {
        self.nll / self.tokens as f64
    }

    pub fn perplexity(&self) -> f64 {
        self.mean().exp()
    }
}

/// The loss of `model` over `sequences` in batches of `batch_size` (right-padded with `pad_id`,
/// or laid out as prefix-LM rows when they are): what training's evaluation logs.
pub fn loss_totals(
    model: &Model,
    sequences: &[Sequence],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> Result<LossTotals> {
    let mut totals = LossTotals::default();
    for rows in sequences.chunks(batch_size.max(1)) {
        let trained: usize = rows.iter().map(Sequence::target_count).sum();
        if trained == 0 {
            continue;
        }
        let (batch, labels) = crate::data::batch_of(rows, pad_id, device)?;
        totals.nll += model.loss_sum(&batch, &labels)?;
        totals.tokens += trained;
    }
    Ok(totals)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PerplexityReport {
    /// `perplexity`.
    pub task: String,
    pub split: String,
    /// Examples (rows of the data).
    pub n: usize,
    /// Rows the model read them in: one per example, or packed blocks (`data.mode: pack`).
    pub sequences: usize,
    /// Which tokens the loss covers (`target`: the template's target; `all`: every token).
    pub loss_on: LossOn,
    /// Tokens the loss is averaged over.
    pub target_tokens: usize,
    /// Mean next-token cross-entropy over `target_tokens`, nats per token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    pub model: String,
    pub model_sha256: String,
    pub date: String,
}

impl PerplexityReport {
    /// A report of `totals`; `split`, `model` and `model_sha256` are the caller's to fill in.
    pub fn new(
        totals: LossTotals,
        examples: usize,
        sequences: usize,
        loss_on: LossOn,
    ) -> Result<Self> {
        if totals.tokens == 0 {
            bail!(
                "the {examples} examples have no tokens the loss covers (loss_on: {}): there is \
                 nothing to measure",
                serde_json::to_value(loss_on)?.as_str().unwrap_or_default()
            );
        }
        Ok(Self {
            task: "perplexity".into(),
            split: String::new(),
            n: examples,
            sequences,
            loss_on,
            target_tokens: totals.tokens,
            loss: totals.mean(),
            perplexity: totals.perplexity(),
            model: String::new(),
            model_sha256: String::new(),
            date: utc_now(),
        })
    }
}

/// Writes `report.json` and `report.md` into `dir`, each atomically.
pub fn write_report(dir: &Path, report: &PerplexityReport) -> Result<Vec<PathBuf>> {
    let loss_on = serde_json::to_value(report.loss_on)?;
    let md = format!(
        "# Evaluation: perplexity\n\n| | |\n|---|---|\n| model | `{}` |\n| weights sha256 | `{}` |\n\
         | split | {} |\n| examples | {} |\n| sequences | {} |\n| loss on | {} |\n\
         | tokens averaged over | {} |\n| loss (nats/token) | {:.6} |\n| perplexity | {:.4} |\n\
         | date | {} |\n",
        report.model,
        report.model_sha256,
        md_cell(&report.split),
        report.n,
        report.sequences,
        loss_on.as_str().unwrap_or_default(),
        report.target_tokens,
        report.loss,
        report.perplexity,
        report.date
    );
    let files = [
        ("report.json", serde_json::to_string_pretty(report)? + "\n"),
        ("report.md", md),
    ];
    write_files(dir, &files)
}
