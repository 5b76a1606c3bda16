//! The trainer against PyTorch, and its invariants: accumulation, replicas, exact resume,
//! checkpoint verification, fp16 loss scaling, TensorBoard output.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, load_tensors, max_abs_diff};
use kiln::data::{Sequence, SequenceStream};
use kiln::model;
use kiln::recipe::Recipe;
use kiln::train::{self, ModelInit, Resume, TrainOptions};
use rand::{Rng, SeedableRng};

/// A recipe for the tests; `extra` is YAML merged key by key over the defaults.
fn recipe(out: &Path, extra: &str) -> Recipe {
    let base = format!(
        "name: test\n\
         model: {{from: fixture}}\n\
         data: {{train: [{{source: {{path: none.jsonl}}, template: text}}], seq_len: 16, shuffle: false}}\n\
         batch: {{global: 4, micro: 4}}\n\
         steps: 4\n\
         optimizer: {{lr: 1.0e-3, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 0.1, grad_clip: 1.0}}\n\
         checkpoint: {{dir: {ckpt}}}\n\
         tracking: {{log_dir: {logs}}}\n",
        ckpt = out.join("checkpoints").display(),
        logs = out.join("runs").display(),
    );
    let mut value: serde_json::Value = serde_norway::from_str(&base).unwrap();
    let extra: serde_json::Value = serde_norway::from_str(extra).unwrap();
    merge(&mut value, extra);
    serde_json::from_value(value).unwrap()
}

fn merge(base: &mut serde_json::Value, over: serde_json::Value) {
    match (base, over) {
        (serde_json::Value::Object(base), serde_json::Value::Object(over)) => {
            for (k, v) in over {
                merge(base.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (base, over) => *base = over,
    }
}

fn init_from(dir: &Path) -> ModelInit {
    let config = model::load_config(dir).unwrap();
    let params = model::load_parameters(dir, &config, DType::F32, &Device::Cpu).unwrap();
    ModelInit {
        config,
        params,
        tokenizer: None,
        base_model: dir.display().to_string(),
    }
}

fn quiet<'a>() -> TrainOptions<'a> {
    TrainOptions {
        quiet: true,
        threads: Some(2),
        ..TrainOptions::default()
    }
}

/// Random packed rows (every token trained on) of length `len`, ids below `vocab`.
fn packed(n: usize, len: usize, vocab: u32, seed: u64) -> Vec<Sequence> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| Sequence::all_trained((0..len).map(|_| rng.gen_range(0..vocab)).collect()))
        .collect()
}

/// Rows of different lengths whose first tokens (a "prompt") are not trained on.
fn padded(n: usize, vocab: u32, seed: u64) -> Vec<Sequence> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.gen_range(4..20);
            let prompt = rng.gen_range(1..len - 1);
            Sequence {
                ids: (0..len).map(|_| rng.gen_range(0..vocab)).collect(),
                loss_mask: (0..len).map(|i| i >= prompt).collect(),
            }
        })
        .collect()
}

fn final_weights(summary: &train::TrainSummary) -> HashMap<String, Tensor> {
    let dir = summary
        .last_checkpoint
        .as_ref()
        .expect("a final checkpoint");
    load_tensors(&dir.join("model.safetensors"))
}

fn max_weight_diff(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(name, t)| max_abs_diff(t, &b[name]))
        .fold(0f32, f32::max)
}

fn rot8() -> PathBuf {
    fixtures().join("parity/rot8")
}

