//! Preference tuning: DPO's numbers equal TRL's `DPOTrainer` (live, full fine-tune and LoRA,
//! pairs tokenised as TRL tokenises them), IPO's too; the reference from the base (adapter off),
//! a frozen copy or precomputed log-probabilities; accumulation that never splits a pair;
//! bit-exact resume after `kill -9`; SimPO; clear refusals of bad pairs; `kiln eval --task
//! preference`.

mod common;

#[path = "../datasets/preference/synth.rs"]
#[allow(dead_code)]
mod synth;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use common::{init_tiny, kiln, python_with, repo_root};
use serde_json::Value;

fn run_ok(args: &[&str]) -> String {
    let (ok, stdout, stderr) = kiln(args);
    assert!(ok, "kiln {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

fn bundled_pairs() -> PathBuf {
    repo_root().join("datasets/preference/train.jsonl")
}

/// The first `n` bundled pairs, written into `dir`.
fn first_pairs(dir: &Path, n: usize) -> PathBuf {
    let text = std::fs::read_to_string(bundled_pairs()).unwrap();
    let lines: Vec<&str> = text.lines().take(n).collect();
    let path = dir.join("pairs.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// A tiny GPT-J (1,024-word vocabulary) with the bundled tokenizer, in `dir/model`.
fn tiny(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    init_tiny(&model, 1, &repo_root().join("datasets/nli/tokenizer"));
    model
}

/// A DPO recipe over `model` and `pairs` writing into `out`; `extra` is appended YAML.
fn dpo_recipe(out: &Path, model: &Path, pairs: &Path, extra: &str) -> PathBuf {
    let text = format!(
        "name: run\n\
         seed: 0\n\
         model: {{from: {model}}}\n\
         data:\n  \
           train: [{{source: {{path: {pairs}}}, template: preference}}]\n  \
           seq_len: 128\n  shuffle: false\n\
         optimizer: {{lr: 1.0e-3, weight_decay: 0.0, grad_clip: 1.0}}\n\
         schedule: {{kind: constant}}\n\
         batch: {{global: 16, micro: 16}}\n\
         steps: 5\n\
         checkpoint: {{every: 1, dir: {ckpt}}}\n\
         tracking: {{log_dir: {logs}, log_every: 1}}\n\
         {extra}",
        model = model.display(),
        pairs = pairs.display(),
        ckpt = out.join("checkpoints").display(),
        logs = out.join("runs").display(),
    );
    let path = out.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Every step's scalars of a run: step → tag → value.
fn step_metrics(run_dir: &Path) -> HashMap<u64, HashMap<String, f64>> {
    let mut steps: HashMap<u64, HashMap<String, f64>> = HashMap::new();
    for record in kiln::track::read_metrics(&run_dir.join("metrics.jsonl")).unwrap() {
        steps
            .entry(record.step)
            .or_default()
            .insert(record.tag, record.value);
    }
    steps
}

/// Steps 1 to 5 of run `b` give each of `keys` within `tolerance` of run `a`'s (relative;
/// absolute below 0.01); `what` says how `b` was trained.
fn assert_steps_agree(
    a: &HashMap<u64, HashMap<String, f64>>,
    b: &HashMap<u64, HashMap<String, f64>>,
    keys: &[&str],
    tolerance: f64,
    what: &str,
) {
    for step in 1..=5u64 {
        for &key in keys {
            let (x, y) = (a[&step][key], b[&step][key]);
            assert!(
                (x - y).abs() <= tolerance * x.abs().max(1e-2),
                "step {step}: {key} {x}, {y} {what}"
            );
        }
    }
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// TRL's run of `scripts/check_dpo.py` with `args`: its per-step logs and tokenised pairs.
fn trl_run(python: &str, args: &[&str]) -> Value {
    let out = tempfile::tempdir().unwrap();
    let json = out.path().join("trl.json");
    let output = Command::new(python)
        .arg(repo_root().join("scripts/check_dpo.py"))
        .args(args)
        .args(["--out", json.to_str().unwrap()])
        .env("TQDM_DISABLE", "1")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "check_dpo.py failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

/// Kiln's and TRL's per-step loss, grad norm and metrics agree within `tolerance` (relative;
/// absolute near zero).
fn assert_same_steps(kiln_run: &Path, trl: &Value, tolerance: f64) {
    let ours = step_metrics(kiln_run);
    let theirs = trl["steps"].as_array().unwrap();
    assert_eq!(theirs.len(), 5, "TRL ran 5 steps");
    let mut worst: Vec<(&str, f64)> = Vec::new();
    for (i, step) in theirs.iter().enumerate() {
        let ours = &ours[&(i as u64 + 1)];
        for key in [
            "loss",
            "grad_norm",
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ] {
            let expected = step[key].as_f64().unwrap();
            let got = ours[&format!("train/{key}")];
            let error = (got - expected).abs() / expected.abs().max(1e-2);
            assert!(
                error <= tolerance,
                "step {}: {key} {got} vs TRL's {expected} (relative {error:.2e})",
                i + 1
            );
            match worst.iter_mut().find(|(k, _)| *k == key) {
                Some((_, w)) => *w = w.max(error),
                None => worst.push((key, error)),
            }
        }
    }
    let worst: Vec<String> = worst.iter().map(|(k, e)| format!("{k} {e:.1e}")).collect();
    eprintln!(
        "worst relative difference from TRL over 5 steps: {}",
        worst.join(", ")
    );
}

/// ||a - b|| / ||b|| of every tensor of two safetensors files, the worst.
fn worst_relative_error(ours: &Path, theirs: &Path) -> f32 {
    let (ours, theirs) = (tensors(ours), tensors(theirs));
    assert_eq!(ours.len(), theirs.len(), "the same tensors");
    theirs
        .iter()
        .map(|(name, b)| {
            let a = ours.get(name).unwrap_or_else(|| panic!("{name} missing"));
            common::relative_error(a, b)
        })
        .fold(0f32, f32::max)
}

#[test]
fn bundled_preference_dataset_is_reproducible_from_its_seed() {
    let dir = tempfile::tempdir().unwrap();
    synth::write(dir.path(), 0, synth::TRAIN_ROWS, synth::VALIDATION_ROWS).unwrap();
    for file in ["train.jsonl", "validation.jsonl"] {
        let shipped = std::fs::read(repo_root().join("datasets/preference").join(file)).unwrap();
        let fresh = std::fs::read(dir.path().join(file)).unwrap();
        assert!(
            shipped == fresh,
            "datasets/preference/{file} differs from `cargo run --example synth-preference -- \
             --out datasets/preference --seed 0`"
        );
    }
}

/// A full fine-tune with DPO's sigmoid loss: 16 pairs in one batch, 5 steps of constant lr,
/// clipping at 1 — the loss, grad norm and TRL's metrics of every step within 1e-4 of TRL's, the
/// final weights within 1e-4 (Frobenius, per tensor), and the pairs tokenised to TRL's ids.
#[test]
fn dpo_matches_trl_full_fine_tune() {
    let Some(python) = python_with("trl") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let model = tiny(out.path());
    let pairs = first_pairs(out.path(), 16);
    let recipe = dpo_recipe(
        out.path(),
        &model,
        &pairs,
        "objective: {kind: dpo, beta: 0.1}\n",
    );
    let log = run_ok(&["train", recipe.to_str().unwrap(), "--quiet"]);
    assert!(
        log.contains("a frozen copy of the starting weights"),
        "{log}"
    );
    let saved = out.path().join("trl-model");
    let trl = trl_run(
        &python,
        &[
            "--model",
            model.to_str().unwrap(),
            "--data",
            pairs.to_str().unwrap(),
            "--save",
            saved.to_str().unwrap(),
            "--lr",
            "1e-3",
            "--beta",
            "0.1",
        ],
    );
    assert_same_steps(&out.path().join("runs/run"), &trl, 1e-4);
    let error = worst_relative_error(
        &out.path().join("checkpoints/run/step-5/model.safetensors"),
        &saved.join("model.safetensors"),
    );
    assert!(
        error < 1e-4,
        "final weights differ from TRL's by {error:.2e}"
    );
    eprintln!("final weights: worst ||Δ||/||w|| {error:.1e}");

    // The same token ids as TRL's tokenisation (prompt, completion + eos).
    let preview = run_ok(&[
        "data",
        "preview",
        recipe.to_str().unwrap(),
        "--json",
        "--n",
        "16",
    ]);
    let ours: Vec<Value> = preview
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        ours.as_slice(),
        trl["tokenized"].as_array().unwrap().as_slice()
    );
}

/// LoRA on q_proj and v_proj from Kiln's initial adapter in both: the reference is the base with
/// the adapter off; the same steps and final adapter as TRL with PEFT.
#[test]
fn dpo_matches_trl_lora() {
    let Some(python) = python_with("trl") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let model = tiny(out.path());
    let pairs = first_pairs(out.path(), 16);
    let extra = "objective: {kind: dpo, beta: 0.1}\n\
                 lora: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj, v_proj]}\n";
    let recipe = dpo_recipe(out.path(), &model, &pairs, extra);
    let recipe_text = std::fs::read_to_string(&recipe).unwrap();
    let recipe_text = recipe_text.replace("lr: 1.0e-3", "lr: 5.0e-3");
    std::fs::write(&recipe, recipe_text).unwrap();
    let log = run_ok(&["train", recipe.to_str().unwrap(), "--quiet"]);
    assert!(log.contains("the base model with the adapter off"), "{log}");

    // Kiln's initial adapter (B zero), for PEFT to start from.
    let config = kiln::model::load_config(&model).unwrap();
    let targets = vec!["q_proj".to_string(), "v_proj".to_string()];
    let layers = kiln::model::lora::select_layers(&config, &targets).unwrap();
    let initial = kiln::model::lora::init_adapter(&layers, 4, 0, &Device::Cpu).unwrap();
    let initial: HashMap<String, Tensor> = initial
        .into_iter()
        .map(|(name, t)| (format!("base_model.model.{name}"), t))
        .collect();
    let init_path = out.path().join("initial-adapter.safetensors");
    candle_core::safetensors::save(&initial, &init_path).unwrap();

    let saved = out.path().join("trl-adapter");
    let trl = trl_run(
        &python,
        &[
            "--model",
            model.to_str().unwrap(),
            "--data",
            pairs.to_str().unwrap(),
            "--save",
            saved.to_str().unwrap(),
            "--lr",
            "5e-3",
            "--lora-init",
            init_path.to_str().unwrap(),
            "--targets",
            "q_proj,v_proj",
        ],
    );
    assert_same_steps(&out.path().join("runs/run"), &trl, 1e-4);
    let error = worst_relative_error(
        &out.path()
            .join("checkpoints/run/step-5/adapter_model.safetensors"),
        &saved.join("adapter_model.safetensors"),
    );
    assert!(
        error < 1e-4,
        "final adapter differs from TRL's by {error:.2e}"
    );
    eprintln!("final adapter: worst ||Δ||/||w|| {error:.1e}");
}

/// IPO (TRL's length-averaged form) against TRL.
#[test]
fn ipo_matches_trl() {
    let Some(python) = python_with("trl") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let model = tiny(out.path());
    let pairs = first_pairs(out.path(), 16);
    let frozen = out.path().join("frozen");
    std::fs::create_dir_all(&frozen).unwrap();
    let recipe = dpo_recipe(
        &frozen,
        &model,
        &pairs,
        "objective: {kind: dpo, beta: 0.5, loss: ipo}\n",
    );
    run_ok(&["train", recipe.to_str().unwrap(), "--quiet"]);
    let saved = out.path().join("trl-model");
    let trl = trl_run(
        &python,
        &[
            "--model",
            model.to_str().unwrap(),
            "--data",
            pairs.to_str().unwrap(),
            "--save",
            saved.to_str().unwrap(),
            "--beta",
            "0.5",
            "--loss",
            "ipo",
        ],
    );
    assert_same_steps(&frozen.join("runs/run"), &trl, 1e-4);
}

/// The reference's log-probabilities precomputed once train the same steps as the frozen copy
/// that computes them every step; nothing is held for the reference.
#[test]
fn precomputed_references_train_what_a_frozen_copy_trains() {
    let out = tempfile::tempdir().unwrap();
    let model = tiny(out.path());
    let pairs = first_pairs(out.path(), 16);
    let run = |name: &str, extra: &str| {
        let dir = out.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let recipe = dpo_recipe(&dir, &model, &pairs, extra);
        let log = run_ok(&["train", recipe.to_str().unwrap(), "--quiet"]);
        (dir, recipe, log)
    };
    let (frozen, _, _) = run("frozen", "objective: {kind: dpo, beta: 0.5, loss: ipo}\n");
    let extra = "objective: {kind: dpo, beta: 0.5, loss: ipo, precompute_ref_log_probs: true}\n";
    let (precomputed, recipe, log) = run("precomputed", extra);
    let check = run_ok(&["recipe", "check", recipe.to_str().unwrap()]);
    assert!(
        !check.contains("frozen copy"),
        "nothing held for the reference:\n{check}"
    );
    assert!(
        log.contains("reference log-probabilities of 16 train"),
        "{log}"
    );
    let stored = precomputed.join("checkpoints/run/reference_logps.json");
    let stored: Value = serde_json::from_str(&std::fs::read_to_string(stored).unwrap()).unwrap();
    assert_eq!(stored["train"].as_array().unwrap().len(), 16);
    let (a, b) = (
        step_metrics(&frozen.join("runs/run")),
        step_metrics(&precomputed.join("runs/run")),
    );
    let keys = ["train/loss", "train/rewards/chosen", "train/grad_norm"];
    assert_steps_agree(
        &a,
        &b,
        &keys,
        1e-6,
        "precomputed (first: a frozen reference)",
    );
}

/// Stored reference log-probabilities are for the pairs they were computed on: a resume over
/// changed pairs (`--allow-data-change`) computes them again, one over the same pairs reads them.
#[test]
fn a_resume_over_changed_pairs_recomputes_the_reference() {
    let out = tempfile::tempdir().unwrap();
    let model = tiny(out.path());
    let pairs = first_pairs(out.path(), 16);
    let extra = "objective: {kind: dpo, precompute_ref_log_probs: true}\n";
    let recipe = dpo_recipe(out.path(), &model, &pairs, extra);
    run_ok(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--set",
        "steps=2",
    ]);
    let stored = out.path().join("checkpoints/run/reference_logps.json");
    let before = std::fs::read(&stored).unwrap();
    let same = run_ok(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--resume",
        "latest",
        "--set",
        "steps=3",
    ]);
    assert!(same.contains("read from"), "{same}");
    // The same number of pairs, one answer changed.
    let text =
        std::fs::read_to_string(&pairs)
            .unwrap()
            .replacen(" is larger than", " is bigger than", 1);
    std::fs::write(&pairs, text).unwrap();
    let changed = run_ok(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--resume",
        "latest",
        "--allow-data-change",
        "--set",
        "steps=4",
    ]);
    assert!(changed.contains("computed in"), "{changed}");
    assert!(
        std::fs::read(&stored).unwrap() != before,
        "the stored values were replaced"
    );
}

/// As TRL (`disable_dropout`), preference training runs without dropout, so at step 1 the policy
/// equals the reference: every reward is 0 and the loss is ln 2, dropout configured or not.
#[test]
fn preference_training_disables_dropout_as_trl_does() {
    let out = tempfile::tempdir().unwrap();
    let model = tiny(out.path());
    let pairs = first_pairs(out.path(), 16);
    let extra = "objective: {kind: dpo}\nlora: {r: 4, alpha: 8, dropout: 0.1}\n";
    let recipe = dpo_recipe(out.path(), &model, &pairs, extra);
    let text = std::fs::read_to_string(&recipe).unwrap().replace(
        &format!("model: {{from: {}}}", model.display()),
        &format!(
            "model: {{from: {}, dropout: {{resid: 0.1, attn: 0.1, embd: 0.1}}}}",
            model.display()
        ),
    );
    std::fs::write(&recipe, &text).unwrap();
    run_ok(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--set",
        "steps=1",
    ]);
    let first = &step_metrics(&out.path().join("runs/run"))[&1];
    assert_eq!(first["train/rewards/chosen"], 0.0);
    assert_eq!(first["train/rewards/margins"], 0.0);
    assert!((first["train/loss"] - std::f64::consts::LN_2).abs() < 1e-12);
    // With `disable_dropout: false` the policy's dropout makes it differ from the reference.
    let text = text.replace(
        "objective: {kind: dpo}",
        "objective: {kind: dpo, disable_dropout: false}",
    );
    std::fs::write(&recipe, text).unwrap();
    run_ok(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--set",
        "steps=1",
        "--overwrite",
    ]);
    let first = &step_metrics(&out.path().join("runs/run"))[&1];
    assert!(first["train/rewards/margins"] != 0.0, "{first:?}");
}

/// The estimate knows what the reference costs: a frozen copy for a full fine-tune, nothing
/// with LoRA or with precomputed log-probabilities.
#[test]
fn the_memory_estimate_counts_the_reference_only_where_it_is_held() {
    let out = tempfile::tempdir().unwrap();
    let model = tiny(out.path());
    let pairs = first_pairs(out.path(), 16);
    let check = |extra: &str| {
        let recipe = dpo_recipe(out.path(), &model, &pairs, extra);
        run_ok(&["recipe", "check", recipe.to_str().unwrap()])
    };
    let full = check("objective: {kind: dpo}\n");
    assert!(
        full.contains("reference") && full.contains("a frozen copy"),
        "{full}"
    );
    let lora = check("objective: {kind: dpo}\nlora: {r: 4, alpha: 8}\n");
    assert!(!lora.contains("frozen copy"), "{lora}");
    let precomputed = check("objective: {kind: dpo, precompute_ref_log_probs: true}\n");
    assert!(!precomputed.contains("frozen copy"), "{precomputed}");
    let simpo = check("objective: {kind: simpo}\n");
    assert!(!simpo.contains("frozen copy"), "{simpo}");
}

/// Accumulation and replicas cut the batch between pairs, never inside one: 2 micro-batches of
/// 4 pairs on each of 2 replicas train what one batch of 16 pairs does, and so does activation
/// checkpointing; bf16 and fp16 compute train the same steps to their rounding.
#[test]
fn accumulation_and_replicas_keep_pairs_whole() {
    let out = tempfile::tempdir().unwrap();
    let model = tiny(out.path());
    let pairs = first_pairs(out.path(), 16);
    let run = |name: &str, batch: &str| {
        let dir = out.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let extra = "objective: {kind: dpo, beta: 0.1}\n";
        let recipe = dpo_recipe(&dir, &model, &pairs, extra);
        let text = std::fs::read_to_string(&recipe)
            .unwrap()
            .replace("batch: {global: 16, micro: 16}", batch);
        std::fs::write(&recipe, text).unwrap();
        run_ok(&[
            "train",
            recipe.to_str().unwrap(),
            "--quiet",
            "--threads",
            "2",
        ]);
        step_metrics(&dir.join("runs/run"))
    };
    let whole = run("whole", "batch: {global: 16, micro: 16}");
    let split = run("split", "batch: {global: 16, micro: 4, replicas: 2}");
    // Activation checkpointing recomputes each block in the backward: the same numbers.
    let recomputed = run(
        "recomputed",
        "batch: {global: 16, micro: 8}\nmemory: {activation_checkpointing: true}",
    );
    // Mixed precision: bf16 operands (fp32 masters), and fp16 with its loss scale, train the
    // same steps up to half precision's rounding.
    for compute in ["bf16", "fp16"] {
        let half = run(
            compute,
            &format!("batch: {{global: 16, micro: 16}}\nprecision: {{compute: {compute}}}"),
        );
        let what = format!("with {compute} compute (first: fp32)");
        assert_steps_agree(&whole, &half, &["train/loss"], 2e-2, &what);
        assert!(
            half[&5]["train/loss"] < half[&1]["train/loss"] - 0.1,
            "{compute} learns"
        );
    }
    let keys = ["train/loss", "train/grad_norm", "train/rewards/margins"];
    assert_steps_agree(&whole, &split, &keys, 1e-5, "accumulated over replicas");
    assert_steps_agree(&whole, &recomputed, &keys, 1e-5, "checkpointed");
}

/// A DPO run killed mid-way (`kill -9`) resumes to the uninterrupted run's weights and losses bit
/// for bit, its precomputed reference read back from the run.
#[test]
fn a_killed_dpo_run_resumes_bit_for_bit() {
    let out = tempfile::tempdir().unwrap();
    let model = tiny(out.path());
    let pairs = first_pairs(out.path(), 32);
    let extra = "objective: {kind: dpo, beta: 0.1, precompute_ref_log_probs: true}\n";
    let make = |name: &str| {
        let dir = out.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let recipe = dpo_recipe(&dir, &model, &pairs, extra);
        let text = std::fs::read_to_string(&recipe)
            .unwrap()
            .replace(
                "batch: {global: 16, micro: 16}",
                "batch: {global: 4, micro: 2}",
            )
            .replace("steps: 5", "steps: 10")
            .replace("shuffle: false", "shuffle: true");
        std::fs::write(&recipe, text).unwrap();
        (dir, recipe)
    };
    let (whole, recipe) = make("whole");
    run_ok(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--threads",
        "2",
    ]);
    let (killed, recipe_k) = make("killed");
    common::train_and_kill_after_step_4(&killed, &recipe_k);
    assert!(!killed.join("checkpoints/run/step-10").exists());
    let log = run_ok(&[
        "train",
        recipe_k.to_str().unwrap(),
        "--quiet",
        "--threads",
        "2",
        "--resume",
        "latest",
    ]);
    assert!(log.contains("resumed from"), "{log}");
    assert!(
        !log.contains("computed in"),
        "the resume reads the stored reference:\n{log}"
    );
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(whole.join("checkpoints/run/step-10").join(file)).unwrap();
        let b = std::fs::read(killed.join("checkpoints/run/step-10").join(file)).unwrap();
        assert!(a == b, "{file} differs from the uninterrupted run's");
    }
    let losses = |dir: &Path| -> Vec<(u64, u64)> {
        let mut steps: Vec<(u64, u64)> = step_metrics(&dir.join("runs/run"))
            .into_iter()
            .map(|(step, tags)| (step, tags["train/loss"].to_bits()))
            .collect();
        steps.sort();
        steps
    };
    assert_eq!(losses(&killed), losses(&whole));
}

