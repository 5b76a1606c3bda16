//! The `kiln` command line: one subcommand per thing a user does.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::model::{self, init::Preset};
use crate::tokenizer::TextTokenizer;
use crate::{ops, process};

mod bench;
mod data;
mod download;
mod eval;
mod generate;
mod init;
mod merge;
mod push;
mod recipe;
mod runs;
mod score;
mod serve;
mod train;

pub use bench::{BenchArgs, Counts};
pub use data::DataCommand;
pub use download::DownloadArgs;
pub use eval::{EvalArgs, EvalTaskArg};
pub use generate::GenerateArgs;
pub use init::InitArgs;
pub use merge::MergeArgs;
pub use push::PushArgs;
pub use recipe::RecipeCommand;
pub use runs::{RunsArgs, RunsCommand};
pub use score::ScoreArgs;
pub use serve::{LogFormat, ServeArgs};
pub use train::{parse_resume, TrainArgs};

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Fine-tune GPT-J-family language models from recipes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train (fine-tune) a model as a recipe says: checkpoints, TensorBoard logs, evaluation.
    #[command(visible_alias = "finetune")]
    Train(TrainArgs),
    /// Write a randomly initialised model (GPT-J, GPT-2 or GPT-NeoX preset) as a Hugging Face model
    /// directory.
    Init(InitArgs),
    /// Per-token log-probabilities of texts or token ids under a model.
    Score(ScoreArgs),
    /// Evaluate a model on a task and write a report (MNLI, any labelled template, perplexity).
    ///
    /// The data is `--data` (with `--template` for classify and perplexity) or, for classify
    /// and perplexity, a recipe's `data.eval` (`--recipe`: its templates, label maps and
    /// columns; for perplexity also its seq_len, mode, loss_on and attention, so the figure is
    /// exp of the `eval/loss` training logs).
    Eval(EvalArgs),
    /// Continue prompts with a model (greedy or sampling, HF semantics).
    Generate(GenerateArgs),
    /// Time generation over input lengths × output lengths × batch sizes: time to first token,
    /// per-token latency, total and tokens/s, as a markdown table (and JSON).
    Bench(BenchArgs),
    /// Serve a model over HTTP: KServe v1 (`:predict`, `:classify`), KServe v2 (Open Inference
    /// Protocol) and OpenAI `/v1/completions` (streamed with server-sent events), continuously
    /// batched, with Prometheus `/metrics`.
    Serve(ServeArgs),
    /// Merge a LoRA adapter into its base model: a plain Hugging Face model directory.
    Merge(MergeArgs),
    /// Upload a checkpoint (or any model directory) to a Hugging Face Hub repo as one commit.
    Push(PushArgs),
    /// Download a Hub model (config, weights, tokenizer) or dataset into the Hugging Face cache,
    /// for offline use (`HF_HUB_OFFLINE=1`); prints where it is.
    Download(DownloadArgs),
    /// Check a recipe and print it fully resolved.
    #[command(subcommand)]
    Recipe(RecipeCommand),
    /// Look at a recipe's data.
    #[command(subcommand)]
    Data(DataCommand),
    /// List the runs of a log dir (status, steps, loss, accuracy, ...), compare runs' recipes and
    /// metrics, or plot their curves.
    Runs(RunsArgs),
}

/// `--quantize` for the verbs that run a model.
#[derive(Debug, Clone, Copy, Args)]
pub struct QuantizeArgs {
    /// Store the linear layers' weights in 4-bit NF4 or int8 (bitsandbytes' formats) as the
    /// model loads, one matrix at a time; an --adapter stays unmerged beside them, as QLoRA
    /// trained it. The embeddings and the head keep --dtype.
    #[arg(long, value_name = "nf4|int8")]
    pub quantize: Option<crate::ops::quant::QuantFormat>,
    /// With --quantize nf4: quantise each block's absmax again (QLoRA's double quantisation).
    #[arg(long, requires = "quantize")]
    pub double_quant: bool,
}

impl QuantizeArgs {
    pub fn quantization(&self) -> anyhow::Result<Option<crate::ops::quant::Quantization>> {
        use crate::ops::quant::{QuantFormat, Quantization};
        anyhow::ensure!(
            !self.double_quant || self.quantize == Some(QuantFormat::Nf4),
            "--double-quant applies to --quantize nf4 only"
        );
        Ok(self.quantize.map(|format| Quantization {
            format,
            double_quant: self.double_quant,
        }))
    }
}

