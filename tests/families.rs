//! GPT-2, GPT-Neo and GPT-NeoX (Pythia) beside GPT-J: their HF directories in and out, greedy generation
//! against transformers, and every CLI verb on a model of each family trained by Kiln. (Logits,
//! loss and gradients of every family are in `tests/parity.rs`.)

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use common::*;
use kiln::generate::{generate, GenerationParams};
use kiln::model::{self, WeightStore};

/// The HF-written fixtures of the families beside GPT-J.
const FAMILY_FIXTURES: &[&str] = &["gpt2", "gpt2_odd", "neo", "neo_odd", "neox", "neox_odd"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn kiln_names_exactly_the_tensors_save_pretrained_writes() {
    for name in FAMILY_FIXTURES.iter().chain(&["rot8"]) {
        let dir = fixtures().join("parity").join(name);
        let config = model::load_config(&dir).unwrap();
        let store = WeightStore::open(&dir).unwrap();
        let saved: BTreeSet<(String, Vec<usize>)> = store
            .names()
            .map(|n| (n.to_string(), store.shape(n).unwrap().to_vec()))
            .collect();
        let ours: BTreeSet<(String, Vec<usize>)> =
            model::parameter_shapes(&config).into_iter().collect();
        // Equal sets: from_pretrained finds every tensor Kiln writes and nothing it lacks.
        assert_eq!(saved, ours, "{name}");
    }
}

#[test]
fn every_family_round_trips_bit_identically_with_its_config() {
    for name in FAMILY_FIXTURES {
        let dir = fixtures().join("parity").join(name);
        let config = model::load_config(&dir).unwrap();
        let params = model::load_parameters(&dir, &config, DType::F32, &Device::Cpu).unwrap();
        let out = tempfile::tempdir().unwrap();
        model::save_model(out.path(), &config, &params, DType::F32, 60_000).unwrap();
        let written = model::load_config(out.path()).unwrap();
        assert_eq!(
            written, config,
            "{name}: config.json changed in the round trip"
        );
        let original: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let rewritten: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap())
                .unwrap();
        for (key, value) in original.as_object().unwrap() {
            assert_eq!(
                &rewritten[key], value,
                "{name}: config key {key} lost or changed"
            );
        }
        let reloaded =
            model::load_parameters(out.path(), &config, DType::F32, &Device::Cpu).unwrap();
        for (tensor, value) in &params {
            let diff = max_abs_diff(value, &reloaded[tensor]);
            assert_eq!(diff, 0.0, "{name}: {tensor} changed in the round trip");
        }
    }
}

#[test]
fn base_model_checkpoints_without_the_prefix_load() {
    // OpenAI's `gpt2` repository stores `h.0.attn...` (GPT2Model's names), not
    // `transformer.h.0.attn...`; HF loads it into GPT2LMHeadModel and so does Kiln.
    let dir = fixtures().join("parity").join("gpt2");
    let config = model::load_config(&dir).unwrap();
    let params = model::load_parameters(&dir, &config, DType::F32, &Device::Cpu).unwrap();
    let bare: std::collections::HashMap<String, candle_core::Tensor> = params
        .iter()
        .map(|(k, v)| (k.trim_start_matches("transformer.").to_string(), v.clone()))
        .collect();
    let out = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&bare, out.path().join("model.safetensors")).unwrap();
    std::fs::copy(dir.join("config.json"), out.path().join("config.json")).unwrap();
    let from_bare = model::load_model(out.path(), DType::F32, &Device::Cpu).unwrap();
    let from_full = model::load_model(&dir, DType::F32, &Device::Cpu).unwrap();
    let batch = model::Batch::right_padded(&[vec![1, 2, 3, 4]], 0, &Device::Cpu).unwrap();
    let diff = max_abs_diff(
        &from_bare.forward(&batch, None).unwrap(),
        &from_full.forward(&batch, None).unwrap(),
    );
    assert_eq!(diff, 0.0);
}

