//! TensorBoard HParams plugin summaries, so the HParams tab lists every run of a log directory in
//! one table: the recipe's hyperparameters against the runs' final metrics.
//!
//! A run writes a `session_start_info` (its hyperparameters) when it starts and a
//! `session_end_info` (its status) when it ends. It deliberately writes no `experiment` summary
//! (the declared hyperparameter and metric columns): the plugin reads the experiment of whichever
//! run it finds first and applies it to the whole log directory, so one run's declaration would
//! hide another's columns (a loss-only run's would drop `eval/accuracy` from an MNLI run's row)
//! and fix filter domains to that one run's values. Without one, the plugin derives the
//! experiment from all runs' sessions: each hyperparameter's type and range over every run,
//! and as metrics every scalar tag of the session runs (`train/loss`, `eval/loss`,
//! `eval/accuracy`, ...), each shown at its last logged value.
//!
//! Kiln's scalars sit in the run directory itself, beside these summaries, so the plugin finds
//! them under metric group `""` (groups are subdirectories of a session's run). The price of
//! the derived experiment: `tensorboard --logdir` pointed at one run directory (run `.`) lists
//! the session without metric values, as the plugin then looks for them in run `./.`; pointed at
//! the log directory holding the runs, as one does to compare them, it lists them all.

use anyhow::Result;
use serde::Serialize;

use super::tensorboard::{bytes_field, double_field, string_field, varint_field};
use super::EventWriter;
use crate::recipe::{Recipe, Warmup};

const PLUGIN_NAME: &str = "hparams";
const SESSION_START_INFO_TAG: &str = "_hparams_/session_start_info";
const SESSION_END_INFO_TAG: &str = "_hparams_/session_end_info";

/// How a run ended, as the HParams plugin's `Status` enum has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionStatus {
    Success,
    Failure,
    Running,
    Unknown,
}

impl SessionStatus {
    fn code(self) -> u64 {
        match self {
            SessionStatus::Unknown => 0,
            SessionStatus::Success => 1,
            SessionStatus::Failure => 2,
            SessionStatus::Running => 3,
        }
    }
}

/// A hyperparameter's value, typed as the plugin types columns (a `google.protobuf.Value`).
#[derive(Debug, Clone, PartialEq)]
pub enum HParamValue {
    Number(f64),
    Text(String),
    Bool(bool),
}

/// The hyperparameters a run is compared by, named by their recipe keys. Settings that are
/// switched off (no gradient clipping, no `steps` in an epochs-based recipe) are left out, so
/// their column stays empty for that run rather than holding a made-up number.
pub fn hparams(recipe: &Recipe) -> Vec<(&'static str, HParamValue)> {
    use HParamValue::{Bool, Number, Text};
    let model = match (&recipe.model.from, &recipe.model.init) {
        (Some(from), _) => from.clone(),
        (None, Some(init)) => format!("init:{}", name_of(&init.preset)),
        (None, None) => String::new(),
    };
    let train_sources: Vec<String> = recipe
        .data
        .train
        .iter()
        .map(|d| match (&d.source.hub, &d.source.path) {
            (Some(hub), _) => match &d.source.config {
                Some(config) => format!("{hub}/{config}"),
                None => hub.clone(),
            },
            (None, Some(path)) => path.display().to_string(),
            (None, None) => String::new(),
        })
        .collect();
    let opt = &recipe.optimizer;
    let mut list = vec![
        ("model", Text(model)),
        ("data.train", Text(train_sources.join(", "))),
        ("data.seq_len", Number(recipe.data.seq_len as f64)),
        ("data.mode", Text(name_of(&recipe.data.mode))),
        ("data.attention", Text(name_of(&recipe.data.attention))),
        ("data.loss_on", Text(name_of(&recipe.data.loss_on))),
        ("data.shuffle", Bool(recipe.data.shuffle)),
        ("optimizer.lr", Number(opt.lr)),
        ("optimizer.weight_decay", Number(opt.weight_decay)),
        ("optimizer.beta1", Number(opt.betas[0])),
        ("optimizer.beta2", Number(opt.betas[1])),
        ("schedule.kind", Text(name_of(&recipe.schedule.kind))),
        ("schedule.min_lr", Number(recipe.schedule.min_lr)),
        (
            "precision.compute",
            Text(recipe.precision.compute.name().into()),
        ),
        ("batch.global", Number(recipe.batch.global as f64)),
        ("batch.micro", Number(recipe.batch.micro as f64)),
        ("batch.replicas", Number(recipe.batch.replicas as f64)),
        (
            "batch.accumulation_steps",
            Number(recipe.accumulation_steps() as f64),
        ),
        ("seed", Number(recipe.seed as f64)),
        ("eval.task", Text(name_of(&recipe.eval.task))),
        ("eval.mode", Text(name_of(&recipe.eval.mode))),
    ];
    if let Some(clip) = opt.grad_clip {
        list.push(("optimizer.grad_clip", Number(clip)));
    }
    // Steps and fractions in one column would read as the same unit, which they are not.
    list.push(match recipe.schedule.warmup {
        Warmup::Steps(steps) => ("schedule.warmup_steps", Number(steps as f64)),
        Warmup::Fraction(f) => ("schedule.warmup_fraction", Number(f)),
    });
    if let Some(steps) = recipe.steps {
        list.push(("steps", Number(steps as f64)));
    }
    if let Some(epochs) = recipe.epochs {
        list.push(("epochs", Number(epochs)));
    }
    list
}

