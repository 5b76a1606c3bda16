//! A DPO step against an SFT step on the same tokens, and what the reference costs in memory:
//! the `small` preset (4 layers, d 256, vocab 50400), 8 pairs a step of a 128-token prompt and
//! two 128-token completions (16 sequences of 256 tokens), 2 threads. SFT trains the same 16
//! sequences with the loss on their completions. Each configuration runs in its own process,
//! so its peak RSS (VmHWM) is its own.
//!
//!     cargo bench --bench preference                 # every configuration
//!     cargo bench --bench preference -- dpo-lora     # one

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::Tensor;
use kiln::data::{PreferencePair, Sequence, Stream};
use kiln::model::init::{init_parameter, Preset};
use kiln::recipe::Recipe;
use kiln::train::{self, ModelInit, TrainData, TrainOptions};
use rand::{Rng, SeedableRng};

const PART: usize = 128;
const PAIRS: usize = 8;
const THREADS: usize = 2;
const WARMUP: u64 = 2;
const TIMED: u64 = 5;

/// (name, objective, whether LoRA).
const CONFIGS: &[(&str, &str, bool)] = &[
    ("sft-lora", "", true),
    ("dpo-lora", "objective: {kind: dpo}\n", true),
    (
        "dpo-lora-precomputed",
        "objective: {kind: dpo, precompute_ref_log_probs: true}\n",
        true,
    ),
    ("simpo-lora", "objective: {kind: simpo}\n", true),
    ("sft-full", "", false),
    ("dpo-full", "objective: {kind: dpo}\n", false),
    (
        "dpo-full-precomputed",
        "objective: {kind: dpo, precompute_ref_log_probs: true}\n",
        false,
    ),
];

fn recipe(out: &std::path::Path, objective: &str, lora: bool, global: usize) -> Result<Recipe> {
    let template = if objective.is_empty() {
        "text"
    } else {
        "preference"
    };
    let lora = if lora {
        "lora: {r: 8, alpha: 16, target_modules: [q_proj, v_proj]}\n"
    } else {
        ""
    };
    Ok(serde_norway::from_str(&format!(
        "name: bench\nmodel: {{init: {{preset: small}}}}\n\
         data: {{train: [{{source: {{path: none.jsonl}}, template: {template}}}], seq_len: {seq}}}\n\
         batch: {{global: {global}, micro: {global}}}\n\
         steps: {steps}\noptimizer: {{lr: 1.0e-4}}\n{objective}{lora}\
         checkpoint: {{dir: {out}/checkpoints}}\ntracking: {{log_dir: {out}/runs}}\n",
        seq = 2 * PART,
        steps = WARMUP + TIMED,
        out = out.display()
    ))?)
}

fn init() -> Result<ModelInit> {
    let config = Preset::Small.config();
    let params: HashMap<String, Tensor> = kiln::model::parameter_shapes(&config)
        .into_iter()
        .map(|(name, shape)| Ok((name.clone(), init_parameter(&config, &name, &shape, 0)?)))
        .collect::<Result<_>>()?;
    Ok(ModelInit {
        config,
        params,
        tokenizer: None,
        base_model: "init:small".into(),
    })
}

fn pairs() -> Vec<PreferencePair> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut tokens = |n: usize| -> Vec<u32> { (0..n).map(|_| rng.gen_range(0..50257)).collect() };
    (0..4 * PAIRS)
        .map(|_| {
            let prompt = tokens(PART);
            let sequence = |completion: Vec<u32>| {
                let ids = [prompt.clone(), completion].concat();
                let mask = (0..ids.len()).map(|i| i >= PART).collect();
                Sequence::new(ids, mask)
            };
            let (chosen, rejected) = (tokens(PART), tokens(PART));
            PreferencePair {
                chosen: sequence(chosen),
                rejected: sequence(rejected),
                reference: None,
            }
        })
        .collect()
}

fn vm_hwm_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// One configuration in this process: seconds per timed step, and the estimate in MiB.
fn run(objective: &str, lora: bool) -> Result<(f64, f64)> {
    let out = tempfile::tempdir()?;
    let pairs = pairs();
    let (data, global): (TrainData, usize) = match objective.is_empty() {
        true => {
            let rows: Vec<Sequence> = (pairs.into_iter())
                .flat_map(|p| [p.chosen, p.rejected])
                .collect();
            (Stream::new(rows, 0, false).into(), 2 * PAIRS)
        }
        false => (Stream::new(pairs, 0, false).into(), PAIRS),
    };
    let recipe = recipe(out.path(), objective, lora, global)?;
    let estimate =
        kiln::train::memory::MemoryEstimate::new(&recipe, &Preset::Small.config(), THREADS);
    let summary = train::Trainer::new(
        &recipe,
        init()?,
        data,
        None,
        TrainOptions {
            quiet: true,
            threads: Some(THREADS),
            ..TrainOptions::default()
        },
    )?
    .train()?;
    let timed: f64 = summary.step_seconds[WARMUP as usize..].iter().sum();
    Ok((
        timed / TIMED as f64,
        estimate.total() as f64 / (1 << 20) as f64,
    ))
}

fn main() -> Result<()> {
    kiln::process::configure_process();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--bench"))
        .collect();
    if let Some(name) = args.iter().find_map(|a| a.strip_prefix("--child=")) {
        let &(_, objective, lora) = CONFIGS
            .iter()
            .find(|(n, _, _)| *n == name)
            .context("unknown configuration")?;
        let (seconds, estimate) = run(objective, lora)?;
        println!("{seconds} {} {estimate}", vm_hwm_mib());
        return Ok(());
    }
    let only: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    println!(
        "small preset, {PAIRS} pairs of {PART}+{PART}/{PART} tokens a step (16 sequences of {} \
         tokens; SFT trains the same 16), {THREADS} threads; load average {}",
        2 * PART,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!("| configuration | s/step | tokens/s | peak RSS (MiB) | estimate (MiB) |");
    println!("|---|---|---|---|---|");
    for &(name, _, _) in CONFIGS {
        if !only.is_empty() && !only.iter().any(|o| *o == name) {
            continue;
        }
        let output = std::process::Command::new(std::env::current_exe()?)
            .arg(format!("--child={name}"))
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8_lossy(&output.stdout);
        let numbers: Vec<f64> = (text.lines().last().unwrap_or_default())
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(f64::NAN))
            .collect();
        let [seconds, peak, estimate] = numbers[..] else {
            anyhow::bail!("{name}: unexpected output {text}");
        };
        let tokens = (2 * PAIRS * 2 * PART) as f64;
        println!(
            "| {name} | {seconds:.3} | {:.0} | {peak:.0} | {estimate:.0} |",
            tokens / seconds
        );
    }
    Ok(())
}