#[test]
fn twenty_adamw_steps_match_pytorch() {
    let fixture = fixtures().join("train_adamw");
    let reference = load_tensors(&fixture.join("train.safetensors"));
    let batches = reference["batches"].to_vec3::<i64>().unwrap();
    let rows: Vec<Sequence> = batches
        .iter()
        .flatten()
        .map(|row| Sequence::all_trained(row.iter().map(|&t| t as u32).collect()))
        .collect();
    let out = tempfile::tempdir().unwrap();
    let recipe = recipe(out.path(), "steps: 20");
    let summary = train::run(
        &recipe,
        init_from(&fixture),
        SequenceStream::new(rows, 0, false),
        None,
        quiet(),
    )
    .unwrap();

    let losses = reference["losses"].to_vec1::<f32>().unwrap();
    let norms = reference["grad_norms"].to_vec1::<f32>().unwrap();
    assert_eq!(summary.losses.len(), 20);
    for (step, ((ours, theirs), (our_norm, their_norm))) in summary
        .losses
        .iter()
        .zip(&losses)
        .zip(summary.grad_norms.iter().zip(&norms))
        .enumerate()
    {
        let rel = (ours - *theirs as f64).abs() / (*theirs as f64).abs();
        assert!(
            rel < 1e-4,
            "step {}: loss {ours} vs PyTorch {theirs} (rel {rel:e})",
            step + 1
        );
        let rel = (our_norm - *their_norm as f64).abs() / (*their_norm as f64);
        assert!(
            rel < 1e-4,
            "step {}: grad norm {our_norm} vs PyTorch {their_norm}",
            step + 1
        );
    }
    // Max absolute difference over every element of every parameter.
    let ours = final_weights(&summary);
    let mut worst = 0f32;
    for (name, tensor) in &ours {
        let theirs = &reference[&format!("final.{name}")];
        worst = worst.max(max_abs_diff(tensor, theirs));
    }
    assert!(
        worst < 1e-4,
        "final weights differ from PyTorch's by up to {worst:e}"
    );
}

/// Trains rot8 with AdamW's eps raised to 1e-6: on the first steps Adam divides each gradient by
/// its own magnitude, so a gradient element of ~1e-9 (fp32 rounding noise of a sum that cancels)
/// would move its weight by a full `lr` in a direction decided by summation order. With
/// eps 1e-6 the update reflects the gradient itself, which is what these tests compare.
fn train_with(out: &Path, extra: &str, rows: Vec<Sequence>) -> HashMap<String, Tensor> {
    train_with_threads(out, extra, rows, 2)
}

fn train_with_threads(
    out: &Path,
    extra: &str,
    rows: Vec<Sequence>,
    threads: usize,
) -> HashMap<String, Tensor> {
    let mut recipe = recipe(out, extra);
    recipe.optimizer.eps = 1e-6;
    let summary = train::run(
        &recipe,
        init_from(&rot8()),
        SequenceStream::new(rows, 0, false),
        None,
        TrainOptions {
            threads: Some(threads),
            ..quiet()
        },
    )
    .unwrap();
    final_weights(&summary)
}

/// On the CPU each thread takes its own rows of the micro-batch (three workers of 3, 3 and 2
/// rows here); the update must be the one of the whole micro-batch at once (one thread).
#[test]
fn rows_split_over_threads_match_one_worker() {
    for (kind, rows) in [
        ("packed", packed(24, 16, 101, 6)),
        ("padded", padded(24, 101, 7)),
    ] {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let extra = "{steps: 3, batch: {global: 8, micro: 8}}";
        let split = train_with_threads(a.path(), extra, rows.clone(), 3);
        let whole = train_with_threads(b.path(), extra, rows, 1);
        let diff = max_weight_diff(&split, &whole);
        assert!(
            diff > 0.0,
            "{kind}: bit-identical, so the rows were not split"
        );
        assert!(
            diff < 1e-5,
            "{kind}: split rows differ from one worker by {diff:e}"
        );
    }
}

#[test]
fn accumulation_matches_one_big_micro_batch() {
    for (kind, rows) in [
        ("packed", packed(24, 16, 101, 1)),
        ("padded", padded(24, 101, 2)),
    ] {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let accumulated = train_with(
            a.path(),
            "{steps: 3, batch: {global: 8, micro: 2}}",
            rows.clone(),
        );
        let accumulated_4 = train_with(
            a.path(),
            "{steps: 3, batch: {global: 8, micro: 4}}",
            rows.clone(),
        );
        let whole = train_with(b.path(), "{steps: 3, batch: {global: 8, micro: 8}}", rows);
        let diff = max_weight_diff(&accumulated, &whole);
        assert!(
            diff < 1e-5,
            "{kind}: micro 2 × 4 accumulation differs from micro 8 by {diff:e}"
        );
        let diff = max_weight_diff(&accumulated_4, &whole);
        assert!(
            diff < 1e-5,
            "{kind}: micro 4 × 2 accumulation differs from micro 8 by {diff:e}"
        );
    }
}

