//! `kiln eval`: a task evaluation report (MNLI accuracy, any labelled template, perplexity).

use std::collections::BTreeMap;

use anyhow::bail;

use super::*;
use crate::data::{LoadedDataset, Split};
use crate::eval::classify::{ClassifyData, GroupBy};
use crate::eval::{mnli, perplexity};
use crate::recipe::{DatasetSpec, EvalMode, LossOn, TemplateSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EvalTaskArg {
    /// MNLI accuracy with Graphcore's protocol (premise / hypothesis / label data).
    Mnli,
    /// Accuracy of ranking a template's fixed set of answers (its label words, or the distinct
    /// targets of the rows): sentiment, prompt-completion with a fixed set of completions, ...
    Classify,
    /// Mean loss (nats per token) over the template's target tokens, and its exp.
    Perplexity,
    /// Preference accuracy on held-out pairs (prompt / chosen / rejected): how often the
    /// chosen completion gets the higher implicit reward (DPO's, against --reference or the
    /// base of --adapter; the recipe's objective with --recipe), with TRL's metrics.
    Preference,
}

impl EvalTaskArg {
    fn name(self) -> &'static str {
        match self {
            EvalTaskArg::Mnli => "mnli",
            EvalTaskArg::Classify => "classify",
            EvalTaskArg::Perplexity => "perplexity",
            EvalTaskArg::Preference => "preference",
        }
    }
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Hugging Face model directory (with its tokenizer), or a Hub model id `owner/name[@revision]`
    /// (downloaded into the HF cache).
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT LoRA adapter directory (a Kiln LoRA checkpoint, or PEFT's save_pretrained),
    /// merged into the model's weights as they load.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "mnli")]
    pub task: EvalTaskArg,
    /// A data file (jsonl, json, csv, tsv, GLUE tsv, parquet, arrow), a directory holding
    /// SPLIT.jsonl, or a Hub dataset id (nyu-mll/glue).
    #[arg(long, required_unless_present = "recipe")]
    pub data: Option<String>,
    /// With a directory, the SPLIT.jsonl to read; with a Hub dataset, its split (mnli's
    /// default: validation_matched).
    #[arg(long, requires = "data")]
    pub split: Option<String>,
    /// The Hub dataset's config (mnli: `mnli`).
    #[arg(long, requires = "data")]
    pub config: Option<String>,
    /// classify / perplexity with --data: the template preset the rows are written with
    /// (mnli, sentiment, prompt-completion, text; perplexity's default: text). Custom templates
    /// are a recipe's: use --recipe.
    #[arg(long, requires = "data")]
    pub template: Option<String>,
    /// With --template: label value → label word, e.g. `--label-map 0=negative,1=positive`
    /// (default: the preset's, else the data's ClassLabel names).
    #[arg(
        long,
        value_name = "VALUE=WORD",
        value_delimiter = ',',
        requires = "template"
    )]
    pub label_map: Vec<String>,
    /// With --template (or --task preference): template field ← data column, e.g.
    /// `--column text=sentence`.
    #[arg(long, value_name = "FIELD=COLUMN", value_delimiter = ',')]
    pub column: Vec<String>,
    /// classify / perplexity: evaluate a recipe's `data.eval` instead of --data.
    #[arg(long, conflicts_with = "data")]
    pub recipe: Option<PathBuf>,
    /// With --recipe: override a recipe key (`key.path=value`), as `kiln train --set`.
    #[arg(long, value_name = "KEY=VALUE", requires = "recipe")]
    pub set: Vec<String>,
    /// classify: also report accuracy per value of this data column (default with --recipe:
    /// its `eval.group_by`).
    #[arg(long)]
    pub group_by: Option<String>,
    /// perplexity with --data: `target` (the template's target tokens) or `all` (every token).
    /// With --recipe, its `data.loss_on`.
    #[arg(long, value_enum, conflicts_with = "recipe")]
    pub loss_on: Option<LossOnArg>,
    /// Evaluate the first N rows only (of each eval dataset, with --recipe).
    #[arg(long)]
    pub limit: Option<usize>,
    /// mnli: generate (Graphcore's protocol: greedy, 5 tokens; the default) or rank (best of the
    /// three labels by likelihood). classify always ranks.
    #[arg(long, value_enum)]
    pub mode: Option<EvalMode>,
    /// Default: the recipe's eval.batch_size with --recipe, else 16.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Directory for report.json and report.md (and confusion.svg for mnli and classify).
    #[arg(long)]
    pub report: PathBuf,
    /// preference: the reference model the rewards are measured against (default: the --model
    /// base of an --adapter; without either, the rewards are β × the log-probabilities alone).
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// preference: DPO's β (default: the recipe's, else 0.1).
    #[arg(long)]
    pub beta: Option<f64>,
    #[command(flatten)]
    pub quantize: super::QuantizeArgs,
    #[arg(long, default_value = "fp32")]
    pub dtype: String,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LossOnArg {
    Target,
    All,
}

