//! `kiln runs`: list the runs of a log dir, compare runs, plot their curves.

use super::*;

use crate::track::plot::plot_runs;
use crate::track::runs::{
    is_run_dir, resolve_runs, sort_runs, summarize_log_dir, Comparison, Run, SortKey,
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
    print!("{}", crate::track::runs::render_table(&runs));
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
        print!("{}", comparison.render());
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