#[test]
fn two_replicas_match_one() {
    for (kind, rows) in [
        ("packed", packed(24, 16, 101, 3)),
        ("padded", padded(24, 101, 4)),
    ] {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let replicated = train_with(
            a.path(),
            "{steps: 3, batch: {global: 8, micro: 4, replicas: 2}}",
            rows.clone(),
        );
        let single = train_with(b.path(), "{steps: 3, batch: {global: 8, micro: 8}}", rows);
        let diff = max_weight_diff(&replicated, &single);
        assert!(diff < 1e-5, "{kind}: 2 replicas differ from 1 by {diff:e}");
    }
}

fn losses_in(run_dir: &Path) -> Vec<(u64, f64)> {
    kiln::track::read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.tag == "train/loss")
        .map(|r| (r.step, r.value))
        .collect()
}

#[test]
fn interrupted_and_resumed_run_is_bit_identical() {
    let rows = packed(40, 16, 101, 5);
    let extra =
        "{steps: 8, batch: {global: 4, micro: 2}, checkpoint: {every: 2}, eval: {every: 1}}";

    let whole_dir = tempfile::tempdir().unwrap();
    let whole_recipe = recipe(whole_dir.path(), extra);
    let whole = train::run(
        &whole_recipe,
        init_from(&rot8()),
        SequenceStream::new(rows.clone(), 7, true),
        None,
        quiet(),
    )
    .unwrap();

    // A crash after step 5 was logged but before it was checkpointed: the last checkpoint is
    // step 4 and metrics.jsonl already holds step 5.
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path(), extra);
    let crash = |_: &kiln::model::GptJ, step: u64| -> anyhow::Result<Vec<(String, f64)>> {
        if step == 5 {
            anyhow::bail!("simulated crash")
        }
        Ok(vec![])
    };
    let crashed = train::run(
        &recipe,
        init_from(&rot8()),
        SequenceStream::new(rows.clone(), 7, true),
        None,
        TrainOptions {
            eval_hook: Some(Box::new(crash)),
            ..quiet()
        },
    );
    assert!(crashed.is_err());
    let run_logs = dir.path().join("runs/test");
    assert_eq!(losses_in(&run_logs).len(), 5);

    // Resume from scratch objects: initial weights and a fresh stream, as a new process would.
    let resumed = train::run(
        &recipe,
        init_from(&rot8()),
        SequenceStream::new(rows, 7, true),
        None,
        TrainOptions {
            resume: Some(Resume::Latest),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(
        resumed.losses.len(),
        4,
        "the resumed run continues after step 4"
    );
    let a = final_weights(&whole);
    let b = final_weights(&resumed);
    for (name, t) in &a {
        let x = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let y = b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{name} differs after resume"
        );
    }
    assert_eq!(
        losses_in(&run_logs),
        losses_in(&whole_dir.path().join("runs/test"))
    );
}

