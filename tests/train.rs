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
use kiln::model::Model;
use kiln::recipe::Recipe;
use kiln::train::{self, EvalPoint, ModelInit, Resume, TrainOptions, TrainSummary};
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
            Sequence::new(
                (0..len).map(|_| rng.gen_range(0..vocab)).collect(),
                (0..len).map(|i| i >= prompt).collect(),
            )
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

/// Every logged value of `tag`, in step order, from a run's metrics.jsonl.
fn logged(run_dir: &Path, tag: &str) -> Vec<(u64, f64)> {
    kiln::track::read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.tag == tag)
        .map(|r| (r.step, r.value))
        .collect()
}

fn rot8() -> PathBuf {
    fixtures().join("parity/rot8")
}

/// Trains rot8 with AdamW's eps raised to 1e-6: on the first steps Adam divides each gradient by
/// its own magnitude, so a gradient element of ~1e-9 (fp32 rounding noise of a sum that cancels)
/// would move its weight by a full `lr` in a direction decided by summation order. With
/// eps 1e-6 the update reflects the gradient itself, which is what these tests compare.
fn train_with(out: &Path, extra: &str, rows: Vec<Sequence>) -> Trained {
    train_with_threads(out, extra, rows, 2)
}

/// What a run's per-step logs and final weights say.
struct Trained {
    weights: HashMap<String, Tensor>,
    losses: Vec<f64>,
    grad_norms: Vec<f64>,
}

impl Trained {
    /// Fails unless per-step loss and pre-clip gradient norm agree within `rel` and every final
    /// weight within `abs`. Loss and norm catch what Adam would hide in the weights: a gradient
    /// off by a constant factor (a sum instead of a mean) moves Adam's weights the same way.
    fn assert_matches(&self, other: &Trained, rel: f64, abs: f32, what: &str) {
        assert_eq!(self.losses.len(), other.losses.len(), "{what}: step counts");
        for (step, (a, b)) in self.losses.iter().zip(&other.losses).enumerate() {
            let diff = (a - b).abs() / b.abs();
            assert!(
                diff < rel,
                "{what}: step {} loss {a} vs {b} ({diff:e})",
                step + 1
            );
        }
        for (step, (a, b)) in self.grad_norms.iter().zip(&other.grad_norms).enumerate() {
            let diff = (a - b).abs() / b.abs();
            assert!(
                diff < rel,
                "{what}: step {} grad norm {a} vs {b} ({diff:e})",
                step + 1
            );
        }
        let diff = max_weight_diff(&self.weights, &other.weights);
        assert!(diff < abs, "{what}: final weights differ by {diff:e}");
    }
}

