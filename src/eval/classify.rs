//! `classify`: accuracy on any labelled template by ranking its fixed set of answers.
//!
//! The answers of a dataset are its template's target written with each label word (a label map:
//! explicit, the preset's, or the data's ClassLabel names), so that labels absent from the rows
//! still compete; without one, the distinct targets of the rows (prompt-completion with a fixed
//! set of completions). Each row's prompt is scored once with every answer after it (shared KV
//! cache, [`score_continuations`]); the most likely answer is the prediction and the row's own
//! target is the gold class.

use std::collections::HashSet;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use super::report::{summarize, ClassReport, Summary};
use super::score::score_continuations;
use crate::data::template::{Caster, Rendered};
use crate::data::LoadedDataset;
use crate::model::Model;
use crate::recipe::EvalMode;
use crate::tokenizer::{TextTokenizer, EOS_TOKEN};

/// More distinct answers than this is generation, not classification.
pub const MAX_CLASSES: usize = 100;

/// Where the grouping column was asked for, for messages: `eval.group_by` or `--group-by`.
#[derive(Debug, Clone)]
pub struct GroupBy {
    pub column: String,
    pub option: &'static str,
}

/// Eval rows tokenized once with their answers, to be evaluated at every eval step.
#[derive(Debug, Default)]
pub struct ClassifyData {
    labels: Vec<String>,
    group_by: Option<GroupBy>,
    parts: Vec<Part>,
}

/// One dataset: its rows share a set of answers.
#[derive(Debug)]
struct Part {
    answers: Vec<Vec<u32>>,
    /// The class (index into `labels`) of each answer.
    classes: Vec<usize>,
    prompts: Vec<Vec<u32>>,
    gold: Vec<usize>,
    groups: Vec<Option<String>>,
}

impl ClassifyData {
    pub fn new(group_by: Option<GroupBy>) -> Self {
        Self {
            group_by,
            ..Default::default()
        }
    }

    /// The classes, in report order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// Rows to classify.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|p| p.prompts.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Renders, checks and tokenizes a dataset's rows and answers.
    pub fn add(&mut self, dataset: &LoadedDataset, tokenizer: &TextTokenizer) -> Result<()> {
        let records = &dataset.records;
        let origin = &records.origin;
        if records.is_empty() {
            bail!("{origin}: no rows");
        }
        let caster = Caster::new(&dataset.spec, records)?;
        if caster.prompt_is_empty() {
            bail!(
                "{origin}: the template's prompt is empty (every row is all target, as with the \
                 `text` preset), so there is no answer to choose after a prompt; classify needs a \
                 template whose target is one of a fixed set of answers (a {{label}} with a label \
                 map, or completions that repeat); for plain text use the perplexity task"
            );
        }
        let rendered: Vec<Rendered> = (0..caster.len())
            .into_par_iter()
            .map(|i| caster.render(i))
            .collect::<Result<_>>()?;
        let answers = match caster.label_targets() {
            Some(answers) => answers,
            None => distinct_targets(origin, &rendered)?,
        };
        if answers.len() < 2 {
            bail!(
                "{origin}: the template's targets give {} answer(s) ({}); classify needs at least \
                 two to choose between (a {{label}} in the target with a label map, or \
                 completions that repeat over the rows)",
                answers.len(),
                names(&answers)
            );
        }
        let groups = match &self.group_by {
            Some(group_by) => group_values(dataset, group_by)?,
            None => vec![None; rendered.len()],
        };
        let mut gold = Vec::with_capacity(rendered.len());
        for row in &rendered {
            let Some(answer) = answers.iter().position(|(_, t)| *t == row.target) else {
                bail!(
                    "{}: the target {:?} is none of the answers ({})",
                    row.origin,
                    row.target,
                    names(&answers)
                );
            };
            gold.push(answer);
        }
        let answer_ids: Vec<Vec<u32>> = answers
            .iter()
            .map(|(name, target)| {
                let ids = tokenizer.encode(target)?;
                if ids.is_empty() {
                    bail!("{origin}: the answer {name:?} has no tokens");
                }
                Ok(ids)
            })
            .collect::<Result<_>>()?;
        let prompts: Vec<Vec<u32>> = rendered
            .par_iter()
            .map(|row| {
                let ids = tokenizer
                    .encode(&row.prompt)
                    .with_context(|| row.origin.clone())?;
                if ids.is_empty() {
                    bail!(
                        "{}: the prompt is empty: there is nothing to classify",
                        row.origin
                    );
                }
                Ok(ids)
            })
            .collect::<Result<_>>()?;
        let classes: Vec<usize> = answers
            .iter()
            .map(
                |(name, _)| match self.labels.iter().position(|l| l == name) {
                    Some(i) => i,
                    None => {
                        self.labels.push(name.clone());
                        self.labels.len() - 1
                    }
                },
            )
            .collect();
        self.parts.push(Part {
            gold: gold.iter().map(|&a| classes[a]).collect(),
            answers: answer_ids,
            classes,
            prompts,
            groups,
        });
        Ok(())
    }

