//! `kiln train` (alias `finetune`): a recipe to trained checkpoints.

use super::*;
use crate::recipe::{EvalTask, Recipe};
use crate::train::launch::{Job, LaunchOptions};
use crate::train::{Resume, TrainSummary, Trainer};

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
    let job = Job::connect(&args.recipe.recipe, &args.recipe.set)?;
    let (rank, ranks) = (job.rank(), job.ranks());
    if rank != 0 {
        // One voice: rank 0 reports; the others' errors and warnings still reach stderr.
        silence_stdout();
    }
    let options = LaunchOptions {
        resume: args.resume.as_deref().map(parse_resume),
        quiet: args.quiet,
        threads: args.threads,
        allow_data_change: args.allow_data_change,
        overwrite: args.overwrite,
    };
    match train_job(&job, options) {
        Err(e) if ranks > 1 => {
            // One write, so that the ranks' messages do not interleave; then every rank stops.
            let message = format!("error: rank {rank} of {ranks}: {e:#}\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), message.as_bytes());
            job.collective.abort(1)
        }
        result => result,
    }
}

/// Setup, train, cleanup: the uploads still running when training ends are waited for, even
/// when it failed.
fn train_job(job: &Job, options: LaunchOptions) -> Result<()> {
    let mut trainer = Trainer::from_recipe(job, options)?;
    let result = trainer.train();
    trainer.finish_uploads(result.as_ref().ok())?;
    print_summary(&job.recipe, &result?);
    Ok(())
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

/// `--resume latest|DIR`.
pub fn parse_resume(value: &str) -> Resume {
    if value == "latest" {
        Resume::Latest
    } else {
        Resume::Dir(PathBuf::from(value))
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
