//! Model directories: the formats HF writes, `kiln init`/`kiln score` end to end, and clear
//! errors for every kind of broken input.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::*;
use kiln::model::{self, init::Preset, Batch, Config};
use kiln::tokenizer::TextTokenizer;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    format!(
        "{:#}",
        model::load_model(dir, DType::F32, &Device::Cpu).unwrap_err()
    )
}

#[test]
fn pytorch_bin_loads_like_safetensors() {
    let st = fixtures().join("parity/rot8");
    let pth = fixtures().join("parity/rot8_pytorch_bin");
    let a = model::load_model(&st, DType::F32, &Device::Cpu).unwrap();
    let b = model::load_model(&pth, DType::F32, &Device::Cpu).unwrap();
    let batch = Batch::right_padded(&[vec![1, 2, 3, 4, 5]], 0, &Device::Cpu).unwrap();
    let diff = max_abs_diff(
        &a.forward(&batch, None).unwrap(),
        &b.forward(&batch, None).unwrap(),
    );
    assert_eq!(diff, 0.0);
}

#[test]
fn missing_weights_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = load_err(&tmp.path().join("nope"));
    assert!(
        err.contains("nope: model directory does not exist"),
        "{err}"
    );

    copy_dir(&fixtures().join("parity/rot8"), tmp.path());
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("no weights found") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn unknown_model_type_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("parity/rot8"), tmp.path());
    let path = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("\"gptj\"", "\"llama\"")).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("config.json") && err.contains("model_type") && err.contains("llama"),
        "{err}"
    );
}

#[test]
fn mismatched_shapes_name_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("parity/rot8"), tmp.path());
    let path = tmp.path().join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["vocab_size"] = serde_json::json!(120);
    std::fs::write(&path, json.to_string()).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("model.safetensors")
            && err.contains("transformer.wte.weight")
            && err.contains("[101, 64]"),
        "{err}"
    );
}

#[test]
fn truncated_safetensors_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("parity/rot8"), tmp.path());
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn missing_shard_is_reported() {
    let src = fixtures().join("parity/rot8");
    let config = model::load_config(&src).unwrap();
    let params = model::load_parameters(&src, &config, DType::F32, &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    model::save_model(tmp.path(), &config, &params, DType::F32, 40_000).unwrap();
    let second_shard = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("model-00002-of-")
        })
        .expect("the model was sharded");
    std::fs::remove_file(&second_shard).unwrap();
    let err = load_err(tmp.path());
    assert!(
        err.contains("model.safetensors.index.json: shard model-00002-of-")
            && err.contains("is listed in the index but missing from"),
        "{err}"
    );
}

#[test]
fn gpt2_tokenizer_known_ids() {
    let Some(dir) = shared("tokenizers/gpt2") else {
        return;
    };
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
    let text =
        "mnli hypothesis: Product and geography are what make cream skimming work. premise: \
                Conceptually cream skimming has two basic dimensions - product and geography. \
                target: neutral<|endoftext|>";
    let ids = tok.encode(text).unwrap();
    assert_eq!(ids.len(), 35);
    assert_eq!(
        &ids[..10],
        &[10295, 4528, 14078, 25, 8721, 290, 27876, 389, 644, 787]
    );
    assert_eq!(&ids[32..], &[25, 8500, 50256]);
    assert_eq!(tok.eos_id(), 50256);
    assert_eq!(tok.pad_id(), 50256);
    // GPT-J's 50400-row embedding fits the 50257-token vocabulary; a 128-row one does not.
    tok.check_fits(50400, Path::new("gptj")).unwrap();
    let err = format!(
        "{:#}",
        tok.check_fits(128, Path::new("tiny-model")).unwrap_err()
    );
    assert!(
        err.contains(
            "produces ids up to 50256, but the model in tiny-model has only 128 embedding rows"
        ),
        "{err}"
    );

    // vocab.json + merges.txt build the same tokenizer as tokenizer.json.
    let tmp = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    let from_bpe = TextTokenizer::from_dir(tmp.path()).unwrap();
    assert_eq!(from_bpe.encode(text).unwrap(), ids);
    assert_eq!(from_bpe.decode(&ids, false).unwrap(), text);
}

