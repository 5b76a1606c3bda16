//! The built-in MNLI evaluator.
//!
//! `generate` mode is Graphcore's validation protocol for `gptj-mnli`: prompt
//! `mnli hypothesis: {hypothesis} premise: {premise} target:`, greedy decoding of up to 5 new
//! tokens, the text up to the first newline with `<|endoftext|>` and spaces stripped, compared
//! with the label word; anything else is "badly formed" and counts as wrong.
//! `rank` mode scores the continuations ` entailment<|endoftext|>`, ` neutral<|endoftext|>` and
//! ` contradiction<|endoftext|>` (the training target of the `mnli` template) by their summed
//! log-likelihood and picks the best, so it never produces a badly formed answer.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::source::{load_records, Records};
use crate::generate::{generate, GenerationParams};
use crate::model::Model;
use crate::recipe::{EvalMode, SourceSpec};
use crate::tokenizer::{TextTokenizer, EOS_TOKEN};

pub const LABELS: [&str; 3] = ["entailment", "neutral", "contradiction"];
/// Graphcore's decoding budget: every label word is at most a few tokens.
pub const MAX_NEW_TOKENS: usize = 5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NliRow {
    pub premise: String,
    pub hypothesis: String,
    /// 0 entailment, 1 neutral, 2 contradiction (GLUE's order).
    pub label: usize,
    pub genre: Option<String>,
}

pub fn prompt(premise: &str, hypothesis: &str) -> String {
    format!("mnli hypothesis: {hypothesis} premise: {premise} target:")
}

/// Graphcore's reading of a completion: the label index, or `None` when badly formed.
pub fn parse_completion(completion: &str) -> Option<usize> {
    let first_line = completion.split('\n').next().unwrap_or("");
    let answer = first_line.replace(EOS_TOKEN, "");
    LABELS.iter().position(|l| *l == answer.trim())
}

/// Premise/hypothesis pairs in, labels out: `GPTJEntailmentPipeline` as a library type.
pub struct EntailmentPipeline<'a> {
    pub model: &'a Model,
    pub tokenizer: &'a TextTokenizer,
    pub mode: EvalMode,
    pub batch_size: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// Index into `LABELS`, or `None` when the model's answer was not a label.
    pub label: Option<usize>,
    /// What the model wrote (generate mode) or the winning continuation (rank mode).
    pub raw: String,
}

impl Prediction {
    pub fn label_name(&self) -> &'static str {
        self.label.map_or(BADLY_FORMED, |l| LABELS[l])
    }
}

impl EntailmentPipeline<'_> {
    pub fn predict(&self, pairs: &[(&str, &str)]) -> Result<Vec<Prediction>> {
        match self.mode {
            EvalMode::Generate => self.predict_generate(pairs),
            EvalMode::Rank => self.predict_rank(pairs),
        }
    }

    fn prompt_ids(&self, pairs: &[(&str, &str)]) -> Result<Vec<Vec<u32>>> {
        pairs
            .iter()
            .map(|(p, h)| self.tokenizer.encode(&prompt(p, h)))
            .collect()
    }

    fn predict_generate(&self, pairs: &[(&str, &str)]) -> Result<Vec<Prediction>> {
        let params = GenerationParams {
            max_new_tokens: MAX_NEW_TOKENS,
            truncate_left: true,
            ..Default::default()
        };
        let prompts = self.prompt_ids(pairs)?;
        // Batches of similar lengths: a left-padded batch computes as long as its longest prompt.
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(prompts[i].len()));
        let mut predictions = vec![None; pairs.len()];
        for chunk in order.chunks(self.batch_size.max(1)) {
            let batch: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
            let generated = generate(
                self.model,
                Some(self.tokenizer),
                &batch,
                &params,
                &mut |_, _| {},
            )?;
            for (&i, generated) in chunk.iter().zip(generated) {
                // Keep special tokens so the completion is read exactly as Graphcore reads it.
                let raw = self.tokenizer.decode(&generated.ids, false)?;
                predictions[i] = Some(Prediction {
                    label: parse_completion(&raw),
                    raw,
                });
            }
        }
        Ok(predictions
            .into_iter()
            .map(|p| p.expect("every pair predicted"))
            .collect())
    }

    fn predict_rank(&self, pairs: &[(&str, &str)]) -> Result<Vec<Prediction>> {
        let continuations: Vec<Vec<u32>> = LABELS
            .iter()
            .map(|l| self.tokenizer.encode(&format!(" {l}{EOS_TOKEN}")))
            .collect::<Result<_>>()?;
        let prompts = self.prompt_ids(pairs)?;
        let scores = super::score::score_continuations(
            self.model,
            &prompts,
            &continuations,
            self.batch_size,
        )?;
        Ok(scores
            .iter()
            .map(|totals| {
                let best = (0..LABELS.len())
                    .max_by(|&a, &b| totals[a].total_cmp(&totals[b]))
                    .expect("three labels");
                Prediction {
                    label: Some(best),
                    raw: format!(" {}{EOS_TOKEN}", LABELS[best]),
                }
            })
            .collect())
    }
}

