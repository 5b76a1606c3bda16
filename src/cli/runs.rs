//! `kiln runs`: list the runs of a log dir, compare runs, plot their curves.

use super::*;

use crate::track::plot::plot_runs;
use std::fmt::Write as _;

use crate::track::runs::{
    format_metric, is_run_dir, resolve_runs, sort_runs, summarize_log_dir, Comparison, Run,
    RunSummary, SortKey,
};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RunsArgs {
    #[command(subcommand)]
    pub command: Option<RunsCommand>,
    #[command(flatten)]
    pub list: ListArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// The log dir holding one directory per run (a recipe's `tracking.log_dir`).
    #[arg(value_name = "LOG_DIR", default_value = "runs")]
    pub log_dir: PathBuf,
    /// Order by a column (name, started, status, steps, wall, tokens_per_sec, commit, recipe;
    /// `loss` = train/loss, `accuracy` = eval/accuracy) or by any metric tag. Columns go
    /// ascending, tokens/s highest first. A metric whose higher values are better (accuracy, f1,
    /// bleu, rouge, exact_match, precision, recall, auc, *_per_sec) sorts by its best value,
    /// highest first; any other metric (losses, lr, ...) by its last value, lowest first. Runs
    /// without the value go last.
    #[arg(long, value_name = "COLUMN|METRIC", default_value = "started")]
    pub sort: String,
    /// Reverse the order --sort gives.
    #[arg(long)]
    pub reverse: bool,
    /// Print the runs as JSON (one array; field names are stable) instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Resolved-recipe keys that differ between runs (absent keys show as —), and the runs'
    /// metrics side by side.
    Compare(CompareArgs),
    /// Curves of several runs on one chart: one panel per --metric, one line per run.
    Plot(PlotArgs),
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Runs: names inside the log dir, or paths to run directories.
    #[arg(value_name = "RUN", num_args = 2.., required = true)]
    pub runs: Vec<String>,
    /// Where run names are looked up.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    pub log_dir: PathBuf,
    /// Print the comparison as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Runs: names inside the log dir, or paths to run directories.
    #[arg(value_name = "RUN", num_args = 1.., required = true)]
    pub runs: Vec<String>,
    /// A metric tag to plot (repeatable: one panel each, stacked).
    #[arg(long = "metric", value_name = "TAG", default_value = "train/loss")]
    pub metrics: Vec<String>,
    /// The image to write; .svg (needs no font) or .png (needs a TrueType font on the system,
    /// or KILN_FONT=/path/to/font.ttf).
    #[arg(long, value_name = "FILE.svg|FILE.png")]
    pub out: PathBuf,
    /// TensorBoard's smoothing weight, 0 (none) to below 1: a debiased exponential moving
    /// average. When set, only the smoothed lines are drawn.
    #[arg(long, value_name = "W", default_value_t = 0.0)]
    pub smooth: f64,
    /// Where run names are looked up.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    pub log_dir: PathBuf,
}

pub(super) fn runs(args: RunsArgs) -> Result<()> {
    match args.command {
        None => list(args.list),
        Some(RunsCommand::Compare(args)) => compare(args),
        Some(RunsCommand::Plot(args)) => plot(args),
    }
}

fn list(args: ListArgs) -> Result<()> {
    let key: SortKey = args.sort.parse()?;
    let mut runs = summarize_log_dir(&args.log_dir)?;
    if !runs.is_empty() {
        sort_runs(&mut runs, &key, args.reverse)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&runs)?);
        return Ok(());
    }
    for run in &runs {
        if let Some(error) = &run.error {
            eprintln!("warning: {}: {error}", run.path.display());
        }
    }
    if runs.is_empty() {
        let hint = if is_run_dir(&args.log_dir) {
            format!(
                " ({} is itself a run directory; its log dir is {})",
                args.log_dir.display(),
                args.log_dir
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .display()
            )
        } else {
            String::new()
        };
        println!("no runs in {}{hint}", args.log_dir.display());
        return Ok(());
    }
    print!("{}", render_table(&runs));
    Ok(())
}

fn load_runs(names: &[String], log_dir: &Path) -> Result<Vec<Run>> {
    resolve_runs(names, log_dir)?
        .iter()
        .map(|dir| Run::load(dir))
        .collect()
}

fn compare(args: CompareArgs) -> Result<()> {
    let runs = load_runs(&args.runs, &args.log_dir)?;
    let comparison = Comparison::of(&runs)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&comparison)?);
    } else {
        print!("{}", render_comparison(&comparison));
    }
    Ok(())
}

