//! `kiln eval`: a task evaluation report (MNLI accuracy).

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalTaskArg {
    Mnli,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Hugging Face model directory (with its tokenizer).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, value_enum, default_value = "mnli")]
    pub task: EvalTaskArg,
    /// A data file (jsonl, json, csv, tsv, GLUE tsv, parquet, arrow), a directory holding
    /// SPLIT.jsonl, or a Hub dataset id (nyu-mll/glue).
    #[arg(long)]
    pub data: String,
    #[arg(long)]
    pub split: Option<String>,
    /// Evaluate the first N rows only.
    #[arg(long)]
    pub limit: Option<usize>,
    /// generate: Graphcore's protocol (greedy, 5 tokens); rank: best of the three labels by likelihood.
    #[arg(long, value_enum, default_value = "generate")]
    pub mode: crate::recipe::EvalMode,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Directory for report.json, report.md and confusion.svg.
    #[arg(long)]
    pub report: PathBuf,
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub(super) fn eval(args: EvalArgs) -> Result<()> {
    use crate::eval::mnli;
    let dtype = model::parse_dtype(&args.dtype)?;
    let device = model::parse_device(&args.device)?;
    let model = model::load_model(&args.model, dtype, &device)?;
    let tokenizer =
        model_tokenizer(&args.model, model.config().vocab_size())?.with_context(|| {
            format!(
                "{}: the model directory has no tokenizer",
                args.model.display()
            )
        })?;
    let rows = mnli::read_nli_rows(&args.data, args.split.as_deref(), args.limit)?;
    let mut report = mnli::evaluate_mnli(&model, &tokenizer, &rows, args.mode, args.batch_size)?;
    report.split = args.split.clone().unwrap_or_else(|| args.data.clone());
    report.model = args.model.display().to_string();
    report.model_sha256 = mnli::weights_sha256(&args.model)?;
    let files = mnli::write_report(&args.report, &report)?;
    println!(
        "mnli {} ({:?}): accuracy {:.2}% ({} / {}), badly formed {} -> {}",
        report.split,
        report.mode,
        100.0 * report.accuracy,
        report.correct,
        report.n,
        report.badly_formed,
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
