//! Decode throughput of the `small` preset (4 layers, d 256, vocab 50400) on CPU: greedy,
//! 32-token random prompts, exactly 64 new tokens per row, 2 threads, batch 1 and 16.
//!
//!     cargo bench --bench generate
//!
//! With `KILN_PYTHON` naming a Python that has torch and transformers, the same measurement of
//! `transformers` `generate` (`scripts/bench_generate_ref.py`) runs right after, for a
//! side-by-side on an otherwise idle machine.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use kiln::generate::{generate, GenerationParams};
use kiln::model::init::{init_parameter, Preset};
use rand::{Rng, SeedableRng};

const PROMPT_LEN: usize = 32;
const NEW_TOKENS: usize = 64;
const THREADS: usize = 2;
const REPEATS: usize = 3;

fn main() -> Result<()> {
    kiln::process::configure_process();
    rayon::ThreadPoolBuilder::new()
        .num_threads(THREADS)
        .build_global()
        .context("configuring the thread pool")?;
    println!(
        "load average: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    let config = Preset::Small.config();
    let params: HashMap<String, Tensor> = kiln::model::parameter_shapes(&config)
        .into_iter()
        .map(|(name, shape)| Ok((name.clone(), init_parameter(&config, &name, &shape, 0)?)))
        .collect::<Result<_>>()?;
    let model = kiln::model::model_from_parameters(&config, &params, DType::F32, &Device::Cpu)?;
    // Every row makes exactly NEW_TOKENS tokens, as in the reference (eos suppressed).
    let params = GenerationParams {
        max_new_tokens: NEW_TOKENS,
        min_new_tokens: NEW_TOKENS,
        ..GenerationParams::default()
    };
    // `cargo bench --bench generate -- 16` runs one batch size.
    let only: Vec<usize> = std::env::args().filter_map(|a| a.parse().ok()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for batch in [1usize, 16] {
        if !only.is_empty() && !only.contains(&batch) {
            continue;
        }
        let prompts: Vec<Vec<u32>> = (0..batch)
            .map(|_| (0..PROMPT_LEN).map(|_| rng.gen_range(0..50257)).collect())
            .collect();
        generate(&model, None, &prompts, &params, &mut |_, _| {})?;
        let started = Instant::now();
        for _ in 0..REPEATS {
            let out = generate(&model, None, &prompts, &params, &mut |_, _| {})?;
            assert!(out.iter().all(|g| g.ids.len() == NEW_TOKENS));
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "kiln batch {batch}: {:.0} new tokens/s ({:.3} s per call)",
            (REPEATS * batch * NEW_TOKENS) as f64 / secs,
            secs / REPEATS as f64
        );
    }
    if let Ok(python) = std::env::var("KILN_PYTHON") {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench_generate_ref.py");
        for batch in ["1", "16"] {
            let out = std::process::Command::new(&python)
                .args([script, "--batch", batch, "--threads", &THREADS.to_string()])
                .output()
                .with_context(|| format!("running {python}"))?;
            if out.status.success() {
                print!("reference: {}", String::from_utf8_lossy(&out.stdout));
            } else {
                println!(
                    "reference skipped (needs torch and transformers): {}",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .last()
                        .unwrap_or("")
                );
                break;
            }
        }
    }
    Ok(())
}
