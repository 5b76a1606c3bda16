//! TensorBoard HParams summaries, read back by TensorBoard itself: the plugin's metadata parsers
//! for each run directory, and the HParams tab's own request handlers over a log directory of
//! several runs (one of them interrupted and resumed).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::track::hparams::{self, SessionStatus};
use kiln::track::EventWriter;
use serde_json::{json, Value};

/// An MNLI run from scratch: eval/accuracy is one of its metrics.
const MNLI: &str = "\
name: mnli
seed: 7
model:
  init: {preset: tiny}
tokenizer: tok
data:
  train:
    - source: {path: train.jsonl}
      template: mnli
  eval:
    - source: {path: validation.jsonl}
      template: mnli
  seq_len: 64
  mode: pad
  loss_on: target
optimizer:
  lr: 2.0e-3
  betas: [0.9, 0.98]
  weight_decay: 0.01
schedule:
  kind: cosine
  warmup: 30
precision:
  compute: fp32
batch:
  global: 32
  micro: 32
steps: 300
eval:
  task: mnli
  mode: rank
";

/// A loss-only fine-tune of a Hub model, epochs-based, without gradient clipping.
const LM: &str = "\
name: lm
model:
  from: EleutherAI/gpt-j-6b
data:
  train:
    - source: {hub: nyu-mll/glue, config: mnli, split: train}
      template: text
  seq_len: 128
  shuffle: false
optimizer:
  lr: 1.0e-4
  grad_clip: null
schedule:
  warmup: 0.1
precision:
  compute: bf16
batch:
  global: 16
  micro: 4
  replicas: 2
epochs: 1.5
";

fn load(dir: &Path, name: &str, yaml: &str) -> kiln::recipe::Recipe {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    kiln::recipe::load(&path, &[]).unwrap()
}

