//! The built-in MNLI evaluator.
//!
//! `generate` mode is Graphcore's validation protocol for `gptj-mnli`: prompt
//! `mnli hypothesis: {hypothesis} premise: {premise} target:`, greedy decoding of up to 5 new
//! tokens, the text up to the first newline with `<|endoftext|>` and spaces stripped, compared
//! with the label word; anything else is "badly formed" and counts as wrong.
//! `rank` mode scores the continuations ` entailment<|endoftext|>`, ` neutral<|endoftext|>` and
//! ` contradiction<|endoftext|>` (the training target of the `mnli` template) by their summed
//! log-likelihood and picks the best, so it never produces a badly formed answer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::source::{load_records, Records};
use crate::generate::{generate, GenerationParams};
use crate::model::Model;
use crate::recipe::{EvalMode, SourceSpec};
use crate::tokenizer::{TextTokenizer, EOS_TOKEN};

pub const LABELS: [&str; 3] = ["entailment", "neutral", "contradiction"];
/// The extra column of the confusion matrix: answers that are not a label.
pub const BADLY_FORMED: &str = "badly formed";
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelMetrics {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MnliReport {
    pub task: String,
    pub split: String,
    pub mode: EvalMode,
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    pub badly_formed: usize,
    /// Rows: gold label; columns: predicted label, then "badly formed".
    pub confusion: [[usize; 4]; 3],
    pub per_label: BTreeMap<String, LabelMetrics>,
    pub per_genre: BTreeMap<String, GenreAccuracy>,
    pub model: String,
    /// sha256 over the model's weight files, in name order.
    pub model_sha256: String,
    pub date: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenreAccuracy {
    pub n: usize,
    pub accuracy: f64,
}

/// Accuracy, confusion matrix and per-label / per-genre figures from gold rows and predictions.
pub fn summarize(rows: &[NliRow], predictions: &[Prediction], mode: EvalMode) -> MnliReport {
    assert_eq!(rows.len(), predictions.len());
    let mut confusion = [[0usize; 4]; 3];
    let mut genres: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (row, prediction) in rows.iter().zip(predictions) {
        let column = prediction.label.unwrap_or(3);
        confusion[row.label][column] += 1;
        if let Some(genre) = &row.genre {
            let entry = genres.entry(genre.clone()).or_default();
            entry.0 += 1;
            entry.1 += usize::from(prediction.label == Some(row.label));
        }
    }
    let n = rows.len();
    let correct: usize = (0..3).map(|i| confusion[i][i]).sum();
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let per_label = LABELS
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let predicted: usize = (0..3).map(|g| confusion[g][i]).sum();
            let support: usize = confusion[i].iter().sum();
            let precision = ratio(confusion[i][i], predicted);
            let recall = ratio(confusion[i][i], support);
            let f1 = if precision + recall == 0.0 {
                0.0
            } else {
                2.0 * precision * recall / (precision + recall)
            };
            let metrics = LabelMetrics {
                precision,
                recall,
                f1,
                support,
            };
            (name.to_string(), metrics)
        })
        .collect();
    let per_genre = genres
        .into_iter()
        .map(|(g, (n, c))| {
            (
                g,
                GenreAccuracy {
                    n,
                    accuracy: ratio(c, n),
                },
            )
        })
        .collect();
    MnliReport {
        task: "mnli".into(),
        split: String::new(),
        mode,
        n,
        correct,
        accuracy: ratio(correct, n),
        badly_formed: (0..3).map(|g| confusion[g][3]).sum(),
        confusion,
        per_label,
        per_genre,
        model: String::new(),
        model_sha256: String::new(),
        date: utc_now(),
    }
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
    let path = PathBuf::from(source);
    let spec = if path.is_file() {
        SourceSpec {
            path: Some(path),
            ..empty_source()
        }
    } else if path.is_dir() {
        let split = split
            .with_context(|| format!("{source} is a directory: name the split with --split"))?;
        SourceSpec {
            path: Some(path.join(format!("{split}.jsonl"))),
            ..empty_source()
        }
    } else if source.contains('/') && !source.starts_with('.') && !source.starts_with('/') {
        SourceSpec {
            hub: Some(source.to_string()),
            config: Some("mnli".into()),
            split: Some(split.unwrap_or("validation_matched").to_string()),
            ..empty_source()
        }
    } else {
        bail!("{source}: no such file or directory (nor a Hub dataset id like nyu-mll/glue)");
    };
    let records = load_records(&spec, Path::new("."), limit)?;
    if records.rows.is_empty() {
        bail!("{}: no rows", records.origin);
    }
    nli_rows(&records)
}

