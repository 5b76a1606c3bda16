//! Reading a recipe file: YAML → `--set` overrides → typed `Recipe` → validation.
//!
//! Overrides are applied to the YAML tree before typing, so they go through exactly the same
//! checks as the file (unknown keys, wrong types). Errors point at what the user wrote: the
//! file with line and column, or the `--set` argument that introduced the problem.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_norway::{Mapping, Value};

use super::{Recipe, TemplateSpec, Warmup};

/// Reads, overrides, types and validates a recipe.
pub fn load(path: &Path, overrides: &[String]) -> Result<Recipe> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read recipe", path.display()))?;
    parse(&text, path, overrides)
}

/// As [`load`], from text already read; `path` is only used in messages.
pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Recipe> {
    let file = path.display();
    let mut tree: Value = serde_norway::from_str(text).map_err(|e| located(&file, &e))?;
    if tree.is_null() {
        bail!(
            "{file}: the recipe is empty (expected a mapping with name, model, data, batch, ...)"
        );
    }
    if !tree.is_mapping() {
        bail!("{file}: a recipe must be a mapping of keys (name, model, data, batch, ...)");
    }
    for set in overrides {
        apply_override(&mut tree, set).with_context(|| format!("--set {set}"))?;
    }
    let recipe: Recipe = match serde_norway::from_value(tree) {
        Ok(recipe) => recipe,
        Err(e) => return Err(blame(text, &file, overrides, &e)),
    };
    recipe.validate().map_err(|e| anyhow!("{file}: {e}"))?;
    Ok(recipe)
}

/// A typing error of the overridden tree carries no location: when the file alone has the same
/// error, report it at the file's line and column; else name the first override after which the
/// tree no longer types.
fn blame(
    text: &str,
    file: &impl std::fmt::Display,
    overrides: &[String],
    error: &serde_norway::Error,
) -> anyhow::Error {
    let message = strip_location(&error.to_string());
    // Typing the file reports the key path before the message; typing the tree does not.
    if let Err(fe) = serde_norway::from_str::<Recipe>(text) {
        if strip_location(&fe.to_string()).ends_with(&message) {
            return located(file, &fe);
        }
    }
    let Ok(mut tree) = serde_norway::from_str::<Value>(text) else {
        return anyhow!("{file}: {message}");
    };
    for set in overrides {
        if apply_override(&mut tree, set).is_ok() {
            if let Err(e) = serde_norway::from_value::<Recipe>(tree.clone()) {
                let now = strip_location(&e.to_string());
                if now == message {
                    return anyhow!("--set {set}: {now}");
                }
            }
        }
    }
    anyhow!("{file} with --set {}: {message}", overrides.join(" --set "))
}

fn located(file: &impl std::fmt::Display, e: &serde_norway::Error) -> anyhow::Error {
    let message = strip_location(&e.to_string());
    match e.location() {
        Some(loc) => anyhow!("{file}:{}:{}: {message}", loc.line(), loc.column()),
        None => anyhow!("{file}: {message}"),
    }
}

/// serde_norway appends " at line L column C"; we print the location up front instead.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_string(),
        None => message.to_string(),
    }
}

/// Applies one `key.path=value`; the value is parsed as YAML (`3e-4`, `[0.9, 0.95]`, `null`).
/// Missing mappings along the path are created, so optional sections can be set from the
/// command line; keys that the schema does not know are rejected when the tree is typed.
pub fn apply_override(tree: &mut Value, set: &str) -> Result<()> {
    let (key_path, raw) = set
        .split_once('=')
        .ok_or_else(|| anyhow!("expected key.path=value"))?;
    let key_path = key_path.trim();
    if key_path.is_empty() || key_path.split('.').any(str::is_empty) {
        bail!(
            "`{key_path}` is not a key path (expected keys separated by dots, e.g. optimizer.lr)"
        );
    }
    let value: Value = serde_norway::from_str(raw).map_err(|e| {
        anyhow!(
            "the value `{raw}` is not valid YAML: {}",
            strip_location(&e.to_string())
        )
    })?;
    let segments: Vec<&str> = key_path.split('.').collect();
    let mut node = tree;
    for (depth, segment) in segments.iter().enumerate() {
        let here = segments[..depth].join(".");
        let last = depth + 1 == segments.len();
        node = match node {
            Value::Sequence(items) => {
                let index: usize = segment.parse().map_err(|_| {
                    anyhow!("`{here}` is a list; expected an index, found `{segment}`")
                })?;
                let len = items.len();
                items.get_mut(index).ok_or_else(|| {
                    anyhow!("`{here}` has {len} entries; index {index} does not exist")
                })?
            }
            Value::Null => {
                *node = Value::Mapping(Mapping::new());
                let Value::Mapping(map) = node else {
                    unreachable!()
                };
                map.entry(Value::String(segment.to_string()))
                    .or_insert(Value::Null)
            }
            Value::Mapping(map) => {
                map.entry(Value::String(segment.to_string()))
                    .or_insert(if last {
                        Value::Null
                    } else {
                        Value::Mapping(Mapping::new())
                    })
            }
            other => bail!(
                "`{here}` is {}, not a mapping; cannot set `{segment}` inside it",
                describe(other)
            ),
        };
    }
    *node = value;
    Ok(())
}

