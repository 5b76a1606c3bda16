//! The `kiln` command line: one subcommand per thing a user does.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::model::{self, init::Preset};
use crate::tokenizer::TextTokenizer;

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
    /// Write a randomly initialised GPT-J as a Hugging Face model directory.
    Init(InitArgs),
    /// Per-token log-probabilities of texts or token ids under a model.
    Score(ScoreArgs),
    /// Evaluate a model on a task and write a report (MNLI accuracy).
    Eval(EvalArgs),
    /// Continue prompts with a model (greedy or sampling, HF semantics).
    Generate(GenerateArgs),
    /// Upload a checkpoint (or any model directory) to a Hugging Face Hub repo as one commit.
    Push(PushArgs),
    /// Check a recipe and print it fully resolved.
    #[command(subcommand)]
    Recipe(RecipeCommand),
    /// Look at a recipe's data, or generate the bundled dataset.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Continue a run: `latest` (the newest good checkpoint of this run) or a checkpoint directory.
    #[arg(long, value_name = "latest|CHECKPOINT_DIR")]
    pub resume: Option<String>,
    /// Plain log lines instead of a progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Resume even though a training file differs from the one the checkpoint recorded (size and
    /// sha256); the data position then continues over the changed data.
    #[arg(long, requires = "resume")]
    pub allow_data_change: bool,
}

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

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// One prompt; its completion is printed (streamed when stdout is a terminal).
    #[arg(long, conflicts_with = "input", required_unless_present = "input")]
    pub prompt: Option<String>,
    /// JSON lines, each {"prompt": "..."} or {"ids": [...]}.
    #[arg(long, requires = "output")]
    pub input: Option<PathBuf>,
    /// JSON lines written here: prompt, completion, ids, finish_reason.
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    pub max_new_tokens: usize,
    #[arg(long)]
    pub max_length: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub min_length: usize,
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// Sample instead of greedy decoding.
    #[arg(long)]
    pub do_sample: bool,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the completion contains this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep the last tokens of prompts longer than the model's context instead of failing.
    #[arg(long)]
    pub truncate_left: bool,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Directory to upload; it is only read.
    pub checkpoint_dir: PathBuf,
    /// Target repo, `owner/name`; created if it does not exist.
    #[arg(long)]
    pub repo: String,
    /// Branch to commit to.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Create the repo private (an existing repo keeps its visibility).
    #[arg(long)]
    pub private: bool,
    /// Commit message.
    #[arg(long, default_value = "Upload with kiln")]
    pub message: String,
    /// Hub URL; defaults to HF_ENDPOINT, else https://huggingface.co.
    #[arg(long)]
    pub endpoint: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum RecipeCommand {
    /// Validate a recipe against its data and print it with every default and derived value.
    Check(RecipeArgs),
}

#[derive(Debug, Args)]
pub struct RecipeArgs {
    /// Recipe YAML file.
    pub recipe: PathBuf,
    /// Override a recipe key: `--set optimizer.lr=3e-5` (the value is YAML). Repeatable.
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    pub set: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Print examples exactly as the model sees them, with the prompt/target split marked.
    Preview {
        #[command(flatten)]
        recipe: RecipeArgs,
        #[arg(long, value_enum, default_value = "train")]
        split: crate::data::Split,
        /// Number of examples.
        #[arg(long, default_value_t = 5)]
        n: usize,
    },
    /// Count examples, tokens, sequences per epoch, truncated and dropped rows.
    Stats {
        #[command(flatten)]
        recipe: RecipeArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Generate the bundled NLI dataset (MNLI schema) and train its tokenizer.
    SynthNli {
        /// Output directory (train.jsonl, validation.jsonl, tokenizer/tokenizer.json).
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 6000)]
        train_rows: usize,
        #[arg(long, default_value_t = 600)]
        validation_rows: usize,
        /// Tokenizer vocabulary size, `<|endoftext|>` included.
        #[arg(long, default_value_t = 1024)]
        vocab_size: usize,
    },
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Model shape.
    #[arg(long, value_enum)]
    pub preset: Preset,
    /// Output directory (created; existing model files in it are overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokenizer directory to copy into the model (tokenizer.json, or vocab.json + merges.txt).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Override the preset's vocabulary size (embedding rows).
    #[arg(long)]
    pub vocab_size: Option<usize>,
    /// dtype of the written weights.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// Largest shard in bytes before the weights are split with an index (HF's default: 5 GB).
    #[arg(long, default_value_t = model::DEFAULT_MAX_SHARD_BYTES)]
    pub max_shard_bytes: usize,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// JSON lines, each {"text": ...} or {"ids": [...]}.
    #[arg(long)]
    pub input: PathBuf,
    /// JSON lines written here, each {"ids", "logprobs", "total"}, in input order.
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Compute dtype: fp32, fp16 or bf16.
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(args) => train(args),
        Command::Init(args) => init(args),
        Command::Score(args) => score(args),
        Command::Eval(args) => eval(args),
        Command::Generate(args) => generate(args),
        Command::Push(args) => push(args),
        Command::Recipe(RecipeCommand::Check(args)) => recipe_check(args),
        Command::Data(command) => data(command),
    }
}