#[test]
fn unimplemented_model_types_name_the_implemented_ones() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        r#"{"model_type": "bloom", "hidden_size": 64}"#,
    )
    .unwrap();
    let err = format!("{:#}", model::load_config(tmp.path()).unwrap_err());
    assert!(
        err.contains("config.json")
            && err.contains("bloom")
            && err.contains("gptj, gpt2, gpt_neo, gpt_neox"),
        "{err}"
    );
}

#[test]
fn greedy_generation_matches_transformers_for_every_family() {
    for name in FAMILY_FIXTURES {
        let dir = fixtures().join("parity").join(name);
        let model = model::load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("greedy.json")).unwrap())
                .unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect()
        };
        let params = GenerationParams {
            max_new_tokens: doc["max_new_tokens"].as_u64().unwrap() as usize,
            ..Default::default()
        };
        let cases = doc["cases"].as_array().unwrap();
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
        for (case, prompt) in cases.iter().zip(&prompts) {
            let out = generate(
                &model,
                None,
                std::slice::from_ref(prompt),
                &params,
                &mut |_, _| {},
            )
            .unwrap();
            assert_eq!(
                out[0].ids,
                ids(&case["output_ids"]),
                "{name}: prompt {prompt:?}"
            );
        }
        // Batched (prompts of different lengths, padded, with a KV cache) gives the same tokens.
        let batched = generate(&model, None, &prompts, &params, &mut |_, _| {}).unwrap();
        for (case, out) in cases.iter().zip(&batched) {
            assert_eq!(out.ids, ids(&case["output_ids"]), "{name}: batched");
        }
    }
}

/// Trains `preset` for a few steps on the bundled NLI data (the quickstart recipe) and returns
/// the final checkpoint.
fn train_preset(preset: &str, out: &Path) -> PathBuf {
    let recipe = repo().join("recipes/quickstart.yaml");
    let sets = [
        format!("name={preset}"),
        format!("model.init.preset={preset}"),
        "steps=6".to_string(),
        "schedule.warmup=2".to_string(),
        "eval.every=0".to_string(),
        "eval.batch_size=16".to_string(),
        format!("checkpoint.dir={}", out.join("checkpoints").display()),
        format!("tracking.log_dir={}", out.join("runs").display()),
    ];
    let mut args = vec!["train", recipe.to_str().unwrap(), "--quiet"];
    for set in &sets {
        args.extend(["--set", set]);
    }
    let (ok, stdout, stderr) = kiln(&args);
    assert!(ok, "{preset}: train failed\n{stdout}\n{stderr}");
    let checkpoint = out.join("checkpoints").join(preset).join("step-6");
    assert!(checkpoint.join("config.json").is_file(), "{stdout}");
    checkpoint
}

