//! Training throughput and memory of the `small` preset (4 layers, d 256, vocab 50400):
//! seq 256, micro-batch 8, 2 threads, fp32 and bf16 compute, plus the replica comparison.
//!
//!     cargo bench --bench train                 # fp32, bf16, replicas
//!     cargo bench --bench train -- --growth     # also RSS at step 20 vs step 200 (minutes)
//!
//! Compare with `scripts/bench_train_ref.py` (PyTorch eager) on the same machine, when it is
//! otherwise idle. Peak RSS is the process's high-water mark (VmHWM), so run one configuration
//! per process for a clean number: `cargo bench --bench train -- fp32`.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::Tensor;
use kiln::data::{Sequence, SequenceStream};
use kiln::model::init::{init_parameter, Preset};
use kiln::recipe::Recipe;
use kiln::train::{self, ModelInit, TrainOptions};
use rand::{Rng, SeedableRng};

const SEQ: usize = 256;
const MICRO: usize = 8;
const THREADS: usize = 2;

fn recipe(out: &std::path::Path, compute: &str, replicas: usize, steps: u64) -> Result<Recipe> {
    let micro = MICRO / replicas;
    Ok(serde_norway::from_str(&format!(
        "name: bench\nmodel: {{init: {{preset: small}}}}\n\
         data: {{train: [{{source: {{path: none.jsonl}}, template: text}}], seq_len: {SEQ}}}\n\
         batch: {{global: {MICRO}, micro: {micro}, replicas: {replicas}}}\n\
         steps: {steps}\noptimizer: {{lr: 1.0e-4}}\nprecision: {{compute: {compute}}}\n\
         eval: {{every: 1}}\n\
         checkpoint: {{dir: {0}/checkpoints}}\ntracking: {{log_dir: {0}/runs}}\n",
        out.display()
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

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Runs `warmup + timed` steps; returns (tokens/s over the timed steps, RSS per step in MiB).
fn bench(compute: &str, replicas: usize, warmup: u64, timed: u64) -> Result<(f64, Vec<f64>)> {
    let out = tempfile::tempdir()?;
    let recipe = recipe(out.path(), compute, replicas, warmup + timed)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let rows: Vec<Sequence> = (0..64)
        .map(|_| Sequence::all_trained((0..SEQ).map(|_| rng.gen_range(0..50257)).collect()))
        .collect();
    let mut rss = Vec::new();
    let summary = train::Trainer::new(
        &recipe,
        init()?,
        SequenceStream::new(rows, 0, true),
        None,
        TrainOptions {
            quiet: true,
            threads: Some(THREADS),
            eval_hook: Some(Box::new(|_: &kiln::model::Model, _| {
                rss.push(rss_kib("VmRSS:") as f64 / 1024.0);
                Ok(vec![])
            })),
            ..TrainOptions::default()
        },
    )?
    .train()?;
    let timed_secs: f64 = summary.step_seconds[warmup as usize..].iter().sum();
    let tokens = (timed as usize * MICRO * SEQ) as f64;
    Ok((tokens / timed_secs, rss))
}

fn main() -> Result<()> {
    kiln::process::configure_process();
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--bench"))
        .collect();
    let growth = args.iter().any(|a| a == "--growth");
    let only: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| *o == name);
    println!(
        "load average: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    for compute in ["fp32", "bf16"] {
        if wanted(compute) {
            let (tps, _) = bench(compute, 1, 2, 5)?;
            let out = tempfile::tempdir()?;
            let estimate = kiln::train::memory::MemoryEstimate::new(
                &recipe(out.path(), compute, 1, 7)?,
                &Preset::Small.config(),
                THREADS,
            );
            println!(
                "{compute}: {tps:.0} tokens/s (small, seq {SEQ}, micro {MICRO}, {THREADS} threads), peak RSS so far {:.0} MiB (estimate {:.0} MiB)",
                rss_kib("VmHWM:") as f64 / 1024.0,
                estimate.total() as f64 / (1 << 20) as f64
            );
        }
    }
    if wanted("replicas") {
        let (one, _) = bench("fp32", 1, 2, 5)?;
        let (two, _) = bench("fp32", 2, 2, 5)?;
        println!("fp32 replicas=1 × 2 threads: {one:.0} tokens/s; replicas=2 × 1 thread: {two:.0} tokens/s");
    }
    if growth {
        let (_, rss) = bench("fp32", 1, 0, 200)?;
        let (at20, at200) = (rss[19], rss[199]);
        let trail: Vec<String> = (1..=10)
            .map(|i| format!("{:.0}", rss[i * 20 - 1]))
            .collect();
        println!(
            "RSS at step 20: {at20:.0} MiB, at step 200: {at200:.0} MiB ({:+.1}%); every 20 steps: {}",
            (at200 / at20 - 1.0) * 100.0,
            trail.join(" ")
        );
    }
    Ok(())
}
