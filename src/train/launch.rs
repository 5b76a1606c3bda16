//! `kiln train RECIPE`: everything between a recipe file and [`Trainer::new`] — the job, the
//! starting weights, the tokenizer, the prepared data, the evaluator and the Hub uploader.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;

use super::distributed::{self, Collective, Launch};
use super::{
    EvalData, EvalHook, EvalPoint, ModelInit, Resume, TrainData, TrainOptions, TrainSummary,
    Trainer,
};
use crate::data::preference::PreparedPairs;
use crate::data::{self, prepare, prepare_pairs, Split, Stream};
use crate::eval::task::{RecipeEval, Weights};
use crate::hub::{HubConfig, PushOptions, Uploader};
use crate::model::{self, init};
use crate::recipe::{self, Attention, Recipe};
use crate::tokenizer::TextTokenizer;
use crate::track::Progress;

/// How `kiln train` runs a recipe, beyond what the recipe says.
#[derive(Default)]
pub struct LaunchOptions {
    pub resume: Option<Resume>,
    pub quiet: bool,
    /// CPU threads for the run (default: all cores).
    pub threads: Option<usize>,
    /// Resume over training files that differ from the checkpoint's.
    pub allow_data_change: bool,
    /// Replace an earlier run of the same name instead of refusing to start over it.
    pub overwrite: bool,
}

/// A split's data as the objective reads it.
enum Prepared {
    Sequences(data::Prepared),
    Pairs(PreparedPairs),
}

/// Whole pushes are tried this often before a checkpoint's upload is reported as failed.
const PUSH_ATTEMPTS: u32 = 4;

/// This process's place in a training job: the recipe (its device made this rank's own) and the
/// job's other processes. Started by an MPI launcher or torchrun, this process is one rank of a
/// job (see [`super::distributed`]); alone, it is the whole job.
pub struct Job {
    pub recipe: Recipe,
    pub recipe_path: PathBuf,
    /// The recipe as every rank must have read it.
    recipe_json: String,
    pub collective: Box<dyn Collective>,
}

impl Job {
    /// Loads the recipe (with `overrides`) and joins the job the launcher started, if any.
    pub fn connect(recipe_path: &Path, overrides: &[String]) -> Result<Self> {
        let mut recipe = recipe::load(recipe_path, overrides)?;
        let launch = Launch::from_env().context("reading the launcher's environment")?;
        // What every rank must agree on, before a GPU rank's device is made its own.
        let recipe_json = serde_json::to_string(&recipe)?;
        let (collective, device) =
            distributed::connect(&launch, &recipe.device, &recipe.distributed)?;
        recipe.device = device;
        Ok(Self {
            recipe,
            recipe_path: recipe_path.to_path_buf(),
            recipe_json,
            collective,
        })
    }

    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    pub fn ranks(&self) -> usize {
        self.collective.size()
    }
}

/// A recipe file trained to its end, uploads included: [`Job::connect`], [`Trainer::from_recipe`],
/// [`Trainer::train`], [`Trainer::finish_uploads`]; `overrides` are `--set key.path=value`s.
pub fn train_recipe(
    recipe_path: &Path,
    overrides: &[String],
    options: LaunchOptions,
) -> Result<TrainSummary> {
    let job = Job::connect(recipe_path, overrides)?;
    let mut trainer = Trainer::from_recipe(&job, options)?;
    let result = trainer.train();
    trainer.finish_uploads(result.as_ref().ok())?;
    result
}