#[test]
fn every_verb_works_on_every_family() {
    for (preset, model_type) in [
        ("gpt2-tiny", "gpt2"),
        ("neo-tiny", "gpt_neo"),
        ("neox-tiny", "gpt_neox"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let checkpoint = train_preset(preset, tmp.path());
        let config = model::load_config(&checkpoint).unwrap();
        assert_eq!(config.model_type(), model_type);

        let (ok, stdout, stderr) = kiln(&[
            "generate",
            "--model",
            checkpoint.to_str().unwrap(),
            "--prompt",
            "mnli hypothesis: a cat sleeps premise: a cat is sleeping target:",
            "--max-new-tokens",
            "4",
        ]);
        assert!(ok, "{preset}: generate failed\n{stderr}");
        assert!(
            !stdout.trim().is_empty(),
            "{preset}: generate printed nothing"
        );

        let input = tmp.path().join("score.jsonl");
        std::fs::write(&input, "{\"text\": \"a cat is sleeping\"}\n").unwrap();
        let output = tmp.path().join("scores.jsonl");
        let (ok, _, stderr) = kiln(&[
            "score",
            "--model",
            checkpoint.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        assert!(ok, "{preset}: score failed\n{stderr}");
        let scored: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(&output).unwrap().trim()).unwrap();
        assert!(scored["total"].as_f64().unwrap() < 0.0, "{scored}");

        let report = tmp.path().join("report");
        let (ok, _, stderr) = kiln(&[
            "eval",
            "--model",
            checkpoint.to_str().unwrap(),
            "--data",
            repo()
                .join("datasets/nli/validation.jsonl")
                .to_str()
                .unwrap(),
            "--limit",
            "8",
            "--report",
            report.to_str().unwrap(),
        ]);
        assert!(ok, "{preset}: eval failed\n{stderr}");
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap())
                .unwrap();
        assert_eq!(report["n"].as_u64(), Some(8), "{report}");
    }
}

#[test]
fn prefix_lm_data_training_and_checkpoints() {
    let recipe_path = repo().join("recipes/quickstart-prefix.yaml");
    let dir = recipe_path.parent().unwrap();
    // The data: each example's prompt is its prefix (what `loss_on: target` leaves untrained);
    // packed, each example is its own segment.
    for mode in ["pad", "pack"] {
        let recipe = kiln::recipe::load(&recipe_path, &[format!("data.mode={mode}")]).unwrap();
        let tokenizer =
            kiln::tokenizer::TextTokenizer::from_dir(&dir.join("../datasets/nli/tokenizer"))
                .unwrap();
        let prepared =
            kiln::data::prepare(&recipe, dir, &tokenizer, kiln::data::Split::Train).unwrap();
        let row = &prepared.sequences[0];
        assert!(row.is_prefix_lm(), "{mode}");
        let untrained: Vec<bool> = row.loss_mask.iter().map(|t| !t).collect();
        if mode == "pad" {
            assert_eq!(row.prefix, untrained);
            assert!(row.segment.iter().all(|&s| s == 0));
        } else {
            let segments: BTreeSet<u32> = row.segment.iter().copied().collect();
            assert!(segments.len() > 1, "a packed row holds several examples");
            // The first token of a row can continue an example cut by the previous row.
            assert_eq!(row.prefix[1..], untrained[1..]);
        }
    }

    let tmp = tempfile::tempdir().unwrap();
    let checkpoints = tmp.path().join("checkpoints");
    let runs = tmp.path().join("runs");
    let sets = [
        "steps=4".to_string(),
        "schedule.warmup=1".to_string(),
        "eval.every=0".to_string(),
        format!("checkpoint.dir={}", checkpoints.display()),
        format!("tracking.log_dir={}", runs.display()),
    ];
    let mut args = vec!["train", recipe_path.to_str().unwrap(), "--quiet"];
    for set in &sets {
        args.extend(["--set", set]);
    }
    let (ok, stdout, stderr) = kiln(&args);
    assert!(ok, "{stdout}\n{stderr}");
    let checkpoint = checkpoints.join("quickstart-prefix/step-4");
    let config = model::load_config(&checkpoint).unwrap();
    assert!(config.prefix_lm(), "the checkpoint records the prefix LM");
    let (ok, _, stderr) = kiln(&[
        "generate",
        "--model",
        checkpoint.to_str().unwrap(),
        "--prompt",
        "mnli hypothesis: a cat sleeps premise: a cat is sleeping target:",
        "--max-new-tokens",
        "3",
    ]);
    assert!(ok, "{stderr}");
}

#[test]
fn pytorch_model_bin_directories_load_to_the_same_numbers() {
    // `torch.save(model.state_dict())`: GPT-2's tied head under both names, NeoX's head under
    // transformers 5's in-memory name (`lm_head.weight`, saved as `embed_out.weight`).
    for name in ["gpt2", "neox"] {
        let safetensors = fixtures().join("parity").join(name);
        let bin = fixtures()
            .join("parity")
            .join(format!("{name}_pytorch_bin"));
        assert!(bin.join("pytorch_model.bin").is_file());
        let batch =
            model::Batch::right_padded(&[vec![3, 1, 4, 1, 5, 9, 2, 6]], 0, &Device::Cpu).unwrap();
        let logits = |dir: &Path| {
            model::load_model(dir, DType::F32, &Device::Cpu)
                .unwrap()
                .forward(&batch, None)
                .unwrap()
        };
        assert_eq!(
            max_abs_diff(&logits(&safetensors), &logits(&bin)),
            0.0,
            "{name}"
        );
    }
}

#[test]
fn gpt2_trains_with_its_dropout_and_a_resume_replays_the_masks() {
    let recipe = repo().join("recipes/quickstart.yaml");
    let tmp = tempfile::tempdir().unwrap();
    let train = |name: &str, extra: &[&str]| {
        let mut sets = vec![
            format!("name={name}"),
            "model.init.preset=gpt2-tiny".to_string(),
            "steps=4".to_string(),
            "schedule.warmup=1".to_string(),
            "eval.every=0".to_string(),
            "checkpoint.every=2".to_string(),
            "checkpoint.keep_last=4".to_string(),
            format!(
                "checkpoint.dir={}",
                tmp.path().join("checkpoints").display()
            ),
            format!("tracking.log_dir={}", tmp.path().join("runs").display()),
        ];
        sets.extend(extra.iter().map(|s| s.to_string()));
        let mut args = vec![
            "train".to_string(),
            recipe.display().to_string(),
            "--quiet".into(),
        ];
        for set in &sets {
            args.extend(["--set".to_string(), set.clone()]);
        }
        args
    };
    let run = |args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, stdout, stderr) = kiln(&args);
        assert!(ok, "{stdout}\n{stderr}");
    };
    let saved = |name: &str, step: u32, file: &str| {
        std::fs::read(
            tmp.path()
                .join(format!("checkpoints/{name}/step-{step}/{file}")),
        )
        .unwrap()
    };
    let weights = |name: &str, step: u32| saved(name, step, "model.safetensors");

    // GPT-2's config means dropout 0.1 everywhere (HF's default); the recipe can turn it off.
    let with_dropout = train("dropout", &[]);
    run(&with_dropout);
    let straight = weights("dropout", 4);
    let straight_moments = saved("dropout", 4, "optimizer.safetensors");
    run(&train(
        "no-dropout",
        &["model.dropout={resid: 0, embd: 0, attn: 0}"],
    ));
    assert_ne!(
        straight,
        weights("no-dropout", 4),
        "dropout changed the updates"
    );

    // Resuming from step 2 draws step 3's and 4's masks again: the same weights, bit for bit.
    let step2 = tmp.path().join("checkpoints/dropout/step-2");
    let mut resume = with_dropout.clone();
    resume.extend(["--resume".to_string(), step2.display().to_string()]);
    run(&resume);
    assert!(
        straight == weights("dropout", 4),
        "the resumed run diverged"
    );
    assert!(
        straight_moments == saved("dropout", 4, "optimizer.safetensors"),
        "the resumed run's AdamW moments differ from the uninterrupted run's"
    );
}

