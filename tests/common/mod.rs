//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod http;
pub mod server;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

/// The repository the tests read their fixtures, recipes and bundled data from: the source tree
/// they were built in, or `KILN_TEST_ROOT` where a test binary runs away from it (the GPU
/// bundle carries the files it needs in the same layout).
pub fn repo_root() -> PathBuf {
    match std::env::var_os("KILN_TEST_ROOT") {
        Some(root) => PathBuf::from(root),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// True under CI (`CI=true`), where a test must not pass by skipping what it checks.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A test's missing prerequisite: under CI the test fails with `what`; locally it says loudly
/// that it is skipped.
fn missing(what: &str) {
    if in_ci() {
        panic!("{what}; CI=true, so this test fails instead of skipping");
    }
    eprintln!("SKIPPED (not a pass): {what}");
}

/// `../shared` beside the repo, or `None` (with a message) so a test can skip — except under
/// CI, where its absence fails the test.
pub fn shared(sub: &str) -> Option<PathBuf> {
    let path = repo_root().join("../shared").join(sub);
    if path.exists() {
        Some(path)
    } else {
        missing(&format!(
            "{} is absent (this test needs the shared data beside the repo)",
            path.display()
        ));
        None
    }
}

pub fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The device the parity checks run their model on: `KILN_TEST_DEVICE` (`cpu`, `cuda`,
/// `cuda:N`; `scripts/gpu-check.sh` sets it), else the CPU.
pub fn test_device() -> Device {
    match std::env::var("KILN_TEST_DEVICE") {
        Ok(name) => kiln::ops::parse_device(&name).expect("KILN_TEST_DEVICE"),
        Err(_) => Device::Cpu,
    }
}

/// `t` on the CPU, in fp32, for comparing with fixtures.
fn host(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap()
}

/// Largest absolute difference between two tensors of the same shape (on any device).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (&host(a), &host(b));
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// ||a - b|| / ||b|| (Frobenius; on any device).
pub fn relative_error(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let (a, b) = (&host(a), &host(b));
    let diff = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
    let norm = b.sqr().unwrap().sum_all().unwrap();
    let diff = diff.to_scalar::<f32>().unwrap().sqrt();
    let norm = norm.to_scalar::<f32>().unwrap().sqrt();
    diff / norm.max(1e-12)
}

/// Rows of token ids (padding dropped) from fixture `input_ids` and `attention_mask`.
pub fn rows_from_fixture(ids: &Tensor, mask: &Tensor) -> Vec<Vec<u32>> {
    let ids = ids.to_vec2::<i64>().unwrap();
    let mask = mask.to_vec2::<i64>().unwrap();
    ids.iter()
        .zip(&mask)
        .map(|(row, m)| {
            row.iter()
                .zip(m)
                .filter(|(_, &keep)| keep == 1)
                .map(|(&id, _)| id as u32)
                .collect()
        })
        .collect()
}

/// Runs `kiln` with arguments; returns (success, stdout, stderr).
pub fn kiln(args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("kiln runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A Python that can `import module`: `$KILN_PYTHON` (set by `.ci/run`), else `python3`. `None`
/// (with a SKIPPED line naming what is missing) when neither can; under CI that fails the test.
pub fn python_with(module: &str) -> Option<String> {
    let candidates = std::env::var("KILN_PYTHON")
        .into_iter()
        .chain(["python3".to_string()]);
    for python in candidates {
        let ok = std::process::Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(python);
        }
    }
    missing(&format!(
        "no Python with the {module} package (set KILN_PYTHON)"
    ));
    None
}

/// A file of the bundled NLI sample (`datasets/nli`).
pub fn bundled(path: &str) -> String {
    repo_root()
        .join("datasets/nli")
        .join(path)
        .display()
        .to_string()
}

/// A small recipe (run `run`, 10 steps of the tiny GPT-J) on the bundled NLI data writing into
/// `out`; `extra` is appended YAML.
pub fn write_recipe(out: &Path, extra: &str) -> PathBuf {
    let text = format!(
        "name: run\n\
         seed: 3\n\
         model: {{init: {{preset: tiny, seed: 1, vocab_size: 1024}}}}\n\
         tokenizer: {tokenizer}\n\
         data:\n  \
           train: [{{source: {{path: {train}}}, template: mnli, limit: 400}}]\n  \
           eval: [{{source: {{path: {eval}}}, template: mnli, limit: 40}}]\n  \
           seq_len: 64\n  mode: pad\n  loss_on: target\n\
         optimizer: {{lr: 2.0e-3, weight_decay: 0.01}}\n\
         schedule: {{kind: cosine, warmup: 2}}\n\
         batch: {{global: 8, micro: 4}}\n\
         steps: 10\n\
         checkpoint: {{every: 1, dir: {ckpt}}}\n\
         tracking: {{log_dir: {logs}}}\n\
         {extra}",
        tokenizer = bundled("tokenizer"),
        train = bundled("train.jsonl"),
        eval = bundled("validation.jsonl"),
        ckpt = out.join("checkpoints").display(),
        logs = out.join("runs").display(),
    );
    let path = out.join("recipe.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `kiln init --preset tiny` into `out` with `tokenizer` (a directory), sized for it.
pub fn init_tiny(out: &Path, seed: u64, tokenizer: &Path) {
    let (ok, _, stderr) = kiln(&[
        "init",
        "--preset",
        "tiny",
        "--out",
        out.to_str().unwrap(),
        "--seed",
        &seed.to_string(),
        "--tokenizer",
        tokenizer.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
}

/// Runs `kiln train RECIPE --quiet --threads 2` for a recipe that checkpoints into
/// `out/checkpoints/run`, and SIGKILLs it once it has saved a checkpoint of step 4 or later, so
/// the kill lands mid-run: no handler runs, whatever the process was doing (a step, a
/// checkpoint write).
pub fn train_and_kill_after_step_4(out: &Path, recipe: &Path) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "train",
            recipe.to_str().unwrap(),
            "--quiet",
            "--threads",
            "2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let latest = out.join("checkpoints/run/latest");
    let checkpointed_step_4 = || {
        std::fs::read_to_string(&latest)
            .ok()
            .and_then(|s| s.trim().strip_prefix("step-")?.parse::<u64>().ok())
            .is_some_and(|step| step >= 4)
    };
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut saw_checkpoint = false;
    for line in stdout.lines() {
        if line.unwrap().contains("saved checkpoint") && checkpointed_step_4() {
            saw_checkpoint = true;
            break;
        }
    }
    assert!(saw_checkpoint, "the run ended before it could be killed");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A tiny GPT-J with the real GPT-2 tokenizer (random tokens decode to visible text), written
/// into `dir/tiny`: the model the server tests serve.
pub fn tiny_model(dir: &Path) -> Option<PathBuf> {
    let tokenizer = shared("tokenizers/gpt2")?;
    let model = dir.join("tiny");
    init_tiny(&model, 1, &tokenizer);
    Some(model)
}

/// [`kiln::train::Trainer::new`] then `train()`: a whole run in one call.
pub fn train_run(
    recipe: &kiln::recipe::Recipe,
    init: kiln::train::ModelInit,
    data: kiln::data::SequenceStream,
    eval: Option<Vec<kiln::data::Sequence>>,
    options: kiln::train::TrainOptions,
) -> anyhow::Result<kiln::train::TrainSummary> {
    kiln::train::Trainer::new(recipe, init, data, eval.map(Into::into), options)?.train()
}