    /// Classifies every row with `model` and reports.
    pub fn evaluate(&self, model: &Model, batch_size: usize) -> Result<ClassReport> {
        if self.is_empty() {
            bail!("no evaluation rows");
        }
        let (mut gold, mut predicted, mut groups) = (Vec::new(), Vec::new(), Vec::new());
        for part in &self.parts {
            let scores = score_continuations(model, &part.prompts, &part.answers, batch_size)?;
            for totals in &scores {
                // `max_by` keeps the last of equal scores, as MNLI's rank mode does.
                let best = (0..totals.len())
                    .max_by(|&a, &b| totals[a].total_cmp(&totals[b]))
                    .expect("at least two answers");
                predicted.push(Some(part.classes[best]));
            }
            gold.extend_from_slice(&part.gold);
            groups.extend(part.groups.iter().cloned());
        }
        let group_by = self.group_by.as_ref().map(|g| g.column.as_str());
        Ok(summarize(
            &Summary {
                task: "classify",
                mode: EvalMode::Rank,
                labels: &self.labels,
                badly_formed_column: false,
                groups: group_by.map(|column| (column, groups.as_slice())),
            },
            &gold,
            &predicted,
        ))
    }
}

/// The distinct targets of the rows, in order of first appearance, named by their text (eos and
/// surrounding spaces left out, unless that makes two names the same).
fn distinct_targets(origin: &str, rendered: &[Rendered]) -> Result<Vec<(String, String)>> {
    let mut seen = HashSet::new();
    let mut targets = Vec::new();
    for row in rendered {
        if seen.insert(row.target.as_str()) {
            targets.push(row.target.clone());
            if targets.len() > MAX_CLASSES {
                let distinct = rendered
                    .iter()
                    .map(|r| r.target.as_str())
                    .collect::<HashSet<_>>()
                    .len();
                bail!(
                    "{origin}: {distinct} distinct targets among {} rows, more than {MAX_CLASSES}: \
                     classify ranks a fixed set of answers (a {{label}} with a label map, or \
                     completions that repeat); free-form targets are generation — use the \
                     perplexity task or `kiln generate`",
                    rendered.len()
                );
            }
        }
    }
    let bare = |t: &str| t.strip_suffix(EOS_TOKEN).unwrap_or(t).to_string();
    let short: Vec<String> = targets.iter().map(|t| bare(t).trim().to_string()).collect();
    Ok(targets
        .iter()
        .zip(&short)
        .map(|(target, name)| {
            let unique = short.iter().filter(|n| *n == name).count() == 1;
            let name = match !name.is_empty() && unique {
                true => name.clone(),
                false => format!("{:?}", bare(target)),
            };
            (name, target.clone())
        })
        .collect())
}

fn names(answers: &[(String, String)]) -> String {
    answers
        .iter()
        .map(|(name, _)| name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Each row's value in the grouping column: a source column, or a template field that `columns`
/// maps to one.
fn group_values(dataset: &LoadedDataset, group_by: &GroupBy) -> Result<Vec<Option<String>>> {
    let records = &dataset.records;
    let column = match records.columns.contains(&group_by.column) {
        true => &group_by.column,
        false => match dataset.spec.columns.get(&group_by.column) {
            Some(mapped) if records.columns.contains(mapped) => mapped,
            _ => bail!(
                "{}: {} names column {:?}, which the data does not have; columns: {}",
                records.origin,
                group_by.option,
                group_by.column,
                records.columns.join(", ")
            ),
        },
    };
    Ok(records
        .rows
        .iter()
        .map(|row| match row.get(column) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
        })
        .collect())
}