fn train(args: TrainArgs) -> Result<()> {
    use crate::train::launch::{parse_resume, train_recipe, LaunchOptions};
    train_recipe(
        &args.recipe.recipe,
        LaunchOptions {
            overrides: args.recipe.set,
            resume: args.resume.as_deref().map(parse_resume),
            quiet: args.quiet,
            threads: args.threads,
            allow_data_change: args.allow_data_change,
        },
    )?;
    Ok(())
}

fn init(args: InitArgs) -> Result<()> {
    let dtype = model::parse_dtype(&args.dtype)?;
    let mut config = args.preset.config();
    if let Some(vocab_size) = args.vocab_size {
        config.vocab_size = vocab_size;
    }
    let tokenizer = args
        .tokenizer
        .as_deref()
        .map(TextTokenizer::from_dir)
        .transpose()?;
    if let Some(tok) = &tokenizer {
        tok.check_fits(config.vocab_size, &args.out)?;
        config.eos_token_id = Some(tok.eos_id());
        config.bos_token_id = Some(tok.eos_id());
    }
    let mut files = model::init::write_random_model(
        &args.out,
        &config,
        args.seed,
        dtype,
        args.max_shard_bytes,
    )?;
    if let Some(tok) = &tokenizer {
        files.extend(tok.save_to(&args.out)?);
    }
    println!(
        "wrote {} ({:?} preset, seed {}, {} parameters): {}",
        args.out.display(),
        args.preset,
        args.seed,
        parameter_count(&config),
        files.join(", ")
    );
    Ok(())
}

