//! `kiln train RECIPE`: everything between a recipe file and [`super::run`] — the starting
//! weights, the tokenizer, the prepared data, the evaluator and the Hub uploader.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;

use super::distributed::{self, Collective, Launch};
use super::{CheckpointHook, EvalHook, EvalPoint, ModelInit, Resume, TrainOptions, TrainSummary};
use crate::data::Sequence;
use crate::data::{self, load_split_records, prepare, SequenceStream, Split};
use crate::eval::classify::{ClassifyData, GroupBy};
use crate::eval::mnli::{evaluate_mnli, nli_rows, write_report, NliRow};
use crate::eval::perplexity::{self, PerplexityReport};
use crate::hub::{HubConfig, PushOptions, UploadEvent, Uploader};
use crate::model::{self, init};
use crate::recipe::{self, Attention, EvalTask, Recipe};
use crate::tokenizer::TextTokenizer;

/// How `kiln train` runs a recipe, beyond what the recipe says.
#[derive(Default)]
pub struct LaunchOptions {
    pub overrides: Vec<String>,
    pub resume: Option<Resume>,
    pub quiet: bool,
    /// CPU threads for the run (default: all cores).
    pub threads: Option<usize>,
    /// Resume over training files that differ from the checkpoint's.
    pub allow_data_change: bool,
    /// Replace an earlier run of the same name instead of refusing to start over it.
    pub overwrite: bool,
}

/// Whole pushes are tried this often before a checkpoint's upload is reported as failed.
const PUSH_ATTEMPTS: u32 = 4;

/// Loads the recipe, prepares everything it names, trains, and reports. Started by an MPI
/// launcher or torchrun, this process is one rank of a job (see [`super::distributed`]); an
/// error on any rank then stops them all.
pub fn train_recipe(recipe_path: &Path, options: LaunchOptions) -> Result<TrainSummary> {
    let mut recipe = recipe::load(recipe_path, &options.overrides)?;
    let launch = Launch::from_env().context("reading the launcher's environment")?;
    // What every rank must agree on, before a GPU rank's device is made its own.
    let recipe_json = serde_json::to_string(&recipe)?;
    let (collective, device) = distributed::connect(&launch, &recipe.device, &recipe.distributed)?;
    recipe.device = device;
    let (rank, ranks) = (collective.rank(), collective.size());
    if rank != 0 {
        // One voice: rank 0 reports; the others' errors and warnings still reach stderr.
        silence_stdout();
    }
    let result = train_job(
        recipe_path,
        recipe,
        &recipe_json,
        options,
        collective.as_ref(),
    );
    match result {
        Err(e) if ranks > 1 => {
            // One write, so that the ranks' messages do not interleave; then every rank stops.
            let message = format!("error: rank {rank} of {ranks}: {e:#}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), message.as_bytes());
            collective.abort(1)
        }
        result => result,
    }
}

/// Points this process's standard output at /dev/null.
fn silence_stdout() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
        // SAFETY: dup2 on two open descriptors; stdout stays a valid descriptor throughout.
        unsafe {
            libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO);
        }
    }
}

