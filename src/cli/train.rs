//! `kiln train` (alias `finetune`): a recipe to trained checkpoints.

use super::*;

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
    /// Start this run afresh over an earlier run of the same name: once the recipe, model and data
    /// have passed their checks, delete everything in its checkpoint directory
    /// (`<checkpoint.dir>/<name>/`: every `step-*` and `latest`) and its log directory
    /// (`<tracking.log_dir>/<name>/`: metrics.jsonl, TensorBoard events, run.json, eval reports),
    /// so nothing of the old run mixes into the new one. Without it, `kiln train` refuses to start
    /// over an earlier run's checkpoints or logs.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
}

pub(super) fn train(args: TrainArgs) -> Result<()> {
    use crate::train::launch::{parse_resume, train_recipe, LaunchOptions};
    train_recipe(
        &args.recipe.recipe,
        LaunchOptions {
            overrides: args.recipe.set,
            resume: args.resume.as_deref().map(parse_resume),
            quiet: args.quiet,
            threads: args.threads,
            allow_data_change: args.allow_data_change,
            overwrite: args.overwrite,
        },
    )?;
    Ok(())
}
