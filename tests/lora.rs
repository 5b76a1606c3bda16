//! Training less than every weight, and knowing the memory before: LoRA adapters that train alone
//! beside a frozen base, stored in PEFT's format, resumed bit-exactly, merged, and loaded by PEFT
//! (and from PEFT) to the same numbers; partial fine-tuning (`train.trainable`); the memory
//! estimate against the measured peak.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{kiln, write_recipe};

const LORA: &str =
    "lora: {r: 4, alpha: 8, dropout: 0.1, target_modules: [q_proj, v_proj, fc_in]}\n";

fn run_ok(args: &[&str]) -> String {
    let (ok, stdout, stderr) = kiln(args);
    assert!(ok, "kiln {args:?} failed:\n{stdout}\n{stderr}");
    stdout
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn train_losses(run_dir: &Path) -> Vec<(u64, u64)> {
    kiln::track::read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.tag == "train/loss")
        .map(|r| (r.step, r.value.to_bits()))
        .collect()
}

#[test]
fn a_lora_run_trains_only_the_adapter_and_writes_peft_checkpoints() {
    let out = tempfile::tempdir().unwrap();
    let recipe = write_recipe(out.path(), LORA);
    run_ok(&["train", recipe.to_str().unwrap(), "--quiet"]);
    let step = out.path().join("checkpoints/run/step-10");

    // PEFT's directory: config and adapter weights, no model.
    assert!(!step.join("model.safetensors").exists());
    assert!(!step.join("config.json").exists());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(step.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["task_type"], "CAUSAL_LM");
    assert_eq!(config["r"], 4);
    assert_eq!(config["lora_alpha"], 8);
    assert_eq!(config["lora_dropout"], 0.1);
    assert_eq!(config["bias"], "none");
    assert_eq!(config["fan_in_fan_out"], false);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["q_proj", "v_proj", "fc_in"])
    );

    // The tiny preset: 2 layers of width 128, fc_in to 512; A is [r, in], B is [out, r].
    let adapter = tensors(&step.join("adapter_model.safetensors"));
    assert_eq!(adapter.len(), 2 * 3 * 2);
    for layer in 0..2 {
        let key = |module: &str, ab: &str| {
            format!("base_model.model.transformer.h.{layer}.{module}.lora_{ab}.weight")
        };
        for module in ["attn.q_proj", "attn.v_proj"] {
            assert_eq!(adapter[&key(module, "A")].dims(), [4, 128]);
            assert_eq!(adapter[&key(module, "B")].dims(), [128, 4]);
        }
        assert_eq!(adapter[&key("mlp.fc_in", "A")].dims(), [4, 128]);
        assert_eq!(adapter[&key("mlp.fc_in", "B")].dims(), [512, 4]);
        // B starts at zero and has trained.
        let b = adapter[&key("attn.q_proj", "B")].abs().unwrap();
        assert!(b.max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }

    // The optimizer holds moments for the adapter's 12 tensors only.
    let optimizer = tensors(&step.join("optimizer.safetensors"));
    assert!(!optimizer
        .keys()
        .any(|k| k.contains("wte") || k.contains("ln_1")));
    assert_eq!(optimizer.len(), 2 * 12, "{:?}", optimizer.keys());

    // It learns: the last steps' loss is below the first's.
    let losses: Vec<f64> = kiln::track::read_metrics(&out.path().join("runs/run/metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.tag == "train/loss")
        .map(|r| r.value)
        .collect();
    assert_eq!(losses.len(), 10);
    assert!(losses[9] < losses[0] - 0.1, "{losses:?}");
}

#[test]
fn a_killed_lora_run_resumes_to_the_same_adapter_bit_for_bit() {
    let whole = tempfile::tempdir().unwrap();
    let recipe = write_recipe(whole.path(), LORA);
    run_ok(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--threads",
        "2",
    ]);

    let killed = tempfile::tempdir().unwrap();
    let recipe_k = write_recipe(killed.path(), LORA);
    common::train_and_kill_after_step_4(killed.path(), &recipe_k);
    let ckpt = killed.path().join("checkpoints/run");
    assert!(!ckpt.join("step-10").exists(), "killed before the end");

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
    for file in ["adapter_model.safetensors", "optimizer.safetensors"] {
        let a = std::fs::read(whole.path().join("checkpoints/run/step-10").join(file)).unwrap();
        let b = std::fs::read(ckpt.join("step-10").join(file)).unwrap();
        assert!(a == b, "{file} differs from the uninterrupted run's");
    }
    let whole_losses = train_losses(&whole.path().join("runs/run"));
    assert_eq!(whole_losses.len(), 10);
    assert_eq!(train_losses(&killed.path().join("runs/run")), whole_losses);
}

#[test]
fn bad_lora_sections_say_what_is_wrong() {
    let cases = [
        (
            "lora: {r: 4, alpha: 8, target_modules: [q_proj, c_attn]}\n",
            "lora.target_modules: gptj has no layer named \"c_attn\"; the layers LoRA can adapt \
             are: k_proj, v_proj, q_proj, out_proj, fc_in, fc_out",
        ),
        ("lora: {r: 0, alpha: 8}\n", "lora.r: must be at least 1"),
        (
            "lora: {r: 4, alpha: 0}\n",
            "lora.alpha: must be a positive number, found 0",
        ),
        (
            "lora: {r: 4, alpha: 8, dropout: 1.5}\n",
            "lora.dropout: 1.5 is not a probability in [0, 1)",
        ),
        (
            "lora: {r: 4, alpha: 8, bias: all}\n",
            "unknown variant `all`",
        ),
    ];
    for (section, expected) in cases {
        let out = tempfile::tempdir().unwrap();
        let recipe = write_recipe(out.path(), section);
        let (ok, stdout, stderr) = kiln(&["train", recipe.to_str().unwrap(), "--quiet"]);
        assert!(!ok, "{section} was accepted:\n{stdout}");
        assert!(stderr.contains(expected), "{section}: {stderr}");
        assert!(
            !out.path().join("checkpoints").exists(),
            "{section}: failed after writing checkpoints"
        );
    }
}

/// Kiln's adapter path in training (the low-rank product beside the frozen weight) and its
/// merged inference path give the same logits.
#[test]
fn the_trained_adapter_path_equals_the_merged_weights() {
    let out = tempfile::tempdir().unwrap();
    let recipe = recipe_over_base(out.path(), LORA);
    let base = out.path().join("base");
    run_ok(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--set",
        "steps=3",
    ]);
    let adapter = out.path().join("checkpoints/run/step-3");

    let rows = vec![vec![5u32, 17, 300, 42, 9, 77], vec![1, 2, 3, 4, 5, 6]];
    let batch = kiln::model::Batch::right_padded(&rows, 0, &Device::Cpu).unwrap();
    let merged =
        kiln::model::load_model_with_adapter(&base, Some(&adapter), DType::F32, &Device::Cpu)
            .unwrap()
            .forward(&batch, None)
            .unwrap();

    let config = kiln::model::load_config(&base).unwrap();
    let mut named = kiln::model::load_parameters(&base, &config, DType::F32, &Device::Cpu).unwrap();
    let loaded = kiln::model::lora::Adapter::load(&adapter, &Device::Cpu).unwrap();
    kiln::model::lora::attach(&mut named, &loaded.tensors, loaded.spec.scale()).unwrap();
    let unmerged = kiln::model::model_from_parameters(&config, &named, DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&batch, None)
        .unwrap();
    let plain = kiln::model::load_model(&base, DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&batch, None)
        .unwrap();
    let max_diff = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    assert!(
        max_diff(&merged, &unmerged) < 1e-5,
        "{}",
        max_diff(&merged, &unmerged)
    );
    assert!(
        max_diff(&merged, &plain) > 1e-3,
        "the adapter changed nothing"
    );

    // `kiln merge` writes that model as a plain HF directory.
    let merged_dir = out.path().join("merged");
    let said = run_ok(&[
        "merge",
        "--base",
        base.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        merged_dir.to_str().unwrap(),
    ]);
    assert!(said.contains("merged"), "{said}");
    assert!(merged_dir.join("tokenizer.json").is_file());
    let from_disk = kiln::model::load_model(&merged_dir, DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&batch, None)
        .unwrap();
    assert_eq!(max_diff(&from_disk, &merged), 0.0);

    // The verbs take the adapter as the merged directory's model: `kiln score` and `generate`.
    let input = out.path().join("ids.jsonl");
    std::fs::write(
        &input,
        "{\"ids\": [5, 17, 300, 42, 9, 77]}\n{\"ids\": [1, 2, 3, 4, 5, 6]}\n",
    )
    .unwrap();
    let score = |model: &Path, adapter: Option<&Path>, name: &str| {
        let output = out.path().join(name);
        let mut args = vec![
            "score".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--input".into(),
            input.display().to_string(),
            "--output".into(),
            output.display().to_string(),
        ];
        if let Some(adapter) = adapter {
            args.extend(["--adapter".to_string(), adapter.display().to_string()]);
        }
        run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        std::fs::read_to_string(output).unwrap()
    };
    let with_adapter = score(&base, Some(&adapter), "a.jsonl");
    assert_eq!(with_adapter, score(&merged_dir, None, "m.jsonl"));
    assert_ne!(with_adapter, score(&base, None, "b.jsonl"));
    let generate = |model: &Path, adapter: Option<&Path>| {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            model.display().to_string(),
            "--prompt".into(),
            "mnli hypothesis: a premise: b target:".into(),
            "--max-new-tokens".into(),
            "8".into(),
        ];
        if let Some(adapter) = adapter {
            args.extend(["--adapter".to_string(), adapter.display().to_string()]);
        }
        run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let merged_text = generate(&merged_dir, None);
    assert_eq!(generate(&base, Some(&adapter)), merged_text);
    assert_eq!(
        serve_once(&base, &adapter, "mnli hypothesis: a premise: b target:", 8),
        merged_text.trim_end_matches('\n'),
        "kiln serve --adapter answers as the merged model"
    );
}