/// Loads `dir` with transformers' `AutoModelForCausalLM`, refusing any missing, unexpected or
/// mismatched tensor, and writes its fp32 logits for `ids` to `out` (safetensors).
const HF_LOAD: &str = r#"
import sys, json, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM
model, info = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], output_loading_info=True, attn_implementation="eager", dtype=torch.float32
)
bad = {k: v for k, v in info.items() if v}
assert not bad, f"loading info: {bad}"
ids = torch.tensor([json.loads(sys.argv[3])])
with torch.no_grad():
    logits = model.eval()(input_ids=ids).logits[0]
save_file({"logits": logits.contiguous()}, sys.argv[2])
print(type(model).__name__)
"#;

#[test]
fn transformers_loads_what_kiln_writes_for_every_family() {
    let Some(python) = python_with("transformers") else {
        return;
    };
    let ids = [5u32, 17, 42, 8, 99, 23, 7, 300];
    for (preset, class) in [
        ("tiny", "GPTJForCausalLM"),
        ("gpt2-tiny", "GPT2LMHeadModel"),
        ("neo-tiny", "GPTNeoForCausalLM"),
        ("neox-tiny", "GPTNeoXForCausalLM"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("model");
        let (ok, _, stderr) = kiln(&[
            "init",
            "--preset",
            preset,
            "--out",
            dir.to_str().unwrap(),
            "--seed",
            "3",
            "--vocab-size",
            "512",
            // Sharded, so the index is read too.
            "--max-shard-bytes",
            "400000",
        ]);
        assert!(ok, "{preset}: {stderr}");
        let out = tmp.path().join("hf_logits.safetensors");
        let output = std::process::Command::new(&python)
            .args(["-c", HF_LOAD, dir.to_str().unwrap(), out.to_str().unwrap()])
            .arg(serde_json::to_string(&ids).unwrap())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{preset}: transformers could not load Kiln's directory:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(stdout.trim(), class, "{preset}");
        let theirs = &load_tensors(&out)["logits"];
        let model = model::load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        let batch = model::Batch::right_padded(&[ids.to_vec()], 0, &Device::Cpu).unwrap();
        let ours = model.forward(&batch, None).unwrap().get(0).unwrap();
        let diff = max_abs_diff(&ours, theirs);
        assert!(
            diff <= 1e-4,
            "{preset}: logits differ from transformers' by {diff}"
        );
    }
}

#[test]
fn buffers_and_tied_copies_that_old_checkpoints_carry_are_ignored() {
    // Older GPT-2/GPT-Neo checkpoints store the causal-mask buffers (`attn.bias`,
    // `attn.masked_bias`) and the tied head a second time (`lm_head.weight`).
    let dir = fixtures().join("parity").join("gpt2");
    let config = model::load_config(&dir).unwrap();
    let mut tensors = model::load_parameters(&dir, &config, DType::F32, &Device::Cpu).unwrap();
    let n = config.max_positions();
    for layer in 0..config.n_layer() {
        let mask = candle_core::Tensor::ones((1, 1, n, n), DType::U8, &Device::Cpu).unwrap();
        tensors.insert(format!("transformer.h.{layer}.attn.bias"), mask);
        let masked = candle_core::Tensor::new(&[-1e4f32], &Device::Cpu).unwrap();
        tensors.insert(format!("transformer.h.{layer}.attn.masked_bias"), masked);
    }
    tensors.insert(
        "lm_head.weight".into(),
        tensors["transformer.wte.weight"].clone(),
    );
    let tmp = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&tensors, tmp.path().join("model.safetensors")).unwrap();
    std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
    let batch = model::Batch::right_padded(&[vec![1, 2, 3, 4, 5]], 0, &Device::Cpu).unwrap();
    let logits = |d: &Path| {
        model::load_model(d, DType::F32, &Device::Cpu)
            .unwrap()
            .forward(&batch, None)
            .unwrap()
    };
    assert_eq!(max_abs_diff(&logits(tmp.path()), &logits(&dir)), 0.0);
}

