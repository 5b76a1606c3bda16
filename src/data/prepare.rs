//! A recipe's data, end to end: load each source, cast rows to text, tokenize in parallel, then
//! pack or pad into the sequences the trainer streams.

use std::path::Path;

use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::Serialize;

use super::fast_bpe::FastBpe;
use super::pack::{one_per_row, pack};
use super::source::{load_records, Records};
use super::template::{Caster, Rendered};
use super::Sequence;
use crate::recipe::{Attention, BatchMode, DatasetSpec, LossOn, Recipe};
use crate::tokenizer::TextTokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    pub fn datasets(self, recipe: &Recipe) -> &[DatasetSpec] {
        match self {
            Split::Train => &recipe.data.train,
            Split::Eval => &recipe.data.eval,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
        }
    }
}

/// A dataset of a recipe with its rows.
#[derive(Debug, Clone)]
pub struct LoadedDataset {
    pub spec: DatasetSpec,
    pub records: Records,
}

/// The rows of every dataset of a split. Eval splits are also capped by `eval.limit`.
pub fn load_split_records(
    recipe: &Recipe,
    recipe_dir: &Path,
    split: Split,
) -> Result<Vec<LoadedDataset>> {
    split
        .datasets(recipe)
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let limit = match split {
                Split::Train => spec.limit,
                Split::Eval => match (spec.limit, recipe.eval.limit) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                },
            };
            let records = load_records(&spec.source, recipe_dir, limit)
                .with_context(|| format!("data.{}[{i}]", split.name()))?;
            Ok(LoadedDataset {
                spec: spec.clone(),
                records,
            })
        })
        .collect()
}

/// Every example of the split as the text the model sees, in source order.
pub fn render_split(recipe: &Recipe, recipe_dir: &Path, split: Split) -> Result<Vec<Rendered>> {
    let datasets = load_split_records(recipe, recipe_dir, split)?;
    render_datasets(&datasets)
}

pub fn render_datasets(datasets: &[LoadedDataset]) -> Result<Vec<Rendered>> {
    let mut all = Vec::new();
    for dataset in datasets {
        let caster = Caster::new(&dataset.spec, &dataset.records)?;
        let rendered: Vec<Rendered> = (0..caster.len())
            .into_par_iter()
            .map(|i| caster.render(i))
            .collect::<Result<_>>()?;
        all.extend(rendered);
    }
    Ok(all)
}

/// Tokenizes `prompt + target` as one text, so the ids are exactly those of the whole string
/// (tokenizing the parts separately can merge differently at the boundary); a token belongs to
/// the target when it ends past the prompt's last byte.
pub fn tokenize_example(
    tokenizer: &TextTokenizer,
    example: &Rendered,
    loss_on: LossOn,
) -> Result<Sequence> {
    tokenize_with(
        tokenizer,
        FastBpe::new(tokenizer).as_ref(),
        example,
        loss_on,
    )
}

fn tokenize_with(
    tokenizer: &TextTokenizer,
    fast: Option<&FastBpe>,
    example: &Rendered,
    loss_on: LossOn,
) -> Result<Sequence> {
    let text = example.text();
    let tokenized = match (fast, loss_on) {
        (Some(fast), _) => fast.encode(&text),
        (None, LossOn::All) => tokenizer.encode(&text).map(|ids| (ids, Vec::new())),
        (None, LossOn::Target) => tokenizer.encode_with_offsets(&text),
    };
    let (ids, offsets) = tokenized.with_context(|| example.origin.clone())?;
    Ok(match loss_on {
        LossOn::All => Sequence::all_trained(ids),
        LossOn::Target => {
            let split = example.prompt.len();
            let loss_mask = offsets.iter().map(|&(_, end)| end > split).collect();
            Sequence::new(ids, loss_mask)
        }
    })
}

/// A prefix-LM example from one tokenized with `loss_on: target`, whose untrained tokens are
/// exactly its prompt: those become the bidirectional prefix, and the loss covers what `loss_on`
/// says.
fn prefix_lm_example(split: Sequence, loss_on: LossOn) -> Sequence {
    let prefix = split.loss_mask.iter().map(|&target| !target).collect();
    let loss_mask = match loss_on {
        LossOn::Target => split.loss_mask,
        LossOn::All => vec![true; split.ids.len()],
    };
    Sequence {
        segment: vec![0; split.ids.len()],
        prefix,
        loss_mask,
        ids: split.ids,
    }
}

