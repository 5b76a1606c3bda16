//! Two MPI ranks of one thread each against one process of two threads and two replicas, on the
//! same rows (`small` preset at GPT-J's 50,400-row vocabulary, 8 × 256 packed tokens per
//! step): tokens/s and each rank's peak RSS, with and without ZeRO-1.
//!
//!     cargo bench --features mpi --bench distributed [-- --steps 12 --preset small]
//!
//! Needs Open MPI's `mpirun`. The processes are separate, so every peak RSS is clean.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

struct Measure {
    tokens_per_sec: f64,
    /// Per process, MiB.
    peak_rss: Vec<f64>,
    /// Per process, MiB.
    optimizer: Vec<f64>,
}

fn overrides(out: &Path, preset: &str, steps: u64, extra: &[String]) -> Vec<String> {
    let mut sets = vec![
        "name=bench".to_string(),
        format!("model.init.preset={preset}"),
        "model.init.vocab_size=50400".into(),
        "data.seq_len=256".into(),
        "data.mode=pack".into(),
        "data.loss_on=all".into(),
        "data.eval=[]".into(),
        "eval.task=loss".into(),
        "eval.every=0".into(),
        "batch.global=8".into(),
        "batch.micro=4".into(),
        "batch.replicas=2".into(),
        format!("steps={steps}"),
        "schedule.warmup=0".into(),
        "tracking.log_every=1".into(),
        "checkpoint.every=0".into(),
        format!("checkpoint.dir={}", out.join("checkpoints").display()),
        format!("tracking.log_dir={}", out.join("runs").display()),
    ];
    sets.extend(extra.iter().cloned());
    sets.into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
}

/// Median tokens/s over the steps after the first two.
fn tokens_per_sec(out: &Path) -> Result<f64> {
    let records = kiln::track::read_metrics(&out.join("runs/bench/metrics.jsonl"))?;
    let mut values: Vec<f64> = (records.iter())
        .filter(|r| r.tag == "train/tokens_per_sec")
        .map(|r| r.value)
        .skip(2)
        .collect();
    values.sort_by(f64::total_cmp);
    values
        .get(values.len() / 2)
        .copied()
        .context("no tokens/s logged")
}

/// Numbers after `label` in the ranks' closing lines (`rank r of n: peak RSS X MiB, optimizer
/// state Y MiB`).
fn per_rank(stderr: &str, label: &str) -> Vec<f64> {
    (stderr.lines())
        .filter(|l| l.starts_with("rank "))
        .filter_map(|l| l.split(label).nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

fn run(command: &mut Command, out: &Path, single: bool) -> Result<Measure> {
    let output = command.output().context("starting the run")?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        bail!(
            "the run failed:\n{}\n{stderr}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    let tokens_per_sec = tokens_per_sec(out)?;
    let (peak_rss, optimizer) = if single {
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("runs/bench/run.json"))?)?;
        let peak = info["memory"]["peak_rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0;
        let optimizer = info["memory"]["estimate"]["optimizer"]
            .as_f64()
            .unwrap_or(0.0)
            / 1048576.0;
        (vec![peak], vec![optimizer])
    } else {
        (
            per_rank(&stderr, "peak RSS "),
            per_rank(&stderr, "optimizer state "),
        )
    };
    Ok(Measure {
        tokens_per_sec,
        peak_rss,
        optimizer,
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str, default: &str| -> String {
        (args.iter().position(|a| a == flag))
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| default.to_string())
    };
    let steps: u64 = value("--steps", "12").parse()?;
    let preset = value("--preset", "small");
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/quickstart.yaml");

    let mut rows = Vec::new();
    for (label, ranks, zero1) in [
        ("1 process × 2 threads, 2 replicas", 1, false),
        ("2 ranks × 1 thread (MPI)", 2, false),
        ("2 ranks × 1 thread (MPI), ZeRO-1", 2, true),
    ] {
        let out = tempfile::tempdir()?;
        let extra = match zero1 {
            true => vec!["distributed.shard_optimizer=true".to_string()],
            false => vec![],
        };
        let sets = overrides(out.path(), &preset, steps, &extra);
        let mut command = match ranks {
            1 => {
                let mut c = Command::new(kiln);
                c.args([
                    "train",
                    recipe.to_str().unwrap(),
                    "--quiet",
                    "--threads",
                    "2",
                ]);
                c
            }
            n => {
                let mut c = Command::new("mpirun");
                c.args([
                    "--allow-run-as-root",
                    "--oversubscribe",
                    "-np",
                    &n.to_string(),
                ])
                .args([
                    kiln,
                    "train",
                    recipe.to_str().unwrap(),
                    "--quiet",
                    "--threads",
                    "1",
                ]);
                c
            }
        };
        command.args(&sets);
        eprintln!("{label}: {steps} steps…");
        let measure = run(&mut command, out.path(), ranks == 1)?;
        rows.push((label, measure));
    }

    println!("\n| {preset}, 8 × 256 tokens per step | tokens/s | peak RSS per process | optimizer state per process |");
    println!("|---|---:|---:|---:|");
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0} MiB"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    for (label, m) in &rows {
        println!(
            "| {label} | {:.0} | {} | {} |",
            m.tokens_per_sec,
            list(&m.peak_rss),
            list(&m.optimizer)
        );
    }
    Ok(())
}
