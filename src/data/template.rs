//! Casting rows to text: a prompt and a target, each a template with `{field}` placeholders.
//!
//! The split between prompt and target is kept so that the loss can cover only the target.
//! `{{` and `}}` write literal braces.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use rand::SeedableRng;
use serde_json::Value;

use super::source::Records;
use crate::recipe::template::Piece;
pub use crate::recipe::template::{Preset, Template};
use crate::recipe::DatasetSpec;
use crate::tokenizer::EOS_TOKEN;

/// The field whose values go through the label map.
pub const LABEL_FIELD: &str = "label";

/// One example as text: the model sees `prompt + target`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rendered {
    /// `file:line N` of the source row.
    pub origin: String,
    /// Few-shot prefix (if any) and the prompt.
    pub prompt: String,
    pub target: String,
    /// The label word, when the template has a `{label}`.
    pub label: Option<String>,
    /// Conversations: the byte ranges of the text that are the assistant's turns (the prompt
    /// is the whole conversation, the target empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub assistant: Vec<(usize, usize)>,
}

impl Rendered {
    pub fn text(&self) -> String {
        format!("{}{}", self.prompt, self.target)
    }
}

/// A dataset's template bound to its rows: field → column, label map, few-shot pool.
#[derive(Debug)]
pub struct Caster<'a> {
    records: &'a Records,
    template: Template,
    /// template field → source column
    columns: BTreeMap<String, String>,
    label_map: Option<BTreeMap<String, String>>,
    few_shot: Option<(usize, u64)>,
}

/// Shots are separated from each other and from the example by a blank line.
pub const SHOT_SEPARATOR: &str = "\n\n";

impl<'a> Caster<'a> {
    /// Binds a dataset spec to its records, checking that every placeholder names a column.
    pub fn new(spec: &DatasetSpec, records: &'a Records) -> Result<Self> {
        let template = Template::from_spec(&spec.template)?;
        let mut columns = BTreeMap::new();
        for field in template.fields() {
            let column = spec
                .columns
                .get(field)
                .cloned()
                .unwrap_or_else(|| field.to_string());
            if !records.columns.contains(&column) {
                let via = if column == field {
                    String::new()
                } else {
                    format!(" (mapped from template field {{{field}}} by `columns`)")
                };
                bail!(
                    "{}: the template uses column {column:?}{via}, which the data does not have; \
                     columns: {}",
                    records.origin,
                    records.columns.join(", ")
                );
            }
            columns.insert(field.to_string(), column);
        }
        let label_map = spec
            .label_map
            .clone()
            .or_else(|| template.preset().and_then(Preset::default_label_map))
            .or_else(|| {
                let column = columns.get(LABEL_FIELD)?;
                let names = records.class_labels.get(column)?;
                Some(
                    names
                        .iter()
                        .enumerate()
                        .map(|(i, n)| (i.to_string(), n.clone()))
                        .collect(),
                )
            });
        let few_shot = match &spec.few_shot {
            Some(few) if few.k >= records.len() => bail!(
                "{}: few_shot.k = {} needs more than {} rows (the example itself is excluded)",
                records.origin,
                few.k,
                records.len()
            ),
            Some(few) => Some((few.k, few.seed)),
            None => None,
        };
        Ok(Self {
            records,
            template,
            columns,
            label_map,
            few_shot,
        })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The template's prompt writes nothing (as the `text` preset's): every row is all target.
    pub fn prompt_is_empty(&self) -> bool {
        self.template.prompt.is_empty()
    }