#[test]
fn bad_family_configs_name_the_field() {
    let cases = [
        (
            "neox",
            "num_attention_heads",
            serde_json::json!(7),
            "hidden_size (64) is not divisible by num_attention_heads (7)",
        ),
        (
            "neo",
            "attention_types",
            serde_json::json!([[["global", "local"], 2]]),
            "attention_types expands to 4 layers, but num_layers is 2",
        ),
        (
            "neo",
            "attention_types",
            serde_json::json!([[["sparse"], 2]]),
            "attention_types names \"sparse\"",
        ),
        (
            "gpt2",
            "n_layer",
            serde_json::json!(0),
            "n_layer must be positive",
        ),
        (
            "gpt2",
            "tie_word_embeddings",
            serde_json::json!(false),
            "tie_word_embeddings is false",
        ),
        (
            "neox",
            "hidden_act",
            serde_json::json!("relu"),
            "hidden_act is \"relu\"",
        ),
    ];
    for (fixture, key, value, expected) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = fixtures().join("parity").join(fixture);
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        json[key] = value;
        std::fs::write(tmp.path().join("config.json"), json.to_string()).unwrap();
        let err = format!("{:#}", model::load_config(tmp.path()).unwrap_err());
        assert!(
            err.contains("config.json") && err.contains(expected),
            "{fixture} {key}: {err}"
        );
    }
}
