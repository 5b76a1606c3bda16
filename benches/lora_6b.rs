//! The measure that matters for LoRA: a GPT-J-6B-shaped model (random weights of the real shape,
//! bf16) fine-tuned with `recipes/gptj-6b-mnli-lora.yaml`'s adapter (r 8 on q_proj and v_proj) on
//! MNLI in Graphcore's format, micro-batch 1 × 128 tokens, on the CPU: one step, a checkpoint,
//! and a resume that trains a second step from it. Reports seconds per step and the peak RSS
//! (VmHWM) of this process. Takes minutes; needs ../shared (MNLI and the GPT-2 tokenizer).
//!
//!     cargo bench --bench lora_6b                           # the recipe: activation checkpointing
//!     cargo bench --bench lora_6b -- --no-checkpointing     # keeping every activation
//!     cargo bench --bench lora_6b -- --quantize nf4 [--double-quant]   # QLoRA: a 4-bit base
//!     cargo bench --bench lora_6b -- --quantize int8

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use kiln::cli::parse_resume;
use kiln::train::launch::{train_recipe, LaunchOptions};

fn rss_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn shared(sub: &str) -> Result<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared")
        .join(sub);
    anyhow::ensure!(
        path.exists(),
        "{} is missing (../shared beside the repository)",
        path.display()
    );
    Ok(path)
}

fn options(resume: Option<&str>) -> LaunchOptions {
    LaunchOptions {
        resume: resume.map(parse_resume),
        quiet: true,
        threads: None,
        allow_data_change: false,
        overwrite: false,
    }
}

/// Run as `lora_6b resume OUT_DIR`: the second phase, in a fresh process as a real resume is.
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let checkpointing = !args.iter().any(|a| a == "--no-checkpointing");
    if let Some(i) = args.iter().position(|a| a == "resume") {
        let out = PathBuf::from(
            args.get(i + 1)
                .context("resume needs the output directory")?,
        );
        return resume(&out, checkpointing);
    }
    let out = tempfile::tempdir()?;
    let started = Instant::now();
    let overrides = overrides(out.path(), checkpointing)?;
    let first = train_recipe(&recipe_path(), &overrides, options(None)).context("step 1")?;
    let first_total = started.elapsed().as_secs_f64();
    let step_secs = first.step_seconds.first().copied().unwrap_or(f64::NAN);
    let checkpoint = first
        .last_checkpoint
        .clone()
        .context("no checkpoint written")?;
    let adapter_bytes = std::fs::metadata(checkpoint.join("adapter_model.safetensors"))?.len();
    let estimate = run_json_estimate(out.path(), checkpointing)?;
    println!(
        "step 1: {step_secs:.1} s (init, step and checkpoint {first_total:.0} s), loss {:.4}, \
         adapter {:.1} MiB; peak RSS {:.0} MiB, estimated {:.0} MiB",
        first.losses[0],
        adapter_bytes as f64 / (1 << 20) as f64,
        rss_mib("VmHWM:"),
        estimate
    );
    let mut resume = std::process::Command::new(std::env::current_exe()?);
    resume.args(["resume", out.path().to_str().context("path")?]);
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--quantize") {
        resume.args(&args[i..(i + 2).min(args.len())]);
    }
    if args.iter().any(|a| a == "--double-quant") {
        resume.arg("--double-quant");
    }
    if !checkpointing {
        resume.arg("--no-checkpointing");
    }
    let status = resume.status()?;
    anyhow::ensure!(status.success(), "the resume failed");
    Ok(())
}

fn resume(out: &Path, checkpointing: bool) -> Result<()> {
    let mut overrides = overrides(out, checkpointing)?;
    overrides.push("steps=2".to_string());
    let second = train_recipe(&recipe_path(), &overrides, options(Some("latest")))
        .context("resume to step 2")?;
    println!(
        "resumed in a new process: step 2 {:.1} s, loss {:.4}, checkpoint {}; peak RSS {:.0} MiB",
        second.step_seconds.first().copied().unwrap_or(f64::NAN),
        second.losses[0],
        second
            .last_checkpoint
            .as_deref()
            .unwrap_or(Path::new("-"))
            .display(),
        rss_mib("VmHWM:")
    );
    Ok(())
}

fn recipe_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/gptj-6b-mnli-lora.yaml")
}

/// The estimate's total (MiB) as the run recorded it in `run.json`.
fn run_json_estimate(out: &Path, checkpointing: bool) -> Result<f64> {
    let path = out.join("runs/gptj-6b-mnli-lora/run.json");
    let info: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    let key = if checkpointing {
        "total_checkpointed"
    } else {
        "total"
    };
    let total = info["memory"]["estimate"][key]
        .as_f64()
        .with_context(|| format!("{}: no memory estimate", path.display()))?;
    Ok(total / (1 << 20) as f64)
}

/// `--quantize FORMAT` and `--double-quant` as recipe overrides.
fn quantize_overrides() -> Vec<String> {
    let args: Vec<String> = std::env::args().collect();
    let mut overrides = Vec::new();
    if let Some(i) = args.iter().position(|a| a == "--quantize") {
        let format = args.get(i + 1).filter(|f| !f.starts_with("--"));
        let format = format.expect("--quantize needs a format: nf4 or int8");
        overrides.push(format!("model.quantize={format}"));
    }
    if args.iter().any(|a| a == "--double-quant") {
        overrides.push("model.double_quant=true".to_string());
    }
    overrides
}

fn overrides(out: &Path, checkpointing: bool) -> Result<Vec<String>> {
    let train = shared("data/mnli/train.jsonl")?;
    let tokenizer = shared("tokenizers/gpt2")?;
    let mut overrides = vec![
        "model.from=null".to_string(),
        "model.revision=null".to_string(),
        "model.init={preset: gptj-6b, seed: 0, dtype: bf16}".to_string(),
        format!("tokenizer={}", tokenizer.display()),
        format!(
            "data.train=[{{source: {{path: {}}}, template: mnli, limit: 64}}]",
            train.display()
        ),
        "data.eval=[]".to_string(),
        "eval.task=loss".to_string(),
        "data.seq_len=128".to_string(),
        "data.mode=pad".to_string(),
        "batch.global=1".to_string(),
        "steps=1".to_string(),
        "device=cpu".to_string(),
        "checkpoint.every=1".to_string(),
        format!("checkpoint.dir={}", out.join("checkpoints").display()),
        format!("tracking.log_dir={}", out.join("runs").display()),
        format!("memory.activation_checkpointing={checkpointing}"),
    ];
    overrides.extend(quantize_overrides());
    Ok(overrides)
}