fn plot(args: PlotArgs) -> Result<()> {
    let runs = load_runs(&args.runs, &args.log_dir)?;
    for note in plot_runs(&runs, &args.metrics, args.smooth, &args.out)? {
        eprintln!("note: {note}");
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

/// The `kiln runs` table, columns aligned.
fn render_table(runs: &[RunSummary]) -> String {
    let header = [
        "name",
        "started (UTC)",
        "status",
        "steps",
        "train/loss",
        "best eval/accuracy",
        "tokens/s",
        "wall",
        "commit",
        "recipe",
    ];
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|run| {
            vec![
                run.name.clone(),
                run.started_at.map_or(NONE.into(), format_utc),
                run.status.as_str().to_string(),
                match (run.steps_done, run.total_steps) {
                    (Some(done), Some(total)) => format!("{done}/{total}"),
                    (Some(done), None) => done.to_string(),
                    (None, Some(total)) => format!("0/{total}"),
                    (None, None) => NONE.into(),
                },
                run.last_train_loss
                    .map_or(NONE.into(), |v| format!("{v:.4}")),
                match (run.best_eval_accuracy, run.best_eval_accuracy_step) {
                    (Some(v), Some(step)) => format!("{v:.4} @{step}"),
                    _ => NONE.into(),
                },
                run.tokens_per_sec
                    .map_or(NONE.into(), |v| format!("{v:.0}")),
                run.wall_seconds.map_or(NONE.into(), format_duration),
                run.git_commit
                    .as_deref()
                    .map_or(NONE.into(), |c| short(c, 7)),
                run.recipe_sha256
                    .as_deref()
                    .map_or(NONE.into(), |h| short(h, 8)),
            ]
        })
        .collect();
    let numeric = [
        false, false, false, true, true, true, true, true, false, false,
    ];
    align(&header, &rows, &numeric)
}

/// What is shown for an absent value.
const NONE: &str = "—";

fn short(text: &str, len: usize) -> String {
    text.chars().take(len).collect()
}

/// Columns padded to their widest cell (by characters, so "—" counts as one).
fn align(header: &[&str], rows: &[Vec<String>], right_aligned: &[bool]) -> String {
    let width = |s: &str| s.chars().count();
    let mut widths: Vec<usize> = header.iter().map(|h| width(h)).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(width(cell));
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let pad = widths[i] - width(cell);
            if i > 0 {
                line.push_str("  ");
            }
            if right_aligned.get(i).copied().unwrap_or(false) {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Unix seconds as `YYYY-MM-DD HH:MM` in UTC.
fn format_utc(unix_seconds: f64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_seconds.max(0.0) as u64);
    // RFC 3339 (`2026-11-30T22:49:12Z`), cut to the minute for a table.
    let stamp = humantime::format_rfc3339_seconds(time).to_string();
    stamp[..16].replacen('T', " ", 1)
}

/// `42s`, `3m05s`, `2h07m`.
fn format_duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// The `kiln runs compare` report: recipe differences, then run facts and metrics side by side.
fn render_comparison(comparison: &Comparison) -> String {
    let mut header = vec!["recipe key"];
    header.extend(comparison.runs.iter().map(|r| r.name.as_str()));
    let mut out = String::new();
    let missing_recipe: Vec<&str> = comparison
        .runs
        .iter()
        .filter(|r| !r.path.join("recipe.yaml").is_file())
        .map(|r| r.name.as_str())
        .collect();
    if !missing_recipe.is_empty() {
        let _ = writeln!(
            out,
            "no recipe.yaml in: {} (every key shows as {NONE} there)",
            missing_recipe.join(", ")
        );
    }
    if comparison.recipe_differences.is_empty() {
        let _ = writeln!(out, "recipes: identical ({} keys)", comparison.recipe_keys);
    } else {
        let _ = writeln!(
            out,
            "recipes: {} of {} keys differ",
            comparison.recipe_differences.len(),
            comparison.recipe_keys
        );
        let rows: Vec<Vec<String>> = comparison
            .recipe_differences
            .iter()
            .map(|d| {
                std::iter::once(d.key.clone())
                    .chain(d.values.iter().map(|v| v.clone().unwrap_or(NONE.into())))
                    .collect()
            })
            .collect();
        out.push_str(&align(&header, &rows, &[]));
    }
    out.push('\n');
    header[0] = "metric";
    let mut rows: Vec<Vec<String>> = vec![
        row(comparison, "status", |r| r.status.as_str().to_string()),
        row(comparison, "steps", |r| {
            match (r.steps_done, r.total_steps) {
                (Some(done), Some(total)) => format!("{done}/{total}"),
                (Some(done), None) => done.to_string(),
                _ => NONE.into(),
            }
        }),
        row(comparison, "wall", |r| {
            r.wall_seconds.map_or(NONE.into(), format_duration)
        }),
        row(comparison, "tokens/s (mean)", |r| {
            r.tokens_per_sec.map_or(NONE.into(), |v| format!("{v:.0}"))
        }),
    ];
    for metric in &comparison.metrics {
        let mut row = vec![format!("{} (last)", metric.tag)];
        row.extend(
            comparison
                .runs
                .iter()
                .map(|r| match r.metrics.get(&metric.tag) {
                    Some(stats) => format_metric(stats.last),
                    None => NONE.into(),
                }),
        );
        rows.push(row);
    }
    rows.push(row(comparison, "eval/accuracy (best)", |r| {
        match (r.best_eval_accuracy, r.best_eval_accuracy_step) {
            (Some(v), Some(step)) => format!("{} @{step}", format_metric(v)),
            _ => NONE.into(),
        }
    }));
    let right: Vec<bool> = std::iter::once(false)
        .chain(comparison.runs.iter().map(|_| true))
        .collect();
    out.push_str(&align(&header, &rows, &right));
    out
}

fn row(comparison: &Comparison, label: &str, cell: impl Fn(&RunSummary) -> String) -> Vec<String> {
    std::iter::once(label.to_string())
        .chain(comparison.runs.iter().map(cell))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_durations_read_well() {
        assert_eq!(format_utc(0.0), "1970-01-01 00:00");
        assert_eq!(format_utc(1_709_210_096.5), "2024-02-29 12:34");
        assert_eq!(format_duration(42.4), "42s");
        assert_eq!(format_duration(185.0), "3m05s");
        assert_eq!(format_duration(7620.0), "2h07m");
    }
}
