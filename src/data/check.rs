//! `kiln recipe check`: a recipe with everything it implies worked out, checked against its data.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use super::source::load_records;
use super::template::Caster;
use super::{prepare, Split};
use crate::recipe::{self, recipe_dir, tokenizer_for, Recipe};

/// Values a recipe implies but does not state.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Derived {
    pub recipe_file: PathBuf,
    /// Gradient accumulation steps: global / (micro × replicas).
    pub accumulation_steps: usize,
    /// global × seq_len.
    pub tokens_per_step: usize,
    /// Known when the tokenizer and the training data are available here.
    pub sequences_per_epoch: Option<usize>,
    pub total_steps: Option<u64>,
    pub warmup_steps: Option<u64>,
    /// Epochs the run covers (from `steps`, when the epoch size is known).
    pub epochs: Option<f64>,
    /// What the run will hold in memory, by term, bytes (filled in by `kiln recipe check`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_estimate: Option<std::collections::BTreeMap<String, u64>>,
    /// Checks that could not be made here, and why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The recipe, fully defaulted, with its derived values (printed as one YAML document).
#[derive(Debug, Clone, Serialize)]
pub struct Resolved {
    #[serde(flatten)]
    pub recipe: Recipe,
    pub derived: Derived,
}

/// Loads and validates a recipe, checks every template against its source's columns, and works
/// out the derived values (tokenizing the training data when the tokenizer is local).
pub fn check(recipe_path: &Path, overrides: &[String]) -> Result<Resolved> {
    let recipe = recipe::load(recipe_path, overrides)?;
    let dir = recipe_dir(recipe_path);
    let file = recipe_path.display();
    let mut notes = Vec::new();
    let mut all_local = true;
    for split in [Split::Train, Split::Eval] {
        for (i, spec) in split.datasets(&recipe).iter().enumerate() {
            let key = format!("data.{}[{i}]", split.name());
            // One row tells the columns of typed formats; JSON rows may differ, so read them all.
            let records = match load_records(&spec.source, &dir, None) {
                Ok(records) => records,
                Err(e) if spec.source.hub.is_some() => {
                    all_local = false;
                    notes.push(format!("{key}: column check skipped: {e:#}"));
                    continue;
                }
                Err(e) => return Err(e.context(format!("{file}: {key}"))),
            };
            if spec.template.is_preference() {
                super::preference::check_rows(spec, &records)
                    .with_context(|| format!("{file}: {key}"))?;
                continue;
            }
            if spec.template.is_chat() {
                // Conversations: every row must be one.
                for (i, row) in records.rows.iter().enumerate() {
                    super::chat::messages_of(row, &records.locate(i))
                        .with_context(|| format!("{file}: {key}"))?;
                }
                continue;
            }
            Caster::new(spec, &records).with_context(|| format!("{file}: {key}.template"))?;
        }
    }
    let tokenizer = match tokenizer_for(&recipe, &dir)? {
        Some(local) => Some(local),
        None => match hub_tokenizer(&recipe) {
            Some(Ok(tokenizer)) => Some(tokenizer),
            Some(Err(e)) => {
                notes.push(format!(
                    "sequences per epoch unknown: the tokenizer is not a local directory and \
                     could not be fetched from the Hub: {e:#}"
                ));
                None
            }
            None => None,
        },
    };
    let mut tokenizer = tokenizer;
    if let Some(tokenizer) = tokenizer.as_mut() {
        super::chat::apply_recipe_template(&recipe, &dir, tokenizer)
            .with_context(|| file.to_string())?;
    }
    if tokenizer.is_none() {
        all_local = false;
    }
    let sequences_per_epoch = match (&tokenizer, all_local) {
        (Some(tokenizer), true) if recipe.objective.is_preference() => Some(
            super::prepare_pairs(&recipe, &dir, tokenizer, Split::Train)
                .with_context(|| format!("{file}: preparing the training pairs"))?
                .stats
                .pairs,
        ),
        (Some(tokenizer), true) => Some(
            prepare(&recipe, &dir, tokenizer, Split::Train)
                .with_context(|| format!("{file}: preparing the training data"))?
                .stats
                .sequences,
        ),
        _ => None,
    };
    let total_steps = match (recipe.steps, sequences_per_epoch) {
        (Some(steps), _) => Some(steps),
        (None, Some(n)) => Some(recipe.total_steps(n)),
        (None, None) => None,
    };
    let warmup_steps = total_steps.map(|t| recipe.warmup_steps(t));
    if let (Some(total), Some(warmup)) = (total_steps, warmup_steps) {
        if warmup >= total {
            anyhow::bail!("{file}: schedule.warmup: {warmup} warmup steps leave none of the {total} steps for training");
        }
    }
    let epochs = match (recipe.epochs, sequences_per_epoch, total_steps) {
        (Some(e), _, _) => Some(e),
        (None, Some(n), Some(t)) => {
            Some((t as f64 * recipe.batch.global as f64 / n as f64 * 1000.0).round() / 1000.0)
        }
        _ => None,
    };
    let derived = Derived {
        recipe_file: recipe_path.to_path_buf(),
        accumulation_steps: recipe.accumulation_steps(),
        tokens_per_step: recipe.tokens_per_step(),
        sequences_per_epoch,
        total_steps,
        warmup_steps,
        epochs,
        memory_estimate: None,
        notes,
    };
    Ok(Resolved { recipe, derived })
}

/// The tokenizer of a recipe whose `tokenizer` (or, without one, `model.from`) is a Hub id: its
/// tokenizer files only, fetched into the HF cache (offline, from there). `None` when the recipe
/// names no tokenizer at all.
fn hub_tokenizer(recipe: &Recipe) -> Option<Result<crate::tokenizer::TextTokenizer>> {
    let (spec, revision) = match (&recipe.tokenizer, &recipe.model.from) {
        (Some(tokenizer), _) => (tokenizer, None),
        (None, Some(from)) => (from, recipe.model.revision.as_deref()),
        (None, None) => return None,
    };
    Some(
        crate::hub::resolve_tokenizer(spec, revision)
            .and_then(|dir| crate::tokenizer::TextTokenizer::from_dir(&dir)),
    )
}