pub(super) fn eval(mut args: EvalArgs) -> Result<()> {
    check_options(&args)?;
    // Reports name the model as the user did (a Hub id, not its cache directory).
    let model_name = args.model.display().to_string();
    args.model = model_dir(&args.model)?;
    let dtype = model::parse_dtype(&args.dtype)?;
    let device = ops::parse_device(&args.device)?;
    // Preference accuracy against an adapter's own base: the adapter attached, unmerged, so
    // that one model is both (adapters on and off).
    let attached = args.task == EvalTaskArg::Preference && args.reference.is_none();
    let quantization = args.quantize.quantization()?;
    let model = match (&args.adapter, attached) {
        (Some(adapter), true) => model::load_model_with_attached_adapter(
            &args.model,
            adapter,
            dtype,
            &device,
            quantization,
        )?,
        (adapter, _) => model::load_model_quantized(
            &args.model,
            adapter.as_deref(),
            dtype,
            &device,
            quantization,
        )?,
    };
    let tokenizer =
        model_tokenizer(&args.model, model.config().vocab_size())?.with_context(|| {
            format!(
                "{}: the model directory has no tokenizer",
                args.model.display()
            )
        })?;
    let recipe = match &args.recipe {
        Some(path) => {
            let mut recipe = crate::recipe::load(path, &args.set)?;
            if recipe.data.eval.is_empty() {
                bail!(
                    "{}: data.eval is empty: there is nothing to evaluate",
                    path.display()
                );
            }
            if args.limit.is_some() {
                recipe.eval.limit = args.limit;
            }
            if args.group_by.is_some() {
                recipe.eval.group_by = args.group_by.clone();
            }
            Some((recipe, crate::recipe::recipe_dir(path)))
        }
        None => None,
    };
    let batch_size = args
        .batch_size
        .or(recipe.as_ref().map(|(r, _)| r.eval.batch_size))
        .unwrap_or(16);
    let sha = mnli::weights_sha256(&args.model)?;
    let files = |files: Vec<PathBuf>| {
        files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match args.task {
        EvalTaskArg::Mnli => {
            let data = args.data.as_deref().expect("--data or --recipe, checked");
            let rows = mnli::read_nli_rows(data, args.split.as_deref(), args.limit)?;
            let mode = args.mode.unwrap_or(EvalMode::Generate);
            let mut report = mnli::evaluate_mnli(&model, &tokenizer, &rows, mode, batch_size)?;
            report.split = args.split.clone().unwrap_or_else(|| data.to_string());
            report.model = model_name;
            report.model_sha256 = sha;
            let written = mnli::write_report(&args.report, &report)?;
            println!(
                "mnli {} ({:?}): accuracy {:.2}% ({} / {}), badly formed {} -> {}",
                report.split,
                report.mode,
                100.0 * report.accuracy,
                report.correct,
                report.n,
                report.badly_formed,
                files(written)
            );
        }
        EvalTaskArg::Classify => {
            let (data, split) = match &recipe {
                Some((recipe, dir)) => (
                    crate::eval::task::classify_eval_data(recipe, dir, &tokenizer)
                        .with_context(|| args.recipe.clone().unwrap().display().to_string())?,
                    crate::eval::task::eval_split_name(recipe),
                ),
                None => {
                    let template = args.template.as_deref().expect("--template, checked");
                    let dataset = data_from_args(&args, template)?;
                    let group_by = args.group_by.clone().map(|column| GroupBy {
                        column,
                        option: "--group-by",
                    });
                    let mut data = ClassifyData::new(group_by);
                    data.add(&dataset, &tokenizer)?;
                    (data, data_name(&args))
                }
            };
            let mut report = data.evaluate(&model, batch_size)?;
            report.split = split;
            report.model = model_name;
            report.model_sha256 = sha;
            let written = crate::eval::report::write_report(&args.report, &report)?;
            println!(
                "classify {}: accuracy {:.2}% ({} / {}) over {} labels -> {}",
                report.split,
                100.0 * report.accuracy,
                report.correct,
                report.n,
                report.labels.len(),
                files(written)
            );
        }
        EvalTaskArg::Preference => {
            let (pairs, objective, split) = match &recipe {
                Some((recipe, dir)) => {
                    let pairs = crate::data::prepare_pairs(recipe, dir, &tokenizer, Split::Eval)
                        .with_context(|| {
                            format!("{}: preparing the eval data", recipe_path(&args))
                        })?
                        .pairs;
                    let mut objective = recipe.objective.clone();
                    if let Some(beta) = args.beta {
                        objective.beta = Some(beta);
                    }
                    let name = crate::eval::task::eval_split_name(recipe);
                    (pairs, objective, name)
                }
                None => {
                    let dataset = pairs_from_args(&args)?;
                    let fit = (
                        model.config().max_positions(),
                        crate::recipe::Truncation::Error,
                    );
                    let datasets = std::slice::from_ref(&dataset);
                    let pairs =
                        crate::data::preference::pairs_of(datasets, &tokenizer, fit, Split::Eval)?
                            .pairs;
                    let objective = crate::recipe::ObjectiveSpec {
                        kind: crate::recipe::ObjectiveKind::Dpo,
                        beta: args.beta,
                        ..Default::default()
                    };
                    (pairs, objective, data_name(&args))
                }
            };
            let needs_reference = objective.needs_reference();
            let reference_dir = match (&args.reference, needs_reference) {
                (Some(dir), true) => Some(model_dir(dir)?),
                (Some(_), false) => bail!(
                    "--reference: objective {} is reference-free; drop --reference",
                    objective.kind.name()
                ),
                (None, _) => None,
            };
            let reference_model = match &reference_dir {
                Some(dir) => Some(model::load_model_quantized(
                    dir,
                    None,
                    dtype,
                    &device,
                    args.quantize.quantization()?,
                )?),
                None => None,
            };
            use crate::eval::preference::ReferenceModel;
            let (reference, reference_name) = match (&reference_model, &args.adapter) {
                _ if !needs_reference => (None, "none (reference-free objective)".to_string()),
                (Some(reference), _) => (
                    Some(ReferenceModel::whole(reference)),
                    reference_dir
                        .as_ref()
                        .expect("loaded")
                        .display()
                        .to_string(),
                ),
                // The adapter's base: the same model with its adapter off.
                (None, Some(_)) => (
                    Some(ReferenceModel {
                        model: &model,
                        adapters_off: true,
                    }),
                    args.model.display().to_string(),
                ),
                (None, None) => (
                    None,
                    "none: rewards are β × the completion's log-probability".to_string(),
                ),
            };
            let pair_loss = crate::eval::preference::PairLoss::new(&objective);
            // Without a reference, DPO's rewards are the log-probabilities alone.
            let pairs: Vec<_> = match (needs_reference, reference.is_some()) {
                (true, false) => pairs
                    .into_iter()
                    .map(|p| crate::data::PreferencePair {
                        reference: Some([0.0; 2]),
                        ..p
                    })
                    .collect(),
                _ => pairs,
            };
            let results = crate::eval::preference::evaluate(
                &pair_loss,
                &model,
                reference,
                &pairs,
                batch_size,
                tokenizer.pad_id(),
            )?;
            let mut report =
                crate::eval::preference::PreferenceReport::new(&results, &pair_loss, pairs.len());
            report.reference = reference_name;
            report.split = split;
            report.model = model_name;
            report.model_sha256 = sha;
            let written = crate::eval::preference::write_report(&args.report, &report)?;
            println!(
                "preference {}: accuracy {:.2}% over {} pairs, margin {:.4}, loss {:.4} -> {}",
                report.split,
                100.0 * report.accuracy,
                report.n,
                report
                    .metrics
                    .get("rewards/margins")
                    .copied()
                    .unwrap_or(f64::NAN),
                report.loss,
                files(written)
            );
        }
        EvalTaskArg::Perplexity => {
            let (sequences, examples, loss_on, split) = match &recipe {
                Some((recipe, dir)) => {
                    let prepared = crate::data::prepare(recipe, dir, &tokenizer, Split::Eval)
                        .with_context(|| {
                            format!("{}: preparing the eval data", recipe_path(&args))
                        })?;
                    let name = crate::eval::task::eval_split_name(recipe);
                    let examples = prepared.stats.examples;
                    (prepared.sequences, examples, recipe.data.loss_on, name)
                }
                None => {
                    let template = args.template.as_deref().unwrap_or("text");
                    let dataset = data_from_args(&args, template)?;
                    let loss_on = match args.loss_on {
                        Some(LossOnArg::All) => LossOn::All,
                        Some(LossOnArg::Target) | None => LossOn::Target,
                    };
                    let sequences = one_per_example(&model, &tokenizer, &dataset, loss_on)?;
                    let examples = sequences.len();
                    (sequences, examples, loss_on, data_name(&args))
                }
            };
            let totals = perplexity::loss_totals(
                &model,
                &sequences,
                batch_size,
                tokenizer.pad_id(),
                &device,
            )?;
            let mut report =
                perplexity::PerplexityReport::new(totals, examples, sequences.len(), loss_on)?;
            report.split = split;
            report.model = model_name;
            report.model_sha256 = sha;
            let written = perplexity::write_report(&args.report, &report)?;
            println!(
                "perplexity {}: loss {:.6} nats/token over {} tokens, perplexity {:.4} -> {}",
                report.split,
                report.loss,
                report.target_tokens,
                report.perplexity,
                files(written)
            );
        }
    }
    Ok(())
}

/// Options that do not fit the task, refused before the model is loaded.
fn check_options(args: &EvalArgs) -> Result<()> {
    let task = args.task.name();
    let refuse = |option: &str, why: &str| -> Result<()> {
        bail!("{option} does not apply to --task {task}: {why}")
    };
    if !args.column.is_empty() && args.template.is_none() && args.task != EvalTaskArg::Preference {
        bail!("--column renames the fields of a --template; give --template too");
    }
    if args.task != EvalTaskArg::Preference {
        for (set, option) in [
            (args.reference.is_some(), "--reference"),
            (args.beta.is_some(), "--beta"),
        ] {
            if set {
                refuse(option, "it is --task preference's")?;
            }
        }
    }
    match args.task {
        EvalTaskArg::Mnli => {
            if args.recipe.is_some() {
                refuse(
                    "--recipe",
                    "mnli reads premise / hypothesis / label rows from --data",
                )?;
            }
            if args.template.is_some() {
                refuse(
                    "--template",
                    "mnli has its own prompt (use --task classify --template mnli to rank \
                     through the template)",
                )?;
            }
            if args.group_by.is_some() {
                refuse("--group-by", "mnli reports per genre by itself")?;
            }
            if args.loss_on.is_some() {
                refuse("--loss-on", "it is perplexity's")?;
            }
        }
        EvalTaskArg::Classify => {
            if args.mode == Some(EvalMode::Generate) {
                refuse(
                    "--mode generate",
                    "classify ranks the answers by likelihood (generate is MNLI's protocol)",
                )?;
            }
            if args.recipe.is_none() && args.template.is_none() {
                bail!(
                    "--task classify --data needs --template (a preset: {}), or --recipe for a \
                     recipe's eval datasets with their own templates",
                    crate::recipe::template::Preset::NAMES
                );
            }
            if args.loss_on.is_some() {
                refuse("--loss-on", "it is perplexity's")?;
            }
        }
        EvalTaskArg::Preference => {
            for (set, option) in [
                (args.mode.is_some(), "--mode"),
                (args.template.is_some(), "--template"),
                (args.group_by.is_some(), "--group-by"),
                (args.loss_on.is_some(), "--loss-on"),
            ] {
                if set {
                    refuse(option, "preference compares each pair's two completions")?;
                }
            }
            if let Some((path, recipe)) =
                (args.recipe.as_ref()).map(|p| (p, crate::recipe::load(p, &args.set)))
            {
                let recipe = recipe?;
                if !recipe.objective.is_preference() {
                    bail!(
                        "{}: --task preference evaluates a preference recipe's pairs; its \
                         objective is {}",
                        path.display(),
                        recipe.objective.kind.name()
                    );
                }
                if !recipe.objective.needs_reference() && args.reference.is_some() {
                    refuse(
                        "--reference",
                        "the recipe's objective (simpo) uses no reference",
                    )?;
                }
                if !args.column.is_empty() {
                    refuse("--column", "with --recipe, its datasets' own columns apply")?;
                }
            }
        }
        EvalTaskArg::Perplexity => {
            if args.mode.is_some() {
                refuse(
                    "--mode",
                    "perplexity reads every target token; there is nothing to predict",
                )?;
            }
            if args.group_by.is_some() {
                refuse("--group-by", "perplexity is one figure over all the data")?;
            }
        }
    }
    Ok(())
}

fn recipe_path(args: &EvalArgs) -> String {
    args.recipe
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

/// How the report names `--data`.
fn data_name(args: &EvalArgs) -> String {
    let data = args.data.clone().unwrap_or_default();
    match &args.split {
        Some(split) => format!("{data} ({split})"),
        None => data,
    }
}

/// `--data` with `--template`, `--label-map` and `--column` as a recipe's dataset would say them.
fn data_from_args(args: &EvalArgs, template: &str) -> Result<LoadedDataset> {
    crate::recipe::template::Preset::parse(template).context("--template")?;
    let label_map = key_values(
        &args.label_map,
        "--label-map",
        "VALUE=WORD, e.g. 0=negative",
    )?;
    let columns = key_values(&args.column, "--column", "FIELD=COLUMN, e.g. text=sentence")?;
    let label_map = (!label_map.is_empty()).then_some(label_map);
    load_data(args, template, label_map, columns)
}

/// `--data` as preference pairs (`prompt`, `chosen`, `rejected`, renamed by `--column`).
fn pairs_from_args(args: &EvalArgs) -> Result<LoadedDataset> {
    let columns = key_values(&args.column, "--column", "FIELD=COLUMN, e.g. chosen=better")?;
    load_data(args, crate::recipe::PREFERENCE_TEMPLATE, None, columns)
}

/// `KEY=VALUE` option values as a map.
fn key_values(values: &[String], option: &str, form: &str) -> Result<BTreeMap<String, String>> {
    values
        .iter()
        .map(|v| match v.split_once('=') {
            Some((k, w)) if !k.is_empty() && !w.is_empty() => Ok((k.to_string(), w.to_string())),
            _ => bail!("{option} {v:?}: expected {form}"),
        })
        .collect()
}

/// The rows of `--data` (its `--split`, `--config` and `--limit`) as a dataset with `template`.
fn load_data(
    args: &EvalArgs,
    template: &str,
    label_map: Option<BTreeMap<String, String>>,
    columns: BTreeMap<String, String>,
) -> Result<LoadedDataset> {
    let data = args.data.as_deref().expect("--data or --recipe, checked");
    let spec = DatasetSpec {
        source: mnli::resolve_source(data, args.split.as_deref(), args.config.as_deref())?,
        template: TemplateSpec::Preset(template.to_string()),
        label_map,
        columns,
        limit: args.limit,
        few_shot: None,
    };
    let records = crate::data::load_records(&spec.source, Path::new("."), args.limit)?;
    if records.is_empty() {
        bail!("{}: no rows", records.origin);
    }
    Ok(LoadedDataset { spec, records })
}

/// Each example as its own row (no packing, so no example sees another), laid out as the model
/// was trained to read prompts (prefix-LM or causal).
fn one_per_example(
    model: &model::Model,
    tokenizer: &TextTokenizer,
    dataset: &LoadedDataset,
    loss_on: LossOn,
) -> Result<Vec<crate::data::Sequence>> {
    let rendered = crate::data::render_datasets(std::slice::from_ref(dataset), tokenizer)?;
    let attention = match model.config().prefix_lm() {
        true => crate::recipe::Attention::Prefix,
        false => crate::recipe::Attention::Causal,
    };
    let sequences = crate::data::tokenize_examples(tokenizer, &rendered, loss_on, attention)?;
    let context = model.config().max_positions();
    for (example, sequence) in rendered.iter().zip(&sequences) {
        if sequence.len() > context {
            bail!(
                "{}: the example has {} tokens, more than the model's context of {context} \
                 (evaluate through a recipe with data.truncation to cut it)",
                example.origin,
                sequence.len()
            );
        }
    }
    Ok(sequences)
}