fn parameter_count(config: &model::Config) -> usize {
    model::parameter_shapes(config)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

/// The tokenizer stored in a model directory, if it has one, checked against the model.
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

fn score(args: ScoreArgs) -> Result<()> {
    let dtype = model::parse_dtype(&args.dtype)?;
    let device = model::parse_device(&args.device)?;
    let model = model::load_model(&args.model, dtype, &device)?;
    let config = model.config().clone();
    let tokenizer = model_tokenizer(&args.model, config.vocab_size)?;
    let rows = crate::eval::score::read_score_inputs(
        &args.input,
        tokenizer.as_ref(),
        config.vocab_size,
        config.n_positions,
    )?;
    let scored =
        crate::eval::score::score_rows(&model, &rows, args.batch_size).context("scoring failed")?;
    crate::eval::score::write_jsonl(&args.output, &scored)?;
    let tokens: usize = scored.iter().map(|r| r.ids.len()).sum();
    let total: f64 = scored.iter().map(|r| r.total as f64).sum();
    let predicted = tokens - scored.len();
    println!(
        "scored {} rows ({tokens} tokens) -> {}; mean log-prob {:.4}, perplexity {:.3}",
        scored.len(),
        args.output.display(),
        total / predicted.max(1) as f64,
        (-total / predicted.max(1) as f64).exp()
    );
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    use crate::eval::mnli;
    let dtype = model::parse_dtype(&args.dtype)?;
    let device = model::parse_device(&args.device)?;
    let model = model::load_model(&args.model, dtype, &device)?;
    let tokenizer =
        model_tokenizer(&args.model, model.config().vocab_size)?.with_context(|| {
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

fn generate(args: GenerateArgs) -> Result<()> {
    use crate::generate::{generate, GenerationParams};
    use std::io::{IsTerminal, Write};
    let dtype = model::parse_dtype(&args.dtype)?;
    let device = model::parse_device(&args.device)?;
    let model = model::load_model(&args.model, dtype, &device)?;
    let tokenizer = model_tokenizer(&args.model, model.config().vocab_size)?;
    let params = GenerationParams {
        max_new_tokens: args.max_new_tokens,
        max_length: args.max_length,
        min_length: args.min_length,
        min_new_tokens: args.min_new_tokens,
        do_sample: args.do_sample,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        stop: args.stop,
        truncate_left: args.truncate_left,
    };
    params.validate()?;
    let need_tokenizer = || {
        tokenizer.as_ref().with_context(|| {
            format!(
                "{}: text prompts need a tokenizer in the model directory",
                args.model.display()
            )
        })
    };
    if let Some(prompt) = &args.prompt {
        let ids = need_tokenizer()?.encode(prompt)?;
        let streaming = std::io::stdout().is_terminal();
        let tok = need_tokenizer()?;
        let mut so_far: Vec<u32> = Vec::new();
        let mut printed = 0usize;
        let mut stdout = std::io::stdout();
        let out = generate(&model, Some(tok), &[ids], &params, &mut |_, token| {
            if streaming {
                so_far.push(token);
                // Decode the whole completion each time: a multi-byte character can span tokens.
                if let Ok(text) = tok.decode(&so_far, true) {
                    if text.len() > printed && text.is_char_boundary(printed) {
                        let _ = write!(stdout, "{}", &text[printed..]);
                        let _ = stdout.flush();
                        printed = text.len();
                    }
                }
            }
        })?;
        if streaming {
            println!();
        } else {
            println!("{}", out[0].text);
        }
        return Ok(());
    }
    let input = args
        .input
        .as_ref()
        .expect("clap requires --input without --prompt");
    let output = args
        .output
        .as_ref()
        .expect("clap requires --output with --input");
    let prompts = read_prompts(input, tokenizer.as_ref())?;
    let mut rows = Vec::with_capacity(prompts.len());
    for chunk in prompts.chunks(args.batch_size.max(1)) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|(_, ids)| ids.clone()).collect();
        let generated = generate(&model, tokenizer.as_ref(), &ids, &params, &mut |_, _| {})?;
        for ((prompt, _), g) in chunk.iter().zip(generated) {
            rows.push(serde_json::json!({
                "prompt": prompt["prompt"],
                "completion": g.text,
                "ids": g.ids,
                "finish_reason": g.finish_reason,
            }));
        }
    }
    crate::eval::score::write_jsonl(output, &rows)?;
    println!(
        "generated {} completions -> {}",
        rows.len(),
        output.display()
    );
    Ok(())
}

/// Prompt lines `{"prompt": ...}` or `{"ids": [...]}`, with errors naming the line.
fn read_prompts(
    path: &Path,
    tokenizer: Option<&TextTokenizer>,
) -> Result<Vec<(serde_json::Value, Vec<u32>)>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the prompts", path.display()))?;
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(line).with_context(|| {
            format!(
                "{}: expected {{\"prompt\": \"...\"}} or {{\"ids\": [...]}}",
                at()
            )
        })?;
        let ids = match (&value["prompt"], &value["ids"]) {
            (serde_json::Value::String(p), serde_json::Value::Null) => tokenizer
                .with_context(|| {
                    format!(
                        "{}: a text prompt needs a tokenizer in the model directory",
                        at()
                    )
                })?
                .encode(p)?,
            (serde_json::Value::Null, serde_json::Value::Array(ids)) => ids
                .iter()
                .map(|v| v.as_u64().map(|id| id as u32))
                .collect::<Option<Vec<u32>>>()
                .with_context(|| format!("{}: \"ids\" must be a list of token ids", at()))?,
            _ => anyhow::bail!(
                "{}: give exactly one of \"prompt\" (text) and \"ids\"",
                at()
            ),
        };
        prompts.push((value, ids));
    }
    Ok(prompts)
}