/// The hyperparameters of a fresh run, at step 0. A resumed run does not write them again: the
/// plugin keeps the first `session_start_info` of a run directory and ignores later ones.
pub fn write_start(events: &mut EventWriter, recipe: &Recipe, start_time_secs: f64) -> Result<()> {
    let mut start_info = Vec::new();
    for (name, value) in hparams(recipe) {
        let mut entry = Vec::new();
        string_field(&mut entry, 1, name.as_bytes());
        bytes_field(&mut entry, 2, &protobuf_value(&value));
        bytes_field(&mut start_info, 1, &entry);
    }
    double_field(&mut start_info, 5, start_time_secs);
    write_plugin_data(events, SESSION_START_INFO_TAG, 3, &start_info)
}

/// The run's final status. The plugin keeps the first `session_end_info` of a run directory, so
/// this is written once, when the outcome is final: a run that wrote `Failure` and was then
/// resumed keeps showing `Failure`, and a `Running` written here would never change.
pub fn write_end(
    events: &mut EventWriter,
    status: SessionStatus,
    end_time_secs: f64,
) -> Result<()> {
    let mut end_info = Vec::new();
    varint_field(&mut end_info, 1, status.code());
    double_field(&mut end_info, 2, end_time_secs);
    write_plugin_data(events, SESSION_END_INFO_TAG, 4, &end_info)
}

/// An `HParamsPluginData` with its `data` oneof set to `field`; `version` is left at 0, the only
/// version the plugin reads.
fn write_plugin_data(events: &mut EventWriter, tag: &str, field: u32, data: &[u8]) -> Result<()> {
    let mut plugin_data = Vec::new();
    bytes_field(&mut plugin_data, field, data);
    events.plugin_summary(tag, 0, PLUGIN_NAME, &plugin_data)
}

/// `google.protobuf.Value`. The oneof field is written even when it holds its default (0, false,
/// ""), because presence is what tells the plugin the value's type.
fn protobuf_value(value: &HParamValue) -> Vec<u8> {
    let mut buf = Vec::new();
    match value {
        HParamValue::Number(x) => double_field(&mut buf, 2, *x),
        HParamValue::Text(s) => string_field(&mut buf, 3, s.as_bytes()),
        HParamValue::Bool(b) => varint_field(&mut buf, 4, u64::from(*b)),
    }
    buf
}

/// A recipe enum's name as written in a recipe (its serde spelling, e.g. `gptj-6b`).
fn name_of<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        other => format!("{other:?}"),
    }
}