#[test]
fn stop_request_saves_and_resume_refuses_incompatible_recipes() {
    let rows = packed(16, 16, 101, 6);
    let dir = tempfile::tempdir().unwrap();
    let recipe_ = recipe(
        dir.path(),
        "{steps: 6, checkpoint: {every: 2, keep_last: 1}, eval: {every: 1}}",
    );
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let summary = train::run(
        &recipe_,
        init_from(&rot8()),
        SequenceStream::new(rows.clone(), 0, false),
        Some(rows[..4].to_vec()),
        TrainOptions {
            stop: Some(stop),
            eval_hook: Some(Box::new(move |_: &kiln::model::GptJ, step: u64| {
                if step == 3 {
                    flag.store(true, Ordering::SeqCst);
                }
                Ok(vec![("accuracy".to_string(), 0.5)])
            })),
            ..quiet()
        },
    )
    .unwrap();
    assert!(summary.stopped_early);
    assert_eq!(summary.step, 3);
    assert!(summary.eval.contains_key("loss") && summary.eval["accuracy"] == 0.5);
    let run = dir.path().join("checkpoints/test");
    // keep_last 1: step-2 was pruned once step-3 was complete.
    assert!(!run.join("step-2").exists());
    assert_eq!(
        std::fs::read_to_string(run.join("latest")).unwrap().trim(),
        "step-3"
    );
    let step3 = run.join("step-3");
    for file in [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        "README.md",
    ] {
        assert!(
            step3.join(file).is_file(),
            "{file} missing from the checkpoint"
        );
    }
    let state = kiln::checkpoint::verify(&step3).unwrap();
    assert_eq!(state.step, 3);
    assert_eq!(state.stream.position, 12);

    let changed = recipe(dir.path(), "{steps: 6, batch: {global: 2, micro: 2}}");
    let err = train::run(
        &changed,
        init_from(&rot8()),
        SequenceStream::new(rows.clone(), 0, false),
        None,
        TrainOptions {
            resume: Some(Resume::Latest),
            ..quiet()
        },
    )
    .unwrap_err();
    let message = format!("{err:#}");
    assert!(message.contains("batch"), "{message}");

    // More steps is a safe change.
    let longer = recipe(
        dir.path(),
        "{steps: 7, checkpoint: {every: 2, keep_last: 1}, eval: {every: 1}}",
    );
    let summary = train::run(
        &longer,
        init_from(&rot8()),
        SequenceStream::new(rows, 0, false),
        None,
        TrainOptions {
            resume: Some(Resume::Latest),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(summary.step, 7);
    assert_eq!(summary.losses.len(), 4);
}

#[test]
fn corrupt_checkpoint_is_skipped_for_the_previous_good_one() {
    let rows = packed(16, 16, 101, 8);
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path(), "{steps: 4, checkpoint: {every: 2}}");
    train::run(
        &recipe,
        init_from(&rot8()),
        SequenceStream::new(rows, 0, false),
        None,
        quiet(),
    )
    .unwrap();
    let run = dir.path().join("checkpoints/test");
    let optimizer = run.join("step-4/optimizer.safetensors");
    let mut bytes = std::fs::read(&optimizer).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&optimizer, bytes).unwrap();
    let mut warnings = Vec::new();
    let (chosen, state) = kiln::checkpoint::latest_good(&run, &mut |w| warnings.push(w)).unwrap();
    assert_eq!(chosen, run.join("step-2"));
    assert_eq!(state.step, 2);
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].contains("sha256"), "{}", warnings[0]);

    std::fs::remove_file(run.join("step-2/README.md")).unwrap();
    let err = kiln::checkpoint::verify(&run.join("step-2")).unwrap_err();
    assert!(
        format!("{err:#}").contains("README.md: file is missing"),
        "{err:#}"
    );
}