impl<'a> Trainer<'a> {
    /// [`Trainer::new`] for the recipe of `job`: the starting weights and tokenizer, the
    /// prepared data, the evaluation task and the Hub uploader it names, all checked before
    /// step 1.
    pub fn from_recipe(job: &'a Job, options: LaunchOptions) -> Result<Self> {
        let recipe = &job.recipe;
        let dir = recipe::recipe_dir(&job.recipe_path);
        let file = job.recipe_path.display();
        let collective = job.collective.as_ref();
        let writer = collective.rank() == 0;

        let (mut init, tokenizer) =
            starting_model(recipe, &dir).with_context(|| format!("{file}: model"))?;
        // Checkpoints say how the model was trained, so that inference reads prompts the same
        // way.
        init.config
            .set_prefix_lm(recipe.data.attention == Attention::Prefix);
        let prepare_split = |split: Split| -> Result<Prepared> {
            let prepared = match recipe.objective.is_preference() {
                true => prepare_pairs(recipe, &dir, &tokenizer, split).map(Prepared::Pairs),
                false => prepare(recipe, &dir, &tokenizer, split).map(Prepared::Sequences),
            };
            prepared.with_context(|| format!("{file}: preparing the {} data", split.name()))
        };
        let train_data = prepare_split(Split::Train)?;
        let eval_data = match recipe.data.eval.is_empty() {
            true => None,
            false => Some(prepare_split(Split::Eval)?),
        };
        let data_fingerprint = data::fingerprint::training_data(recipe, &dir)
            .with_context(|| format!("{file}: fingerprinting the training data"))?;
        distributed::check_same_job(
            collective,
            &job.recipe_json,
            &serde_json::to_string(&data_fingerprint)?,
        )?;
        let progress = Progress::new(options.quiet);
        let data_line = match &train_data {
            Prepared::Sequences(data) => {
                let stats = &data.stats;
                format!(
                    "{} examples, {} tokens → {} sequences of ≤{} tokens per epoch",
                    stats.examples, stats.tokens, stats.sequences, stats.seq_len
                )
            }
            Prepared::Pairs(data) => {
                let stats = &data.stats;
                format!(
                    "{} preference pairs ({} tokens, {} sequences cut to {}) for {}",
                    stats.pairs,
                    stats.tokens,
                    stats.truncated,
                    stats.seq_len,
                    recipe.objective.kind.name()
                )
            }
        };
        progress.println(&format!(
            "{}: {data_line}; model {} ({} parameters)",
            recipe.name,
            init.base_model,
            parameter_count(&init.config)
        ));

        // Everything that can be wrong with the evaluation or the upload is found before step 1.
        let eval_sequences = match &eval_data {
            Some(Prepared::Sequences(data)) => Some(data),
            _ => None,
        };
        let task = RecipeEval::prepare(recipe, &dir, &tokenizer, eval_sequences)
            .with_context(|| format!("{file}: eval.task: {}", recipe.eval.task.name()))?;
        let uploader = match &recipe.checkpoint.push_to_hub {
            // Rank 0 writes the checkpoints, so it alone uploads them.
            Some(push) if writer => Some(hub_uploader(push).with_context(|| file.to_string())?),
            _ => None,
        };
        let reports = recipe.tracking.log_dir.join(&recipe.name).join("eval");
        let run_name = recipe.name.clone();
        let eval_hook = task.map(|task| {
            Box::new(move |model: &model::Model, point: &EvalPoint| {
                let step = point.step;
                let weights = Weights {
                    model,
                    name: format!("{run_name} step {step}"),
                    sha256: point.weights_sha256.clone(),
                    loss: point.loss,
                };
                task.measure(weights, &tokenizer, &reports.join(format!("step-{step}")))
            }) as EvalHook
        });

        let (seed, shuffle) = (recipe.seed, recipe.data.shuffle);
        let stream: TrainData = match train_data {
            Prepared::Sequences(data) => Stream::new(data.sequences, seed, shuffle).into(),
            Prepared::Pairs(data) => Stream::new(data.pairs, seed, shuffle).into(),
        };
        let threads = (options.threads)
            .or_else(|| (collective.size() > 1).then(distributed::threads_per_rank));
        let options = TrainOptions {
            quiet: options.quiet,
            progress: Some(progress),
            resume: options.resume,
            stop: None,
            handle_signals: true,
            threads,
            eval_hook,
            checkpoint_hook: None,
            data_fingerprint,
            allow_data_change: options.allow_data_change,
            overwrite: options.overwrite,
            collective: Some(collective),
        };
        let eval_data = eval_data.map(|data| match data {
            Prepared::Sequences(data) => EvalData::from(data.sequences),
            Prepared::Pairs(data) => EvalData::from(data.pairs),
        });
        let mut trainer = Trainer::new(recipe, init, stream, eval_data, options)?;
        if let Some(uploader) = uploader {
            trainer.upload_checkpoints(uploader);
        }
        Ok(trainer)
    }
}