/// [`train_recipe`] on this rank, `collective` joining it to the others.
fn train_job(
    recipe_path: &Path,
    recipe: Recipe,
    recipe_json: &str,
    options: LaunchOptions,
    collective: &dyn Collective,
) -> Result<TrainSummary> {
    let dir = recipe::recipe_dir(recipe_path);
    let file = recipe_path.display();
    let writer = collective.rank() == 0;

    let (mut init, tokenizer) =
        starting_model(&recipe, &dir).with_context(|| format!("{file}: model"))?;
    // Checkpoints say how the model was trained, so that inference reads prompts the same way.
    init.config
        .set_prefix_lm(recipe.data.attention == Attention::Prefix);
    let train_data = prepare(&recipe, &dir, &tokenizer, Split::Train)
        .with_context(|| format!("{file}: preparing the training data"))?;
    let eval_data = if recipe.data.eval.is_empty() {
        None
    } else {
        Some(
            prepare(&recipe, &dir, &tokenizer, Split::Eval)
                .with_context(|| format!("{file}: preparing the eval data"))?,
        )
    };
    let data_fingerprint = data::fingerprint::training_data(&recipe, &dir)
        .with_context(|| format!("{file}: fingerprinting the training data"))?;
    distributed::check_same_job(
        collective,
        recipe_json,
        &serde_json::to_string(&data_fingerprint)?,
    )?;
    let stats = &train_data.stats;
    println!(
        "{}: {} examples, {} tokens → {} sequences of ≤{} tokens per epoch; model {} ({} parameters)",
        recipe.name,
        stats.examples,
        stats.tokens,
        stats.sequences,
        stats.seq_len,
        init.base_model,
        parameter_count(&init.config)
    );

    // Everything that can be wrong with the evaluation or the upload is found before step 1.
    let task = recipe.eval.task;
    let job = eval_job(&recipe, &dir, &tokenizer, eval_data.as_ref())
        .with_context(|| format!("{file}: eval.task: {}", task.name()))?;
    let uploader = match &recipe.checkpoint.push_to_hub {
        // Rank 0 writes the checkpoints, so it alone uploads them.
        Some(_) if !writer => None,
        Some(push) => {
            let config = HubConfig::from_env();
            if config.token.is_none() {
                bail!(
                    "{file}: checkpoint.push_to_hub needs a Hub token with write access: set \
                     HF_TOKEN (or log in with `huggingface-cli login`)"
                );
            }
            let push_options = PushOptions {
                revision: push.revision.clone().unwrap_or_else(|| "main".into()),
                private: push.private,
                ..PushOptions::new(&push.repo)
            };
            Some(Uploader::spawn(config, push_options, PUSH_ATTEMPTS)?)
        }
        None => None,
    };

    let run_dir = recipe.tracking.log_dir.join(&recipe.name);
    let eval_hook: Option<EvalHook> = job.map(|job| {
        let tokenizer = tokenizer.clone();
        let (mode, batch_size) = (recipe.eval.mode, recipe.eval.batch_size);
        let loss_on = recipe.data.loss_on;
        let reports = run_dir.join("eval");
        let split = eval_split_name(&recipe);
        let run_name = recipe.name.clone();
        Box::new(move |model: &model::Model, point: &EvalPoint| {
            let step = point.step;
            let dir = reports.join(format!("step-{step}"));
            let name = format!("{run_name} step {step}");
            match &job {
                EvalJob::Mnli(rows) => {
                    let mut report = evaluate_mnli(model, &tokenizer, rows, mode, batch_size)?;
                    report.model = name;
                    report.model_sha256 = point.weights_sha256.clone();
                    report.split = split.clone();
                    write_report(&dir, &report)?;
                    Ok(vec![
                        ("accuracy".to_string(), report.accuracy),
                        (
                            "badly_formed".to_string(),
                            report.badly_formed as f64 / report.n as f64,
                        ),
                    ])
                }
                EvalJob::Classify(data) => {
                    let mut report = data.evaluate(model, batch_size)?;
                    report.model = name;
                    report.model_sha256 = point.weights_sha256.clone();
                    report.split = split.clone();
                    write_report(&dir, &report)?;
                    Ok(vec![("accuracy".to_string(), report.accuracy)])
                }
                EvalJob::Perplexity {
                    examples,
                    sequences,
                } => {
                    // The loss training just logged as eval/loss, so the two always agree.
                    let totals = point
                        .loss
                        .context("the eval split gave no loss to take the perplexity of")?;
                    let mut report = PerplexityReport::new(totals, *examples, *sequences, loss_on)?;
                    report.model = name;
                    report.model_sha256 = point.weights_sha256.clone();
                    report.split = split.clone();
                    perplexity::write_report(&dir, &report)?;
                    Ok(vec![("perplexity".to_string(), report.perplexity)])
                }
            }
        }) as EvalHook
    });
    let checkpoint_hook: Option<CheckpointHook> = uploader.as_ref().map(|uploader| {
        let name = recipe.name.clone();
        Box::new(move |dir: &Path, step: u64| {
            // Outcomes of earlier pushes are reported as they arrive; training never waits.
            report_uploads(uploader.poll());
            uploader.submit(dir, &format!("kiln: {name} step {step}"));
            Ok(uploader.pending())
        }) as CheckpointHook
    });

    let stream = SequenceStream::new(train_data.sequences, recipe.seed, recipe.data.shuffle);
    // Held past `run` for the pruning that waits for the uploads.
    let mut claim = None;
    let result = super::run(
        &recipe,
        init,
        stream,
        eval_data.map(|d| d.sequences),
        TrainOptions {
            quiet: options.quiet,
            resume: options.resume,
            stop: None,
            handle_signals: true,
            threads: options
                .threads
                .or_else(|| (collective.size() > 1).then(distributed::threads_per_rank)),
            eval_hook,
            checkpoint_hook,
            data_fingerprint,
            allow_data_change: options.allow_data_change,
            overwrite: options.overwrite,
            run_claim: Some(&mut claim),
            collective: Some(collective),
        },
    );
    if let Some(uploader) = uploader {
        println!("waiting for checkpoint uploads to finish…");
        report_uploads(uploader.finish());
        // Checkpoints kept only while their upload ran can go now.
        if let (Ok(summary), Some(claim)) = (&result, &claim) {
            if let Some(last) = &summary.last_checkpoint {
                let keep_last = recipe.checkpoint.keep_last;
                crate::checkpoint::prune(claim.lock(), keep_last, last, &[])?;
            }
        }
    }
    let summary = result?;
    print_summary(&recipe, &summary);
    Ok(summary)
}