/// Tokenizes examples in parallel, in order.
pub fn tokenize_all(
    tokenizer: &TextTokenizer,
    examples: &[Rendered],
    loss_on: LossOn,
) -> Result<Vec<Sequence>> {
    let fast = FastBpe::new(tokenizer);
    examples
        .par_iter()
        .map(|e| tokenize_with(tokenizer, fast.as_ref(), e, loss_on))
        .collect()
}

/// Examples as a split's data tokenizes them, one sequence each: causal, with the loss mask
/// `loss_on` says, or prefix-LM, the prompt being the bidirectional prefix.
pub fn tokenize_examples(
    tokenizer: &TextTokenizer,
    examples: &[Rendered],
    loss_on: LossOn,
    attention: Attention,
) -> Result<Vec<Sequence>> {
    Ok(match attention {
        Attention::Causal => tokenize_all(tokenizer, examples, loss_on)?,
        Attention::Prefix => tokenize_all(tokenizer, examples, LossOn::Target)?
            .into_iter()
            .map(|e| prefix_lm_example(e, loss_on))
            .collect(),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceStats {
    pub origin: String,
    pub rows: usize,
    pub dropped_rows: usize,
    pub dropped_reason: Option<String>,
}

/// What became of a split's data on the way to sequences.
#[derive(Debug, Clone, Serialize)]
pub struct DataStats {
    pub split: Split,
    pub sources: Vec<SourceStats>,
    pub examples: usize,
    /// Tokens of all examples (before packing or truncation).
    pub tokens: usize,
    /// Of those, tokens the loss covers.
    pub target_tokens: usize,
    pub longest_example: usize,
    pub mode: BatchMode,
    pub seq_len: usize,
    /// Sequences per epoch.
    pub sequences: usize,
    /// Pad mode: examples cut to seq_len.
    pub truncated: usize,
    /// Pack mode: tokens in the dropped remainders of each 1000-example group.
    pub dropped_tokens: usize,
}

pub struct Prepared {
    pub sequences: Vec<Sequence>,
    pub stats: DataStats,
}

/// Loads, casts, tokenizes and packs (or pads) a split of a recipe's data. A split with no
/// datasets (no `data.eval`) gives no sequences; datasets that give none are an error.
pub fn prepare(
    recipe: &Recipe,
    recipe_dir: &Path,
    tokenizer: &TextTokenizer,
    split: Split,
) -> Result<Prepared> {
    let datasets = load_split_records(recipe, recipe_dir, split)?;
    let rendered = render_datasets(&datasets)?;
    let examples = tokenize_examples(
        tokenizer,
        &rendered,
        recipe.data.loss_on,
        recipe.data.attention,
    )?;
    let sources = datasets
        .iter()
        .map(|d| SourceStats {
            origin: d.records.origin.clone(),
            rows: d.records.len(),
            dropped_rows: d.records.dropped,
            dropped_reason: d.records.dropped_reason.clone(),
        })
        .collect();
    let tokens = examples.iter().map(Sequence::len).sum();
    let target_tokens = examples
        .iter()
        .map(|e| e.loss_mask.iter().filter(|&&m| m).count())
        .sum();
    let longest_example = examples.iter().map(Sequence::len).max().unwrap_or(0);
    let example_count = examples.len();
    let seq_len = recipe.data.seq_len;
    let (sequences, truncated, dropped_tokens) = match recipe.data.mode {
        BatchMode::Pack => {
            let (blocks, dropped) = pack(&examples, seq_len);
            (blocks, 0, dropped)
        }
        BatchMode::Pad => {
            let (rows, truncated) = one_per_row(examples, seq_len, recipe.data.truncation, |i| {
                rendered[i].origin.clone()
            })?;
            (rows, truncated, 0)
        }
    };
    if sequences.is_empty() && !datasets.is_empty() {
        anyhow::bail!(
            "data.{}: {example_count} examples ({tokens} tokens) make no sequence of {seq_len} tokens \
             (packing drops each 1000-example group's remainder; lower seq_len or use mode: pad)",
            split.name()
        );
    }
    let stats = DataStats {
        split,
        sources,
        examples: example_count,
        tokens,
        target_tokens,
        longest_example,
        mode: recipe.data.mode,
        seq_len,
        sequences: sequences.len(),
        truncated,
        dropped_tokens,
    };
    Ok(Prepared { sequences, stats })
}