#[test]
fn init_then_score_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tiny");
    let mut args = vec![
        "init",
        "--preset",
        "tiny",
        "--out",
        out.to_str().unwrap(),
        "--seed",
        "7",
    ];
    let shared_tok = shared("tokenizers/gpt2");
    if let Some(tok) = &shared_tok {
        args.extend(["--tokenizer", tok.to_str().unwrap()]);
    }
    let (ok, stdout, stderr) = kiln(&args);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("tiny"), "{stdout}");
    let config = model::load_config(&out).unwrap();
    assert_eq!(
        (
            config.model_type(),
            config.n_layer(),
            config.hidden_size(),
            config.n_head()
        ),
        ("gptj", 2, 128, 4)
    );

    // GPT-J's initialisation: std 0.02 weights, zero biases, unit LayerNorm.
    let params = model::load_parameters(&out, &config, DType::F32, &Device::Cpu).unwrap();
    let w = params["transformer.h.0.mlp.fc_in.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.001, "std {std}");
    let b = params["lm_head.bias"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(b.iter().all(|&x| x == 0.0));
    let g = params["transformer.ln_f.weight"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(g.iter().all(|&x| x == 1.0));

    // Same seed, same weights; other seed, other weights.
    let again = tmp.path().join("again");
    assert!(
        kiln(&[
            "init",
            "--preset",
            "tiny",
            "--out",
            again.to_str().unwrap(),
            "--seed",
            "7"
        ])
        .0
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );

    let input = tmp.path().join("in.jsonl");
    let mut lines = vec![
        r#"{"ids": [5, 6, 7, 8, 9, 10, 11]}"#.to_string(),
        r#"{"ids": [42]}"#.to_string(),
        r#"{"ids": [1, 2, 3]}"#.to_string(),
    ];
    if shared_tok.is_some() {
        lines.push(r#"{"text": "Hello world, this is Kiln."}"#.to_string());
    }
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let mut outputs = Vec::new();
    for batch_size in ["1", "3"] {
        let output = tmp.path().join(format!("out{batch_size}.jsonl"));
        let (ok, stdout, stderr) = kiln(&[
            "score",
            "--model",
            out.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--batch-size",
            batch_size,
        ]);
        assert!(ok, "{stderr}");
        assert!(stdout.contains("perplexity"), "{stdout}");
        let rows: Vec<kiln::eval::score::ScoredRow> = std::fs::read_to_string(&output)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), lines.len());
        assert_eq!(rows[0].ids, vec![5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(rows[1].logprobs, vec![None]);
        for row in &rows {
            assert_eq!(row.logprobs.len(), row.ids.len());
            assert!(row.logprobs[0].is_none());
            let sum: f32 = row.logprobs.iter().flatten().sum();
            assert!((sum - row.total).abs() < 1e-4);
            // A random model over a 50400-token vocabulary is close to uniform.
            for lp in row.logprobs.iter().flatten() {
                assert!((lp + (50400f32).ln()).abs() < 1.0, "{lp}");
            }
        }
        outputs.push(rows);
    }
    for (a, b) in outputs[0].iter().zip(&outputs[1]) {
        for (x, y) in a.logprobs.iter().flatten().zip(b.logprobs.iter().flatten()) {
            assert!(
                (x - y).abs() <= 1e-5,
                "batch size changed a logprob: {x} vs {y}"
            );
        }
    }
}

#[test]
fn score_rejects_bad_rows_by_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = fixtures().join("parity/rot8");
    let cases = [
        (
            "{\"ids\": [1, 2]}\n{\"ids\": [1, 500]}\n",
            "in.jsonl:2",
            "token id 500 is outside the model's vocabulary (vocab_size 101)",
        ),
        (
            "{\"ids\": [1, 2]}\nnot json\n",
            "in.jsonl:2",
            "expected {\"text\": \"...\"} or {\"ids\": [...]}",
        ),
        ("{\"ids\": []}\n", "in.jsonl:1", "the row has no tokens"),
        (
            "{\"text\": \"hi\"}\n",
            "in.jsonl:1",
            "a text row needs a tokenizer, and the model directory has none",
        ),
    ];
    for (content, place, message) in cases {
        let input = tmp.path().join("in.jsonl");
        std::fs::write(&input, content).unwrap();
        let output = tmp.path().join("out.jsonl");
        let (ok, _, stderr) = kiln(&[
            "score",
            "--model",
            model_dir.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ]);
        assert!(!ok);
        assert!(stderr.contains(&format!("{place}: {message}")), "{stderr}");
        assert!(!output.exists(), "no partial output is left behind");
    }
    let long: Vec<String> = (0..65).map(|i| (i % 100).to_string()).collect();
    let input = tmp.path().join("in.jsonl");
    std::fs::write(&input, format!("{{\"ids\": [{}]}}\n", long.join(","))).unwrap();
    let (ok, _, stderr) = kiln(&[
        "score",
        "--model",
        model_dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        tmp.path().join("o.jsonl").to_str().unwrap(),
    ]);
    assert!(
        !ok && stderr
            .contains("in.jsonl:1: the row has 65 tokens, more than the model's n_positions (64)"),
        "{stderr}"
    );
}

#[test]
fn presets_have_the_published_shapes() {
    let shape = |p: Preset| {
        let c = p.config();
        let n: usize = model::parameter_shapes(&c)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        (
            c.model_type(),
            c.n_layer(),
            c.hidden_size(),
            c.n_head(),
            c.vocab_size(),
            n,
        )
    };
    // Parameter counts as the published checkpoints report them (GPT-2's tied head once).
    assert_eq!(
        shape(Preset::Gptj6b),
        ("gptj", 28, 4096, 16, 50400, 6_050_882_784)
    );
    assert_eq!(
        shape(Preset::Gpt2),
        ("gpt2", 12, 768, 12, 50257, 124_439_808)
    );
    assert_eq!(
        shape(Preset::Gpt2Medium),
        ("gpt2", 24, 1024, 16, 50257, 354_823_168)
    );
    assert_eq!(
        shape(Preset::Pythia70m),
        ("gpt_neox", 6, 512, 8, 50304, 70_426_624)
    );
    assert_eq!(
        shape(Preset::Pythia160m),
        ("gpt_neox", 12, 768, 12, 50304, 162_322_944)
    );
    assert_eq!(shape(Preset::Small).0, "gptj");
    let Config::GptJ(small) = Preset::Small.config() else {
        panic!("small is a GPT-J preset")
    };
    assert_eq!(
        (small.n_layer, small.n_embd, small.rotary_dim),
        (4, 256, Some(16))
    );
    let Config::GptNeoX(pythia) = Preset::Pythia160m.config() else {
        panic!("pythia-160m is a GPT-NeoX preset")
    };
    assert_eq!(pythia.rotary_dim(), 16, "a quarter of each 64-dim head");
}
