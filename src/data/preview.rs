//! Human-readable views of a recipe's data: `kiln data preview` and `kiln data stats`.

use std::fmt::Write;
use std::path::Path;

use anyhow::Result;

use super::prepare::{load_split_records, render_datasets, tokenize_example, DataStats, Split};
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
    let mut datasets = load_split_records(recipe, recipe_dir, split)?;
    // Few-shot pools need the whole dataset, so cap rows only when nothing samples from them.
    for d in &mut datasets {
        if d.spec.few_shot.is_none() {
            d.records.rows.truncate(n);
            d.records.positions.truncate(n);
        }
    }
    let rendered = render_datasets(&datasets)?;
    let mut out = String::new();
    for (i, example) in rendered.iter().take(n).enumerate() {
        let sequence = tokenize_example(tokenizer, example, LossOn::Target)?;
        let target = sequence.loss_mask.iter().filter(|&&m| m).count();
        let trained = match recipe.data.loss_on {
            LossOn::All => "loss on all tokens",
            LossOn::Target => "loss on target tokens",
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
    match stats.mode {
        BatchMode::Pack => {
            let _ = writeln!(
                out,
                "  packed sequences:    {} per epoch of {} tokens ({} tokens dropped as group remainders)",
                stats.sequences, stats.seq_len, stats.dropped_tokens
            );
        }
        BatchMode::Pad => {
            let _ = writeln!(
                out,
                "  padded rows:         {} per epoch, up to {} tokens ({} truncated)",
                stats.sequences, stats.seq_len, stats.truncated
            );
        }
    }
    out
}