fn push(args: PushArgs) -> Result<()> {
    let mut config = crate::hub::HubConfig::from_env();
    if let Some(endpoint) = &args.endpoint {
        config.endpoint = endpoint.trim_end_matches('/').to_string();
    }
    let options = crate::hub::PushOptions {
        revision: args.revision,
        private: args.private,
        message: args.message,
        ..crate::hub::PushOptions::new(&args.repo)
    };
    let report = crate::hub::push_folder(&config, &args.checkpoint_dir, &options)?;
    match &report.commit_oid {
        Some(oid) => println!(
            "pushed {} to {}@{}: commit {oid}, {} files ({} LFS objects, {} bytes uploaded), {} unchanged{}",
            args.checkpoint_dir.display(),
            options.repo,
            options.revision,
            report.committed_files.len(),
            report.lfs_objects_uploaded,
            report.lfs_bytes_uploaded,
            report.unchanged_files.len(),
            report.commit_url.as_deref().map(|u| format!(": {u}")).unwrap_or_default()
        ),
        None => println!(
            "{} is already on {}@{}: nothing to commit",
            args.checkpoint_dir.display(),
            options.repo,
            options.revision
        ),
    }
    Ok(())
}

fn recipe_check(args: RecipeArgs) -> Result<()> {
    let resolved = crate::data::check(&args.recipe, &args.set)?;
    print!("{}", serde_norway::to_string(&resolved)?);
    Ok(())
}

/// The recipe and the tokenizer its data is tokenized with (which must be on this machine).
fn recipe_and_tokenizer(
    args: &RecipeArgs,
) -> Result<(crate::recipe::Recipe, PathBuf, TextTokenizer)> {
    let recipe = crate::recipe::load(&args.recipe, &args.set)?;
    let dir = crate::recipe::recipe_dir(&args.recipe);
    let tokenizer = crate::recipe::tokenizer_for(&recipe, &dir)?.with_context(|| {
        format!(
            "{}: no local tokenizer (set `tokenizer:` to a directory, or `model.from` to a local \
             model directory with one)",
            args.recipe.display()
        )
    })?;
    Ok((recipe, dir, tokenizer))
}

fn data(command: DataCommand) -> Result<()> {
    use crate::data::{prepare, preview, synth, Split};
    match command {
        DataCommand::Preview { recipe, split, n } => {
            let (r, dir, tokenizer) = recipe_and_tokenizer(&recipe)?;
            print!("{}", preview::preview(&r, &dir, &tokenizer, split, n)?);
        }
        DataCommand::Stats { recipe, json } => {
            let (r, dir, tokenizer) = recipe_and_tokenizer(&recipe)?;
            let mut all = vec![prepare(&r, &dir, &tokenizer, Split::Train)?.stats];
            if !r.data.eval.is_empty() {
                all.push(prepare(&r, &dir, &tokenizer, Split::Eval)?.stats);
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                for stats in &all {
                    print!("{}", preview::stats_text(stats));
                }
            }
        }
        DataCommand::SynthNli {
            out,
            seed,
            train_rows,
            validation_rows,
            vocab_size,
        } => {
            let config = synth::SynthConfig {
                seed,
                train_rows,
                validation_rows,
                vocab_size,
            };
            let summary = synth::write_dataset(&out, &config)?;
            println!(
                "wrote {} (seed {seed}; tokenizer vocabulary {})",
                summary
                    .files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                summary.vocab_size
            );
        }
    }
    Ok(())
}