/// The model's config without its weights (for the memory estimate): a local model directory's, a
/// Hub model's (its config.json alone is fetched), or the preset's sized for the tokenizer.
pub fn model_config(recipe: &Recipe, recipe_dir: &Path) -> Result<model::Config> {
    match (&recipe.model.from, &recipe.model.init) {
        (Some(from), None) => {
            let local = recipe_dir.join(from);
            let dir = if local.is_dir() {
                local
            } else {
                // A Hub model's config.json, without its weights.
                crate::hub::resolve_model_metadata(from, recipe.model.revision.as_deref())
                    .with_context(|| format!("model.from {from:?}"))?
            };
            model::load_config(&dir)
        }
        (None, Some(spec)) => {
            let tokenizer_vocab = match spec.vocab_size {
                Some(_) => None,
                None => {
                    let tokenizer = recipe::tokenizer_for(recipe, recipe_dir)?.context(
                        "model.init sizes the vocabulary for the tokenizer, which is not local \
                         (set model.init.vocab_size)",
                    )?;
                    Some(tokenizer.vocab_size())
                }
            };
            Ok(preset_config(spec, tokenizer_vocab))
        }
        _ => bail!("set exactly one of model.from and model.init"),
    }
}

/// `model.init`'s preset with its embedding rows: `vocab_size`, else the tokenizer's size
/// rounded up to a multiple of 64.
fn preset_config(spec: &recipe::InitSpec, tokenizer_vocab: Option<usize>) -> model::Config {
    let mut config = spec.preset.config();
    let rounded = tokenizer_vocab.map(|size| size.div_ceil(64) * 64);
    if let Some(size) = spec.vocab_size.or(rounded) {
        config.set_vocab_size(size);
    }
    config
}