/// `kiln serve --model BASE --adapter DIR`: one greedy `:predict`, then the server is stopped.
fn serve_once(base: &Path, adapter: &Path, prompt: &str, max_new_tokens: usize) -> String {
    use std::io::{BufRead, Read, Write};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["serve", "--port", "0", "--name", "m", "--model"])
        .arg(base)
        .arg("--adapter")
        .arg(adapter)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().rsplit("http://").next().unwrap().to_string();
    let body = serde_json::json!({"instances": [prompt], "parameters": {"max_new_tokens": max_new_tokens}})
        .to_string();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{raw}");
    let value: serde_json::Value = serde_json::from_str(body).unwrap();
    value["predictions"][0].as_str().unwrap().to_string()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

fn fixture(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

fn id_rows(text: &str) -> Vec<Vec<u32>> {
    text.trim()
        .split(';')
        .map(|row| row.split(',').map(|id| id.parse().unwrap()).collect())
        .collect()
}

/// Adapters PEFT made (committed fixtures, `scripts/make_lora_fixtures.sh`): Kiln gives PEFT's
/// logits both ways it applies them (merged at load; the training path's low-rank product), and
/// PEFT's gradients of `lora_A` / `lora_B` for HF's causal-LM loss.
#[test]
fn kiln_applies_peft_adapters_to_peft_logits_and_gradients() {
    for (family, base) in [
        ("gptj", "rot8"),
        ("gpt2", "gpt2"),
        ("neo", "neo"),
        ("neox", "neox"),
    ] {
        let dir = fixture(&format!("lora/{family}"));
        let base = fixture(&format!("parity/{base}"));
        let adapter_dir = dir.join("adapter");
        let rows = id_rows(&std::fs::read_to_string(dir.join("ids.txt")).unwrap());
        let batch = kiln::model::Batch::right_padded(&rows, 0, &Device::Cpu).unwrap();
        let expected = &tensors(&dir.join("logits.safetensors"))["logits"];

        let merged = kiln::model::load_model_with_adapter(
            &base,
            Some(&adapter_dir),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
        .forward(&batch, None)
        .unwrap();
        let plain = kiln::model::load_model(&base, DType::F32, &Device::Cpu)
            .unwrap()
            .forward(&batch, None)
            .unwrap();
        assert!(
            max_diff(&plain, expected) > 1e-2,
            "{family}: the adapter changes nothing"
        );
        assert!(
            max_diff(&merged, expected) < 1e-4,
            "{family}: merged {}",
            max_diff(&merged, expected)
        );

        // The training path, differentiated with respect to A and B.
        let config = kiln::model::load_config(&base).unwrap();
        let adapter = kiln::model::lora::Adapter::load(&adapter_dir, &Device::Cpu).unwrap();
        assert_eq!(adapter.spec.scale(), 1.5);
        let vars: Vec<(String, candle_core::Var)> = adapter
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), candle_core::Var::from_tensor(t).unwrap()))
            .collect();
        let mut named =
            kiln::model::load_parameters(&base, &config, DType::F32, &Device::Cpu).unwrap();
        let trained: Vec<(String, Tensor)> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        kiln::model::lora::attach(&mut named, &trained, adapter.spec.scale()).unwrap();
        let model =
            kiln::model::model_from_parameters(&config, &named, DType::F32, &Device::Cpu).unwrap();
        let logits = model.forward(&batch, None).unwrap();
        assert!(
            max_diff(&logits, expected) < 1e-4,
            "{family}: unmerged {}",
            max_diff(&logits, expected)
        );

        let labels = kiln::model::shifted_labels(&rows, rows[0].len());
        let targets = labels.iter().filter(|&&l| l >= 0).count();
        let grads = model
            .loss_and_grads(&batch, &labels, 1.0 / targets as f64)
            .unwrap()
            .unwrap();
        let peft = tensors(&dir.join("grads.safetensors"));
        let peft_loss = peft["loss"].to_vec1::<f32>().unwrap()[0] as f64;
        let loss = grads.nll_sum / targets as f64;
        assert!(
            (loss - peft_loss).abs() < 1e-5,
            "{family}: loss {loss} vs PEFT's {peft_loss}"
        );
        assert_eq!(peft.len() - 1, vars.len(), "{family}");
        for (name, var) in &vars {
            let ours = grads.get(name, var.as_tensor()).unwrap().unwrap();
            let theirs = &peft[&format!("base_model.model.{name}")];
            let scale = max_abs(theirs).max(1e-6);
            let err = max_diff(&ours, theirs) / scale;
            assert!(
                err < 1e-4,
                "{family}: {name} gradient differs by {err} (relative)"
            );
        }
    }
}