fn empty_source() -> SourceSpec {
    SourceSpec {
        path: None,
        format: None,
        hub: None,
        config: None,
        split: None,
        revision: None,
    }
}

/// sha256 over the weight files of a model directory (`model*.safetensors` and
/// `pytorch_model*.bin`), in name order.
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
            (name.starts_with("model") && name.ends_with(".safetensors"))
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

fn utc_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Writes `report.json`, `report.md` and `confusion.svg` into `dir`, each atomically.
pub fn write_report(dir: &Path, report: &MnliReport) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let files = [
        ("report.json", serde_json::to_string_pretty(report)? + "\n"),
        ("report.md", report_markdown(report)),
        ("confusion.svg", confusion_svg(report)),
    ];
    let mut written = Vec::new();
    for (name, content) in files {
        let path = dir.join(name);
        crate::atomic_file::write(&path, content.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

fn report_markdown(r: &MnliReport) -> String {
    let mut md = format!(
        "# MNLI evaluation\n\n| | |\n|---|---|\n| model | `{}` |\n| weights sha256 | `{}` |\n\
         | split | {} |\n| mode | {:?} |\n| examples | {} |\n| accuracy | {:.2}% ({} / {}) |\n\
         | badly formed | {} |\n| date | {} |\n\n## Per label\n\n| label | precision | recall | F1 | support |\n|---|---|---|---|---|\n",
        r.model, r.model_sha256, r.split, r.mode, r.n, 100.0 * r.accuracy, r.correct, r.n,
        r.badly_formed, r.date
    );
    for (label, m) in &r.per_label {
        md += &format!(
            "| {label} | {:.4} | {:.4} | {:.4} | {} |\n",
            m.precision, m.recall, m.f1, m.support
        );
    }
    md += "\n## Confusion matrix (rows: gold, columns: predicted)\n\n| gold \\ predicted | entailment | neutral | contradiction | badly formed |\n|---|---|---|---|---|\n";
    for (i, label) in LABELS.iter().enumerate() {
        let cells: Vec<String> = r.confusion[i].iter().map(|c| c.to_string()).collect();
        md += &format!("| {label} | {} |\n", cells.join(" | "));
    }
    if !r.per_genre.is_empty() {
        md += "\n## Per genre\n\n| genre | examples | accuracy |\n|---|---|---|\n";
        for (genre, g) in &r.per_genre {
            md += &format!("| {genre} | {} | {:.2}% |\n", g.n, 100.0 * g.accuracy);
        }
    }
    md
}

/// A heat map of the confusion matrix, darker for larger shares of each gold row.
fn confusion_svg(r: &MnliReport) -> String {
    let (cell, left, top) = (110, 150, 90);
    let width = left + 4 * cell + 20;
    let height = top + 3 * cell + 40;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"14\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"16\">MNLI confusion matrix: accuracy {:.1}% of {}</text>\n\
         <text x=\"{}\" y=\"50\" text-anchor=\"middle\">predicted</text>\n",
        width / 2, 100.0 * r.accuracy, r.n, left + 2 * cell
    );
    let columns = [LABELS[0], LABELS[1], LABELS[2], BADLY_FORMED];
    for (j, name) in columns.iter().enumerate() {
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{name}</text>\n",
            left + j * cell + cell / 2,
            top - 10
        );
    }
    for (i, gold) in LABELS.iter().enumerate() {
        let y = top + i * cell;
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{gold}</text>\n",
            left - 10,
            y + cell / 2 + 5
        );
        let row_total: usize = r.confusion[i].iter().sum();
        for j in 0..4 {
            let count = r.confusion[i][j];
            let share = if row_total == 0 {
                0.0
            } else {
                count as f64 / row_total as f64
            };
            let shade = (255.0 - 200.0 * share) as u8;
            let ink = if share > 0.5 { "white" } else { "black" };
            svg += &format!(
                "<rect x=\"{}\" y=\"{y}\" width=\"{cell}\" height=\"{cell}\" fill=\"rgb({shade},{shade},255)\" stroke=\"#888\"/>\n\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{ink}\" font-size=\"18\">{count}</text>\n",
                left + j * cell,
                left + j * cell + cell / 2,
                y + cell / 2 + 6
            );
        }
    }
    svg += &format!(
        "<text x=\"20\" y=\"{}\" transform=\"rotate(-90 20 {})\" text-anchor=\"middle\">gold</text>\n</svg>\n",
        top + 3 * cell / 2,
        top + 3 * cell / 2
    );
    svg
}