#[test]
fn fp16_overflow_skips_the_step_and_halves_the_scale() {
    let rows = packed(8, 16, 101, 9);
    let dir = tempfile::tempdir().unwrap();
    // 2^60 overflows fp16 activations' gradients at once; 2^10 does not.
    let recipe = recipe(
        dir.path(),
        "{steps: 2, precision: {compute: fp16, initial_loss_scale: 1.152921504606847e18, growth_interval: 1}}",
    );
    let summary = train::run(
        &recipe,
        init_from(&rot8()),
        SequenceStream::new(rows, 0, false),
        None,
        quiet(),
    )
    .unwrap();
    assert!(!summary.grad_norms[0].is_finite());
    let scales: Vec<f64> = kiln::track::read_metrics(&dir.path().join("runs/test/metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.tag == "train/loss_scale")
        .map(|r| r.value)
        .collect();
    assert_eq!(scales[0], 2f64.powi(59));
    assert!(summary.losses.iter().all(|l| l.is_finite()));
    // Both steps overflowed (2^59 is still far too large): weights are untouched.
    let weights = final_weights(&summary);
    let init = init_from(&rot8()).params;
    assert_eq!(max_weight_diff(&weights, &init), 0.0);
}

/// Python with the `tensorboard` package: `KILN_PYTHON`, else `python3` if it has it.

#[test]
fn tensorboard_reads_the_event_files() {
    let Some(python) = common::python_with("tensorboard") else {
        return;
    };
    let rows = packed(16, 16, 101, 10);
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path(), "{steps: 3, eval: {every: 2}}");
    train::run(
        &recipe,
        init_from(&rot8()),
        SequenceStream::new(rows.clone(), 0, false),
        Some(rows[..4].to_vec()),
        quiet(),
    )
    .unwrap();
    let run_dir = dir.path().join("runs/test");
    let output = std::process::Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_tensorboard.py"))
        .arg(&run_dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let dump: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for tag in [
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/loss_scale",
        "train/tokens_per_sec",
        "train/epoch",
    ] {
        let steps: Vec<u64> = dump["scalars"][tag]
            .as_array()
            .unwrap_or_else(|| panic!("{tag} missing: {dump}"))
            .iter()
            .map(|p| p[0].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3], "{tag}");
    }
    let eval_steps: Vec<u64> = dump["scalars"]["eval/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert_eq!(eval_steps, [2, 3]);
    let metrics = kiln::track::read_metrics(&run_dir.join("metrics.jsonl")).unwrap();
    let first_loss = metrics
        .iter()
        .find(|r| r.tag == "train/loss")
        .unwrap()
        .value;
    let tb_loss = dump["scalars"]["train/loss"][0][1].as_f64().unwrap();
    assert!((first_loss - tb_loss).abs() < 1e-6 * first_loss);
    let text = dump["text"]["recipe"][0].as_str().unwrap();
    assert!(text.contains("name: test"), "{text}");
    assert!(run_dir.join("recipe.yaml").is_file() && run_dir.join("run.json").is_file());
}

#[test]
fn bf16_compute_tracks_fp32() {
    let rows = packed(8, 16, 101, 11);
    let run = |compute: &str| {
        let dir = tempfile::tempdir().unwrap();
        let recipe = recipe(
            dir.path(),
            &format!("{{steps: 2, precision: {{compute: {compute}}}}}"),
        );
        let summary = train::run(
            &recipe,
            init_from(&rot8()),
            SequenceStream::new(rows.clone(), 0, false),
            None,
            quiet(),
        )
        .unwrap();
        (summary, dir)
    };
    let ((full, _full_dir), (half, _half_dir)) = (run("fp32"), run("bf16"));
    for (a, b) in full.losses.iter().zip(&half.losses) {
        assert!((a - b).abs() < 1e-2 * a, "bf16 loss {b} vs fp32 {a}");
    }
    // Master weights stay fp32 and the update is applied to them.
    let weights = final_weights(&half);
    assert!(weights.values().all(|t| t.dtype() == DType::F32));
    assert!(max_weight_diff(&weights, &init_from(&rot8()).params) > 1e-4);
}

#[test]
fn sigterm_finishes_the_step_and_saves() {
    let rows = packed(16, 16, 101, 12);
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path(), "{steps: 6, eval: {every: 1}}");
    let summary = train::run(
        &recipe,
        init_from(&rot8()),
        SequenceStream::new(rows, 0, false),
        None,
        TrainOptions {
            handle_signals: true,
            eval_hook: Some(Box::new(|_: &kiln::model::GptJ, step: u64| {
                if step == 2 {
                    signal_hook::low_level::raise(signal_hook::consts::SIGTERM)?;
                }
                Ok(vec![])
            })),
            ..quiet()
        },
    )
    .unwrap();
    assert!(summary.stopped_early);
    assert_eq!(summary.step, 2);
    let saved = summary.last_checkpoint.unwrap();
    assert_eq!(kiln::checkpoint::verify(&saved).unwrap().step, 2);
}