/// The uploader `checkpoint.push_to_hub` asks for, once a write token is known.
fn hub_uploader(push: &recipe::PushSpec) -> Result<Uploader> {
    let config = HubConfig::from_env();
    if config.token.is_none() {
        bail!(
            "checkpoint.push_to_hub needs a Hub token with write access: set HF_TOKEN (or log in \
             with `huggingface-cli login`)"
        );
    }
    let push_options = PushOptions {
        revision: push.revision.clone().unwrap_or_else(|| "main".into()),
        private: push.private,
        ..PushOptions::new(&push.repo)
    };
    Uploader::spawn(config, push_options, PUSH_ATTEMPTS)
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
                    let mut tokenizer = recipe::tokenizer_for(recipe, recipe_dir)?.context(
                        "model.init sizes the vocabulary for the tokenizer, which is not local \
                         (set model.init.vocab_size)",
                    )?;
                    data::chat::apply_recipe_template(recipe, recipe_dir, &mut tokenizer)?;
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
            let mut tokenizer = match explicit_tokenizer {
                Some(t) => t,
                None => TextTokenizer::from_dir(&model_dir).with_context(|| {
                    format!(
                        "{} has no tokenizer; name one with `tokenizer:`",
                        model_dir.display()
                    )
                })?,
            };
            data::chat::apply_recipe_template(recipe, recipe_dir, &mut tokenizer)?;
            let mut config = model::load_config(&model_dir)?;
            let dtype_of = |name: &str, shape: &[usize]| super::initial_dtype(recipe, name, shape);
            let initial = super::InitialWeights::new(recipe, &config);
            let mut params = model::load_parameters_converted(
                &model_dir,
                &config,
                dtype_of,
                |name, tensor| initial.convert(name, tensor),
                &Device::Cpu,
            )?;
            // Tokens the chat template added need rows, as `resize_token_embeddings` gives them.
            let rows = tokenizer.rows_needed();
            if rows > config.vocab_size() && recipe.lora.is_some() {
                bail!(
                    "the tokenizer needs {rows} embedding rows (data.chat_template added tokens) but \
                     {} has {}: a LoRA adapter keeps the embedding frozen and its checkpoints do not \
                     carry it, so the new rows could not be trained or saved; train without `lora` \
                     (a full fine-tune or train.trainable), or use a model with room for them",
                    model_dir.display(),
                    config.vocab_size()
                );
            }
            init::resize_vocabulary(&mut config, &mut params, rows)?;
            tokenizer.check_fits(config.vocab_size(), &model_dir)?;
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
            let mut tokenizer = explicit_tokenizer.context(
                "model.init needs `tokenizer:` (a tokenizer directory or Hub id, e.g. \
                 EleutherAI/gpt-j-6b) to tokenize the data with",
            )?;
            data::chat::apply_recipe_template(recipe, recipe_dir, &mut tokenizer)?;
            let mut config = preset_config(spec, Some(tokenizer.vocab_size()));
            config.set_eos_and_bos(tokenizer.eos_id());
            config
                .validate()
                .map_err(|e| anyhow::anyhow!("model.init: {e}"))?;
            tokenizer.check_fits(config.vocab_size(), Path::new("model.init"))?;
            let initial = super::InitialWeights::new(recipe, &config);
            let mut params = HashMap::new();
            for (name, shape) in model::parameter_shapes(&config) {
                let tensor = init::init_parameter(&config, &name, &shape, spec.seed)?
                    .to_dtype(spec.dtype.dtype())?
                    .to_dtype(super::initial_dtype(recipe, &name, &shape))?;
                params.extend(initial.convert(&name, tensor)?);
            }
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
