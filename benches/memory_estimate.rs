//! How close the memory estimate `kiln train` records in `run.json` comes to the peak RSS the
//! same run measured, for the tiny preset's full fine-tune and LoRA (the small and 6B shapes are
//! in `benches/train.rs` and `benches/lora_6b.rs`). The target is 15%: it fails beyond that.
//! Each run is its own process, since the peak RSS is a process's.
//!
//!     cargo bench --bench memory_estimate

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use kiln::train::launch::{train_recipe, LaunchOptions};

const TARGET: f64 = 0.15;

const RUNS: [(&str, &str); 2] = [
    ("full", ""),
    (
        "lora",
        "lora: {r: 4, alpha: 8, dropout: 0.1, target_modules: [q_proj, v_proj, fc_in]}\n",
    ),
];

fn bundled(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("datasets/nli")
        .join(path)
        .display()
        .to_string()
}

/// The tests' small recipe (tests/common `write_recipe`): 3 steps of the tiny GPT-J on the
/// bundled NLI sample.
fn write_recipe(out: &Path, extra: &str) -> Result<PathBuf> {
    let text = format!(
        "name: run\n\
         seed: 3\n\
         model: {{init: {{preset: tiny, seed: 1, vocab_size: 1024}}}}\n\
         tokenizer: {tokenizer}\n\
         data:\n  \
           train: [{{source: {{path: {train}}}, template: mnli, limit: 400}}]\n  \
           eval: [{{source: {{path: {eval}}}, template: mnli, limit: 40}}]\n  \
           seq_len: 64\n  mode: pad\n  loss_on: target\n\
         optimizer: {{lr: 2.0e-3, weight_decay: 0.01}}\n\
         schedule: {{kind: cosine, warmup: 2}}\n\
         batch: {{global: 8, micro: 4}}\n\
         steps: 3\n\
         checkpoint: {{every: 1, dir: {ckpt}}}\n\
         tracking: {{log_dir: {logs}}}\n\
         {extra}",
        tokenizer = bundled("tokenizer"),
        train = bundled("train.jsonl"),
        eval = bundled("validation.jsonl"),
        ckpt = out.join("checkpoints").display(),
        logs = out.join("runs").display(),
    );
    let path = out.join("recipe.yaml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// One run in this process: prints the estimate and the peak, and fails beyond the target.
fn measure(name: &str) -> Result<()> {
    let extra = RUNS
        .iter()
        .find(|(n, _)| *n == name)
        .with_context(|| format!("no run named {name}"))?
        .1;
    let out = tempfile::tempdir()?;
    let recipe = write_recipe(out.path(), extra)?;
    let options = LaunchOptions {
        resume: None,
        quiet: true,
        threads: None,
        allow_data_change: false,
        overwrite: false,
    };
    train_recipe(&recipe, &[], options).context("training")?;
    let path = out.path().join("runs/run/run.json");
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let estimate = info["memory"]["estimate"]["total"]
        .as_f64()
        .context("run.json: memory.estimate.total")?;
    let peak = info["memory"]["peak_rss_bytes"]
        .as_f64()
        .context("run.json: memory.peak_rss_bytes")?;
    let error = (estimate - peak).abs() / peak;
    let mib = |bytes: f64| bytes / (1 << 20) as f64;
    println!(
        "{name}: estimated {:.1} MiB, measured peak {:.1} MiB ({:+.1}%)",
        mib(estimate),
        mib(peak),
        100.0 * (estimate - peak) / peak
    );
    anyhow::ensure!(
        error <= TARGET,
        "{name}: the estimate is {:.1}% off the measured peak (target {:.0}%)",
        100.0 * error,
        100.0 * TARGET
    );
    Ok(())
}

/// Run as `memory_estimate one NAME` for a single run.
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "one") {
        return measure(args.get(i + 1).context("`one` needs a run name")?);
    }
    let mut failed = Vec::new();
    for (name, _) in RUNS {
        let status = std::process::Command::new(std::env::current_exe()?)
            .args(["one", name])
            .status()?;
        if !status.success() {
            failed.push(name);
        }
    }
    anyhow::ensure!(failed.is_empty(), "beyond the target: {failed:?}");
    Ok(())
}