fn check_tensorboard(python: &str, args: &[&Path], table: bool) -> Value {
    let mut command = Command::new(python);
    command.arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/check_tensorboard.py"));
    if table {
        command.arg("--hparams-table");
    }
    let output = command.args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

const START: f64 = 1_700_000_000.25;
const END: f64 = 1_700_003_600.5;

/// Three runs under one log directory, as `kiln train` lays them out:
/// - `mnli` ran to the end;
/// - `lm` was interrupted after step 4 and resumed from its step-2 checkpoint, in a second event
///   file with a restart marker and no second `session_start_info` (as the tracker resumes);
/// - `broken` failed at step 1.
fn write_runs(logdir: &Path, mnli: &kiln::recipe::Recipe, lm: &kiln::recipe::Recipe) {
    let run = logdir.join("mnli");
    std::fs::create_dir_all(&run).unwrap();
    let mut events = EventWriter::create(&run).unwrap();
    hparams::write_start(&mut events, mnli, START).unwrap();
    for step in 1..=3 {
        events
            .scalar("train/loss", step, 4.0 - step as f32)
            .unwrap();
    }
    events.scalar("eval/loss", 2, 1.5).unwrap();
    events.scalar("eval/accuracy", 2, 0.5).unwrap();
    events.scalar("eval/loss", 3, 1.25).unwrap();
    events.scalar("eval/accuracy", 3, 0.75).unwrap();
    hparams::write_end(&mut events, SessionStatus::Success, END).unwrap();
    events.flush().unwrap();

    let run = logdir.join("lm");
    std::fs::create_dir_all(&run).unwrap();
    let mut events = EventWriter::create(&run).unwrap();
    // TensorBoard's server takes a run's first restart marker for its start, so a fresh run
    // writes one for the resume's marker to count as a restart.
    events.session_start(0).unwrap();
    hparams::write_start(&mut events, lm, START).unwrap();
    for step in 1..=4 {
        events
            .scalar("train/loss", step, 10.0 + step as f32)
            .unwrap();
    }
    events.flush().unwrap();
    drop(events);
    let mut events = EventWriter::create(&run).unwrap();
    events.session_start(3).unwrap();
    for step in 3..=5 {
        events.scalar("train/loss", step, step as f32).unwrap();
    }
    events.scalar("eval/loss", 5, 4.5).unwrap();
    hparams::write_end(&mut events, SessionStatus::Success, END + 1.0).unwrap();
    events.flush().unwrap();

    let run = logdir.join("broken");
    std::fs::create_dir_all(&run).unwrap();
    let mut events = EventWriter::create(&run).unwrap();
    hparams::write_start(&mut events, lm, START).unwrap();
    events.scalar("train/loss", 1, 9.0).unwrap();
    hparams::write_end(&mut events, SessionStatus::Failure, END).unwrap();
    events.flush().unwrap();
}

fn expected_mnli_hparams() -> Value {
    json!({
        "model": "init:tiny",
        "data.train": "train.jsonl",
        "data.seq_len": 64.0,
        "data.mode": "pad",
        "data.attention": "causal",
        "data.loss_on": "target",
        "data.shuffle": true,
        "optimizer.lr": 2.0e-3,
        "optimizer.weight_decay": 0.01,
        "optimizer.beta1": 0.9,
        "optimizer.beta2": 0.98,
        "optimizer.grad_clip": 1.0,
        "schedule.kind": "cosine",
        "schedule.min_lr": 0.0,
        "schedule.warmup_steps": 30.0,
        "precision.compute": "fp32",
        "batch.global": 32.0,
        "batch.micro": 32.0,
        "batch.replicas": 1.0,
        "batch.accumulation_steps": 1.0,
        "seed": 7.0,
        "steps": 300.0,
        "eval.task": "mnli",
        "eval.mode": "rank",
    })
}

fn expected_lm_hparams() -> Value {
    json!({
        "model": "EleutherAI/gpt-j-6b",
        "data.train": "nyu-mll/glue/mnli",
        "data.seq_len": 128.0,
        "data.mode": "pack",
        "data.attention": "causal",
        "data.loss_on": "all",
        "data.shuffle": false,
        "optimizer.lr": 1.0e-4,
        "optimizer.weight_decay": 0.0,
        "optimizer.beta1": 0.9,
        "optimizer.beta2": 0.999,
        "schedule.kind": "constant",
        "schedule.min_lr": 0.0,
        "schedule.warmup_fraction": 0.1,
        "precision.compute": "bf16",
        "batch.global": 16.0,
        "batch.micro": 4.0,
        "batch.replicas": 2.0,
        "batch.accumulation_steps": 2.0,
        "seed": 0.0,
        "epochs": 1.5,
        "eval.task": "loss",
        "eval.mode": "generate",
    })
}

#[test]
fn each_run_directory_holds_its_session_as_the_plugin_decodes_it() {
    let Some(python) = common::python_with("tensorboard") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (mnli, lm) = (load(dir.path(), "mnli", MNLI), load(dir.path(), "lm", LM));
    let logdir = dir.path().join("runs");
    write_runs(&logdir, &mnli, &lm);

    let dump = check_tensorboard(&python, &[&logdir.join("mnli")], false);
    let hp = &dump["hparams"];
    assert_eq!(hp["session_start_info"]["hparams"], expected_mnli_hparams());
    assert_eq!(hp["session_start_info"]["start_time_secs"], START);
    assert_eq!(
        hp["session_end_info"],
        json!({"status": "STATUS_SUCCESS", "end_time_secs": END})
    );
    assert_eq!(hp["experiment"], Value::Null, "see src/track/hparams.rs");
    // The plugin summaries sit beside the scalars without disturbing them.
    assert_eq!(
        dump["scalars"]["eval/accuracy"],
        json!([[2, 0.5], [3, 0.75]])
    );
    assert_eq!(dump["text"], json!({}));

    let dump = check_tensorboard(&python, &[&logdir.join("lm")], false);
    let hp = &dump["hparams"];
    assert_eq!(hp["session_start_info"]["hparams"], expected_lm_hparams());
    assert_eq!(
        hp["session_end_info"],
        json!({"status": "STATUS_SUCCESS", "end_time_secs": END + 1.0})
    );
    let steps: Vec<u64> = dump["scalars"]["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps,
        [1, 2, 3, 4, 5],
        "the restart drops the orphaned 3 and 4"
    );

    let dump = check_tensorboard(&python, &[&logdir.join("broken")], false);
    assert_eq!(
        dump["hparams"]["session_end_info"]["status"],
        "STATUS_FAILURE"
    );
}

/// The HParams tab's table, from the plugin's `GetExperiment` and `ListSessionGroups` handlers.
#[test]
fn the_hparams_tab_lists_every_run_with_its_final_metrics() {
    let Some(python) = common::python_with("tensorboard") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (mnli, lm) = (load(dir.path(), "mnli", MNLI), load(dir.path(), "lm", LM));
    let logdir = dir.path().join("runs");
    write_runs(&logdir, &mnli, &lm);
    let table = check_tensorboard(&python, &[&logdir], true);

    // Columns: every hyperparameter of any run, typed, with the range over all runs.
    let infos = table["experiment"]["hparam_infos"].as_array().unwrap();
    let info = |name: &str| {
        infos
            .iter()
            .find(|i| i["name"] == name)
            .unwrap_or_else(|| panic!("no hparam {name}: {infos:?}"))
    };
    assert_eq!(info("optimizer.lr")["type"], "DATA_TYPE_FLOAT64");
    assert_eq!(
        info("optimizer.lr")["domain_interval"],
        json!({"min_value": 1.0e-4, "max_value": 2.0e-3})
    );
    assert_eq!(info("optimizer.lr")["differs"], true);
    assert_eq!(info("precision.compute")["type"], "DATA_TYPE_STRING");
    let mut computes: Vec<&str> = info("precision.compute")["domain_discrete"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    computes.sort();
    assert_eq!(computes, ["bf16", "fp32"]);
    assert_eq!(info("data.shuffle")["type"], "DATA_TYPE_BOOL");
    assert_eq!(info("data.seq_len")["type"], "DATA_TYPE_FLOAT64");
    assert_eq!(info("optimizer.grad_clip")["type"], "DATA_TYPE_FLOAT64");
    assert_eq!(info("data.attention").get("differs"), None, "all causal");

    // Metric columns: the scalar tags of the runs, found in the run directory itself (group "").
    let mut metrics: Vec<(String, String)> = table["experiment"]["metric_infos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let name = &m["name"];
            (
                name["group"].as_str().unwrap_or("").to_string(),
                name["tag"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    metrics.sort();
    let expected: Vec<(String, String)> = ["eval/accuracy", "eval/loss", "train/loss"]
        .iter()
        .map(|t| (String::new(), t.to_string()))
        .collect();
    assert_eq!(metrics, expected);

    // Rows: one session group per run, with its hyperparameters, status and final metrics.
    let groups = table["session_groups"].as_array().unwrap();
    let group = |name: &str| {
        groups
            .iter()
            .find(|g| g["name"] == name)
            .unwrap_or_else(|| panic!("no session group {name}: {groups:?}"))
    };
    assert_eq!(groups.len(), 3, "{groups:?}");
    let final_metrics = |name: &str| -> Vec<(String, u64, f64)> {
        let mut values: Vec<(String, u64, f64)> = group(name)["sessions"][0]["metric_values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["name"]["tag"].as_str().unwrap().to_string(),
                    m["training_step"].as_u64().unwrap(),
                    m["value"].as_f64().unwrap(),
                )
            })
            .collect();
        values.sort_by(|a, b| a.0.cmp(&b.0));
        values
    };

    let mnli_group = group("mnli");
    assert_eq!(mnli_group["hparams"], expected_mnli_hparams());
    let session = &mnli_group["sessions"][0];
    assert_eq!(session["name"], "mnli");
    assert_eq!(session["status"], "STATUS_SUCCESS");
    assert_eq!(session["start_time_secs"], START);
    assert_eq!(session["end_time_secs"], END);
    assert_eq!(
        final_metrics("mnli"),
        [
            ("eval/accuracy".into(), 3, 0.75),
            ("eval/loss".into(), 3, 1.25),
            ("train/loss".into(), 3, 1.0),
        ]
    );

    // The resumed run: hyperparameters from its first file, status from its second, and the
    // last train/loss is the resumed run's, not the interrupted run's orphaned step 4.
    let lm_group = group("lm");
    assert_eq!(lm_group["hparams"], expected_lm_hparams());
    assert_eq!(lm_group["sessions"][0]["status"], "STATUS_SUCCESS");
    assert_eq!(
        final_metrics("lm"),
        [("eval/loss".into(), 5, 4.5), ("train/loss".into(), 5, 5.0)]
    );

    assert_eq!(group("broken")["sessions"][0]["status"], "STATUS_FAILURE");
    assert_eq!(final_metrics("broken"), [("train/loss".into(), 1, 9.0)]);
}