/// Adapters Kiln trains load in PEFT (`PeftModel.from_pretrained`) and give Kiln's logits: a
/// GPT-J and a GPT-2 (whose `Conv1D` layers PEFT adapts with `fan_in_fan_out`).
#[test]
fn peft_loads_kiln_adapters_to_kiln_logits() {
    let Some(python) = common::python_with("peft") else {
        return;
    };
    for (preset, lora) in [
        (
            "tiny",
            "lora: {r: 4, alpha: 12, target_modules: [q_proj, v_proj, fc_out]}\n",
        ),
        (
            "gpt2-tiny",
            "lora: {r: 2, alpha: 4, target_modules: [c_attn, c_fc]}\n",
        ),
    ] {
        let out = tempfile::tempdir().unwrap();
        let base = out.path().join("base");
        run_ok(&[
            "init",
            "--preset",
            preset,
            "--out",
            base.to_str().unwrap(),
            "--seed",
            "4",
            "--tokenizer",
            &common::bundled("tokenizer"),
        ]);
        let recipe = recipe_over_base(out.path(), lora);
        run_ok(&[
            "train",
            recipe.to_str().unwrap(),
            "--quiet",
            "--set",
            "steps=3",
        ]);
        let adapter = out.path().join("checkpoints/run/step-3");

        let ids = "5,17,300,42,9,77,1000,3;8,1,2,3,4,5,6,7";
        let peft_logits = out.path().join("peft.safetensors");
        let output = Command::new(&python)
            .args([
                concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_peft.py"),
                "logits",
                "--base",
                base.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--ids",
                ids,
                "--out",
                peft_logits.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{preset}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let rows = id_rows(ids);
        let batch = kiln::model::Batch::right_padded(&rows, 0, &Device::Cpu).unwrap();
        let ours =
            kiln::model::load_model_with_adapter(&base, Some(&adapter), DType::F32, &Device::Cpu)
                .unwrap()
                .forward(&batch, None)
                .unwrap();
        let plain = kiln::model::load_model(&base, DType::F32, &Device::Cpu)
            .unwrap()
            .forward(&batch, None)
            .unwrap();
        let theirs = &tensors(&peft_logits)["logits"];
        assert!(
            max_diff(&plain, theirs) > 1e-3,
            "{preset}: the adapter changes nothing"
        );
        assert!(
            max_diff(&ours, theirs) < 1e-4,
            "{preset}: {}",
            max_diff(&ours, theirs)
        );
    }
}

#[test]
fn adapters_that_do_not_fit_the_base_are_refused_naming_the_tensor() {
    let out = tempfile::tempdir().unwrap();
    let adapter = fixture("lora/gptj/adapter");
    // Another architecture: a GPT-J adapter onto GPT-2.
    let (ok, _, err) = kiln(&[
        "merge",
        "--base",
        fixture("parity/gpt2").to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.path().join("m").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains(
            "adapter tensor base_model.model.transformer.h.0.attn.q_proj.lora_A.weight: \
                      the base model (gpt2, 2 layers) has no layer transformer.h.0.attn.q_proj"
        ),
        "{err}"
    );
    assert!(!out.path().join("m/config.json").exists());
    // Same architecture, another width.
    let (ok, _, err) = kiln(&[
        "generate",
        "--model",
        fixture("parity/full12").to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(!ok);
    assert!(err.contains("lora_A.weight has shape [4, 64]"), "{err}");
}

/// A frozen base held in bf16 (what a bf16 LoRA run keeps, with no fp32 copy) computes exactly
/// what the same rounded weights held in fp32 do: the CPU widens each matrix as it uses it, and
/// autocast's bf16 operands round nothing further.
#[test]
fn a_frozen_bf16_base_computes_what_its_fp32_copy_does() {
    let base = fixture("parity/rot8");
    let dir = fixture("lora/gptj");
    let config = kiln::model::load_config(&base).unwrap();
    let full = kiln::model::load_parameters(&base, &config, DType::F32, &Device::Cpu).unwrap();
    let adapter = kiln::model::lora::Adapter::load(&dir.join("adapter"), &Device::Cpu).unwrap();
    let rows = id_rows(&std::fs::read_to_string(dir.join("ids.txt")).unwrap());
    let batch = kiln::model::Batch::right_padded(&rows, 0, &Device::Cpu).unwrap();
    let labels = kiln::model::shifted_labels(&rows, rows[0].len());

    let run = |half: bool| {
        let mut named: HashMap<String, Tensor> = full
            .iter()
            .map(|(name, t)| {
                let t = match t.rank() {
                    2 => t.to_dtype(DType::BF16).unwrap(),
                    _ => t.clone(),
                };
                let t = if half {
                    t
                } else {
                    t.to_dtype(DType::F32).unwrap()
                };
                (name.clone(), t)
            })
            .collect();
        let vars: Vec<(String, candle_core::Var)> = adapter
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), candle_core::Var::from_tensor(t).unwrap()))
            .collect();
        let trained: Vec<(String, Tensor)> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        kiln::model::lora::attach(&mut named, &trained, adapter.spec.scale()).unwrap();
        let model =
            kiln::model::model_from_parameters(&config, &named, DType::BF16, &Device::Cpu).unwrap();
        let logits = model.forward(&batch, None).unwrap();
        let loss = model.loss_and_grads(&batch, &labels, 0.1).unwrap().unwrap();
        let grads: Vec<Tensor> = vars
            .iter()
            .map(|(n, v)| loss.get(n, v.as_tensor()).unwrap().unwrap())
            .collect();
        (logits, loss.nll_sum, grads)
    };
    // The half path is the one taken: the backend hands frozen bf16 matrices out as they are.
    let name = "transformer.h.0.attn.q_proj.weight";
    let stored = HashMap::from([(name.to_string(), full[name].to_dtype(DType::BF16).unwrap())]);
    let backend = kiln::model::weights::TensorsBackend(stored);
    let vb = candle_nn::VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    assert_eq!(vb.get((64, 64), name).unwrap().dtype(), DType::BF16);

    let (half_logits, half_nll, half_grads) = run(true);
    let (wide_logits, wide_nll, wide_grads) = run(false);
    assert_eq!(max_diff(&half_logits, &wide_logits), 0.0);
    assert_eq!(half_nll, wide_nll);
    for (a, b) in half_grads.iter().zip(&wide_grads) {
        assert_eq!(max_diff(a, b), 0.0);
        assert!(max_abs(a) > 0.0);
    }
}

/// A recipe over the model in `out/base` (`model.from`; a `kiln init` tiny one unless the caller
/// made another), with `extra` keys.
fn recipe_over_base(out: &Path, extra: &str) -> std::path::PathBuf {
    let base = out.join("base");
    if !base.exists() {
        common::init_tiny(&base, 5, Path::new(&common::bundled("tokenizer")));
    }
    let recipe = write_recipe(
        out,
        &format!("{extra}model: {{from: {}}}\n", base.display()),
    );
    let text = std::fs::read_to_string(&recipe).unwrap().replacen(
        "model: {init: {preset: tiny, seed: 1, vocab_size: 1024}}\n",
        "",
        1,
    );
    std::fs::write(&recipe, text).unwrap();
    recipe
}

#[test]
fn partial_fine_tuning_trains_only_what_the_patterns_match() {
    let out = tempfile::tempdir().unwrap();
    let recipe = recipe_over_base(
        out.path(),
        "train: {trainable: [transformer.h.1, \"transformer.ln_*\"]}\n",
    );
    run_ok(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--set",
        "steps=3",
    ]);
    let base = tensors(&out.path().join("base/model.safetensors"));
    let step = out.path().join("checkpoints/run/step-3");
    let trained = tensors(&step.join("model.safetensors"));
    assert_eq!(base.len(), trained.len());
    let mut changed = Vec::new();
    for (name, before) in &base {
        if max_diff(before, &trained[name]) > 0.0 {
            changed.push(name.clone());
        }
    }
    changed.sort();
    let expected: Vec<&String> = base
        .keys()
        .filter(|n| n.starts_with("transformer.h.1.") || n.starts_with("transformer.ln_f."))
        .collect();
    assert_eq!(changed.len(), expected.len(), "{changed:?}");
    assert!(changed.iter().all(|n| expected.contains(&n)), "{changed:?}");
    // AdamW keeps moments for the trained parameters only.
    let optimizer = tensors(&step.join("optimizer.safetensors"));
    assert_eq!(
        optimizer.len(),
        2 * expected.len(),
        "{:?}",
        optimizer.keys()
    );

    let (ok, _, err) = kiln(&[
        "train",
        recipe.to_str().unwrap(),
        "--quiet",
        "--set",
        "train.trainable=[transformer.h.9]",
    ]);
    assert!(!ok);
    assert!(
        err.contains(
            "train.trainable: \"transformer.h.9\" matches no parameter of this gptj model"
        ),
        "{err}"
    );
}

/// `kiln train` prints the memory estimate and records it in run.json beside the peak it measured
/// (the tiny preset: full fine-tune and LoRA), and `kiln recipe check` prints it, naming a bad
/// LoRA target there already. How close the two come is a target, measured by
/// `cargo bench --bench memory_estimate`.
#[test]
fn the_memory_estimate_is_printed_and_recorded_beside_the_measured_peak() {
    let mut estimates = Vec::new();
    for (name, extra) in [("full", ""), ("lora", LORA)] {
        let out = tempfile::tempdir().unwrap();
        let recipe = write_recipe(out.path(), extra);
        let said = run_ok(&[
            "train",
            recipe.to_str().unwrap(),
            "--quiet",
            "--set",
            "steps=3",
        ]);
        assert!(said.contains("memory estimate ("), "{said}");
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.path().join("runs/run/run.json")).unwrap())
                .unwrap();
        let memory = &info["memory"];
        let estimate = memory["estimate"]["total"].as_f64().unwrap();
        let peak = memory["peak_rss_bytes"].as_f64().unwrap();
        // Any live process of a model this size is between a few MiB and a few GiB: a field
        // left at zero or written in the wrong unit falls outside.
        for (field, bytes) in [("estimate.total", estimate), ("peak_rss_bytes", peak)] {
            assert!(
                (4.0 * (1 << 20) as f64..4.0 * (1u64 << 30) as f64).contains(&bytes),
                "{name}: memory.{field} = {bytes}"
            );
        }
        estimates.push(estimate);

        let checked = run_ok(&["recipe", "check", recipe.to_str().unwrap()]);
        assert!(checked.contains("memory_estimate:"), "{checked}");
        assert!(checked.contains("# memory estimate ("), "{checked}");
    }
    // LoRA keeps no gradients or AdamW moments for the frozen base.
    assert!(
        estimates[1] < estimates[0],
        "LoRA {} vs full {} bytes",
        estimates[1],
        estimates[0]
    );
    let out = tempfile::tempdir().unwrap();
    let recipe = write_recipe(
        out.path(),
        "lora: {r: 4, alpha: 8, target_modules: [c_fc]}\n",
    );
    let (ok, _, err) = kiln(&["recipe", "check", recipe.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("gptj has no layer named \"c_fc\""), "{err}");
}