/// The starting weights and the tokenizer: a model directory (local, relative to the recipe, or
/// a Hub repo) or a fresh initialisation sized for the tokenizer.
fn starting_model(recipe: &Recipe, recipe_dir: &Path) -> Result<(ModelInit, TextTokenizer)> {
    let explicit_tokenizer = match &recipe.tokenizer {
        Some(spec) => {
            let local = recipe_dir.join(spec);
            let dir = if local.is_dir() {
                local
            } else {
                crate::hub::resolve_tokenizer(spec, None)
                    .with_context(|| format!("tokenizer {spec}"))?
            };
            Some(TextTokenizer::from_dir(&dir)?)
        }
        None => None,
    };
    match (&recipe.model.from, &recipe.model.init) {
        (Some(from), None) => {
            let local = recipe_dir.join(from);
            let model_dir = if local.is_dir() {
                local
            } else {
                crate::hub::resolve_model(from, recipe.model.revision.as_deref())?
            };
            let tokenizer = match explicit_tokenizer {
                Some(t) => t,
                None => TextTokenizer::from_dir(&model_dir).with_context(|| {
                    format!(
                        "{} has no tokenizer; name one with `tokenizer:`",
                        model_dir.display()
                    )
                })?,
            };
            let config = model::load_config(&model_dir)?;
            tokenizer.check_fits(config.vocab_size(), &model_dir)?;
            let dtype_of = |name: &str, shape: &[usize]| super::initial_dtype(recipe, name, shape);
            let params = model::load_parameters_as(&model_dir, &config, dtype_of, &Device::Cpu)?;
            Ok((
                ModelInit {
                    config,
                    params,
                    tokenizer: Some(tokenizer.clone()),
                    base_model: from.clone(),
                },
                tokenizer,
            ))
        }
        (None, Some(spec)) => {
            let tokenizer = explicit_tokenizer.context(
                "model.init needs `tokenizer:` (a tokenizer directory or Hub id, e.g. \
                 EleutherAI/gpt-j-6b) to tokenize the data with",
            )?;
            let mut config = preset_config(spec, Some(tokenizer.vocab_size()));
            config.set_eos_and_bos(tokenizer.eos_id());
            config
                .validate()
                .map_err(|e| anyhow::anyhow!("model.init: {e}"))?;
            tokenizer.check_fits(config.vocab_size(), Path::new("model.init"))?;
            let params = model::parameter_shapes(&config)
                .into_iter()
                .map(|(name, shape)| {
                    let tensor = init::init_parameter(&config, &name, &shape, spec.seed)?
                        .to_dtype(spec.dtype.dtype())?
                        .to_dtype(super::initial_dtype(recipe, &name, &shape))?;
                    Ok((name, tensor))
                })
                .collect::<Result<_>>()?;
            let preset = serde_json::to_value(spec.preset)?;
            Ok((
                ModelInit {
                    config,
                    params,
                    tokenizer: Some(tokenizer.clone()),
                    base_model: format!(
                        "init:{} (seed {})",
                        preset.as_str().unwrap_or("preset"),
                        spec.seed
                    ),
                },
                tokenizer,
            ))
        }
        _ => bail!("set exactly one of model.from and model.init"),
    }
}

/// The eval data as a report names it: each source's file or `hub:dataset/config/split`.
pub(crate) fn eval_split_name(recipe: &Recipe) -> String {
    let names: Vec<String> = recipe
        .data
        .eval
        .iter()
        .map(|d| {
            let source = match &d.source.path {
                Some(path) => path.display().to_string(),
                None => data::source::hub_origin(&d.source),
            };
            source + &first_rows(d.limit)
        })
        .collect();
    names.join(" + ") + &first_rows(recipe.eval.limit)
}

fn first_rows(limit: Option<usize>) -> String {
    limit
        .map(|n| format!(" (first {n} rows)"))
        .unwrap_or_default()
}

/// What the evaluation hook measures beyond `eval/loss`, prepared once.
enum EvalJob {
    Mnli(Vec<NliRow>),
    Classify(ClassifyData),
    Perplexity { examples: usize, sequences: usize },
}

/// The eval task's data, checked: `None` for `eval.task: loss`.
fn eval_job(
    recipe: &Recipe,
    recipe_dir: &Path,
    tokenizer: &TextTokenizer,
    eval_data: Option<&data::Prepared>,
) -> Result<Option<EvalJob>> {
    Ok(match recipe.eval.task {
        EvalTask::Loss => None,
        EvalTask::Mnli => Some(EvalJob::Mnli(mnli_eval_rows(recipe, recipe_dir)?)),
        EvalTask::Classify => Some(EvalJob::Classify(classify_eval_data(
            recipe, recipe_dir, tokenizer,
        )?)),
        EvalTask::Perplexity => {
            let data = eval_data.context("there is no data.eval to measure perplexity on")?;
            let tokens: usize = data.sequences.iter().map(Sequence::target_count).sum();
            if tokens == 0 {
                bail!(
                    "data.eval: its {} examples have no tokens the loss covers (data.loss_on, \
                     data.mode)",
                    data.stats.examples
                );
            }
            Some(EvalJob::Perplexity {
                examples: data.stats.examples,
                sequences: data.sequences.len(),
            })
        }
    })
}

/// The eval datasets with their answers, tokenized: what `eval.task: classify` ranks.
pub(crate) fn classify_eval_data(
    recipe: &Recipe,
    recipe_dir: &Path,
    tokenizer: &TextTokenizer,
) -> Result<ClassifyData> {
    let datasets = load_split_records(recipe, recipe_dir, Split::Eval)?;
    if datasets.is_empty() {
        bail!("there is no data.eval to classify");
    }
    let group_by = recipe.eval.group_by.clone().map(|column| GroupBy {
        column,
        option: "eval.group_by",
    });
    let mut data = ClassifyData::new(group_by);
    for (i, dataset) in datasets.iter().enumerate() {
        data.add(dataset, tokenizer)
            .with_context(|| format!("data.eval[{i}]"))?;
    }
    Ok(data)
}