pub use super::report::{write_report, LabelMetrics, BADLY_FORMED};
/// The report of an MNLI evaluation: the shared classification report, with MNLI's three labels,
/// its "badly formed" column and `per_genre`.
pub type MnliReport = super::report::ClassReport;
pub type GenreAccuracy = super::report::GroupAccuracy;

/// Accuracy, confusion matrix and per-label / per-genre figures from gold rows and predictions.
pub fn summarize(rows: &[NliRow], predictions: &[Prediction], mode: EvalMode) -> MnliReport {
    assert_eq!(rows.len(), predictions.len());
    let labels: Vec<String> = LABELS.iter().map(|l| l.to_string()).collect();
    let gold: Vec<usize> = rows.iter().map(|r| r.label).collect();
    let predicted: Vec<Option<usize>> = predictions.iter().map(|p| p.label).collect();
    let genres: Vec<Option<String>> = rows.iter().map(|r| r.genre.clone()).collect();
    let mut report = super::report::summarize(
        &super::report::Summary {
            task: "mnli",
            mode,
            labels: &labels,
            // Generate mode can answer something that is no label; rank mode keeps the column
            // (always 0) so that both modes' reports have one shape.
            badly_formed_column: true,
            groups: Some(("genre", &genres)),
        },
        &gold,
        &predicted,
    );
    report.per_genre = report.per_group.clone();
    report
}

/// Runs the evaluator over `rows` (what `kiln eval` and the trainer's `eval.task: mnli` call).
pub fn evaluate_mnli(
    model: &Model,
    tokenizer: &TextTokenizer,
    rows: &[NliRow],
    mode: EvalMode,
    batch_size: usize,
) -> Result<MnliReport> {
    if rows.is_empty() {
        bail!("no evaluation rows");
    }
    let pipeline = EntailmentPipeline {
        model,
        tokenizer,
        mode,
        batch_size,
    };
    let pairs: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.premise.as_str(), r.hypothesis.as_str()))
        .collect();
    let predictions = pipeline.predict(&pairs)?;
    Ok(summarize(rows, &predictions, mode))
}

