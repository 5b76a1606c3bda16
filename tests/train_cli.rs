//! `kiln train` as users run it: a process that may be killed at any moment, a recipe that may be
//! wrong, and the evaluator inside training.

mod common;

use std::path::Path;

use common::{bundled, kiln, write_recipe};

fn train_losses(run_dir: &Path) -> Vec<(u64, u64)> {
    kiln::track::read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.tag == "train/loss")
        .map(|r| (r.step, r.value.to_bits()))
        .collect()
}

fn run_ok(args: &[&str]) -> String {
    let (ok, stdout, stderr) = kiln(args);
    assert!(ok, "kiln {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

#[test]
fn sigkill_then_resume_latest_is_bit_identical() {
    let whole = tempfile::tempdir().unwrap();
    let recipe = write_recipe(whole.path(), "");
    run_ok(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--threads",
        "2",
    ]);

    let killed = tempfile::tempdir().unwrap();
    let recipe_k = write_recipe(killed.path(), "");
    common::train_and_kill_after_step_4(killed.path(), &recipe_k);
    let ckpt = killed.path().join("checkpoints/run");
    assert!(
        !ckpt.join("step-10").exists(),
        "the process was killed before the end"
    );
    // `kiln runs` tells the killed run from a live one, and from the same run resumed to the end.
    let status = |dir: &Path| {
        let logs = dir.join("runs");
        let listing = run_ok(&["runs", logs.to_str().unwrap(), "--json"]);
        let runs: serde_json::Value = serde_json::from_str(&listing).unwrap();
        let run = &runs.as_array().unwrap()[0];
        let steps = (run["steps_done"].as_u64(), run["total_steps"].as_u64());
        (run["status"].as_str().unwrap().to_string(), steps)
    };
    let (killed_status, (done, total)) = status(killed.path());
    assert_eq!(killed_status, "died");
    // run.json was rewritten after the step-3 checkpoint at least.
    assert!(
        done.unwrap() >= 3 && total == Some(10),
        "{done:?}/{total:?}"
    );

    let out = run_ok(&[
        "train",
        recipe_k.to_str().unwrap(),
        "--quiet",
        "--threads",
        "2",
        "--resume",
        "latest",
    ]);
    assert!(out.contains("resumed from"), "{out}");
    assert_eq!(
        status(killed.path()),
        ("finished".to_string(), (Some(10), Some(10)))
    );

    let a = std::fs::read(
        whole
            .path()
            .join("checkpoints/run/step-10/model.safetensors"),
    )
    .unwrap();
    let b = std::fs::read(ckpt.join("step-10/model.safetensors")).unwrap();
    assert!(a == b, "final weights differ from the uninterrupted run");
    let a = std::fs::read(
        whole
            .path()
            .join("checkpoints/run/step-10/optimizer.safetensors"),
    )
    .unwrap();
    let b = std::fs::read(ckpt.join("step-10/optimizer.safetensors")).unwrap();
    assert!(
        a == b,
        "optimizer moments differ from the uninterrupted run"
    );
    let whole_losses = train_losses(&whole.path().join("runs/run"));
    assert_eq!(whole_losses.len(), 10);
    assert_eq!(train_losses(&killed.path().join("runs/run")), whole_losses);
}

#[test]
fn mnli_accuracy_is_evaluated_during_training_and_printed() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(
        dir.path(),
        "eval: {every: 5, task: mnli, mode: rank, batch_size: 16}\n",
    );
    let out = run_ok(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--set",
        "checkpoint.every=0",
    ]);
    assert!(out.contains("eval accuracy"), "{out}");
    let metrics = kiln::track::read_metrics(&dir.path().join("runs/run/metrics.jsonl")).unwrap();
    let accuracy: Vec<(u64, f64)> = metrics
        .iter()
        .filter(|r| r.tag == "eval/accuracy")
        .map(|r| (r.step, r.value))
        .collect();
    assert_eq!(
        accuracy.iter().map(|a| a.0).collect::<Vec<_>>(),
        vec![5, 10]
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("runs/run/eval/step-10/report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["n"], 40);
    assert_eq!(report["mode"], "rank");
    assert_eq!(report["accuracy"].as_f64().unwrap(), accuracy[1].1);
    assert!(metrics.iter().any(|r| r.tag == "eval/loss" && r.step == 10));
    // The checkpoint is a model directory that `kiln eval` reads, and it agrees with training.
    let report_dir = dir.path().join("report");
    run_ok(&[
        "eval",
        "--model",
        dir.path().join("checkpoints/run/step-10").to_str().unwrap(),
        "--data",
        &bundled("validation.jsonl"),
        "--limit",
        "40",
        "--mode",
        "rank",
        "--report",
        report_dir.to_str().unwrap(),
    ]);
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report_dir.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(again["confusion"], report["confusion"]);
    // The in-training report names the weights as `kiln eval` does for the step's checkpoint.
    let sha = report["model_sha256"].as_str().unwrap();
    assert_eq!(sha.len(), 64, "{report}");
    assert_eq!(again["model_sha256"], report["model_sha256"]);
    let split = report["split"].as_str().unwrap();
    assert!(
        split.ends_with("datasets/nli/validation.jsonl (first 40 rows)"),
        "{split}"
    );
    // The step-5 report hashes other weights (no checkpoint was written then).
    let report_5: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("runs/run/eval/step-5/report.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report_5["model_sha256"].as_str().unwrap().len(), 64);
    assert_ne!(report_5["model_sha256"], report["model_sha256"]);
}

/// `schedule.warmup: 0.12` of 10 steps is 1.2 steps: `kiln recipe check` reports 2 (rounded up),
/// and training warms up over exactly those 2 steps.
#[test]
fn fractional_warmup_trains_as_recipe_check_reports() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), "");
    let recipe = recipe.to_str().unwrap();
    let set = [
        "--set",
        "schedule.warmup=0.12",
        "--set",
        "checkpoint.every=0",
    ];
    let checked = run_ok(&[&["recipe", "check", recipe], &set[..]].concat());
    let checked: serde_json::Value = serde_norway::from_str(&checked).unwrap();
    let warmup = checked["derived"]["warmup_steps"].as_u64().unwrap();
    assert_eq!(warmup, 2, "{checked}");
    run_ok(&[&["train", recipe, "--quiet"], &set[..]].concat());
    let lrs: Vec<f64> = kiln::track::read_metrics(&dir.path().join("runs/run/metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.tag == "train/lr")
        .map(|r| r.value)
        .collect();
    let peak = 2.0e-3;
    for step in 1..=warmup {
        let expected = peak * step as f64 / warmup as f64;
        let logged = lrs[step as usize - 1];
        assert!(
            (logged - expected).abs() < 1e-12,
            "step {step}: lr {logged}, recipe check's warmup of {warmup} steps gives {expected}"
        );
    }
    assert!(lrs[warmup as usize] < peak, "decay starts after the warmup");
}

/// The checkpoint records the training files' size and sha256; resuming over a changed file is
/// refused and names it, unless `--allow-data-change`.
#[test]
fn resume_over_changed_data_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.jsonl");
    std::fs::copy(bundled("train.jsonl"), &train).unwrap();
    let recipe = write_recipe(dir.path(), "");
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace(&bundled("train.jsonl"), train.to_str().unwrap());
    std::fs::write(&recipe, text).unwrap();
    let recipe = recipe.to_str().unwrap();
    run_ok(&["train", recipe, "--quiet", "--set", "steps=3"]);
    let state =
        std::fs::read_to_string(dir.path().join("checkpoints/run/step-3/trainer_state.json"))
            .unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["data"][0]["key"], "data.train[0]", "{state}");
    assert_eq!(state["data"][0]["sha256"].as_str().unwrap().len(), 64);

    // Unchanged data resumes.
    run_ok(&[
        "train", recipe, "--quiet", "--set", "steps=4", "--resume", "latest",
    ]);

    // The same number of rows, one word changed: only the content tells.
    let changed = std::fs::read_to_string(&train).unwrap().replacen(
        "{\"premise\":\"",
        "{\"premise\":\"Indeed, ",
        1,
    );
    std::fs::write(&train, changed).unwrap();
    let resume = [
        "train", recipe, "--quiet", "--set", "steps=5", "--resume", "latest",
    ];
    let (ok, _, err) = kiln(&resume);
    assert!(!ok, "a resume over changed data must be refused");
    assert!(
        err.contains("data.train[0]")
            && err.contains(train.to_str().unwrap())
            && err.contains("has changed")
            && err.contains("--allow-data-change"),
        "{err}"
    );
    assert!(!dir.path().join("checkpoints/run/step-5").exists());

    let out = run_ok(&[&resume[..], &["--allow-data-change"]].concat());
    assert!(out.contains("the training data changed"), "{out}");
    let state =
        std::fs::read_to_string(dir.path().join("checkpoints/run/step-5/trainer_state.json"))
            .unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    let new_sha = kiln::data::fingerprint::file_digest(&train).unwrap().sha256;
    assert_eq!(state["data"][0]["sha256"], new_sha.as_str());
}