fn train_with_threads(out: &Path, extra: &str, rows: Vec<Sequence>, threads: usize) -> Trained {
    let mut recipe = recipe(out, extra);
    recipe.optimizer.eps = 1e-6;
    let summary = common::train_run(
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
    Trained {
        weights: final_weights(&summary),
        losses: summary.losses,
        grad_norms: summary.grad_norms,
    }
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
        let diff = max_weight_diff(&split.weights, &whole.weights);
        assert!(
            diff > 0.0,
            "{kind}: bit-identical, so the rows were not split"
        );
        split.assert_matches(
            &whole,
            1e-5,
            1e-5,
            &format!("{kind}: split rows vs one worker"),
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
        let a_4 = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let accumulated = train_with(
            a.path(),
            "{steps: 3, batch: {global: 8, micro: 2}}",
            rows.clone(),
        );
        let accumulated_4 = train_with(
            a_4.path(),
            "{steps: 3, batch: {global: 8, micro: 4}}",
            rows.clone(),
        );
        let whole = train_with(b.path(), "{steps: 3, batch: {global: 8, micro: 8}}", rows);
        accumulated.assert_matches(
            &whole,
            1e-5,
            1e-5,
            &format!("{kind}: micro 2 × 4 vs micro 8"),
        );
        accumulated_4.assert_matches(
            &whole,
            1e-5,
            1e-5,
            &format!("{kind}: micro 4 × 2 vs micro 8"),
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
        replicated.assert_matches(&single, 1e-5, 1e-5, &format!("{kind}: 2 replicas vs 1"));
    }
}

#[test]
fn interrupted_and_resumed_run_is_bit_identical() {
    let rows = packed(40, 16, 101, 5);
    let extra =
        "{steps: 8, batch: {global: 4, micro: 2}, checkpoint: {every: 2}, eval: {every: 1}}";

    let whole_dir = tempfile::tempdir().unwrap();
    let whole_recipe = recipe(whole_dir.path(), extra);
    let whole = common::train_run(
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
    let crash = |_: &Model, point: &EvalPoint| -> anyhow::Result<Vec<(String, f64)>> {
        if point.step == 5 {
            anyhow::bail!("simulated crash")
        }
        Ok(vec![])
    };
    let crashed = common::train_run(
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
    assert_eq!(logged(&run_logs, "train/loss").len(), 5);

    // Resume from scratch objects: initial weights and a fresh stream, as a new process would.
    let resumed = common::train_run(
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
    // Weights and AdamW's moments (and step count), bit for bit: a resume that restored the
    // weights but not the optimizer would drift only in later steps.
    let (whole_at, resumed_at) = (
        whole.last_checkpoint.clone().expect("a final checkpoint"),
        resumed.last_checkpoint.clone().expect("a final checkpoint"),
    );
    assert!(whole_at.ends_with("step-8") && resumed_at.ends_with("step-8"));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let a = load_tensors(&whole_at.join(file));
        let b = load_tensors(&resumed_at.join(file));
        let mut names: Vec<&String> = a.keys().collect();
        names.sort();
        assert_eq!(
            names,
            {
                let mut other: Vec<&String> = b.keys().collect();
                other.sort();
                other
            },
            "{file}: the same tensors"
        );
        assert!(
            file != "optimizer.safetensors" || names.iter().any(|n| n.contains("exp_avg_sq")),
            "{file} holds AdamW's second moments: {names:?}"
        );
        for name in names {
            let (x, y) = (&a[name], &b[name]);
            assert_eq!(x.dims(), y.dims(), "{file}: {name} shape");
            let x = x.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            let y = y.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            let (x, y) = (x.to_vec1::<f64>().unwrap(), y.to_vec1::<f64>().unwrap());
            assert!(
                x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{file}: {name} differs after resume"
            );
        }
    }
    assert_eq!(
        logged(&run_logs, "train/loss"),
        logged(&whole_dir.path().join("runs/test"), "train/loss")
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
    let summary = common::train_run(
        &recipe_,
        init_from(&rot8()),
        SequenceStream::new(rows.clone(), 0, false),
        Some(rows[..4].to_vec()),
        TrainOptions {
            stop: Some(stop),
            eval_hook: Some(Box::new(move |_: &Model, point: &EvalPoint| {
                if point.step == 3 {
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
    let err = common::train_run(
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
    assert!(
        message.contains(
            "the recipe differs from the checkpoint's in what a resume must keep (model, \
             tokenizer, data, batch, seed): batch: "
        ) && message.contains(r#"-> {"global":2,"micro":2,"#),
        "{message}"
    );

    // More steps is a safe change.
    let longer = recipe(
        dir.path(),
        "{steps: 7, checkpoint: {every: 2, keep_last: 1}, eval: {every: 1}}",
    );
    let summary = common::train_run(
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
    common::train_run(
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
    assert!(
        warnings[0].contains("step-4 failed verification and is skipped")
            && warnings[0]
                .contains("optimizer.safetensors: sha256 does not match trainer_state.json"),
        "{}",
        warnings[0]
    );

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
    let summary = common::train_run(
        &recipe,
        init_from(&rot8()),
        SequenceStream::new(rows, 0, false),
        None,
        quiet(),
    )
    .unwrap();
    assert!(!summary.grad_norms[0].is_finite());
    let scales = logged(&dir.path().join("runs/test"), "train/loss_scale");
    assert_eq!(scales[0], (1, 2f64.powi(59)));
    assert!(summary.losses.iter().all(|l| l.is_finite()));
    // Both steps overflowed (2^59 is still far too large): weights are untouched.
    let weights = final_weights(&summary);
    let init = init_from(&rot8()).params;
    assert_eq!(max_weight_diff(&weights, &init), 0.0);
}

#[test]
fn tensorboard_reads_the_event_files() {
    let Some(python) = common::python_with("tensorboard") else {
        return;
    };
    let rows = packed(16, 16, 101, 10);
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path(), "{steps: 3, eval: {every: 2}}");
    common::train_run(
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
    // The HParams tab's row: the recipe's hyperparameters, and the run's end.
    let hparams = &dump["hparams"]["session_start_info"]["hparams"];
    assert_eq!(hparams["optimizer.lr"].as_f64(), Some(recipe.optimizer.lr));
    assert_eq!(
        hparams["batch.global"].as_f64(),
        Some(recipe.batch.global as f64)
    );
    assert_eq!(hparams["precision.compute"], "fp32");
    assert_eq!(
        dump["hparams"]["session_end_info"]["status"],
        "STATUS_SUCCESS"
    );
    assert!(run_dir.join("recipe.yaml").is_file() && run_dir.join("run.json").is_file());
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).unwrap()).unwrap();
    assert_eq!(info["status"], "finished");
    assert_eq!(
        (info["steps_done"].as_u64(), info["total_steps"].as_u64()),
        (Some(3), Some(3))
    );
    assert!(run_dir.join("curves.svg").is_file());
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
        let summary = common::train_run(
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
    let summary = common::train_run(
        &recipe,
        init_from(&rot8()),
        SequenceStream::new(rows, 0, false),
        None,
        TrainOptions {
            handle_signals: true,
            eval_hook: Some(Box::new(|_: &Model, point: &EvalPoint| {
                if point.step == 2 {
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

fn run_rot8(recipe: &Recipe, rows: &[Sequence], options: TrainOptions) -> TrainSummary {
    common::train_run(
        recipe,
        init_from(&rot8()),
        SequenceStream::new(rows.to_vec(), 0, false),
        None,
        options,
    )
    .unwrap()
}

fn resume_latest<'a>() -> TrainOptions<'a> {
    TrainOptions {
        resume: Some(Resume::Latest),
        ..quiet()
    }
}

/// A checkpoint of an fp32 run carries a disabled scaler of scale 1: resumed as fp16 it must
/// start the scaling a fresh fp16 run has, and an fp16 checkpoint resumed as fp32 must stop it.
#[test]
fn changing_precision_on_resume_starts_the_scaler_the_new_precision_needs() {
    let rows = packed(16, 16, 101, 21);
    let fp16 = "{compute: fp16, initial_loss_scale: 1024, growth_interval: 1000}";
    let fp32 = "{compute: fp32}";
    for (before, after, expected_scale) in [(fp32, fp16, 1024.0), (fp16, fp32, 1.0)] {
        let dir = tempfile::tempdir().unwrap();
        let first = recipe(
            dir.path(),
            &format!("{{steps: 2, checkpoint: {{every: 2}}, precision: {before}}}"),
        );
        run_rot8(&first, &rows, quiet());
        let second = recipe(
            dir.path(),
            &format!("{{steps: 4, checkpoint: {{every: 2}}, precision: {after}}}"),
        );
        let summary = run_rot8(&second, &rows, resume_latest());
        assert_eq!(summary.losses.len(), 2);
        let scales = logged(&dir.path().join("runs/test"), "train/loss_scale");
        assert_eq!(
            scales[2..],
            [(3, expected_scale), (4, expected_scale)],
            "{before} → {after}"
        );
        assert!(summary.grad_norms.iter().all(|n| n.is_finite()));
        let state = kiln::checkpoint::verify(&dir.path().join("checkpoints/test/step-4")).unwrap();
        assert_eq!(state.loss_scaler.enabled, expected_scale > 1.0);
    }
}

fn step_dirs(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-") || n.starts_with(".old-") || n.starts_with(".tmp-"))
        .collect();
    names.sort();
    names
}

/// Resuming from an older checkpoint with `keep_last: 1`: the checkpoint just written is the one
/// to keep (it is `latest`), not the highest step number left by the first run; and a step
/// directory that already exists is replaced without a moment where it is missing.
#[test]
fn pruning_after_resume_from_an_older_step_keeps_latest() {
    let rows = packed(24, 16, 101, 22);
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("checkpoints/test");
    let first = recipe(dir.path(), "{steps: 4, checkpoint: {every: 1}}");
    run_rot8(&first, &rows, quiet());
    assert_eq!(step_dirs(&run), ["step-1", "step-2", "step-3", "step-4"]);
    let old_step_3 = std::fs::read(run.join("step-3/model.safetensors")).unwrap();

    let second = recipe(
        dir.path(),
        "{steps: 3, checkpoint: {every: 1, keep_last: 1}, optimizer: {lr: 5.0e-3}}",
    );
    let summary = run_rot8(
        &second,
        &rows,
        TrainOptions {
            resume: Some(Resume::Dir(run.join("step-2"))),
            ..quiet()
        },
    );
    assert_eq!(summary.step, 3);
    assert_eq!(
        step_dirs(&run),
        ["step-3"],
        "keep_last 1 keeps the newest of this run"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("latest")).unwrap().trim(),
        "step-3"
    );
    assert_eq!(
        kiln::checkpoint::verify(&run.join("step-3")).unwrap().step,
        3
    );
    let new_step_3 = std::fs::read(run.join("step-3/model.safetensors")).unwrap();
    assert_ne!(
        old_step_3, new_step_3,
        "step-3 was replaced by the resumed run's"
    );
    let (chosen, _) = kiln::checkpoint::latest_good(&run, &mut |w| panic!("{w}")).unwrap();
    assert_eq!(chosen, run.join("step-3"));
}

/// A crash while a checkpoint was being replaced, after the old one was moved aside and before
/// the new one got its name: the old, complete one is found again.
#[test]
fn a_crash_during_replacement_leaves_a_complete_checkpoint() {
    let rows = packed(16, 16, 101, 23);
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("checkpoints/test");
    run_rot8(
        &recipe(dir.path(), "{steps: 2, checkpoint: {every: 1}}"),
        &rows,
        quiet(),
    );
    std::fs::rename(run.join("step-2"), run.join(".old-step-2")).unwrap();
    std::fs::create_dir(run.join(".tmp-step-2")).unwrap();
    std::fs::write(run.join(".tmp-step-2/config.json"), "{").unwrap();
    // Whoever takes the run puts it right; finding the latest good checkpoint only reads.
    let lock = kiln::checkpoint::RunLock::acquire(&run).unwrap();
    let mut warnings = Vec::new();
    let (chosen, state) = kiln::checkpoint::latest_good(&run, &mut |w| warnings.push(w)).unwrap();
    assert_eq!((chosen, state.step), (run.join("step-2"), 2));
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(
        step_dirs(&run),
        ["step-1", "step-2"],
        "partial and moved-aside directories are gone"
    );
    drop(lock);
    let summary = run_rot8(
        &recipe(dir.path(), "{steps: 3, checkpoint: {every: 1}}"),
        &rows,
        resume_latest(),
    );
    assert_eq!(summary.losses.len(), 1);
    assert_eq!(step_dirs(&run), ["step-1", "step-2", "step-3"]);
}

/// A checkpoint the hook still uses (a pending upload) survives pruning, and the run says so.
#[test]
fn pruning_keeps_checkpoints_in_use() {
    let rows = packed(16, 16, 101, 24);
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("checkpoints/test");
    let recipe = recipe(
        dir.path(),
        "{steps: 3, checkpoint: {every: 1, keep_last: 1}}",
    );
    let first = run.join("step-1");
    let summary = run_rot8(
        &recipe,
        &rows,
        TrainOptions {
            checkpoint_hook: Some(Box::new(move |_: &Path, _: u64| Ok(vec![first.clone()]))),
            ..quiet()
        },
    );
    assert_eq!(summary.step, 3);
    assert_eq!(step_dirs(&run), ["step-1", "step-3"]);
    let lock = kiln::checkpoint::RunLock::acquire(&run).unwrap();
    let notes =
        kiln::checkpoint::prune(&lock, 1, &run.join("step-3"), &[run.join("step-1")]).unwrap();
    assert!(
        notes[0].contains("step-1") && notes[0].contains("upload"),
        "{notes:?}"
    );
    // `latest` naming another checkpoint than the one just written keeps it too.
    std::fs::write(run.join("latest"), "step-1\n").unwrap();
    let notes = kiln::checkpoint::prune(&lock, 1, &run.join("step-3"), &[]).unwrap();
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(step_dirs(&run), ["step-1", "step-3"]);
    std::fs::write(run.join("latest"), "step-3\n").unwrap();
    kiln::checkpoint::prune(&lock, 1, &run.join("step-3"), &[]).unwrap();
    assert_eq!(step_dirs(&run), ["step-3"]);
}

/// fp32 has no loss scale to lower: non-finite gradients stop the run at once, naming the step
/// and the checkpoint to go back to, instead of skipping every step that follows.
#[test]
fn non_finite_gradients_in_fp32_stop_with_the_last_good_checkpoint() {
    let rows = packed(16, 16, 101, 25);
    let dir = tempfile::tempdir().unwrap();
    // An absurd learning rate: step 1 is finite but leaves weights of ~1e30, whose forward
    // overflows at step 2.
    let recipe = recipe(
        dir.path(),
        "{steps: 4, checkpoint: {every: 1}, optimizer: {lr: 1.0e30, weight_decay: 0.0}}",
    );
    let err = common::train_run(
        &recipe,
        init_from(&rot8()),
        SequenceStream::new(rows, 0, false),
        None,
        quiet(),
    )
    .unwrap_err();
    let message = format!("{err:#}");
    let step_1 = dir.path().join("checkpoints/test/step-1");
    assert!(
        message.contains("step 2: the gradients are not finite")
            && message.contains("fp32")
            && message.contains(&format!("the last good checkpoint is {}", step_1.display())),
        "{message}"
    );
    assert!(!dir.path().join("checkpoints/test/step-2").exists());
    assert_eq!(logged(&dir.path().join("runs/test"), "train/loss").len(), 1);
    // `kiln runs` and MLflow learn how it ended from run.json.
    let info: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("runs/test/run.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(info["status"], "failed");
    assert_eq!(info["steps_done"], 1);
}

#[test]
fn no_decay_patterns_must_name_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path(), "{optimizer: {no_decay: [bias, layernorm]}}");
    let err = common::train_run(
        &recipe,
        init_from(&rot8()),
        SequenceStream::new(packed(4, 16, 101, 26), 0, false),
        None,
        quiet(),
    )
    .unwrap_err();
    let message = format!("{err:#}");
    assert!(
        message.contains("optimizer.no_decay[1]: `layernorm` is in no parameter name"),
        "{message}"
    );
}

/// Rows of a fixture's `batches` [steps, batch, seq], every token trained on.
fn fixture_rows(reference: &HashMap<String, Tensor>) -> Vec<Sequence> {
    let batches = reference["batches"].to_vec3::<i64>().unwrap();
    batches
        .iter()
        .flatten()
        .map(|row| Sequence::all_trained(row.iter().map(|&t| t as u32).collect()))
        .collect()
}

/// ||a − b|| / ||b|| over every parameter's change from `init` (Frobenius, all together).
fn relative_update_error(
    ours: &HashMap<String, Tensor>,
    theirs: &HashMap<String, Tensor>,
    init: &HashMap<String, Tensor>,
) -> f64 {
    let (mut diff, mut norm) = (0f64, 0f64);
    for (name, start) in init {
        let a = (&ours[name] - start).unwrap();
        let b = (&theirs[&format!("final.{name}")] - start).unwrap();
        let sq = |t: Tensor| {
            t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        diff += sq((&a - &b).unwrap());
        norm += sq(b);
    }
    (diff / norm).sqrt()
}

/// fp16 end to end against torch: autocast fp16, fp32 master weights, `GradScaler` with a first
/// step that overflows (skipped, scale backed off), growth every 2 clean steps, and a schedule
/// that does not advance on the skipped step (fixture: scripts/make_fixtures.py, train_fp16).
///
/// Kiln runs the whole model in fp16 where torch's autocast runs only the matmuls in fp16 and
/// keeps the residual stream fp32, so values agree to fp16 rounding, not bit for bit: losses
/// ≤ 1e-4 relative (measured 1e-5), gradient norms ≤ 1e-3 (9e-5), and the total weight update
/// ≤ 2.5e-2 relative (8e-3: Adam turns small gradient differences into whole-`lr` steps). Loss
/// scales, skip decisions and learning rates agree exactly.
#[test]
fn fp16_with_loss_scaling_matches_torch_grad_scaler() {
    let fixture = fixtures().join("train_fp16");
    let reference = load_tensors(&fixture.join("train.safetensors"));
    let out = tempfile::tempdir().unwrap();
    let recipe = recipe(
        out.path(),
        "{steps: 8, schedule: {kind: linear, warmup: 2}, \
          precision: {compute: fp16, initial_loss_scale: 1099511627776.0, growth_interval: 2, \
                      growth_factor: 2.0, backoff_factor: 2.3283064365386963e-10}}",
    );
    let model_dir = fixtures().join("train_adamw");
    let summary = common::train_run(
        &recipe,
        init_from(&model_dir),
        SequenceStream::new(fixture_rows(&reference), 0, false),
        None,
        quiet(),
    )
    .unwrap();
    let run_dir = out.path().join("runs/test");

    let scales = reference["loss_scales"].to_vec1::<f64>().unwrap();
    let logged_scales: Vec<f64> = logged(&run_dir, "train/loss_scale")
        .iter()
        .map(|s| s.1)
        .collect();
    // Kiln logs the scale after the step's update; torch's list is the scale each step ran with.
    assert_eq!(
        logged_scales[..7],
        scales[1..],
        "loss scale after each step"
    );
    assert_eq!(
        logged_scales[7], 2048.0,
        "7 clean steps: grown 3 times from 256"
    );
    let lrs = reference["lrs"].to_vec1::<f64>().unwrap();
    let logged_lrs: Vec<f64> = logged(&run_dir, "train/lr").iter().map(|s| s.1).collect();
    for (step, (ours, theirs)) in logged_lrs.iter().zip(&lrs).enumerate() {
        assert!(
            (ours - theirs).abs() < 1e-15,
            "step {}: lr {ours} vs torch {theirs}",
            step + 1
        );
    }
    assert_eq!(
        logged_lrs[0], logged_lrs[1],
        "the skipped step did not advance the schedule"
    );

    let losses = reference["losses"].to_vec1::<f32>().unwrap();
    let norms = reference["grad_norms"].to_vec1::<f32>().unwrap();
    assert!(
        !norms[0].is_finite() && !summary.grad_norms[0].is_finite(),
        "step 1 overflows"
    );
    let (mut worst_loss, mut worst_norm) = (0f64, 0f64);
    for step in 0..8 {
        let rel = (summary.losses[step] - losses[step] as f64).abs() / losses[step] as f64;
        worst_loss = worst_loss.max(rel);
        assert!(
            rel < 1e-4,
            "step {}: loss {} vs torch {} ({rel:e})",
            step + 1,
            summary.losses[step],
            losses[step]
        );
        if step > 0 {
            let (ours, theirs) = (summary.grad_norms[step], norms[step] as f64);
            let rel = (ours - theirs).abs() / theirs;
            worst_norm = worst_norm.max(rel);
            assert!(
                rel < 1e-3,
                "step {}: grad norm {ours} vs torch {theirs} ({rel:e})",
                step + 1
            );
        }
    }
    eprintln!("fp16 vs torch: loss {worst_loss:e}, grad norm {worst_norm:e} (worst relative)");
    let init = init_from(&model_dir).params;
    let error = relative_update_error(&final_weights(&summary), &reference, &init);
    eprintln!("fp16 vs torch: relative error of the weight update {error:e}");
    assert!(
        error < 2.5e-2,
        "weight update differs from torch's by {error:e} (relative)"
    );
}

/// bf16 end to end against torch: `torch.autocast("cpu", dtype=torch.bfloat16)` around the
/// forward, fp32 master weights and AdamW states, no loss scaling, a linear schedule
/// (fixture: scripts/make_fixtures.py, train_bf16; the initial weights are train_adamw's).
///
/// Autocast runs the matrix products on bf16 operands with bf16 outputs and keeps layer norms,
/// softmax and the loss in fp32; Kiln rounds the same product operands to bf16 but keeps their
/// fp32 results, so the two agree to bf16 rounding, not bit for bit. Measured: losses 9.1e-5
/// relative, gradient norms 2.5e-4, the total weight update 2.6e-2 (Adam turns small gradient
/// differences into whole-`lr` steps); the tolerances are about three times that. Torch's own
/// fp32 run differs from its bf16 one by up to 9.4e-5 in the loss, too little to tell them
/// apart, but by 1.7e-3 in the gradient norms: there Kiln's bf16 must be nearer torch's bf16
/// than Kiln's fp32 is, so the reference tells bf16 from fp32.
#[test]
fn bf16_compute_matches_torch_autocast() {
    let fixture = fixtures().join("train_bf16");
    let reference = load_tensors(&fixture.join("train.safetensors"));
    let model_dir = fixtures().join("train_adamw");
    let run = |compute: &str| {
        let out = tempfile::tempdir().unwrap();
        let recipe = recipe(
            out.path(),
            &format!("{{steps: 8, schedule: {{kind: linear, warmup: 2}}, precision: {{compute: {compute}}}}}"),
        );
        let summary = common::train_run(
            &recipe,
            init_from(&model_dir),
            SequenceStream::new(fixture_rows(&reference), 0, false),
            None,
            quiet(),
        )
        .unwrap();
        let lrs: Vec<f64> = logged(&out.path().join("runs/test"), "train/lr")
            .iter()
            .map(|s| s.1)
            .collect();
        (summary, lrs, out)
    };
    let (bf16, lrs, _bf16_dir) = run("bf16");
    let (fp32, _, _fp32_dir) = run("fp32");

    let torch_lrs = reference["lrs"].to_vec1::<f64>().unwrap();
    assert_eq!(lrs.len(), 8);
    for (step, (ours, theirs)) in lrs.iter().zip(&torch_lrs).enumerate() {
        assert!(
            (ours - theirs).abs() < 1e-15,
            "step {}: lr {ours} vs torch {theirs}",
            step + 1
        );
    }
    let losses = reference["losses"].to_vec1::<f32>().unwrap();
    let norms = reference["grad_norms"].to_vec1::<f32>().unwrap();
    let worst = |ours: &[f64], theirs: &[f32]| -> f64 {
        ours.iter()
            .zip(theirs)
            .map(|(a, &b)| (a - b as f64).abs() / b as f64)
            .fold(0f64, f64::max)
    };
    let (loss_error, norm_error) = (
        worst(&bf16.losses, &losses),
        worst(&bf16.grad_norms, &norms),
    );
    let (fp32_loss_error, fp32_norm_error) = (
        worst(&fp32.losses, &losses),
        worst(&fp32.grad_norms, &norms),
    );
    let init = init_from(&model_dir).params;
    let update_error = relative_update_error(&final_weights(&bf16), &reference, &init);
    let fp32_update_error = relative_update_error(&final_weights(&fp32), &reference, &init);
    eprintln!(
        "bf16 vs torch autocast (worst relative): loss {loss_error:e}, grad norm {norm_error:e}, \
         weight update {update_error:e}; Kiln fp32 vs the same: loss {fp32_loss_error:e}, \
         grad norm {fp32_norm_error:e}, update {fp32_update_error:e}"
    );
    assert!(
        loss_error < 3e-4,
        "loss differs by {loss_error:e} (relative)"
    );
    assert!(
        norm_error < 7.5e-4,
        "grad norm differs by {norm_error:e} (relative)"
    );
    assert!(
        update_error < 7.5e-2,
        "weight update differs from torch's by {update_error:e} (relative)"
    );
    assert!(
        2.0 * norm_error < fp32_norm_error,
        "Kiln's bf16 gradients ({norm_error:e}) are not clearly nearer torch's bf16 ones than \
         Kiln's fp32 gradients are ({fp32_norm_error:e})"
    );
}

/// `optimizer.no_decay: [bias, ln_]` against torch AdamW with HF Trainer's two parameter groups
/// (decayed at weight_decay 5, exempt at 0), on train_adamw's model and batches.
#[test]
fn no_decay_matches_torch_parameter_groups() {
    let fixture = fixtures().join("train_adamw");
    let rows = fixture_rows(&load_tensors(&fixture.join("train.safetensors")));
    let reference = load_tensors(&fixture.join("train_no_decay.safetensors"));
    let run = |extra: &str| {
        let out = tempfile::tempdir().unwrap();
        let recipe = recipe(out.path(), extra);
        let summary = common::train_run(
            &recipe,
            init_from(&fixture),
            SequenceStream::new(rows.clone(), 0, false),
            None,
            quiet(),
        )
        .unwrap();
        final_weights(&summary)
    };
    let worst = |weights: &HashMap<String, Tensor>| {
        weights
            .iter()
            .map(|(name, t)| max_abs_diff(t, &reference[&format!("final.{name}")]))
            .fold(0f32, f32::max)
    };
    let grouped = run("{steps: 20, optimizer: {weight_decay: 5.0, no_decay: [bias, ln_]}}");
    let diff = worst(&grouped);
    assert!(diff < 1e-4, "final weights differ from torch's by {diff:e}");
    // Decaying everything lands measurably elsewhere, so the comparison above can fail.
    let everything = run("{steps: 20, optimizer: {weight_decay: 5.0}}");
    let diff = worst(&everything);
    assert!(diff > 1e-3, "no_decay made no difference ({diff:e})");
}

/// `eval.early_stopping` and `checkpoint.keep_best` on scripted evaluations (an eval hook reports
/// `score` for each step): the best score comes at step 2, then three evaluations fail to beat
/// it, so training stops at step 5 of 10 with step 2's checkpoint kept beside the latest,
/// whatever `keep_last` says. A run interrupted at step 4 and resumed stops at the same step
/// with the same best checkpoint and weights, bit for bit.
#[test]
fn a_plateau_stops_training_after_patience_and_keeps_the_best_checkpoint() {
    let rows = packed(48, 16, 101, 9);
    let scores = [0.50, 0.70, 0.65, 0.69, 0.70, 0.90, 0.95, 0.96, 0.97, 0.98];
    let extra = "{steps: 10, eval: {every: 1, early_stopping: {metric: score, patience: 3}}, \
                 checkpoint: {every: 1, keep_last: 1, keep_best: score}}";
    let scripted = |crash_at: Option<u64>| {
        move |_: &Model, point: &EvalPoint| -> anyhow::Result<Vec<(String, f64)>> {
            if Some(point.step) == crash_at {
                anyhow::bail!("simulated crash")
            }
            Ok(vec![("score".to_string(), scores[point.step as usize - 1])])
        }
    };
    let check = |out: &Path, summary: &TrainSummary| {
        assert_eq!(
            summary.step, 5,
            "stopped at the third evaluation without improvement"
        );
        assert!(summary.stopped_early);
        let run = out.join("checkpoints/test");
        let mut kept: Vec<String> = std::fs::read_dir(&run)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("step-"))
            .collect();
        kept.sort();
        assert_eq!(kept, ["step-2", "step-5"], "keep_last 1, and the best");
        let pointer = |name: &str| std::fs::read_to_string(run.join(name)).unwrap();
        assert_eq!(pointer("best").trim(), "step-2");
        assert_eq!(pointer("latest").trim(), "step-5");
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run.join("step-5/trainer_state.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(state["best_metric"], 0.7);
        assert!(
            state["best_model_checkpoint"]
                .as_str()
                .unwrap()
                .ends_with("checkpoints/test/step-2"),
            "{}",
            state["best_model_checkpoint"]
        );
        assert_eq!(
            state["early_stopping"],
            serde_json::json!({"best": 0.7, "evaluations_without_improvement": 3})
        );
        std::fs::read(run.join("step-5/model.safetensors")).unwrap()
    };

    let whole_dir = tempfile::tempdir().unwrap();
    let whole = common::train_run(
        &recipe(whole_dir.path(), extra),
        init_from(&rot8()),
        SequenceStream::new(rows.clone(), 3, true),
        None,
        TrainOptions {
            eval_hook: Some(Box::new(scripted(None))),
            ..quiet()
        },
    )
    .unwrap();
    let whole_weights = check(whole_dir.path(), &whole);

    let dir = tempfile::tempdir().unwrap();
    let recipe = recipe(dir.path(), extra);
    let crashed = common::train_run(
        &recipe,
        init_from(&rot8()),
        SequenceStream::new(rows.clone(), 3, true),
        None,
        TrainOptions {
            eval_hook: Some(Box::new(scripted(Some(4)))),
            ..quiet()
        },
    );
    assert!(crashed.is_err());
    let resumed = common::train_run(
        &recipe,
        init_from(&rot8()),
        SequenceStream::new(rows, 3, true),
        None,
        TrainOptions {
            resume: Some(Resume::Latest),
            eval_hook: Some(Box::new(scripted(None))),
            ..quiet()
        },
    )
    .unwrap();
    assert_eq!(resumed.losses.len(), 2, "steps 4 and 5 after the resume");
    assert!(
        check(dir.path(), &resumed) == whole_weights,
        "the same weights at the stop"
    );

    // A metric the evaluation does not report is named with what it did report.
    let bad = tempfile::tempdir().unwrap();
    let err = common::train_run(
        &recipe_with(
            bad.path(),
            "{steps: 4, eval: {every: 1, early_stopping: {metric: accuracy, patience: 1}}}",
        ),
        init_from(&rot8()),
        SequenceStream::new(packed(16, 16, 101, 9), 0, false),
        None,
        TrainOptions {
            eval_hook: Some(Box::new(scripted(None))),
            ..quiet()
        },
    )
    .unwrap_err();
    assert!(
        format!("{err:#}").contains(
            "eval.early_stopping.metric: the evaluation reported no \"accuracy\" (it reported: score)"
        ),
        "{err:#}"
    );
}

fn recipe_with(out: &Path, extra: &str) -> Recipe {
    recipe(out, extra)
}