fn describe(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(_) => "a tagged value".into(),
    }
}

impl Recipe {
    /// Checks everything that can be checked without reading data: the messages name the key.
    pub fn validate(&self) -> Result<()> {
        let mut problems = Problems::default();
        problems.check(
            !self.name.trim().is_empty(),
            "name: must not be empty".into(),
        );
        problems.check(
            !self.name.contains(['/', '\\']) && self.name != "." && self.name != "..",
            format!(
                "name: {:?} is used as a directory name; it must not contain / or \\",
                self.name
            ),
        );
        match (&self.model.from, &self.model.init) {
            (Some(_), Some(_)) => problems.push(
                "model: set exactly one of `from` (a Hub id or local directory) and `init` \
                 (a preset to train from scratch), not both"
                    .into(),
            ),
            (None, None) => problems.push(
                "model: set exactly one of `from` (a Hub id or local directory) and `init` \
                 (a preset to train from scratch)"
                    .into(),
            ),
            _ => {}
        }
        if let Some(from) = &self.model.from {
            problems.check(
                !from.trim().is_empty(),
                "model.from: must not be empty".into(),
            );
        }
        if self.model.init.is_some() && self.model.revision.is_some() {
            problems
                .push("model.revision: only applies to `model.from`, not to `model.init`".into());
        }
        if let Some(dropout) = &self.model.dropout {
            for (key, rate) in [
                ("resid", dropout.resid),
                ("embd", dropout.embd),
                ("attn", dropout.attn),
            ] {
                if let Some(rate) = rate {
                    problems.check(
                        (0.0..1.0).contains(&rate),
                        format!("model.dropout.{key}: {rate} is not a probability in [0, 1)"),
                    );
                }
            }
        }
        match (self.steps, self.epochs) {
            (Some(_), Some(_)) => {
                problems.push("steps / epochs: set exactly one of them, not both".into())
            }
            (None, None) => problems.push("steps / epochs: set exactly one of them".into()),
            (Some(0), _) => problems.push("steps: must be at least 1".into()),
            (_, Some(e)) if !(e.is_finite() && e > 0.0) => {
                problems.push(format!("epochs: must be a positive number, found {e}"))
            }
            _ => {}
        }
        let b = &self.batch;
        problems.check(b.global > 0, "batch.global: must be at least 1".into());
        problems.check(b.micro > 0, "batch.micro: must be at least 1".into());
        problems.check(b.replicas > 0, "batch.replicas: must be at least 1".into());
        if b.global > 0
            && b.micro > 0
            && b.replicas > 0
            && !b.global.is_multiple_of(b.micro * b.replicas)
        {
            problems.push(format!(
                "batch.global: {} is not divisible by batch.micro × batch.replicas = {} × {} = {} \
                 (gradient accumulation steps = global / (micro × replicas) must be a whole number)",
                b.global,
                b.micro,
                b.replicas,
                b.micro * b.replicas
            ));
        }
        let d = &self.distributed;
        problems.check(
            d.timeout_secs > 0,
            "distributed.timeout_secs: must be at least 1".into(),
        );
        problems.check(
            d.bucket_mib > 0,
            "distributed.bucket_mib: must be at least 1".into(),
        );
        if let Some(lora) = &self.lora {
            for problem in lora.problems() {
                problems.push(problem);
            }
        }
        for problem in self.objective.problems() {
            problems.push(problem);
        }
        let quantize = self.model.quantize;
        problems.check(
            !self.model.double_quant || quantize == Some(crate::ops::quant::QuantFormat::Nf4),
            "model.double_quant: applies to model.quantize: nf4 only".into(),
        );
        if let Some(format) = quantize {
            problems.check(
                self.lora.is_some() || self.train.trainable.is_some(),
                format!(
                    "model.quantize: {format} stores the frozen weights of a LoRA run (QLoRA) or a \
                     partial fine-tune, but this recipe trains every weight; add a lora section \
                     or train.trainable"
                ),
            );
        }
        let preference = self.objective.is_preference();
        let splits = [("train", &self.data.train), ("eval", &self.data.eval)];
        for (split, datasets) in splits {
            for (i, dataset) in datasets.iter().enumerate() {
                let pairs = dataset.template.is_preference();
                if preference && !pairs {
                    problems.push(format!(
                        "data.{split}[{i}].template: objective.kind {} trains on preference \
                         pairs; set template: preference (rows of prompt, chosen and rejected)",
                        self.objective.kind.name()
                    ));
                } else if pairs && !preference {
                    problems.push(format!(
                        "data.{split}[{i}].template: preference pairs train with a preference \
                         objective; set objective.kind: dpo or simpo"
                    ));
                }
            }
        }
        if preference {
            problems.check(
                self.data.attention.is_causal(),
                "data.attention: prefix attention does not apply to preference pairs".into(),
            );
            problems.check(
                !self.data.loss_on.is_assistant(),
                "data.loss_on: preference pairs train on their completions (chosen and \
                 rejected) only; remove loss_on"
                    .into(),
            );
        }
        if let Some(patterns) = &self.train.trainable {
            problems.check(
                !patterns.is_empty(),
                "train.trainable: must name at least one parameter (remove it to train every \
                 weight)"
                    .into(),
            );
            problems.check(
                self.lora.is_none(),
                "train.trainable: a LoRA run trains its adapter only; set either lora or \
                 train.trainable"
                    .into(),
            );
        }
        let o = &self.optimizer;
        problems.check(
            o.lr.is_finite() && o.lr > 0.0,
            format!("optimizer.lr: must be a positive number, found {}", o.lr),
        );
        for (i, beta) in o.betas.iter().enumerate() {
            problems.check(
                (0.0..1.0).contains(beta),
                format!("optimizer.betas[{i}]: must be in [0, 1), found {beta}"),
            );
        }
        problems.check(
            o.eps.is_finite() && o.eps > 0.0,
            format!("optimizer.eps: must be a positive number, found {}", o.eps),
        );
        problems.check(
            o.weight_decay.is_finite() && o.weight_decay >= 0.0,
            format!(
                "optimizer.weight_decay: must be zero or positive, found {}",
                o.weight_decay
            ),
        );
        if let Some(clip) = o.grad_clip {
            problems.check(
                clip.is_finite() && clip > 0.0,
                format!("optimizer.grad_clip: must be positive (or null to disable), found {clip}"),
            );
        }
        let s = &self.schedule;
        if let Warmup::Fraction(f) = s.warmup {
            problems.check(
                (0.0..1.0).contains(&f),
                format!(
                    "schedule.warmup: a fraction of all steps must be in [0, 1), found {f} \
                     (write an integer for a number of steps)"
                ),
            );
        }
        if let (Warmup::Steps(w), Some(steps)) = (s.warmup, self.steps) {
            problems.check(
                w < steps.max(1),
                format!("schedule.warmup: {w} warmup steps leave no training steps of {steps}"),
            );
        }
        problems.check(
            s.warmup_from.is_finite() && s.warmup_from >= 0.0 && s.warmup_from <= o.lr,
            format!(
                "schedule.warmup_from: must be in [0, optimizer.lr = {}], found {}",
                o.lr, s.warmup_from
            ),
        );
        problems.check(
            s.min_lr.is_finite() && s.min_lr >= 0.0 && s.min_lr <= o.lr,
            format!(
                "schedule.min_lr: must be in [0, optimizer.lr = {}], found {}",
                o.lr, s.min_lr
            ),
        );
        let p = &self.precision;
        problems.check(
            p.initial_loss_scale.is_finite() && p.initial_loss_scale >= 1.0,
            format!(
                "precision.initial_loss_scale: must be at least 1, found {}",
                p.initial_loss_scale
            ),
        );
        problems.check(
            p.growth_interval > 0,
            "precision.growth_interval: must be at least 1".into(),
        );
        problems.check(
            p.growth_factor.is_finite() && p.growth_factor > 1.0,
            format!(
                "precision.growth_factor: must be above 1, found {}",
                p.growth_factor
            ),
        );
        problems.check(
            p.backoff_factor > 0.0 && p.backoff_factor < 1.0,
            format!(
                "precision.backoff_factor: must be in (0, 1), found {}",
                p.backoff_factor
            ),
        );
        for (i, pattern) in o.no_decay.iter().enumerate() {
            problems.check(
                !pattern.is_empty(),
                format!("optimizer.no_decay[{i}]: an empty pattern would match every parameter"),
            );
        }
        problems.check(
            self.data.seq_len > 0,
            "data.seq_len: must be at least 1".into(),
        );
        problems.check(
            !self.data.train.is_empty(),
            "data.train: needs at least one dataset".into(),
        );
        let loss_on = self.data.loss_on;
        for (split, list) in [("train", &self.data.train), ("eval", &self.data.eval)] {
            for (i, d) in list.iter().enumerate() {
                if let Err(e) = d.validate() {
                    problems.push(format!("data.{split}[{i}].{e}"));
                }
                let template = match &d.template {
                    TemplateSpec::Preset(name) => name.as_str(),
                    TemplateSpec::Custom { .. } => "a custom prompt/target",
                };
                if d.template.is_chat() && loss_on == super::LossOn::Target {
                    problems.push(format!(
                        "data.loss_on: target splits a prompt from its target, but data.{split}[{i}] \
                         is conversations (template: chat); use assistant (every assistant turn), \
                         last-assistant or all"
                    ));
                } else if !d.template.is_chat() && loss_on.is_assistant() {
                    problems.push(format!(
                        "data.loss_on: {} trains the assistant turns of conversations, but \
                         data.{split}[{i}] uses template {template}; use template: chat, or \
                         loss_on: target",
                        loss_on.name()
                    ));
                }
            }
        }
        let chat = (self.data.train.iter())
            .chain(&self.data.eval)
            .any(|d| d.template.is_chat());
        problems.check(
            !(chat && self.data.attention == super::Attention::Prefix),
            "data.attention: prefix makes each example's prompt bidirectional, but conversations \
             (template: chat) have no single prompt; use attention: causal"
                .into(),
        );
        if self.data.chat_template.is_some() && !chat && !self.objective.is_preference() {
            problems.push(
                "data.chat_template: no dataset is conversations (template: chat, or \
                 conversational preference pairs) to use it"
                    .into(),
            );
        }
        if self.data.packing == super::Packing::Isolated {
            problems.check(
                self.data.mode == super::BatchMode::Pack,
                "data.packing: isolated packs rows, but data.mode is pad (one example a row \
                 already); use mode: pack"
                    .into(),
            );
        }
        problems.check(
            is_device(&self.device),
            format!(
                "device: expected cpu, cuda or cuda:N, found {:?}",
                self.device
            ),
        );
        problems.check(
            self.eval.batch_size > 0,
            "eval.batch_size: must be at least 1".into(),
        );
        let task = self.eval.task;
        if task != super::EvalTask::Loss {
            problems.check(
                !self.data.eval.is_empty(),
                format!(
                    "eval.task: {} needs an eval dataset under data.eval",
                    task.name()
                ),
            );
        }
        let pairs_task = matches!(task, super::EvalTask::Loss | super::EvalTask::Preference);
        if self.objective.is_preference() && !pairs_task {
            problems.push(format!(
                "eval.task: {} measures text examples; preference pairs are measured by \
                 eval.task: preference (or loss)",
                task.name()
            ));
        }
        if task == super::EvalTask::Preference && !self.objective.is_preference() {
            problems.push(
                "eval.task: preference measures preference pairs; set objective.kind: dpo or \
                 simpo"
                    .into(),
            );
        }
        if let Some(column) = &self.eval.group_by {
            problems.check(
                task == super::EvalTask::Classify,
                format!(
                    "eval.group_by: only applies to eval.task: classify, not {} (mnli reports \
                     per genre by itself)",
                    task.name()
                ),
            );
            problems.check(
                !column.trim().is_empty(),
                "eval.group_by: must name a column of the eval data".into(),
            );
        }
        if let Some(early) = &self.eval.early_stopping {
            problems.check(
                !early.metric().trim().is_empty(),
                "eval.early_stopping.metric: must name a metric the evaluation reports (loss, \
                 accuracy, ...)"
                    .into(),
            );
            problems.check(
                early.patience >= 1,
                "eval.early_stopping.patience: must be at least 1 (evaluations without \
                 improvement before stopping)"
                    .into(),
            );
            problems.check(
                early.min_delta.is_finite() && early.min_delta >= 0.0,
                format!(
                    "eval.early_stopping.min_delta: must be a number >= 0, found {}",
                    early.min_delta
                ),
            );
            problems.check(
                self.eval.every > 0,
                "eval.early_stopping: needs eval.every > 0 (with evaluations only at the end, \
                 there is nothing to stop early)"
                    .into(),
            );
        }
        if let Some(best) = &self.checkpoint.keep_best {
            problems.check(
                !best.metric().trim().is_empty(),
                "checkpoint.keep_best: must name a metric the evaluation reports (loss, \
                 accuracy, ...)"
                    .into(),
            );
            let (eval_every, every) = (self.eval.every, self.checkpoint.every);
            problems.check(
                eval_every > 0 && every > 0 && every.is_multiple_of(eval_every),
                format!(
                    "checkpoint.keep_best: needs checkpoint.every ({every}) to be a positive \
                     multiple of eval.every ({eval_every}), so that every checkpoint has an \
                     evaluation to rank it by"
                ),
            );
        }
        problems.check(
            self.tracking.log_every > 0,
            "tracking.log_every: must be at least 1".into(),
        );
        if let Some(push) = &self.checkpoint.push_to_hub {
            problems.check(
                push.repo.split('/').count() == 2,
                format!(
                    "checkpoint.push_to_hub.repo: expected owner/name, found {:?}",
                    push.repo
                ),
            );
        }
        match problems.0.as_slice() {
            [] => Ok(()),
            [one] => bail!("{one}"),
            many => bail!("{} problems:\n  - {}", many.len(), many.join("\n  - ")),
        }
    }
}