#[test]
fn bad_recipes_fail_before_training_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), "");
    let path = recipe.to_str().unwrap();

    let (ok, _, err) = kiln(&["train", path, "--set", "tokenizer=null"]);
    assert!(!ok);
    assert!(err.contains("model.init needs `tokenizer:`"), "{err}");

    let (ok, _, err) = kiln(&["train", path, "--set", "batch.micro=3"]);
    assert!(!ok);
    assert!(
        err.contains(
            "batch.global: 8 is not divisible by batch.micro × batch.replicas = 3 × 1 = 3"
        ),
        "{err}"
    );

    let (ok, _, err) = kiln(&[
        "train",
        path,
        "--set",
        "eval.task=mnli",
        "--set",
        "data.eval=[]",
    ]);
    assert!(!ok);
    assert!(
        err.contains("eval.task: mnli") && err.contains("data.eval"),
        "{err}"
    );

    let (ok, _, err) = kiln(&["train", path, "--set", "model.init.vocab_size=512"]);
    assert!(!ok);
    assert!(
        err.contains("produces ids up to 1023") && err.contains("has only 512 embedding rows"),
        "{err}"
    );

    let (ok, _, err) = kiln(&["train", path, "--resume", "latest"]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "{}: no complete checkpoint to resume from",
            dir.path().join("checkpoints/run").display()
        )),
        "{err}"
    );

    assert!(
        !dir.path().join("checkpoints/run").join("latest").exists(),
        "nothing was trained"
    );
}

/// On the CPU each thread trains its own rows, so the thread count is part of what makes a resume
/// bit-exact: the checkpoint records it, and a resume with another count says so.
#[test]
fn resume_with_other_threads_says_it_is_not_bit_exact() {
    let out = tempfile::tempdir().unwrap();
    let recipe = write_recipe(out.path(), "");
    let recipe = recipe.to_str().unwrap();
    run_ok(&["train", recipe, "--quiet", "--threads", "2"]);
    let state = std::fs::read_to_string(
        out.path()
            .join("checkpoints/run/step-10/trainer_state.json"),
    )
    .unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["cpu_workers"], 2, "{state}");

    let resumed = run_ok(&[
        "train",
        recipe,
        "--quiet",
        "--threads",
        "1",
        "--resume",
        "latest",
        "--set",
        "steps=11",
    ]);
    assert!(
        resumed.contains("split over 2 CPU workers per replica and now over 1"),
        "{resumed}"
    );
    assert!(resumed.contains("no longer bit-identical"), "{resumed}");
}
