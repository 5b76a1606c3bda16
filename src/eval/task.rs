//! A recipe's evaluation task (`eval.task`), prepared once from its eval data and measured on
//! any weights: what `kiln train` reports at every evaluation and `kiln eval --recipe` reports
//! once.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::classify::{ClassifyData, GroupBy};
use super::mnli::{evaluate_mnli, nli_rows, write_report, NliRow};
use super::perplexity::{self, LossTotals, PerplexityReport};
use crate::data::{self, load_split_records, Sequence, Split};
use crate::model::Model;
use crate::recipe::{EvalMode, EvalTask, LossOn, Recipe};
use crate::tokenizer::TextTokenizer;

/// What an evaluation measures beyond the eval loss, with its data checked and tokenized.
pub struct RecipeEval {
    measure: Measure,
    mode: EvalMode,
    batch_size: usize,
    loss_on: LossOn,
    /// The eval data as reports name it (see [`eval_split_name`]).
    split: String,
}

enum Measure {
    Mnli(Vec<NliRow>),
    Classify(ClassifyData),
    Perplexity { examples: usize, sequences: usize },
}

/// The weights a report is about.
pub struct Weights<'w> {
    pub model: &'w Model,
    /// The name reports give them (e.g. `run step 100`).
    pub name: String,
    /// sha256 over the weight files of their checkpoint.
    pub sha256: String,
    /// Their loss over the eval sequences, where it was already measured (perplexity reports
    /// it, so that it always agrees with `eval/loss`).
    pub loss: Option<LossTotals>,
}

impl RecipeEval {
    /// The recipe's `eval.task` over its eval data (`eval_data`, already prepared for the eval
    /// loss); `None` for `eval.task: loss`, which needs nothing more.
    pub fn prepare(
        recipe: &Recipe,
        recipe_dir: &Path,
        tokenizer: &TextTokenizer,
        eval_data: Option<&data::Prepared>,
    ) -> Result<Option<Self>> {
        let measure = match recipe.eval.task {
            // The trainer measures pairs itself (see `train::preference`).
            EvalTask::Loss | EvalTask::Preference => return Ok(None),
            EvalTask::Mnli => Measure::Mnli(mnli_eval_rows(recipe, recipe_dir)?),
            EvalTask::Classify => {
                Measure::Classify(classify_eval_data(recipe, recipe_dir, tokenizer)?)
            }
            EvalTask::Perplexity => {
                let data = eval_data.context("there is no data.eval to measure perplexity on")?;
                let tokens: usize = data.sequences.iter().map(Sequence::target_count).sum();
                if tokens == 0 {
                    bail!(
                        "data.eval: its {} examples have no tokens the loss covers \
                         (data.loss_on, data.mode)",
                        data.stats.examples
                    );
                }
                Measure::Perplexity {
                    examples: data.stats.examples,
                    sequences: data.sequences.len(),
                }
            }
        };
        Ok(Some(Self {
            measure,
            mode: recipe.eval.mode,
            batch_size: recipe.eval.batch_size,
            loss_on: recipe.data.loss_on,
            split: eval_split_name(recipe),
        }))
    }

    /// Measures `weights`, writes the task's report into `report_dir`, and returns its metrics
    /// (e.g. `("accuracy", 0.81)`).
    pub fn measure(
        &self,
        weights: Weights,
        tokenizer: &TextTokenizer,
        report_dir: &Path,
    ) -> Result<Vec<(String, f64)>> {
        let Weights {
            model,
            name,
            sha256,
            loss,
        } = weights;
        let split = self.split.clone();
        match &self.measure {
            Measure::Mnli(rows) => {
                let mut report = evaluate_mnli(model, tokenizer, rows, self.mode, self.batch_size)?;
                (report.model, report.model_sha256, report.split) = (name, sha256, split);
                write_report(report_dir, &report)?;
                let badly_formed = report.badly_formed as f64 / report.n as f64;
                Ok(vec![
                    ("accuracy".to_string(), report.accuracy),
                    ("badly_formed".to_string(), badly_formed),
                ])
            }
            Measure::Classify(data) => {
                let mut report = data.evaluate(model, self.batch_size)?;
                (report.model, report.model_sha256, report.split) = (name, sha256, split);
                write_report(report_dir, &report)?;
                Ok(vec![("accuracy".to_string(), report.accuracy)])
            }
            Measure::Perplexity {
                examples,
                sequences,
            } => {
                let totals =
                    loss.context("the eval split gave no loss to take the perplexity of")?;
                let mut report =
                    PerplexityReport::new(totals, *examples, *sequences, self.loss_on)?;
                (report.model, report.model_sha256, report.split) = (name, sha256, split);
                perplexity::write_report(report_dir, &report)?;
                Ok(vec![("perplexity".to_string(), report.perplexity)])
            }
        }
    }
}

/// The eval data as a report names it: each source's file or `hub:dataset/config/split`.
pub fn eval_split_name(recipe: &Recipe) -> String {
    let names: Vec<String> = recipe
        .data
        .eval
        .iter()
        .map(|d| {
            let source = match &d.source.path {
                Some(path) => path.display().to_string(),
                None => data::source::hub_origin(&d.source),
            };
            source + &first_rows(d.limit)
        })
        .collect();
    names.join(" + ") + &first_rows(recipe.eval.limit)
}

fn first_rows(limit: Option<usize>) -> String {
    limit
        .map(|n| format!(" (first {n} rows)"))
        .unwrap_or_default()
}

/// The eval datasets with their answers, tokenized: what `eval.task: classify` ranks.
pub fn classify_eval_data(
    recipe: &Recipe,
    recipe_dir: &Path,
    tokenizer: &TextTokenizer,
) -> Result<ClassifyData> {
    let datasets = load_split_records(recipe, recipe_dir, Split::Eval)?;
    if datasets.is_empty() {
        bail!("there is no data.eval to classify");
    }
    let group_by = recipe.eval.group_by.clone().map(|column| GroupBy {
        column,
        option: "eval.group_by",
    });
    let mut data = ClassifyData::new(group_by);
    for (i, dataset) in datasets.iter().enumerate() {
        data.add(dataset, tokenizer)
            .with_context(|| format!("data.eval[{i}]"))?;
    }
    Ok(data)
}

/// The eval split's rows as premise / hypothesis / label, capped by `eval.limit`.
fn mnli_eval_rows(recipe: &Recipe, recipe_dir: &Path) -> Result<Vec<NliRow>> {
    let datasets = load_split_records(recipe, recipe_dir, Split::Eval)?;
    if datasets.is_empty() {
        bail!("there is no data.eval to measure accuracy on");
    }
    let mut rows = Vec::new();
    for (i, dataset) in datasets.iter().enumerate() {
        let records = renamed_columns(dataset);
        rows.extend(nli_rows(&records).with_context(|| format!("data.eval[{i}]"))?);
    }
    if let Some(limit) = recipe.eval.limit {
        rows.truncate(limit);
    }
    Ok(rows)
}

/// The records with `columns:` applied (template field ← source column), so the evaluator finds
/// premise, hypothesis and label under the names the template uses.
fn renamed_columns(dataset: &data::LoadedDataset) -> data::Records {
    let mut records = dataset.records.clone();
    for (field, column) in &dataset.spec.columns {
        for row in records.rows.iter_mut() {
            if let Some(value) = row.remove(column) {
                row.insert(field.clone(), value);
            }
        }
        for c in records.columns.iter_mut() {
            if c == column {
                *c = field.clone();
            }
        }
        if let Some(names) = records.class_labels.remove(column) {
            records.class_labels.insert(field.clone(), names);
        }
    }
    records
}