fn step_numbers(run_dir: &Path, tag: &str) -> Vec<f64> {
    kiln::track::read_metrics(&run_dir.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.tag == tag)
        .map(|r| r.value)
        .collect()
}

/// Activation checkpointing recomputes each block in the backward: the same losses, gradient
/// norms and weights, bit for bit, as keeping every activation (dropout on, so its masks must
/// replay) — for a full fine-tune and for LoRA.
#[test]
fn activation_checkpointing_trains_as_keeping_the_activations_does() {
    for (name, extra) in [
        ("full", "model: {init: {preset: tiny, seed: 1, vocab_size: 1024}, dropout: {resid: 0.1, attn: 0.1}}\n"),
        ("lora", LORA),
    ] {
        let mut results = Vec::new();
        for checkpointing in [false, true] {
            let out = tempfile::tempdir().unwrap();
            let mut extra = format!("memory: {{activation_checkpointing: {checkpointing}}}\n{extra}");
            if name == "full" {
                extra = extra.replace("model: {init", "model_override: {init");
            }
            let recipe = write_recipe(out.path(), &extra);
            if name == "full" {
                let text = std::fs::read_to_string(&recipe)
                    .unwrap()
                    .replacen("model: {init: {preset: tiny, seed: 1, vocab_size: 1024}}\n", "", 1)
                    .replace("model_override:", "model:");
                std::fs::write(&recipe, text).unwrap();
            }
            run_ok(&["train", recipe.to_str().unwrap(), "--quiet", "--set", "steps=4"]);
            let run = out.path().join("runs/run");
            let weights_file = if name == "full" {
                "model.safetensors"
            } else {
                "adapter_model.safetensors"
            };
            results.push((
                step_numbers(&run, "train/loss"),
                step_numbers(&run, "train/grad_norm"),
                tensors(&out.path().join("checkpoints/run/step-4").join(weights_file)),
            ));
        }
        let (plain, checkpointed) = (&results[0], &results[1]);
        assert_eq!(plain.0.len(), 4);
        assert_eq!(plain.0, checkpointed.0, "{name}: losses");
        assert_eq!(plain.1, checkpointed.1, "{name}: gradient norms");
        for (tensor, before) in &plain.2 {
            let after = &checkpointed.2[tensor];
            assert_eq!(max_diff(before, after), 0.0, "{name}: {tensor}");
        }
    }
}

