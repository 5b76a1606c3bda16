//! Human-readable views of a recipe's data: `kiln data preview` and `kiln data stats`.

use std::fmt::Write;
use std::path::Path;

use anyhow::Result;

use super::prepare::{load_split_records, render_datasets, tokenize_example, DataStats, Split};
use super::{Rendered, Sequence};
use crate::recipe::{BatchMode, LossOn, Recipe};
use crate::tokenizer::TextTokenizer;

/// Marks the prompt/target split in previews; not part of the text the model sees.
pub const SPLIT_MARK: &str = "⟦|⟧";

/// The first `n` examples of a split exactly as the model sees them: prompt and target as
/// escaped strings, the joined text with the split marked, and token counts.
pub fn preview(
    recipe: &Recipe,
    recipe_dir: &Path,
    tokenizer: &TextTokenizer,
    split: Split,
    n: usize,
) -> Result<String> {
    let rendered = first_examples(recipe, recipe_dir, tokenizer, split, n)?;
    let mut out = String::new();
    let loss_on = recipe.data.loss_on;
    for (i, example) in rendered.iter().take(n).enumerate() {
        if loss_on.is_assistant() {
            let sequence = tokenize_example(tokenizer, example, loss_on)?;
            let trained = sequence.loss_mask.iter().filter(|&&m| m).count();
            writeln!(
                out,
                "── {} example {} · {} · {} tokens ({trained} trained: loss on {}, marked {TRAINED_OPEN}…{TRAINED_CLOSE})",
                split.name(),
                i + 1,
                example.origin,
                sequence.len(),
                loss_on.name(),
            )?;
            writeln!(out, "{}", marked_text(tokenizer, example, &sequence)?)?;
            writeln!(out)?;
            continue;
        }
        let sequence = tokenize_example(tokenizer, example, LossOn::Target)?;
        let target = sequence.loss_mask.iter().filter(|&&m| m).count();
        let trained = match loss_on {
            LossOn::All => "loss on all tokens",
            _ => "loss on target tokens",
        };
        writeln!(
            out,
            "── {} example {} · {} · {} tokens ({} prompt + {target} target; {trained})",
            split.name(),
            i + 1,
            example.origin,
            sequence.len(),
            sequence.len() - target,
        )?;
        writeln!(out, "prompt: {:?}", example.prompt)?;
        writeln!(out, "target: {:?}", example.target)?;
        writeln!(out, "{}{SPLIT_MARK}{}", example.prompt, example.target)?;
        writeln!(out)?;
    }
    if rendered.is_empty() {
        writeln!(out, "({} split has no datasets)", split.name())?;
    }
    Ok(out)
}

/// At least the first `n` examples of the split, rendered.
fn first_examples(
    recipe: &Recipe,
    recipe_dir: &Path,
    tokenizer: &TextTokenizer,
    split: Split,
    n: usize,
) -> Result<Vec<Rendered>> {
    let mut datasets = load_split_records(recipe, recipe_dir, split)?;
    // Few-shot pools need the whole dataset, so cap rows only when nothing samples from them.
    for d in &mut datasets {
        if d.spec.few_shot.is_none() {
            d.records.rows.truncate(n);
            d.records.positions.truncate(n);
        }
    }
    render_datasets(&datasets, tokenizer)
}

/// Marks where the trained tokens of a conversation start and end in its preview.
pub const TRAINED_OPEN: &str = "⟦";
pub const TRAINED_CLOSE: &str = "⟧";

/// The example's text with each run of trained tokens between [`TRAINED_OPEN`] and
/// [`TRAINED_CLOSE`].
fn marked_text(
    tokenizer: &TextTokenizer,
    example: &Rendered,
    sequence: &Sequence,
) -> Result<String> {
    let text = example.text();
    let (_, offsets) = tokenizer.encode_with_offsets(&text)?;
    let mut out = String::with_capacity(text.len() + 16);
    let mut at = 0;
    let mut open = false;
    for (&(start, end), &trained) in offsets.iter().zip(&sequence.loss_mask) {
        // Bytes no token's offsets cover (trimmed spaces) go with the token after them.
        if trained != open {
            out.push_str(&text[at..start.max(at)]);
            at = start.max(at);
            out.push_str(if trained { TRAINED_OPEN } else { TRAINED_CLOSE });
            open = trained;
        }
        out.push_str(&text[at..end.max(at)]);
        at = end.max(at);
    }
    out.push_str(&text[at..]);
    if open {
        out.push_str(TRAINED_CLOSE);
    }
    Ok(out)
}

/// The first `n` examples of a split as token ids and labels, one JSON object a line:
/// `{"origin", "input_ids", "labels"}`, the labels being the ids the loss covers and -100
/// elsewhere (unshifted, as Hugging Face's collators write them).
pub fn preview_json(
    recipe: &Recipe,
    recipe_dir: &Path,
    tokenizer: &TextTokenizer,
    split: Split,
    n: usize,
) -> Result<String> {
    let rendered = first_examples(recipe, recipe_dir, tokenizer, split, n)?;
    let mut out = String::new();
    for example in rendered.iter().take(n) {
        let sequence = tokenize_example(tokenizer, example, recipe.data.loss_on)?;
        let labels: Vec<i64> = (sequence.ids.iter().zip(&sequence.loss_mask))
            .map(|(&id, &trained)| if trained { id as i64 } else { -100 })
            .collect();
        let line = serde_json::json!({
            "origin": example.origin,
            "input_ids": sequence.ids,
            "labels": labels,
        });
        writeln!(out, "{line}")?;
    }
    Ok(out)
}

pub fn stats_text(stats: &DataStats) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}:", stats.split.name());
    for s in &stats.sources {
        let _ = write!(out, "  source {}: {} rows", s.origin, s.rows);
        if s.dropped_rows > 0 {
            let _ = write!(
                out,
                ", {} dropped ({})",
                s.dropped_rows,
                s.dropped_reason.as_deref().unwrap_or("unusable")
            );
        }
        out.push('\n');
    }
    let _ = writeln!(out, "  examples:            {}", stats.examples);
    let _ = writeln!(
        out,
        "  tokens:              {} ({} under the loss; mean {:.1}, longest {} per example)",
        stats.tokens,
        stats.target_tokens,
        stats.tokens as f64 / stats.examples.max(1) as f64,
        stats.longest_example
    );
    let t = &stats.trained_per_example;
    let _ = writeln!(
        out,
        "  trained per example: min {}, mean {:.1}, max {}",
        t.min, t.mean, t.max
    );
    match (stats.mode, stats.isolated) {
        (BatchMode::Pack, true) => {
            let _ = writeln!(
                out,
                "  packed rows:         {} per epoch, whole examples isolated in up to {} tokens \
                 ({} truncated), {} padding tokens in micro-batches",
                stats.sequences, stats.seq_len, stats.truncated, stats.padding_tokens
            );
        }
        (BatchMode::Pack, false) => {
            let _ = writeln!(
                out,
                "  packed sequences:    {} per epoch of {} tokens ({} tokens dropped as group remainders)",
                stats.sequences, stats.seq_len, stats.dropped_tokens
            );
        }
        (BatchMode::Pad, _) => {
            let _ = writeln!(
                out,
                "  padded rows:         {} per epoch, up to {} tokens ({} truncated), {} padding \
                 tokens in micro-batches",
                stats.sequences, stats.seq_len, stats.truncated, stats.padding_tokens
            );
        }
    }
    out
}