/// Every problem of a recipe at once, so one `recipe check` shows them all.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn check(&mut self, ok: bool, message: String) {
        if !ok {
            self.0.push(message);
        }
    }

    fn push(&mut self, message: String) {
        self.0.push(message);
    }
}

fn is_device(device: &str) -> bool {
    device == "cpu"
        || device == "cuda"
        || device
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok())
}

impl super::DatasetSpec {
    fn validate(&self) -> Result<()> {
        let s = &self.source;
        match (&s.path, &s.hub) {
            (Some(_), Some(_)) => bail!("source: set exactly one of `path` and `hub`, not both"),
            (None, None) => {
                bail!("source: set exactly one of `path` (a local file) and `hub` (a Hub dataset)")
            }
            (Some(path), None) => {
                for (key, set) in [
                    ("config", &s.config),
                    ("split", &s.split),
                    ("revision", &s.revision),
                ] {
                    if set.is_some() {
                        bail!(
                            "source.{key}: only applies to Hub datasets (`hub:`), not to `path:`"
                        );
                    }
                }
                super::Format::for_source(s, path).map_err(|e| anyhow!("source.format: {e}"))?;
            }
            (None, Some(hub)) => {
                if hub.split('/').count() != 2 {
                    bail!("source.hub: expected a dataset repo id owner/name, found {hub:?}");
                }
                if s.split.is_none() {
                    bail!("source.split: a Hub dataset needs a split (e.g. train, validation_matched)");
                }
                if s.format.is_some() {
                    bail!("source.format: Hub datasets are read from their parquet files; remove `format`");
                }
            }
        }
        if self.limit == Some(0) {
            bail!("limit: must be at least 1 (remove it to use every row)");
        }
        if let Some(few) = &self.few_shot {
            if few.k == 0 {
                bail!("few_shot.k: must be at least 1 (remove few_shot to disable it)");
            }
        }
        if self.template.is_chat() || self.template.is_preference() {
            if self.few_shot.is_some() {
                bail!("few_shot: conversations and preference pairs take no few-shot examples");
            }
            return Ok(());
        }
        if let TemplateSpec::Preset(name) = &self.template {
            super::template::Preset::parse(name).map_err(|e| anyhow!("template: {e}"))?;
        }
        super::template::Template::from_spec(&self.template)
            .map_err(|e| anyhow!("template: {e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_create_mappings_and_index_lists() {
        let mut tree: Value = serde_norway::from_str("a: {b: 1}\nl: [{x: 1}, {x: 2}]").unwrap();
        apply_override(&mut tree, "a.c.d=[1, 2]").unwrap();
        apply_override(&mut tree, "l.1.x=hello").unwrap();
        apply_override(&mut tree, "a.b=null").unwrap();
        let expected: Value =
            serde_norway::from_str("a: {b: null, c: {d: [1, 2]}}\nl: [{x: 1}, {x: hello}]")
                .unwrap();
        assert_eq!(tree, expected);
        let e = apply_override(&mut tree, "l.x=1").unwrap_err().to_string();
        assert!(
            e.contains("`l` is a list; expected an index, found `x`"),
            "{e}"
        );
        let e = apply_override(&mut tree, "a.b=[").unwrap_err().to_string();
        assert!(e.contains("the value `[` is not valid YAML"), "{e}");
    }
}