/// The eval split's rows as premise / hypothesis / label, capped by `eval.limit`.
fn mnli_eval_rows(recipe: &Recipe, recipe_dir: &Path) -> Result<Vec<NliRow>> {
    let datasets = load_split_records(recipe, recipe_dir, Split::Eval)?;
    if datasets.is_empty() {
        bail!("there is no data.eval to measure accuracy on");
    }
    let mut rows = Vec::new();
    for (i, dataset) in datasets.iter().enumerate() {
        let records = renamed_columns(dataset)?;
        rows.extend(nli_rows(&records).with_context(|| format!("data.eval[{i}]"))?);
    }
    if let Some(limit) = recipe.eval.limit {
        rows.truncate(limit);
    }
    Ok(rows)
}

/// The records with `columns:` applied (template field ← source column), so the evaluator finds
/// premise, hypothesis and label under the names the template uses.
fn renamed_columns(dataset: &data::LoadedDataset) -> Result<data::Records> {
    let mut records = dataset.records.clone();
    for (field, column) in &dataset.spec.columns {
        for row in records.rows.iter_mut() {
            if let Some(value) = row.remove(column) {
                row.insert(field.clone(), value);
            }
        }
        for c in records.columns.iter_mut() {
            if c == column {
                *c = field.clone();
            }
        }
        if let Some(names) = records.class_labels.remove(column) {
            records.class_labels.insert(field.clone(), names);
        }
    }
    Ok(records)
}

fn report_uploads(events: Vec<UploadEvent>) {
    for event in events {
        match event {
            UploadEvent::Pushed {
                dir,
                report,
                attempts,
            } => match report.commit_oid {
                Some(oid) => println!(
                    "uploaded {} (commit {oid}, {} files, attempt {attempts})",
                    dir.display(),
                    report.committed_files.len()
                ),
                None => println!("{} was already on the Hub", dir.display()),
            },
            UploadEvent::Failed {
                dir,
                error,
                attempts,
            } => eprintln!(
                "warning: uploading {} failed after {attempts} attempts: {error} (the local \
                 checkpoint is intact; push it later with `kiln push`)",
                dir.display()
            ),
        }
    }
}

fn parameter_count(config: &model::Config) -> String {
    let n: usize = model::parameter_shapes(config)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2} M", n as f64 / 1e6),
        n => format!("{:.1} k", n as f64 / 1e3),
    }
}

fn print_summary(recipe: &Recipe, summary: &TrainSummary) {
    let steps = summary.losses.len();
    if steps > 0 {
        let seconds: f64 = summary.step_seconds.iter().sum();
        println!(
            "trained steps {}..={} of {} in {:.1} s; last loss {:.4}",
            summary.step + 1 - steps as u64,
            summary.step,
            summary.total_steps,
            seconds,
            summary.losses[steps - 1]
        );
    }
    if let Some(accuracy) = summary.eval.get("accuracy") {
        let mode = match recipe.eval.task {
            EvalTask::Classify => "rank".to_string(),
            _ => serde_json::to_value(recipe.eval.mode)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        };
        println!(
            "eval accuracy {:.2}% ({mode} mode){}",
            accuracy * 100.0,
            summary
                .eval
                .get("loss")
                .map(|l| format!(", eval loss {l:.4}"))
                .unwrap_or_default()
        );
    } else if let Some(loss) = summary.eval.get("loss") {
        match summary.eval.get("perplexity") {
            Some(perplexity) => println!("eval loss {loss:.4}, perplexity {perplexity:.4}"),
            None => println!("eval loss {loss:.4}"),
        }
    }
    if let Some(dir) = &summary.last_checkpoint {
        println!("checkpoint: {}", dir.display());
    }
    println!(
        "logs: {} (tensorboard --logdir {})",
        summary.run_dir.display(),
        recipe.tracking.log_dir.display()
    );
}

/// `--resume latest|DIR`.
pub fn parse_resume(value: &str) -> Resume {
    if value == "latest" {
        Resume::Latest
    } else {
        Resume::Dir(PathBuf::from(value))
    }
}
