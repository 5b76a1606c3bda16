//! The classification report MNLI and `classify` share: accuracy, per-label precision / recall /
//! F1, a confusion matrix (JSON, markdown and an SVG picture) and per-group accuracy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::recipe::EvalMode;

/// The extra column of the confusion matrix: answers that are not a label.
pub const BADLY_FORMED: &str = "badly formed";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelMetrics {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupAccuracy {
    pub n: usize,
    pub accuracy: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassReport {
    /// `mnli` or `classify`.
    pub task: String,
    pub split: String,
    pub mode: EvalMode,
    pub n: usize,
    pub correct: usize,
    pub accuracy: f64,
    /// Answers that were no label (MNLI's generate mode; always 0 when ranking).
    pub badly_formed: usize,
    /// The classes, in the order of the confusion matrix's rows and first columns.
    #[serde(default)]
    pub labels: Vec<String>,
    /// Rows: gold label; columns: predicted label, then (MNLI only) "badly formed".
    pub confusion: Vec<Vec<usize>>,
    pub per_label: BTreeMap<String, LabelMetrics>,
    /// The column `per_group` splits the rows by (MNLI: `genre`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_by: Option<String>,
    /// Accuracy of the rows with each value of `group_by` (rows without one are left out).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub per_group: BTreeMap<String, GroupAccuracy>,
    /// MNLI's name for `per_group` by genre, kept for readers of earlier reports; only MNLI
    /// reports carry it.
    #[serde(default)]
    pub per_genre: BTreeMap<String, GroupAccuracy>,
    pub model: String,
    /// sha256 over the model's weight files, in name order.
    pub model_sha256: String,
    pub date: String,
}

/// What [`summarize`] needs besides gold labels and predictions.
pub struct Summary<'a> {
    pub task: &'a str,
    pub mode: EvalMode,
    pub labels: &'a [String],
    /// Whether the confusion matrix has a "badly formed" column for answers that are no label.
    pub badly_formed_column: bool,
    /// The grouping column and each row's value in it.
    pub groups: Option<(&'a str, &'a [Option<String>])>,
}

/// Accuracy, confusion matrix, per-label and per-group figures. `gold[i]` and `predicted[i]`
/// index `labels`; a `None` prediction is badly formed (and wrong).
pub fn summarize(spec: &Summary, gold: &[usize], predicted: &[Option<usize>]) -> ClassReport {
    assert_eq!(gold.len(), predicted.len());
    let k = spec.labels.len();
    let columns = k + usize::from(spec.badly_formed_column);
    let mut confusion = vec![vec![0usize; columns]; k];
    let mut badly_formed = 0;
    for (&g, &p) in gold.iter().zip(predicted) {
        match p {
            Some(p) => confusion[g][p] += 1,
            None => {
                badly_formed += 1;
                // Without the column a badly formed answer has nowhere to go; ranking never gives one.
                if spec.badly_formed_column {
                    confusion[g][k] += 1;
                }
            }
        }
    }
    let n = gold.len();
    let correct: usize = (0..k).map(|i| confusion[i][i]).sum();
    let per_label = spec
        .labels
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let predicted: usize = (0..k).map(|g| confusion[g][i]).sum();
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
            (name.clone(), metrics)
        })
        .collect();
    let per_group = match spec.groups {
        Some((_, values)) => {
            assert_eq!(values.len(), n);
            let mut groups: BTreeMap<String, (usize, usize)> = BTreeMap::new();
            for ((value, &g), &p) in values.iter().zip(gold).zip(predicted) {
                if let Some(value) = value {
                    let entry = groups.entry(value.clone()).or_default();
                    entry.0 += 1;
                    entry.1 += usize::from(p == Some(g));
                }
            }
            groups
                .into_iter()
                .map(|(value, (n, c))| {
                    let accuracy = ratio(c, n);
                    (value, GroupAccuracy { n, accuracy })
                })
                .collect()
        }
        None => BTreeMap::new(),
    };
    ClassReport {
        task: spec.task.to_string(),
        split: String::new(),
        mode: spec.mode,
        n,
        correct,
        accuracy: ratio(correct, n),
        badly_formed,
        labels: spec.labels.to_vec(),
        confusion,
        per_label,
        group_by: spec.groups.map(|(column, _)| column.to_string()),
        per_group,
        per_genre: BTreeMap::new(),
        model: String::new(),
        model_sha256: String::new(),
        date: utc_now(),
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

pub fn utc_now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

impl ClassReport {
    /// The confusion matrix's column names.
    pub fn columns(&self) -> Vec<String> {
        let mut columns = self.labels.clone();
        if self.confusion.first().map_or(0, Vec::len) > self.labels.len() {
            columns.push(BADLY_FORMED.to_string());
        }
        columns
    }

    /// `report.json`'s content.
    pub fn to_json(&self) -> Result<String> {
        let mut value = serde_json::to_value(self)?;
        if self.task != "mnli" {
            if let Some(map) = value.as_object_mut() {
                map.remove("per_genre");
            }
        }
        Ok(serde_json::to_string_pretty(&value)? + "\n")
    }
}

/// Writes `report.json`, `report.md` and `confusion.svg` into `dir`, each atomically.
pub fn write_report(dir: &Path, report: &ClassReport) -> Result<Vec<PathBuf>> {
    let files = [
        ("report.json", report.to_json()?),
        ("report.md", report_markdown(report)),
        ("confusion.svg", confusion_svg(report)),
    ];
    write_files(dir, &files)
}

pub(crate) fn write_files(dir: &Path, files: &[(&str, String)]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let mut written = Vec::new();
    for (name, content) in files {
        let path = dir.join(name);
        crate::atomic_file::write(&path, content.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

/// A markdown table cell: pipes and newlines would break the table.
pub(crate) fn md_cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', "\\n")
}

fn report_markdown(r: &ClassReport) -> String {
    let title = match r.task.as_str() {
        "mnli" => "MNLI evaluation".to_string(),
        task => format!("Evaluation: {task}"),
    };
    let mut md = format!(
        "# {title}\n\n| | |\n|---|---|\n| model | `{}` |\n| weights sha256 | `{}` |\n\
         | split | {} |\n| mode | {:?} |\n| examples | {} |\n| accuracy | {:.2}% ({} / {}) |\n\
         | badly formed | {} |\n| date | {} |\n\n## Per label\n\n| label | precision | recall | F1 | support |\n|---|---|---|---|---|\n",
        r.model,
        r.model_sha256,
        md_cell(&r.split),
        r.mode,
        r.n,
        100.0 * r.accuracy,
        r.correct,
        r.n,
        r.badly_formed,
        r.date
    );
    // Per label in the matrix's order, so both tables read the same way.
    for label in &r.labels {
        if let Some(m) = r.per_label.get(label) {
            md += &format!(
                "| {} | {:.4} | {:.4} | {:.4} | {} |\n",
                md_cell(label),
                m.precision,
                m.recall,
                m.f1,
                m.support
            );
        }
    }
    let columns = r.columns();
    md += &format!(
        "\n## Confusion matrix (rows: gold, columns: predicted)\n\n| gold \\ predicted | {} |\n|---|{}\n",
        columns
            .iter()
            .map(|c| md_cell(c))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(columns.len())
    );
    for (label, row) in r.labels.iter().zip(&r.confusion) {
        let cells: Vec<String> = row.iter().map(|c| c.to_string()).collect();
        md += &format!("| {} | {} |\n", md_cell(label), cells.join(" | "));
    }
    let (heading, groups) = match r.task.as_str() {
        "mnli" => ("genre".to_string(), &r.per_genre),
        _ => (
            r.group_by.clone().unwrap_or_else(|| "group".into()),
            &r.per_group,
        ),
    };
    if !groups.is_empty() {
        md += &format!(
            "\n## Per {}\n\n| {} | examples | accuracy |\n|---|---|---|\n",
            md_cell(&heading),
            md_cell(&heading)
        );
        for (group, g) in groups {
            md += &format!(
                "| {} | {} | {:.2}% |\n",
                md_cell(group),
                g.n,
                100.0 * g.accuracy
            );
        }
    }
    md
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `text` cut to `chars` characters (with an ellipsis), for a label that must fit its cell.
fn fit(text: &str, chars: usize) -> String {
    let text = text.replace('\n', " ");
    if text.chars().count() <= chars {
        text
    } else {
        text.chars()
            .take(chars.saturating_sub(1))
            .collect::<String>()
            + "…"
    }
}

/// A heat map of the confusion matrix, darker for larger shares of each gold row. Cells shrink
/// as classes are added so that the picture stays about as wide as MNLI's; names that do not
/// fit are cut, with the whole name as a tooltip.
fn confusion_svg(r: &ClassReport) -> String {
    let columns = r.columns();
    let rows = r.labels.len();
    let cell = (800 / columns.len().max(1)).clamp(24, 110);
    let (left, top) = (150, 90);
    let width = left + columns.len() * cell + 20;
    let height = top + rows * cell + 40;
    let font = if cell >= 60 { 14 } else { 10 };
    let count_font = if cell >= 60 { 18 } else { 10 };
    let title = match r.task.as_str() {
        "mnli" => "MNLI confusion matrix".to_string(),
        task => format!("{task} confusion matrix"),
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"sans-serif\" font-size=\"{font}\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"16\">{}: accuracy {:.1}% of {}</text>\n\
         <text x=\"{}\" y=\"50\" text-anchor=\"middle\">predicted</text>\n",
        width / 2,
        xml_escape(&title),
        100.0 * r.accuracy,
        r.n,
        left + columns.len() * cell / 2
    );
    let fits = (cell / 8).max(3);
    for (j, name) in columns.iter().enumerate() {
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\"><title>{}</title>{}</text>\n",
            left + j * cell + cell / 2,
            top - 10,
            xml_escape(name),
            xml_escape(&fit(name, fits))
        );
    }
    for (i, gold) in r.labels.iter().enumerate() {
        let y = top + i * cell;
        svg += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\"><title>{}</title>{}</text>\n",
            left - 10,
            y + cell / 2 + 5,
            xml_escape(gold),
            xml_escape(&fit(gold, 18))
        );
        let row_total: usize = r.confusion[i].iter().sum();
        for (j, &count) in r.confusion[i].iter().enumerate() {
            let share = if row_total == 0 {
                0.0
            } else {
                count as f64 / row_total as f64
            };
            let shade = (255.0 - 200.0 * share) as u8;
            let ink = if share > 0.5 { "white" } else { "black" };
            svg += &format!(
                "<rect x=\"{}\" y=\"{y}\" width=\"{cell}\" height=\"{cell}\" fill=\"rgb({shade},{shade},255)\" stroke=\"#888\"/>\n\
                 <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"{ink}\" font-size=\"{count_font}\">{count}</text>\n",
                left + j * cell,
                left + j * cell + cell / 2,
                y + cell / 2 + count_font / 3
            );
        }
    }
    svg += &format!(
        "<text x=\"20\" y=\"{}\" transform=\"rotate(-90 20 {})\" text-anchor=\"middle\">gold</text>\n</svg>\n",
        top + rows * cell / 2,
        top + rows * cell / 2
    );
    svg
}