/// SimPO needs no reference: its loss is the formula over length-averaged log-probabilities of
/// the policy (checked at step 1 against `kiln score`'s), its rewards β × those averages; it
/// learns the preference.
#[test]
fn simpo_trains_without_a_reference() {
    let out = tempfile::tempdir().unwrap();
    let model = tiny(out.path());
    let pairs = first_pairs(out.path(), 16);
    let extra = "objective: {kind: simpo, beta: 2.0, gamma: 0.5}\n";
    let recipe = dpo_recipe(out.path(), &model, &pairs, extra);
    let log = run_ok(&["train", recipe.to_str().unwrap(), "--quiet"]);
    assert!(!log.contains("the reference is"), "{log}");
    let steps = step_metrics(&out.path().join("runs/run"));
    for step in 1..=5u64 {
        let m = &steps[&step];
        let (logp_c, logp_r) = (m["train/logps/chosen"], m["train/logps/rejected"]);
        // Rewards are β × the per-token log-probabilities TRL's CPO reports as logps.
        assert!((m["train/rewards/chosen"] - 2.0 * logp_c).abs() < 1e-9);
        assert!((m["train/rewards/rejected"] - 2.0 * logp_r).abs() < 1e-9);
        assert!(
            logp_c < 0.0 && logp_c > -20.0,
            "per-token, not summed: {logp_c}"
        );
    }
    // Step 1's loss from the starting model's log-probabilities as `kiln score` finds them,
    // through SimPO's formula: -log σ(β (mean logp(chosen) - mean logp(rejected)) - γ).
    let preview = run_ok(&[
        "data",
        "preview",
        recipe.to_str().unwrap(),
        "--json",
        "--n",
        "16",
    ]);
    let mut rows = String::new();
    let mut prompt_lens = Vec::new();
    for line in preview.lines() {
        let pair: Value = serde_json::from_str(line).unwrap();
        let ids = |key: &str| -> Vec<u64> {
            pair[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect()
        };
        let prompt = ids("prompt_ids");
        for completion in [ids("chosen_ids"), ids("rejected_ids")] {
            let whole = [prompt.clone(), completion].concat();
            rows.push_str(&serde_json::json!({ "ids": whole }).to_string());
            rows.push('\n');
            prompt_lens.push(prompt.len());
        }
    }
    let input = out.path().join("score.jsonl");
    let scored = out.path().join("scored.jsonl");
    std::fs::write(&input, rows).unwrap();
    run_ok(&[
        "score",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        scored.to_str().unwrap(),
    ]);
    let means: Vec<f64> = std::fs::read_to_string(&scored)
        .unwrap()
        .lines()
        .zip(&prompt_lens)
        .map(|(line, &prompt)| {
            let row: Value = serde_json::from_str(line).unwrap();
            let logps: Vec<f64> = row["logprobs"].as_array().unwrap()[prompt..]
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            logps.iter().sum::<f64>() / logps.len() as f64
        })
        .collect();
    let log_sigmoid = |x: f64| -(1.0 + (-x).exp()).ln();
    let expected: f64 = means
        .chunks(2)
        .map(|m| -log_sigmoid(2.0 * (m[0] - m[1]) - 0.5))
        .sum::<f64>()
        / 16.0;
    let got = steps[&1]["train/loss"];
    assert!(
        (got - expected).abs() < 1e-5 * expected,
        "SimPO's step-1 loss {got}, its formula over kiln score's log-probabilities {expected}"
    );
    assert!(
        steps[&5]["train/loss"] < steps[&1]["train/loss"] - 0.05,
        "SimPO learns: {} then {}",
        steps[&1]["train/loss"],
        steps[&5]["train/loss"]
    );
    assert!(steps[&5]["train/rewards/margins"] > steps[&1]["train/rewards/margins"]);
}

/// Held-out pairs: `eval/loss` and TRL's metrics at each evaluation, and `kiln eval --task
/// preference` on the checkpoint (reference: the base of its adapter) reporting the same
/// accuracy.
#[test]
fn held_out_pairs_report_preference_accuracy() {
    let out = tempfile::tempdir().unwrap();
    let model = tiny(out.path());
    let pairs = first_pairs(out.path(), 16);
    let eval = repo_root().join("datasets/preference/validation.jsonl");
    let extra = "objective: {kind: dpo, beta: 0.1}\n\
                 lora: {r: 4, alpha: 8, dropout: 0.0}\n\
                 eval: {task: preference, every: 5, limit: 24, batch_size: 8}\n";
    let recipe = dpo_recipe(out.path(), &model, &pairs, extra);
    let text = std::fs::read_to_string(&recipe).unwrap().replace(
        "  seq_len: 128",
        &format!(
            "  eval: [{{source: {{path: {}}}, template: preference}}]\n  seq_len: 128",
            eval.display()
        ),
    );
    std::fs::write(&recipe, text).unwrap();
    run_ok(&["train", recipe.to_str().unwrap(), "--quiet"]);
    let steps = step_metrics(&out.path().join("runs/run"));
    let at_end = &steps[&5];
    for tag in [
        "eval/loss",
        "eval/rewards/chosen",
        "eval/rewards/rejected",
        "eval/rewards/accuracies",
        "eval/rewards/margins",
        "eval/logps/chosen",
        "eval/logps/rejected",
    ] {
        assert!(
            at_end.contains_key(tag),
            "{tag} missing: {:?}",
            at_end.keys()
        );
    }
    let report = out.path().join("report");
    let line = run_ok(&[
        "eval",
        "--task",
        "preference",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        out.path().join("checkpoints/run/step-5").to_str().unwrap(),
        "--recipe",
        recipe.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(line.contains("24 pairs"), "{line}");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap())
            .unwrap();
    let accuracy = json["accuracy"].as_f64().unwrap();
    assert!(
        (accuracy - at_end["eval/rewards/accuracies"]).abs() < 1e-9,
        "{accuracy} vs the run's {}",
        at_end["eval/rewards/accuracies"]
    );
    assert!(
        (json["loss"].as_f64().unwrap() - at_end["eval/loss"]).abs() < 1e-5,
        "merged adapter, same loss"
    );
    assert_eq!(json["reference"], model.display().to_string());
}

/// Bad pairs and settings are refused naming the row, field or key, before training starts.
#[test]
fn bad_pairs_and_settings_say_what_is_wrong() {
    let out = tempfile::tempdir().unwrap();
    let model = tiny(out.path());
    let bad = out.path().join("bad.jsonl");
    let cases: [(&str, &str, &str); 4] = [
        (
            "{\"prompt\": \"Q:\", \"chosen\": \" yes\"}\n",
            "",
            "bad.jsonl:line 1: no `rejected` column",
        ),
        (
            "{\"prompt\": \"Q:\", \"chosen\": \" yes\", \"rejected\": \" no\"}\n\
             {\"prompt\": \"Q:\", \"chosen\": 3, \"rejected\": \" no\"}\n",
            "",
            "bad.jsonl:line 2: `chosen` is a number, expected a string",
        ),
        (
            "{\"prompt\": \"Q:\", \"chosen\": \" a very long answer that goes on and on and on\", \"rejected\": \" no\"}\n",
            "  seq_len: 8\n",
            "bad.jsonl:line 1: the pair's longer sequence (prompt and completion) has",
        ),
        (
            "{\"prompt\": [{\"role\": \"user\", \"content\": \"hi\"}], \"chosen\": [{\"role\": \"assistant\"}], \"rejected\": [{\"role\": \"assistant\", \"content\": \"no\"}]}\n",
            "",
            "bad.jsonl:line 1: chosen[0] has no `content`",
        ),
    ];
    for (rows, data_extra, expected) in cases {
        std::fs::write(&bad, rows).unwrap();
        let recipe = dpo_recipe(out.path(), &model, &bad, "objective: {kind: dpo}\n");
        if !data_extra.is_empty() {
            let text = std::fs::read_to_string(&recipe)
                .unwrap()
                .replace("  seq_len: 128\n", data_extra);
            std::fs::write(&recipe, text).unwrap();
        }
        let (ok, stdout, stderr) = kiln(&["train", recipe.to_str().unwrap(), "--quiet"]);
        assert!(!ok, "{rows}: trained:\n{stdout}");
        assert!(
            stderr.contains(expected),
            "{rows}: expected {expected:?} in:\n{stderr}"
        );
        assert!(!out.path().join("checkpoints/run").join("step-1").exists());
    }

    let pairs = first_pairs(out.path(), 4);
    let settings = [
        (
            "objective: {kind: dpo, label_smoothing: 0.1}\n",
            "objective.label_smoothing: used by loss: robust",
        ),
        (
            "objective: {kind: dpo, loss: robust, label_smoothing: 0.6}\n",
            "objective.label_smoothing: must be in [0, 0.5)",
        ),
        (
            "objective: {kind: dpo, beta: 0}\n",
            "objective.beta: must be a positive number",
        ),
        (
            "objective: {kind: simpo, loss: ipo}\n",
            "objective.loss: ipo is one of DPO's losses",
        ),
        (
            "objective: {kind: dpo, gamma: 1}\n",
            "objective.gamma: SimPO's target margin",
        ),
        (
            "objective: {kind: sft}\n",
            "data.train[0].template: preference pairs train with a preference objective",
        ),
        (
            "objective: {kind: dpo}\neval: {task: mnli}\n",
            "eval.task: mnli measures text examples",
        ),
    ];
    for (extra, expected) in settings {
        let recipe = dpo_recipe(out.path(), &model, &pairs, extra);
        let (ok, _, stderr) = kiln(&["recipe", "check", recipe.to_str().unwrap()]);
        assert!(
            !ok && stderr.contains(expected),
            "{extra}: expected {expected:?} in:\n{stderr}"
        );
    }
    // A text template with a preference objective.
    let text_recipe = dpo_recipe(out.path(), &model, &pairs, "objective: {kind: dpo}\n");
    let text = std::fs::read_to_string(&text_recipe)
        .unwrap()
        .replace("template: preference", "template: prompt-completion");
    std::fs::write(&text_recipe, text).unwrap();
    let (ok, _, stderr) = kiln(&["recipe", "check", text_recipe.to_str().unwrap()]);
    assert!(
        !ok && stderr.contains("set template: preference"),
        "{stderr}"
    );
}

/// Rows without a prompt have it taken from what chosen and rejected share, as TRL's
/// `extract_prompt` does; conversations are rendered with the chat template, the prompt with
/// the generation prompt.
#[test]
fn implicit_prompts_and_conversations_tokenise_as_trl() {
    let out = tempfile::tempdir().unwrap();
    let model = tiny(out.path());
    let pairs = out.path().join("implicit.jsonl");
    std::fs::write(
        &pairs,
        "{\"chosen\": \"The sky is blue.\", \"rejected\": \"The sky is green.\"}\n",
    )
    .unwrap();
    let recipe = dpo_recipe(out.path(), &model, &pairs, "objective: {kind: dpo}\n");
    let preview = run_ok(&["data", "preview", recipe.to_str().unwrap()]);
    assert!(preview.contains("prompt:   The sky is\n"), "{preview}");
    assert!(
        preview.contains("chosen:   ⟦ blue.<|endoftext|>⟧"),
        "{preview}"
    );
    assert!(
        preview.contains("rejected: ⟦ green.<|endoftext|>⟧"),
        "{preview}"
    );

    let chats = out.path().join("chats.jsonl");
    std::fs::write(
        &chats,
        "{\"prompt\": [{\"role\": \"user\", \"content\": \"Say hi.\"}], \
          \"chosen\": [{\"role\": \"assistant\", \"content\": \"Hi!\"}], \
          \"rejected\": [{\"role\": \"assistant\", \"content\": \"No.\"}]}\n",
    )
    .unwrap();
    let recipe = dpo_recipe(out.path(), &model, &chats, "objective: {kind: dpo}\n");
    let text = std::fs::read_to_string(&recipe).unwrap().replace(
        "  seq_len: 128",
        "  chat_template: \"{% for m in messages %}{{ m.role }}: {{ m.content }}\\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}\"\n  seq_len: 128",
    );
    std::fs::write(&recipe, text).unwrap();
    let preview = run_ok(&["data", "preview", recipe.to_str().unwrap()]);
    // The prompt rendered alone ends `assistant:`; with the completion it reads `assistant: Hi!`:
    // the completion starts where the two token sequences part.
    assert!(
        preview.contains("prompt:   user: Say hi.\nassistant"),
        "{preview}"
    );
    assert!(preview.contains("Hi!"), "{preview}");
    let stats = run_ok(&["data", "stats", recipe.to_str().unwrap()]);
    assert!(stats.contains("(1 conversational"), "{stats}");
}

/// The device-generic code (what a GPU runs: two head passes, weights applied as the gradient
/// is made) forced on the CPU trains the steps the fused CPU kernels train, full fine-tune and
/// LoRA.
#[test]
fn the_device_generic_path_trains_the_same_steps() {
    let out = tempfile::tempdir().unwrap();
    let model = tiny(out.path());
    let pairs = first_pairs(out.path(), 16);
    let lora = "lora: {r: 4, alpha: 8, dropout: 0.0}\n";
    for (name, extra) in [("full", ""), ("lora", lora)] {
        let run = |ops: &str| {
            let dir = out.path().join(format!("{name}-{ops}"));
            std::fs::create_dir_all(&dir).unwrap();
            let extra = format!("objective: {{kind: dpo, beta: 0.1}}\n{extra}");
            let recipe = dpo_recipe(&dir, &model, &pairs, &extra);
            let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args(["train", recipe.to_str().unwrap(), "--quiet"])
                .env("KILN_OPS", ops)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            step_metrics(&dir.join("runs/run"))
        };
        let (fused, generic) = (run("fused"), run("generic"));
        let keys = ["train/loss", "train/grad_norm", "train/rewards/margins"];
        let what = format!("{name}: device-generic (first: fused)");
        assert_steps_agree(&fused, &generic, &keys, 1e-5, &what);
    }
}