/// NLI rows from any data source; rows with a missing or unknown label are all reported at once.
pub fn nli_rows(records: &Records) -> Result<Vec<NliRow>> {
    for column in ["premise", "hypothesis", "label"] {
        if !records.columns.iter().any(|c| c == column) {
            bail!(
                "{}: no column {column:?} (columns: {})",
                records.origin,
                records.columns.join(", ")
            );
        }
    }
    let class_names = records.class_labels.get("label");
    let mut rows = Vec::with_capacity(records.rows.len());
    let mut bad = Vec::new();
    for (row, position) in records.rows.iter().zip(&records.positions) {
        let text = |key: &str| row.get(key).and_then(|v| v.as_str()).map(str::to_string);
        let label = match row.get("label") {
            Some(serde_json::Value::Number(n)) => n
                .as_u64()
                .map(|i| i as usize)
                .filter(|&i| i < 3)
                .filter(|&i| {
                    class_names.is_none_or(|names| names.get(i).is_some_and(|n| n == LABELS[i]))
                }),
            Some(serde_json::Value::String(s)) => LABELS.iter().position(|l| l == s),
            _ => None,
        };
        match (text("premise"), text("hypothesis"), label) {
            (Some(premise), Some(hypothesis), Some(label)) => rows.push(NliRow {
                premise,
                hypothesis,
                label,
                genre: text("genre"),
            }),
            _ => bad.push(format!(
                "{} {position}: label {}",
                records.unit,
                row.get("label")
                    .map_or("missing".to_string(), |v| v.to_string())
            )),
        }
    }
    if !bad.is_empty() {
        let shown: Vec<&String> = bad.iter().take(10).collect();
        bail!(
            "{}: {} rows lack a premise, a hypothesis or a label among 0/1/2 or {}: {}{}",
            records.origin,
            bad.len(),
            LABELS.join("/"),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("; "),
            if bad.len() > 10 { "; ..." } else { "" }
        );
    }
    Ok(rows)
}

/// `--data SOURCE [--split S]`: a file, a directory holding `S.jsonl`, or a Hub dataset id
/// (GLUE's `mnli` config, e.g. `nyu-mll/glue --split validation_mismatched`).
pub fn read_nli_rows(
    source: &str,
    split: Option<&str>,
    limit: Option<usize>,
) -> Result<Vec<NliRow>> {
    // GLUE's MNLI has no plain `validation` split: the Hub default is the matched one.
    let split = match Path::new(source).exists() {
        true => split,
        false => Some(split.unwrap_or("validation_matched")),
    };
    let spec = resolve_source(source, split, Some("mnli"))?;
    let records = load_records(&spec, Path::new("."), limit)?;
    if records.rows.is_empty() {
        bail!("{}: no rows", records.origin);
    }
    nli_rows(&records)
}

/// `--data SOURCE [--split S]` as a data source: a file, a directory holding `S.jsonl`, or a Hub
/// dataset id (with its `config`, and `split` which the Hub needs).
pub fn resolve_source(
    source: &str,
    split: Option<&str>,
    config: Option<&str>,
) -> Result<SourceSpec> {
    let path = PathBuf::from(source);
    let mut spec = SourceSpec {
        path: None,
        format: None,
        hub: None,
        config: None,
        split: None,
        revision: None,
    };
    if path.is_file() {
        spec.path = Some(path);
    } else if path.is_dir() {
        let split = split
            .with_context(|| format!("{source} is a directory: name the split with --split"))?;
        spec.path = Some(path.join(format!("{split}.jsonl")));
    } else if source.contains('/') && !source.starts_with('.') && !source.starts_with('/') {
        spec.hub = Some(source.to_string());
        spec.config = config.map(str::to_string);
        spec.split = Some(
            split
                .with_context(|| {
                    format!("{source}: a Hub dataset needs --split (e.g. validation)")
                })?
                .to_string(),
        );
    } else {
        bail!("{source}: no such file or directory (nor a Hub dataset id like nyu-mll/glue)");
    }
    Ok(spec)
}

/// sha256 over the weight files of a model directory (`model*.safetensors` and
/// `pytorch_model*.bin`), or of an adapter directory (`adapter_model.safetensors`), in name
/// order.
pub fn weights_sha256(dir: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            // The model's own weights only: a checkpoint's optimizer.safetensors is not the model.
            ((name.starts_with("model") || name.starts_with("adapter_model"))
                && name.ends_with(".safetensors"))
                || (name.starts_with("pytorch_model") && name.ends_with(".bin"))
        })
        .collect();
    files.sort();
    let mut hasher = Sha256::new();
    for file in files {
        let mut f = std::fs::File::open(&file)
            .with_context(|| format!("{}: cannot read", file.display()))?;
        std::io::copy(&mut f, &mut hasher)?;
    }
    Ok(hex::encode(hasher.finalize()))
}