    /// The target written with each label word, as `(word, target)` in label order (the label
    /// map's keys as numbers when they all are, as class indices are), each word once: the fixed
    /// set of answers a classifier ranks. `None` when there is no label map or the target uses
    /// another field than `{label}` (then its answers are not fixed).
    pub fn label_targets(&self) -> Option<Vec<(String, String)>> {
        let map = self.label_map.as_ref()?;
        let mut uses_label = false;
        for piece in &self.template.target {
            match piece {
                Piece::Field(f) if f == LABEL_FIELD => uses_label = true,
                Piece::Field(_) => return None,
                Piece::Text(_) => {}
            }
        }
        if !uses_label {
            return None;
        }
        let mut entries: Vec<(&String, &String)> = map.iter().collect();
        if entries.iter().all(|(k, _)| k.parse::<i64>().is_ok()) {
            entries.sort_by_key(|(k, _)| k.parse::<i64>().unwrap_or_default());
        }
        let mut targets: Vec<(String, String)> = Vec::new();
        for (_, word) in entries {
            if targets.iter().any(|(w, _)| w == word) {
                continue;
            }
            let target = self
                .template
                .target
                .iter()
                .map(|piece| match piece {
                    Piece::Text(t) => t.as_str(),
                    Piece::Field(_) => word.as_str(),
                })
                .collect();
            targets.push((word.clone(), target));
        }
        Some(targets)
    }

    /// Row `i` as text, with its few-shot prefix.
    pub fn render(&self, i: usize) -> Result<Rendered> {
        let (prompt, target, label) = self.render_plain(i)?;
        let prompt = match self.few_shot {
            None => prompt,
            Some((k, seed)) => {
                let mut prefix = String::new();
                for shot in self.shots(i, k, seed) {
                    let (p, t, _) = self.render_plain(shot)?;
                    let t = t.strip_suffix(EOS_TOKEN).unwrap_or(&t);
                    prefix.push_str(&p);
                    prefix.push_str(t);
                    prefix.push_str(SHOT_SEPARATOR);
                }
                prefix + &prompt
            }
        };
        Ok(Rendered {
            origin: self.records.locate(i),
            prompt,
            target,
            label,
            assistant: Vec::new(),
        })
    }

    /// `k` distinct other rows for row `i`, a function of (seed, i) only.
    fn shots(&self, i: usize, k: usize, seed: u64) -> Vec<usize> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(
            seed ^ (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        rand::seq::index::sample(&mut rng, self.records.len() - 1, k)
            .into_iter()
            .map(|j| if j >= i { j + 1 } else { j })
            .collect()
    }

    fn render_plain(&self, i: usize) -> Result<(String, String, Option<String>)> {
        let row = &self.records.rows[i];
        let mut label = None;
        let mut value_of = |field: &str| -> Result<String> {
            let column = &self.columns[field];
            let value = row.get(column).ok_or_else(|| {
                anyhow!(
                    "{}: no column {column:?} in this row; it has: {}",
                    self.records.locate(i),
                    row.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })?;
            if field == LABEL_FIELD {
                let word = self.label_word(i, column, value)?;
                label = Some(word.clone());
                return Ok(word);
            }
            match value {
                Value::String(s) => Ok(s.clone()),
                Value::Null => bail!("{}: column {column:?} is null", self.records.locate(i)),
                Value::Number(n) => Ok(n.to_string()),
                Value::Bool(b) => Ok(b.to_string()),
                other => Ok(other.to_string()),
            }
        };
        let mut fill = |pieces: &[Piece]| -> Result<String> {
            let mut out = String::new();
            for piece in pieces {
                match piece {
                    Piece::Text(t) => out.push_str(t),
                    Piece::Field(f) => out.push_str(&value_of(f)?),
                }
            }
            Ok(out)
        };
        let prompt = fill(&self.template.prompt)?;
        let target = fill(&self.template.target)?;
        Ok((prompt, target, label))
    }

    fn label_word(&self, i: usize, column: &str, value: &Value) -> Result<String> {
        let key = match value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Null => bail!(
                "{}: label column {column:?} is null",
                self.records.locate(i)
            ),
            other => bail!(
                "{}: label column {column:?} holds {other}, expected a string or an integer",
                self.records.locate(i)
            ),
        };
        let Some(map) = &self.label_map else {
            return Ok(key);
        };
        if let Some(word) = map.get(&key) {
            return Ok(word.clone());
        }
        // Data that already spells the label words (GLUE TSV's gold_label) needs no mapping.
        if value.is_string() && map.values().any(|w| *w == key) {
            return Ok(key);
        }
        let known: Vec<String> = map.iter().map(|(k, v)| format!("{k} → {v}")).collect();
        bail!(
            "{}: unknown label {value} in column {column:?} (label map: {})",
            self.records.locate(i),
            known.join(", ")
        )
    }
}