#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// Recipe YAML file.
    pub recipe: PathBuf,
    /// Override a recipe key: `--set optimizer.lr=3e-5` (the value is YAML). Repeatable.
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub set: Vec<String>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(
        matches!(&cli.command, Command::Serve(args) if args.log_format == LogFormat::Json),
    );
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        logs.json().flatten_event(true).try_init()
    } else {
        logs.with_target(false).try_init()
    };
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => train::train(args),
        Command::Init(args) => init::init(args),
        Command::Score(args) => score::score(args),
        Command::Eval(args) => eval::eval(args),
        Command::Generate(args) => generate::generate(args),
        Command::Bench(args) => bench::bench(args),
        Command::Serve(args) => serve::serve(args),
        Command::Merge(args) => merge::merge(args),
        Command::Push(args) => push::push(args),
        Command::Download(args) => download::download(args),
        Command::Recipe(RecipeCommand::Check(args)) => recipe::recipe_check(args),
        Command::Data(command) => data::data(command),
        Command::Runs(args) => runs::runs(args),
    }
}

/// The tokenizer stored in a model directory, if it has one, checked against the model.
/// The tokenizer of a model directory, checked against the model's embedding rows; `None`
/// when the directory has none.
pub fn model_tokenizer(dir: &Path, vocab_size: usize) -> Result<Option<TextTokenizer>> {
    let has_tokenizer = dir.join("tokenizer.json").is_file()
        || (dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file());
    if !has_tokenizer {
        return Ok(None);
    }
    let tokenizer = TextTokenizer::from_dir(dir)?;
    tokenizer.check_fits(vocab_size, dir)?;
    Ok(Some(tokenizer))
}

/// The tokenizer an adapter was trained with (its checkpoint's: a chat template and the tokens
/// it added), else the base model's.
pub fn adapter_or_model_tokenizer(
    model: &Path,
    adapter: Option<&Path>,
    vocab_size: usize,
) -> Result<Option<TextTokenizer>> {
    if let Some(adapter) = adapter {
        if let Some(tokenizer) = model_tokenizer(adapter, vocab_size)? {
            return Ok(Some(tokenizer));
        }
    }
    model_tokenizer(model, vocab_size)
}

/// `owner/name@revision` as (`owner/name`, `Some(revision)`); without `@`, no revision.
fn hub_spec(spec: &str) -> (&str, Option<&str>) {
    match spec.split_once('@') {
        Some((repo, revision)) => (repo, Some(revision)),
        None => (spec, None),
    }
}

/// `--model` of the inference verbs: a local directory as it is; otherwise, if it reads as a Hub
/// model id (`owner/name[@revision]`), the model downloaded into the Hugging Face cache (as
/// `model.from` is for `kiln train`; offline, from the cache). Anything else is returned as it
/// is, for the loader to say what is wrong with it.
fn model_dir(arg: &Path) -> Result<PathBuf> {
    let Some(spec) = arg.to_str().filter(|_| !arg.exists()) else {
        return Ok(arg.to_path_buf());
    };
    let (repo, revision) = hub_spec(spec);
    if crate::hub::validate_repo_id(repo).is_err() {
        return Ok(arg.to_path_buf());
    }
    crate::hub::resolve_model(repo, revision).with_context(|| format!("--model {spec}"))
}

/// The recipe and the tokenizer its data is tokenized with (which must be on this machine).
fn recipe_and_tokenizer(
    args: &RecipeArgs,
) -> Result<(crate::recipe::Recipe, PathBuf, TextTokenizer)> {
    let recipe = crate::recipe::load(&args.recipe, &args.set)?;
    let dir = crate::recipe::recipe_dir(&args.recipe);
    let mut tokenizer = crate::recipe::tokenizer_for(&recipe, &dir)?.with_context(|| {
        format!(
            "{}: no local tokenizer (set `tokenizer:` to a directory, or `model.from` to a local \
             model directory with one)",
            args.recipe.display()
        )
    })?;
    crate::data::chat::apply_recipe_template(&recipe, &dir, &mut tokenizer)
        .with_context(|| args.recipe.display().to_string())?;
    Ok((recipe, dir, tokenizer))
}