/// The checkpointed backward is the one a model told to checkpoint takes: it keeps exactly the
/// gradients of the tensors it was given, each equal to the plain backward's.
#[test]
fn a_checkpointing_model_keeps_the_gradients_it_was_asked_for() {
    let base = fixture("parity/rot8");
    let config = kiln::model::load_config(&base).unwrap();
    let vars: Vec<(String, candle_core::Var)> =
        kiln::model::load_parameters(&base, &config, DType::F32, &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, candle_core::Var::from_tensor(&t).unwrap()))
            .collect();
    let named = kiln::model::parameter_tensors(&vars);
    let rows = id_rows("3,17,42,99,5,8,60,1;7,7,2,50,31,12,90,4");
    let batch = kiln::model::Batch::right_padded(&rows, 0, &Device::Cpu).unwrap();
    let labels = kiln::model::shifted_labels(&rows, 8);
    let plain = kiln::model::model_from_parameters(&config, &named, DType::F32, &Device::Cpu)
        .unwrap()
        .loss_and_grads(&batch, &labels, 0.5)
        .unwrap()
        .unwrap();
    let left_out = "transformer.h.0.attn.q_proj.weight";
    let mut model =
        kiln::model::model_from_parameters(&config, &named, DType::F32, &Device::Cpu).unwrap();
    model.checkpoint_activations(
        vars.iter()
            .filter(|(n, _)| n != left_out)
            .map(|(_, v)| v.id())
            .collect(),
    );
    let checkpointed = model.loss_and_grads(&batch, &labels, 0.5).unwrap().unwrap();
    assert_eq!(plain.nll_sum, checkpointed.nll_sum);
    for (name, var) in &vars {
        let ours = checkpointed.get(name, var.as_tensor()).unwrap();
        if name == left_out {
            assert!(ours.is_none(), "{name} was not asked for");
            continue;
        }
        let theirs = plain.get(name, var.as_tensor()).unwrap().unwrap();
        assert_eq!(max_diff(&ours.unwrap(), &theirs), 0.0, "{name}");
    }
}
