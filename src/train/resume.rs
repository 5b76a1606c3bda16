//! Continuing a run from one of its checkpoints: find and verify it, check that the recipe and
//! the data may continue it, and restore the weights, the optimizer, the loss scaler and the
//! data position.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};

use super::examples::TrainData;
use super::optimizer::AdamW;
use super::precision::LossScaler;
use super::trainable::Trainable;
use super::Resume;
use crate::checkpoint::{self, TrainerState};
use crate::data::fingerprint::first_difference;
use crate::data::SourceFingerprint;
use crate::model::{self, Config};
use crate::recipe::Recipe;
use crate::track::Progress;

/// The checkpoint a run resumed from.
pub struct Resumed {
    pub dir: PathBuf,
    pub state: TrainerState,
}

/// What a resume may change and must restore.
pub struct ResumeInto<'r> {
    pub recipe: &'r Recipe,
    pub config: &'r Config,
    pub device: &'r Device,
    pub trainable: &'r Trainable,
    pub adamw: &'r mut AdamW,
    pub scaler: &'r mut LossScaler,
    pub stream: &'r mut TrainData,
    /// The files the training data is read from now (empty: nothing to compare).
    pub data: &'r [SourceFingerprint],
    pub allow_data_change: bool,
    pub ranks: usize,
}

/// Finds and verifies the checkpoint `resume` names among `run_checkpoints`, and restores `into`
/// from it, saying through `progress` what changed.
pub fn resume_from(
    resume: &Resume,
    run_checkpoints: &Path,
    mut into: ResumeInto,
    progress: &Progress,
) -> Result<Resumed> {
    let mut warnings = Vec::new();
    let (dir, state) = match resume {
        Resume::Latest => checkpoint::latest_good(run_checkpoints, &mut |w| warnings.push(w))?,
        Resume::Dir(dir) => (dir.clone(), checkpoint::verify(dir)?),
    };
    for w in warnings {
        progress.warn(&w);
    }
    let changes = checkpoint::check_compatible(&state.recipe, into.recipe)
        .with_context(|| format!("cannot resume from {}", dir.display()))?;
    for change in changes {
        progress.println(&format!("resume: recipe change allowed: {change}"));
    }
    check_same_data(&dir, &state, into.data, into.allow_data_change, progress)?;
    let saved_ranks = state.world_size.unwrap_or(1);
    let ranks = into.ranks;
    if saved_ranks != ranks {
        // The data position, the RNG and the optimizer state are the job's, not a rank's, so
        // any number of ranks that divides batch.replicas can continue.
        progress.println(&format!(
            "resume: the checkpoint was written by {saved_ranks} rank(s), this job has {ranks}: \
             the same replicas train the same rows, but the gradients are summed in another \
             order, so updates equal an uninterrupted run's up to float rounding"
        ));
    }
    restore(&dir, &state, &mut into)?;
    into.stream.restore(state.stream);
    let (resumed_scaler, note) = LossScaler::resumed(state.loss_scaler, &into.recipe.precision);
    *into.scaler = resumed_scaler;
    if let Some(note) = note {
        progress.println(&note);
    }
    progress.println(&format!(
        "resumed from {} at step {}",
        dir.display(),
        state.step
    ));
    Ok(Resumed { dir, state })
}

/// Refuses a resume whose training files differ from those the checkpoint recorded, unless the
/// caller allows it (then says so).
fn check_same_data(
    dir: &Path,
    state: &TrainerState,
    now: &[SourceFingerprint],
    allow_data_change: bool,
    progress: &Progress,
) -> Result<()> {
    if now.is_empty() {
        return Ok(());
    }
    if state.data.is_empty() {
        progress.println(&format!(
            "resume: {} records no fingerprint of its training data (an older checkpoint), so a \
             change of the data cannot be detected",
            dir.display()
        ));
        return Ok(());
    }
    let Some(difference) = first_difference(&state.data, now) else {
        return Ok(());
    };
    if allow_data_change {
        progress.println(&format!(
            "resume: the training data changed, continuing as --allow-data-change asks: \
             {difference}"
        ));
        return Ok(());
    }
    bail!(
        "cannot resume from {}: {difference}. The saved data position would continue over \
         other examples; start a new run (another `name`), or pass --allow-data-change to resume \
         over the changed data anyway",
        dir.display()
    )
}

/// The checkpoint's weights into the trainable parameters, its moments into the optimizer.
fn restore(dir: &Path, state: &TrainerState, into: &mut ResumeInto) -> Result<()> {
    let (config, trainable, device) = (into.config, into.trainable, into.device);
    // An adapter checkpoint has no config.json: its tensors' shapes are checked against the
    // model's layers instead.
    let saved_config = match trainable.is_lora() {
        true => config.clone(),
        false => model::load_config(dir)?,
    };
    ensure!(
        saved_config.parameter_shapes() == config.parameter_shapes(),
        "{}: the checkpoint's model ({} with {} layers of width {}, vocabulary {}) differs from \
         the recipe's ({} with {} layers of width {}, vocabulary {})",
        dir.display(),
        saved_config.model_type(),
        saved_config.n_layer(),
        saved_config.hidden_size(),
        saved_config.vocab_size(),
        config.model_type(),
        config.n_layer(),
        config.hidden_size(),
        config.vocab_size(),
    );
    let optimizer_path = dir.join(checkpoint::OPTIMIZER_FILE);
    let mut optimizer_state = candle_core::safetensors::load(&optimizer_path, device)
        .with_context(|| format!("{}: cannot read", optimizer_path.display()))?;
    let master_names: Vec<String> = optimizer_state
        .keys()
        .filter(|k| k.starts_with("master."))
        .cloned()
        .collect();
    let masters: HashMap<String, Tensor> = master_names
        .into_iter()
        .filter_map(|k| {
            optimizer_state
                .remove(&k)
                .map(|t| (k["master.".len()..].to_string(), t))
        })
        .collect();
    trainable.restore_params(dir, config, masters, device)?;
    into.adamw.load_state(
        &trainable.params,
        optimizer_state,
        state.optimizer_steps,
        &optimizer_path,
    )
}
